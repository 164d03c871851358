"""Per model-version inference statistics, in the shape of Triton's statistics extension.

Updated only from the event loop thread, so plain integers need no lock. Durations are
cumulative nanoseconds; counts are per request except ``execution_count`` (per batch) and
``inference_count`` (per batch row), as perf_analyzer expects.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


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


_KINDS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output", "cache_hit", "cache_miss")


class ModelStats:
    def __init__(self) -> None:
        self.durations = {kind: Duration() for kind in _KINDS}
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference_ms = 0
        self.batches: dict[int, BatchStats] = {}

    def request_done(self, ok: bool, total_ns: int) -> None:
        self.durations["success" if ok else "fail"].add(total_ns)
        self.last_inference_ms = int(time.time() * 1000)

    def batch_done(self, requests: int, rows: int, queue_ns: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        """One execution of ``rows`` rows made of ``requests`` requests; ``queue_ns`` summed over requests."""
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
