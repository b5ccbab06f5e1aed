"""A SQL source end to end: `check` knows its columns, `sync` provisions its rows, mistakes exit 3 in one line."""

from __future__ import annotations

import sqlite3

import pytest

from provisioner.errors import SourceError
from tests.conftest import HR_COLUMNS, ScimReader, Workspace, hr_row
from tests.integration.test_cli import line_of, provisioner


def sql_workspace(workspace: Workspace, rows: list[dict[str, str]], source: str | None = None) -> None:
    """The workspace's target fed by a SQLite HR database (hr.db, relative to the config) instead of hr.csv."""
    with sqlite3.connect(workspace.root / "hr.db") as conn:
        conn.execute(f"CREATE TABLE people ({', '.join(f'{c} TEXT' for c in HR_COLUMNS)})")
        conn.executemany(f"INSERT INTO people VALUES ({', '.join('?' for _ in HR_COLUMNS)})",
                         [tuple(row[c] for c in HR_COLUMNS) for row in rows])  # fmt: skip
    source = source or "    url: sqlite:///hr.db\n    query: SELECT * FROM people WHERE status != 'draft'\n"
    text = workspace.config_path.read_text(encoding="utf-8")
    text = text.replace(f"    type: csv\n    path: {workspace.source_path.name}\n", f"    type: sql\n{source}")
    workspace.config_path.write_text(text, encoding="utf-8")


ADA = hr_row("E1001", "Ada", "Lovelace")
GRACE = hr_row("E1002", "Grace", "Hopper")


def test_check_and_sync_provision_the_query_rows(workspace: Workspace, scim: ScimReader) -> None:
    sql_workspace(workspace, [ADA, GRACE, hr_row("E1003", "Draft", "Row", status="draft")])

    checked = provisioner(workspace, "check")
    synced = provisioner(workspace, "sync")

    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert synced.returncode == 0, synced.stdout + synced.stderr
    assert sorted(user["userName"] for user in scim.all()) == ["ada.lovelace@example.com", "grace.hopper@example.com"]


def test_check_names_a_mapped_column_the_query_does_not_return(workspace: Workspace) -> None:
    sql_workspace(workspace, [ADA], "    url: sqlite:///hr.db\n    query: SELECT employee_id, first_name, "
                  "last_name, email AS mail, status, department FROM people\n")  # fmt: skip

    checked = provisioner(workspace, "check")

    assert checked.returncode == 3, checked.stdout + checked.stderr
    assert f"sqlite:///{workspace.root / 'hr.db'} has no column 'email' (did you mean 'mail'?)" in checked.stderr
    assert "Traceback" not in checked.stderr


def test_a_sql_source_without_a_query_exits_3_in_one_line_naming_file_line_and_key(workspace: Workspace) -> None:
    sql_workspace(workspace, [ADA], "    url: sqlite:///hr.db\n")

    result = provisioner(workspace, "check")

    assert result.returncode == 3, result.stdout + result.stderr
    where = f"{workspace.config_path}:{line_of(workspace.config_path, 'hr:')}"
    assert result.stderr.strip() == f"error: {where}: sources.hr.query: required key is missing"


def test_a_query_that_fails_is_reported_by_check_and_refused_by_sync(workspace: Workspace, scim: ScimReader) -> None:
    sql_workspace(workspace, [ADA], "    url: sqlite:///hr.db\n    query: SELECT * FROM persons\n")

    checked = provisioner(workspace, "check")
    planned = provisioner(workspace, "plan")
    with pytest.raises(SourceError, match="no such table: persons"):
        workspace.sync_now()

    where = f"{workspace.config_path}:{line_of(workspace.config_path, 'query:')}: sources.hr.query"
    assert checked.returncode == 3 and f"{where}: no such table: persons\n" in checked.stderr
    assert planned.returncode == 3 and planned.stderr.endswith(f"error: {where}: no such table: persons\n")
    assert "Traceback" not in checked.stderr + planned.stderr
    assert scim.all() == []


def test_a_database_that_is_not_there_is_named_at_the_url_line(workspace: Workspace) -> None:
    sql_workspace(workspace, [ADA], "    url: sqlite:///gone.db\n    query: SELECT * FROM people\n")

    checked = provisioner(workspace, "check")

    where = f"{workspace.config_path}:{line_of(workspace.config_path, 'url:')}: sources.hr.url"
    assert checked.returncode == 3, checked.stdout + checked.stderr
    assert f"{where}: no such database file: {workspace.root / 'gone.db'}\n" in checked.stderr
    assert "Traceback" not in checked.stderr
