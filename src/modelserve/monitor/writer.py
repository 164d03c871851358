"""The payload log's writer process: reads, encodes, scores and stores what the server's request path
wrote into the shared-memory ring (``ring.py``).

Started by ``PayloadLog.start`` as ``python -m modelserve.monitor.writer RING_FD CONTROL_FD`` (never a
fork of the server: it imports no server module but the model config classes it unpickles). The ring holds
the records; the control connection carries request/response calls (quality, drift, status, wake, close)
from the server's threads, and this process's database state (``("state", True, (connected, error))``).

A cycle (every ``interval_s``, or sooner when a caller waits on a flush) takes what the ring holds, up to
``batch_size`` records at a time, encodes them column by column (``_encode_group``: rows as tuples with
their JSON columns as text, built without a per-record dict), marks them *seen* (predictions joinable),
stores them (database or spill file) and marks them *stored*: the server may then reuse their space.

The process runs at ``NICE`` (+10 over the server): its work is off the request path and may wait for
CPU to spare. SIGINT and SIGTERM are ignored here: the server drives the drain (``close``). When the server
dies (``kill -9``) the control connection reaches EOF: the writer stores everything the ring holds
(database or spill file) and exits.
"""

from __future__ import annotations

import gc
import logging
import os
import pickle
import signal
import sys
import threading
import time
from itertools import chain, repeat
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import orjson

from modelserve.monitor.drift import DriftTracker
from modelserve.monitor.encode import (
    encode_all,
    encode_many,
    encode_packed,
    forget_stats,
    prediction,
    predictions_packed,
    unpack,
)
from modelserve.monitor.payload_log import (
    CHUNK_ROWS,
    PAYLOAD_COLUMNS,
    _DEFAULT,
    _dumps,
    monitor_engine,
)
from modelserve.monitor.quality import QualityTracker
from modelserve.monitor.ring import RingConsumer, pack, pack_dicts
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
    """Requests' tensors joined along the batch axis (``ring.pack_dicts``), or None when their names, dtypes
    or row shapes differ."""
    kind, joined = pack_dicts(tensors)
    return {name: array for name, (array, _) in joined.items()} if kind == "c" and joined else None


def _encode_records(group: list[tuple], config) -> tuple[list[tuple], list[tuple]]:
    """Records of one model version, one by one (failures mixed in, tensors not joined, no batching) ->
    ([(inputs, outputs, prediction)] documents, drift observations)."""
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
    return list(zip(enc_in, enc_out, preds)), _observed(group, config, batching)


def _observed(group: list[tuple], config, batching: bool) -> list[tuple]:
    if config is None:
        return []
    ok = [r for r in group if r[7] == 200 and r[10]]
    joined_in = _concat([r[10] for r in ok]) if batching and len(ok) > 1 else None
    if joined_in is not None:
        return [(ok[0][3], ok[0][4], joined_in, config)]
    return [(r[3], r[4], r[10], config) for r in ok]


def _texts(docs: list) -> list[str | None]:
    return [None if d is None else _dumps(d) for d in docs]


def _clip(values, limit: int) -> list:
    """Strings (or None) cut to the column's length; the list as is when none is too long."""
    if max(map(len, filter(None, values)), default=0) <= limit:
        return values
    return [v[:limit] if v else v for v in values]


def _encode_group(group: tuple, uid_prefix: str, uids: list[int]) -> tuple[list, list, list]:
    """One model version's records of a batch, as columns (``ring.pack``, ``ring._run``) -> (row tuples in
    ``PAYLOAD_COLUMNS`` order, ``at`` as the epoch; drift observations; (request id, model, version,
    prediction text) for feedback). The common case (every request answered, tensors joined, a batching
    model) is encoded column by column: one numpy pass per tensor name, one ``prediction`` over the
    joined outputs, drift on the joined inputs, per record only the C-level work of the text template."""
    config, model, version, positions, at, rid, protocol, client, status, error, latency, p_in, p_out = group
    n = len(rid)
    mon = config.monitoring if config is not None else _DEFAULT
    batching = bool(config and config.max_batch_size)
    observed: list = []
    fast = None
    if status.count(200) == n:
        try:
            preds = predictions_packed(p_out, n, batching, mon.task)
            if preds is not None:
                fast = (encode_packed(p_in, n, mon.max_values), encode_packed(p_out, n, mon.max_values), preds)
                if config is not None and batching and p_in[0] == "c" and p_in[1]:
                    observed = [(model, version, {name: j for name, (j, _) in p_in[1].items()}, config)]
        except Exception:  # noqa: BLE001 - record by record below, where one bad tensor costs only its row
            log.debug("payload log: columnar encoding failed", exc_info=True)
            fast = None
    if fast is None:
        records = [("p", at[j], rid[j], model, version, protocol[j], client[j], status[j], error[j], latency[j], i, o,
                    config) for j, (i, o) in enumerate(zip(unpack(p_in), unpack(p_out)))]
        try:
            docs, observed = _encode_records(records, config)
        except Exception:  # noqa: BLE001 - one record we cannot encode must not cost its neighbours
            docs, observed = [_encode_one(r, config) for r in records], []
        enc_in, enc_out, pred_docs = zip(*docs) if docs else ((), (), ())
        fast = (_texts(enc_in), _texts(enc_out), _texts(pred_docs))
    enc_in, enc_out, preds = fast
    rows = _rows(group, uid_prefix, uids, enc_in, enc_out, preds)
    remembered = [(r, model, version, p) for r, p in zip(rid, preds) if p is not None]
    return rows, observed, remembered


