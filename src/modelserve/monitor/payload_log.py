"""The payload log: every request and its answer (or error) to a database, never on the request path.

The request path calls ``done`` / ``failed`` / ``rejected``: a sampling decision and one
``deque.append`` of a tuple holding references to the request's arrays (they are not mutated after
the answer). No I/O, no lock, no await.

The process split. Encoding and storing run in a separate *writer process* (``writer.py``, started with
``python -m modelserve.monitor.writer``: a fresh interpreter, never a fork of the threaded server), because
their Python work held the GIL the event loop needs (every syscall of the loop then waited for it: the log
cost 36-54 % of a tiny model's throughput in-process). Here a *shipper* thread wakes every ``interval_s``
(sooner once ``batch_size`` records wait), gives each record a unique ``uid`` (a per-process prefix and a
counter), packs the records (per model version one tuple of columns, the arrays of the same names, dtypes
and row shapes joined into one, each config object pickled once and then named by a small key; a batch of
one model version, the common case, is found and packed with C-level maps, no per-record Python loop) and
sends them as one pickled message over a socketpair (the joined arrays out of band, not copied into the
pickle): about 3-4 µs per record of this process's time, request path, shipper and acks together (holding
the records until they are shipped costs the event loop more than that: garbage collection, allocator,
cache; measured 10-20 µs per request at 8-32 concurrent requests on 2 cores). The
writer process runs at a lower priority (``nice`` +10, ``writer.NICE``): under CPU contention the serving
path wins and the writer catches up when there is CPU to spare. It encodes each shipped batch column by
column (``encode.encode_packed``: one numpy pass per tensor name for the values or summaries, one
``prediction`` over the joined outputs, drift statistics on the joined inputs; per record only C-level
work) and stores the rows: multi-row INSERTs through the DBAPI connection in one transaction, run on a
single database thread so that rows reach the database in order. ``quality`` and ``drift`` here are proxies: their
calls (from threads, never the event loop) run in the writer process over a second connection, so
``quality.add`` stays atomic (409 on double feedback). The shipper keeps every batch until the writer
acknowledges that its rows are in the database or fsync'ed in the spill file; when the writer process dies,
the shipper logs it, starts a new one and sends it the unacknowledged batches again (their rows keep their
``uid``: a row stored twice is skipped). Predictions waiting for feedback and drift windows of a dead
writer are lost (feedback then joins through the database; the quality windows are refilled from it).

When the database fails, or does not answer within ``write_timeout_s``, the batch is appended to
the spill file (``spill.py``, fsync'ed) instead, and every later batch follows it there until the
database thread has replayed the file; so memory stays bounded by what arrives in one cycle, whatever
the database does, and order is kept. Rows carry a unique ``uid`` and inserts skip existing ones:
a batch that timed out but committed late, or a replay cut short by a crash, is never stored twice.

Guarantee: a record is in the database, or on disk in the spill file, within one cycle of its
request's answer (``interval_s`` + ``write_timeout_s``, plus the hop to the writer process) when there is
CPU to spare; while the serving path keeps every core busy the niced writer falls behind (the records wait,
shipped and unacknowledged, and the shipper warns past ``max_buffer``) and catches up when the load drops. SIGTERM
drains: ``close()`` ships everything it holds, the writer stores it and exits. ``kill -9`` of the server
loses at most the records not yet shipped (that last cycle): the writer process sees its connections
close, stores what it received (database or spill file) and exits; the spill file survives and is
replayed at the next start. The writer process dying alone loses nothing that was shipped (see above).
The only other losses, counted in ``dropped`` and logged: the database down *and* the spill file
unwritable (disk full) for longer than ``max_buffer`` records; and the writer process ``max_buffer``
records behind (starved of CPU for long, or failing to start), where this process stops shipping and,
``max_buffer`` records later, drops new records rather than grow without bound.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import pickle
import random
import subprocess
import sys
import threading
import time
import uuid
from collections import OrderedDict, deque
from itertools import chain
from operator import attrgetter
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

import numpy as np
import orjson

from modelserve.errors import ModelNotReady, ModelServeError
from modelserve.monitor.drift import DriftTracker
from modelserve.monitor.quality import QualityTracker
from modelserve.server.config import Monitoring
from modelserve.server.stats import status_of

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


def _failure(exc: BaseException) -> tuple[int, str]:
    """A failed request's status (as the metrics count it) and the error text its row keeps."""
    status = status_of(exc)
    if isinstance(exc, ModelServeError):
        return status, exc.message[:2000]
    if status == 499:
        return status, "cancelled: the client went away or the server is stopping"
    return status, f"internal error: {exc}"[:2000]


