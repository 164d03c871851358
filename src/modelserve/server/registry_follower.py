"""Follow a registry alias: serve the versions it names, swap when it moves.

Why polling: every server sharing the database must notice a move made anywhere (CLI, API, another
machine) with no message bus to run. ``last_change()`` is one ``max(id)`` query; the alias's targets
are read only when that number moves, and ``poke()`` polls at once after a change made here.

Everything that touches the database or the artifact store runs in a worker thread, so the event loop
(and the hot path on it) never waits for I/O. Swaps go through ``ModelManager.load``: the new versions
are built and warmed beside the old ones, swapped in one step, then the old ones drain. A version that
cannot be fetched (digest mismatch, missing artifact) or loaded is refused: what serves goes on serving,
and the reason is in the log and in the repository index. A database or store that cannot be reached
is logged and retried at the next poll; serving goes on meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from pathlib import Path

from modelserve.errors import ModelNotFound, ModelServeError
from modelserve.registry import DigestMismatch, Registry, ServedVersion, ServingTarget, file_digest
from modelserve.server.config import ModelConfig, VersionPolicy, parse_override
from modelserve.server.models import READY, ModelManager, Split

log = logging.getLogger(__name__)


def _want(target: ServingTarget) -> tuple:
    """What decides whether a model must change: versions (with digests), weight, header."""
    canary = (target.canary.version, target.canary.digest) if target.canary else None
    return (target.primary.version, target.primary.digest), canary, target.canary_weight, target.sticky_header


class RegistryFollower:
    def __init__(self, registry: Registry, manager: ModelManager, alias: str, cache_dir: Path,
                 poll_s: float = 2.0, models: list[str] | None = None):
        self.registry = registry
        #: serve only these models' aliases (a Ray Serve replica follows its own model); None: every model
        self.models = set(models) if models else None
        self.manager = manager
        self.alias = alias
        self.cache_dir = Path(cache_dir)
        self.poll_s = poll_s
        #: model -> the target last applied or refused (so a refused one is not retried every poll)
        self._applied: dict[str, tuple] = {}
        #: ``last_change()`` when the targets were last applied in full; None: read them next poll
        self._seen: int | None = None
        self._schema_checked = False
        self._db_error: str | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        """Serve what the alias names now (before the server says it is ready), then follow it."""
        await self.sync()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="registry-follower")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def poke(self) -> None:
        """Poll now (the management API calls this after a change)."""
        self._wake.set()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_s)
            self._wake.clear()
            try:
                await self.sync()
            except Exception:  # noqa: BLE001 - the follower outlives any one bad poll
                log.exception("registry poll failed")

    # -- one poll --------------------------------------------------------------------------------

    async def sync(self) -> None:
        """Apply the alias's targets if anything changed since the last complete pass."""
        try:
            if not self._schema_checked:
                await asyncio.to_thread(self._check_schema)
            change = await asyncio.to_thread(self.registry.last_change)
            if change == self._seen:
                return
            targets = await asyncio.to_thread(self.registry.serving_targets, self.alias)
            if self.models is not None:
                targets = {name: t for name, t in targets.items() if name in self.models}
        except Exception as exc:  # noqa: BLE001 - database down or unreachable: keep serving what we have
            if self._db_error is None:
                log.error("registry unreachable, serving what is loaded and retrying every %gs: %s", self.poll_s, exc)
            self._db_error = str(exc)
            return
        if self._db_error is not None:
            log.info("registry reachable again")
            self._db_error = None
        complete = True
        for name in sorted(targets):
            complete &= await self._apply(targets[name])
        for name in sorted(set(self._applied) - set(targets)):
            del self._applied[name]
            with contextlib.suppress(ModelNotFound):
                await self.manager.unload(name)
            log.info("model '%s' has no alias '%s' any more: unloaded", name, self.alias)
        self._seen = change if complete else None

    def _check_schema(self) -> None:
        """Create the tables in an empty database (a server may start before anything is registered)."""
        from alembic.util.exc import CommandError

        from modelserve.registry.db import migrate

        try:
            migrate(self.registry.engine)
        except CommandError as exc:  # a newer schema than this code knows: read it as it is
            log.warning("registry schema left as it is: %s", exc)
        self._schema_checked = True

    async def _apply(self, target: ServingTarget) -> bool:
        """Bring one model to its target. False: a transient failure, to be retried next poll."""
        name, want = target.model, _want(target)
        if self._applied.get(name) == want:
            return True
        served = [target.primary] + ([target.canary] if target.canary else [])
        split = Split(target.primary.version, target.canary.version if target.canary else None,
                      target.canary_weight, target.sticky_header)
        entry = self.manager.models.get(name)
        if entry is not None and sorted(entry.versions) == sorted(v.version for v in served) \
                and all(v.state == READY for v in entry.versions.values()):
            self.manager.set_split(name, split)  # same versions, new weights: nothing to load
            log.info("model '%s': alias '%s' split now %s", name, self.alias, _describe(split))
            self._applied[name] = want
            return True
        for version in served:
            try:
                await asyncio.to_thread(self._materialize, name, version)
            except DigestMismatch as exc:
                self._refuse(name, version.version, exc.message)
                self._applied[name] = want
                return True
            except Exception as exc:  # noqa: BLE001 - store unreachable: retry next poll
                log.error("model '%s' version %d: cannot fetch its artifact (retrying): %s", name, version.version, exc)
                return False
        try:
            config = self._config(name, target, served)
            await self.manager.load(name, config, split)
            log.info("model '%s' now serves alias '%s': %s", name, self.alias, _describe(split))
        except ModelServeError as exc:
            now = self.manager.models.get(name)
            if now is None or now.split != split:  # not swapped in (the index shows a failed new one itself)
                self._refuse(name, target.primary.version, exc.message)
        self._applied[name] = want
        return True

    def _refuse(self, name: str, version: int, reason: str) -> None:
        log.error("model '%s' version %d refused, what was serving keeps serving: %s", name, version, reason)
        self.manager.refuse(name, {version: reason})

    def _materialize(self, name: str, version: ServedVersion) -> Path:
        """``<cache>/<model>/<version>/<file>``, verified: a cached copy is hashed again, a bad one fetched again."""
        dest = self.cache_dir / name / str(version.version) / version.filename
        if dest.is_file():
            if file_digest(dest)[0] == version.digest:
                return dest
            log.warning("cached %s does not match its digest: fetching it again", dest)
        return self.registry.fetch(version.artifact_uri, version.digest, dest)

    @staticmethod
    def _config(name: str, target: ServingTarget, served: list[ServedVersion]) -> ModelConfig:
        """The primary version's recorded config (or none), serving exactly the alias's versions."""
        config = parse_override(json.dumps({**(target.primary.config or {}), "name": name}), name)
        update: dict = {"version_policy": VersionPolicy(specific=sorted(v.version for v in served))}
        if not config.default_model_filename and target.primary.filename != "model.onnx":
            update["default_model_filename"] = target.primary.filename
        return config.model_copy(update=update)

    def status(self) -> dict:
        """What this server follows and serves, per model (for operators and tests)."""
        models = {}
        for name, entry in sorted(self.manager.models.items()):
            split = entry.split
            models[name] = {
                "primary": split.primary if split else None, "canary": split.canary if split else None,
                "canary_weight": split.weight if split else 0.0, "sticky_header": split.sticky_header if split else None,
                "versions": {str(v.version): v.state for v in entry.versions.values()},
                "refused": {str(k): r for k, r in entry.refused.items()},
            }
        return {"alias": self.alias, "last_change": self._seen, "registry_error": self._db_error, "models": models}


def _describe(split: Split) -> str:
    if split.canary is None:
        return f"version {split.primary}"
    sticky = f", sticky by header '{split.sticky_header}'" if split.sticky_header else ""
    return f"version {split.primary}, canary {split.canary} at {split.weight:.0%}{sticky}"
