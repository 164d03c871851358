"""Reading the payload log back: filtered rows, per-version statistics, CSV/Parquet export.

Plain functions over a SQLAlchemy engine, shared by ``GET /v2/logs``, the feedback join and the
``modelserve logs`` / ``stats`` commands (which read the database directly; no server needed).
All blocking: call them from a thread when on an event loop.
"""

from __future__ import annotations

import csv
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import Engine, func, select

from modelserve.errors import InvalidInput
from modelserve.monitor.schema import FeedbackRecord, PayloadRecord

COLUMNS = ["id", "request_id", "at", "model", "version", "protocol", "status", "error", "latency_ms", "client",
           "inputs", "outputs", "prediction"]
_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNIT = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(text: str | None, now: datetime | None = None) -> datetime | None:
    """``1h``, ``30m``, ``2d`` (ago), or an ISO time (UTC unless it says otherwise)."""
    if not text:
        return None
    match = _RELATIVE.match(text.strip())
    if match:
        return (now or datetime.now(UTC)) - timedelta(**{_UNIT[match.group(2)]: float(match.group(1))})
    try:
        at = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise InvalidInput(f"since '{text}': expected an ISO time (2026-01-31T12:00) or an age such as 1h, 30m, 2d") from None
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def _utc(at: datetime) -> datetime:
    return at if at.tzinfo else at.replace(tzinfo=UTC)  # SQLite hands back naive UTC


def _status_filter(column, status: str | int | None):
    if status is None or status == "":
        return None
    text = str(status).lower()
    if text in ("ok", "success"):
        return column == 200
    if text in ("error", "failed", "failure"):
        return column != 200
    if re.fullmatch(r"[1-5]xx", text):
        base = int(text[0]) * 100
        return (column >= base) & (column < base + 100)
    if text.isdigit():
        return column == int(text)
    raise InvalidInput(f"status '{status}': expected a code (200, 404), a class (4xx), ok or error")


def _where(statement, table, model, version, status, since, request_id=None):
    if model:
        statement = statement.where(table.c.model == model)
    if version:
        statement = statement.where(table.c.version == str(version))
    condition = _status_filter(table.c.status, status) if "status" in table.c else None
    if condition is not None:
        statement = statement.where(condition)
    if since is not None:
        statement = statement.where(table.c.at >= since.astimezone(UTC))  # stored as UTC (SQLite: naive UTC)
    if request_id:
        statement = statement.where(table.c.request_id == request_id)
    return statement


def query_rows(engine: Engine, model: str | None = None, version: str | None = None, status=None,
               since: datetime | None = None, limit: int | None = 100, request_id: str | None = None,
               oldest_first: bool = False) -> list[dict]:
    """Payload-log rows, newest first (or oldest first), as dicts with ``at`` an ISO string."""
    table = PayloadRecord.__table__
    statement = _where(select(*(table.c[c] for c in COLUMNS)), table, model, version, status, since, request_id)
    statement = statement.order_by(table.c.id.asc() if oldest_first else table.c.id.desc())
    if limit:
        statement = statement.limit(limit)
    with engine.connect() as conn:
        rows = conn.execute(statement).mappings().all()
    return [{**row, "at": _utc(row["at"]).isoformat()} for row in rows]


def find_prediction(engine: Engine, request_id: str) -> tuple[str, str | None, dict | None, int] | None:
    """The latest logged request with this id: (model, version, prediction, status)."""
    table = PayloadRecord.__table__
    with engine.connect() as conn:
        row = conn.execute(select(table.c.model, table.c.version, table.c.prediction, table.c.status)
                           .where(table.c.request_id == request_id).order_by(table.c.id.desc()).limit(1)).first()
    return tuple(row) if row is not None else None


def feedback_exists(engine: Engine, request_id: str) -> bool:
    table = FeedbackRecord.__table__
    with engine.connect() as conn:
        return conn.execute(select(table.c.id).where(table.c.request_id == request_id).limit(1)).first() is not None


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    rank = q * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def stats(engine: Engine, model: str | None = None, since: datetime | None = None) -> list[dict]:
    """Per (model, version): requests, failures, latency p50/p95/mean (ms) from the payload log, and
    accuracy or MAE/RMSE from all stored feedback."""
    log, fb = PayloadRecord.__table__, FeedbackRecord.__table__
    groups: dict[tuple, dict] = {}

    def group(m, v) -> dict:
        return groups.setdefault((m, v or ""), {"model": m, "version": v or "", "requests": 0, "failures": 0,
                                                "latencies": [], "feedback": 0, "samples": 0, "correct": None,
                                                "abs_error": None, "sq_error": None})

    with engine.connect() as conn:
        statement = _where(select(log.c.model, log.c.version, log.c.status, log.c.latency_ms), log, model, None,
                           None, since)
        for m, v, status, latency in conn.execute(statement):
            g = group(m, v)
            g["requests"] += 1
            g["failures"] += status != 200
            if status == 200:
                g["latencies"].append(latency)
        statement = _where(select(fb.c.model, fb.c.version, func.count(), func.sum(fb.c.samples),
                                  func.sum(fb.c.correct), func.sum(fb.c.abs_error), func.sum(fb.c.sq_error))
                           .group_by(fb.c.model, fb.c.version), fb, model, None, None, since)
        for m, v, count, samples, correct, abs_error, sq_error in conn.execute(statement):
            g = group(m, v)
            g.update(feedback=count, samples=samples or 0, correct=correct, abs_error=abs_error, sq_error=sq_error)
    out = []
    for key in sorted(groups):
        g = groups[key]
        latencies, n = g.pop("latencies"), g["samples"]
        correct, abs_error, sq_error = g.pop("correct"), g.pop("abs_error"), g.pop("sq_error")
        g.update(p50_ms=_percentile(latencies, 0.5), p95_ms=_percentile(latencies, 0.95),
                 mean_ms=sum(latencies) / len(latencies) if latencies else None,
                 accuracy=correct / n if n and correct is not None else None,
                 mae=abs_error / n if n and abs_error is not None else None,
                 rmse=(sq_error / n) ** 0.5 if n and sq_error is not None else None)
        out.append(g)
    return out


def export(rows: list[dict], path: Path) -> Path:
    """Rows to ``.csv`` (JSON columns as JSON text) or ``.parquet`` (needs pyarrow)."""
    path = Path(path)
    flat = [{c: json.dumps(r.get(c)) if c in ("inputs", "outputs", "prediction") else r.get(c) for c in COLUMNS}
            for r in rows]
    if path.suffix == ".csv":
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(flat)
    elif path.suffix in (".parquet", ".pq"):
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise InvalidInput("Parquet export needs pyarrow: pip install pyarrow (or export to .csv)") from None
        pq.write_table(pa.Table.from_pylist(flat), path)
    else:
        raise InvalidInput(f"export to '{path.name}': use a .csv or .parquet file name")
    return path
