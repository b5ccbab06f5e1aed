"""Reconciliation's tables: its runs, and the accounts no identity owns.

A state file adopted at the baseline may already hold them (``create_all``
added new tables on start before migrations): they are created only when missing.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from provisioner.migrations import idempotent

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    idempotent.create_table(
        "reconcile_run",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("target", sa.String(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("counts", sa.String(), nullable=True),
        sa.Column("drifted", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    idempotent.create_index("ix_reconcile_run_target", "reconcile_run", ["target"])
    idempotent.create_table(
        "unmatched_account",
        sa.Column("target", sa.String(), nullable=False),
        sa.Column("scim_id", sa.String(), nullable=False),
        sa.Column("user_name", sa.String(), nullable=True),
        sa.Column("first_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("target", "scim_id"),
    )


def downgrade() -> None:
    op.drop_table("unmatched_account")
    op.drop_index("ix_reconcile_run_target", table_name="reconcile_run")
    op.drop_table("reconcile_run")
