"""`plan` shows the group changes that `sync` then makes: joiners' memberships, rehires', leavers'."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from provisioner.cli import main
from tests.conftest import Workspace, hr_row, write_csv

GROUPS = 'groups:\n  - name: "dept-{{ department | lower }}"\n    key: "department:{{ department }}"\n  - name: all-staff\n'


def planned(workspace: Workspace, capsys: pytest.CaptureFixture[str]) -> set[tuple[str, str]]:
    """(kind, note) of each group operation the plan shows, written as the queue writes its note."""
    capsys.readouterr()  # what ran before
    assert main(["plan", "--json", "--config", str(workspace.config_path)]) == 0
    [plan] = json.loads(capsys.readouterr().out)
    found = set()
    for op in plan["groups"]["operations"]:
        note = f"group {op['group']!r}" + (f" +{op['add']} members" if op["add"] else "")
        found.add((op["kind"], note + (f" -{op['remove']} members" if op["remove"] else "")))
    return found


def synced(workspace: Workspace, run: int) -> set[tuple[str, str]]:
    rows = workspace.query("SELECT kind, note, run_id FROM operation WHERE kind LIKE 'group_%' ORDER BY id")
    runs = list(dict.fromkeys(r[2] for r in rows))  # in the order the cycles ran
    return {(kind, note) for kind, note, run_id in rows if run_id == runs[run]}


def test_plan_shows_the_group_changes_of_joiners_and_rehires_that_sync_makes(
    workspace: Workspace, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    groups = workspace.root / "groups.yaml"
    groups.write_text(GROUPS)
    workspace.write_config(groups="groups.yaml")
    ada, grace = hr_row("E1", "Ada", "Lovelace"), hr_row("E2", "Grace", "Hopper", department="Sales")
    write_csv(workspace.source_path, [ada, grace])

    joiners = planned(workspace, capsys)
    assert main(["sync", "--config", str(workspace.config_path)]) == 0
    assert joiners == synced(workspace, 0)
    assert joiners == {
        ("group_create", "group 'dept-engineering' +1 members"),
        ("group_create", "group 'dept-sales' +1 members"),
        ("group_create", "group 'all-staff' +2 members"),
    }

    write_csv(workspace.source_path, [ada, {**grace, "status": "terminated"}])
    leaver = planned(workspace, capsys)
    assert main(["sync", "--config", str(workspace.config_path)]) == 0
    assert leaver == synced(workspace, 1) and leaver

    write_csv(workspace.source_path, [ada, grace])
    rehire = planned(workspace, capsys)
    assert main(["sync", "--config", str(workspace.config_path)]) == 0
    assert rehire == synced(workspace, 2)
    assert rehire == {("group_members", "group 'dept-sales' +1 members"), ("group_members", "group 'all-staff' +1 members")}
