"""The dynamic batcher: one bounded queue per model version, one worker per model instance.

Requests (each possibly a batch of its own) wait in the queue; a free instance takes the
compatible requests at the head (same non-batch shapes, same requested outputs), up to
``max_batch_size`` rows, cut at a preferred size when one fits, concatenates them once, runs the
model in its own thread (ONNX Runtime releases the GIL) and hands each request its slice.

Waiting: a lone request is never taxed. The worker waits (at most ``max_queue_delay``) only while
recent traffic says more requests are on their way: fewer are queued than made up the largest batch
of the last few windows, or another instance is busy. Under a steady load of N concurrent clients
batches settle at N, and come back to N after a straggler: judged by the last batch alone, one late
client split N clients into two batches that then kept each other apart (every request paying a
batch of its own), which is how a hiccup such as a busy neighbour core turned into a lasting slowdown.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
import queue
import threading
from dataclasses import dataclass

import numpy as np

from modelserve.errors import InvalidInput, ModelNotReady, ModelServeError, QueueFull
from modelserve.runtime import Runtime
from modelserve.server.stats import ModelStats

log = logging.getLogger(__name__)

#: how far back (in ``max_queue_delay`` windows) the batches go that say how many requests to wait for
RECENT_WINDOWS = 4


@dataclass(slots=True)
class _Pending:
    inputs: dict[str, np.ndarray]
    outputs: list[str] | None
    rows: int
    key: tuple  # what must match for two requests to share a batch
    future: asyncio.Future
    enqueued_ns: int


class DynamicBatcher:
    def __init__(
        self,
        name: str,
        runtimes: list[Runtime],
        stats: ModelStats,
        max_batch_size: int = 0,
        preferred_batch_sizes: list[int] | None = None,
        max_queue_delay_us: int = 0,
        max_queue_size: int = 1024,
    ):
        self.name = name
        self.max_batch_size = max_batch_size
        self.preferred = sorted(p for p in (preferred_batch_sizes or []) if 0 < p <= max(max_batch_size, 1))
        self.max_delay_ns = max_queue_delay_us * 1000
        self.max_queue_size = max_queue_size
        self.stats = stats
        self._runtimes = runtimes
        self._queue: deque[_Pending] = deque()
        self._work = asyncio.Event()
        #: (when taken, rows) of the batches of the last ``_recent_ns``: their largest is the batch to wait for
        self._recent: deque[tuple[int, int]] = deque()
        self._recent_ns = max(RECENT_WINDOWS * self.max_delay_ns, 1_000_000)
        self._busy = 0  # workers running a batch now
        self._closing = False
        self._stopped = False
        self._threads = [InstanceThread(f"{name}-{i}") for i in range(len(runtimes))]
        self._workers = [
            asyncio.get_running_loop().create_task(self._worker(rt, th), name=f"batcher-{name}-{i}")
            for i, (rt, th) in enumerate(zip(runtimes, self._threads))
        ]
        self._live_workers = len(self._workers)

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    async def infer(self, inputs: dict[str, np.ndarray], outputs: list[str] | None, rows: int) -> dict[str, np.ndarray]:
        """Queue one request and wait for its outputs. ``rows`` is its batch size (1 without batching)."""
        if self._stopped:
            raise ModelNotReady(f"model '{self.name}' is unloading")
        if len(self._queue) >= self.max_queue_size:
            raise QueueFull(f"model '{self.name}': queue full ({self.max_queue_size} requests waiting); retry later")
        key = (tuple((n, a.dtype, a.shape[1:]) for n, a in inputs.items()), tuple(outputs) if outputs else None)
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(inputs, outputs, rows, key, future, time.perf_counter_ns()))
        self._work.set()
        return await future

    async def close(self) -> None:
        """Finish every queued request, then stop the workers and release the runtimes."""
        self._closing = True
        self._work.set()
        await asyncio.gather(*self._workers, return_exceptions=True)
        for runtime, thread in zip(self._runtimes, self._threads):
            await thread.run(runtime.unload)
            thread.stop()

    # -- worker side -------------------------------------------------------------------------

    async def _worker(self, runtime: Runtime, thread: "InstanceThread") -> None:
        try:
            while True:
                while not self._queue:
                    if self._closing:
                        return
                    self._work.clear()
                    await self._work.wait()
                if self.max_delay_ns and self.max_batch_size:
                    await self._wait_for_fuller_batch()
                batch = self._take()
                if batch:
                    self._busy += 1
                    try:
                        await self._run(batch, runtime, thread)
                    finally:
                        self._busy -= 1
        finally:
            self._live_workers -= 1
            if self._live_workers == 0:
                # decided synchronously with the empty-queue check above, so no request slips in after
                self._stopped = True
                for pending in self._queue:
                    _fail(pending, ModelNotReady(f"model '{self.name}' stopped"))

    def _compatible(self) -> tuple[int, int]:
        """Rows and requests at the head of the queue that can share a batch with the first one."""
        key = self._queue[0].key
        rows = count = 0
        for pending in self._queue:
            if pending.key == key:
                if rows + pending.rows > self.max_batch_size:
                    break
                rows += pending.rows
                count += 1
        return rows, count

    async def _wait_for_fuller_batch(self) -> None:
        target = self.preferred[-1] if self.preferred else self.max_batch_size
        deadline = self._queue[0].enqueued_ns + self.max_delay_ns
        while self._queue:
            rows, count = self._compatible()
            remaining = deadline - time.perf_counter_ns()
            if rows >= target or remaining <= 0 or (count >= self._expected() and not self._busy):
                return
            self._work.clear()
            # cheaper than asyncio.wait_for (no extra task); a spurious wake just re-checks
            timer = asyncio.get_running_loop().call_later(remaining / 1e9, self._work.set)
            await self._work.wait()
            timer.cancel()

    def _take(self) -> list[_Pending]:
        while self._queue and self._queue[0].future.done():  # cancelled while queued (deadline, client gone)
            self._queue.popleft()
        if not self._queue:
            return []
        if not self.max_batch_size:
            return [self._queue.popleft()]
        rows, _ = self._compatible()
        limit = rows
        fitting = [p for p in self.preferred if p <= rows]
        if fitting:
            limit = fitting[-1]
        key = self._queue[0].key
        taken: list[_Pending] = []
        kept: deque[_Pending] = deque()
        total = 0
        while self._queue:
            pending = self._queue.popleft()
            if pending.future.done():  # cancelled while queued: dropped, not run
                continue
            if pending.key == key and total + pending.rows <= limit:
                taken.append(pending)
                total += pending.rows
            else:
                kept.append(pending)
                if total >= limit:
                    break
        kept.extend(self._queue)
        self._queue = kept
        if not taken:  # the head request alone is larger than a preferred size
            taken.append(self._queue.popleft())
        self._recent.append((time.perf_counter_ns(), len(taken)))
        self._forget_old()
        return taken

    def _forget_old(self) -> None:
        cutoff = time.perf_counter_ns() - self._recent_ns
        while self._recent and self._recent[0][0] < cutoff:
            self._recent.popleft()

    def _expected(self) -> int:
        """Requests to wait for: the largest batch taken lately (1 when none was: after a quiet spell too)."""
        self._forget_old()
        return max((n for _, n in self._recent), default=1)

    async def _run(self, batch: list[_Pending], runtime: Runtime, thread: "InstanceThread") -> None:
        started = time.perf_counter_ns()
        waits = [started - p.enqueued_ns for p in batch]
        first = batch[0]
        try:
            if len(batch) == 1:
                merged = first.inputs
            else:
                merged = {name: np.concatenate([p.inputs[name] for p in batch]) for name in first.inputs}
            t_in = time.perf_counter_ns()
            results = await thread.run(runtime.infer, merged, first.outputs)
            t_infer = time.perf_counter_ns()
            self._deliver(batch, results)
            done = time.perf_counter_ns()
            self.stats.batch_done(len(batch), sum(p.rows for p in batch), sum(waits),
                                  t_in - started, t_infer - t_in, done - t_infer, waits)
        except Exception as exc:  # noqa: BLE001 - every failure must reach its request
            if len(batch) > 1:
                # one bad request must not fail its neighbours: run them one by one
                for pending in batch:
                    await self._run([pending], runtime, thread)
                return
            if not isinstance(exc, ModelServeError):
                log.exception("model '%s' failed", self.name)
                exc = ModelServeError(f"model '{self.name}' failed: {exc}")
            _fail(first, exc)

    def _deliver(self, batch: list[_Pending], results: dict[str, np.ndarray]) -> None:
        if len(batch) == 1:
            if not batch[0].future.done():
                batch[0].future.set_result(results)
            return
        total = sum(p.rows for p in batch)
        for name, array in results.items():
            if array.ndim == 0 or array.shape[0] != total:
                raise InvalidInput(
                    f"model '{self.name}': output '{name}' has shape {list(array.shape)}, "
                    f"expected a first dimension of {total} (the batch)"
                )
        offset = 0
        for pending in batch:
            end = offset + pending.rows
            if not pending.future.done():
                pending.future.set_result({name: array[offset:end] for name, array in results.items()})
            offset = end


def _fail(pending: _Pending, exc: Exception) -> None:
    if not pending.future.done():
        pending.future.set_exception(exc)


class InstanceThread:
    """One model instance's own thread: runs a call, hands the result back to the event loop.

    Leaner than ``loop.run_in_executor`` (no concurrent.futures chain): one queue put, one
    ``call_soon_threadsafe``. For a tiny model that hop is most of the inference time.
    """

    def __init__(self, name: str):
        self._loop = asyncio.get_running_loop()
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def run(self, fn, *args) -> asyncio.Future:
        future = self._loop.create_future()
        self._calls.put((future, fn, args))
        return future

    def stop(self) -> None:
        self._calls.put(None)

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            future, fn, args = call
            try:
                result, error = fn(*args), None
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
                result, error = None, exc
            self._loop.call_soon_threadsafe(_settle, future, result, error)


def _settle(future: asyncio.Future, result, error) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
