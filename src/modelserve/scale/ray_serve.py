"""``modelserve serve --ray``: the same models, protocols and batching, on Ray Serve replicas.

Topology (docs/scaling.md draws it)::

    tritonclient HTTP ─► Ray Serve HTTP proxy ─► /v2/models/<m>/… ─► replicas of app "<m>" (ModelReplica:
                           (every node)           / (anything else) ─► app "modelserve" (health, metadata, 404)
    tritonclient gRPC ─► this process's gRPC front ─► deployment handle of app "<m>" ─► ModelReplica.infer
    Prometheus        ─► this process's metrics port ─► every replica's own metrics port (``replica`` label)

Each model is one Ray Serve application whose route prefix is ``/v2/models/<model>``: the proxy sends a
request straight to one of that model's replicas (one hop), and Ray's autoscaler sizes each model on its
own, from the model config's ``scaling:`` section (``Scaling`` in ``server/config.py``). A replica runs
modelserve's own core (``ray_replica.py``); nothing of inference is written twice.

gRPC: a front in this process, not Ray Serve's gRPC proxy. Ray's proxy picks the application from an
``application`` metadata key that tritonclient and perf_analyzer never send, and it calls user methods by
RPC name with a Ray-specific servicer; the V2 ``GRPCInferenceService`` routes by the ``model_name`` field
of each message. The front is modelserve's own gRPC adapter over ``RemoteDataplane``, which hands each
request to the model's deployment handle (Ray routes it to the least busy replica).

State shared by the replicas: the registry (PostgreSQL; SQLite only on one node) and the artifact store
(S3, or a folder every node sees); each replica follows the alias of its own model, so an alias move
reaches every replica within the registry poll interval, and the driver deploys a model that gets the
alias after start (and deletes the application of one that loses it). Payload logs go to the one monitor
database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import NamedTuple

from modelserve.errors import ModelLoadError, ModelNotFound, ModelNotReady, ModelServeError, Unsupported
from modelserve.scale.ray_replica import DID_NOT_LOAD, KV_NAMESPACE, METRICS_KEY, ModelReplica, ServerRoutes
from modelserve.server.config import Scaling
from modelserve.server.dataplane import InferRequest, InferResponse, header_safe, new_request_id, server_metadata
from modelserve.settings import ServerSettings

log = logging.getLogger(__name__)

#: the application that answers what no model's route prefix takes
SERVER_APP = "modelserve"
#: Ray Serve's own log lines: warnings and up, no access log (modelserve's payload log keeps every request)
_RAY_LOGGING = {"log_level": "WARNING", "enable_access_log": False}


# -- what to deploy ------------------------------------------------------------------------------


def _absolute_sqlite(url: str | None) -> str | None:
    """A SQLite URL with a relative path made absolute: replicas do not run in this folder."""
    if not url or not url.startswith("sqlite:///") or url.startswith("sqlite:////"):
        return url
    path = url.removeprefix("sqlite:///")
    return url if path in ("", ":memory:") else f"sqlite:///{Path(path).resolve()}"


def replica_settings(settings: ServerSettings) -> dict:
    """The settings every replica builds its core from: paths absolute, no ports of its own."""
    rs = settings.registry_settings() if settings.registry else None
    doc = settings.model_dump(mode="json", exclude={"replica", "load_models", "model_control_mode"})
    doc.update(
        model_repository=str(settings.model_repository.resolve()),
        monitor_spill=str(settings.monitor_spill.resolve()),
        monitor_db=_absolute_sqlite(settings.monitor_url()),
        keys_db=_absolute_sqlite(settings.keys_url()),
        registry=_absolute_sqlite(rs.url) if rs else None,
        registry_artifacts=rs.artifacts_url() if rs else None,
        registry_cache=str(settings.cache_dir().resolve()) if rs else None,
    )
    for name in ("tls_cert", "tls_key", "tls_client_ca", "jwt_secret_file", "jwt_public_key", "jwt_jwks"):
        if doc.get(name):
            doc[name] = str(Path(doc[name]).resolve())
    return doc


class Planned(NamedTuple):
    """One model's application: its scaling, and the models its replicas load (a pipeline's steps too)."""

    scaling: Scaling
    loads: list[str]


def open_registry(settings: ServerSettings):
    from modelserve.registry import Registry

    rs = settings.registry_settings()
    return Registry(rs.url, rs.artifacts_url(), rs.storage_options, rs.actor or None)


def models_to_deploy(settings: ServerSettings, registry=None) -> dict[str, Planned]:
    """Model name -> its application: the repository's model folders, or the models the registry alias names
    (``registry``: one open already; else one is opened for this call)."""
    from modelserve.server.config import parse_override, read_model_config

    if settings.registry:
        import json

        own = registry is None
        registry = open_registry(settings) if own else registry
        try:
            targets = registry.serving_targets(settings.alias)
        finally:
            if own:
                registry.close()
        configs = {name: parse_override(json.dumps({**(t.primary.config or {}), "name": name}), name)
                   for name, t in targets.items()}
    else:
        repository = settings.model_repository
        if not repository.is_dir():
            raise FileNotFoundError(f"model repository {repository} is not a folder")
        configs = {d.name: read_model_config(d) for d in sorted(repository.iterdir())
                   if d.is_dir() and not d.name.startswith(".") and d.name != "stats"}
    names = list(configs)
    if settings.load_models:
        missing = sorted(set(settings.load_models) - set(configs))
        if missing:
            raise ModelNotFound(f"not found to deploy: {', '.join(missing)}")
        names = list(settings.load_models)
    if not names:
        raise ModelNotFound("nothing to deploy: " + (f"no model has alias '{settings.alias}'" if settings.registry
                                                     else f"no model folder in {settings.model_repository}"))
    return {name: Planned(configs[name].scaling, _with_steps(name, configs)) for name in names}


def _with_steps(name: str, configs: dict) -> list[str]:
    """``name`` and, for a pipeline, every model its steps run (a pipeline calls them in its own process)."""
    loads, todo = [], [name]
    while todo:
        current = todo.pop(0)
        if current in loads:
            continue
        loads.append(current)
        config = configs.get(current)
        todo += [step.model for step in (config.steps if config is not None else [])]
    return loads


def deployment_options(scaling: Scaling) -> dict:
    """``serve.deployment`` options from a model's ``scaling:``: a fixed count when min == max, else Ray's
    autoscaler between the bounds."""
    options: dict = {
        "ray_actor_options": {"num_cpus": scaling.num_cpus, "num_gpus": scaling.num_gpus},
        "max_ongoing_requests": scaling.max_ongoing_requests,
        "health_check_period_s": 2.0,
        "graceful_shutdown_timeout_s": 30.0,
    }
    if scaling.min_replicas == scaling.max_replicas:
        options["num_replicas"] = scaling.max_replicas
    else:
        options["autoscaling_config"] = {
            "min_replicas": scaling.min_replicas, "max_replicas": scaling.max_replicas,
            "initial_replicas": max(scaling.min_replicas, 1),
            "target_ongoing_requests": scaling.target_ongoing_requests,
            "upscale_delay_s": scaling.upscale_delay_s, "downscale_delay_s": scaling.downscale_delay_s,
            "metrics_interval_s": 1.0, "look_back_period_s": max(2.0, min(10.0, scaling.upscale_delay_s * 2)),
        }
    return options


def deploy(settings: ServerSettings, models: dict[str, Planned]) -> None:
    """One Ray Serve application per model (route prefix ``/v2/models/<model>``), then the server routes."""
    from ray import serve

    shared = replica_settings(settings)
    for name, planned in models.items():
        deploy_model(shared, name, planned)
    routes = serve.deployment(serve.ingress()(ServerRoutes)).options(
        name="server", num_replicas=1, ray_actor_options={"num_cpus": 0})
    serve.run(routes.bind(shared, sorted(models)), name=SERVER_APP, route_prefix="/", logging_config=_RAY_LOGGING)


def deploy_model(shared: dict, name: str, planned: Planned) -> None:
    """The model's application; returns once its replicas are up (Ray raises if they cannot start)."""
    from ray import serve

    log.info("deploying model '%s' on Ray Serve (%s)", name, planned.scaling)
    replica = serve.deployment(serve.ingress()(ModelReplica))
    app = replica.options(name=name, **deployment_options(planned.scaling)).bind(shared, name, planned.loads)
    try:
        serve.run(app, name=name, route_prefix=f"/v2/models/{name}", logging_config=_RAY_LOGGING)
    except RuntimeError as exc:  # Ray gave up starting the replicas: say why, in the replicas' words
        reason = _why(str(exc))
        serve.delete(name)
        raise ModelLoadError(f"model '{name}' could not be deployed on Ray Serve: {reason}") from None


