"""Run the server: one event loop carrying the HTTP (uvicorn) and gRPC (grpc.aio) adapters.

Start-up binds both ports first (port 0 = a free one), loads the models, then prints one
line a script can parse::

    modelserve ready http=127.0.0.1:8000 grpc=127.0.0.1:8001

(with ``--metrics-port``, `` metrics=127.0.0.1:9090`` follows; with TLS `` tls=on`` or `` tls=mutual``, with
authentication `` auth=keys`` and the like). ``GET /metrics`` (Prometheus) is on the HTTP port either way.
Security (``server/secure.py``, ``server/access.py``): an address beyond loopback without authentication
is refused unless ``--insecure``. Management actions (load/unload, registry changes) are written to the
audit log (``security/audit.py``) in the key database, with authentication off too (actor ``anonymous``).

SIGTERM / SIGINT: readiness turns false, both listeners stop taking new requests, in-flight
requests finish (up to ``drain_timeout_s``), the models drain and unload, the process exits 0.

With ``settings.registry`` the models come from a registry alias (``registry_follower.py``) instead of
the model-repository folder, and ``/v2/registry/...`` serves the registry's management API.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys

import uvicorn

from modelserve.monitor.metrics import Metrics
from modelserve.runtime import RuntimeOptions
from modelserve.server.dataplane import Dataplane
from modelserve.server.grpc_service import NOT_SERVING, SERVING, create_server
from modelserve.server.limits import Limits, LimitsCollector, parse_rate
from modelserve.server.models import ModelManager
from modelserve.server.rest import create_app
from modelserve.settings import ServerSettings

log = logging.getLogger(__name__)


class _Uvicorn(uvicorn.Server):
    # signals are ours: we drain gRPC and the models too
    @contextlib.contextmanager
    def capture_signals(self):
        yield


def _bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.set_inheritable(True)
    return sock


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _follow_registry(settings: ServerSettings, runtime_defaults: RuntimeOptions):
    """Registry mode: the registry, a manager whose repository is the artifact cache, and the follower."""
    logging.getLogger("alembic").setLevel(logging.WARNING)  # its info lines say nothing to an operator
    from modelserve.registry import Registry
    from modelserve.registry.db import safe_url
    from modelserve.server.registry_follower import RegistryFollower

    rs, cache = settings.registry_settings(), settings.cache_dir()
    try:  # engines connect lazily: an unreachable database is the follower's to retry, not a start failure
        registry = Registry(rs.url, rs.artifacts_url(), rs.storage_options, rs.actor or None, upgrade=False)
    except Exception as exc:  # noqa: BLE001 - a bad URL or a missing driver: say which, exit 2
        print(f"error: cannot open registry {safe_url(rs.url)}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    manager = ModelManager(cache, "registry", runtime_defaults=runtime_defaults, warmup=True)
    follower = RegistryFollower(registry, manager, settings.alias, cache, settings.registry_poll_s,
                                settings.load_models or None)
    log.info("following alias '%s' of registry %s (artifacts cached in %s)", settings.alias, safe_url(rs.url), cache)
    return registry, manager, follower


def _payload_log(settings: ServerSettings):
    """The payload log (writer threads started, spill file of an earlier run replayed), or None when off."""
    if not settings.payload_log:
        return None
    from modelserve.monitor.payload_log import PayloadLog
    from modelserve.monitor.quality import QualityTracker
    from modelserve.registry.db import safe_url

    payload_log = PayloadLog(settings.monitor_url(), settings.monitor_spill, max_buffer=settings.monitor_max_buffer,
                             buffer_bytes=settings.monitor_buffer_mb << 20,
                             quality=QualityTracker(settings.quality_window))
    payload_log.start()
    log.info("payload log to %s (spill file %s)", safe_url(payload_log.url), payload_log.spill.path)
    return payload_log


def _security(settings: ServerSettings):
    """Refuse an open server beyond loopback and bad TLS/JWT files (exit 2, saying why); then the
    ``Access`` (None: authentication off) and its key-refresher thread (``server/secure.py``)."""
    from modelserve.server import secure

    secure.check_files(settings)
    secure.check_exposure(settings)
    secure.check_tls(settings)
    return secure.build_access(settings)


def _audit_log(settings: ServerSettings):
    """The audit log of management actions, on the key database (opened on the first action)."""
    from modelserve.security.audit import AuditLog

    return AuditLog(settings.keys_url())


def _limits(settings: ServerSettings) -> Limits:
    """Rate limits, concurrency caps and deadlines (``server/limits.py``); a bad ``--rate-limit``: exit 2."""
    from modelserve.errors import InvalidInput

    try:
        rate, burst = parse_rate(settings.rate_limit)
    except InvalidInput as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        raise SystemExit(2) from None
    return Limits(rate, burst, settings.max_inflight_per_model, settings.request_timeout_s, settings.body_timeout_s)


class Core:
    """Everything a server process runs besides its listeners: security, limits, the models (a repository,
    or a registry alias and its follower), the dataplane with its payload log, metrics and the REST app.
    The single-process server puts its HTTP and gRPC listeners in front of one; each Ray Serve replica
    (``scale/ray_serve.py``) builds one for its model and lets Ray's proxy call the app."""

    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.access, self.refresher = _security(settings)
        self.audit = _audit_log(settings)
        self.limits = _limits(settings)
        runtime_defaults = (RuntimeOptions(intra_op_threads=settings.ort_threads) if settings.ort_threads
                            else RuntimeOptions())
        self.registry = self.follower = None
        if settings.registry:
            self.registry, self.manager, self.follower = _follow_registry(settings, runtime_defaults)
        else:
            self.manager = ModelManager(settings.model_repository, settings.model_control_mode,
                                        settings.poll_interval_s, runtime_defaults)
        self.dataplane = dataplane = Dataplane(self.manager)
        dataplane.payload_log = _payload_log(settings)
        self.metrics = metrics = Metrics(self.manager, replica=settings.replica)
        if dataplane.payload_log is not None:
            from modelserve.monitor.drift import DriftCollector
            from modelserve.monitor.quality import QualityCollector

            metrics.collectors.append(QualityCollector(dataplane.payload_log.quality))
            metrics.collectors.append(DriftCollector(dataplane.payload_log.drift.attach(self.manager.repository)))
        metrics.collectors.append(LimitsCollector(self.limits))
        self.app = create_app(dataplane, settings.max_request_bytes, self.registry, self.follower, metrics,
                              self.access, self.limits, self.audit)

    def metrics_app(self):
        """The metrics port's app: ``GET /metrics``, behind authentication when it is on."""
        if self.access and self.settings.metrics_auth:
            return self.access.guard_asgi(self.metrics.asgi)
        return self.metrics.asgi

    async def start(self) -> None:
        """Load the models (and, from a registry, start following the alias)."""
        settings = self.settings
        await self.manager.start(settings.load_models if settings.model_control_mode == "explicit" else None)
        if self.follower:
            await self.follower.start()

    async def stop_following(self) -> None:
        if self.follower:  # no swap starts while draining
            await self.follower.close()

    async def close(self) -> None:
        """After the listeners have drained: store what the payload log holds, unload, close the databases."""
        from modelserve.server import secure

        await self.stop_following()
        if self.dataplane.payload_log is not None:  # every request has answered: store what the log holds
            await asyncio.to_thread(self.dataplane.payload_log.close, self.settings.drain_timeout_s)
        await self.manager.close()
        secure.stop_access(self.access, self.refresher)
        await asyncio.to_thread(self.audit.close)
        if self.registry:
            await asyncio.to_thread(self.registry.close)


