"""Deleting groups goes through the member brake, against a real SCIM server (scim2-server over HTTP).

With ``delete_empty_groups``, a group whose rule is gone from the groups file
is deleted in the target with its members. A rule removed by mistake (a bad
merge) must not empty the target's groups in one cycle: a delete counts as
removing each member the group holds, so deleting more members than
``max_member_removals`` waits for ``provisioner approve``, whatever
``group_members`` says; a delete within the limit is sent at once.
"""

from __future__ import annotations

import json

import pytest

from provisioner.cli import main
from tests.conftest import ScimReader, Workspace, hr_row

BOTH = """groups:
  - name: all-staff
  - name: "dept-{{ department | lower }}"
"""
# The department rule removed: every dept-* group is no longer defined.
ALL_STAFF_ONLY = """groups:
  - name: all-staff
"""
TEAM = [hr_row("E1", "Ada", "One"), hr_row("E2", "Bob", "Two"), hr_row("E3", "Cy", "Three")]


def add_by_hand(scim: ScimReader, display_name: str, user_name: str) -> str:
    """Create a user the engine does not manage and add it to the group, as an administrator would."""
    user = scim.http.post("Users", json={"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
                                         "userName": user_name})  # fmt: skip
    user.raise_for_status()
    found = scim.http.get("Groups", params={"filter": f'displayName eq "{display_name}"'})
    found.raise_for_status()
    [group] = found.json()["Resources"]
    patch = {"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
             "Operations": [{"op": "add", "path": "members", "value": [{"value": user.json()["id"]}]}]}  # fmt: skip
    scim.http.patch(f"Groups/{group['id']}", json=patch).raise_for_status()
    return str(user.json()["id"])


def remove_the_department_rule(workspace: Workspace, team: list[dict[str, str]], *, limit: int, **options: str) -> None:
    """Sync ``team`` with both rules; then drop the department rule, with deletes on and a brake of ``limit``."""
    groups_file = workspace.root / "groups.yaml"
    groups_file.write_text(BOTH, encoding="utf-8")
    workspace.write_config(groups="groups.yaml")
    workspace.write_source(team)
    workspace.sync_now()
    groups_file.write_text(ALL_STAFF_ONLY, encoding="utf-8")
    workspace.write_config(groups="groups.yaml", delete_empty_groups="true", max_member_removals=limit,
                           max_member_removal_share="null", **options)  # fmt: skip


def test_a_rule_removed_for_a_group_of_more_members_than_the_brake_holds_its_delete_until_approved(
    workspace: Workspace, scim: ScimReader, capsys: pytest.CaptureFixture[str]
) -> None:
    remove_the_department_rule(workspace, TEAM, limit=2)
    ids = dict(workspace.query("SELECT identity_key, scim_id FROM account_link"))
    everyone = {ids["E1"], ids["E2"], ids["E3"]}
    assert scim.group_members("dept-engineering") == everyone

    # A one-shot cycle: the delete of three members' group is held, and the run says so.
    assert main(["sync", "--config", str(workspace.config_path)]) == 5

    assert scim.group_members("dept-engineering") == everyone
    assert scim.group_members("all-staff") == everyone
    [row] = workspace.held()
    assert (row["kind"], row["identity_key"], row["note"]) == ("group_delete", "dept-engineering",
                                                               "delete group 'dept-engineering' -3 members")  # fmt: skip
    run_id = str(row["run_id"])
    capsys.readouterr()
    assert main(["plan", "--config", str(workspace.config_path), "--held"]) == 0
    listing = capsys.readouterr().out
    assert f"run {run_id} holds 1 group delete" in listing
    # It names whom the delete removes, by identity key.
    assert "group_delete dept-engineering  delete group 'dept-engineering' -3 members: E1, E2, E3" in listing
    assert main(["plan", "--config", str(workspace.config_path), "--held", "--json"]) == 0
    # The row lists whom the delete removes.
    [listed] = json.loads(capsys.readouterr().out)
    # The payload is an object, as `queue list --json` gives it.
    assert {m["value"] for m in listed["payload"]["remove"]} == {ids[key] for key in ("E1", "E2", "E3")}

    # The next cycle keeps the same delete held under the same run, and deletes nothing.
    assert workspace.sync_now().held == 1
    assert [op["run_id"] for op in workspace.held()] == [run_id]
    assert scim.group_members("dept-engineering") == everyone

    assert main(["approve", "--config", str(workspace.config_path), run_id]) == 0
    assert workspace.sync_now().held == 0

    assert scim.group_members("dept-engineering") is None
    assert scim.group_members("all-staff") == everyone
    assert workspace.query("SELECT count(*) FROM group_link WHERE group_key = 'dept-engineering'") == [(0,)]
    assert not workspace.held()


