"""The payload log: every request and its answer (or error) to a database, never on the request path.

The request path calls ``done`` / ``failed`` / ``rejected``: a sampling decision and one
``deque.append`` of a tuple holding references to the request's arrays (they are not mutated after
the answer). No I/O, no lock, no await.

A writer thread wakes every ``interval_s`` (sooner once ``batch_size`` records wait), encodes the
records (values or summaries, ``encode.py``; the prediction for feedback; input statistics for drift,
``drift.py``) and stores them: one bulk INSERT in one transaction, run on a single database thread so
that rows reach the database in order.
When the database fails, or does not answer within ``write_timeout_s``, the batch is appended to
the spill file (``spill.py``, fsync'ed) instead, and every later batch follows it there until the
database thread has replayed the file; so memory stays bounded by what arrives in one cycle, whatever
the database does, and order is kept. Rows carry a unique ``uid`` and inserts skip existing ones:
a batch that timed out but committed late, or a replay cut short by a crash, is never stored twice.

Guarantee: a record is in the database, or on disk in the spill file, within one cycle of its
request's answer (``interval_s`` + ``write_timeout_s``). SIGTERM drains: ``close()`` stores everything
it holds. ``kill -9`` loses at most the records of that last cycle; the spill file survives it and is
replayed at the next start. The only other loss: the database down *and* the spill file unwritable
(disk full) for longer than ``max_buffer`` records, counted in ``dropped`` and logged.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import orjson

from modelserve.errors import ModelNotReady, ModelServeError
from modelserve.monitor.drift import DriftTracker
from modelserve.monitor.encode import encode_all, encode_many, prediction
from modelserve.monitor.quality import QualityTracker
from modelserve.monitor.spill import SpillFile
from modelserve.server.config import Monitoring

log = logging.getLogger(__name__)
_DEFAULT = Monitoring()
_JSON = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS
#: payload rows per INSERT statement (x 13 parameters: under SQLite's and PostgreSQL's limits)
CHUNK_ROWS = 500
PAYLOAD_COLUMNS = ("uid", "request_id", "model", "version", "protocol", "status", "error", "latency_ms", "client",
                   "at", "inputs", "outputs", "prediction")


def _dumps(value) -> str:
    return orjson.dumps(value, option=_JSON).decode()


def _loads(value):
    # SQLite gives a JSON column NUMERIC affinity: a stored '0' comes back as the integer 0
    return value if isinstance(value, (int, float)) else orjson.loads(value)


def monitor_engine(url: str):
    """An engine on the monitor database, reading and writing its JSON columns with orjson."""
    from sqlalchemy.engine import make_url

    from modelserve.registry.db import make_engine

    options = {"json_serializer": _dumps, "json_deserializer": _loads}
    if make_url(url).get_backend_name() == "postgresql":
        options["connect_args"] = {"connect_timeout": 5}
    return make_engine(url, **options)


def status_of(exc: BaseException) -> tuple[int, str]:
    if isinstance(exc, ModelServeError):
        return exc.http_status, exc.message[:2000]
    if isinstance(exc, asyncio.CancelledError):
        return 499, "cancelled: the client went away or the server is stopping"
    return 500, f"internal error: {exc}"[:2000]


def _encode_one(record: tuple, config) -> tuple:
    """(inputs, outputs, prediction) of one record, encoded alone."""
    inputs, outputs = record[10], record[11]
    mon = config.monitoring if config is not None else _DEFAULT
    try:
        pred = prediction(outputs, bool(config and config.max_batch_size), mon.task) if outputs else None
        return encode_all(inputs, mon.max_values), encode_all(outputs, mon.max_values), pred
    except Exception as exc:  # noqa: BLE001 - a tensor we cannot encode must not lose the row
        return {"unencodable": str(exc)}, {"unencodable": str(exc)}, None


def _concat(tensors: list[dict | None]) -> dict | None:
    """Requests' tensors joined along the batch axis, or None when their names, dtypes or row shapes differ."""
    first = tensors[0]
    if not first:
        return None
    signature = {name: (a.dtype, a.shape[1:]) for name, a in first.items() if a.ndim}
    if len(signature) != len(first):
        return None
    for t in tensors[1:]:
        if not t or len(t) != len(first) or any((a.dtype, a.shape[1:]) != signature.get(n) or not a.ndim
                                                for n, a in t.items()):
            return None
    return {name: np.concatenate([t[name] for t in tensors]) for name in first}


