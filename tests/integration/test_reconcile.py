"""Reconciliation against a real SCIM server changed by hand: each situation named, then repaired or reported."""

from __future__ import annotations

import asyncio
import csv
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from provisioner.cli import main
from provisioner.config import load_config
from provisioner.daemon import Daemon, target_facts
from provisioner.demo import free_port
from provisioner.metrics import RECONCILE_ACCOUNTS, RECONCILE_DRIFTED, RECONCILE_FOREIGN_MEMBERS, RECONCILE_GROUPS
from provisioner.alerts import AlertsConfig, evaluate
from provisioner.reconcile import publish_last
from provisioner.store import open_store
from tests.conftest import ENTERPRISE, HR_COLUMNS, ScimReader, Workspace, empty_server, hr_row, write_csv
from tests.servers.scimmy_server import ScimmyServer, running_scimmy

PEOPLE = [
    hr_row("E1", "Ada", "Boss"),
    hr_row("E2", "Bob", "Disabled", manager_id="E1"),
    hr_row("E3", "Cy", "Moved", manager_id="E1"),
    hr_row("E4", "Di", "Deleted"),
    hr_row("E5", "Ed", "Twice"),
]


# The tests that change a target by hand run against both servers (parametrize scim_server indirectly).
SERVERS = pytest.mark.parametrize("scim_server", ["scim2-server", "scimmy"], indirect=True)


@pytest.fixture(scope="module")
def module_scimmy() -> Iterator[ScimmyServer]:
    """One SCIMMY app (Node.js) for the module, started only when a test asks for it."""
    yield from running_scimmy()


@pytest.fixture
def scim_server(request: pytest.FixtureRequest, module_scim_server: Any) -> Any:
    """scim2-server, or SCIMMY for a test parametrized with it; emptied before the test."""
    if getattr(request, "param", "scim2-server") == "scimmy":
        server = request.getfixturevalue("module_scimmy")
        server.clear()
        return server
    empty_server(module_scim_server)
    return module_scim_server


class Hand:
    """Changes made in the target by hand, over plain HTTP, as an administrator would."""

    def __init__(self, workspace: Workspace) -> None:
        server = workspace.server
        self.http = httpx.Client(base_url=server.base_url + "/", headers={"Authorization": f"Bearer {server.token}"},
                                 timeout=10)  # fmt: skip

    def patch(self, scim_id: str, path: str, value: Any) -> None:
        body = {"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
                "Operations": [{"op": "replace", "path": path, "value": value}]}  # fmt: skip
        assert self.http.patch(f"Users/{scim_id}", json=body).status_code in (200, 204)

    def create(self, user_name: str, **extra: Any) -> str:
        body = {"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": user_name, "active": True,
                **extra}  # fmt: skip
        response = self.http.post("Users", json=body)
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    def delete(self, scim_id: str) -> None:
        assert self.http.delete(f"Users/{scim_id}").status_code == 204


def reconcile(workspace: Workspace, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any]]:
    capsys.readouterr()
    code = main(["reconcile", "--config", str(workspace.config_path), "--json", *args])
    out, err = capsys.readouterr()
    assert out, err
    return code, json.loads(out.splitlines()[0])


