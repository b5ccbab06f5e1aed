"""The member brake under ``group_members: exact``, against a real SCIM server (scim2-server over HTTP).

Removing many members at once waits for an operator; adding members never does.
A group whose row both adds and removes members is sent in two parts: the
additions at once, the removals held until ``provisioner approve`` (or dropped
by ``provisioner reject``).
"""

from __future__ import annotations

import json

import pytest

from provisioner.cli import main
from tests.conftest import ScimReader, Workspace, hr_row

GROUPS = """groups:
  - name: all-staff
  - name: "dept-{{ department | lower }}"
"""

TEAM = [hr_row("E1", "Ada", "One"), hr_row("E2", "Bob", "Two"), hr_row("E3", "Cy", "Three")]
# E1 and E2 move to Sales (two removals from dept-engineering: above a brake of 1); E4 joins Engineering.
MOVED = [hr_row("E1", "Ada", "One", department="Sales"), hr_row("E2", "Bob", "Two", department="Sales"),
         TEAM[2], hr_row("E4", "Di", "Four")]  # fmt: skip


@pytest.fixture
def moved(workspace: Workspace) -> None:
    """Three people in dept-engineering; then two of them move to Sales and a joiner arrives, under a brake of 1."""
    (workspace.root / "groups.yaml").write_text(GROUPS, encoding="utf-8")
    workspace.write_config(groups="groups.yaml")
    workspace.write_source(TEAM)
    workspace.sync_now()
    workspace.write_config(groups="groups.yaml", group_members="exact", max_member_removals=1,
                           max_member_removal_share="null")  # fmt: skip
    workspace.write_source(MOVED)


def accounts(workspace: Workspace) -> dict[str, str]:
    return dict(workspace.query("SELECT identity_key, scim_id FROM account_link"))


def test_a_joiner_joins_at_once_while_the_removals_beside_it_wait_for_approval(
    workspace: Workspace, scim: ScimReader, moved: None, capsys: pytest.CaptureFixture[str]
) -> None:
    report = workspace.sync_now()

    ids = accounts(workspace)
    assert report.held == 1
    # The joiner is in their groups at the end of the cycle; the two who moved are not removed yet.
    assert scim.group_members("dept-engineering") == {ids["E1"], ids["E2"], ids["E3"], ids["E4"]}
    assert ids["E4"] in (scim.group_members("all-staff") or set())
    assert scim.group_members("dept-sales") == {ids["E1"], ids["E2"]}
    [row] = workspace.held()
    assert (row["kind"], row["identity_key"], row["note"]) == ("group_members", "dept-engineering",
                                                               "group 'dept-engineering' -2 members")  # fmt: skip
    run_id = str(row["run_id"])
    capsys.readouterr()
    assert main(["plan", "--config", str(workspace.config_path), "--held"]) == 0
    listing = capsys.readouterr().out
    assert f"run {run_id} holds 1 group member removal\n" in listing
    # The removals are named: whom approving takes out of the group.
    assert "group_members dept-engineering  group 'dept-engineering' -2 members: E1, E2" in listing
    assert main(["plan", "--config", str(workspace.config_path), "--held", "--json"]) == 0
    [listed] = json.loads(capsys.readouterr().out)
    assert sorted(m["identity"] for m in listed["payload"]["remove"]) == ["E1", "E2"]

    # A joiner sent on their own (sync --only) joins too, and leaves the held removals as they are.
    workspace.write_source([*MOVED, hr_row("E5", "Ed", "Five")])
    assert main(["sync", "--config", str(workspace.config_path), "--only", "E5"]) == 0
    ids = accounts(workspace)
    assert scim.group_members("dept-engineering") == {ids["E1"], ids["E2"], ids["E3"], ids["E4"], ids["E5"]}
    assert [op["run_id"] for op in workspace.held()] == [run_id]
    # The next cycle keeps the same removals held: the run to approve does not move.
    assert workspace.sync_now().held == 1
    assert [op["run_id"] for op in workspace.held()] == [run_id]
    assert scim.group_members("dept-engineering") == {ids["E1"], ids["E2"], ids["E3"], ids["E4"], ids["E5"]}

    assert main(["approve", "--config", str(workspace.config_path), run_id]) == 0
    assert workspace.sync_now().held == 0

    assert scim.group_members("dept-engineering") == {ids["E3"], ids["E4"], ids["E5"]}
    assert scim.group_members("dept-sales") == {ids["E1"], ids["E2"]}
    assert not workspace.held()