def _rows(group: tuple, uid_prefix: str, uids: list[int], enc_in, enc_out, preds) -> list[tuple]:
    """Row tuples; a row's uid is the prefix and its record's place in the ring (``uids``: the take's, in order)."""
    _, model, version, positions, at, rid, protocol, client, status, error, latency, _, _ = group
    if positions is not None:
        uids = [uids[p] for p in positions]
    uid_texts = list(map(f"{uid_prefix.replace('%', '%%')}%x".__mod__, uids))
    return list(zip(uid_texts, _clip(rid, 200), repeat(model[:200]), repeat(version[:40] if version else None),
                    _clip(protocol, 20), status, error, (np.asarray(latency, dtype=np.float64) / 1e6).tolist(),
                    _clip(client, 200), at, enc_in, enc_out, preds))


def _unencodable(group: tuple, uid_prefix: str, uids: list[int], exc: BaseException) -> list[tuple]:
    text = _dumps({"unencodable": str(exc)})
    n = len(group[5])
    return _rows(group, uid_prefix, uids, [text] * n, [text] * n, [None] * n)


_AT = PAYLOAD_COLUMNS.index("at")
_JSON_COLUMNS = ("inputs", "outputs", "prediction")


def _sqlite_times(epochs: list[float]) -> list[str]:
    """Epoch seconds -> SQLAlchemy's SQLite DATETIME text (naive UTC, ``YYYY-MM-DD HH:MM:SS.ffffff``)."""
    micros = np.round(np.asarray(epochs, dtype=np.float64) * 1e6).astype("datetime64[us]")
    return [t.replace("T", " ") for t in np.datetime_as_string(micros, unit="us").tolist()]


def _spill_row(row: tuple) -> dict:
    """A payload row tuple as the spill file keeps it (the JSON columns as JSON, not as strings)."""
    doc = dict(zip(PAYLOAD_COLUMNS, row))
    for column in _JSON_COLUMNS:
        if doc[column] is not None:
            doc[column] = orjson.Fragment(doc[column])
    doc["_t"] = "p"
    return doc


def _row_tuple(row: dict) -> tuple:
    """A spilled payload row (a dict, JSON columns as values) -> the tuple ``_insert`` stores."""
    return tuple(_dumps(row[c]) if c in _JSON_COLUMNS and row[c] is not None else row[c] for c in PAYLOAD_COLUMNS)


