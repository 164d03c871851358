"""Model manager: the model repository on disk, versions, load/unload, hot swap, polling.

Layout: ``<repository>/<model>/<version>/model.onnx`` plus an optional config file per model
(see ``config.py``). Loading builds a complete new set of versions beside the old one, swaps the
dict entry in one step (new requests go to the new set), then drains and unloads the old set, so
in-flight requests finish on the version they started on and none fails during a swap.
A model that fails to load is recorded as UNAVAILABLE with its reason and never blocks others.

Registry mode (``control_mode="registry"``): no folder scan; ``RegistryFollower`` fetches the versions an
alias names into the repository folder (a cache) and loads them with a ``Split``, which spreads requests
that name no version between the alias's primary and canary versions.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from modelserve.datatypes import NUMPY_OF
from modelserve.errors import ModelLoadError, ModelNotFound, ModelNotReady, ModelServeError, Unsupported
from modelserve.runtime import Runtime, RuntimeContext, RuntimeOptions, TensorSpec, runtime_class
from modelserve.server.batcher import DynamicBatcher
from modelserve.server.config import CONFIG_FILES, DEFAULT_MAX_QUEUE_SIZE, ModelConfig, read_model_config
from modelserve.server.stages import RequestStage, client_config, stage_for
from modelserve.server.stats import ModelStats

if TYPE_CHECKING:
    from modelserve.server.pipeline import Pipeline

log = logging.getLogger(__name__)

READY, UNAVAILABLE, LOADING, UNLOADING = "READY", "UNAVAILABLE", "LOADING", "UNLOADING"


@dataclass
class ModelVersion:
    name: str
    version: int
    config: ModelConfig
    state: str = LOADING
    reason: str = ""
    batcher: DynamicBatcher | None = None
    stats: ModelStats = field(default_factory=ModelStats)
    #: per-request work around the batcher (``config`` then shows the stage's client-facing tensors)
    stage: RequestStage | None = None
    #: set for ``backend: pipeline``: the dataplane runs its steps instead of a batcher
    pipeline: Pipeline | None = None
    #: seconds its load took (runtimes, warm-up; a pipeline: waiting for its steps), once READY
    load_seconds: float | None = None

    @property
    def version_str(self) -> str:
        return str(self.version)

    async def infer(self, inputs: dict[str, np.ndarray], outputs: list[str] | None, rows: int) -> dict[str, np.ndarray]:
        if self.state != READY or self.batcher is None:
            raise ModelNotReady(f"model '{self.name}' version {self.version} is not ready ({self.state})")
        return await self.batcher.infer(inputs, outputs, rows)


@dataclass(frozen=True, slots=True)
class Split:
    """Where requests that name no version go: ``weight`` (0..1) of them to ``canary``, the rest to
    ``primary``; with ``sticky_header`` the header's value decides, so one caller always gets one version."""

    primary: int
    canary: int | None = None
    weight: float = 0.0
    #: lower-case header name (gRPC: metadata key)
    sticky_header: str | None = None

    def pick(self, route_key: str | bytes | None = None) -> int:
        if self.canary is None or self.weight <= 0.0:
            return self.primary
        if not route_key:  # no header (or an empty one): by weight alone
            share = random.random()
        else:  # a stable hash: the same value lands on the same side in every process
            share = zlib.crc32(route_key.encode() if isinstance(route_key, str) else route_key) / 4294967296.0
        return self.canary if share < self.weight else self.primary


@dataclass
class ModelEntry:
    name: str
    versions: dict[int, ModelVersion]
    #: why the model as a whole is unavailable (bad config, no version folder); "" when fine
    reason: str = ""
    fingerprint: tuple = ()
    #: registry mode: how unversioned requests are spread over the versions
    split: Split | None = None
    #: versions that were to be served but were refused (digest mismatch, load failure): version -> reason
    refused: dict[int, str] = field(default_factory=dict)

    def ready_versions(self) -> list[ModelVersion]:
        return [v for _, v in sorted(self.versions.items()) if v.state == READY]


