"""Schema operations that leave what is already there alone.

Before migrations existed, ``create_all`` added new tables (and some code
added new indexes) to existing state files on start. A state file adopted at
the baseline may therefore already hold what a later revision creates: those
revisions use these instead of the plain ``op`` calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op


def create_table(name: str, *columns: Any) -> bool:
    """``op.create_table`` unless the table exists; True when it was created."""
    if name in sa.inspect(op.get_bind()).get_table_names():
        return False
    op.create_table(name, *columns)
    return True


def create_index(name: str, table: str, columns: Sequence[str], *, unique: bool = False) -> None:
    """``op.create_index`` unless the table has an index of that name."""
    if name in {index["name"] for index in sa.inspect(op.get_bind()).get_indexes(table)}:
        return
    op.create_index(name, table, list(columns), unique=unique)


def add_column(table: str, column: sa.Column[Any]) -> None:
    """``add_column`` (in batch mode, for SQLite) unless the table has a column of that name."""
    if column.name in {c["name"] for c in sa.inspect(op.get_bind()).get_columns(table)}:
        return
    with op.batch_alter_table(table) as batch_op:
        batch_op.add_column(column)
