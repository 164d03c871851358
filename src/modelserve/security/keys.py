"""API keys: created and revoked in the registry database (``KeyStore``), checked in memory (``KeyCache``).

A key is ``ms_<id>_<secret>``: ``id`` is 8 characters of ``[a-z0-9]``, public, how the row is found;
``secret`` is 32 random bytes (``secrets.token_bytes``) in URL-safe base64 without padding (43
characters). The database keeps the SHA-256 of the whole string, never the string: a key is a
256-bit random token, not a password, so a fast hash is the right one (nothing to brute-force) and
a lookup by id plus ``hmac.compare_digest`` of the hashes is all a check costs.

Serving processes never query the database per request: ``KeyCache`` holds a snapshot of every key
(hash, principal, expiry, revoked) and ``refresh()`` reloads it when the cheap change check
``count(*), sum(revision)`` moves. The server calls ``refresh()`` every ~2 s from a background thread
(``Refresher``), so a revocation takes effect within that. When the database cannot be read, the last
snapshot stays (fail-static) and the failure is logged once per outage.

Failures say why in words that never repeat the presented key: ``malformed API key``, ``invalid API
key`` (unknown id or wrong secret: the same words, so ids cannot be probed), and, only to a caller who
showed the right secret, ``API key 'name' was revoked`` / ``has expired``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import string
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel
from sqlalchemy import Engine, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from modelserve.errors import Conflict, InvalidInput, ModelServeError, Unauthenticated
from modelserve.security.principal import ALL_MODELS, Principal, Role
from modelserve.security.schema import ApiKey, AuditRecord

log = logging.getLogger(__name__)

PREFIX = "ms_"
ID_ALPHABET = string.ascii_lowercase + string.digits
ID_LENGTH = 8
SECRET_BYTES = 32
_KEY_FORMAT = re.compile(r"ms_([a-z0-9]{8})_([A-Za-z0-9_-]{43})")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,199}")

#: SQLite hands datetimes back without a zone; they were written in UTC
When = Annotated[datetime, AfterValidator(lambda d: d if d.tzinfo else d.replace(tzinfo=UTC))]


def utcnow() -> datetime:
    return datetime.now(UTC)


def _utc(at: datetime | None) -> datetime | None:
    if at is None:
        return None
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


class KeyNotFound(ModelServeError):
    http_status = 404
    grpc_code = "NOT_FOUND"


class KeyInfo(BaseModel):
    """What ``keys list`` shows: everything about a key but its secret and hash."""

    key_id: str
    name: str
    role: str
    models: list[str]
    status: Literal["active", "expired", "revoked"]
    created_at: When
    created_by: str
    expires_at: When | None = None
    revoked_at: When | None = None
    revoked_by: str | None = None
    last_used_at: When | None = None


class AuditEntry(BaseModel):
    id: int
    at: When
    actor: str
    action: str
    target: str
    detail: dict = {}
    client: str | None = None


# -- helpers -----------------------------------------------------------------------------------

def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def new_secret() -> tuple[str, str]:
    """-> (key id, whole secret ``ms_<id>_<43 chars>``)."""
    key_id = "".join(secrets.choice(ID_ALPHABET) for _ in range(ID_LENGTH))
    return key_id, f"{PREFIX}{key_id}_{secrets.token_urlsafe(SECRET_BYTES)}"


def parse_key(token: str) -> str:
    """The key id of a well-formed key; ``Unauthenticated('malformed API key')`` otherwise."""
    match = _KEY_FORMAT.fullmatch(token) if isinstance(token, str) else None
    if match is None:
        raise Unauthenticated("malformed API key")
    return match.group(1)


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidInput("key name must be 1-200 characters of letters, digits and . _ @ + - "
                           "(starting with a letter or digit)")
    return name


def check_models(models: Iterable[str] | str | None) -> list[str]:
    """Globs (a list, or one comma-separated string) -> a clean list; ``None``/empty: every model."""
    if models is None:
        return list(ALL_MODELS)
    items = models.split(",") if isinstance(models, str) else list(models)
    out: list[str] = []
    for item in items:
        glob = str(item).strip()
        if not glob:
            continue
        if len(glob) > 200 or any(c.isspace() or c in "\0/\\" for c in glob):
            raise InvalidInput(f"model glob {glob[:60]!r} is not allowed (no spaces, '/' or '\\')")
        if glob not in out:
            out.append(glob)
    if not out:
        return list(ALL_MODELS)
    return list(ALL_MODELS) if "*" in out else out


_DURATION = re.compile(r"(\d+)\s*([smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def _parse_when(text: str, now: datetime, sign: int, what: str) -> datetime:
    match = _DURATION.fullmatch(text.lower())
    if match:
        amount = int(match.group(1))
        if amount <= 0:
            raise InvalidInput(f"{what} {text!r}: the duration must be positive")
        return now + sign * timedelta(**{_UNITS[match.group(2)]: amount})
    try:
        return _utc(datetime.fromisoformat(text))
    except ValueError:
        raise InvalidInput(f"{what} {text[:60]!r}: expected a duration like 30d, 12h, 90m, 2w or an ISO date "
                           "(2030-01-31 or 2030-01-31T12:00:00+00:00)") from None


def parse_expiry(text: str | None, now: datetime | None = None) -> datetime | None:
    """``30d`` / ``12h`` / ``90m`` / ``2w`` / ``45s`` from now, or an ISO date/time (UTC unless it says
    otherwise); ``None``, ``""`` or ``never``: no expiry."""
    if text is None or not text.strip() or text.strip().lower() == "never":
        return None
    return _parse_when(text.strip(), now or utcnow(), 1, "expiry")


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """``7d`` / ``12h`` / ``30m`` ago, or an ISO date/time (UTC unless it says otherwise)."""
    return _parse_when(text.strip(), now or utcnow(), -1, "since")


def _status(row: ApiKey, now: datetime) -> str:
    if row.revoked_at is not None:
        return "revoked"
    expires = _utc(row.expires_at)
    return "expired" if expires is not None and expires <= now else "active"


def _info(row: ApiKey, now: datetime | None = None) -> KeyInfo:
    return KeyInfo(key_id=row.key_id, name=row.name, role=row.role, models=list(row.models or []),
                   status=_status(row, now or utcnow()), created_at=row.created_at, created_by=row.created_by,
                   expires_at=row.expires_at, revoked_at=row.revoked_at, revoked_by=row.revoked_by,
                   last_used_at=row.last_used_at)


def record_audit(session: Session, actor: str, action: str, target: str, detail: dict | None = None,
                 client: str | None = None) -> None:
    """Add an audit row to ``session``'s transaction (the change and its record commit together).
    ``detail`` must never hold a secret: callers pass ids, names, roles, globs."""
    session.add(AuditRecord(at=utcnow(), actor=(actor or "unknown")[:200], action=action[:60],
                            target=target[:200], detail=detail or {}, client=client[:200] if client else None))


# -- the store ---------------------------------------------------------------------------------

class KeyStore:
    """Create, list and revoke keys, and read the audit log, in the registry database.

    ``KeyStore(engine)`` uses an engine whose schema is at head (``modelserve.registry.db.migrate``);
    ``KeyStore.open(url)`` makes the engine, migrates, and disposes of it on ``close()``.
    ``client``: recorded in each audit row (``cli``, a client address).
    """

    def __init__(self, engine: Engine, client: str | None = None):
        self.engine = engine
        self.client = client
        self.sessions = sessionmaker(engine, expire_on_commit=False)
        self._owned = False

    @classmethod
    def open(cls, url: str, client: str | None = None, upgrade: bool = True) -> KeyStore:
        from modelserve.registry.db import make_engine, migrate

        engine = make_engine(url)
        try:
            if upgrade:
                migrate(engine)
        except BaseException:
            engine.dispose()
            raise
        store = cls(engine, client)
        store._owned = True
        return store

    def close(self) -> None:
        if self._owned:
            self.engine.dispose()

    def __enter__(self) -> KeyStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- changes ---------------------------------------------------------------------------------

    def create(self, name: str, role: Role | str, models: Iterable[str] | str | None = None,
               expires_at: datetime | None = None, created_by: str = "") -> tuple[str, KeyInfo]:
        """A new key -> (the secret, shown to the caller once and stored nowhere; its record).
        ``Conflict`` when a key not revoked has this name (an expired one too: revoke it first)."""
        check_name(name)
        role = Role.parse(role)
        globs = check_models(models)
        expires_at = _utc(expires_at)
        now = utcnow()
        if expires_at is not None and expires_at <= now:
            raise InvalidInput("the expiry is in the past")
        actor = created_by or "unknown"
        for attempt in range(5):
            key_id, secret = new_secret()
            try:
                with self.sessions.begin() as session:
                    if session.scalar(select(ApiKey.id).where(ApiKey.name == name, ApiKey.revoked_at.is_(None))):
                        raise Conflict(f"an API key named {name!r} exists (revoke it first to reuse the name)")
                    row = ApiKey(key_id=key_id, name=name, secret_hash=hash_secret(secret), role=str(role),
                                 models=globs, created_at=now, created_by=actor[:200], expires_at=expires_at,
                                 revision=1)
                    session.add(row)
                    session.flush()
                    expiry = expires_at.isoformat(timespec="seconds") if expires_at else None
                    record_audit(session, actor, "key.create", name,
                                 {"key_id": key_id, "role": str(role), "models": globs, "expires_at": expiry},
                                 self.client)
                    return secret, _info(row, now)
            except IntegrityError:
                # an id collision (retry with a new id) or a concurrent create of the same name (the
                # check above says so on the next attempt)
                if attempt == 4:
                    raise
        raise AssertionError("unreachable")

    def revoke(self, name_or_id: str, by: str = "") -> KeyInfo:
        """Revoke the key not yet revoked with this name, else the key with this id.
        ``KeyNotFound`` / ``Conflict`` (already revoked)."""
        now = utcnow()
        with self.sessions.begin() as session:
            row = session.scalar(select(ApiKey).where(ApiKey.name == name_or_id, ApiKey.revoked_at.is_(None))
                                 .with_for_update())
            if row is None:
                row = session.scalar(select(ApiKey).where(ApiKey.key_id == name_or_id).with_for_update())
            if row is None:  # only revoked keys by that name: say so
                row = session.scalar(select(ApiKey).where(ApiKey.name == name_or_id)
                                     .order_by(ApiKey.revoked_at.desc()).limit(1))
            if row is None:
                raise KeyNotFound(f"no API key named or with id {name_or_id[:200]!r}")
            if row.revoked_at is not None:
                raise Conflict(f"API key {row.name!r} ({row.key_id}) was already revoked "
                               f"at {_utc(row.revoked_at):%Y-%m-%d %H:%M:%S} UTC")
            row.revoked_at, row.revoked_by, row.revision = now, (by or "unknown")[:200], row.revision + 1
            record_audit(session, by, "key.revoke", row.name, {"key_id": row.key_id, "role": row.role}, self.client)
            session.flush()
            return _info(row, now)

    # -- reads -------------------------------------------------------------------------------------

    def list(self, include_revoked: bool = True) -> list[KeyInfo]:
        now = utcnow()
        with self.sessions() as session:
            query = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
            if not include_revoked:
                query = query.where(ApiKey.revoked_at.is_(None))
            return [_info(row, now) for row in session.scalars(query)]

    def get(self, name_or_id: str) -> KeyInfo:
        with self.sessions() as session:
            row = session.scalar(select(ApiKey).where(ApiKey.name == name_or_id, ApiKey.revoked_at.is_(None)))
            row = row or session.scalar(select(ApiKey).where(ApiKey.key_id == name_or_id))
            if row is None:
                raise KeyNotFound(f"no API key named or with id {name_or_id[:200]!r}")
            return _info(row)

    def audit(self, since: datetime | None = None, actor: str | None = None, action: str | None = None,
              limit: int | None = None) -> list[AuditEntry]:
        """Audit rows, oldest first (the newest ``limit`` when given). ``actor``: ``alice`` matches
        ``alice`` and ``alice@anyhost``."""
        query = select(AuditRecord)
        if since is not None:
            query = query.where(AuditRecord.at >= _utc(since))
        if actor:
            query = query.where(or_(AuditRecord.actor == actor,
                                    AuditRecord.actor.startswith(actor + "@", autoescape=True)))
        if action:
            query = query.where(AuditRecord.action == action)
        query = query.order_by(AuditRecord.id.desc())
        if limit:
            query = query.limit(limit)
        with self.sessions() as session:
            rows = list(session.scalars(query))
        return [AuditEntry(id=r.id, at=r.at, actor=r.actor, action=r.action, target=r.target,
                           detail=r.detail or {}, client=r.client) for r in reversed(rows)]

    def change_token(self) -> tuple[int, int]:
        """Moves on every create and revoke, whoever made it and whenever it commits."""
        with self.engine.connect() as connection:
            count, total = connection.execute(
                select(func.count(ApiKey.id), func.coalesce(func.sum(ApiKey.revision), 0))).one()
        return int(count), int(total)

    def rows(self) -> list[ApiKey]:
        with self.sessions() as session:
            return list(session.scalars(select(ApiKey)))

    def touch(self, used: dict[str, datetime]) -> None:
        """Record ``last_used_at`` for keys (a batch from the serving processes; not a change)."""
        if not used:
            return
        with self.sessions.begin() as session:
            for key_id, at in used.items():
                session.execute(update(ApiKey).where(ApiKey.key_id == key_id).values(last_used_at=at))

    def verify(self, secret: str) -> Principal:
        """Check one key against the database (tools and tests; servers use ``KeyCache``)."""
        key_id = parse_key(secret)
        with self.sessions() as session:
            row = session.scalar(select(ApiKey).where(ApiKey.key_id == key_id))
        return _check(_entry(row) if row is not None else None, secret, time.time())


# -- the in-memory check -----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _Entry:
    secret_hash: str
    principal: Principal
    #: unix time; None: never
    expires: float | None
    revoked: bool


def _entry(row: ApiKey) -> _Entry:
    principal = Principal(row.name, Role.parse(row.role), tuple(row.models or ()), "key", row.key_id)
    expires = _utc(row.expires_at)
    return _Entry(row.secret_hash, principal, expires.timestamp() if expires else None, row.revoked_at is not None)


def _check(entry: _Entry | None, secret: str, now: float) -> Principal:
    presented = hash_secret(secret)
    # unknown id and wrong secret read the same: compare against a dummy so both take as long
    if not hmac.compare_digest(presented, entry.secret_hash if entry is not None else "0" * 64) or entry is None:
        raise Unauthenticated("invalid API key")
    # only a caller holding the right secret learns its state
    if entry.revoked:
        raise Unauthenticated(f"API key {entry.principal.name!r} was revoked")
    if entry.expires is not None and entry.expires <= now:
        raise Unauthenticated(f"API key {entry.principal.name!r} has expired")
    return entry.principal


class KeyCache:
    """Every key's hash and principal in memory; ``verify`` never touches the database.

    ``refresh()`` (every ~2 s from a ``Refresher``) reloads the snapshot when ``KeyStore.change_token``
    moved, and writes the keys' ``last_used_at`` at most every ``last_used_every_s`` (0: never).
    """

    def __init__(self, store: KeyStore, last_used_every_s: float = 60.0, load: bool = True):
        self.store = store
        self.last_used_every_s = last_used_every_s
        self._snapshot: dict[str, _Entry] = {}
        self._token: tuple[int, int] | None = None
        self._used: dict[str, float] = {}
        self._flushed = time.monotonic()
        self._lock = threading.Lock()  # one refresh at a time; verify takes no lock
        self.loaded = False
        if load:
            self.refresh()

    def __len__(self) -> int:
        return len(self._snapshot)

    def verify(self, secret: str) -> Principal:
        key_id = parse_key(secret)
        now = time.time()
        principal = _check(self._snapshot.get(key_id), secret, now)
        if self.last_used_every_s:
            self._used[key_id] = now
        return principal

    def refresh(self, force: bool = False) -> bool:
        """Reload when keys changed (or ``force``); True when the snapshot was replaced.
        Raises the database's error; the snapshot is kept then."""
        with self._lock:
            token = self.store.change_token()
            changed = force or token != self._token
            if changed:
                self._snapshot = {row.key_id: _entry(row) for row in self.store.rows()}
                self._token, self.loaded = token, True
            if self.last_used_every_s and time.monotonic() - self._flushed >= self.last_used_every_s:
                self.flush_last_used()
            return changed

    def flush_last_used(self) -> None:
        used, self._used = self._used, {}
        self._flushed = time.monotonic()
        if used:
            self.store.touch({k: datetime.fromtimestamp(t, UTC) for k, t in used.items()})


class Refresher:
    """A daemon thread calling ``refresh`` every ``interval_s`` until ``stop()``. A failing refresh is
    logged (once per outage, the error's type and the first line of its text: database errors carry no
    secrets, and keys never reach them) and retried; the last good snapshot keeps serving."""

    def __init__(self, refresh: Callable[[], object], interval_s: float = 2.0, name: str = "modelserve-auth-refresh"):
        self._refresh = refresh
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.failing = False

    def start(self) -> Refresher:
        self._thread.start()
        return self

    def stop(self, timeout: float | None = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._refresh()
            except Exception as exc:  # noqa: BLE001 - the thread must outlive any one failure
                if not self.failing:
                    first = str(getattr(exc, "orig", None) or exc).splitlines()[:1]
                    log.warning("credential refresh failed (%s: %s); keeping the last snapshot",
                                type(exc).__name__, first[0][:200] if first else "")
                self.failing = True
            else:
                if self.failing:
                    log.info("credential refresh works again")
                self.failing = False