def _tune_gc() -> None:
    """Once the models are loaded: what start-up made (modules, sessions, configs) leaves the collector's
    sight, and young collections run every 10,000 allocations instead of 700, so a request's short-lived
    objects rarely meet a collection. Measured twice: when the payload log still held its records in this
    process (six runs of benchmarks/payload_log.py: the log's extra server CPU per request 22 -> 13 µs), and
    with the writer process (2026-11-29, one run, log on, c=8 / 32: 7.0 / 7.1 % cost against 8.5 / 12.7 %)."""
    import gc

    gc.freeze()
    gc.set_threshold(10_000, 20, 20)


class MetricsPort:
    """A uvicorn of its own serving ``app`` (``GET /metrics``) on the caller's event loop: bound at once (port
    0: a free one, named in ``address``), started in the background; ``started()`` waits for it."""

    def __init__(self, app, settings: ServerSettings, host: str, port: int):
        from modelserve.server import secure

        sock = _bind(host, port)
        self.address = _address(host, sock.getsockname()[1])
        self.server = _Uvicorn(uvicorn.Config(app, interface="asgi3", http="httptools", lifespan="off",
                                              access_log=False, log_level="warning", timeout_graceful_shutdown=5,
                                              **secure.uvicorn_tls(settings)))
        self.task = asyncio.create_task(self.server.serve(sockets=[sock]), name="metrics-http")

    async def started(self) -> None:
        while not self.server.started:
            if self.task.done():
                await self.task
                raise OSError("the metrics server stopped during start-up")
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        self.server.should_exit = True
        await self.task


