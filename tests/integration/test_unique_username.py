"""unique_username(), end to end against a real SCIM server: a userName nobody else holds, chosen on create."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from provisioner.cli import main
from provisioner.payload import loads
from tests.conftest import ScimReader, Workspace, hr_row
from tests.faultproxy import fault_proxy  # noqa: F401 - a fixture, found by name

EXPRESSION = """  userName: "unique_username(lower(join('.', first_name, last_name)), '@example.com')"\n"""


def setup(workspace: Workspace) -> None:
    text = workspace.mapping_path.read_text()
    workspace.mapping_path.write_text(text.replace("  userName: email | lower\n", EXPRESSION, 1))


def someone_else(scim: ScimReader, user_name: str) -> str:
    """An account the engine knows nothing of, made in the target by hand."""
    response = scim.http.post("Users", json={"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
                                             "userName": user_name})  # fmt: skip
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def test_a_joiner_whose_username_is_taken_gets_the_next_numbered_one(workspace: Workspace, scim: ScimReader) -> None:
    setup(workspace)
    someone_else(scim, "Jane.Doe@example.com")  # taken whatever its case (RFC 7643 §4.1.1)
    workspace.write_source([hr_row("E1", "Jane", "Doe")])

    report = workspace.sync_now()

    assert report.done["create"] == 1 and report.failed == 0
    mine = scim.user("jane.doe2@example.com")
    assert mine["externalId"] == "E1"
    assert scim.user("Jane.Doe@example.com").get("externalId") is None  # the other account, untouched
    # The choice is in the queue row: a retry would send the same userName.
    [[payload]] = workspace.query("SELECT payload FROM operation WHERE kind = 'create'")
    assert loads(payload)["userName"].chosen == "jane.doe2@example.com"
    lookups = [url for (url,) in workspace.query("SELECT url FROM attempt WHERE method = 'GET'") if "filter" in url]
    filters = [httpx.URL(url).params.get("filter") for url in lookups]
    assert filters == ['userName eq "jane.doe@example.com"', 'userName eq "jane.doe2@example.com"']


def test_two_joiners_rendering_the_same_username_in_one_cycle_get_two(workspace: Workspace, scim: ScimReader) -> None:
    setup(workspace)
    someone_else(scim, "jane.doe@example.com")
    workspace.write_source([hr_row("E1", "Jane", "Doe"), hr_row("E2", "Jane", "Doe", title="Nurse")])

    report = workspace.sync_now()

    assert report.done["create"] == 2 and report.failed == 0 and report.rejected == 0
    mine = {user["externalId"]: user["userName"] for user in scim.all() if user.get("externalId")}
    assert sorted(mine.values()) == ["jane.doe2@example.com", "jane.doe3@example.com"]


def test_an_existing_account_keeps_its_username(
    workspace: Workspace, scim: ScimReader, capsys: pytest.CaptureFixture[str]
) -> None:
    setup(workspace)
    workspace.write_source([hr_row("E1", "Jane", "Doe")])
    capsys.readouterr()
    assert main(["plan", "--config", str(workspace.config_path), "--json"]) == 0
    [joiner] = json.loads(capsys.readouterr().out)[0]["operations"]
    assert joiner["userName"] == "unique_username(jane.doe, @example.com): the first one free, chosen when the account is created"
    workspace.sync_now()

    # The name it was chosen from changes and the free one would now be different: the account keeps its own.
    someone_else(scim, "jane.smith@example.com")
    workspace.write_source([hr_row("E1", "Jane", "Smith", title="Lead")])
    assert main(["plan", "--config", str(workspace.config_path), "--json"]) == 0
    [mover] = json.loads(capsys.readouterr().out)[0]["operations"]
    assert mover["userName"] == "jane.doe@example.com" and "userName" not in mover["changes"]
    report = workspace.sync_now()
    again = workspace.sync_now()

    assert report.done["update"] == 1 and report.failed == 0
    assert again.unchanged == 1 and not again.done
    user = scim.user("jane.doe@example.com")
    assert user["title"] == "Lead" and user["name"]["familyName"] == "Smith"
    sent = [json.loads(body) for (body,) in workspace.query("SELECT request_body FROM attempt WHERE method IN ('PATCH', 'PUT')")]
    assert "unique" not in json.dumps(sent)


def test_a_create_whose_answer_is_lost_keeps_its_choice_and_makes_no_second_account(
    workspace: Workspace, scim: ScimReader, fault_proxy: Any
) -> None:
    """The POST is applied, its answer lost: the engine finds the account it made, never tries jane.doe3."""
    setup(workspace)
    someone_else(scim, "jane.doe@example.com")
    proxy = fault_proxy(workspace.server.base_url, rate=1.0, kinds={"lost_response": 1}, max_faults=1,
                        applies_to=lambda method, path: method == "POST" and "/Users" in path)  # fmt: skip
    workspace.config_path.write_text(workspace.config_path.read_text().replace(workspace.server.base_url, proxy.base_url))
    workspace.write_source([hr_row("E1", "Jane", "Doe")])

    report = workspace.sync_now()

    assert proxy.stats.faults["lost_response"] == 1
    assert report.done["create"] == 1 and report.failed == 0
    assert sorted(user["userName"] for user in scim.all()) == ["jane.doe2@example.com", "jane.doe@example.com"]
    assert scim.user("jane.doe2@example.com")["externalId"] == "E1"
