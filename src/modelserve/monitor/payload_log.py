"""The payload log: every request and its answer (or error) to a database, never on the request path.

The request path calls ``done`` / ``failed`` / ``rejected``: a sampling decision and the record into a
shared-memory ring (``ring.py``: the request's metadata and its tensors' bytes, about 2 µs, no syscall, no
await; answered requests of one layout wait in blocks of ``ring.FLUSH_RECORDS``, which numpy copies in column
by column; the watchdog thread writes a block that waits longer than ``interval_s``). Nothing of a request is
held after its block is written.

The process split. Encoding and storing run in a separate *writer process* (``writer.py``, started with
``python -m modelserve.monitor.writer``: a fresh interpreter, never a fork of the threaded server), because
their Python work held the GIL the event loop needs (the log cost 36-54 % of a tiny model's throughput
in-process). It maps the same ring and reads the records straight from it: a run of answered requests of one
layout (same tensor names, dtypes and shapes) is one numpy array, whose columns are the batch's columns and
whose tensors are already joined. It runs at a lower priority (``nice`` +10, ``writer.NICE``), encodes each
batch column by column (``encode.encode_packed``) and stores the rows: multi-row INSERTs in one transaction on
a single database thread, so that rows reach the database in order. ``quality`` and ``drift`` here are
proxies: their calls (from threads, never the event loop) run in the writer process over a control
connection, so ``quality.add`` stays atomic (409 on double feedback).

The ring only reuses space behind what the writer has *stored* (database, or fsync'ed spill file), so:
when the writer process dies, a watchdog thread here starts a new one, which reads on from the last stored
record (a row stored twice is skipped by its ``uid``: the server's prefix and the record's ring position);
when this process dies (``kill -9``), the writer sees its control connection close, stores everything the
ring holds and exits: what is lost is at most the block of answered requests not yet copied into the ring
(``ring.FLUSH_RECORDS`` per model version, or a watchdog cycle's worth when traffic is light). Predictions waiting for feedback and drift windows
of a dead writer are lost (feedback then joins through the database; the quality windows are refilled from it).

When the database fails, or does not answer within ``write_timeout_s``, the batch is appended to the spill
file (``spill.py``, fsync'ed) instead, and every later batch follows it there until the database thread has
replayed the file; rows carry a unique ``uid`` and inserts skip existing ones, so a batch that timed out but
committed late, or a replay cut short by a crash, is never stored twice.

Guarantee: a record is in the database, or on disk in the spill file, within one cycle of its request's
answer (``interval_s`` + ``write_timeout_s``) when there is CPU to spare; while the serving path keeps every
core busy the niced writer falls behind and catches up when the load drops. Memory is bounded: the ring's
size (``--monitor-buffer-mb``; only the pages a backlog needs are touched) and ``max_buffer`` records
waiting. Past either, new records are dropped and counted (``dropped``, logged): the writer that far behind
(starved of CPU for long, or failing to start). Feedback rows are never dropped (a reserve of the ring, then
a queue here). SIGTERM drains: ``close()`` lets the writer store everything the ring holds, then it exits.
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
from collections import deque
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

import orjson

from modelserve.errors import ModelNotReady, ModelServeError
from modelserve.monitor.drift import DriftTracker
from modelserve.monitor.quality import QualityTracker
from modelserve.monitor.ring import CONFIG, FEEDBACK, RingProducer
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


class _SpillInfo:
    """Where the writer process spills (``path``: the file it locked, known once it has started)."""

    def __init__(self, path: Path):
        self.path = Path(path)


class _Child:
    """One writer process and its control connection."""

    def __init__(self, proc: subprocess.Popen, control):
        self.proc, self.control = proc, control
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
                 buffer_bytes: int = 256 << 20, quality: QualityTracker | None = None,
                 drift: DriftTracker | None = None):
        self.url = url
        self.spill = _SpillInfo(spill_path)
        quality = quality or QualityTracker()
        self._quality_options = {"quality_window": quality.window, "quality_remember": quality.capacity}
        self.quality = _QualityProxy(self, quality.window)
        #: input drift, computed in the writer process from the logged successful requests (see drift.py)
        self.drift = _DriftProxy(self, drift.repository if drift is not None else None)
        self.interval_s, self.batch_size = interval_s, batch_size
        self.write_timeout_s, self.retry_s, self.max_buffer = write_timeout_s, retry_s, max_buffer
        self.ring = RingProducer(buffer_bytes, max_buffer, str(Path(spill_path).parent))
        #: row keys: a random per-process prefix and the record's place in the ring (unique across restarts)
        self._uid_prefix = uuid.uuid4().hex[:16]
        #: configs by key (key = place + 1), each kept (so ids stay unique); id(config) -> key once in the ring
        self._config_list: list = []
        self._config_keys: dict[int, int] = {}
        self._config_ids: dict[int, int] = {}
        self._config_lock = threading.Lock()
        self._feedback: deque = deque()  # feedback rows the full ring could not take yet (never dropped)
        self._call_ids = itertools.count(1)
        self._child: _Child | None = None
        self._restart_at = 0.0
        self.restarts = 0
        self._first_state = threading.Event()
        self._connected = False  # the writer's database state, as it last reported it
        self._engine = None
        self._engine_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._watch, name="payload-log", daemon=True)
        self.dropped = 0
        self._dropping = False
        self.db_error: str | None = None

    def start(self, connect_timeout_s: float = 10.0) -> None:
        """Start the writer process and its watchdog; wait (at most ``connect_timeout_s``) for the writer's
        first connection attempt (connect, migrate), so that the API can read the database from the start."""
        self._spawn()
        self._thread.start()
        self._first_state.wait(connect_timeout_s)

    # -- the request path: one record into the ring ------------------------------------------

    def done(self, request, response, config, latency_ns: int) -> None:
        mon = config.monitoring if config is not None else _DEFAULT
        if not mon.payload_log or (mon.sample_rate < 1.0 and random.random() >= mon.sample_rate):
            return
        self._drop(self.ring.answered(time.time(), request.request_id, request.client, latency_ns,
                                      self._config_ids.get(id(config)) or self._register(config), request.model,
                                      response.version, request.protocol, request.inputs, response.outputs))

    def failed(self, request, version: str | None, config, exc: BaseException, latency_ns: int) -> None:
        if config is not None and not config.monitoring.payload_log:
            return
        status, error = _failure(exc)
        self._drop(self.ring.request(time.time(), request.request_id, request.model, version, request.protocol,
                                     request.client, status, error, latency_ns,
                                     self._config_ids.get(id(config)) or self._register(config),
                                     request.inputs or None, None))

    def rejected(self, model: str, version: str | None, protocol: str, client: str | None, request_id: str,
                 exc: BaseException, latency_ns: int = 0) -> None:
        """A request refused before it became an ``InferRequest`` (bad body, unknown model)."""
        status, error = _failure(exc)
        self._drop(self.ring.request(time.time(), request_id, model, version, protocol, client, status, error,
                                     latency_ns, None, None, None))

    def _register(self, config) -> int | None:
        """A config's key: given once per config object (the object is kept, so its id stays its own), and
        written into the ring before the first record naming it (again on the next record if the ring was full)."""
        if config is None:
            return None
        with self._config_lock:
            key = self._config_keys.get(id(config))
            if key is None:
                self._config_list.append(config)
                key = self._config_keys[id(config)] = len(self._config_list)
            if id(config) not in self._config_ids and self.ring.blob(CONFIG, (key, config)):
                self._config_ids[id(config)] = key
        return key

    def feedback(self, row: dict) -> None:
        """A client's explicit ground truth, answered 200 already: never dropped (it waits here when the
        ring is full, and goes in as soon as there is room)."""
        row = {**row, "_t": "f", "at": time.time()}
        if self._feedback or not self.ring.blob(FEEDBACK, row):
            self._feedback.append(row)
            self._wake.set()

    def _drop(self, records: int) -> None:
        """Count records the full ring refused (the ring's calls return how many: mostly 0)."""
        if not records:
            return
        self.dropped += records
        if not self._dropping:
            self._dropping = True
            log.error("payload log: the buffer is full (%d records wait for the writer process: CPU-starved, "
                      "or restarting): new records are dropped, and counted, until it catches up",
                      self.ring.written()[1] - self.ring.stored()[1])

    # -- the writer process ------------------------------------------------------------------

    def _spawn(self) -> None:
        from multiprocessing import Pipe

        control, control_child = Pipe()
        fds = (self.ring.fd, control_child.fileno())
        package_root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
        try:
            proc = subprocess.Popen([sys.executable, "-m", "modelserve.monitor.writer", *map(str, fds)],
                                    pass_fds=fds, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env)
        finally:
            control_child.close()
        child = _Child(proc, control)
        hello: Future = Future()
        child.pending[0] = hello
        with self._config_lock:
            configs = dict(enumerate(self._config_list, 1))
        control.send_bytes(pickle.dumps({
            "url": self.url, "spill_path": str(self.spill.path), "uid_prefix": self._uid_prefix,
            "ring_size": self.ring.size, "configs": configs, "layouts": self.ring.layouts_now(),
            "interval_s": self.interval_s, "batch_size": self.batch_size, "write_timeout_s": self.write_timeout_s,
            "retry_s": self.retry_s, "max_buffer": self.max_buffer, **self._quality_options,
            "repository": str(self.drift.repository) if self.drift.repository is not None else None,
            "log_level": logging.getLogger().getEffectiveLevel()}))
        child.reader = threading.Thread(target=self._read, args=(child,), name="payload-log-calls", daemon=True)
        child.reader.start()
        self._child = child
        try:
            self.spill.path = Path(hello.result(60)["spill"])
        except Exception as exc:  # noqa: BLE001 - it did not start: the watchdog tries again
            log.error("payload log: the writer process did not start (%s)", exc)
            child.dead = True

    def _read(self, child: _Child) -> None:
        """The writer's answers to calls, and its database state; at EOF the writer has stopped."""
        while True:
            try:
                message = pickle.loads(child.control.recv_bytes())
            except (EOFError, OSError):
                break
            except Exception:  # noqa: BLE001 - an answer we cannot read must not stop the others
                log.exception("payload log: unreadable message from the writer process")
                continue
            call_id, ok, value = message
            if call_id == "state":
                self._connected_state(*value)
                continue
            future = child.pending.pop(call_id, None)
            if future is not None and not future.done():
                future.set_result(value) if ok else future.set_exception(value)
        child.dead = True
        for call_id in list(child.pending):
            future = child.pending.pop(call_id, None)
            if future is not None and not future.done():
                future.set_exception(ModelNotReady("the payload log's writer process stopped"))
        self._wake.set()

    def _connected_state(self, connected: bool, db_error: str | None) -> None:
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

    # -- the watchdog thread (nothing on the request path) -----------------------------------

    def _watch(self) -> None:
        while not self._stopping:
            self._wake.wait(self.interval_s)
            self._wake.clear()
            try:
                child = self._child
                if (child is None or not child.alive()) and time.monotonic() >= self._restart_at \
                        and not self._stopping:
                    self._restart()
                # answered requests of a quiet moment wait at most a cycle
                self._drop(self.ring.flush_pending())
                while self._feedback and self.ring.blob(FEEDBACK, self._feedback[0]):
                    self._feedback.popleft()
                if self._dropping and self.ring.written()[1] - self.ring.stored()[1] < self.max_buffer // 2:
                    self._dropping = False
                    log.warning("payload log: the writer process caught up; %d records dropped so far", self.dropped)
            except Exception:  # noqa: BLE001 - the watchdog must outlive any one failure
                log.exception("payload log watchdog")

    def _restart(self) -> None:
        """A new writer process: it reads the ring from where the dead one had stored (a row the dead one
        stored past that is skipped by its uid, never doubled)."""
        self._restart_at = time.monotonic() + 1.0
        old = self._child
        code = old.proc.poll() if old is not None else None
        log.error("payload log: the writer process stopped (exit code %s); starting a new one, which goes on "
                  "with the %d records not yet stored", code, self.ring.written()[1] - self.ring.stored()[1])
        if old is not None:
            if old.reader is not None:
                old.reader.join(5)
            old.control.close()
        self.restarts += 1
        self._spawn()

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

    async def _until(self, counter, timeout_s: float) -> bool:
        """Wake the writer, then wait until ``counter()`` (records encoded / stored) reaches the records written."""
        self._drop(self.ring.flush_pending())
        target = self.ring.written()[1] + len(self._feedback)
        deadline = time.monotonic() + timeout_s
        try:
            await asyncio.to_thread(self._call, "wake", timeout_s=5.0)
        except ModelNotReady:
            pass
        while counter() < target:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.005)
        return True

    async def sync(self, timeout_s: float = 5.0) -> None:
        """Wait until the records written so far are encoded (their predictions joinable)."""
        await self._until(lambda: self.ring.seen()[1], timeout_s)

    async def flush(self, timeout_s: float = 10.0) -> dict:
        """Wait until the records written so far are in the database (or ``timeout_s`` passes)."""
        deadline = time.monotonic() + timeout_s
        done = False
        if await self._until(lambda: self.ring.stored()[1], timeout_s):
            while True:
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
        unstored = self.ring.written()[1] - self.ring.stored()[1] + len(self._feedback)
        return {"buffered": max(unstored, child["buffered"]), "spill_bytes": child["spill_bytes"],
                "spilled": child["spilled"], "replayed": child["replayed"], "written": child["written"],
                "dropped": child["dropped"] + self.dropped, "database_error": child["database_error"],
                "writer_restarts": self.restarts}

    def close(self, timeout_s: float = 30.0) -> None:
        """Store everything written (SIGTERM drain): the writer process reads the ring to its end, stores it
        (the database, or the spill file for the next start) and exits."""
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
        self._drop(self.ring.flush_pending())
        for row in self._feedback:  # the drain makes room as it goes: the writer reads what is written
            if not self.ring.blob(FEEDBACK, row):
                log.error("payload log: a feedback row (request %s) did not fit in the buffer at close",
                          row.get("request_id"))
        closed: Future = Future()
        if child is not None:
            child.pending["closed"] = closed
            try:
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
            child.control.close()
        lost = self.ring.written()[1] - self.ring.stored()[1]
        if lost > 0:
            log.error("payload log: %d records were not stored at close", lost)
        if self._engine is not None:
            self._engine.dispose()