def _encode_group(group: list[tuple], config) -> tuple[list[tuple], list[tuple]]:
    """Records of one model version -> ([(inputs, outputs, prediction)], drift observations)."""
    mon = config.monitoring if config is not None else _DEFAULT
    batching = bool(config and config.max_batch_size)
    enc_in = encode_many([r[10] for r in group], mon.max_values)
    enc_out = encode_many([r[11] for r in group], mon.max_values)
    answered = [r for r in group if r[11]]
    joined = _concat([r[11] for r in answered]) if batching and len(answered) > 1 else None
    if joined is None:
        preds = [prediction(r[11], batching, mon.task) if r[11] else None for r in group]
    else:  # row-wise, so the prediction of the joined outputs is the requests' predictions joined
        whole = prediction(joined, True, mon.task)
        split, start = {}, 0
        if whole is not None:
            kind, values, labels = whole["kind"], whole["values"], whole.get("labels")
            for r in answered:
                end = start + len(next(iter(r[11].values())))
                split[id(r)] = {"kind": kind, "values": values[start:end]}
                if labels is not None:
                    split[id(r)]["labels"] = labels[start:end]
                start = end
        preds = [split.get(id(r)) for r in group]
    observed = []
    if config is not None:
        ok = [r for r in group if r[7] == 200 and r[10]]
        joined_in = _concat([r[10] for r in ok]) if batching and len(ok) > 1 else None
        if joined_in is not None:
            observed.append((ok[0][3], ok[0][4], joined_in, config))
        else:
            observed += [(r[3], r[4], r[10], config) for r in ok]
    return list(zip(enc_in, enc_out, preds)), observed


