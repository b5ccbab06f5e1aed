"""Where delta reads of a SCIM source stand, per target.

``source_watermark``: per target and source, the highest ``meta.lastModified``
seen and when the last full read was queued. A new table: an empty one only
means the next cycle reads the source in full.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from provisioner.migrations import idempotent

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    idempotent.create_table(
        "source_watermark",
        sa.Column("target", sa.String(), nullable=False),
        sa.Column("source", sa.String(), nullable=False),
        sa.Column("watermark", sa.String(), nullable=True),
        sa.Column("full_read_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("target", "source"),
    )


def downgrade() -> None:
    op.drop_table("source_watermark")
