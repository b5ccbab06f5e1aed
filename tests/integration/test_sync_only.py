"""`provisioner sync --only KEY…`, end to end against a real SCIM server: those identities, now, step by step."""

from __future__ import annotations

import re
from typing import Any

import pytest

from provisioner.cli import main
from tests.conftest import ENTERPRISE, ScimReader, Workspace, hr_row

GROUPS = 'groups:\n  - name: "dept-{{ department | lower }}"\n  - name: all-staff\n'


def members(scim: ScimReader) -> dict[str, set[str]]:
    """Each group's displayName -> the userNames of its members, read from the server."""
    ids = {user["id"]: user["userName"] for user in scim.all()}
    groups = scim.http.get("Groups", params={"count": 1000}).json().get("Resources") or []
    return {g["displayName"]: {ids.get(m["value"], m["value"]) for m in g.get("members") or []} for g in groups}


class Done:
    def __init__(self, code: int, stdout: str) -> None:
        self.returncode = code
        self.stdout = stdout


def sync_only(workspace: Workspace, capsys: pytest.CaptureFixture[str], *keys: str) -> Done:
    """``provisioner sync --only KEY…`` in this process, as the command line runs it."""
    capsys.readouterr()
    code = main(["sync", "--config", str(workspace.config_path), "--only", *keys])
    return Done(code, capsys.readouterr().out)


def by_name(scim: ScimReader) -> dict[str, dict[str, Any]]:
    return {user["userName"]: user for user in scim.all()}


def setup(workspace: Workspace) -> list[dict[str, str]]:
    (workspace.root / "groups.yaml").write_text(GROUPS)
    workspace.write_config(groups="groups.yaml")
    people = [hr_row("E1", "Ada", "Lovelace"), hr_row("E2", "Grace", "Hopper"), hr_row("E3", "Alan", "Turing")]
    workspace.write_source(people)
    assert workspace.sync_now().failed == 0
    return people


def test_only_the_keys_asked_for_are_planned_and_sent_and_nobody_else_is_a_leaver(
    workspace: Workspace, scim: ScimReader, capsys: pytest.CaptureFixture[str]
) -> None:
    ada, grace, alan = setup(workspace)
    # For a full cycle: Alan left, Grace moved to Sales, Edsger joined, Ada's title changed.
    edsger = hr_row("E4", "Edsger", "Dijkstra", department="Research")
    workspace.write_source([{**ada, "title": "Countess"}, {**grace, "department": "Sales"}, edsger])

    done = sync_only(workspace, capsys, "E4", "E2")

    assert done.returncode == 0, done.stdout + done.stderr
    users = by_name(scim)
    assert users["edsger.dijkstra@example.com"]["active"] is True
    assert users["alan.turing@example.com"]["active"] is True  # not a leaver: not asked for
    assert users["ada.lovelace@example.com"]["title"] == "Engineer"  # not asked for: not updated
    # The latest run's rows by their id: two runs in one second have run ids in random order.
    latest = "(SELECT run_id FROM operation ORDER BY id DESC LIMIT 1)"
    assert {(k, s) for k, s in workspace.query("SELECT identity_key, kind FROM operation WHERE kind NOT LIKE 'group_%' "
                                               f"AND run_id = {latest}")} == {  # noqa: S608 - our own SQL
        ("E4", "create"), ("E2", "update")}  # fmt: skip
    groups = members(scim)
    assert groups["dept-research"] == {"edsger.dijkstra@example.com"}
    assert groups["dept-sales"] == {"grace.hopper@example.com"}
    assert "grace.hopper@example.com" not in groups["dept-engineering"]
    assert "alan.turing@example.com" in groups["dept-engineering"]  # Alan's membership is not theirs to change
    assert "edsger.dijkstra@example.com" in groups["all-staff"]

    # Each step, as it happens: rendered, planned, every request with the target's latency, the result.
    out = done.stdout.splitlines()
    first = {step: next(i for i, line in enumerate(out) if re.search(pattern, line)) for step, pattern in {
        "rendered": r"^app: E4: rendered \{.*\"userName\":\"edsger.dijkstra@example.com\"",
        "planned": r"^app: E4: planned create \(joiner\)$",
        "sent": r"^app:   POST /Users → 201 in \d+ ms$",
        "result": r"^app: E4: create succeeded in \d+ ms",
        "group": r"^app: group dept-research: planned group_create \+\[E4\]$",
    }.items()}  # fmt: skip
    assert first["rendered"] < first["planned"] < first["sent"] < first["result"] < first["group"]
    assert any(re.fullmatch(r"app:   PATCH /Users/[\w-]+ → 20[04] in \d+ ms", line) for line in out)
    assert "app: E2: planned update (mover)" in out
    assert re.search(r"^app: ok  succeeded \d+  \(run ", out[-1])


