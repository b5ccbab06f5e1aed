"""`omit_if_empty`, end to end against a real SCIM server: an empty value is no order to clear.

Without the option an attribute whose record value goes empty is removed from
the account (the source is the authority); with it, the attribute is left out
of what is sent and the value the target holds stays.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from provisioner.cli import main
from tests.conftest import ENTERPRISE, ScimReader, Workspace, hr_row

OPTIONS = """  title:
    value: title
    omit_if_empty: true
"""


def setup(workspace: Workspace) -> None:
    text = workspace.mapping_path.read_text()
    text = text.replace("  title: title\n", OPTIONS, 1)
    text = text.replace("    division: division\n", "    division:\n      value: division\n      omit_if_empty: true\n", 1)
    workspace.mapping_path.write_text(text)


def writes(workspace: Workspace) -> list[tuple[str, dict[str, Any]]]:
    calls = workspace.query("SELECT method, request_body FROM attempt ORDER BY id")
    return [(method, json.loads(body)) for method, body in calls if body and method in ("POST", "PUT", "PATCH")]


def ada(**columns: str) -> dict[str, str]:
    return hr_row("E1001", "Ada", "Lovelace", **columns)


def test_an_empty_value_is_not_sent_on_create(workspace: Workspace, scim: ScimReader) -> None:
    setup(workspace)
    workspace.write_source([ada(title="", division="")])

    report = workspace.sync_now()

    assert report.done["create"] == 1
    [(method, body)] = writes(workspace)
    assert method == "POST" and "title" not in body and "division" not in body[ENTERPRISE]
    assert "title" not in scim.user("ada.lovelace@example.com")


def test_an_update_leaves_the_targets_value_where_the_record_went_empty(workspace: Workspace, scim: ScimReader) -> None:
    setup(workspace)
    workspace.write_source([ada(title="Engineer", division="R&D", cost_center="CC-100")])
    workspace.sync_now()

    # cost_center (no option) goes empty too: it is cleared, while title and division stay.
    workspace.write_source([ada(title="", division="", cost_center="", department="Research")])
    report = workspace.sync_now()

    assert report.done["update"] == 1 and report.failed == 0
    method, body = writes(workspace)[-1]
    sent = json.dumps(body)
    assert method in ("PATCH", "PUT")
    if method == "PATCH":
        assert {"op": "remove", "path": f"{ENTERPRISE}:costCenter"} in body["Operations"]
        assert "title" not in sent and "division" not in sent
    user = scim.user("ada.lovelace@example.com")
    assert user["title"] == "Engineer"
    assert user[ENTERPRISE]["division"] == "R&D"
    assert user[ENTERPRISE]["department"] == "Research"
    assert "costCenter" not in user[ENTERPRISE]


def test_only_omitted_values_going_empty_sends_nothing_and_a_new_value_is_sent(
    workspace: Workspace, scim: ScimReader, capsys: pytest.CaptureFixture[str]
) -> None:
    setup(workspace)
    workspace.write_source([ada(title="Engineer")])
    workspace.sync_now()

    workspace.write_source([ada(title="")])
    capsys.readouterr()
    assert main(["plan", "--config", str(workspace.config_path), "--json"]) == 0
    [planned] = json.loads(capsys.readouterr().out)
    # Not an update: the target keeps its title, and nothing else changed.
    assert planned["operations"] == []
    assert (planned["counts"]["update"], planned["counts"]["unchanged"]) == (0, 1)
    report = workspace.sync_now()
    again = workspace.sync_now()

    assert len(writes(workspace)) == 1  # the POST only
    assert report.failed == 0 and again.unchanged == 1
    assert (report.summary()["updated"], report.summary()["unchanged"]) == (0, 1)
    [note] = [n for (n,) in workspace.query("SELECT note FROM operation WHERE kind = 'update'")]
    assert note == "kept title (omit_if_empty); nothing to send"
    assert scim.user("ada.lovelace@example.com")["title"] == "Engineer"

    workspace.write_source([ada(title="Principal Engineer")])
    workspace.sync_now()
    assert scim.user("ada.lovelace@example.com")["title"] == "Principal Engineer"
