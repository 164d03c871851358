"""The registry's tables (SQLAlchemy 2 declarative). Alembic owns their creation: see ``migrations/``.

- ``registered_models``: one row a model name;
- ``model_versions``: numbered per model, each pointing at one content-addressed artifact, with its
  signature, metrics and lineage (the parent version and the step that made it);
- ``aliases``: a name (``production``, ``staging``, …) pointing at a version, optionally splitting a
  share of traffic to a canary version; protected aliases need force and a reason to move;
- ``history``: an append-only record of every change (who, when, what, from, to, why). Its largest id
  is what serving processes poll to notice a change made anywhere.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class RegisteredModel(Base):
    __tablename__ = "registered_models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    created_by: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    versions: Mapped[list[ModelVersion]] = relationship(
        back_populates="model", order_by="ModelVersion.number", foreign_keys="ModelVersion.model_id")
    aliases: Mapped[list[Alias]] = relationship(back_populates="model", order_by="Alias.name")


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("model_id", "number", name="uq_version_number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("registered_models.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    format: Mapped[str] = mapped_column(String(40))
    artifact_uri: Mapped[str] = mapped_column(Text)
    filename: Mapped[str] = mapped_column(String(200))
    digest: Mapped[str] = mapped_column(String(64))  # sha256, hex
    size: Mapped[int] = mapped_column(BigInteger)
    signature: Mapped[dict] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)
    tags: Mapped[dict] = mapped_column(JSON, default=dict)
    #: the model config (the server's config.yaml fields) served with this version, if any
    config: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    description: Mapped[str] = mapped_column(Text, default="")
    created_by: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # lineage: the version this one was derived from, and how
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id", ondelete="SET NULL"), nullable=True)
    step: Mapped[str | None] = mapped_column(String(40), nullable=True)
    step_params: Mapped[dict] = mapped_column(JSON, default=dict)

    model: Mapped[RegisteredModel] = relationship(back_populates="versions", foreign_keys=[model_id])
    parent: Mapped[ModelVersion | None] = relationship(remote_side=[id])


class Alias(Base):
    __tablename__ = "aliases"
    __table_args__ = (UniqueConstraint("model_id", "name", name="uq_alias_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("registered_models.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(100))
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    protected: Mapped[bool] = mapped_column(Boolean, default=False)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # canary split (revision 0002): this share of requests goes to the canary version
    canary_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"), nullable=True)
    canary_weight: Mapped[float] = mapped_column(Float, default=0.0)
    #: requests carrying the same value of this header always reach the same version
    sticky_header: Mapped[str | None] = mapped_column(String(100), nullable=True)

    model: Mapped[RegisteredModel] = relationship(back_populates="aliases")
    version: Mapped[ModelVersion] = relationship(foreign_keys=[version_id])
    canary_version: Mapped[ModelVersion | None] = relationship(foreign_keys=[canary_version_id])


class HistoryEntry(Base):
    __tablename__ = "history"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    actor: Mapped[str] = mapped_column(String(200), default="")
    #: register, alias_set, promote, rollback, alias_delete, protect, unprotect, delete_version, delete_model
    action: Mapped[str] = mapped_column(String(40))
    model: Mapped[str] = mapped_column(String(200), index=True)
    alias: Mapped[str | None] = mapped_column(String(100), nullable=True)
    from_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    to_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    details: Mapped[dict] = mapped_column(JSON, default=dict)