def by_user(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {str(a["userName"]).lower(): a for a in result["accounts"]}


@pytest.fixture
def changed(workspace: Workspace, scim: ScimReader) -> dict[str, str]:
    """Five people provisioned, then the target changed by hand in every way reconciliation names."""
    workspace.write_source(PEOPLE)
    assert workspace.sync_now().summary()["created"] == 5
    hand = Hand(workspace)
    ids = {row["employee_id"]: scim.user(row["email"])["id"] for row in PEOPLE}
    hand.patch(ids["E2"], "active", False)
    hand.patch(ids["E3"], f"{ENTERPRISE}:department", "Sales")
    hand.delete(ids["E4"])
    ids["orphan"] = hand.create("nobody@example.com")
    # E5's account renamed by hand, and a second account made with E5's userName: two accounts, one identity.
    hand.patch(ids["E5"], "userName", "ed.twice.old@example.com")
    ids["second"] = hand.create("ed.twice@example.com")
    # Two new records render the same userName, which an account made by hand has: one account, claimed twice.
    # And one new record whose account was made by hand before its first cycle: unlinked.
    workspace.write_source([
        *PEOPLE,
        hr_row("E6", "Sam", "Shared", email="shared@example.com"),
        hr_row("E7", "Sue", "Shared", email="Shared@example.com"),
        hr_row("E8", "Una", "Linked"),
    ])  # fmt: skip
    ids["shared"] = hand.create("shared@example.com")
    ids["E8"] = hand.create("una.linked@example.com", name={"givenName": "U"})
    return ids


@SERVERS
def test_each_hand_change_is_named_in_midpoints_situations_and_nothing_is_written(
    workspace: Workspace, scim: ScimReader, changed: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    before_users = sorted(scim.all(), key=lambda u: u["id"])
    before_ops = workspace.operations()
    before_links = workspace.query("SELECT * FROM account_link ORDER BY identity_key")

    code, result = reconcile(workspace, capsys)

    assert code == 0
    assert set(result) == {"target", "counts", "accounts", "groups"} and result["target"] == "app"
    assert result["groups"] == []  # the target manages no groups
    accounts = by_user(result)
    assert accounts["bob.disabled@example.com"] == {
        "situation": "linked", "identity": "E2", "id": changed["E2"], "userName": "bob.disabled@example.com",
        "drift": ["active"],
    }  # fmt: skip
    assert accounts["cy.moved@example.com"]["drift"] == [f"{ENTERPRISE}:department"]
    assert accounts["ada.boss@example.com"]["drift"] == []
    assert accounts["di.deleted@example.com"]["situation"] == "deleted"
    assert accounts["di.deleted@example.com"]["id"] == changed["E4"]
    assert accounts["nobody@example.com"] == {
        "situation": "unmatched", "identity": None, "id": changed["orphan"], "userName": "nobody@example.com", "drift": [],
    }  # fmt: skip
    assert accounts["ed.twice.old@example.com"]["situation"] == "linked"
    assert accounts["ed.twice.old@example.com"]["drift"] == ["userName"]
    assert accounts["ed.twice@example.com"]["situation"] == "disputed"
    assert accounts["ed.twice@example.com"]["identity"] == "E5"
    assert accounts["shared@example.com"]["situation"] == "disputed"
    assert accounts["shared@example.com"]["identity"] == "E6, E7"
    assert accounts["una.linked@example.com"]["situation"] == "unlinked"
    assert accounts["una.linked@example.com"]["identity"] == "E8"
    assert result["counts"] == {"linked": 4, "unlinked": 1, "unmatched": 1, "deleted": 1, "disputed": 2}
    # Nothing written: the target, the queue and the links are as they were.
    assert sorted(scim.all(), key=lambda u: u["id"]) == before_users
    assert workspace.operations() == before_ops
    assert workspace.query("SELECT * FROM account_link ORDER BY identity_key") == before_links
    assert workspace.count("reconcile_run") == 0


@SERVERS
def test_repair_converges_drift_recreates_and_links_and_leaves_orphans_and_disputes_alone(
    workspace: Workspace, scim: ScimReader, changed: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _ = reconcile(workspace, capsys, "--repair")
    assert code == 0

    assert scim.user("bob.disabled@example.com")["active"] is True
    assert scim.user("cy.moved@example.com")[ENTERPRISE]["department"] == "Engineering"
    recreated = scim.user("di.deleted@example.com")
    assert recreated["id"] != changed["E4"]
    assert scim.user("una.linked@example.com")["id"] == changed["E8"]
    assert scim.user("una.linked@example.com")["name"]["givenName"] == "Una"
    assert scim.user("nobody@example.com")["active"] is True  # unmatched: report (the default)
    assert scim.user("shared@example.com")["id"] == changed["shared"]  # disputed: always report
    # The drift repair PATCHed only the drifted attributes.
    ops = {(op["identity_key"], op["kind"]): op for op in workspace.operations() if op["reason"] == "reconcile"}
    # E5 is in a dispute: neither of its accounts is touched.
    assert set(ops) == {("E2", "update"), ("E3", "update"), ("E4", "create"), ("E8", "link")}
    assert all(op["status"] == "succeeded" for op in ops.values())
    calls = workspace.query(
        "SELECT method, request_body FROM attempt WHERE operation_id = ? ORDER BY id", ops[("E3", "update")]["id"]
    )
    # The hand edit changed the account's version: 412, a GET for the new ETag, the PATCH again
    # (SCIMMY keeps no versions: one PATCH).
    etags = not isinstance(workspace.server, ScimmyServer)
    assert [c[0] for c in calls] == (["PATCH", "GET", "PATCH"] if etags else ["PATCH"])
    assert [o["path"] for o in json.loads(calls[-1][1])["Operations"]] == [f"{ENTERPRISE}:department"]

    _, again = reconcile(workspace, capsys)
    accounts = by_user(again)
    assert [a["userName"] for a in again["accounts"] if a["drift"]] == ["ed.twice.old@example.com"]
    assert accounts["di.deleted@example.com"]["situation"] == "linked"
    assert accounts["una.linked@example.com"]["situation"] == "linked"
    assert again["counts"] == {"linked": 6, "unlinked": 0, "unmatched": 1, "deleted": 0, "disputed": 2}
    # A cycle after the repair finds nothing to update: the repairs left the links as the target is.
    assert workspace.sync_now().summary()["updated"] == 0


def test_report_reactions_queue_nothing_even_with_repair(
    workspace: Workspace, scim: ScimReader, changed: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    workspace.write_config(reconcile="{linked: report, deleted: report, unlinked: report}")
    before = len(workspace.operations())
    code, result = reconcile(workspace, capsys, "--repair")
    assert code == 0
    assert result["counts"]["deleted"] == 1
    assert len(workspace.operations()) == before
    assert scim.user("bob.disabled@example.com")["active"] is False
    assert workspace.count("reconcile_run") == 1


def test_unmatched_disables_go_through_the_deletion_brake(
    workspace: Workspace, scim: ScimReader, capsys: pytest.CaptureFixture[str]
) -> None:
    workspace.write_source(PEOPLE)
    workspace.sync_now()
    hand = Hand(workspace)
    orphans = [hand.create(f"orphan{n}@example.com") for n in range(3)]
    workspace.write_config(reconcile="{unmatched: disable}", max_deprovision=2)

    code, result = reconcile(workspace, capsys, "--repair")

    assert code == 5
    assert result["counts"]["unmatched"] == 3
    held = [op for op in workspace.operations() if op["status"] == "held"]
    assert sorted(op["identity_key"] for op in held) == sorted(f"unmatched:{i}" for i in orphans)
    assert all(op["kind"] == "disable" and op["reason"] == "reconcile" for op in held)
    assert all(scim.user(f"orphan{n}@example.com")["active"] for n in range(3))
    # Approved, the next send disables them; the identities' accounts are untouched.
    assert main(["approve", held[0]["run_id"], "--config", str(workspace.config_path)]) == 0
    assert main(["sync", "--config", str(workspace.config_path)]) == 0
    assert not any(scim.user(f"orphan{n}@example.com")["active"] for n in range(3))
    assert scim.user("ada.boss@example.com")["active"] is True
    # Disabled orphans are not disabled again.
    assert reconcile(workspace, capsys, "--repair")[0] == 0
    assert len([op for op in workspace.operations() if op["kind"] == "disable"]) == 3


def test_unmatched_delete_waits_for_its_grace_period(
    workspace: Workspace, scim: ScimReader, capsys: pytest.CaptureFixture[str]
) -> None:
    workspace.write_source(PEOPLE)
    workspace.sync_now()
    orphan = Hand(workspace).create("orphan@example.com")
    workspace.write_config(reconcile="{unmatched: delete, delete_after: 1d}")
    assert reconcile(workspace, capsys, "--repair")[0] == 0
    assert scim.find("orphan@example.com")  # first seen now: not deleted yet
    first_seen = workspace.query("SELECT first_seen_at FROM unmatched_account WHERE scim_id = ?", orphan)
    assert len(first_seen) == 1
    # A day later (the sighting moved back), the next repair deletes it.
    workspace.query("UPDATE unmatched_account SET first_seen_at = '2020-01-01 00:00:00.000000' WHERE scim_id = ?", orphan)
    assert reconcile(workspace, capsys, "--repair")[0] == 0
    assert not scim.find("orphan@example.com")
    assert len(scim.all()) == len(PEOPLE)


@SERVERS
def test_onboarding_preview_before_the_first_cycle(
    workspace: Workspace, scim: ScimReader, capsys: pytest.CaptureFixture[str]
) -> None:
    """Against a target that already has accounts, reconcile says what would be linked and what is foreign."""
    workspace.write_source(PEOPLE)
    hand = Hand(workspace)
    for row in PEOPLE[:3]:
        hand.create(row["email"].upper())
    hand.create("stranger@example.com")
    # Two new records render the userName of one account: whose it is is not ours to guess.
    workspace.write_source([*PEOPLE, hr_row("E6", "Sam", "Shared", email="shared@example.com"),
                            hr_row("E7", "Sue", "Shared", email="Shared@example.com")])  # fmt: skip
    hand.create("shared@example.com")
    before = sorted(scim.all(), key=lambda u: u["id"])
    capsys.readouterr()
    assert main(["reconcile", "--config", str(workspace.config_path)]) == 0
    out = capsys.readouterr().out
    assert "app: linked 0  unlinked 3  unmatched 1  deleted 0  disputed 1" in out
    assert "identities with no account yet: 2" in out
    # Before anything is written: E1-E3 linked by userName, E4-E5 created, the stranger and the shared one reported.
    assert "would link 3, create 2, unmatched 1, disputed 1" in out
    assert "nothing was written" in out
    assert workspace.count("operation") == 0
    assert workspace.count("account_link") == 0
    assert sorted(scim.all(), key=lambda u: u["id"]) == before
    # Repaired, the three are adopted (userName matched case-insensitively), the stranger left alone.
    ids = {u["userName"].lower(): u["id"] for u in scim.all()}
    assert main(["reconcile", "--config", str(workspace.config_path), "--repair"]) == 0
    links = dict(workspace.query("SELECT identity_key, scim_id FROM account_link"))
    assert links == {row["employee_id"]: ids[row["email"]] for row in PEOPLE[:3]}
    assert len(scim.all()) == 5


def test_the_daemon_reconciles_when_due_publishes_gauges_and_alerts(
    workspace: Workspace, scim: ScimReader
) -> None:
    workspace.write_source(PEOPLE)
    workspace.sync_now()
    hand = Hand(workspace)
    for n in range(3):
        hand.create(f"orphan{n}@example.com")
    workspace.config_path.write_text(
        workspace.config_path.read_text() + "daemon: {listen: null}\nalerts: {rules: {unmatched_accounts: 2}}\n"
    )
    config = load_config(workspace.config_path)
    engine = open_store(config.state)

    async def scenario() -> tuple[bool, bool]:
        daemon = Daemon(config, engine)
        first = await daemon.reconcile_if_due("app")
        second = await daemon.reconcile_if_due("app")  # a day has not passed
        return first, second

    assert asyncio.run(scenario()) == (True, False)
    assert RECONCILE_ACCOUNTS.labels("app", "unmatched")._value.get() == 3
    assert RECONCILE_ACCOUNTS.labels("app", "linked")._value.get() == 5
    assert RECONCILE_DRIFTED.labels("app")._value.get() == 0
    facts = target_facts(engine, "app")
    assert (facts.unmatched_accounts, facts.drifted_accounts) == (3, 0)
    conditions = evaluate([facts], config.alerts)
    assert [c.rule for c in conditions] == ["unmatched_accounts"]
    assert "3 accounts that no identity owns" in conditions[0].message
    assert evaluate([facts], AlertsConfig()) == []  # the default threshold, 10, is not crossed
    engine.dispose()


def test_csv_lists_every_account_with_its_situation(
    workspace: Workspace, changed: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    path = workspace.root / "accounts.csv"
    assert main(["reconcile", "--config", str(workspace.config_path), "--csv", str(path)]) == 0
    with path.open(newline="", encoding="utf-8") as handle:
        rows = {row["userName"].lower(): row for row in csv.DictReader(handle)}
    assert len(rows) == 9
    assert rows["cy.moved@example.com"]["situation"] == "linked"
    assert rows["cy.moved@example.com"]["drift"] == f"{ENTERPRISE}:department"
    assert rows["nobody@example.com"]["situation"] == "unmatched"
    assert rows["nobody@example.com"]["identity"] == ""


def test_a_misspelt_reaction_exits_3_naming_file_line_and_key(
    workspace: Workspace, capsys: pytest.CaptureFixture[str]
) -> None:
    workspace.write_config(reconcile="{unmatched: purge}")
    assert main(["reconcile", "--config", str(workspace.config_path)]) == 3
    err = capsys.readouterr().err
    assert f"{workspace.config_path}:" in err and "targets.app.reconcile.unmatched" in err
    assert "Traceback" not in err


def test_reconcile_every_0_turns_the_daemons_reconciliation_off(workspace: Workspace) -> None:
    workspace.write_source(PEOPLE)
    workspace.write_config(reconcile_every=0)
    config = load_config(workspace.config_path)
    engine = open_store(config.state)
    assert asyncio.run(Daemon(config, engine).reconcile_if_due("app")) is False
    assert workspace.count("reconcile_run") == 0
    engine.dispose()


def test_a_target_that_cannot_be_read_exits_4_with_one_line_and_concludes_nothing(
    workspace: Workspace, capsys: pytest.CaptureFixture[str]
) -> None:
    workspace.write_source(PEOPLE)
    workspace.config_path.write_text(
        workspace.config_path.read_text().replace(workspace.server.base_url, f"http://127.0.0.1:{free_port()}/v2")
        + "    retry: {max_attempts: 1}\n"
    )
    assert main(["reconcile", "--config", str(workspace.config_path), "--repair", "--json"]) == 4
    captured = capsys.readouterr()
    assert "error: app: could not read the target's accounts" in captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    assert workspace.count("operation") == 0 and workspace.count("reconcile_run") == 0


def test_a_restarted_daemon_publishes_the_last_reconciliation_until_the_next(
    workspace: Workspace, scim: ScimReader, capsys: pytest.CaptureFixture[str]
) -> None:
    workspace.write_source(PEOPLE)
    workspace.sync_now()
    Hand(workspace).create("orphan@example.com")
    assert reconcile(workspace, capsys, "--repair")[0] == 0
    RECONCILE_ACCOUNTS.labels("app", "unmatched").set(0)
    config = load_config(workspace.config_path)
    engine = open_store(config.state)
    publish_last(engine, "app")
    assert RECONCILE_ACCOUNTS.labels("app", "unmatched")._value.get() == 1
    assert RECONCILE_ACCOUNTS.labels("app", "linked")._value.get() == 5
    engine.dispose()


def test_an_orphan_adopted_before_its_disable_is_sent_is_left_alone(
    workspace: Workspace, scim: ScimReader, capsys: pytest.CaptureFixture[str]
) -> None:
    """Verify, never assume: an unmatched account is disabled only if it is still nobody's when sent."""
    workspace.write_source(PEOPLE[:2])
    workspace.sync_now()
    Hand(workspace).create(PEOPLE[2]["email"])
    workspace.write_config(reconcile="{unmatched: disable}", max_deprovision=0)
    code, result = reconcile(workspace, capsys, "--repair")
    assert (code, result["counts"]["unmatched"]) == (5, 1)
    # While the disable waits for approval, the person joins the source and a cycle adopts the account.
    workspace.write_source(PEOPLE[:3])
    workspace.sync_now()
    held = [op for op in workspace.operations() if op["kind"] == "disable"]
    assert [op["status"] for op in held] == ["held"]
    assert main(["approve", held[0]["run_id"], "--config", str(workspace.config_path)]) == 0
    workspace.sync_now()
    assert scim.user(PEOPLE[2]["email"])["active"] is True
    disable = [op for op in workspace.operations() if op["kind"] == "disable"]
    assert [(op["status"], op["note"]) for op in disable] == [
        ("succeeded", "account is now linked to identity E3; left as it is")
    ]


GROUPS = """groups:
  - name: all-staff
  - name: "dept-{{ department | lower }}"
"""


class HandGroups(Hand):
    """Group changes made by hand."""

    def group(self, display_name: str, members: list[str] = ()) -> str:  # type: ignore[assignment]
        body = {"schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"], "displayName": display_name,
                "members": [{"value": m} for m in members]}  # fmt: skip
        response = self.http.post("Groups", json=body)
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    def add_member(self, group_id: str, member: str) -> None:
        body = {"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
                "Operations": [{"op": "add", "path": "members", "value": [{"value": member}]}]}  # fmt: skip
        assert self.http.patch(f"Groups/{group_id}", json=body).status_code in (200, 204)

    def members(self, group_id: str) -> set[str]:
        response = self.http.get(f"Groups/{group_id}")
        response.raise_for_status()
        return {m["value"] for m in response.json().get("members") or []}


@pytest.fixture
def grouped(workspace: Workspace, scim: ScimReader) -> dict[str, str]:
    """Three people in managed groups, then a foreign member added to one and a group made by hand."""
    (workspace.root / "groups.yaml").write_text(GROUPS, encoding="utf-8")
    workspace.write_config(groups="groups.yaml")
    workspace.write_source(PEOPLE[:3])
    workspace.sync_now()
    hand = HandGroups(workspace)
    ids = dict(workspace.query("SELECT group_key, scim_id FROM group_link"))
    ids["stranger"] = hand.create("stranger@example.com")
    hand.add_member(ids["all-staff"], ids["stranger"])
    ids["by-hand"] = hand.group("by-hand", [ids["stranger"]])
    return ids


def groups_of(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {g["displayName"]: g for g in result["groups"]}


@SERVERS
def test_groups_no_rule_defines_and_members_we_did_not_add_are_reported_and_left_by_default(
    workspace: Workspace, grouped: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    hand = HandGroups(workspace)
    ours = {scim_id for (scim_id,) in workspace.query("SELECT scim_id FROM account_link")}
    before_ops = workspace.operations()

    code, result = reconcile(workspace, capsys)

    assert code == 0
    groups = groups_of(result)
    assert groups["all-staff"] == {"situation": "linked", "group": "all-staff", "id": grouped["all-staff"],
                                   "displayName": "all-staff", "foreign_members": [grouped["stranger"]]}  # fmt: skip
    assert groups["dept-engineering"]["situation"] == "linked"
    assert groups["dept-engineering"]["foreign_members"] == []
    assert groups["by-hand"] == {"situation": "unmatched", "group": None, "id": grouped["by-hand"],
                                 "displayName": "by-hand", "foreign_members": []}  # fmt: skip
    # The accounts' shape is as it was; the stranger is an unmatched account too.
    assert by_user(result)["stranger@example.com"]["situation"] == "unmatched"
    assert workspace.operations() == before_ops
    # additive (the default): even a repair leaves the foreign member where it is.
    assert reconcile(workspace, capsys, "--repair")[0] == 0
    assert hand.members(grouped["all-staff"]) == ours | {grouped["stranger"]}
    assert workspace.operations() == before_ops
    capsys.readouterr()
    assert main(["reconcile", "--config", str(workspace.config_path)]) == 0
    out = capsys.readouterr().out
    assert "groups: linked 2  unlinked 0  unmatched 1  deleted 0  foreign_members 1" in out
    assert f"group unmatched by-hand  id {grouped['by-hand']}" in out


@SERVERS
def test_exact_group_members_removes_foreign_members_through_the_queue_and_converges(
    workspace: Workspace, grouped: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    hand = HandGroups(workspace)
    ours = {scim_id for (scim_id,) in workspace.query("SELECT scim_id FROM account_link")}
    workspace.write_config(groups="groups.yaml", group_members="exact")

    _, preview = reconcile(workspace, capsys)
    assert hand.members(grouped["all-staff"]) == ours | {grouped["stranger"]}  # no --repair: no write
    assert groups_of(preview)["all-staff"]["foreign_members"] == [grouped["stranger"]]

    assert reconcile(workspace, capsys, "--repair")[0] == 0

    assert hand.members(grouped["all-staff"]) == ours
    # An ordinary, audited queue operation did it.
    removals = [op for op in workspace.operations() if op["kind"] == "group_members" and op["reason"] == "drift"
                and op["identity_key"] == "all-staff" and "-1 members" in (op["note"] or "")]  # fmt: skip
    assert [op["status"] for op in removals] == ["succeeded"]
    # Groups no rule defines are never touched, and their members stay.
    assert hand.members(grouped["by-hand"]) == {grouped["stranger"]}
    _, again = reconcile(workspace, capsys)
    assert groups_of(again)["all-staff"]["foreign_members"] == []
    # The next cycle neither adds the stranger back nor removes one of ours.
    workspace.sync_now()
    assert hand.members(grouped["all-staff"]) == ours


def test_a_target_whose_group_reads_omit_members_gives_no_foreign_members_rather_than_a_guess(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.conftest import TOKEN_VARIABLE
    from tests.servers.deviant import start_deviant_server

    server = start_deviant_server({"group_members_not_returned"})
    try:
        monkeypatch.setenv(TOKEN_VARIABLE, server.token)
        workspace = Workspace(tmp_path, server)  # type: ignore[arg-type]
        (workspace.root / "groups.yaml").write_text(GROUPS, encoding="utf-8")
        workspace.write_config(groups="groups.yaml", group_members="exact")
        workspace.write_source(PEOPLE[:3])
        workspace.sync_now()
        hand = HandGroups(workspace)
        staff = dict(workspace.query("SELECT group_key, scim_id FROM group_link"))["all-staff"]
        stranger = hand.create("stranger@example.com")
        hand.add_member(staff, stranger)
        before = len(workspace.operations())

        code, result = reconcile(workspace, capsys, "--repair")

        assert code == 0
        # The target never says who is in the group: the stranger cannot be seen, so nothing is removed.
        assert groups_of(result)["all-staff"]["situation"] == "linked"
        assert groups_of(result)["all-staff"]["foreign_members"] == []
        assert not [op for op in workspace.operations()[before:] if op["kind"] == "group_members"]
        [group] = [g for g in server.dump()["Groups"] if g["id"] == staff]
        assert stranger in {m["value"] for m in group.get("members") or []}
    finally:
        server.stop()


def test_the_daemon_publishes_group_situations_and_alerts_on_foreign_members(
    workspace: Workspace, grouped: dict[str, str]
) -> None:
    workspace.config_path.write_text(
        workspace.config_path.read_text()
        + "daemon: {listen: null}\nalerts: {rules: {foreign_members: 0, unmatched_groups: 0}}\n"
    )
    config = load_config(workspace.config_path)
    engine = open_store(config.state)

    assert asyncio.run(Daemon(config, engine).reconcile_if_due("app")) is True

    assert RECONCILE_GROUPS.labels("app", "linked")._value.get() == 2
    assert RECONCILE_GROUPS.labels("app", "unmatched")._value.get() == 1
    assert RECONCILE_FOREIGN_MEMBERS.labels("app")._value.get() == 1
    facts = target_facts(engine, "app")
    assert (facts.unmatched_groups, facts.foreign_members) == (1, 1)
    conditions = {c.rule: c for c in evaluate([facts], config.alerts)}
    assert {"unmatched_groups", "foreign_members"} <= set(conditions)
    assert "1 members of managed groups that are not accounts we manage" in conditions["foreign_members"].message
    assert "1 groups that no rule defines" in conditions["unmatched_groups"].message
    # The defaults: foreign members above 10, groups no rule defines not at all.
    assert not {"unmatched_groups", "foreign_members"} & {c.rule for c in evaluate([facts], AlertsConfig())}
    # A restarted daemon publishes them again from the recorded run.
    RECONCILE_FOREIGN_MEMBERS.labels("app").set(0)
    publish_last(engine, "app")
    assert RECONCILE_FOREIGN_MEMBERS.labels("app")._value.get() == 1
    engine.dispose()


def test_foreign_member_removals_above_the_brake_are_held_until_an_operator_approves(
    workspace: Workspace, grouped: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """group_members: exact removes what we did not add, but never many at once without an operator."""
    hand = HandGroups(workspace)
    ours = {scim_id for (scim_id,) in workspace.query("SELECT scim_id FROM account_link")}
    second = hand.create("second.stranger@example.com")
    hand.add_member(grouped["all-staff"], second)
    strangers = {grouped["stranger"], second}
    workspace.write_config(groups="groups.yaml", group_members="exact", max_member_removals=1)

    code, result = reconcile(workspace, capsys, "--repair")

    assert code == 5  # held, as a held cycle exits
    assert set(groups_of(result)["all-staff"]["foreign_members"]) == strangers
    assert hand.members(grouped["all-staff"]) == ours | strangers
    [held] = [op for op in workspace.operations() if op["status"] == "held"]
    assert (held["kind"], held["identity_key"], held["note"]) == ("group_members", "all-staff",
                                                                  "group 'all-staff' -2 members")  # fmt: skip
    run_id = held["run_id"]
    capsys.readouterr()
    assert main(["reconcile", "--config", str(workspace.config_path)]) == 0
    # The cycle does not remove them either, and says it is held; the held row stays the one to approve.
    # A joiner of that cycle is in the group at once: only removals wait for an operator.
    workspace.write_source(PEOPLE[:4])
    assert workspace.sync_now().held == 1
    ours = {scim_id for (scim_id,) in workspace.query("SELECT scim_id FROM account_link")}
    assert hand.members(grouped["all-staff"]) == ours | strangers
    assert [op["run_id"] for op in workspace.operations() if op["status"] == "held"] == [run_id]
    capsys.readouterr()
    assert main(["plan", "--config", str(workspace.config_path), "--held"]) == 0
    listing = capsys.readouterr().out
    assert f"run {run_id} holds 1 group member removal" in listing and "group_members all-staff" in listing

    assert main(["approve", "--config", str(workspace.config_path), run_id]) == 0
    workspace.sync_now()

    assert hand.members(grouped["all-staff"]) == ours
    assert hand.members(grouped["by-hand"]) == {grouped["stranger"]}  # a group no rule defines is never touched
    _, again = reconcile(workspace, capsys)
    assert groups_of(again)["all-staff"]["foreign_members"] == []


def test_foreign_member_removals_under_the_brake_are_sent_at_once(
    workspace: Workspace, grouped: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    hand = HandGroups(workspace)
    ours = {scim_id for (scim_id,) in workspace.query("SELECT scim_id FROM account_link")}
    workspace.write_config(groups="groups.yaml", group_members="exact", max_member_removals=1,
                           max_member_removal_share="null")  # fmt: skip
    assert reconcile(workspace, capsys, "--repair")[0] == 0
    assert hand.members(grouped["all-staff"]) == ours
    assert not [op for op in workspace.operations() if op["status"] == "held"]


@pytest.mark.parametrize("password", ["\n    value: initial_password\n    when: create", " initial_password"])
def test_create_only_and_write_only_attributes_are_never_drift_and_a_real_drift_is_still_repaired(
    workspace: Workspace, scim: ScimReader, capsys: pytest.CaptureFixture[str], password: str
) -> None:
    # The README's create-only attributes: a first password (write-only: no target returns it) and a nickName
    # chosen once (readable). The planner never updates either, so neither is drift; nor is a password sent always.
    text = workspace.mapping_path.read_text()
    workspace.mapping_path.write_text(
        text.replace("attributes:\n", f"attributes:\n  password:{password}\n"
                     "  nickName:\n    value: nick\n    when: create\n", 1)  # fmt: skip
    )
    columns = [*HR_COLUMNS, "initial_password", "nick"]
    rows = [{**person, "initial_password": "Initial-Pa55word!", "nick": person["first_name"]} for person in PEOPLE[:3]]
    write_csv(workspace.source_path, rows, columns)
    assert workspace.sync_now().summary()["created"] == 3
    hand = Hand(workspace)
    ada, cy = scim.user("ada.boss@example.com"), scim.user("cy.moved@example.com")
    hand.patch(ada["id"], "nickName", "Countess")  # the target's own business after the create

    _, result = reconcile(workspace, capsys)
    assert [a["drift"] for a in result["accounts"]] == [[], [], []]
    assert reconcile(workspace, capsys, "--repair")[0] == 0
    assert [op for op in workspace.operations() if op["reason"] == "reconcile"] == []

    hand.patch(cy["id"], "title", "Juggler")
    _, result = reconcile(workspace, capsys)
    assert {a["userName"]: a["drift"] for a in result["accounts"] if a["drift"]} == {"cy.moved@example.com": ["title"]}
    assert reconcile(workspace, capsys, "--repair")[0] == 0
    [op] = [op for op in workspace.operations() if op["reason"] == "reconcile"]
    assert (op["identity_key"], op["kind"], op["status"]) == ("E3", "update", "succeeded")
    [(_, body)] = workspace.query(
        "SELECT method, request_body FROM attempt WHERE operation_id = ? ORDER BY id DESC LIMIT 1", op["id"]
    )
    paths = [o["path"] for o in json.loads(body)["Operations"]]
    if "when: create" not in password:
        # A password sent always may go again with a PATCH rebuilt after a 412 (the account read never shows it).
        paths = [p for p in paths if p != "password"]
    assert paths == ["title"]  # the drift alone: no create-only password, no nickName
    assert scim.user("cy.moved@example.com")["title"] == "Engineer"
    assert scim.user("ada.boss@example.com")["nickName"] == "Countess"

    _, again = reconcile(workspace, capsys)
    assert [a["drift"] for a in again["accounts"]] == [[], [], []]
    assert workspace.sync_now().summary()["updated"] == 0
    assert all("Initial-Pa55word!" not in applied for (applied,) in workspace.query("SELECT applied FROM account_link"))
