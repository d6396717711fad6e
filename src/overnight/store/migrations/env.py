"""Alembic environment: overnight passes its own connection in (Database.migrate)."""

from alembic import context

from overnight.store.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - only via `alembic` CLI, which overnight does not use
    raise RuntimeError("run migrations through overnight.store.SqlStore.migrate()")

context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