class Writer:
    """Encodes records (values or summaries, predictions for feedback, drift statistics) and stores
    them: one bulk INSERT in one transaction on a single database thread, or the spill file when the
    database fails or does not answer within ``write_timeout_s``; replays the spill file when it is back."""

    def __init__(self, url: str, spill_path: Path, ring: RingConsumer, *, uid_prefix: str, interval_s: float = 0.25,
                 batch_size: int = 2000, write_timeout_s: float = 2.0, retry_s: float = 1.0,
                 max_buffer: int = 200_000, quality_window: int = 1000, quality_remember: int = 100_000,
                 repository: str | None = None, configs: dict | None = None, report=None):
        self.url = url
        self.spill = SpillFile(spill_path)
        self.quality = QualityTracker(quality_window, quality_remember)
        self.drift = DriftTracker(repository)
        self.interval_s, self.batch_size = interval_s, batch_size
        self.write_timeout_s, self.retry_s, self.max_buffer = write_timeout_s, retry_s, max_buffer
        self.uid_prefix = uid_prefix
        self.ring = ring
        #: tells the server the database's state when it changes (a no-argument callable)
        self._report = report or (lambda: None)
        self._done: tuple[int, int] | None = None  # (ring position, records) encoded and stored, or held
        self._statements: dict[int, str] = {}
        self._held: list[dict] = []
        self._engine = None
        self._db = ThreadPoolExecutor(1, thread_name_prefix="payload-db")
        self._job: Future | None = None
        self._retry_at = 0.0
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="payload-log", daemon=True)
        self.written = self.dropped = 0
        self.db_error: str | None = None
        self.configs: dict = {None: None, **(configs or {})}

    def start(self) -> None:
        self._job = self._db.submit(self._connect)
        self._thread.start()

    def _progress(self) -> None:
        """Publish what is stored (the database, or fsync'ed in the spill file): the server may reuse its space."""
        if self._done is not None and not self._held:
            self.ring.mark_stored(*self._done)
            self._done = None
        try:
            self._report()
        except Exception:  # noqa: BLE001 - the server is gone: the drain stores what is left
            pass

    # -- the writer thread -------------------------------------------------------------------

    def _run(self) -> None:
        deadline = None
        while True:
            # a cycle per interval, or sooner when a caller waits (sync, flush) or the drain starts; no polling
            # in between: on a VM, waking an idle vCPU costs the busy ones (benchmarks/README.md, payload log)
            self._wake.wait(self.interval_s)
            self._wake.clear()
            stopping = self._stopping
            try:
                self._cycle()
            except Exception:  # noqa: BLE001 - the writer must outlive any one bad batch
                log.exception("payload log writer")
            if stopping:
                deadline = deadline or time.monotonic() + 10
                if not self.ring.waiting() and (not self._held or time.monotonic() > deadline):
                    return

    def _cycle(self) -> None:
        self._reap()
        if self._held:
            rows, self._held = self._held, []
            self._store(rows)
            self._progress()
        while True:
            taken = self.ring.take(self.batch_size)
            if taken is None:
                break
            records, configs, end, count = taken
            self.configs.update(configs)
            rows = self._encode(records) if records else []
            self.ring.mark_seen(end, count)
            if rows:
                self._store(rows)
            self._done = (end, count)
            self._progress()
            if not self._stopping and self.ring.waiting() < self.batch_size:
                break  # what arrived meanwhile waits for the next cycle: one transaction per batch, not a tail of small ones
        self._reap()
        if self._job is None and time.monotonic() >= self._retry_at:
            if self._engine is None:
                self._job = self._db.submit(self._connect)
            elif self.spill.pending():
                self._job = self._db.submit(self._replay)

    def _encode(self, items: list[tuple]) -> list:
        """A take's items (``RingConsumer.take``) -> their rows in order: a tuple per payload row
        (``_encode_group``), the dict of a feedback row. Remembers the predictions (feedback) and feeds drift."""
        rows, observed, remembered = [], [], []
        single: list[tuple] = []
        for item in [*items, None]:
            if item is not None and item[0] != "r":
                single.append(item)
                continue
            if single:  # requests and feedback one record each, grouped per model version
                uids, feedback, groups = pack(single)
                rows += self._encode_groups(uids, len(single), feedback, groups, observed, remembered)
                single = []
            if item is not None:  # a run of answered requests of one layout: one group already
                rows += self._encode_groups(item[2], len(item[2]), [], [item[1]], observed, remembered)
        self.quality.remember(remembered)
        try:
            self.drift.observe(observed)
        except Exception:  # noqa: BLE001 - drift must never cost a row
            log.exception("payload log: drift statistics")
        forget_stats()
        return rows

    def _encode_groups(self, uids: list[int], count: int, feedback: list, groups: list, observed: list,
                       remembered: list) -> list:
        rows: list = [None] * count
        for pos, row in feedback:
            rows[pos] = row
        for group in groups:
            config = self.configs.get(group[0])
            group = (config, *group[1:])
            try:
                encoded, seen, preds = _encode_group(group, self.uid_prefix, uids)
            except Exception as exc:  # noqa: BLE001 - never lose the rows: keep what needs no encoding
                log.exception("payload log: cannot encode a batch of model '%s'", group[1])
                encoded, seen, preds = _unencodable(group, self.uid_prefix, uids, exc), [], []
            positions = group[3]
            if positions is None and len(encoded) == count:
                rows = encoded
            else:
                for pos, row in zip(positions if positions is not None else range(count), encoded):
                    rows[pos] = row
            observed += seen
            remembered += preds
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
            self.spill.append([_spill_row(r) if type(r) is tuple else r for r in rows])
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
            self._report()
        except Exception:  # noqa: BLE001
            pass

    def _insert(self, rows: list) -> None:
        """Rows (``_encode``'s tuples, feedback dicts, the spill file's dicts) in one transaction: payload
        rows as multi-row INSERTs through the DBAPI connection (no per-row SQLAlchemy work)."""
        payload, feedback = [], []
        for row in rows:
            if type(row) is tuple:
                payload.append(row)
            elif row.get("_t", "p") == "f":
                row = dict(row)
                del row["_t"]
                row["at"] = datetime.fromtimestamp(row["at"], UTC)
                feedback.append(row)
            else:
                payload.append(_row_tuple(row))
        from sqlalchemy.exc import DataError, IntegrityError

        try:
            with self._engine.begin() as conn:
                for start in range(0, len(payload), CHUNK_ROWS):
                    chunk = payload[start:start + CHUNK_ROWS]
                    conn.exec_driver_sql(self._rows_statement(len(chunk)), self._params(chunk))
                if feedback:
                    conn.execute(self._feedback_insert, feedback)
        except (DataError, IntegrityError):  # one row the database refuses must not block the rest forever
            for row in payload + feedback:
                try:
                    with self._engine.begin() as conn:
                        if type(row) is tuple:
                            conn.exec_driver_sql(self._rows_statement(1), self._params([row]))
                        else:
                            conn.execute(self._feedback_insert, [row])
                except (DataError, IntegrityError) as exc:
                    self.dropped += 1
                    log.error("payload log: the database refuses a row (request %s): %s",
                              row[1] if type(row) is tuple else row.get("request_id"), str(exc).splitlines()[0])
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

    def _params(self, rows: list[tuple]) -> tuple:
        """The rows' values, flat, as the driver takes them (JSON columns are text already), ``at`` as
        SQLAlchemy stores it (SQLite: naive UTC text; elsewhere an aware datetime)."""
        params = list(chain.from_iterable(rows))
        width = len(PAYLOAD_COLUMNS)
        at = params[_AT::width]
        if self._engine.dialect.name == "sqlite":
            params[_AT::width] = _sqlite_times(at)
        else:
            params[_AT::width] = [datetime.fromtimestamp(t, UTC) for t in at]
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
        waiting = self.ring.waiting()
        return {"buffered": waiting + len(self._held), "spill_bytes": self.spill.pending(),
                "spilled": self.spill.appended, "replayed": self.spill.replayed, "written": self.written,
                "dropped": self.dropped, "database_error": self.db_error,
                "clean": (not waiting and not self._held and self._job is None and self._engine is not None
                          and not self.spill.pending())}

    def wake(self) -> None:
        self._wake.set()

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


