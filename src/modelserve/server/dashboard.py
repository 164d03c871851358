"""The monitoring dashboard: ``GET /dashboard`` (one page, its script and style bundled in the package, no CDN)
and ``GET /v2/dashboard``, the JSON document the page polls every ~2 s.

The document carries *cumulative* numbers (request counts, latency and batch-size bucket counts, CPU
seconds) and the server's clock; the page diffs two polls to show what happened between them (request
rate, error rate, latency percentiles of the last seconds). Nothing is kept per viewer on the server, so
any number of tabs can watch, and a page opened late still reads correct totals.

The per-version numbers are copied on the event loop with ``Metrics.snapshot()`` (memory only); the
rest — percentiles, quality and drift summaries, ``/proc`` readings, GPU readings — is built in a thread.
Nothing here touches the inference path.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import resource
import threading
import time
from importlib.resources import files
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import Response

from modelserve.server.stats import BATCH_BOUNDS, LATENCY_BOUNDS_NS, STAGES

if TYPE_CHECKING:
    from modelserve.monitor.metrics import Metrics, Snapshot
    from modelserve.server.dataplane import Dataplane

log = logging.getLogger(__name__)

#: file name -> content type of the page's assets (``modelserve/monitor/dashboard/``)
ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
#: the page loads nothing from elsewhere: no CDN, no inline script, no external font
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'self'")
LATENCY_BOUNDS_S = [b / 1e9 for b in LATENCY_BOUNDS_NS]
TOP_FEATURES = 5


def quantile(bounds: list[float], counts: list[int], q: float) -> float | None:
    """Prometheus's ``histogram_quantile`` over per-bucket (not cumulative) ``counts``: linear within the
    bucket the rank falls in (the first bucket starts at 0); a rank in the +Inf bucket gives the last bound.
    None when nothing was counted."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    seen = 0.0
    for i, count in enumerate(counts):
        if count and seen + count >= rank:
            if i >= len(bounds):
                return bounds[-1]
            lower = bounds[i - 1] if i else 0.0
            return lower + (bounds[i] - lower) * (rank - seen) / count
        seen += count
    return bounds[-1]


def _status_class(status: int) -> str:
    return "2xx" if 200 <= status < 300 else "4xx" if 400 <= status < 500 else "5xx" if status >= 500 else "other"


def _version_doc(v, quality: dict | None, drift: dict | None) -> dict:
    doc: dict = {"model": v.model, "version": v.version, "state": v.state, "load_seconds": v.load_seconds}
    if v.requests is not None:
        by_status: dict[str, int] = {}
        by_protocol: dict[str, int] = {}
        classes = {"2xx": 0, "4xx": 0, "5xx": 0, "other": 0}
        for (protocol, status), count in v.requests.items():
            by_status[str(status)] = by_status.get(str(status), 0) + count
            by_protocol[protocol] = by_protocol.get(protocol, 0) + count
            classes[_status_class(status)] += count
        success = classes["2xx"]
        doc["requests"] = {"total": sum(by_status.values()), "success": success,
                           "failure": sum(by_status.values()) - success, "by_class": classes,
                           "by_status": dict(sorted(by_status.items())),
                           "by_protocol": dict(sorted(by_protocol.items()))}
        doc["inflight"] = sum(v.inflight.values())
        doc["queue_depth"] = v.queue_depth
        latency = {}
        for stage, counts, sum_ns in v.latency:
            n = sum(counts)
            latency[stage] = {"count": n, "sum_s": sum_ns / 1e9, "counts": counts,
                              "mean_s": sum_ns / 1e9 / n if n else None,
                              **{f"p{int(q * 100)}_s": quantile(LATENCY_BOUNDS_S, counts, q) for q in (0.5, 0.9, 0.99)}}
        doc["latency"] = latency
        counts, total = v.batch
        executions = sum(counts)
        doc["batch"] = {"executions": executions, "rows": total, "counts": counts,
                        "mean": total / executions if executions else None}
    if quality:
        doc["quality"] = {key: quality.get(key) for key in (
            "kind", "samples", "feedback", "window", "accuracy", "macro_f1", "mae", "rmse", "bias") if key in quality}
    if drift:
        features = drift.get("features") or {}
        ranked = sorted(features.items(), key=lambda kv: -(_number(kv[1].get("psi")) or 0.0))[:TOP_FEATURES]
        doc["drift"] = {"score": drift.get("score"), "alert": bool(drift.get("alert")),
                        "threshold": drift.get("threshold"), "window": drift.get("window"),
                        "reference": {k: v for k, v in (drift.get("reference") or {}).items()
                                      if k in ("source", "samples", "complete", "error")},
                        "top_features": [{"name": name, "psi": _number(f.get("psi")), "ks": _number(f.get("ks"))}
                                         for name, f in ranked]}
    return doc


def _number(value) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


# -- process and host readings (a thread: /proc reads) -------------------------------------------------------

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _proc_status() -> dict[str, str]:
    try:
        with open("/proc/self/status") as f:
            return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    except OSError:
        return {}


def _kib(text: str | None) -> int | None:
    return int(text.split()[0]) * 1024 if text else None


