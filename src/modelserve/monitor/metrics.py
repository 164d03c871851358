"""Prometheus metrics: ``GET /metrics`` on the HTTP port (and, with ``--metrics-port``, a port of its own).

Nothing here runs per request. The hot path keeps plain counters and fixed-bucket histograms in each
version's ``ModelStats`` (``server/stats.py``), updated on the event loop. A scrape copies those numbers
on the loop (``Metrics.snapshot``: a few list copies per model version, so the copy is consistent without
a lock), then builds the metric families and the text in a thread of its own (``Metrics.render``), where
the process (``/proc``) and GPU (NVML) readings are taken too. The event loop only moves the bytes.

Every metric is listed in docs/metrics.md. Besides ours, the answer carries whatever prometheus_client's
default registry holds: its process and Python collectors (``process_cpu_seconds_total``,
``process_resident_memory_bytes``, ``process_open_fds``, ...) and any metric user code (a Python model)
registers there.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.utils import floatToGoString

from modelserve.server.stats import BATCH_BOUNDS, LATENCY_BOUNDS_NS, STAGES

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

    from modelserve.server.models import ModelManager

log = logging.getLogger(__name__)

PREFIX = "modelserve_"
#: the states ``modelserve_model_state`` reports (one series each, 1 for the current one)
STATES = ("LOADING", "READY", "UNLOADING", "UNAVAILABLE")
#: versions whose request metrics are shown: those that take (or finish) requests
_SERVING = ("READY", "UNLOADING")
_LATENCY_LE = [floatToGoString(b / 1e9) for b in LATENCY_BOUNDS_NS] + ["+Inf"]
_BATCH_LE = [floatToGoString(b) for b in BATCH_BOUNDS] + ["+Inf"]


@dataclass(slots=True)
class _Version:
    """One model version's numbers, copied on the event loop."""

    model: str
    version: str
    state: str
    load_seconds: float | None = None
    requests: dict | None = None
    inflight: dict | None = None
    latency: list | None = None  # [(stage, counts, sum_ns)]
    batch: tuple | None = None  # (counts, sum)
    queue_depth: int | None = None


@dataclass(slots=True)
class Snapshot:
    versions: list[_Version]
    http_connections: int | None


class Metrics:
    """The scrape side of the metrics: one per server, shared by ``/metrics`` and the metrics port."""

    def __init__(self, manager: ModelManager, registry: Collector | None = REGISTRY, gpu: bool = True,
                 replica: str | None = None):
        self.manager = manager
        #: added as a ``replica`` label to every series when several processes serve the same models
        self.replica = replica
        #: extra families (prometheus_client's default registry: process_*, python_*, user metrics)
        self.registry = registry
        #: callables giving the open HTTP connections (uvicorn's ``server_state.connections``), read on the loop
        self.connection_counts: list[Callable[[], int]] = []
        #: more collectors read in the metrics thread at each scrape (quality from feedback, drift)
        self.collectors: list[Collector] = []
        self._gpu = _Gpu() if gpu else None
        self._executor: ThreadPoolExecutor | None = None

    def count_connections(self, uvicorn_server) -> None:
        """Report the open connections of a uvicorn server (its ``server_state``) as ``modelserve_http_connections``."""
        self.connection_counts.append(lambda: len(uvicorn_server.server_state.connections))

    # -- on the event loop -------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """Copy every number the families need; memory only, microseconds per model version."""
        versions: list[_Version] = []
        for name, entry in list(self.manager.models.items()):
            if not entry.versions and not entry.refused:
                versions.append(_Version(name, "", "UNAVAILABLE"))  # bad config, no version folder
            for number, reason in entry.refused.items():
                if number not in entry.versions:
                    versions.append(_Version(name, str(number), "UNAVAILABLE"))
            for mv in entry.versions.values():
                snap = _Version(name, mv.version_str, mv.state, mv.load_seconds)
                if mv.state in _SERVING:
                    stats = mv.stats
                    snap.requests = dict(stats.requests)
                    snap.inflight = dict(stats.inflight)
                    snap.latency = [(stage, list(stats.latency[stage].counts), stats.latency[stage].sum)
                                    for stage in STAGES]
                    snap.batch = (list(stats.batch_sizes.counts), stats.batch_sizes.sum)
                    if mv.batcher is not None:
                        snap.queue_depth = mv.batcher.queue_depth
                versions.append(snap)
        connections = sum(count() for count in self.connection_counts) if self.connection_counts else None
        return Snapshot(versions, connections)

    async def scrape(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition (text, or OpenMetrics when ``accept`` asks for it) and its content type."""
        snapshot = self.snapshot()
        if self._executor is None:  # one thread: scrapes never queue behind model loads, NVML is called serially
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="metrics")
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.render, snapshot, accept)

    async def asgi(self, scope, receive, send) -> None:
        """The metrics port's whole app: ``GET /metrics``, 404 elsewhere."""
        if scope["type"] != "http":
            return
        if scope["path"] != "/metrics":
            status, headers, body = 404, [(b"content-type", b"text/plain; charset=utf-8")], b"not found: try /metrics\n"
        elif scope["method"] not in ("GET", "HEAD"):
            status, headers, body = 405, [(b"content-type", b"text/plain; charset=utf-8"), (b"allow", b"GET, HEAD")], b""
        else:
            accept = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"accept"), "")
            body, content_type = await self.scrape(accept)
            status, headers = 200, [(b"content-type", content_type.encode("latin-1"))]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})

    # -- in the metrics thread ---------------------------------------------------------------

    def render(self, snapshot: Snapshot, accept: str | None = None) -> tuple[bytes, str]:
        encoder, content_type = choose_encoder(accept or "")
        families = _Families(self.families(snapshot), [*self.collectors, self.registry], self._gpu, self.replica)
        return encoder(families), content_type

    def families(self, snapshot: Snapshot) -> list[Metric]:
        labels = ["model", "version"]
        requests = CounterMetricFamily(
            PREFIX + "requests", "Inference requests answered, by protocol and status (HTTP-style code for "
            "every protocol: 200 ok, 400 bad input, 503 not ready or queue full, 499 client gone, 500 failed)",
            labels=labels + ["protocol", "status"])
        duration = HistogramMetricFamily(
            PREFIX + "request_duration_seconds", "Time requests spent in each stage: queue (waiting for a batch), "
            "preprocess, inference (the batch's compute), postprocess, total (successful requests, end to end)",
            labels=labels + ["stage"], unit="seconds")
        batch = HistogramMetricFamily(PREFIX + "batch_size", "Rows per model execution (batch)", labels=labels)
        queue = GaugeMetricFamily(PREFIX + "queue_depth", "Requests waiting in the batch queue", labels=labels)
        inflight = GaugeMetricFamily(PREFIX + "inflight_requests", "Requests taken and not yet answered, by protocol",
                                     labels=labels + ["protocol"])
        load = GaugeMetricFamily(PREFIX + "model_load_duration_seconds",
                                 "Seconds the version took to load (runtimes and warm-up)", labels=labels,
                                 unit="seconds")
        state = GaugeMetricFamily(PREFIX + "model_state", "1 for the version's current state, 0 for the others",
                                  labels=labels + ["state"])
        for v in snapshot.versions:
            key = [v.model, v.version]
            for s in STATES:
                state.add_metric(key + [s], 1.0 if v.state == s else 0.0)
            if v.load_seconds is not None:
                load.add_metric(key, v.load_seconds)
            if v.requests is None:
                continue
            for (protocol, status), count in sorted(v.requests.items()):
                requests.add_metric(key + [protocol, str(status)], count)
            for protocol, count in sorted(v.inflight.items()):
                inflight.add_metric(key + [protocol], count)
            for stage, counts, sum_ns in v.latency:
                duration.add_metric(key + [stage], _cumulative(_LATENCY_LE, counts), sum_ns / 1e9)
            counts, total = v.batch
            batch.add_metric(key, _cumulative(_BATCH_LE, counts), total)
            if v.queue_depth is not None:
                queue.add_metric(key, v.queue_depth)
        families = [requests, duration, batch, queue, inflight, load, state]
        if snapshot.http_connections is not None:
            families.append(GaugeMetricFamily(PREFIX + "http_connections", "Open HTTP connections (the HTTP port)",
                                              value=snapshot.http_connections))
        return families


