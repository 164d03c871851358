"""One Ray Serve replica of one model: modelserve's own server core, with Ray's proxy in front.

A replica builds the same ``Core`` the single-process server runs (``server/app.py``): the model (from the
repository, or following the registry alias for this model alone), the dataplane with its dynamic batcher
and runtime, the payload log, metrics and the REST app. Ray Serve's HTTP proxy calls the REST app (the
deployment's route prefix is ``/v2/models/<model>``); the gRPC front of ``ray_serve.py`` calls ``infer``
and ``describe`` through a deployment handle. No inference logic lives here.

Metrics: each replica labels its series with its Ray replica id and serves them on a port of its own,
whose address it records in Ray's key-value store; the driver's metrics port gathers them all.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys

from modelserve.errors import ModelNotReady, ModelServeError

log = logging.getLogger(__name__)

#: Ray key-value namespace and key prefix under which replicas record their metrics address
KV_NAMESPACE = "modelserve"
METRICS_KEY = "metrics/"
#: how a replica whose model cannot load says so (the driver finds the reason in Ray's status by it)
DID_NOT_LOAD = "the model did not load:"


class _Mounted:
    """The REST app as Ray Serve's proxy calls it. The proxy puts the route prefix in ``root_path`` and keeps
    the whole path; our routes match whole paths, so ``root_path`` is cleared. Lifespan: shutdown closes the
    core (Ray sends it when the replica stops)."""

    def __init__(self, app, close):
        self.app, self.close = app, close

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await self.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope.get("root_path"):
            scope = {**scope, "root_path": ""}
        await self.app(scope, receive, send)


class ModelReplica:
    """Deployed by ``ray_serve.deploy`` as ``serve.deployment(serve.ingress()(ModelReplica))``."""

    def __init__(self, settings: dict, model: str, loads: list[str] | None = None):
        #: ``loads``: the models this replica loads: ``model`` and, for a pipeline, its steps' models
        self._settings, self.model, self.loads = settings, model, loads or [model]
        self.core = None
        self.replica_id = None
        self._metrics_port = None
        self._metrics_key = None

    async def __serve_build_asgi_app__(self):
        from ray import serve

        from modelserve.server.app import Core
        from modelserve.settings import ServerSettings

        context = serve.get_replica_context()
        self.replica_id = f"{context.app_name}/{context.replica_id.unique_id}"  # which application, which replica
        settings = ServerSettings(**self._settings, replica=self.replica_id, model_control_mode="explicit",
                                  load_models=self.loads)
        sys.setswitchinterval(settings.switch_interval_s)
        self.core = core = Core(settings)
        await core.start()
        entry = core.manager.models.get(self.model)
        if entry is None or not entry.ready_versions():
            reasons = [r["reason"] for r in core.manager.index() if r["name"] == self.model and r.get("reason")]
            await core.close()
            raise RuntimeError(f"{DID_NOT_LOAD} {'; '.join(reasons) or 'nothing to serve'}")
        core.dataplane.ready = True
        await self._serve_metrics(settings)
        log.info("replica %s of model '%s' ready (pid %d)", self.replica_id, self.model, os.getpid())
        return _Mounted(core.app, self._close)

    async def _serve_metrics(self, settings) -> None:
        """This replica's ``/metrics`` on a free port, its address recorded for the driver to gather."""
        import ray
        from ray.experimental import internal_kv

        from modelserve.server.app import MetricsPort

        local = settings.host in ("127.0.0.1", "localhost", "::1")
        host = settings.host if local else ray.util.get_node_ip_address()
        self._metrics_port = MetricsPort(self.core.metrics_app(), settings, host, 0)
        await self._metrics_port.started()
        self._metrics_key = f"{METRICS_KEY}{self.replica_id}"
        await asyncio.to_thread(lambda: internal_kv._internal_kv_put(self._metrics_key, self._metrics_port.address,
                                                                     namespace=KV_NAMESPACE))

    async def _close(self) -> None:
        if self._metrics_key is not None:
            from ray.experimental import internal_kv

            try:
                await asyncio.to_thread(lambda: internal_kv._internal_kv_del(self._metrics_key, namespace=KV_NAMESPACE))
            except Exception:  # noqa: BLE001 - the cluster is going away too: the driver skips dead addresses
                pass
        if self.core is not None:
            self.core.dataplane.ready = False
            if self._metrics_port is not None:
                await self._metrics_port.close()
            await self.core.close()

    # -- called by the gRPC front through a deployment handle --------------------------------

    async def infer(self, request):
        """The dataplane's answer, or the ``ModelServeError`` it raised, as a value (so the front raises the
        same error, and Ray does not log a stack trace for a client's bad request)."""
        try:
            return await self.core.dataplane.infer(request)
        except ModelServeError as exc:
            return exc

    async def describe(self) -> dict:
        """What the front answers metadata and readiness calls from: this replica's view of its model."""
        dataplane = self.core.dataplane
        entry = self.core.manager.models.get(self.model)
        versions = [v.version_str for v in entry.ready_versions()] if entry is not None else []
        doc = {"model": self.model, "replica": self.replica_id, "pid": os.getpid(), "ready": bool(versions),
               "versions": versions, "metadata": {}, "config": {}, "index": dataplane.repository_index(),
               "statistics": dataplane.statistics(self.model) if versions else {"model_stats": []}}
        for version in [None, *versions]:
            try:
                doc["metadata"][version] = dataplane.model_metadata(self.model, version)
                doc["config"][version] = dataplane.model_config(self.model, version)
            except ModelServeError:
                pass
        return doc

    def check_health(self) -> None:
        """Ray restarts a replica whose model has no ready version (it does not recover by itself)."""
        entry = self.core.manager.models.get(self.model) if self.core is not None else None
        if entry is None or not entry.ready_versions():
            raise ModelNotReady(f"model '{self.model}' has no ready version in this replica")


class ServerRoutes:
    """Route prefix ``/``: what no model's prefix takes. The same REST app over no model at all: server
    health and metadata, and 404 naming the model for a model that is not deployed."""

    def __init__(self, settings: dict, models: list[str]):
        self._settings, self.models = settings, models

    async def __serve_build_asgi_app__(self):
        import tempfile

        from modelserve.server.app import Core
        from modelserve.settings import ServerSettings

        empty = tempfile.mkdtemp(prefix="modelserve-ray-routes-")
        core = Core(ServerSettings(**{**self._settings, "model_repository": empty, "registry": None,
                                      "payload_log": False}, model_control_mode="explicit"))
        await core.start()
        core.dataplane.ready = True
        return _Mounted(core.app, core.close)
