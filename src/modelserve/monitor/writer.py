"""The payload log's writer process: encodes, scores and stores what the server's ``PayloadLog`` ships.

Started by ``PayloadLog.start`` as ``python -m modelserve.monitor.writer DATA_FD CONTROL_FD`` (never a
fork of the server: it imports no server module but the model config classes it unpickles). Two
connections (socketpairs) join it to the server:

- data: the server sends one pickled batch per cycle (records grouped per model version, their arrays
  joined; see ``PayloadLog._pack``); the writer answers ``("s", seen, stored, connected, db_error)``:
  the last batch encoded (its predictions joinable for feedback), the last batch whose rows are in the
  database or fsync'ed in the spill file, and whether the database is connected;
- control: request/response calls (quality, drift, status, close) from the server's threads.

SIGINT and SIGTERM are ignored here: the server drives the drain (``close``). When the server dies
(``kill -9``) both connections reach EOF: the writer stores what it received (database or spill file)
and exits.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

from modelserve.monitor.drift import DriftTracker
from modelserve.monitor.encode import encode_all, encode_many, prediction
from modelserve.monitor.payload_log import (
    CHUNK_ROWS,
    PAYLOAD_COLUMNS,
    _DEFAULT,
    _dumps,
    monitor_engine,
    recv_message,
)
from modelserve.monitor.quality import QualityTracker
from modelserve.monitor.spill import SpillFile

log = logging.getLogger("modelserve.monitor.payload_log")


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


def _unpack(packed) -> list:
    """``PayloadLog._pack_tensors``'s output -> one dict (or None) per record; joined arrays come back as views."""
    kind, value = packed
    if kind == "l":
        return list(value)
    parts = []
    for joined, counts in value.values():
        if len(counts) == len(joined) and all(c == 1 for c in counts):  # one row each: the common case
            parts.append([joined[i:i + 1] for i in range(len(joined))])
        else:
            ends = np.cumsum(counts).tolist()
            parts.append([joined[end - c:end] for c, end in zip(counts, ends)])
    names = list(value)
    if len(names) == 1:
        return [{names[0]: part} for part in parts[0]]
    return [dict(zip(names, row)) for row in zip(*parts)]