def _cumulative(les: list[str], counts: list[int]) -> list[tuple[str, int]]:
    buckets, total = [], 0
    for le, count in zip(les, counts):
        total += count
        buckets.append((le, total))
    return buckets


class _Families:
    """What an encoder reads: our families, the GPU's, then the other collectors' (None: skipped)."""

    def __init__(self, ours: list[Metric], collectors: list[Collector | None], gpu: _Gpu | None,
                 replica: str | None = None):
        self.ours, self.collectors, self.gpu, self.replica = ours, collectors, gpu, replica

    def collect(self) -> Iterable[Metric]:
        if self.replica is None:
            yield from self._all()
            return
        for family in self._all():
            family.samples = [s._replace(labels={**s.labels, "replica": self.replica}) for s in family.samples]
            yield family

    def _all(self) -> Iterable[Metric]:
        yield from self.ours
        if self.gpu is not None:
            yield from self.gpu.collect()
        for collector in self.collectors:
            if collector is not None:
                yield from collector.collect()


class _Gpu:
    """Utilization and memory per GPU through NVML (``pip install nvidia-ml-py``); nothing without a GPU."""

    def __init__(self):
        self._nvml = None
        self._devices: list | None = None  # None: not tried yet; []: no NVML or no GPU

    def _open(self) -> list:
        try:
            import pynvml

            pynvml.nvmlInit()
            devices = []
            for i in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(i)
                name = pynvml.nvmlDeviceGetName(handle)
                devices.append((str(i), name.decode() if isinstance(name, bytes) else str(name), handle))
        except Exception as exc:  # noqa: BLE001 - no pynvml, no driver, no GPU: no GPU metrics
            log.debug("no GPU metrics: %s", exc)
            return []
        self._nvml = pynvml
        log.info("GPU metrics for %d device(s)", len(devices))
        return devices

    def collect(self) -> Iterable[Metric]:
        if self._devices is None:
            self._devices = self._open()
        if not self._devices:
            return
        nvml = self._nvml
        labels = ["gpu", "name"]
        util = GaugeMetricFamily(PREFIX + "gpu_utilization_ratio",
                                 "Share of the last sample period the GPU was busy (0..1)", labels=labels)
        used = GaugeMetricFamily(PREFIX + "gpu_memory_used_bytes", "GPU memory in use (every process)",
                                 labels=labels, unit="bytes")
        total = GaugeMetricFamily(PREFIX + "gpu_memory_total_bytes", "GPU memory in all", labels=labels,
                                  unit="bytes")
        for index, name, handle in self._devices:
            try:
                rates = nvml.nvmlDeviceGetUtilizationRates(handle)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            except Exception as exc:  # noqa: BLE001 - a GPU that stops answering must not break the scrape
                log.debug("GPU %s: no reading: %s", index, exc)
                continue
            util.add_metric([index, name], rates.gpu / 100.0)
            used.add_metric([index, name], float(memory.used))
            total.add_metric([index, name], float(memory.total))
        yield from (util, used, total)
