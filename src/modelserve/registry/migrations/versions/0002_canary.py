"""Canary split on aliases: a second version, its share of traffic, an optional sticky header.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("aliases") as batch:
        batch.add_column(sa.Column("canary_version_id", sa.Integer, nullable=True))
        batch.add_column(sa.Column("canary_weight", sa.Float, nullable=False, server_default="0"))
        batch.add_column(sa.Column("sticky_header", sa.String(100), nullable=True))
        batch.create_foreign_key("fk_alias_canary_version", "model_versions", ["canary_version_id"], ["id"])


def downgrade() -> None:
    with op.batch_alter_table("aliases") as batch:
        batch.drop_constraint("fk_alias_canary_version", type_="foreignkey")
        batch.drop_column("sticky_header")
        batch.drop_column("canary_weight")
        batch.drop_column("canary_version_id")
