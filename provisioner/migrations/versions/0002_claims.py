"""Claims name their instance; the schema version lives in alembic_version alone.

``operation.claimed_by``: the instance (``daemon.instance``) that claimed a
row, so that several daemons on one database take back only rows whose lease
has expired, never each other's live ones. ``schema_info`` is dropped: Alembic
keeps the version now.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from provisioner.migrations import idempotent

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    idempotent.add_column("operation", sa.Column("claimed_by", sa.String(), nullable=True))
    if "schema_info" in sa.inspect(op.get_bind()).get_table_names():
        op.drop_table("schema_info")


def downgrade() -> None:
    op.create_table(
        "schema_info",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.bulk_insert(sa.table("schema_info", sa.column("id"), sa.column("version")), [{"id": 1, "version": 1}])
    with op.batch_alter_table("operation") as batch_op:
        batch_op.drop_column("claimed_by")