def _why(failure: str) -> str:
    """The replica's reason (``DID_NOT_LOAD ...``) out of Ray's status messages, else Ray's own message."""
    from ray import serve

    texts = [failure]
    for app in serve.status().applications.values():
        texts += [app.message, *(d.message for d in app.deployments.values())]
    for text in texts:
        found = re.search(re.escape(DID_NOT_LOAD) + r" ([^\n]+)", text or "")
        if found:
            return found.group(1).strip()
    return failure


async def follow_alias(settings: ServerSettings, deployed: dict[str, Planned], dataplane: RemoteDataplane) -> None:
    """Registry mode: a model that gets the alias after start gets its application, one that loses the alias
    loses it (the replicas themselves follow their model's version moves). Polls ``last_change()`` every
    ``registry_poll_s``, like the replicas; reads the alias's models only when it moves."""
    from ray import serve

    registry = open_registry(settings)
    shared, seen = replica_settings(settings), None
    try:
        while True:
            await asyncio.sleep(settings.registry_poll_s)
            try:
                change = await asyncio.to_thread(registry.last_change)
                if change == seen:
                    continue
                try:
                    wanted = await asyncio.to_thread(models_to_deploy, settings, registry)
                except ModelNotFound:
                    wanted = {}
                seen = change
            except Exception as exc:  # noqa: BLE001 - the database down: what is deployed goes on serving
                log.warning("registry unreachable, deployed models go on serving: %s", exc)
                continue
            for name in sorted(set(wanted) - set(deployed)):
                try:
                    await asyncio.to_thread(deploy_model, shared, name, wanted[name])
                except Exception as exc:  # noqa: BLE001 - refused until the registry changes again
                    log.error("model '%s' could not be deployed: %s", name, exc)
                    continue
                deployed[name] = wanted[name]
                dataplane.add(name)
            for name in sorted(set(deployed) - set(wanted)):
                log.info("model '%s' has no alias '%s' any more: deleting its application", name, settings.alias)
                dataplane.remove(name)
                del deployed[name]
                await asyncio.to_thread(serve.delete, name)
    finally:
        await asyncio.to_thread(registry.close)


