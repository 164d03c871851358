"""API keys and the audit log (SQLAlchemy 2 declarative); Alembic revision 0004 creates them.

Kept on their own metadata (like ``modelserve.monitor.schema``): they live in the registry's database
but nothing in the registry refers to them.

- ``api_keys``: one row a key ever created. Only the SHA-256 of the secret is stored, with the public
  id (the ``ms_<id>_`` prefix) to find it. ``name`` is unique among keys not revoked (a partial unique
  index). ``revision`` grows on every change of the row: ``count(*), sum(revision)`` is the cheap
  change check the serving processes poll (it cannot stand still across a change, whatever the
  clocks of the writers or the order their transactions commit in). ``last_used_at`` is written in
  batches by the servers and does not count as a change;
- ``audit_log``: append-only: who (``actor``), when, what (``action``, ``target``, ``detail``) and from
  where (``client``). Never a secret or a hash.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, BigInteger, DateTime, Index, Integer, String, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

#: SQLite only autoincrements an INTEGER PRIMARY KEY; elsewhere ids are 64-bit
BigId = BigInteger().with_variant(Integer(), "sqlite")
_NOT_REVOKED = text("revoked_at IS NULL")


class SecurityBase(DeclarativeBase):
    pass


class ApiKey(SecurityBase):
    __tablename__ = "api_keys"
    __table_args__ = (
        Index("uq_api_keys_active_name", "name", unique=True,
              sqlite_where=_NOT_REVOKED, postgresql_where=_NOT_REVOKED),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    #: the public part of the secret (``ms_<key_id>_…``): how a presented key is found
    key_id: Mapped[str] = mapped_column(String(16), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    #: sha256 of the whole secret, hex
    secret_hash: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(20))
    #: fnmatch globs; ["*"]: every model
    models: Mapped[list] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    created_by: Mapped[str] = mapped_column(String(200))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    revoked_by: Mapped[str | None] = mapped_column(String(200), nullable=True)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    revision: Mapped[int] = mapped_column(Integer, default=1)


class AuditRecord(SecurityBase):
    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    actor: Mapped[str] = mapped_column(String(200), index=True)
    #: ``key.create``, ``key.revoke``, …
    action: Mapped[str] = mapped_column(String(60))
    target: Mapped[str] = mapped_column(String(200))
    detail: Mapped[dict] = mapped_column(JSON, default=dict)
    #: where the change came from: ``cli@host``, a client address
    client: Mapped[str | None] = mapped_column(String(200), nullable=True)
