"""An index in the order claims take operations, over the rows they can take.

``ix_operation_claim``: (target, coalesce(next_attempt_at, created_at), id)
where status is pending, retry_wait or running. A claim walks it from the
start and stops once it has its rows, instead of sorting every open row of the
queue at every claim.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

CLAIMABLE = "status IN ('pending', 'retry_wait', 'running')"


def upgrade() -> None:
    if "ix_operation_claim" in {index["name"] for index in sa.inspect(op.get_bind()).get_indexes("operation")}:
        return
    op.create_index(
        "ix_operation_claim",
        "operation",
        ["target", sa.text("coalesce(next_attempt_at, created_at)"), "id"],
        postgresql_where=sa.text(CLAIMABLE),
        sqlite_where=sa.text(CLAIMABLE),
    )


def downgrade() -> None:
    op.drop_index("ix_operation_claim", table_name="operation")
