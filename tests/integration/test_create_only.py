"""`when: create` and secret attributes, end to end against a real SCIM server.

A first password is sent when the account is created, never on an update or
an adoption, and no change of it alone makes an update. It is never kept in
clear where we store or show an account (account_link.applied, queue show,
queue list --json, preview).
"""

from __future__ import annotations

import json
from typing import Any

from tests.conftest import HR_COLUMNS, ScimReader, Workspace, hr_row
from tests.conftest import write_csv as write_hr_csv
from tests.integration.test_cli import provisioner

SECRET = "Initial-Pa55word!"


def setup(workspace: Workspace, rows: list[dict[str, Any]]) -> None:
    text = workspace.mapping_path.read_text()
    workspace.mapping_path.write_text(
        text.replace("attributes:\n", "attributes:\n  password:\n    value: initial_password\n    when: create\n"
                     "  nickName:\n    value: nick\n    default: \"'none'\"\n", 1)  # fmt: skip
    )
    write_csv(workspace.source_path, rows)


def write_csv(path: Any, rows: list[dict[str, str]]) -> None:
    write_hr_csv(path, rows, [*HR_COLUMNS, "initial_password", "nick"])


def row(title: str = "Engineer", password: str = SECRET, nick: str = "") -> dict[str, str]:
    return {**hr_row("E1001", "Ada", "Lovelace", title=title), "initial_password": password, "nick": nick}


def bodies(workspace: Workspace) -> list[tuple[str, dict[str, Any]]]:
    calls = workspace.query("SELECT method, request_body FROM attempt ORDER BY id")
    return [(method, json.loads(body)) for method, body in calls if body and method in ("POST", "PUT", "PATCH")]


def test_a_create_only_password_is_sent_on_create_and_never_on_update(workspace: Workspace, scim: ScimReader) -> None:
    setup(workspace, [row()])

    assert provisioner(workspace, "sync").returncode == 0
    [(method, created)] = bodies(workspace)
    assert method == "POST" and created["password"] == "***"  # sent, and masked in the call log
    assert created["nickName"] == "none"  # the default of an empty value

    # The password alone changing makes no operation; another attribute makes an update without it.
    write_csv(workspace.source_path, [row(password="Changed-Pa55word!")])
    assert provisioner(workspace, "sync").returncode == 0
    assert len(bodies(workspace)) == 1
    write_csv(workspace.source_path, [row(title="Principal Engineer", password="Changed-Pa55word!")])
    assert provisioner(workspace, "sync").returncode == 0
    [_, (method, update)] = bodies(workspace)
    assert method in ("PUT", "PATCH") and "password" not in json.dumps(update)
    assert scim.user("ada.lovelace@example.com")["title"] == "Principal Engineer"


def test_a_password_is_never_kept_or_shown_in_clear(workspace: Workspace, scim: ScimReader) -> None:
    setup(workspace, [row()])

    preview = provisioner(workspace, "preview", "E1001")
    assert provisioner(workspace, "sync").returncode == 0
    [[applied]] = workspace.query("SELECT applied FROM account_link")
    [op] = workspace.operations()
    shown = provisioner(workspace, "queue", "show", str(op["id"]), "--json")
    listed = provisioner(workspace, "queue", "list", "--json")

    for text in (preview.stdout, applied, shown.stdout, listed.stdout):
        assert SECRET not in text
    assert json.loads(preview.stdout)["payload"]["password"] == "***"
    assert "password" not in json.loads(applied)  # create-only: not part of what an update compares
    payload = json.loads(shown.stdout)["payload"]
    assert (json.loads(payload) if isinstance(payload, str) else payload)["password"] == "***"