def _serve(ring_fd: int, control: Connection) -> None:
    options = pickle.loads(control.recv_bytes())
    ring = RingConsumer(ring_fd, options.pop("ring_size"), options.pop("layouts"))
    from modelserve.logs import setup_logging

    setup_logging(logging.getLevelName(options.pop("log_level", logging.INFO)))  # the server's format
    send_lock = threading.Lock()
    last: list = [None]

    def send(message) -> None:
        with send_lock:
            control.send_bytes(pickle.dumps(message))

    def report() -> None:
        state = (writer._engine is not None, writer.db_error)
        if state != last[0]:
            last[0] = state
            send(("state", True, state))

    writer = Writer(options.pop("url"), options.pop("spill_path"), ring, **options, report=report)
    writer.start()
    gc.freeze()  # what start-up made (modules, the engine) leaves the collector's sight: full collections stay cheap
    send((0, True, {"spill": str(writer.spill.path)}))
    calls = {
        "lookup": writer.quality.lookup, "given": writer.quality.given, "add": writer.quality.add,
        "quality_snapshot": writer.quality.snapshot, "drift_snapshot": writer.drift.snapshot,
        "drift_reset": writer.drift.reset, "attach": writer.drift.attach, "status": writer.status,
        "wake": writer.wake,
    }
    close_timeout = 30.0
    while True:
        try:
            call_id, name, args = pickle.loads(control.recv_bytes())
        except (EOFError, OSError):  # the server died: store what it wrote, then go
            log.warning("payload log writer: the server is gone; storing what it wrote, then exiting")
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
            send(answer)
        except (OSError, ValueError):
            break
        except Exception as exc:  # noqa: BLE001 - an answer that does not pickle
            send((call_id, False, RuntimeError(str(exc))))
    writer.close(close_timeout)
    try:
        send(("closed", True, writer.status()))
    except (OSError, ValueError):
        pass


#: the writer process's niceness, added to the server's: under CPU contention the serving path wins and
#: the writer catches up when there is CPU to spare (its backlog is bounded by ``max_buffer`` and the spill file)
NICE = 10


def main() -> None:
    try:
        os.nice(NICE)
    except OSError:  # not permitted here: run at the server's priority
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server drives the drain
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        _serve(int(sys.argv[1]), Connection(int(sys.argv[2])))
    except BaseException:  # os._exit below would hide it
        log.exception("payload log writer failed")
        raise
    finally:
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