# -- the gRPC front -------------------------------------------------------------------------------


class RemoteDataplane:
    """The dataplane the gRPC adapter sees in this process: inference goes to the model's replicas through
    its deployment handle; metadata and readiness come from what a replica last described (refreshed every
    ``refresh_s``, so the adapter's synchronous calls never wait on Ray)."""

    manager = None  # no local models: the adapter skips in-flight caps (Ray's max_ongoing_requests caps replicas)
    payload_log = None  # the replicas log what they answer

    def __init__(self, models: list[str], refresh_s: float = 1.0):
        from ray import serve

        self.handles = {name: serve.get_app_handle(name) for name in models}
        self.refresh_s = refresh_s
        self.ready = False
        self._described: dict[str, dict] = {}
        self._task: asyncio.Task | None = None

    def add(self, model: str) -> None:
        from ray import serve

        self.handles[model] = serve.get_app_handle(model)

    def remove(self, model: str) -> None:
        self.handles.pop(model, None)
        self._described.pop(model, None)

    async def start(self) -> None:
        await self._refresh()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="ray-describe")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            await self._refresh()

    async def _refresh(self) -> None:
        async def one(name, handle):
            try:
                self._described[name] = await asyncio.wait_for(handle.describe.remote(), 10)
            except Exception as exc:  # noqa: BLE001 - no replica answered: not ready until one does
                self._described[name] = {"ready": False, "error": str(exc)}

        await asyncio.gather(*(one(n, h) for n, h in list(self.handles.items())))

    def _doc(self, model: str) -> dict:
        if model not in self.handles:
            raise ModelNotFound(f"Request for unknown model: '{model}' is not deployed on this Ray Serve cluster")
        return self._described.get(model) or {"ready": False}

    # -- what the adapter calls --------------------------------------------------------------

    server_metadata = staticmethod(server_metadata)

    def model_ready(self, model: str, version: str | None = None) -> bool:
        doc = self._doc(model)
        return bool(doc["ready"]) and (version is None or version in doc["versions"])

    def _versioned(self, key: str, model: str, version: str | None) -> dict:
        doc = self._doc(model)
        found = doc.get(key, {}).get(version)
        if found is None:
            if not doc["ready"]:
                raise ModelNotReady(f"model '{model}' has no ready replica ({doc.get('error', 'starting')})")
            raise ModelNotFound(f"model '{model}' version {version} is not served")
        return found

    def model_metadata(self, model: str, version: str | None = None) -> dict:
        return self._versioned("metadata", model, version)

    def model_config(self, model: str, version: str | None = None) -> dict:
        return self._versioned("config", model, version)

    def statistics(self, model: str = "", version: str | None = None) -> dict:
        """One replica's statistics per model (Prometheus, through the metrics port, has every replica's)."""
        names = [model] if model else sorted(self.handles)
        stats = [s for name in names for s in self._doc(name).get("statistics", {}).get("model_stats", [])]
        if version:
            stats = [s for s in stats if s["version"] == version]
        return {"model_stats": stats}

    def repository_index(self, ready_only: bool = False) -> list[dict]:
        rows = []
        for name in sorted(self.handles):
            doc = self._doc(name)
            rows += [r for r in doc.get("index", []) if r["name"] == name] or \
                [{"name": name, "state": "UNAVAILABLE", "reason": doc.get("error", "starting")}]
        return [r for r in rows if r.get("state") == "READY"] if ready_only else rows

    async def load(self, model: str, parameters: dict | None = None) -> None:
        raise Unsupported("on Ray Serve the models are deployed by 'modelserve serve --ray' (one application "
                          "each); load and unload are not available")

    unload = load

    async def infer(self, request: InferRequest) -> InferResponse:
        if request.request_id is None:  # chosen here: the adapter returns it to the client
            request.request_id = header_safe(request.id) or new_request_id()
        handle = self.handles.get(request.model)
        if handle is None:
            raise ModelNotFound(f"Request for unknown model: '{request.model}' is not deployed on this Ray "
                                "Serve cluster")
        if callable(request.headers):  # gRPC metadata is read lazily; the replica needs values
            request.headers = list(request.headers())
        answer = await handle.infer.remote(request)
        if isinstance(answer, ModelServeError):
            raise answer
        return answer