def test_plan_says_the_member_brake_would_hold_the_removals_and_status_names_them(
    workspace: Workspace, moved: None, capsys: pytest.CaptureFixture[str]
) -> None:
    config = str(workspace.config_path)
    capsys.readouterr()
    # The plan judges the removals as the cycle will; a plan is not a safety stop, so it exits 0.
    assert main(["plan", "--config", config]) == 0
    said = capsys.readouterr().out
    assert "the member brake would hold this cycle's group member removals" in said
    assert main(["plan", "--config", config, "--json"]) == 0
    [plan] = json.loads(capsys.readouterr().out)
    assert (plan["would_hold_member_removals"], plan["would_hold_leavers"]) == (True, False)

    assert workspace.sync_now().held == 1
    capsys.readouterr()
    assert main(["status", "--config", config]) == 5
    said = capsys.readouterr().out
    assert "1 group member removal awaiting approval" in said and "leaver" not in said
    # Held already: the next plan does not count them again, it says what the cycle would hold anew.
    assert main(["plan", "--config", config, "--json"]) == 0
    [plan] = json.loads(capsys.readouterr().out)
    assert plan["would_hold_member_removals"] is False


def test_rejected_removals_are_not_sent_and_the_next_cycle_says_it_holds_them_again(
    workspace: Workspace, scim: ScimReader, moved: None, capsys: pytest.CaptureFixture[str]
) -> None:
    workspace.sync_now()
    [row] = workspace.held()
    rejected = str(row["run_id"])

    assert main(["reject", "--config", str(workspace.config_path), rejected]) == 0
    capsys.readouterr()
    # A one-shot cycle: the removals the source still asks for are held again, and it says so.
    assert main(["sync", "--config", str(workspace.config_path)]) == 5
    said = capsys.readouterr().out
    # Held member removals are what is said, never leavers.
    assert "held: 1 group member removal awaiting approval: provisioner plan --held" in said
    assert "leaver" not in said

    ids = accounts(workspace)
    assert scim.group_members("dept-engineering") == {ids["E1"], ids["E2"], ids["E3"], ids["E4"]}
    [again] = workspace.held()
    assert again["run_id"] != rejected
    assert again["note"] == f"group 'dept-engineering' -2 members (rejected in run {rejected}, still planned)"
    capsys.readouterr()
    assert main(["plan", "--config", str(workspace.config_path), "--held"]) == 0
    listing = capsys.readouterr().out
    assert f"run {again['run_id']} holds 1 group member removal" in listing
    assert f"rejected in run {rejected}" in listing


def test_a_leaver_held_by_the_deletion_brake_keeps_their_memberships_and_holds_nobody_elses(
    workspace: Workspace, scim: ScimReader, capsys: pytest.CaptureFixture[str]
) -> None:
    """The deletion brake holds the leaver's disable and their memberships, not the joiner beside them in a group."""
    (workspace.root / "groups.yaml").write_text(GROUPS, encoding="utf-8")
    workspace.write_config(groups="groups.yaml")
    workspace.write_source(TEAM)
    workspace.sync_now()
    workspace.write_config(groups="groups.yaml", max_deprovision=0)
    workspace.write_source([hr_row("E1", "Ada", "One", status="terminated"), *TEAM[1:], MOVED[3]])

    assert workspace.sync_now().held == 1

    ids = accounts(workspace)
    [row] = workspace.held()
    assert (row["kind"], row["identity_key"]) == ("disable", "E1")
    assert scim.group_members("dept-engineering") == scim.group_members("all-staff") == set(ids.values())
    assert main(["approve", "--config", str(workspace.config_path), str(row["run_id"])]) == 0
    assert workspace.sync_now().held == 0
    stayed = {ids["E2"], ids["E3"], ids["E4"]}
    assert scim.group_members("dept-engineering") == scim.group_members("all-staff") == stayed