async def serve(settings: ServerSettings) -> None:
    from modelserve.server import secure

    core = Core(settings)
    dataplane, metrics, access, limits, audit = core.dataplane, core.metrics, core.access, core.limits, core.audit

    sock = _bind(settings.host, settings.http_port)
    http_port = sock.getsockname()[1]
    http = _Uvicorn(uvicorn.Config(
        core.app, http="httptools", lifespan="off", access_log=False, log_level="warning",
        timeout_graceful_shutdown=int(settings.drain_timeout_s), timeout_keep_alive=30,
        h11_max_incomplete_event_size=None, **secure.uvicorn_tls(settings),
    ))
    metrics.count_connections(http)
    # its own uvicorn on this loop: the same snapshot-then-render path as /metrics
    metrics_port = MetricsPort(core.metrics_app(), settings, settings.host, settings.metrics_port) \
        if settings.metrics_port >= 0 else None
    grpc_server = health = None
    grpc_port = -1
    if settings.grpc_port >= 0:
        grpc_server, grpc_port, health = create_server(
            dataplane, _address(settings.host, settings.grpc_port), settings.max_request_bytes, access,
            secure.grpc_credentials(settings), limits, audit)
        await grpc_server.start()
        await health.set("", NOT_SERVING)
    http_task = asyncio.create_task(http.serve(sockets=[sock]), name="http")

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    await core.start()
    _tune_gc()
    while not http.started:  # the ready line promises a listening socket
        if http_task.done():
            await http_task
            raise OSError("the HTTP server stopped during start-up")
        await asyncio.sleep(0.01)
    if metrics_port:
        await metrics_port.started()
    dataplane.ready = True
    if health:
        await health.set("", SERVING)
    grpc_part = f" grpc={_address(settings.host, grpc_port)}" if grpc_server else ""
    metrics_part = f" metrics={metrics_port.address}" if metrics_port else ""
    print(f"modelserve ready http={_address(settings.host, http_port)}{grpc_part}{metrics_part}"
          f"{secure.ready_suffix(settings)}", flush=True)

    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait([stopped, http_task], return_when=asyncio.FIRST_COMPLETED)
    log.info("shutting down: draining in-flight requests")
    dataplane.ready = False
    await core.stop_following()
    if health:
        await health.set("", NOT_SERVING)
    http.should_exit = True
    if grpc_server:
        await grpc_server.stop(grace=settings.drain_timeout_s)
    await http_task
    if metrics_port:  # scraped until the requests have drained
        await metrics_port.close()
    await core.close()
    log.info("stopped")


def run(settings: ServerSettings) -> None:
    # Inference threads need the GIL back to hand results over; with the default 5 ms switch
    # interval a busy event loop keeps them waiting that long per batch. Measured in benchmarks/.
    sys.setswitchinterval(settings.switch_interval_s)
    loop_factory = None
    if settings.event_loop == "uvloop":
        try:
            import uvloop

            loop_factory = uvloop.new_event_loop
        except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
            pass
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(serve(settings))
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as exc:
        print(f"error: cannot listen: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
