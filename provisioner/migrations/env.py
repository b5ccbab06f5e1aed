"""Alembic's entry point: runs migrations on the connection the store hands over (never a URL of its own)."""

from __future__ import annotations

from alembic import context

from provisioner.store import metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata(),
    # SQLite alters a table by copying it; batch mode does that for us.
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