# -- the driver's metrics port: every replica's metrics -------------------------------------------


class GatheredMetrics:
    """``GET /metrics``: each live replica's exposition (its series carry a ``replica`` label), merged into
    one. The caller's Authorization header goes with each request, so every replica checks it as its own
    metrics port does; a replica that does not answer within ``timeout_s`` is left out of that scrape."""

    def __init__(self, timeout_s: float = 3.0):
        import httpx

        self.timeout_s = timeout_s
        self._client = httpx.AsyncClient(timeout=timeout_s)

    @staticmethod
    def addresses() -> list[str]:
        from ray.experimental import internal_kv

        keys = internal_kv._internal_kv_list(METRICS_KEY, namespace=KV_NAMESPACE)
        values = (internal_kv._internal_kv_get(k, namespace=KV_NAMESPACE) for k in keys)
        return sorted(v.decode() for v in values if v)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] != "/metrics":
            await _answer(send, 404, b"not found: try /metrics\n")
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]
                   if k in (b"authorization", b"x-api-key")}
        addresses = await asyncio.to_thread(self.addresses)
        answers = await asyncio.gather(*(self._client.get(f"http://{a}/metrics", headers=headers)
                                         for a in addresses), return_exceptions=True)
        texts = []
        for address, answer in zip(addresses, answers):
            if isinstance(answer, Exception):
                log.debug("metrics of replica at %s: %s", address, answer)
                continue
            if answer.status_code in (401, 403):  # refused by the replicas: refused here
                await _answer(send, answer.status_code, answer.content, answer.headers.get("content-type"))
                return
            if answer.status_code == 200:
                texts.append(answer.text)
        await _answer(send, 200, merge_expositions(texts), "text/plain; version=0.0.4; charset=utf-8")


async def _answer(send, status: int, body: bytes, content_type: str | None = None) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", (content_type or "text/plain; charset=utf-8").encode("latin-1")),
        (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def merge_expositions(texts: list[str]) -> bytes:
    """Prometheus text expositions -> one: each metric family once, with every exposition's samples."""
    from prometheus_client.exposition import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, object] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            known = families.get(family.name)
            if known is None:
                families[family.name] = family
            else:
                known.samples.extend(family.samples)

    class _Merged:
        def collect(self):
            return families.values()

    return generate_latest(_Merged())


# -- the driver -------------------------------------------------------------------------------------


