"""Payload log and feedback tables (``modelserve.monitor.schema``).

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_tz = sa.DateTime(timezone=True)
_id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "payload_log",
        sa.Column("id", _id, primary_key=True, autoincrement=True),
        sa.Column("uid", sa.String(32), nullable=False, unique=True),
        sa.Column("request_id", sa.String(200), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("version", sa.String(40), nullable=True),
        sa.Column("protocol", sa.String(20), nullable=False),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("latency_ms", sa.Float, nullable=False),
        sa.Column("client", sa.String(200), nullable=True),
        sa.Column("at", _tz, nullable=False),
        sa.Column("inputs", sa.JSON, nullable=True),
        sa.Column("outputs", sa.JSON, nullable=True),
        sa.Column("prediction", sa.JSON, nullable=True),
    )
    op.create_index("ix_payload_log_request_id", "payload_log", ["request_id"])
    op.create_index("ix_payload_log_model_at", "payload_log", ["model", "at"])
    op.create_table(
        "feedback",
        sa.Column("id", _id, primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.String(200), nullable=False, unique=True),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("version", sa.String(40), nullable=True),
        sa.Column("ground_truth", sa.JSON, nullable=True),
        sa.Column("prediction", sa.JSON, nullable=True),
        sa.Column("at", _tz, nullable=False),
        sa.Column("samples", sa.Integer, nullable=False),
        sa.Column("correct", sa.Integer, nullable=True),
        sa.Column("abs_error", sa.Float, nullable=True),
        sa.Column("sq_error", sa.Float, nullable=True),
    )
    op.create_index("ix_feedback_model", "feedback", ["model"])


def downgrade() -> None:
    op.drop_table("feedback")
    op.drop_table("payload_log")
