"""Per model-version inference statistics, in the shape of Triton's statistics extension.

Updated only from the event loop thread, so plain integers need no lock. Durations are
cumulative nanoseconds; counts are per request except ``execution_count`` (per batch) and
``inference_count`` (per batch row), as perf_analyzer expects.

The same updates feed the Prometheus metrics (``modelserve.monitor.metrics`` reads them at scrape
time): fixed-bucket latency histograms per stage, a batch-size histogram, requests by protocol and
status, requests in flight. Each is a few list/dict operations per request, no metric objects.
"""

from __future__ import annotations

import asyncio
import time
from bisect import bisect_left
from dataclasses import dataclass, field

from modelserve.errors import ModelServeError


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns

    def as_dict(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass
class BatchStats:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


class Histogram:
    """Counts per fixed bucket (not cumulative; the last one is +Inf) and the sum of what was observed.
    ``bounds`` are inclusive upper bounds, ascending, in the unit observed (Prometheus's ``le``)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[int, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0

    def observe(self, value: int, n: int = 1) -> None:
        self.counts[bisect_left(self.bounds, value)] += n
        self.sum += value * n


#: latency histogram upper bounds in nanoseconds: 100 µs .. 30 s
LATENCY_BOUNDS_NS = tuple(int(s * 1e9) for s in (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
#: batch-size histogram upper bounds (rows per execution)
BATCH_BOUNDS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
QUEUE, PREPROCESS, INFERENCE, POSTPROCESS, TOTAL = "queue", "preprocess", "inference", "postprocess", "total"
STAGES = (QUEUE, PREPROCESS, INFERENCE, POSTPROCESS, TOTAL)


def status_of(exc: BaseException) -> int:
    """The HTTP-style status a failed request is counted under, whatever protocol carried it."""
    if isinstance(exc, ModelServeError):
        return exc.http_status
    return 499 if isinstance(exc, asyncio.CancelledError) else 500  # 499: the client went away


_KINDS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output", "cache_hit", "cache_miss")


class ModelStats:
    def __init__(self) -> None:
        self.durations = {kind: Duration() for kind in _KINDS}
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference_ms = 0
        self.batches: dict[int, BatchStats] = {}
        #: per stage: requests that completed it (``total``: requests that succeeded)
        self.latency = {stage: Histogram(LATENCY_BOUNDS_NS) for stage in STAGES}
        self.batch_sizes = Histogram(BATCH_BOUNDS)
        #: (protocol, status) -> requests answered
        self.requests: dict[tuple[str, int], int] = {}
        #: protocol -> requests this version took and has not answered yet
        self.inflight: dict[str, int] = {}

    def request_started(self, protocol: str) -> None:
        self.inflight[protocol] = self.inflight.get(protocol, 0) + 1

    def request_done(self, ok: bool, total_ns: int, protocol: str = "v2-rest", status: int = 200,
                     took: ModelStats | None = None) -> None:
        """One request answered (by this version). ``took``: the stats whose ``request_started`` counted
        it, when another version took it (a hot swap between routing and queueing); default this one."""
        self.durations["success" if ok else "fail"].add(total_ns)
        self.last_inference_ms = int(time.time() * 1000)
        key = (protocol, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        if ok:
            self.latency[TOTAL].observe(total_ns)
        inflight = (took or self).inflight
        if inflight.get(protocol):
            inflight[protocol] -= 1

    def stage_done(self, stage: str, ns: int) -> None:
        """One request's preprocess or postprocess (timed in the stage's thread, recorded on the loop)."""
        self.latency[stage].observe(ns)

    def batch_done(self, requests: int, rows: int, queue_ns: int, input_ns: int, infer_ns: int, output_ns: int,
                   waits: list[int] | None = None) -> None:
        """One execution of ``rows`` rows made of ``requests`` requests; ``queue_ns`` summed over requests,
        ``waits`` each request's own queue time (for the histogram; None: no queue, as for a pipeline)."""
        if waits is not None:
            queue = self.latency[QUEUE]
            for wait in waits:
                queue.observe(wait)
        # every request of the batch waited for the whole computation
        self.latency[INFERENCE].observe(input_ns + infer_ns + output_ns, requests)
        self.batch_sizes.observe(rows)
        d = self.durations
        d["queue"].add(queue_ns, requests)
        # Triton charges every request of a batch the batch's compute time
        d["compute_input"].add(input_ns * requests, requests)
        d["compute_infer"].add(infer_ns * requests, requests)
        d["compute_output"].add(output_ns * requests, requests)
        self.inference_count += rows
        self.execution_count += 1
        batch = self.batches.get(rows)
        if batch is None:
            batch = self.batches[rows] = BatchStats()
        batch.compute_input.add(input_ns)
        batch.compute_infer.add(infer_ns)
        batch.compute_output.add(output_ns)

    def as_dict(self, name: str, version: str) -> dict:
        return {
            "name": name,
            "version": version,
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {kind: d.as_dict() for kind, d in self.durations.items()},
            "response_stats": {},
            "batch_stats": [
                {"batch_size": size, "compute_input": b.compute_input.as_dict(),
                 "compute_infer": b.compute_infer.as_dict(), "compute_output": b.compute_output.as_dict()}
                for size, b in sorted(self.batches.items())
            ],
            "memory_usage": [],
        }
