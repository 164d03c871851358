"""The registry's Python API: register, alias, promote, rollback, delete, export, history, lineage.

Every operation is one transaction that also appends to the history. Moves of one alias are
serialized by a row lock (PostgreSQL) or the database write lock (SQLite), so two processes moving
the same alias leave a history whose steps chain (each ``from`` is the previous ``to``). Races that
surface as a constraint violation (two first registrations of one name) are retried.
"""

from __future__ import annotations

import getpass
import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from modelserve.errors import Conflict, InvalidInput, ModelNotFound
from modelserve.registry.db import make_engine, migrate
from modelserve.registry.info import (
    AliasInfo,
    HistoryInfo,
    ModelDetail,
    ModelSummary,
    ServedVersion,
    ServingTarget,
    VersionInfo,
)
from modelserve.registry.model_file import (
    FORMATS,
    optimize_report,
    report_metrics,
    served_filename,
    signature,
)
from modelserve.registry.schema import (
    Alias,
    HistoryEntry,
    ModelVersion,
    RegisteredModel,
    utcnow,
)
from modelserve.registry.store import ArtifactStore

log = logging.getLogger(__name__)
T = TypeVar("T")

STEPS = ("convert", "optimize", "graph", "quantize", "fp16", "prune", "distill", "finetune", "retrain", "import")
MOVES = ("alias_set", "promote", "rollback")


class ProtectedAlias(Conflict):
    """The alias is protected: moving it needs force (the admin right) and a reason."""


def default_actor() -> str:
    try:
        return f"{getpass.getuser()}@{socket.gethostname()}"
    except Exception:  # noqa: BLE001 - no user name in some containers
        return socket.gethostname()


def check_name(kind: str, name: str) -> str:
    if not name or len(name) > 200 or name.startswith(".") or any(c in name for c in "/\\:\0") or name != name.strip():
        raise InvalidInput(f"{kind} name '{name}' is not allowed (no '/', '\\', ':', leading '.' or spaces)")
    return name