def _memory_total() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def process_resources() -> dict:
    times = os.times()
    status = _proc_status()
    rss = _kib(status.get("VmRSS"))
    if rss is None:  # not Linux: the peak is what getrusage has
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    try:
        fds = len(os.listdir("/proc/self/fd"))
    except OSError:
        fds = None
    threads = status.get("Threads")
    return {
        "cpu_seconds": times.user + times.system,
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_rss_bytes": rss,
        "memory_total_bytes": _memory_total(),
        "threads": int(threads) if threads else threading.active_count(),
        "open_fds": fds,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def gpu_readings(metrics: Metrics) -> list[dict]:
    """Per GPU: utilization (0..1) and memory, from the metrics' NVML reader; [] without a GPU."""
    reader = getattr(metrics, "_gpu", None)
    if reader is None:
        return []
    gpus: dict[str, dict] = {}
    field = {"modelserve_gpu_utilization_ratio": "utilization", "modelserve_gpu_memory_used_bytes": "memory_used_bytes",
             "modelserve_gpu_memory_total_bytes": "memory_total_bytes"}
    for family in reader.collect():
        for sample in family.samples:
            key = field.get(sample.name)
            if key is not None:
                index = sample.labels["gpu"]
                gpu = gpus.setdefault(index, {"gpu": index, "name": sample.labels["name"]})
                gpu[key] = sample.value
    return list(gpus.values())


class DashboardData:
    """Builds ``/v2/dashboard``: ``snapshot`` on the loop, ``build`` in a thread."""

    def __init__(self, dataplane: Dataplane, metrics: Metrics):
        self.dataplane = dataplane
        self.metrics = metrics
        self.started = time.time()
        self._gpu_lock = threading.Lock()  # NVML is called serially (the metrics thread may call it too)

    def build(self, snapshot: Snapshot) -> dict:
        plog = self.dataplane.payload_log
        quality, drift, notes = {}, {}, []
        if plog is None:
            notes.append("payload log off (--no-payload-log): no accuracy or drift")
        else:
            try:
                quality = plog.quality.snapshot()
            except Exception as exc:  # noqa: BLE001 - a failing part must not blank the page
                log.warning("dashboard: quality unavailable: %s", exc)
                notes.append(f"quality unavailable: {exc}")
            tracker = getattr(plog, "drift", None)
            if tracker is not None:
                try:
                    drift = tracker.snapshot()
                except Exception as exc:  # noqa: BLE001
                    log.warning("dashboard: drift unavailable: %s", exc)
                    notes.append(f"drift unavailable: {exc}")
        versions = [_version_doc(v, (quality.get(v.model) or {}).get(v.version),
                                 (drift.get(v.model) or {}).get(v.version)) for v in snapshot.versions]
        versions.sort(key=lambda d: (d["model"], _version_order(d["version"])))
        with self._gpu_lock:
            try:
                gpus = gpu_readings(self.metrics)
            except Exception as exc:  # noqa: BLE001
                log.debug("dashboard: no GPU reading: %s", exc)
                gpus = []
        now = time.time()
        meta = self.dataplane.server_metadata()
        return {
            "server": {"name": meta.get("name"), "version": meta.get("version"), "pid": os.getpid(),
                       "time": now, "started": self.started, "uptime_s": now - self.started,
                       "ready": bool(getattr(self.dataplane, "ready", True)),
                       "payload_log": plog is not None, "drift": plog is not None and getattr(plog, "drift", None)
                       is not None, "notes": notes},
            "buckets": {"latency_s": LATENCY_BOUNDS_S, "batch": list(BATCH_BOUNDS)},
            "stages": list(STAGES),
            "models": sorted({v["model"] for v in versions}),
            "versions": versions,
            "resources": {**process_resources(), "http_connections": snapshot.http_connections, "gpus": gpus},
        }


def _version_order(version: str):
    return (0, int(version), "") if version.isdigit() else (1, 0, version)


def _asset(name: str) -> tuple[bytes, str]:
    body = files("modelserve.monitor").joinpath("dashboard", name).read_bytes()
    return body, '"' + hashlib.sha256(body).hexdigest()[:20] + '"'


def dashboard_router(dataplane: Dataplane, metrics: Metrics) -> APIRouter:
    router = APIRouter(tags=["dashboard"])
    data = DashboardData(dataplane, metrics)
    assets = {name: (*_asset(name), content_type) for name, content_type in ASSETS.items()}

    def serve(request: Request, name: str) -> Response:
        body, etag, content_type = assets[name]
        # revalidated each load (an upgraded package serves its new page at once), 304 when unchanged
        headers = {"ETag": etag, "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
        if name == "index.html":
            headers.update({"Content-Security-Policy": _CSP, "Referrer-Policy": "no-referrer"})
        if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
            return Response(status_code=304, headers=headers)
        return Response(body, headers=headers, media_type=content_type)

    @router.api_route("/dashboard", methods=["GET", "HEAD"], include_in_schema=False)
    async def page(request: Request):
        return serve(request, "index.html")

    @router.api_route("/dashboard/app.js", methods=["GET", "HEAD"], include_in_schema=False)
    async def script(request: Request):
        return serve(request, "app.js")

    @router.api_route("/dashboard/style.css", methods=["GET", "HEAD"], include_in_schema=False)
    async def style(request: Request):
        return serve(request, "style.css")

    @router.get("/v2/dashboard", summary="Everything the dashboard shows, in one document (cumulative numbers)")
    async def document():
        import orjson

        snapshot = metrics.snapshot()  # on the loop: consistent copies, microseconds
        doc = await asyncio.to_thread(data.build, snapshot)
        return Response(orjson.dumps(doc), media_type="application/json",
                        headers={"Cache-Control": "no-store"})

    return router