class ModelManager:
    def __init__(
        self,
        repository: Path,
        control_mode: str = "none",
        poll_interval_s: float = 2.0,
        runtime_defaults: RuntimeOptions | None = None,
        warmup: bool = False,
    ):
        if control_mode not in ("none", "explicit", "poll", "registry"):
            raise ValueError(f"model control mode must be none, explicit, poll or registry, not '{control_mode}'")
        self.repository = Path(repository)
        self.control_mode = control_mode
        self.poll_interval_s = poll_interval_s
        self.runtime_defaults = runtime_defaults or RuntimeOptions()
        #: run one inference of zeros on each new instance before it takes traffic
        self.warmup = warmup
        #: registry mode fills the repository folder itself: it is a cache, never scanned
        self.scans = control_mode != "registry"
        self.models: dict[str, ModelEntry] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        #: pipelines being built now (so that two never wait on each other)
        self.building_pipelines: set[str] = set()
        self._poller: asyncio.Task | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self, models: list[str] | None = None) -> None:
        """Load the models at start-up: all of them (modes none/poll) or those named (explicit)."""
        if not self.scans:  # registry mode: the follower loads what the alias names
            await asyncio.to_thread(self.repository.mkdir, parents=True, exist_ok=True)
            return
        if not self.repository.is_dir():
            raise FileNotFoundError(f"model repository {self.repository} is not a folder")
        names = models if models is not None else ([] if self.control_mode == "explicit" else self.repository_models())
        for result in await asyncio.gather(*(self.load(n) for n in names), return_exceptions=True):
            if isinstance(result, BaseException) and not isinstance(result, ModelServeError):
                raise result  # a bug, not a broken model: broken models are in the index already
        if self.control_mode == "poll":
            self._poller = asyncio.get_running_loop().create_task(self._poll(), name="repository-poll")

    async def close(self) -> None:
        if self._poller:
            self._poller.cancel()
        await asyncio.gather(*(self._drain(e) for e in list(self.models.values())))
        self.models.clear()

    def repository_models(self) -> list[str]:
        if not self.scans:
            return []
        return sorted(
            d.name for d in self.repository.iterdir()
            if d.is_dir() and not d.name.startswith(".") and d.name != "stats"
        )

    def in_repository(self, name: str) -> bool:
        return self.scans and "/" not in name and not name.startswith(".") and (self.repository / name).is_dir()

    # -- lookups (hot path: memory only) ---------------------------------------------------

    def get(self, name: str, version: str | None = None, route_key: str | bytes | None = None) -> ModelVersion:
        """The version to run: the one asked for, else the split's pick (canary not ready: the primary),
        else the newest ready one. ``route_key``: the sticky header's value, if the request has one."""
        entry = self.models.get(name)
        if entry is None:
            raise ModelNotFound(f"Request for unknown model: '{name}' is not found")
        if version:
            try:
                number = int(version)
            except ValueError:
                raise ModelNotFound(f"model '{name}': version '{version}' is not a number") from None
            found = entry.versions.get(number)
            if found is None:
                raise ModelNotFound(f"Request for unknown model: '{name}' version {number} is not found")
            if found.state != READY:
                raise ModelNotReady(f"model '{name}' version {number} is not ready: {found.state} {found.reason}".strip())
            return found
        split = entry.split
        if split is not None:
            for number in (split.pick(route_key), split.primary):
                found = entry.versions.get(number)
                if found is not None and found.state == READY:
                    return found
        ready = entry.ready_versions()
        if not ready:
            raise ModelNotReady(f"model '{name}' has no ready version" + (f": {entry.reason}" if entry.reason else ""))
        return ready[-1]

    def index(self, ready_only: bool = False) -> list[dict]:
        rows = []
        names = set(self.models)
        if self.repository.is_dir():
            names |= set(self.repository_models())
        for name in sorted(names):
            entry = self.models.get(name)
            if entry is None:
                rows.append({"name": name, "state": UNAVAILABLE, "reason": "unloaded"})
                continue
            if entry.reason and not entry.versions and not entry.refused:
                rows.append({"name": name, "state": UNAVAILABLE, "reason": entry.reason})
            found = {v.version: (v.state, v.reason) for v in entry.versions.values()}
            found.update({n: (UNAVAILABLE, r) for n, r in entry.refused.items() if n not in found})
            for number, (state, reason) in sorted(found.items()):
                row = {"name": name, "version": str(number), "state": state}
                if reason:
                    row["reason"] = reason
                rows.append(row)
        return [r for r in rows if r["state"] == READY] if ready_only else rows

    # -- load / unload -----------------------------------------------------------------------

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def load(self, name: str, config: ModelConfig | None = None, split: Split | None = None) -> ModelEntry:
        """Load (or reload) a model; swap it in when at least one version is ready (with a ``split``:
        when its primary is), else keep the previous versions serving and raise ``ModelLoadError``."""
        if "/" in name or name in ("", ".", "..") or name.startswith("."):
            raise ModelNotFound(f"'{name}' is not a model name")
        model_dir = self.repository / name
        if not model_dir.is_dir():
            raise ModelNotFound(f"Request for unknown model: '{name}' is not in the model repository")
        async with self._lock(name):
            fingerprint = await asyncio.to_thread(_fingerprint, model_dir)
            entry = await self._build(name, model_dir, config)
            entry.fingerprint, entry.split = fingerprint, split
            old = self.models.get(name)
            ready = entry.ready_versions()
            serving = bool(ready) if split is None else any(v.version == split.primary for v in ready)
            if old and old.ready_versions() and not serving:
                reasons = entry.reason or "; ".join(f"v{v.version}: {v.reason}"
                                                    for v in entry.versions.values() if v.reason)
                old.fingerprint = fingerprint
                await asyncio.gather(*(v.batcher.close() for v in ready if v.batcher))  # a canary that did load
                log.error("model '%s' reload failed, previous versions keep serving: %s", name, reasons)
                raise ModelLoadError(f"model '{name}' failed to load, previous versions keep serving: {reasons}")
            self.models[name] = entry
            if old:
                await self._drain(old)
            states = ", ".join(f"v{v.version} {v.state}" for v in entry.versions.values()) or entry.reason
            log.info("model '%s' loaded: %s", name, states)
            if not entry.ready_versions():
                raise ModelLoadError(f"model '{name}' failed to load: {entry.reason or states}")
            return entry

    def set_split(self, name: str, split: Split) -> None:
        """Change how a loaded model's traffic is spread (no reload: its versions are loaded already)."""
        entry = self.models[name]
        entry.split, entry.refused = split, {}

    def refuse(self, name: str, reasons: dict[int, str]) -> None:
        """Record versions that were to be served and were not; what serves now goes on serving."""
        entry = self.models.get(name)
        if entry is None:
            entry = self.models[name] = ModelEntry(name, {}, reason="; ".join(reasons.values()))
        entry.refused = dict(reasons)

    async def unload(self, name: str) -> None:
        async with self._lock(name):
            entry = self.models.pop(name, None)
            if entry is None:
                if not self.in_repository(name):
                    raise ModelNotFound(f"Request for unknown model: '{name}' is not found")
                return
            await self._drain(entry)
            log.info("model '%s' unloaded", name)

    async def _drain(self, entry: ModelEntry) -> None:
        for v in entry.versions.values():
            if v.state == READY:
                v.state = UNLOADING
        await asyncio.gather(*(v.batcher.close() for v in entry.versions.values() if v.batcher))
        for v in entry.versions.values():
            v.state, v.reason = UNAVAILABLE, "unloaded"

    async def _build(self, name: str, model_dir: Path, override: ModelConfig | None) -> ModelEntry:
        try:
            config = override or await asyncio.to_thread(read_model_config, model_dir)
        except ModelServeError as exc:
            log.error("%s", exc.message)
            return ModelEntry(name, {}, reason=exc.message)
        available = await asyncio.to_thread(_version_folders, model_dir)
        if config.backend == "pipeline" and not available:
            available = [1]  # a pipeline has no files: its version folder is optional
        selected = config.version_policy.select(available)
        if not selected:
            reason = f"no version folder matches the version policy (found {available or 'none'})"
            log.error("model '%s': %s", name, reason)
            return ModelEntry(name, {}, reason=reason)
        versions = await asyncio.gather(*(self._build_version(name, model_dir / str(v), v, config) for v in selected))
        return ModelEntry(name, {v.version: v for v in versions})

    async def _build_version(self, name: str, version_dir: Path, version: int, config: ModelConfig) -> ModelVersion:
        mv = ModelVersion(name, version, config)
        started = time.perf_counter()
        if config.backend == "pipeline":
            from modelserve.server.pipeline import build_version

            mv = await build_version(mv, self)
            if mv.state == READY:
                mv.load_seconds = time.perf_counter() - started
            return mv
        if config.backend == "python" and config.max_batch_size is None:
            config = config.model_copy(update={"max_batch_size": 0})  # code has no shapes to say it batches
        runtimes = []
        try:
            options = _with_defaults(config.runtime, self.runtime_defaults)
            cls = runtime_class(config.backend)
            context = _context(name, version, version_dir, config)
            for _ in range(max(1, config.instances)):
                runtime = cls(config.model_file(version_dir), options, context)
                await asyncio.to_thread(runtime.load)
                runtimes.append(runtime)
            inputs, outputs = runtimes[0].signature()
            batch_dynamic = all(t.dims and t.dims[0] == -1 for t in inputs + outputs)
            mv.config = config.complete(inputs, outputs, batch_dynamic)
            mv.stage = stage_for(mv.config, runtimes)
            if mv.stage is not None:
                mv.config = client_config(mv.config, mv.stage)
            if self.warmup and config.backend != "python":  # user code may count or log calls
                await asyncio.to_thread(_warm_up, f"{name}:{version}", runtimes, inputs)
        except ModelServeError as exc:
            mv.state, mv.reason = UNAVAILABLE, exc.message
            log.error("model '%s' version %d: %s", name, version, exc.message)
            for runtime in runtimes:
                runtime.unload()
            return mv
        db = mv.config.dynamic_batching
        mv.batcher = DynamicBatcher(
            f"{name}:{version}", runtimes, mv.stats,
            max_batch_size=mv.config.max_batch_size or 0,
            preferred_batch_sizes=db.preferred_batch_size if db else None,
            max_queue_delay_us=db.max_queue_delay_microseconds if db else 0,
            max_queue_size=db.max_queue_size if db else DEFAULT_MAX_QUEUE_SIZE,
        )
        mv.state, mv.load_seconds = READY, time.perf_counter() - started
        return mv

    async def wait_loaded(self, name: str) -> None:
        """Return once a load of ``name`` now in progress has finished (a pipeline waits for its steps)."""
        lock = self._locks.get(name)
        if lock is not None and lock.locked():
            async with lock:
                pass

    # -- poll mode ---------------------------------------------------------------------------

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            try:
                await self.poll_once()
            except Exception:  # noqa: BLE001 - the poller must survive anything on disk
                log.exception("repository poll failed")

    async def poll_once(self) -> None:
        on_disk = set(await asyncio.to_thread(self.repository_models))
        for name in sorted(on_disk):
            fingerprint = await asyncio.to_thread(_fingerprint, self.repository / name)
            entry = self.models.get(name)
            if entry is None or entry.fingerprint != fingerprint:
                try:
                    await self.load(name)
                except ModelServeError as exc:
                    log.error("%s", exc.message)
        for name in set(self.models) - on_disk:
            await self.unload(name)

    def require_explicit(self, action: str) -> None:
        if self.control_mode == "registry":
            raise Unsupported(f"{action}: this server serves a registry alias; move the alias instead "
                              "(modelserve models alias set, or PUT /v2/registry/models/{name}/aliases/{alias})")
        if self.control_mode == "none":
            raise Unsupported(f"{action} needs --model-control-mode explicit or poll (this server runs 'none')")


