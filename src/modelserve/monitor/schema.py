"""The payload log's tables (SQLAlchemy 2 declarative); Alembic revision 0003 creates them.

Kept on their own metadata: the monitor may live in the registry's database or in its own, and
nothing in the registry refers to these rows.

- ``payload_log``: one row per logged request, success or failure. ``uid`` is the writer's key for the
  row: a batch that is retried or replayed from the spill file after a crash inserts nothing twice;
- ``feedback``: one row per request id given ground truth, with how the prediction scored (counts and
  error sums over the request's batch rows, so accuracy and MAE add up across rows and requests).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, BigInteger, DateTime, Float, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

#: SQLite only autoincrements an INTEGER PRIMARY KEY; elsewhere ids are 64-bit
BigId = BigInteger().with_variant(Integer(), "sqlite")


class MonitorBase(DeclarativeBase):
    pass


class PayloadRecord(MonitorBase):
    __tablename__ = "payload_log"
    __table_args__ = (Index("ix_payload_log_model_at", "model", "at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    uid: Mapped[str] = mapped_column(String(32), unique=True)
    request_id: Mapped[str] = mapped_column(String(200), index=True)
    model: Mapped[str] = mapped_column(String(200))
    version: Mapped[str | None] = mapped_column(String(40), nullable=True)
    protocol: Mapped[str] = mapped_column(String(20))
    #: HTTP-style: 200, 400, 404, 429, 500, 503, ...; 499 when the client went away
    status: Mapped[int] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    latency_ms: Mapped[float] = mapped_column(Float)
    client: Mapped[str | None] = mapped_column(String(200), nullable=True)
    #: indexed with ``model`` only: every index is paid on each insert, and queries name a model or scan
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    #: {name: values} for small tensors, {name: {"summary": true, shape, dtype, mean, std, min, max, sha256}}
    inputs: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    outputs: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    #: what feedback is scored against: {"kind": "class"|"value", "values": [...], "labels": [...]}
    prediction: Mapped[dict | None] = mapped_column(JSON, nullable=True)


class FeedbackRecord(MonitorBase):
    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(200), unique=True)
    model: Mapped[str] = mapped_column(String(200), index=True)
    version: Mapped[str | None] = mapped_column(String(40), nullable=True)
    ground_truth: Mapped[dict | list | str | int | float | None] = mapped_column(JSON, nullable=True)
    prediction: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    #: batch rows scored
    samples: Mapped[int] = mapped_column(Integer)
    #: classification: rows predicted right; None for regression
    correct: Mapped[int | None] = mapped_column(Integer, nullable=True)
    #: regression: sums over the rows of |error| and error²; None for classification
    abs_error: Mapped[float | None] = mapped_column(Float, nullable=True)
    sq_error: Mapped[float | None] = mapped_column(Float, nullable=True)