def _pack_dicts(tensors: list) -> tuple:
    """One tensor dict (or None) per record -> ``("c", {name: (joined, rows per record)})`` when every record
    has the same names in the same order and, per name, one dtype and row shape (one array per name to
    pickle, not one per record); else ``("l", tensors)``."""
    first = tensors[0]
    if first:
        try:
            names = tuple(first)
            if all(t is not None and tuple(t) == names for t in tensors):
                out = {}
                for name in names:
                    arrays = [t[name] for t in tensors]
                    if len(set(map(_dtype_of, arrays))) != 1:
                        return "l", tensors
                    out[name] = (np.concatenate(arrays), list(map(len, arrays)))
                return "c", out
        except (ValueError, TypeError, AttributeError):  # 0-d arrays, other row shapes, not arrays
            pass
    return "l", tensors


def _pack_flat(cols: list, start: int, count: int, n: int) -> tuple:
    """``_pack_dicts`` of the records' tensors held flat in columns ``start`` ... (name, array, name, array, ...;
    ``count`` tensors, -1: None): the checks and the gathering are C-level, no per-record loop."""
    if count < 0:
        return "l", [None] * n
    if not count:
        return "l", [{} for _ in range(n)]
    names, arrays = cols[start:start + 2 * count:2], cols[start + 1:start + 2 * count:2]
    out = {}
    try:
        for name_col, array_col in zip(names, arrays):
            if name_col.count(name_col[0]) != n or len(set(map(_dtype_of, array_col))) != 1:
                break
            out[name_col[0]] = (np.concatenate(array_col), list(map(len, array_col)))
        else:
            return "c", out
    except (ValueError, TypeError, AttributeError):  # 0-d arrays, other row shapes, not arrays
        pass
    return "l", [dict(zip(ns, arrs)) for ns, arrs in zip(zip(*names), zip(*arrays))]


def _tensors(record: tuple, start: int, count: int) -> dict | None:
    return None if count < 0 else dict(zip(record[start:start + 2 * count:2], record[start + 1:start + 2 * count:2]))


def _columns(records: list[tuple]) -> tuple:
    """Requests of one model version -> (at, request_id, protocol, client, status, error, latency_ns, inputs,
    outputs) columns, the tensors packed (``_pack_flat``, or ``_pack_dicts`` when the records differ in shape)."""
    n = len(records)
    if len(set(map(len, records))) == 1:
        cols = list(zip(*records))
        if cols[11].count(cols[11][0]) == n and cols[12].count(cols[12][0]) == n:
            n_in = cols[11][0]
            return (cols[1], cols[2], cols[5], cols[6], cols[7], cols[8], cols[9], _pack_flat(cols, 13, n_in, n),
                    _pack_flat(cols, 13 + 2 * max(n_in, 0), cols[12][0], n))
    cols = list(zip(*(r[:13] for r in records)))
    inputs = [_tensors(r, 13, r[11]) for r in records]
    outputs = [_tensors(r, 13 + 2 * max(r[11], 0), r[12]) for r in records]
    return (cols[1], cols[2], cols[5], cols[6], cols[7], cols[8], cols[9], _pack_dicts(inputs), _pack_dicts(outputs))