def _context(name: str, version: int, version_dir: Path, config: ModelConfig) -> RuntimeContext:
    batch = [-1] if config.max_batch_size else []
    return RuntimeContext(
        name, version, version_dir.parent, version_dir, dict(config.parameters),
        [TensorSpec(t.name, t.datatype, batch + t.dims) for t in config.inputs],
        [TensorSpec(t.name, t.datatype, batch + t.dims) for t in config.outputs],
        config.max_batch_size or 0, config.python_class,
    )


def _with_defaults(options: RuntimeOptions, defaults: RuntimeOptions) -> RuntimeOptions:
    set_fields = options.model_fields_set
    return options.model_copy(update={k: getattr(defaults, k) for k in defaults.model_fields_set if k not in set_fields})


def _warm_up(label: str, runtimes: list[Runtime], inputs: list[TensorSpec]) -> None:
    """One inference of zeros (free dims = 1) per instance, so the first real request does not pay for
    lazy initialisation. Best effort: a model that refuses zeros (or takes strings) is served cold."""
    if any(NUMPY_OF.get(t.datatype, NUMPY_OF["BYTES"]).kind == "O" for t in inputs):
        return
    feed = {t.name: np.zeros([d if d > 0 else 1 for d in t.dims], NUMPY_OF[t.datatype]) for t in inputs}
    for runtime in runtimes:
        try:
            runtime.infer(feed)
        except Exception as exc:  # noqa: BLE001 - warm-up is an optimisation, never a reason to refuse
            log.debug("warm-up of %s skipped: %s", label, exc)
            return


def _version_folders(model_dir: Path) -> list[int]:
    return sorted(int(d.name) for d in model_dir.iterdir() if d.is_dir() and d.name.isdigit())


def _fingerprint(model_dir: Path) -> tuple:
    """What poll mode compares: config files and every file of every version folder (name, size, mtime)."""
    items = []
    for entry in sorted(os.scandir(model_dir), key=lambda e: e.name):
        if entry.is_file() and (entry.name in CONFIG_FILES or entry.name.endswith(".py")):  # model.py shared by versions
            st = entry.stat()
            items.append((entry.name, st.st_size, st.st_mtime_ns))
        elif entry.is_dir() and entry.name.isdigit():
            for root, _, files in os.walk(entry.path):
                for f in sorted(files):
                    st = os.stat(os.path.join(root, f))
                    items.append((os.path.relpath(os.path.join(root, f), model_dir), st.st_size, st.st_mtime_ns))
    return tuple(items)
