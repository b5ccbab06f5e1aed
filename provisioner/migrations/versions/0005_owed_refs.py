"""What an account owes: attributes written without a reference that named no account yet.

``account_link.owed_refs``: a report created before its manager's account
existed was written without ``manager``; the link keeps that attribute, with
its reference, until a later write to the account (an update, or a leaver's
disable) sends it.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from provisioner.migrations import idempotent

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    idempotent.add_column("account_link", sa.Column("owed_refs", sa.String(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("account_link") as batch_op:
        batch_op.drop_column("owed_refs")