_dtype_of = attrgetter("dtype")
_flat = chain.from_iterable


def _frames(message) -> list:
    """A message as frames to send: its pickle, then the buffers of its contiguous arrays (out of band: not
    copied into the pickle; the socket write copies them with the GIL released)."""
    buffers: list = []
    head = pickle.dumps(message, protocol=5, buffer_callback=buffers.append)
    return [len(buffers).to_bytes(4, "little") + head, *(b.raw() for b in buffers)]


def send_frames(conn, frames: list) -> None:
    """Each frame with multiprocessing's framing (the writer process reads them: ``writer._Frames``)."""
    for frame in frames:
        conn.send_bytes(frame)


class _SpillInfo:
    """Where the writer process spills (``path``: the file it locked, known once it has started)."""

    def __init__(self, path: Path):
        self.path = Path(path)


class _Child:
    """One writer process and its two connections."""

    def __init__(self, proc: subprocess.Popen, data, control):
        self.proc, self.data, self.control = proc, data, control
        self.pending: dict = {}
        self.send_lock = threading.Lock()
        self.dead = False
        self.reader: threading.Thread | None = None

    def alive(self) -> bool:
        return not self.dead and self.proc.poll() is None


class _QualityProxy:
    """``QualityTracker``'s readers and ``add``, answered by the writer process (blocking: call from a thread)."""

    def __init__(self, owner: PayloadLog, window: int):
        self._owner, self.window = owner, window

    def lookup(self, request_id: str):
        return self._owner._call("lookup", request_id)

    def given(self, request_id: str) -> bool:
        return self._owner._call("given", request_id)

    def add(self, request_id: str, model: str, version: str | None, prediction: dict, truth) -> dict:
        return self._owner._call("add", request_id, model, version, prediction, truth)

    def snapshot(self, model: str | None = None) -> dict:
        return self._owner._call("quality_snapshot", model)


class _DriftProxy:
    """``DriftTracker``'s readers, answered by the writer process (blocking: call from a thread)."""

    def __init__(self, owner: PayloadLog, repository: Path | None):
        self._owner, self.repository = owner, repository

    def attach(self, repository: Path) -> _DriftProxy:
        self.repository = Path(repository)
        try:
            self._owner._call("attach", str(self.repository))
        except ModelNotReady:  # not started (or restarting): the next writer gets it with its options
            pass
        return self

    def snapshot(self, model: str | None = None) -> dict:
        return self._owner._call("drift_snapshot", model)

    def reset(self, model: str, version: str | None = None) -> list[str]:
        return self._owner._call("drift_reset", model, version)


