"""The server's audit log of management actions: who, when, what, from where, in ``audit_log``.

One ``AuditLog`` per server (``server/app.py``), on the key database (``ServerSettings.keys_url()``: the
``--keys-db``, else the ``--registry``, else the embedded SQLite registry), the same table ``modelserve
audit`` reads and key create/revoke write. The actions:

- ``model.load`` / ``model.unload``: repository load/unload over REST and gRPC;
- ``registry.register``, ``registry.delete_version``, ``alias.set``, ``alias.delete``, ``alias.promote``,
  ``alias.rollback``: the registry API (detail: version from/to, reason, force, …).

Every action the caller was *allowed* to try is recorded, with ``detail.ok`` true, or false and
``detail.error`` (the answer's message) when it failed: a refused move of a protected alias is worth
knowing. Calls refused by authentication or authorization (401/403) are not recorded, so that a flood of
bad credentials does not turn into database writes. ``actor`` is the caller's principal name (the key's
name, the JWT's subject, ``anonymous`` when authentication is off); ``detail`` adds its role and key id,
never a secret. ``client`` is the peer address (``127.0.0.1:53211``).

Management actions are rare and never on the inference path: each row is written at once, in a worker
thread (``asyncio.to_thread``), and awaited, so it is in the database when the answer leaves. The
action never fails because of the audit log: when the database cannot be written, a warning is logged
(once per outage), the row is kept in memory (up to ``max_pending``) and written with the next one.
The database is opened on the first action: a server nobody manages creates nothing. A database with
no schema at all (a new SQLite file) is migrated to head; an existing one is left as it is (a
schema without ``audit_log`` yields the warning: run ``modelserve audit`` once, which migrates).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator

from modelserve.errors import ModelServeError

log = logging.getLogger(__name__)

__all__ = ["AuditLog", "client_address"]


def client_address(peer: str | None) -> str | None:
    """``127.0.0.1:5000`` from a REST peer or gRPC's ``ipv4:127.0.0.1:5000`` (``[::1]:5000`` for IPv6)."""
    if not peer:
        return None
    for prefix in ("ipv4:", "ipv6:"):
        if peer.startswith(prefix):
            return peer[len(prefix):]
    return peer


def principal_detail(principal) -> dict:
    """What the audit row says about the caller beyond its name: role, source, key id (never a secret)."""
    detail = {"role": str(principal.role), "source": principal.source}
    if principal.key_id:
        detail["key_id"] = principal.key_id
    return detail


class AuditLog:
    """``await audit.record(actor, action, target, detail, client)``; ``close()`` on shutdown."""

    def __init__(self, url: str, max_pending: int = 1000):
        self.url = url
        self._engine = None
        self._sessions = None
        self._lock = threading.Lock()  # one writer thread at a time; the pending rows with it
        self._pending: deque = deque(maxlen=max_pending)
        self.failing = False
        self.written = 0

    # -- writing ------------------------------------------------------------------------------

    async def record(self, actor: str, action: str, target: str, detail: dict | None = None,
                     client: str | None = None) -> None:
        """Write one row (and any kept from an outage); never raises."""
        from modelserve.security.keys import utcnow

        # plain JSON now: one odd value must not make the row (and those kept with it) unwritable
        row = (utcnow(), actor, action, target, json.loads(json.dumps(detail or {}, default=str)), client)
        try:
            await asyncio.to_thread(self._write, row)
        except Exception as exc:  # noqa: BLE001 - the action must not fail for its record
            log.warning("audit log: unexpected %s while recording %s", type(exc).__name__, action)

    @contextlib.asynccontextmanager
    async def action(self, principal, action: str, target: str, detail: dict | None = None,
                     client: str | None = None) -> AsyncIterator[dict]:
        """Record ``action`` by ``principal`` once the block ends: ``ok`` true, or false with the error
        (which propagates). The block may add to the yielded ``detail`` (e.g. the version moved to)."""
        detail = {**(detail or {}), **principal_detail(principal)}
        try:
            yield detail
        except ModelServeError as exc:
            await self.record(principal.name, action, target, {**detail, "ok": False, "error": exc.message[:300]},
                              client)
            raise
        except Exception as exc:
            await self.record(principal.name, action, target,
                              {**detail, "ok": False, "error": f"{type(exc).__name__}"[:300]}, client)
            raise
        await self.record(principal.name, action, target, {**detail, "ok": True}, client)

    def _open(self) -> None:
        from sqlalchemy.orm import sessionmaker

        from modelserve.registry.db import current_revision, make_engine, migrate

        engine = make_engine(self.url)
        try:
            if current_revision(engine) is None:  # a new database: nothing to break, give it the schema
                logging.getLogger("alembic").setLevel(logging.WARNING)
                migrate(engine)
        except BaseException:
            engine.dispose()
            raise
        self._engine, self._sessions = engine, sessionmaker(engine)

    def _write(self, row: tuple | None) -> None:
        from modelserve.security.schema import AuditRecord

        with self._lock:
            if row is not None:
                self._pending.append(row)
            if not self._pending:
                return
            try:
                if self._engine is None:
                    self._open()
                with self._sessions.begin() as session:  # the kept rows and this one, in one transaction
                    for at, actor, action, target, detail, client in self._pending:
                        session.add(AuditRecord(at=at, actor=(actor or "unknown")[:200], action=action[:60],
                                                target=(target or "")[:200], detail=detail,
                                                client=client[:200] if client else None))
            except Exception as exc:  # noqa: BLE001 - kept for the next try; the action goes on
                if not self.failing:
                    from modelserve.registry.db import safe_url

                    first = str(getattr(exc, "orig", None) or exc).splitlines()[:1]
                    log.warning("audit log: cannot write to %s (%s: %s); keeping the record(s) in memory and "
                                "retrying with the next one", safe_url(self.url), type(exc).__name__,
                                first[0][:200] if first else "")
                self.failing = True
                return
            if self.failing:
                log.info("audit log: writing again (%d record(s) caught up)", len(self._pending))
            self.written += len(self._pending)
            self.failing = False
            self._pending.clear()

    def close(self) -> None:
        """Try once more to write what an outage kept, then release the database."""
        if self._pending:
            self._write(None)
            if self._pending:
                log.warning("audit log: %d record(s) could not be written", len(self._pending))
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
