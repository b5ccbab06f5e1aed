"""What each identity's record last rendered to, so that any cycle skips records unchanged since.

``rendered_record``: per target and identity, a digest of the record keyed
with the mapping's digest, the payload hash it rendered to, its match value
and the SCIM ids its references resolved to (``planner.RenderMemo``). A new
table: an empty one only means every record is rendered once more.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from provisioner.migrations import idempotent

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    idempotent.create_table(
        "rendered_record",
        sa.Column("target", sa.String(), nullable=False),
        sa.Column("identity_key", sa.String(), nullable=False),
        sa.Column("digest", sa.String(), nullable=False),
        sa.Column("payload_hash", sa.String(), nullable=True),
        sa.Column("match_value", sa.String(), nullable=True),
        sa.Column("refs", sa.String(), nullable=True),
        sa.PrimaryKeyConstraint("target", "identity_key"),
    )


def downgrade() -> None:
    op.drop_table("rendered_record")