def test_a_key_not_in_the_source_is_said_and_the_exit_code_says_so(
    workspace: Workspace, scim: ScimReader, capsys: pytest.CaptureFixture[str]
) -> None:
    setup(workspace)
    workspace.write_source([hr_row("E1", "Ada", "Lovelace")])  # E2 and E3 are gone: leavers for a full cycle

    done = sync_only(workspace, capsys, "E2", "E9")

    assert done.returncode == 4
    assert "app: E2: not in the source; nothing planned (a full sync handles leavers)" in done.stdout
    assert "app: E9: not in the source; nothing planned (a full sync handles leavers)" in done.stdout
    assert all(user["active"] for user in scim.all())
    assert workspace.query("SELECT count(*) FROM operation WHERE kind IN ('disable', 'delete')") == [(0,)]


def test_a_record_that_cannot_be_mapped_fails_the_exit_code_and_the_others_go_through(
    workspace: Workspace, scim: ScimReader, capsys: pytest.CaptureFixture[str]
) -> None:
    setup(workspace)
    workspace.write_source([hr_row("E1", "Ada", "Lovelace"), hr_row("E2", "Grace", "Hopper"),
                            hr_row("E3", "Alan", "Turing"), hr_row("E5", "Blank", "Mail", email="")])  # fmt: skip

    done = sync_only(workspace, capsys, "E5", "E3")

    assert done.returncode == 4
    assert re.search(r"^app: E5: rejected: .*userName", done.stdout, re.M)
    assert "app: E3: planned nothing: the account already holds what the record renders to" in done.stdout
    assert "not ok" in done.stdout.splitlines()[-1]


def test_an_unchanged_identity_whose_manager_is_not_asked_for_is_not_sent(
    workspace: Workspace, scim: ScimReader, capsys: pytest.CaptureFixture[str]
) -> None:
    # Grace's mapping refers to Ada (ref(manager_id)); only Grace is asked for.
    workspace.write_source([hr_row("E1", "Ada", "Lovelace"), hr_row("E2", "Grace", "Hopper", manager_id="E1")])
    assert workspace.sync_now().failed == 0
    grace = scim.user("grace.hopper@example.com")
    # Set by hand in the target, outside the mapping: a write of the whole resource would drop it.
    patch = {"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
             "Operations": [{"op": "add", "path": "nickName", "value": "gracie"}]}  # fmt: skip
    assert scim.http.patch(f"Users/{grace['id']}", json=patch).status_code in (200, 204)
    assert scim.user("grace.hopper@example.com")["nickName"] == "gracie"
    attempts = workspace.count("attempt")

    done = sync_only(workspace, capsys, "E2")

    assert done.returncode == 0, done.stdout
    assert "app: E2: planned nothing: the account already holds what the record renders to" in done.stdout
    assert workspace.count("attempt") == attempts  # no request at all
    assert not re.search(r"^app:   (PUT|PATCH) ", done.stdout, re.M)
    after = by_name(scim)
    assert after["grace.hopper@example.com"]["nickName"] == "gracie"
    assert after["grace.hopper@example.com"][ENTERPRISE]["manager"]["value"] == after["ada.lovelace@example.com"]["id"]


def test_only_an_omit_if_empty_value_going_empty_is_said_unchanged_and_sends_nothing(
    workspace: Workspace, scim: ScimReader, capsys: pytest.CaptureFixture[str]
) -> None:
    text = workspace.mapping_path.read_text()
    omitted = "  title:\n    value: title\n    omit_if_empty: true\n"
    workspace.mapping_path.write_text(text.replace("  title: title\n", omitted, 1))
    workspace.write_source([hr_row("E1", "Ada", "Lovelace")])
    assert workspace.sync_now().failed == 0
    workspace.write_source([hr_row("E1", "Ada", "Lovelace", title="")])
    attempts = workspace.count("attempt")

    done = sync_only(workspace, capsys, "E1")

    assert done.returncode == 0, done.stdout
    assert workspace.count("attempt") == attempts
    assert scim.user("ada.lovelace@example.com")["title"] == "Engineer"
    said = r"^app: E1: unchanged in \d+ ms: kept title \(omit_if_empty\); nothing to send$"
    assert re.search(said, done.stdout, re.M)
    assert not re.search(r"^app: E1: update succeeded", done.stdout, re.M)
    assert re.search(r"^app: ok  unchanged 1  \(run ", done.stdout.splitlines()[-1])
