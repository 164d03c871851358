"""``modelserve logs`` / ``stats`` / ``feedback``: the payload log and model quality from the command line.

``logs`` and ``stats`` read the monitor database directly (the URL a server logs to: ``--db`` or
``MODELSERVE_MONITOR_DB``), so they work with no server running; ``feedback`` posts to a server,
which joins the ground truth with the prediction it logged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from modelserve.settings import DEFAULT_MONITOR_DB

_DB = typer.Option(DEFAULT_MONITOR_DB, "--db", envvar="MODELSERVE_MONITOR_DB",
                   help="Monitor database URL (what the server's --monitor-db names)")


def _fail(message: str, code: int = 1):
    from rich.console import Console

    Console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def _engine(url: str):
    from sqlalchemy import inspect
    from sqlalchemy.engine import make_url

    from modelserve.monitor.payload_log import monitor_engine
    from modelserve.registry.db import safe_url

    try:
        parsed = make_url(url)
    except Exception as exc:  # noqa: BLE001
        _fail(f"--db {url}: not a database URL ({exc})", 2)
    if parsed.get_backend_name() == "sqlite" and parsed.database and not Path(parsed.database).exists():
        _fail(f"no monitor database at {parsed.database} (start a server with the payload log, or pass --db)")
    try:
        engine = monitor_engine(url)
        if not inspect(engine).has_table("payload_log"):
            _fail(f"{safe_url(url)} has no payload log yet (a server creates it when it starts logging)")
    except typer.Exit:
        raise
    except Exception as exc:  # noqa: BLE001 - unreachable server, bad credentials, missing driver
        _fail(f"cannot open {safe_url(url)}: {str(exc).splitlines()[0]}")
    return engine


def logs(
    db: str = _DB,
    model: Optional[str] = typer.Option(None, help="Only this model"),
    version: Optional[str] = typer.Option(None, help="Only this version"),
    status: Optional[str] = typer.Option(None, help="200, 404, 4xx, ok or error"),
    since: Optional[str] = typer.Option(None, help="ISO time or age: 30m, 1h, 2d"),
    request_id: Optional[str] = typer.Option(None, help="Only this request id"),
    limit: Optional[int] = typer.Option(None, help="Most rows (default 50 on screen, all when exporting; 0 = all)"),
    json_out: bool = typer.Option(False, "--json", help="Print the rows as JSON"),
    export: Optional[Path] = typer.Option(None, help="Write the rows to a .csv or .parquet file (for retraining)"),
):
    """Query the payload log: requests, their inputs, outputs, status and latency.

    Example: modelserve logs --model resnet --status error --since 1h

    Example: modelserve logs --db postgresql+psycopg://db/monitor --model resnet --export week.parquet --since 7d
    """
    from modelserve.errors import InvalidInput
    from modelserve.monitor import query

    try:
        since_at = query.parse_since(since)
        query._status_filter(query.PayloadRecord.__table__.c.status, status)
    except InvalidInput as exc:
        _fail(exc.message, 2)
    if limit is None:
        limit = 0 if export else 50
    rows = query.query_rows(_engine(db), model, version, status, since_at, limit or None, request_id,
                            oldest_first=bool(export))
    if export:
        try:
            query.export(rows, export)
        except InvalidInput as exc:
            _fail(exc.message, 2)
        typer.echo(f"wrote {len(rows)} rows to {export}")
    elif json_out:
        typer.echo(json.dumps(rows, indent=2))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table()
        for name in ("id", "at (UTC)", "model", "version", "status", "ms", "request id", "client"):
            table.add_column(name, no_wrap=True)
        table.add_column("error", no_wrap=True, overflow="ellipsis", max_width=60)
        for r in rows:
            table.add_row(str(r["id"]), r["at"][:23].replace("T", " "), r["model"], r["version"] or "",
                          str(r["status"]) if r["status"] == 200 else f"[red]{r['status']}[/]",
                          f"{r['latency_ms']:.2f}", r["request_id"], r["client"] or "", (r["error"] or "")[:60])
        Console().print(table)


def stats(
    db: str = _DB,
    model: Optional[str] = typer.Option(None, help="Only this model"),
    since: Optional[str] = typer.Option(None, help="ISO time or age: 30m, 1h, 2d"),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table"),
):
    """Per model version: requests, failures, latency p50/p95, and accuracy (or MAE/RMSE) from feedback.

    Example: modelserve stats --model resnet --since 1d
    """
    from modelserve.errors import InvalidInput
    from modelserve.monitor import query

    try:
        since_at = query.parse_since(since)
    except InvalidInput as exc:
        _fail(exc.message, 2)
    rows = query.stats(_engine(db), model, since_at)
    if json_out:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    def num(value, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    table = Table("model", "version", "requests", "failures", "p50 ms", "p95 ms", "feedback", "accuracy",
                  "MAE", "RMSE")
    for r in rows:
        table.add_row(r["model"], r["version"], str(r["requests"]), str(r["failures"]), num(r["p50_ms"], ".2f"),
                      num(r["p95_ms"], ".2f"), str(r["feedback"]), num(r["accuracy"], ".3f"), num(r["mae"], ".4g"),
                      num(r["rmse"], ".4g"))
    Console().print(table)


def feedback(
    model: str = typer.Argument(..., help="The model the request went to"),
    request_id: str = typer.Argument(..., help="The request's id (the x-request-id header of its answer)"),
    truth: str = typer.Argument(..., help="Ground truth: a class (3), a label (cat), a number (0.7) or a JSON list"),
    url: str = typer.Option("http://127.0.0.1:8000", help="The server that answered the request"),
):
    """Give the ground truth for a logged request; the server scores its prediction.

    Example: modelserve feedback resnet 5f1c0e... 281
    """
    import httpx

    try:
        value = json.loads(truth)
    except ValueError:
        value = truth  # a bare label
    try:
        answer = httpx.post(f"{url.rstrip('/')}/v2/models/{model}/feedback",
                            json={"request_id": request_id, "ground_truth": value}, timeout=30)
    except httpx.HTTPError as exc:
        _fail(f"cannot reach {url}: {exc}")
    if answer.status_code != 200:
        try:
            message = answer.json().get("error", answer.text)
        except ValueError:
            message = answer.text
        _fail(f"{answer.status_code}: {message}")
    doc = answer.json()
    verdict = ("correct" if doc["correct"] == doc["samples"] else f"{doc['correct']}/{doc['samples']} correct") \
        if "correct" in doc else f"abs error {doc['abs_error']:.4g}"
    typer.echo(f"{model} v{doc['version']}: predicted {doc['prediction']}, truth {value}: {verdict}")


def register(app: typer.Typer) -> None:
    for command in (logs, stats, feedback):
        app.command()(command)