class PayloadLog:
    def __init__(self, url: str, spill_path: Path, *, interval_s: float = 0.25, batch_size: int = 2000,
                 write_timeout_s: float = 2.0, retry_s: float = 1.0, max_buffer: int = 200_000,
                 quality: QualityTracker | None = None, drift: DriftTracker | None = None):
        self.url = url
        self.spill = _SpillInfo(spill_path)
        quality = quality or QualityTracker()
        self._quality_options = {"quality_window": quality.window, "quality_remember": quality.capacity}
        self.quality = _QualityProxy(self, quality.window)
        #: input drift, computed in the writer process from the logged successful requests (see drift.py)
        self.drift = _DriftProxy(self, drift.repository if drift is not None else None)
        self.interval_s, self.batch_size = interval_s, batch_size
        self.write_timeout_s, self.retry_s, self.max_buffer = write_timeout_s, retry_s, max_buffer
        self._buf: deque = deque()
        #: row keys: a random per-process prefix and a counter (unique across processes and restarts)
        self._uid_prefix, self._uid = uuid.uuid4().hex[:16], 0
        self._seq_in = 0
        self._shipped = self._seen_records = self._done_records = 0
        self._batch = 0
        self._unacked: OrderedDict[int, tuple[int, int, list]] = OrderedDict()  # batch -> (end, records, frames)
        self._unseen: deque = deque()  # (batch, end) shipped, not yet encoded
        self._lock = threading.Lock()
        #: configs by key (key = place + 1), each kept (so ids stay unique); id(config) -> key; keys shipped so far
        self._config_list: list = []
        self._config_ids: dict[int, int] = {}
        self._configs_sent = 0
        self._config_lock = threading.Lock()
        self._call_ids = itertools.count(1)
        self._child: _Child | None = None
        self._restart_at = 0.0
        self.restarts = 0
        self._connected = False
        self._first_state = threading.Event()
        self._engine = None
        self._engine_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="payload-log", daemon=True)
        self.dropped = 0
        self.db_error: str | None = None

    def start(self, connect_timeout_s: float = 10.0) -> None:
        """Start the writer process and the shipper; wait (at most ``connect_timeout_s``) for the writer's
        first connection attempt (connect, migrate), so that the API can read the database from the start."""
        self._spawn()
        self._thread.start()
        self._first_state.wait(connect_timeout_s)

    # -- the request path: append only -------------------------------------------------------

    # A request's record is one flat tuple: ("p", at, request_id, model, version, protocol, client, status,
    # error, latency_ns, config key, number of inputs, of outputs (-1: None), then name, array, name, array ...
    # of the inputs and of the outputs). It holds no dict, no nested tuple and no config object, so the
    # garbage collector untracks it at its first young collection instead of promoting it to the old
    # generation. (Holding ~0.25 s of requests still costs the event loop more than the append itself: the
    # arrays keep the request bodies and their memoryviews alive; see benchmarks/README.md.)

    def done(self, request, response, config, latency_ns: int) -> None:
        mon = config.monitoring if config is not None else _DEFAULT
        if not mon.payload_log or (mon.sample_rate < 1.0 and random.random() >= mon.sample_rate):
            return
        inputs, outputs = request.inputs, response.outputs
        self._append(("p", time.time(), request.request_id, request.model, response.version, request.protocol,
                      request.client, 200, None, latency_ns, self._config_ids.get(id(config)) or self._register(config),
                      len(inputs), len(outputs), *_flat(inputs.items()), *_flat(outputs.items())))

    def failed(self, request, version: str | None, config, exc: BaseException, latency_ns: int) -> None:
        if config is not None and not config.monitoring.payload_log:
            return
        status, error = _failure(exc)
        inputs = request.inputs or {}
        key = self._config_ids.get(id(config)) or self._register(config)
        self._append(("p", time.time(), request.request_id, request.model, version, request.protocol,
                      request.client, status, error, latency_ns, key, len(inputs) or -1, -1, *_flat(inputs.items())))

    def rejected(self, model: str, version: str | None, protocol: str, client: str | None, request_id: str,
                 exc: BaseException, latency_ns: int = 0) -> None:
        """A request refused before it became an ``InferRequest`` (bad body, unknown model)."""
        status, error = _failure(exc)
        self._append(("p", time.time(), request_id, model, version, protocol, client, status, error, latency_ns,
                      None, -1, -1))

    def _register(self, config) -> int | None:
        """A config's key (once per config object; the object is kept, so its id stays its own)."""
        if config is None:
            return None
        with self._config_lock:
            key = self._config_ids.get(id(config))
            if key is None:
                self._config_list.append(config)
                key = self._config_ids[id(config)] = len(self._config_list)
        return key

    def feedback(self, row: dict) -> None:
        # a client's explicit ground truth, answered 200 already: never dropped (and rare next to requests)
        self._append(("f", {**row, "_t": "f", "at": time.time()}), bounded=False)

    def _append(self, record: tuple, bounded: bool = True) -> None:
        if bounded and len(self._buf) >= self.max_buffer:  # the writer that far behind: memory stays bounded
            self._drop()
            return
        self._buf.append(record)
        self._seq_in += 1
        if len(self._buf) >= self.batch_size and not self._wake.is_set():
            self._wake.set()

    # -- the writer process ------------------------------------------------------------------

    def _spawn(self) -> None:
        from multiprocessing import Pipe

        data, data_child = Pipe()
        control, control_child = Pipe()
        fds = (data_child.fileno(), control_child.fileno())
        package_root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
        try:
            proc = subprocess.Popen([sys.executable, "-m", "modelserve.monitor.writer", *map(str, fds)],
                                    pass_fds=fds, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env)
        finally:
            data_child.close()
            control_child.close()
        child = _Child(proc, data, control)
        hello: Future = Future()
        child.pending[0] = hello
        control.send_bytes(pickle.dumps({
            "url": self.url, "spill_path": str(self.spill.path), "uid_prefix": self._uid_prefix,
            "interval_s": self.interval_s, "batch_size": self.batch_size, "write_timeout_s": self.write_timeout_s,
            "retry_s": self.retry_s, "max_buffer": self.max_buffer, **self._quality_options,
            "repository": str(self.drift.repository) if self.drift.repository is not None else None,
            "log_level": logging.getLogger().getEffectiveLevel()}))
        child.reader = threading.Thread(target=self._read, args=(child,), name="payload-log-acks", daemon=True)
        child.reader.start()
        self._child = child
        try:
            self.spill.path = Path(hello.result(60)["spill"])
        except Exception as exc:  # noqa: BLE001 - it did not start: the shipper tries again
            log.error("payload log: the writer process did not start (%s)", exc)
            child.dead = True

    def _read(self, child: _Child) -> None:
        """The writer's answers: progress on the data connection, call results on the control one."""
        from multiprocessing.connection import wait

        conns = [child.data, child.control]
        while conns:
            for conn in wait(conns):
                try:
                    data = conn.recv_bytes()
                except (EOFError, OSError):
                    conns.remove(conn)
                    continue
                try:
                    message = pickle.loads(data)
                    if conn is child.data:
                        self._progress(*message[1:])
                    else:
                        call_id, ok, value = message
                        future = child.pending.pop(call_id, None)
                        if future is not None and not future.done():
                            future.set_result(value) if ok else future.set_exception(value)
                except Exception:  # noqa: BLE001 - an answer we cannot read must not stop the acks
                    log.exception("payload log: unreadable message from the writer process")
        child.dead = True
        for call_id in list(child.pending):
            future = child.pending.pop(call_id, None)
            if future is not None and not future.done():
                future.set_exception(ModelNotReady("the payload log's writer process stopped"))
        self._wake.set()

    def _progress(self, seen: int, stored: int, connected: bool, db_error: str | None) -> None:
        with self._lock:
            while self._unseen and self._unseen[0][0] <= seen:
                self._seen_records = max(self._seen_records, self._unseen.popleft()[1])
            while self._unacked and next(iter(self._unacked)) <= stored:
                end = self._unacked.popitem(last=False)[1][0]
                self._done_records = max(self._done_records, end)
        self._connected, self.db_error = connected, db_error
        if connected or db_error:
            self._first_state.set()

    def _call(self, name: str, *args, timeout_s: float = 30.0):
        """Run ``name`` in the writer process; its exception (Conflict, InvalidInput, ...) is raised here."""
        child = self._child
        if child is None or not child.alive():
            raise ModelNotReady("the payload log's writer process is not running (restarting)")
        call_id = next(self._call_ids)
        future: Future = Future()
        child.pending[call_id] = future
        try:
            with child.send_lock:
                child.control.send_bytes(pickle.dumps((call_id, name, args)))
            if child.dead:
                raise OSError("stopped")
            return future.result(timeout_s)
        except (OSError, FutureTimeout):
            raise ModelNotReady("the payload log's writer process did not answer") from None
        finally:
            child.pending.pop(call_id, None)

    # -- the shipper thread ------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            self._wake.wait(self.interval_s)
            self._wake.clear()
            stopping = self._stopping
            try:
                self._cycle()
            except Exception:  # noqa: BLE001 - the shipper must outlive any one bad batch
                log.exception("payload log shipper")
            if stopping and not self._buf:
                return

    def _cycle(self) -> None:
        child = self._child
        if child is None or not child.alive():
            if time.monotonic() < self._restart_at:
                return  # the records wait in the buffer
            self._restart()
        # at most max_buffer records shipped and not yet stored: the rest wait here (and past max_buffer more,
        # new ones are dropped, counted), so a writer starved of CPU cannot make this process grow without end
        while self._buf and self._shipped - self._done_records < self.max_buffer:
            self._ship([self._buf.popleft() for _ in range(min(len(self._buf), self.batch_size))])
        if self._dropping and len(self._buf) < self.max_buffer // 2:
            self._dropping = False
            log.warning("payload log: the writer process caught up; %d records dropped so far", self.dropped)

    def _drop(self) -> None:
        self.dropped += 1
        if not self._dropping:
            self._dropping = True
            log.error("payload log: %d records wait for the writer process (CPU-starved, or restarting): new "
                      "records are dropped, and counted, until it catches up", len(self._buf))

    def _restart(self) -> None:
        """A new writer process; the batches the dead one had not stored are sent to it again (their rows
        keep their uid: a row the dead one stored is skipped, never doubled)."""
        self._restart_at = time.monotonic() + 1.0
        old = self._child
        code = old.proc.poll() if old is not None else None
        with self._lock:
            pending = list(self._unacked.values())
        log.error("payload log: the writer process stopped (exit code %s); starting a new one and sending it "
                  "the %d records it had not stored", code, sum(n for _, n, _ in pending))
        if old is not None:
            if old.reader is not None:
                old.reader.join(5)
            for conn in (old.data, old.control):
                conn.close()
        self.restarts += 1
        self._spawn()
        child = self._child
        if not child.alive():
            return
        try:
            send_frames(child.data, _frames(("c", dict(enumerate(self._config_list, 1)))))
            for _, _, frames in pending:
                send_frames(child.data, frames)
        except OSError:
            pass

    def _pack(self, records: list[tuple]) -> tuple[list, dict, list]:
        """Records -> (feedback rows with their place, new configs, groups): per model version one tuple of
        columns (positions None: the group is every record, the common case, found without a per-record
        loop), arrays joined (``_pack_flat``), configs as small keys (each object pickled once)."""
        known = len(self._config_list)  # configs registered so far (the request path appends)
        new = {key: self._config_list[key - 1] for key in range(self._configs_sent + 1, known + 1)}
        self._configs_sent = known
        n = len(records)
        first = records[0]
        if len(first) >= 13 and len(set(map(len, records))) == 1:  # requests only (a feedback record is shorter)
            cols = list(zip(*records))
            if all(cols[i].count(first[i]) == n for i in (10, 3, 4, 11, 12)):  # one version, one tensor count
                n_in = first[11]
                return [], new, [(first[10], first[3], first[4], None, cols[1], cols[2], cols[5], cols[6], cols[7],
                                  cols[8], cols[9], _pack_flat(cols, 13, n_in, n),
                                  _pack_flat(cols, 13 + 2 * max(n_in, 0), first[12], n))]
        feedback, groups = [], {}
        for i, record in enumerate(records):
            if record[0] == "p":
                key = (record[10], record[3], record[4])
                group = groups.get(key)
                if group is None:
                    group = groups[key] = []
                group.append(i)
            else:
                feedback.append((i, record[1]))
        packed = [(key, model, version, idx, *_columns([records[i] for i in idx]))
                  for (key, model, version), idx in groups.items()]
        return feedback, new, packed

    def _ship(self, records: list[tuple]) -> None:
        feedback, configs, groups = self._pack(records)
        self._batch += 1
        data = _frames(("b", self._batch, self._uid, len(records), configs, feedback, groups))
        self._uid += len(records)
        self._shipped += len(records)
        with self._lock:
            self._unacked[self._batch] = (self._shipped, len(records), data)
            self._unseen.append((self._batch, self._shipped))
            waiting = self._shipped - self._done_records
        if waiting > self.max_buffer and not self._warned_backlog:
            self._warned_backlog = True
            log.warning("payload log: %d records shipped and not yet stored by the writer process", waiting)
        try:
            send_frames(self._child.data, data)
        except OSError:  # it died: the batch goes to its successor
            pass

    _warned_backlog = False
    _dropping = False

    # -- waiting, reading, closing (never called on the request path) ----------------------

    @property
    def engine(self):
        """An engine on the monitor database (for the API's reads), once the writer has connected and migrated."""
        if self._engine is None:
            if not self._connected:
                raise ModelNotReady(f"the monitor database is not available ({self.db_error or 'connecting'})")
            with self._engine_lock:
                if self._engine is None:
                    self._engine = monitor_engine(self.url)
        return self._engine

    async def sync(self, timeout_s: float = 5.0) -> None:
        """Wait until the records appended so far are encoded (their predictions joinable)."""
        target = self._seq_in
        deadline = time.monotonic() + timeout_s
        while self._seen_records < target and time.monotonic() < deadline:
            self._wake.set()
            await asyncio.sleep(0.005)

    async def flush(self, timeout_s: float = 10.0) -> dict:
        """Wait until the records appended so far are in the database (or ``timeout_s`` passes)."""
        target = self._seq_in
        deadline = time.monotonic() + timeout_s
        done = False
        while True:
            self._wake.set()
            if self._done_records >= target:
                try:
                    done = (await asyncio.to_thread(self._call, "status", timeout_s=5.0))["clean"]
                except ModelNotReady:
                    done = False
            if done or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.01)
        return {"flushed": done, **await asyncio.to_thread(self.status)}

    def status(self) -> dict:
        """The counters (a call into the writer process: call from a thread)."""
        try:
            child = self._call("status", timeout_s=5.0)
        except ModelNotReady as exc:
            child = {"buffered": 0, "spill_bytes": None, "spilled": None, "replayed": None, "written": None,
                     "dropped": 0, "database_error": str(exc)}
        with self._lock:
            unstored = self._shipped - self._done_records
        return {"buffered": len(self._buf) + max(unstored, child["buffered"]), "spill_bytes": child["spill_bytes"],
                "spilled": child["spilled"], "replayed": child["replayed"], "written": child["written"],
                "dropped": child["dropped"] + self.dropped, "database_error": child["database_error"],
                "writer_restarts": self.restarts}

    def close(self, timeout_s: float = 30.0) -> None:
        """Store everything held (SIGTERM drain): ship what is buffered, let the writer process store it
        (the database, or the spill file for the next start), wait for it to exit."""
        deadline = time.monotonic() + timeout_s
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout_s)
        child = self._child
        if child is None or not child.alive():
            try:
                self._restart()
            except Exception:  # noqa: BLE001
                log.exception("payload log: cannot restart the writer process to drain")
            child = self._child
        closed: Future = Future()
        if child is not None:
            child.pending["closed"] = closed
            try:
                send_frames(child.data, _frames(("e",)))
                with child.send_lock:
                    child.control.send_bytes(pickle.dumps((-1, "close", (max(1.0, deadline - time.monotonic()),))))
                closed.result(max(1.0, deadline - time.monotonic()) + 5)
            except Exception as exc:  # noqa: BLE001
                log.warning("payload log: the writer process did not drain (%s)", exc)
            try:
                child.proc.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("payload log: the writer process did not exit; killing it")
                child.proc.kill()
                child.proc.wait()
            if child.reader is not None:
                child.reader.join(5)
            for conn in (child.data, child.control):
                conn.close()
        with self._lock:
            lost = self._shipped - self._done_records
        if lost > 0:
            log.error("payload log: %d records were not stored at close", lost)
        if self._engine is not None:
            self._engine.dispose()