def test_a_rejected_delete_is_not_sent_and_the_next_cycle_holds_it_again(
    workspace: Workspace, scim: ScimReader
) -> None:
    remove_the_department_rule(workspace, TEAM, limit=2)
    workspace.sync_now()
    [row] = workspace.held()
    rejected = str(row["run_id"])

    assert main(["reject", "--config", str(workspace.config_path), rejected]) == 0
    assert main(["sync", "--config", str(workspace.config_path)]) == 5

    assert scim.group_members("dept-engineering") is not None
    [again] = workspace.held()
    assert again["run_id"] != rejected
    assert again["note"] == f"delete group 'dept-engineering' -3 members (rejected in run {rejected}, still planned)"


def test_a_group_delete_within_the_brake_is_sent_at_once(workspace: Workspace, scim: ScimReader) -> None:
    remove_the_department_rule(workspace, TEAM[:2], limit=2)
    assert scim.group_members("dept-engineering") is not None

    assert main(["sync", "--config", str(workspace.config_path)]) == 0

    assert scim.group_members("dept-engineering") is None
    assert not workspace.held()


@pytest.mark.parametrize("use_etags", ["auto", "never"])
def test_a_group_no_longer_defined_that_holds_members_we_do_not_manage_is_not_deleted(
    workspace: Workspace, scim: ScimReader, use_etags: str
) -> None:
    remove_the_department_rule(workspace, TEAM[:2], limit=2, use_etags=use_etags)
    ids = dict(workspace.query("SELECT identity_key, scim_id FROM account_link"))
    # Someone adds a member by hand: the group's version in the target moves on from the one we hold.
    stranger = add_by_hand(scim, "dept-engineering", "hand.added")

    assert main(["sync", "--config", str(workspace.config_path)]) == 0

    # Not left empty: our members are taken out, the one added by hand keeps the group, no longer ours.
    assert scim.group_members("dept-engineering") == {stranger}
    assert ids["E1"] not in (scim.group_members("dept-engineering") or set())
    assert workspace.query("SELECT count(*) FROM group_link WHERE group_key = 'dept-engineering'") == [(0,)]
    [row] = [op for op in workspace.operations() if op["kind"] == "group_delete"]
    assert row["status"] == "succeeded"
    assert "not deleted: it holds 1 members we do not manage" in str(row["note"])
    # And the next cycle leaves it alone.
    assert main(["sync", "--config", str(workspace.config_path)]) == 0
    assert scim.group_members("dept-engineering") == {stranger}


def test_a_group_changed_by_hand_since_we_last_wrote_it_is_still_deleted(
    workspace: Workspace, scim: ScimReader
) -> None:
    remove_the_department_rule(workspace, TEAM[:2], limit=2)
    ids = dict(workspace.query("SELECT identity_key, scim_id FROM account_link"))
    # A member removed by hand: the ETag we hold is stale, and the group holds nobody but ours.
    found = scim.http.get("Groups", params={"filter": 'displayName eq "dept-engineering"'}).json()["Resources"]
    patch = {"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
             "Operations": [{"op": "remove", "path": f'members[value eq "{ids["E1"]}"]'}]}  # fmt: skip
    scim.http.patch(f"Groups/{found[0]['id']}", json=patch).raise_for_status()
    assert scim.group_members("dept-engineering") == {ids["E2"]}

    assert main(["sync", "--config", str(workspace.config_path)]) == 0

    assert scim.group_members("dept-engineering") is None


def test_restoring_the_rule_drops_the_held_delete(workspace: Workspace, scim: ScimReader) -> None:
    remove_the_department_rule(workspace, TEAM, limit=2)
    workspace.sync_now()
    assert [op["kind"] for op in workspace.held()] == ["group_delete"]

    # The operator's fix for a rule removed by mistake: put it back. Nothing is left to approve.
    (workspace.root / "groups.yaml").write_text(BOTH, encoding="utf-8")
    assert main(["sync", "--config", str(workspace.config_path)]) == 0

    assert not workspace.held()
    ids = dict(workspace.query("SELECT identity_key, scim_id FROM account_link"))
    assert scim.group_members("dept-engineering") == {ids["E1"], ids["E2"], ids["E3"]}
