"""Model manager: the model repository on disk, versions, load/unload, hot swap, polling.

Layout: ``<repository>/<model>/<version>/model.onnx`` plus an optional config file per model
(see ``config.py``). Loading builds a complete new set of versions beside the old one, swaps the
dict entry in one step (new requests go to the new set), then drains and unloads the old set, so
in-flight requests finish on the version they started on and none fails during a swap.
A model that fails to load is recorded as UNAVAILABLE with its reason and never blocks others.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from modelserve.errors import ModelLoadError, ModelNotFound, ModelNotReady, ModelServeError, Unsupported
from modelserve.runtime import RuntimeOptions, runtime_class
from modelserve.server.batcher import DynamicBatcher
from modelserve.server.config import CONFIG_FILES, DEFAULT_MAX_QUEUE_SIZE, ModelConfig, read_model_config
from modelserve.server.stats import ModelStats

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

    @property
    def version_str(self) -> str:
        return str(self.version)

    async def infer(self, inputs: dict[str, np.ndarray], outputs: list[str] | None, rows: int) -> dict[str, np.ndarray]:
        if self.state != READY or self.batcher is None:
            raise ModelNotReady(f"model '{self.name}' version {self.version} is not ready ({self.state})")
        return await self.batcher.infer(inputs, outputs, rows)


@dataclass
class ModelEntry:
    name: str
    versions: dict[int, ModelVersion]
    #: why the model as a whole is unavailable (bad config, no version folder); "" when fine
    reason: str = ""
    fingerprint: tuple = ()

    def ready_versions(self) -> list[ModelVersion]:
        return [v for _, v in sorted(self.versions.items()) if v.state == READY]


class ModelManager:
    def __init__(
        self,
        repository: Path,
        control_mode: str = "none",
        poll_interval_s: float = 2.0,
        runtime_defaults: RuntimeOptions | None = None,
    ):
        if control_mode not in ("none", "explicit", "poll"):
            raise ValueError(f"model control mode must be none, explicit or poll, not '{control_mode}'")
        self.repository = Path(repository)
        self.control_mode = control_mode
        self.poll_interval_s = poll_interval_s
        self.runtime_defaults = runtime_defaults or RuntimeOptions()
        self.models: dict[str, ModelEntry] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._poller: asyncio.Task | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self, models: list[str] | None = None) -> None:
        """Load the models at start-up: all of them (modes none/poll) or those named (explicit)."""
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
        return sorted(
            d.name for d in self.repository.iterdir()
            if d.is_dir() and not d.name.startswith(".") and d.name != "stats"
        )

    def in_repository(self, name: str) -> bool:
        return "/" not in name and not name.startswith(".") and (self.repository / name).is_dir()

    # -- lookups (hot path: memory only) ---------------------------------------------------

    def get(self, name: str, version: str | None = None) -> ModelVersion:
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
            if entry.reason and not entry.versions:
                rows.append({"name": name, "state": UNAVAILABLE, "reason": entry.reason})
            for v in sorted(entry.versions.values(), key=lambda v: v.version):
                row = {"name": name, "version": v.version_str, "state": v.state}
                if v.reason:
                    row["reason"] = v.reason
                rows.append(row)
        return [r for r in rows if r["state"] == READY] if ready_only else rows

    # -- load / unload -----------------------------------------------------------------------

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def load(self, name: str, config: ModelConfig | None = None) -> ModelEntry:
        """Load (or reload) a model; swap it in when at least one version is ready."""
        if "/" in name or name in ("", ".", "..") or name.startswith("."):
            raise ModelNotFound(f"'{name}' is not a model name")
        model_dir = self.repository / name
        if not model_dir.is_dir():
            raise ModelNotFound(f"Request for unknown model: '{name}' is not in the model repository")
        async with self._lock(name):
            fingerprint = await asyncio.to_thread(_fingerprint, model_dir)
            entry = await self._build(name, model_dir, config)
            entry.fingerprint = fingerprint
            old = self.models.get(name)
            if old and old.ready_versions() and not entry.ready_versions():
                reasons = entry.reason or "; ".join(f"v{v.version}: {v.reason}" for v in entry.versions.values())
                old.fingerprint = fingerprint
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

    async def unload(self, name: str) -> None:
        async with self._lock(name):
            entry = self.models.pop(name, None)
            if entry is None:
                if not (self.repository / name).is_dir():
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
        selected = config.version_policy.select(available)
        if not selected:
            reason = f"no version folder matches the version policy (found {available or 'none'})"
            log.error("model '%s': %s", name, reason)
            return ModelEntry(name, {}, reason=reason)
        versions = await asyncio.gather(*(self._build_version(name, model_dir / str(v), v, config) for v in selected))
        return ModelEntry(name, {v.version: v for v in versions})

    async def _build_version(self, name: str, version_dir: Path, version: int, config: ModelConfig) -> ModelVersion:
        mv = ModelVersion(name, version, config)
        runtimes = []
        try:
            options = _with_defaults(config.runtime, self.runtime_defaults)
            cls = runtime_class(config.backend)
            for _ in range(max(1, config.instances)):
                runtime = cls(config.model_file(version_dir), options)
                await asyncio.to_thread(runtime.load)
                runtimes.append(runtime)
            inputs, outputs = runtimes[0].signature()
            batch_dynamic = all(t.dims and t.dims[0] == -1 for t in inputs + outputs)
            mv.config = config.complete(inputs, outputs, batch_dynamic)
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
        mv.state = READY
        return mv

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
        if self.control_mode == "none":
            raise Unsupported(f"{action} needs --model-control-mode explicit or poll (this server runs 'none')")


def _with_defaults(options: RuntimeOptions, defaults: RuntimeOptions) -> RuntimeOptions:
    set_fields = options.model_fields_set
    return options.model_copy(update={k: getattr(defaults, k) for k in defaults.model_fields_set if k not in set_fields})


def _version_folders(model_dir: Path) -> list[int]:
    return sorted(int(d.name) for d in model_dir.iterdir() if d.is_dir() and d.name.isdigit())


def _fingerprint(model_dir: Path) -> tuple:
    """What poll mode compares: config files and every file of every version folder (name, size, mtime)."""
    items = []
    for entry in sorted(os.scandir(model_dir), key=lambda e: e.name):
        if entry.is_file() and entry.name in CONFIG_FILES:
            st = entry.stat()
            items.append((entry.name, st.st_size, st.st_mtime_ns))
        elif entry.is_dir() and entry.name.isdigit():
            for root, _, files in os.walk(entry.path):
                for f in sorted(files):
                    st = os.stat(os.path.join(root, f))
                    items.append((os.path.relpath(os.path.join(root, f), model_dir), st.st_size, st.st_mtime_ns))
    return tuple(items)