class Registry:
    """Models and versions in a database, artifacts in a store. Thread-safe; one per process is enough."""

    def __init__(self, url: str, artifacts: str | Path, storage_options: dict | None = None,
                 actor: str | None = None, upgrade: bool = True):
        self.url = url
        self.engine = make_engine(url)
        if upgrade:
            migrate(self.engine)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.store = ArtifactStore(artifacts, storage_options)
        self.actor = actor or default_actor()

    @classmethod
    def from_settings(cls, settings=None, **overrides) -> Registry:
        from modelserve.settings import RegistrySettings

        s = settings or RegistrySettings(**overrides)
        return cls(s.url, s.artifacts_url(), s.storage_options, s.actor or None)

    def close(self) -> None:
        self.engine.dispose()

    # -- transactions ------------------------------------------------------------------------

    def _tx(self, work: Callable[[Session], T], attempts: int = 8) -> T:
        for attempt in range(attempts):
            try:
                with self.sessions.begin() as session:
                    return work(session)
            except (IntegrityError, OperationalError) as exc:
                retry = isinstance(exc, IntegrityError) or _transient(exc)
                if not retry or attempt == attempts - 1:
                    raise
                time.sleep(0.01 * 2 ** attempt)
        raise AssertionError("unreachable")

    def _record(self, session: Session, action: str, model: str, *, alias: str | None = None,
                from_version: int | None = None, to_version: int | None = None, reason: str = "",
                details: dict | None = None, actor: str | None = None) -> None:
        session.add(HistoryEntry(at=utcnow(), actor=(actor or self.actor)[:200], action=action, model=model,
                                 alias=alias, from_version=from_version, to_version=to_version, reason=reason or "",
                                 details=details or {}))

    # -- lookups -----------------------------------------------------------------------------

    @staticmethod
    def _model(session: Session, name: str, lock: bool = False) -> RegisteredModel:
        query = select(RegisteredModel).where(RegisteredModel.name == name)
        found = session.scalars(query.with_for_update() if lock else query).first()
        if found is None:
            raise ModelNotFound(f"no registered model '{name}'")
        return found

    @staticmethod
    def _version(session: Session, model: RegisteredModel, number: int) -> ModelVersion:
        found = session.scalars(select(ModelVersion).where(
            ModelVersion.model_id == model.id, ModelVersion.number == int(number))).first()
        if found is None:
            raise ModelNotFound(f"model '{model.name}' has no version {number}")
        return found

    @staticmethod
    def _alias(session: Session, model: RegisteredModel, alias: str, lock: bool = False) -> Alias | None:
        query = select(Alias).where(Alias.model_id == model.id, Alias.name == alias)
        return session.scalars(query.with_for_update() if lock else query).first()

    def _resolve(self, session: Session, model: RegisteredModel, ref: int | str) -> ModelVersion:
        """A version by number, or by the alias naming it."""
        if isinstance(ref, int) or str(ref).isdigit():
            return self._version(session, model, int(ref))
        alias = self._alias(session, model, str(ref))
        if alias is None:
            raise ModelNotFound(f"model '{model.name}' has no version or alias '{ref}'")
        return alias.version

    # -- register ----------------------------------------------------------------------------

    def register(self, path: str | Path, name: str, *, from_version: int | str | None = None,
                 step: str | None = None, step_params: dict | None = None, metrics: dict | None = None,
                 tags: dict | None = None, description: str = "", config: dict | None = None,
                 format: str | None = None, actor: str | None = None) -> VersionInfo:
        """Store the file (once per content) and add it as the model's next version.

        ``actor`` (here and in every change below): who the history names; default the registry's own
        (``RegistrySettings.actor``, else user@host). The server passes the calling key's name.

        ``from_version`` ("3", or "other-model:3") records lineage; a ``<stem>.report.json`` written by
        ``modelserve optimize`` beside the file supplies the metrics and the step's parameters.
        """
        check_name("model", name)
        path = Path(path)
        if not path.is_file():
            raise InvalidInput(f"{path} is not a file (register one model file; folders are not supported yet)")
        fmt = format or FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise InvalidInput(f"cannot tell the format of {path.name}: pass format= one of {sorted(set(FORMATS.values()))}")
        if step is not None and step not in STEPS:
            raise InvalidInput(f"step '{step}' is not one of {', '.join(STEPS)}")
        if step and from_version is None:
            raise InvalidInput(f"step '{step}' needs the version it started from (from_version)")
        if config is not None:
            config = _checked_config(config, name)
        model_signature = signature(path, fmt)
        report = optimize_report(path)
        if report:
            metrics = {**report_metrics(report), **(metrics or {})}
            if step and step_params is None:
                step_params = {"steps": report.get("steps", [])}
        artifact = self.store.put(path)
        by = (actor or self.actor)[:200]

        def work(session: Session) -> VersionInfo:
            model = session.scalars(select(RegisteredModel).where(RegisteredModel.name == name)
                                    .with_for_update()).first()
            if model is None:
                model = RegisteredModel(name=name, description="", created_by=by, created_at=utcnow())
                session.add(model)
                session.flush()
            parent = None
            if from_version is not None:
                parent_model_name, _, number = str(from_version).rpartition(":")
                parent_model = self._model(session, parent_model_name) if parent_model_name else model
                parent = self._resolve(session, parent_model, number)
            # numbers are never reused, even after a delete: the history still names the old one
            number = 1 + max(session.scalar(select(func.max(ModelVersion.number)).where(
                ModelVersion.model_id == model.id)) or 0, session.scalar(select(func.max(HistoryEntry.to_version))
                .where(HistoryEntry.model == name, HistoryEntry.action == "register")) or 0)
            version = ModelVersion(
                model_id=model.id, number=number, format=fmt, artifact_uri=artifact.uri,
                filename=served_filename(path, fmt), digest=artifact.digest, size=artifact.size,
                signature=model_signature, metrics=metrics or {}, tags=tags or {}, config=config,
                description=description, created_by=by, created_at=utcnow(),
                parent_id=parent.id if parent else None, step=step, step_params=step_params or {})
            session.add(version)
            session.flush()
            self._record(session, "register", name, to_version=number, actor=by, details={
                "digest": artifact.digest, "size": artifact.size, "source": str(path),
                **({"parent": _parent_ref(version, parent), "step": step} if parent else {})})
            return self._version_info(session, version)

        info = self._tx(work)
        log.info("registered %s version %d (%s, sha256 %s)", name, info.version, fmt, info.digest[:12])
        return info

    # -- aliases -----------------------------------------------------------------------------

    def set_alias(self, name: str, alias: str, version: int | str, *, canary: int | str | None = None,
                  weight: float = 0.0, sticky_header: str | None = None, protect: bool | None = None,
                  force: bool = False, reason: str = "", action: str = "alias_set",
                  actor: str | None = None) -> AliasInfo:
        """Point ``alias`` at ``version`` (a number or another alias), optionally splitting ``weight``
        of the traffic to ``canary``. Moving a protected alias needs ``force`` and a ``reason``."""
        check_name("alias", alias)
        if alias.isdigit():
            raise InvalidInput(f"alias '{alias}' is a number: aliases need a letter so they never read as versions")
        if canary is None and weight:
            raise InvalidInput("a canary weight needs a canary version")
        if canary is not None and not 0.0 < weight < 1.0:
            raise InvalidInput(f"canary weight must be between 0 and 1 (exclusive), not {weight}")

        def work(session: Session) -> AliasInfo:
            model = self._model(session, name)
            if action == "promote":  # version names the source alias: read it in this transaction
                source = self._alias(session, model, str(version))
                if source is None:
                    raise ModelNotFound(f"model '{name}' has no alias '{version}' to promote from")
            target = self._resolve(session, model, version)
            canary_version = self._resolve(session, model, canary) if canary is not None else None
            if canary_version is not None and canary_version.id == target.id:
                raise InvalidInput(f"the canary version {canary_version.number} is the alias's version already")
            row = self._alias(session, model, alias, lock=True)
            before = _alias_state(row)
            if row is None:
                row = Alias(model_id=model.id, name=alias, version_id=target.id, protected=bool(protect))
                session.add(row)
            else:
                self._check_protected(row, name, force, reason)
                row.version_id = target.id
                if protect is not None:
                    row.protected = protect
            row.canary_version_id = canary_version.id if canary_version else None
            row.canary_weight = weight if canary_version else 0.0
            row.sticky_header = sticky_header.lower() if (canary_version and sticky_header) else None
            row.updated_at = utcnow()
            session.flush()
            session.refresh(row)
            after = _alias_state(row)
            if before != after:
                self._record(session, action, name, alias=alias, from_version=before.get("version"),
                             to_version=target.number, reason=reason, actor=actor,
                             details={k: v for k, v in after.items() if k != "version" and v})
            return _alias_info(row, previous=before.get("version"))

        return self._tx(work)

    def _check_protected(self, row: Alias, name: str, force: bool, reason: str) -> None:
        if row.protected and not (force and reason.strip()):
            raise ProtectedAlias(f"alias '{row.name}' of model '{name}' is protected: moving it needs force "
                                 f"(--force, the admin right) and a reason (--reason)")

    def protect(self, name: str, alias: str, protected: bool = True, *, force: bool = False,
                reason: str = "", actor: str | None = None) -> AliasInfo:
        """Protect an alias; lifting the protection needs force and a reason, like moving it."""

        def work(session: Session) -> AliasInfo:
            row = self._existing_alias(session, name, alias)
            if not protected:
                self._check_protected(row, name, force, reason)
            if row.protected != protected:
                row.protected = protected
                self._record(session, "protect" if protected else "unprotect", name, alias=alias,
                             from_version=row.version.number, to_version=row.version.number, reason=reason,
                             actor=actor)
            return _alias_info(row)

        return self._tx(work)

    def _existing_alias(self, session: Session, name: str, alias: str) -> Alias:
        model = self._model(session, name)
        row = self._alias(session, model, alias, lock=True)
        if row is None:
            raise ModelNotFound(f"model '{name}' has no alias '{alias}'")
        return row

    def promote(self, name: str, source: str = "staging", target: str = "production", *,
                force: bool = False, reason: str = "", actor: str | None = None) -> AliasInfo:
        """Point ``target`` at the version ``source`` points at (staging → production by default)."""
        return self.set_alias(name, target, source, force=force, reason=reason or f"promoted from {source}",
                              action="promote", actor=actor)

    def rollback(self, name: str, alias: str = "production", *, force: bool = False, reason: str = "",
                 actor: str | None = None) -> AliasInfo:
        """Move ``alias`` back one step: to the version it pointed at before its last move (recorded)."""

        def work(session: Session) -> AliasInfo:
            row = self._existing_alias(session, name, alias)
            self._check_protected(row, name, force, reason)
            previous = _previous_versions(session, name, alias)
            if not previous:
                raise Conflict(f"alias '{alias}' of model '{name}' has no earlier version to roll back to")
            model = self._model(session, name)
            target = session.scalars(select(ModelVersion).where(
                ModelVersion.model_id == model.id, ModelVersion.number == previous[-1])).first()
            if target is None:
                raise Conflict(f"cannot roll back '{alias}' of '{name}': its previous version {previous[-1]} was deleted")
            current = row.version.number
            row.version_id, row.canary_version_id, row.canary_weight, row.sticky_header = target.id, None, 0.0, None
            row.updated_at = utcnow()
            session.flush()
            session.refresh(row)
            self._record(session, "rollback", name, alias=alias, from_version=current, to_version=target.number,
                         reason=reason, actor=actor)
            return _alias_info(row, previous=current)

        return self._tx(work)

    def delete_alias(self, name: str, alias: str, *, force: bool = False, reason: str = "",
                     actor: str | None = None) -> None:
        def work(session: Session) -> None:
            row = self._existing_alias(session, name, alias)
            self._check_protected(row, name, force, reason)
            self._record(session, "alias_delete", name, alias=alias, from_version=row.version.number, reason=reason,
                         actor=actor)
            session.delete(row)

        self._tx(work)

    # -- delete ------------------------------------------------------------------------------

    def delete_version(self, name: str, version: int, *, reason: str = "", actor: str | None = None) -> None:
        """Remove a version (refused while an alias points at it); its artifact goes when no version shares it."""

        def work(session: Session) -> str | None:
            model = self._model(session, name)
            row = self._version(session, model, version)
            pointing = [a.name for a in model.aliases if row.id in (a.version_id, a.canary_version_id)]
            if pointing:
                raise Conflict(f"version {version} of '{name}' is in use by alias{'es' if len(pointing) > 1 else ''} "
                               f"{', '.join(pointing)}: move or delete {'them' if len(pointing) > 1 else 'it'} first")
            digest, uri = row.digest, row.artifact_uri
            self._record(session, "delete_version", name, from_version=version, reason=reason, actor=actor,
                         details={"digest": digest})
            session.delete(row)
            session.flush()
            shared = session.scalar(select(func.count()).select_from(ModelVersion).where(ModelVersion.digest == digest))
            return None if shared else uri

        orphan = self._tx(work)
        if orphan:
            try:
                self.store.remove(orphan)
            except FileNotFoundError:
                pass

    # -- reading -----------------------------------------------------------------------------

    def list_models(self) -> list[ModelSummary]:
        with self.sessions() as session:
            out = []
            for model in session.scalars(select(RegisteredModel).order_by(RegisteredModel.name)):
                numbers = [v.number for v in model.versions]
                out.append(ModelSummary(name=model.name, description=model.description, versions=len(numbers),
                                        latest_version=max(numbers) if numbers else None,
                                        aliases={a.name: a.version.number for a in model.aliases},
                                        created_at=model.created_at))
            return out

    def show(self, name: str, history_limit: int | None = 50) -> ModelDetail:
        with self.sessions() as session:
            model = self._model(session, name)
            return ModelDetail(
                name=model.name, description=model.description, created_by=model.created_by,
                created_at=model.created_at,
                versions=[self._version_info(session, v) for v in model.versions],
                aliases=[_alias_info(a) for a in model.aliases],
                history=self.history(name, limit=history_limit, session=session))

    def version(self, name: str, ref: int | str) -> VersionInfo:
        with self.sessions() as session:
            return self._version_info(session, self._resolve(session, self._model(session, name), ref))

    def alias(self, name: str, alias: str) -> AliasInfo:
        with self.sessions() as session:
            row = self._alias(session, self._model(session, name), alias)
            if row is None:
                raise ModelNotFound(f"model '{name}' has no alias '{alias}'")
            return _alias_info(row)

    def history(self, name: str | None = None, alias: str | None = None, limit: int | None = None,
                session: Session | None = None) -> list[HistoryInfo]:
        """Newest first."""
        query = select(HistoryEntry).order_by(HistoryEntry.id.desc())
        if name:
            query = query.where(HistoryEntry.model == name)
        if alias:
            query = query.where(HistoryEntry.alias == alias)
        if limit:
            query = query.limit(limit)
        if session is not None:
            return [_history_info(h) for h in session.scalars(query)]
        with self.sessions() as s:
            rows = [_history_info(h) for h in s.scalars(query)]
            if not rows and name:
                self._model(s, name)  # an unknown model is an error, not an empty history
            return rows

    def lineage(self, name: str, ref: int | str) -> list[VersionInfo]:
        """The version and its ancestors, newest first."""
        with self.sessions() as session:
            row = self._resolve(session, self._model(session, name), ref)
            chain, seen = [], set()
            while row is not None and row.id not in seen:
                seen.add(row.id)
                chain.append(self._version_info(session, row))
                row = row.parent
            return chain

    def children(self, name: str) -> dict[int, list[str]]:
        """For each version of ``name``: the versions (``model:version``) derived from it."""
        with self.sessions() as session:
            model = self._model(session, name)
            ids = {v.id: v.number for v in model.versions}
            out: dict[int, list[str]] = {n: [] for n in ids.values()}
            for child in session.scalars(select(ModelVersion).where(ModelVersion.parent_id.in_(ids))):
                out[ids[child.parent_id]].append(f"{child.model.name}:{child.number}")
            return out

    def last_change(self) -> int:
        """The newest history id: a serving process polls this one number to notice any change."""
        with self.engine.connect() as connection:
            return connection.scalar(select(func.max(HistoryEntry.id))) or 0

    def serving_targets(self, alias: str) -> dict[str, ServingTarget]:
        """Every model that has ``alias``, resolved to what should be served."""
        with self.sessions() as session:
            rows = session.scalars(select(Alias).where(Alias.name == alias)).all()
            return {row.model.name: ServingTarget(
                model=row.model.name, alias=alias, primary=_served(row.version),
                canary=_served(row.canary_version) if row.canary_version else None,
                canary_weight=row.canary_weight, sticky_header=row.sticky_header) for row in rows}

    # -- artifacts ---------------------------------------------------------------------------

    def fetch(self, uri: str, digest: str, dest: Path) -> Path:
        """Copy an artifact to ``dest`` and verify its digest (DigestMismatch otherwise)."""
        return self.store.fetch(uri, digest, dest)

    def export(self, name: str, repository: str | Path, ref: int | str | None = None) -> Path:
        """Write version ``ref`` (number or alias; all versions when None) as a model-repository folder
        ``<repository>/<name>/<version>/`` the server serves with ``--model-repository``."""
        import yaml

        detail = self.show(name, history_limit=1)
        chosen = detail.versions if ref is None else [self.version(name, ref)]
        model_dir = Path(repository) / name
        for v in chosen:
            self.fetch(v.artifact_uri, v.digest, model_dir / str(v.version) / v.filename)
        configs = [v.config for v in chosen if v.config]
        if configs:
            (model_dir / "config.yaml").write_text(yaml.safe_dump({**configs[-1], "name": name}, sort_keys=False))
        return model_dir

    # -- shaping -----------------------------------------------------------------------------

    def _version_info(self, session: Session, v: ModelVersion) -> VersionInfo:
        aliases = [a.name for a in session.scalars(select(Alias).where(
            (Alias.version_id == v.id) | (Alias.canary_version_id == v.id)))]
        return VersionInfo(
            model=v.model.name, version=v.number, format=v.format, filename=v.filename,
            artifact_uri=v.artifact_uri, digest=v.digest, size=v.size, signature=v.signature or {},
            metrics=v.metrics or {}, tags=v.tags or {}, config=v.config, description=v.description,
            created_by=v.created_by, created_at=v.created_at, parent=_parent_ref(v, v.parent), step=v.step,
            step_params=v.step_params or {}, aliases=sorted(aliases))


