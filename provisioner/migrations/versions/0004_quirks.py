"""Learned quirks of each target, and one group link per SCIM group.

``target_quirk``: what a target was learned to deviate in (a 501, a failed
read-back), kept across restarts. ``ux_group_link_scim_id``: two group
definitions racing to adopt one existing group cannot both link it. A state
file adopted at the baseline may already hold both (``create_all`` and the
start-up index check made them before migrations): they are created only
when missing.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from provisioner.migrations import idempotent

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    idempotent.create_table(
        "target_quirk",
        sa.Column("target", sa.String(), nullable=False),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("value", sa.String(), nullable=False),
        sa.Column("reason", sa.String(), nullable=False),
        sa.Column("learned_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("target", "name"),
    )
    idempotent.create_index("ux_group_link_scim_id", "group_link", ["target", "scim_id"], unique=True)


def downgrade() -> None:
    op.drop_index("ux_group_link_scim_id", table_name="group_link")
    op.drop_table("target_quirk")