class PayloadLog:
    def __init__(self, url: str, spill_path: Path, *, interval_s: float = 0.25, batch_size: int = 2000,
                 write_timeout_s: float = 2.0, retry_s: float = 1.0, max_buffer: int = 200_000,
                 quality: QualityTracker | None = None, drift: DriftTracker | None = None):
        self.url = url
        self.spill = SpillFile(spill_path)
        self.quality = quality or QualityTracker()
        #: input drift, fed here from the logged successful requests (sampled ones only; see drift.py)
        self.drift = drift or DriftTracker()
        self.interval_s, self.batch_size = interval_s, batch_size
        self.write_timeout_s, self.retry_s, self.max_buffer = write_timeout_s, retry_s, max_buffer
        self._buf: deque = deque()
        self._statements: dict[int, str] = {}  # rows -> the INSERT of that many payload rows
        #: row keys: a random per-process prefix and a counter (unique across processes and restarts)
        self._uid_prefix, self._uid = uuid.uuid4().hex[:16], 0
        self._held: list[dict] = []  # encoded rows neither the database nor the disk took (rare)
        self._seq_in = self._seq_seen = self._seq_done = 0
        self._engine = None
        self._db = ThreadPoolExecutor(1, thread_name_prefix="payload-db")
        self._job: Future | None = None
        self._retry_at = 0.0
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="payload-log", daemon=True)
        self.written = self.dropped = 0
        self.db_error: str | None = None

    def start(self) -> None:
        self._job = self._db.submit(self._connect)  # connect (and migrate) before the first records arrive
        self._thread.start()

    # -- the request path: append only -------------------------------------------------------

    def done(self, request, response, config, latency_ns: int) -> None:
        mon = config.monitoring if config is not None else _DEFAULT
        if not mon.payload_log or (mon.sample_rate < 1.0 and random.random() >= mon.sample_rate):
            return
        self._append(("p", time.time(), request.request_id, request.model, response.version, request.protocol,
                      request.client, 200, None, latency_ns, request.inputs, response.outputs, config))

    def failed(self, request, version: str | None, config, exc: BaseException, latency_ns: int) -> None:
        if config is not None and not config.monitoring.payload_log:
            return
        status, error = status_of(exc)
        self._append(("p", time.time(), request.request_id, request.model, version, request.protocol,
                      request.client, status, error, latency_ns, request.inputs or None, None, config))

    def rejected(self, model: str, version: str | None, protocol: str, client: str | None, request_id: str,
                 exc: BaseException, latency_ns: int = 0) -> None:
        """A request refused before it became an ``InferRequest`` (bad body, unknown model)."""
        status, error = status_of(exc)
        self._append(("p", time.time(), request_id, model, version, protocol, client, status, error, latency_ns,
                      None, None, None))

    def feedback(self, row: dict) -> None:
        self._append(("f", {**row, "_t": "f", "at": time.time()}))

    def _append(self, record: tuple) -> None:
        self._buf.append(record)
        self._seq_in += 1
        if len(self._buf) >= self.batch_size and not self._wake.is_set():
            self._wake.set()

    # -- the writer thread -------------------------------------------------------------------

    def _run(self) -> None:
        deadline = None
        while True:
            self._wake.wait(self.interval_s)
            self._wake.clear()
            stopping = self._stopping
            try:
                self._cycle()
            except Exception:  # noqa: BLE001 - the writer must outlive any one bad batch
                log.exception("payload log writer")
            if stopping:
                deadline = deadline or time.monotonic() + 10
                if not self._buf and (not self._held or time.monotonic() > deadline):
                    return

    def _cycle(self) -> None:
        self._reap()
        if self._held:
            rows, self._held = self._held, []
            self._store(rows)
        while self._buf:
            records = [self._buf.popleft() for _ in range(min(len(self._buf), self.batch_size))]
            rows = self._encode(records)
            self._seq_seen += len(records)
            self._store(rows)
            self._seq_done += len(records)
        self._reap()
        if self._job is None and time.monotonic() >= self._retry_at:
            if self._engine is None:
                self._job = self._db.submit(self._connect)
            elif self.spill.pending():
                self._job = self._db.submit(self._replay)

    def _encode(self, records: list[tuple]) -> list[dict]:
        """Records -> rows. Requests to one model version are encoded together: one numpy pass per
        tensor name for the values or summaries, one for the predictions and one for drift, so the
        thread's time (and the GIL it takes from the event loop) grows per cycle, not per record."""
        groups: dict[tuple, list[int]] = {}
        for i, record in enumerate(records):
            if record[0] == "p":
                groups.setdefault((id(record[12]), record[3], record[4]), []).append(i)
        encoded, observed = {}, []
        for idx in groups.values():
            group = [records[i] for i in idx]
            config = group[0][12]
            try:
                parts, seen = _encode_group(group, config)
            except Exception:  # noqa: BLE001 - one record we cannot encode must not cost its neighbours
                parts, seen = [_encode_one(r, config) for r in group], []
            encoded.update(zip(idx, parts))
            observed += seen
        rows, remembered = [], []
        for i, record in enumerate(records):
            if record[0] == "f":
                rows.append(record[1])
                continue
            _, at, rid, model, version, protocol, client, status, error, latency_ns, _, _, _ = record
            enc_in, enc_out, pred = encoded[i]
            self._uid += 1
            rows.append({"_t": "p", "uid": f"{self._uid_prefix}{self._uid:x}", "request_id": rid[:200],
                         "model": model[:200], "version": version[:40] if version else None,
                         "protocol": protocol[:20], "status": status, "error": error, "latency_ms": latency_ns / 1e6,
                         "client": client[:200] if client else None, "at": at, "inputs": enc_in,
                         "outputs": enc_out, "prediction": pred})
            if pred is not None:
                remembered.append((rid, model, version, pred))
        self.quality.remember(remembered)
        try:
            self.drift.observe(observed)
        except Exception:  # noqa: BLE001 - drift must never cost a row
            log.exception("payload log: drift statistics")
        return rows

    def _store(self, rows: list[dict]) -> None:
        """Into the database when it is there and nothing waits in the spill file; else onto the spill file."""
        if (self._job is None and self._engine is not None and not self.spill.pending()
                and time.monotonic() >= self._retry_at):
            job = self._db.submit(self._insert, rows)
            try:
                job.result(timeout=self.write_timeout_s)
                return
            except FutureTimeout:  # still running: spill the rows too; the replay skips those it commits
                self._job = job
                log.warning("payload log: the database took over %.1fs; spilling to %s", self.write_timeout_s,
                            self.spill.path)
            except Exception as exc:  # noqa: BLE001
                self._failed(exc)
        try:
            self.spill.append(rows)
        except OSError as exc:
            self._held.extend(rows)
            if len(self._held) > self.max_buffer:
                lost = len(self._held) - self.max_buffer
                del self._held[:lost]
                self.dropped += lost
                log.error("payload log: database and spill file %s both fail (%s); dropped %d records",
                          self.spill.path, exc, lost)

    def _reap(self) -> None:
        job = self._job
        if job is None or not job.done():
            return
        self._job = None
        if job.exception() is not None:
            self._failed(job.exception())
        elif self.db_error is not None:
            log.info("payload log: the database is back")
            self.db_error = None

    def _failed(self, exc: BaseException) -> None:
        if self.db_error is None:
            log.warning("payload log: database unavailable (%s); spilling to %s until it is back",
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__, self.spill.path)
        self.db_error = str(exc) or type(exc).__name__
        self._retry_at = time.monotonic() + self.retry_s

    # -- the database thread -----------------------------------------------------------------

    def _connect(self) -> None:
        logging.getLogger("alembic").setLevel(logging.WARNING)  # its info lines say nothing to an operator
        from sqlalchemy import select

        from modelserve.monitor.schema import FeedbackRecord, PayloadRecord
        from modelserve.registry.db import migrate

        engine = monitor_engine(self.url)
        try:
            migrate(engine)
            feedback = FeedbackRecord.__table__
            with engine.connect() as conn:  # refill the quality windows from the stored feedback
                stored = conn.execute(select(feedback.c.request_id, feedback.c.model, feedback.c.version,
                                             feedback.c.prediction, feedback.c.ground_truth)
                                      .order_by(feedback.c.id.desc()).limit(self.quality.window * 20)).all()
        except BaseException:
            engine.dispose()
            raise
        self.quality.restore([tuple(r) for r in reversed(stored) if r.prediction])
        self._payload_insert = _insert_skipping_duplicates(engine, PayloadRecord.__table__)
        self._feedback_insert = _insert_skipping_duplicates(engine, feedback)
        self._engine = engine

    def _insert(self, rows: list[dict]) -> None:
        payload, feedback = [], []
        for row in rows:
            row = dict(row)
            (feedback if row.pop("_t", "p") == "f" else payload).append(row)
            row["at"] = datetime.fromtimestamp(row["at"], UTC)
        from sqlalchemy.exc import DataError, IntegrityError

        try:
            with self._engine.begin() as conn:
                for start in range(0, len(payload), CHUNK_ROWS):
                    chunk = payload[start:start + CHUNK_ROWS]
                    conn.exec_driver_sql(self._rows_statement(len(chunk)), self._row_params(chunk))
                if feedback:
                    conn.execute(self._feedback_insert, feedback)
        except (DataError, IntegrityError):  # one row the database refuses must not block the rest forever
            for statement, row in [(self._payload_insert, r) for r in payload] + \
                                  [(self._feedback_insert, r) for r in feedback]:
                try:
                    with self._engine.begin() as conn:
                        conn.execute(statement, [row])
                except (DataError, IntegrityError) as exc:
                    self.dropped += 1
                    log.error("payload log: the database refuses a row (request %s): %s",
                              row.get("request_id"), str(exc).splitlines()[0])
        self.written += len(payload)

    def _rows_statement(self, count: int) -> str:
        """One INSERT of ``count`` payload rows: the database takes a chunk in one statement (one GIL
        release and re-take by the driver, not one per row, and no per-row work in SQLAlchemy)."""
        statement = self._statements.get(count)
        if statement is None:
            mark = "?" if self._engine.dialect.paramstyle == "qmark" else "%s"
            one = "(" + ", ".join([mark] * len(PAYLOAD_COLUMNS)) + ")"
            statement = (f"INSERT INTO payload_log ({', '.join(PAYLOAD_COLUMNS)}) VALUES "
                         f"{', '.join([one] * count)} ON CONFLICT (uid) DO NOTHING")
            self._statements[count] = statement
        return statement

    def _row_params(self, rows: list[dict]) -> tuple:
        """The rows' values, flat, as the driver takes them: JSON as text (orjson), ``at`` as SQLAlchemy
        stores it (SQLite: naive UTC text; elsewhere the datetime)."""
        sqlite = self._engine.dialect.name == "sqlite"
        params: list = []
        for row in rows:
            at = row["at"]
            params += (row["uid"], row["request_id"], row["model"], row["version"], row["protocol"], row["status"],
                       row["error"], row["latency_ms"], row["client"],
                       at.replace(tzinfo=None).isoformat(" ", "microseconds") if sqlite else at,
                       *(None if row[c] is None else _dumps(row[c]) for c in ("inputs", "outputs", "prediction")))
        return tuple(params)

    def _replay(self) -> None:
        while True:
            rows, end = self.spill.read(self.batch_size)
            if rows:
                self._insert(rows)
            self.spill.consumed(end, len(rows))
            if not rows:
                return

    # -- waiting, reading, closing (never called on the request path) ----------------------

    @property
    def engine(self):
        if self._engine is None:
            raise ModelNotReady(f"the monitor database is not available ({self.db_error or 'connecting'})")
        return self._engine

    async def sync(self, timeout_s: float = 5.0) -> None:
        """Wait until the records appended so far are encoded (their predictions joinable)."""
        target = self._seq_in
        deadline = time.monotonic() + timeout_s
        while self._seq_seen < target and time.monotonic() < deadline:
            self._wake.set()
            await asyncio.sleep(0.005)

    async def flush(self, timeout_s: float = 10.0) -> dict:
        """Wait until the records appended so far are in the database (or ``timeout_s`` passes)."""
        target = self._seq_in
        deadline = time.monotonic() + timeout_s
        while not (done := self._flushed(target)) and time.monotonic() < deadline:
            self._wake.set()
            await asyncio.sleep(0.01)
        return {"flushed": done, **self.status()}

    def _flushed(self, target: int) -> bool:
        return (self._seq_done >= target and not self._held and self._job is None
                and self._engine is not None and not self.spill.pending())

    def status(self) -> dict:
        return {"buffered": len(self._buf), "spill_bytes": self.spill.pending(), "spilled": self.spill.appended,
                "replayed": self.spill.replayed, "written": self.written, "dropped": self.dropped,
                "database_error": self.db_error}

    def close(self, timeout_s: float = 30.0) -> None:
        """Store everything held (SIGTERM drain): into the database, or the spill file for the next start."""
        deadline = time.monotonic() + timeout_s
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout_s)
        try:
            if self._job is not None:
                self._job.result(max(0.1, deadline - time.monotonic()))
            if self._engine is not None and self.spill.pending() and self.db_error is None:
                self._db.submit(self._replay).result(max(0.1, deadline - time.monotonic()))
        except Exception as exc:  # noqa: BLE001 - what is left stays in the spill file
            log.warning("payload log: %d bytes stay in %s for the next start (%s)",
                        self.spill.pending(), self.spill.path, exc)
        self._db.shutdown(wait=False, cancel_futures=True)
        self.spill.close()
        if self._engine is not None:
            self._engine.dispose()


def _insert_skipping_duplicates(engine, table):
    """INSERT … ON CONFLICT DO NOTHING where the dialect has it (SQLite, PostgreSQL)."""
    name = engine.dialect.name
    if name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:
        return table.insert()
    return insert(table).on_conflict_do_nothing()