def _transient(exc: OperationalError) -> bool:
    text = str(exc.orig).lower()
    return any(s in text for s in ("database is locked", "deadlock", "could not serialize", "busy"))


def _alias_state(row: Alias | None) -> dict:
    if row is None:
        return {}
    return {"version": row.version.number, "canary": row.canary_version.number if row.canary_version else None,
            "weight": row.canary_weight or 0.0, "sticky_header": row.sticky_header, "protected": row.protected}


def _alias_info(row: Alias, previous: int | None = None) -> AliasInfo:
    return AliasInfo(model=row.model.name, alias=row.name, version=row.version.number, protected=row.protected,
                     canary_version=row.canary_version.number if row.canary_version else None,
                     canary_weight=row.canary_weight or 0.0, sticky_header=row.sticky_header,
                     updated_at=row.updated_at, previous_version=previous)


def _history_info(h: HistoryEntry) -> HistoryInfo:
    return HistoryInfo(id=h.id, at=h.at, actor=h.actor, action=h.action, model=h.model, alias=h.alias,
                       from_version=h.from_version, to_version=h.to_version, reason=h.reason, details=h.details or {})


def _served(v: ModelVersion) -> ServedVersion:
    return ServedVersion(version=v.number, format=v.format, filename=v.filename, artifact_uri=v.artifact_uri,
                         digest=v.digest, config=v.config)


def _parent_ref(v: ModelVersion, parent: ModelVersion | None) -> str | None:
    if parent is None:
        return None
    return str(parent.number) if parent.model_id == v.model_id else f"{parent.model.name}:{parent.number}"


def _previous_versions(session: Session, name: str, alias: str) -> list[int]:
    """The alias's earlier versions as a stack: moves push where they came from, rollbacks pop."""
    stack: list[int] = []
    for h in session.scalars(select(HistoryEntry).where(HistoryEntry.model == name, HistoryEntry.alias == alias)
                             .order_by(HistoryEntry.id)):
        if h.action in ("alias_set", "promote") and h.from_version is not None and h.from_version != h.to_version:
            stack.append(h.from_version)
        elif h.action == "rollback" and stack:
            stack.pop()
        elif h.action == "alias_delete":
            stack.clear()
    return stack


def _checked_config(config: dict, name: str) -> dict:
    """The serving config stored with a version must be one the server accepts: check it now, not at load."""
    from modelserve.server.config import ModelConfig

    try:
        ModelConfig.model_validate({**config, "name": name})
    except ValueError as exc:
        raise InvalidInput(f"the model config for '{name}' is not valid: {exc}") from None
    return config