class Writer:
    """Encodes records (values or summaries, predictions for feedback, drift statistics) and stores
    them: one bulk INSERT in one transaction on a single database thread, or the spill file when the
    database fails or does not answer within ``write_timeout_s``; replays the spill file when it is back."""

    def __init__(self, url: str, spill_path: Path, *, uid_prefix: str, interval_s: float = 0.25,
                 batch_size: int = 2000, write_timeout_s: float = 2.0, retry_s: float = 1.0,
                 max_buffer: int = 200_000, quality_window: int = 1000, quality_remember: int = 100_000,
                 repository: str | None = None, report=None):
        self.url = url
        self.spill = SpillFile(spill_path)
        self.quality = QualityTracker(quality_window, quality_remember)
        self.drift = DriftTracker(repository)
        self.interval_s, self.batch_size = interval_s, batch_size
        self.write_timeout_s, self.retry_s, self.max_buffer = write_timeout_s, retry_s, max_buffer
        self.uid_prefix = uid_prefix
        self._report = report or (lambda seen, stored: None)
        self._buf: deque = deque()
        self._marks: deque = deque()  # (batch, records received up to its end)
        self._received = 0
        self._seen_batch = self._stored_batch = 0
        self._statements: dict[int, str] = {}
        self._held: list[dict] = []
        self._seq_seen = self._seq_done = 0
        self._engine = None
        self._db = ThreadPoolExecutor(1, thread_name_prefix="payload-db")
        self._job: Future | None = None
        self._retry_at = 0.0
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="payload-log", daemon=True)
        self.written = self.dropped = 0
        self.db_error: str | None = None
        self.configs: dict = {None: None}

    def start(self) -> None:
        self._job = self._db.submit(self._connect)
        self._thread.start()

    # -- what the server ships ------------------------------------------------------------------

    def receive(self, message) -> None:
        """One message of the data connection: ``("c", configs)`` or ``("b", batch, ...)``."""
        if message[0] == "c":
            self.configs.update(message[1])
            return
        _, batch, uid_base, count, configs, feedback, groups = message
        self.configs.update(configs)
        records: list = [None] * count
        for pos, row in feedback:
            records[pos] = ("f", row)
        prefix = self.uid_prefix
        for key, model, version, positions, at, rid, protocol, client, status, error, latency, p_in, p_out in groups:
            config = self.configs[key]
            inputs, outputs = _unpack(p_in), _unpack(p_out)
            for j, pos in enumerate(positions):
                records[pos] = ("p", at[j], rid[j], model, version, protocol[j], client[j], status[j], error[j],
                                latency[j], inputs[j], outputs[j], config, f"{prefix}{uid_base + pos:x}")
        self._buf.extend(records)
        self._received += count
        self._marks.append((batch, self._received))
        self._wake.set()

    def _progress(self) -> None:
        """Report the batches encoded and the batches stored (database, or fsync'ed in the spill file)."""
        seen, stored = self._seen_batch, self._stored_batch
        marks = list(self._marks)  # the receiving thread appends; only this thread pops
        for batch, end in marks:
            if end > self._seq_seen:
                break
            seen = batch
        if not self._held:
            for batch, end in marks:
                if end > self._seq_done:
                    break
                stored = batch
        while self._marks and self._marks[0][0] <= stored:
            self._marks.popleft()
        self._seen_batch, self._stored_batch = max(seen, self._seen_batch), max(stored, self._stored_batch)
        self._report(self._seen_batch, self._stored_batch)

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
            try:
                self._progress()
            except Exception:  # noqa: BLE001 - the server is gone: the close path stores what is left
                pass
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
            self._progress()
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
        tensor name for the values or summaries, one for the predictions and one for drift."""
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
            _, at, rid, model, version, protocol, client, status, error, latency_ns, _, _, _, uid = record
            enc_in, enc_out, pred = encoded[i]
            rows.append({"_t": "p", "uid": uid, "request_id": rid[:200],
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
        try:  # the server waits for this at start
            self._report(self._seen_batch, self._stored_batch)
        except Exception:  # noqa: BLE001
            pass

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
        """One INSERT of ``count`` payload rows (one driver call per chunk, no per-row SQLAlchemy work)."""
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

    # -- the control calls ------------------------------------------------------------------

    def status(self) -> dict:
        self._wake.set()  # a caller waiting on a flush: run a cycle (reap, replay) now
        return {"buffered": len(self._buf) + len(self._held), "spill_bytes": self.spill.pending(),
                "spilled": self.spill.appended, "replayed": self.spill.replayed, "written": self.written,
                "dropped": self.dropped, "database_error": self.db_error,
                "clean": (not self._buf and not self._held and self._job is None and self._engine is not None
                          and not self.spill.pending()), "stored_batch": self._stored_batch}

    def close(self, timeout_s: float = 30.0) -> None:
        """Store everything held (the drain): into the database, or the spill file for the next start."""
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


def _serve(data: Connection, control: Connection) -> None:
    options = pickle.loads(control.recv_bytes())
    from modelserve.logs import setup_logging

    setup_logging(logging.getLevelName(options.pop("log_level", logging.INFO)))  # the server's format
    send_lock = threading.Lock()
    last: list = [None]

    def report(seen: int, stored: int) -> None:
        state = (seen, stored, writer._engine is not None, writer.db_error)
        if state != last[0]:
            last[0] = state
            with send_lock:
                data.send_bytes(pickle.dumps(("s", *state)))

    writer = Writer(**options, report=report)
    writer.start()
    control.send_bytes(pickle.dumps((0, True, {"spill": str(writer.spill.path)})))

    def reader() -> None:
        while True:
            try:
                message = recv_message(data)
            except (EOFError, OSError):
                return
            if message[0] == "e":  # the server shipped everything: close follows
                return
            try:
                writer.receive(message)
            except Exception:  # noqa: BLE001 - a batch we cannot read: say so, go on with the next
                log.exception("payload log writer: unreadable batch")

    receiving = threading.Thread(target=reader, name="payload-receive", daemon=True)
    receiving.start()
    calls = {
        "lookup": writer.quality.lookup, "given": writer.quality.given, "add": writer.quality.add,
        "quality_snapshot": writer.quality.snapshot, "drift_snapshot": writer.drift.snapshot,
        "drift_reset": writer.drift.reset, "attach": writer.drift.attach, "status": writer.status,
    }
    close_timeout = 30.0
    while True:
        try:
            call_id, name, args = pickle.loads(control.recv_bytes())
        except (EOFError, OSError):  # the server died: store what arrived, then go
            log.warning("payload log writer: the server is gone; storing what arrived, then exiting")
            break
        if name == "close":
            close_timeout = args[0]
            break
        try:
            result = calls[name](*args)
            if name == "attach":
                result = None
            answer = (call_id, True, result)
        except Exception as exc:  # noqa: BLE001 - the caller raises it
            answer = (call_id, False, exc)
        try:
            payload = pickle.dumps(answer)
        except Exception as exc:  # noqa: BLE001
            payload = pickle.dumps((call_id, False, RuntimeError(str(exc))))
        control.send_bytes(payload)
    receiving.join(close_timeout)  # everything sent before close (or before the server died)
    writer.close(close_timeout)
    try:
        control.send_bytes(pickle.dumps(("closed", True, writer.status())))
    except (OSError, ValueError):
        pass


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server drives the drain
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    data, control = Connection(int(sys.argv[1])), Connection(int(sys.argv[2]))
    try:
        _serve(data, control)
    finally:
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
