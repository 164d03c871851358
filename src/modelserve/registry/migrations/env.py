"""Alembic environment: the connection comes from ``modelserve.registry.db.migrate`` (no alembic.ini)."""

from alembic import context

from modelserve.registry.schema import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