async def _front(settings: ServerSettings, models: dict[str, Planned], http_port: int) -> None:
    from modelserve.server import secure
    from modelserve.server.app import MetricsPort, _address, _limits, _security
    from modelserve.server.grpc_service import NOT_SERVING, SERVING, create_server

    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per replica per scrape says nothing
    access, refresher = _security(settings)
    dataplane = RemoteDataplane(list(models))
    await dataplane.start()
    following = asyncio.create_task(follow_alias(settings, models, dataplane), name="ray-follow-alias") \
        if settings.registry else None
    grpc_server = health = None
    parts = []
    if settings.grpc_port >= 0:
        grpc_server, grpc_port, health = create_server(
            dataplane, _address(settings.host, settings.grpc_port), settings.max_request_bytes, access,
            secure.grpc_credentials(settings), _limits(settings), None)
        await grpc_server.start()
        await health.set("", SERVING)
        parts.append(f" grpc={_address(settings.host, grpc_port)}")
    metrics_port = None
    if settings.metrics_port >= 0:
        metrics_port = MetricsPort(GatheredMetrics(), settings, settings.host, settings.metrics_port)
        await metrics_port.started()
        parts.append(f" metrics={metrics_port.address}")
    dataplane.ready = True
    print(f"modelserve ready http={_address(settings.host, http_port)}{''.join(parts)} ray=on"
          f"{secure.ready_suffix(settings)}", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down the gRPC front and the Ray Serve applications")
    dataplane.ready = False
    if following is not None:  # no application is added or deleted while shutting down
        following.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await following
    if health:
        await health.set("", NOT_SERVING)
    if grpc_server:
        await grpc_server.stop(grace=settings.drain_timeout_s)
    if metrics_port:
        await metrics_port.close()
    await dataplane.close()
    secure.stop_access(access, refresher)


def run(settings: ServerSettings, address: str | None) -> None:
    """Connect to Ray (``address``: ``auto``, ``host:port`` or ``ray://host:port``; None starts a local Ray),
    deploy every model, run the gRPC front and the metrics port until SIGTERM, then delete the applications."""
    if address is not None and (Path.home() / ".ray" / "auth_token").is_file():
        # Ray sends its token to a cluster it joins only when told so before it is imported (a local start
        # turns token authentication on by itself)
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray
    from ray import serve

    try:
        models = models_to_deploy(settings)
    except (ModelServeError, FileNotFoundError) as exc:
        print(f"error: {getattr(exc, 'message', exc)}", file=sys.stderr)
        raise SystemExit(2) from None
    if not settings.http_port:  # Ray's proxy takes a port number: pick a free one for it
        from modelserve.server.app import _bind

        with _bind(settings.host, 0) as sock:
            http_port = sock.getsockname()[1]
    else:
        http_port = settings.http_port
    local = address is None
    started = time.monotonic()
    ray.init(address=address, namespace="modelserve", include_dashboard=False, logging_level=logging.WARNING)
    try:
        serve.start(http_options={"host": settings.host, "port": http_port}, logging_config=_RAY_LOGGING)
        from ray.serve.context import _get_global_client

        running = _get_global_client().http_config  # Serve started earlier on this cluster keeps its proxy
        if running.port != http_port:
            log.warning("Ray Serve already runs on this cluster, its HTTP proxy on port %d: the models are there",
                        running.port)
            http_port = running.port
        try:
            deploy(settings, models)
        except ModelServeError as exc:
            print(f"error: {exc.message}", file=sys.stderr)
            raise SystemExit(2) from None
        log.info("%d model(s) deployed on Ray Serve in %.1f s", len(models), time.monotonic() - started)
        asyncio.run(_front(settings, models, http_port))
    finally:
        _undeploy([*models, SERVER_APP], local, settings.drain_timeout_s + 30)  # what the follower left deployed
        ray.shutdown()


def _undeploy(names: list[str], local: bool, timeout_s: float) -> None:
    """Delete the applications (their replicas drain and store their payload logs) and, with a local Ray,
    stop Serve; bounded, since a Ctrl-C that reached the whole process group may have stopped Ray already."""
    import threading

    from ray import serve

    def work():
        for name in names:
            try:
                serve.delete(name)
            except Exception:  # noqa: BLE001 - a cluster gone already has nothing to delete
                pass
        if local:
            serve.shutdown()

    worker = threading.Thread(target=work, name="ray-undeploy", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        log.error("Ray did not confirm the applications' deletion within %.0f s (is the cluster still up?)",
                  timeout_s)
