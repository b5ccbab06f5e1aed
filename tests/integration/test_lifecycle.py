"""The identity lifecycle against a real SCIM 2.0 server (scim2-server) over HTTP.

Each test writes an HR export and a config into a folder, runs cycles the way
``provisioner sync`` does (``sync_target``), and checks the result by GETting
``/Users`` from the server, never by asking the engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from provisioner.errors import SafetyStop
from provisioner.planner import Decision, Kind, Reason
from provisioner.queue import enqueue
from provisioner.store import open_store
from tests.conftest import ENTERPRISE, HR_COLUMNS, ScimReader, Workspace, hr_row

CORE_USER = "urn:ietf:params:scim:schemas:core:2.0:User"

ADA = hr_row("E1001", "Ada", "Lovelace", title="Head of Engineering", phone="+44 20 7946 0001")
GRACE = hr_row("E1002", "Grace", "Hopper", department="Sales", cost_center="CC-200", division="Commercial")
ALAN = hr_row("E1003", "Alan", "Turing", department="Finance", cost_center="CC-300", manager_id="E1001")


def line_of(path: Path, prefix: str) -> int:
    """The 1-based line of ``path`` whose stripped text starts with ``prefix``."""
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if text.strip().startswith(prefix):
            return number
    raise AssertionError(f"{prefix!r} is not in {path}")


def email(row: dict[str, str]) -> str:
    return row["email"]


# --- joiner ------------------------------------------------------------------------------------


async def test_joiner_is_created_with_core_and_enterprise_attributes(workspace: Workspace, scim: ScimReader) -> None:
    workspace.write_source([ADA])

    report = await workspace.sync()

    assert report.summary()["created"] == 1
    user = scim.user(email(ADA))
    assert set(user["schemas"]) == {CORE_USER, ENTERPRISE}
    assert user["externalId"] == ADA["employee_id"]
    assert user["name"] == {"givenName": "Ada", "familyName": "Lovelace", "formatted": "Ada Lovelace"}
    assert user["displayName"] == "Ada Lovelace"
    assert user["title"] == ADA["title"]
    assert user["active"] is True
    assert user["emails"] == [{"value": email(ADA), "type": "work", "primary": True}]
    assert user["phoneNumbers"] == [{"value": ADA["phone"], "type": "work"}]
    enterprise = user[ENTERPRISE]
    assert enterprise["employeeNumber"] == ADA["employee_id"]
    assert enterprise["department"] == ADA["department"]
    assert enterprise["costCenter"] == ADA["cost_center"]
    assert enterprise["division"] == ADA["division"]
    assert enterprise["organization"] == "Example Corp"  # a literal of the shipped mapping
    assert "manager" not in enterprise  # Ada has no manager


async def test_joiner_is_recorded_as_a_succeeded_create_linked_to_the_server_id(
    workspace: Workspace, scim: ScimReader
) -> None:
    workspace.write_source([ADA])

    await workspace.sync()

    [op] = workspace.operations()
    assert (op["identity_key"], op["kind"], op["reason"], op["status"]) == ("E1001", "create", "joiner", "succeeded")
    assert op["last_http_status"] == 201
    [(scim_id, active)] = workspace.query("SELECT scim_id, active FROM account_link WHERE identity_key = 'E1001'")
    assert scim_id == scim.user(email(ADA))["id"]
    assert active == 1


async def test_empty_columns_leave_attributes_out_of_the_created_user(workspace: Workspace, scim: ScimReader) -> None:
    """An empty phone gives no phoneNumbers item; an empty title no title."""
    workspace.write_source([hr_row("E1004", "Edsger", "Dijkstra", phone="", title="")])

    await workspace.sync()

    user = scim.user("edsger.dijkstra@example.com")
    assert "phoneNumbers" not in user
    assert "title" not in user


async def test_second_cycle_without_source_change_sends_nothing(workspace: Workspace, scim: ScimReader) -> None:
    workspace.write_source([ADA, GRACE, ALAN])
    await workspace.sync()
    operations, attempts = workspace.count("operation"), workspace.count("attempt")
    before = {row["userName"]: row["meta"] for row in scim.all()}

    report = await workspace.sync()

    summary = report.summary()
    assert summary["unchanged"] == 3
    assert [summary[k] for k in ("created", "updated", "enabled", "disabled", "deleted", "failed", "deferred")] == [0] * 7
    assert workspace.count("operation") == operations
    assert workspace.count("attempt") == attempts
    after = {row["userName"]: row["meta"] for row in scim.all()}
    assert {name: meta["version"] for name, meta in after.items()} == {
        name: meta["version"] for name, meta in before.items()
    }
    assert {name: meta["lastModified"] for name, meta in after.items()} == {
        name: meta["lastModified"] for name, meta in before.items()
    }


# --- mover -------------------------------------------------------------------------------------


@pytest.mark.parametrize("update_method", ["patch", "put"])
async def test_mover_department_change_reaches_the_server(
    workspace: Workspace, scim: ScimReader, update_method: str
) -> None:
    workspace.write_config(update_method=update_method)
    workspace.write_source([ADA, GRACE])
    await workspace.sync()
    created = scim.user(email(GRACE))

    workspace.write_source([ADA, {**GRACE, "department": "Research", "cost_center": "CC-900"}])
    report = await workspace.sync()

    assert report.summary()["updated"] == 1
    assert report.summary()["unchanged"] == 1
    moved = scim.user(email(GRACE))
    assert moved["id"] == created["id"]
    assert moved[ENTERPRISE]["department"] == "Research"
    assert moved[ENTERPRISE]["costCenter"] == "CC-900"
    assert moved["active"] is True
    update = workspace.operations()[-1]
    assert (update["identity_key"], update["kind"], update["reason"], update["status"]) == (
        "E1002", "update", "mover", "succeeded",
    )  # fmt: skip


@pytest.mark.parametrize("update_method", ["patch", "put"])
async def test_mover_whose_phone_is_emptied_loses_the_phone_on_the_server(
    workspace: Workspace, scim: ScimReader, update_method: str
) -> None:
    workspace.write_config(update_method=update_method)
    workspace.write_source([ADA])
    await workspace.sync()
    assert "phoneNumbers" in scim.user(email(ADA))

    workspace.write_source([{**ADA, "phone": ""}])
    await workspace.sync()

    user = scim.user(email(ADA))
    assert "phoneNumbers" not in user
    assert user["title"] == ADA["title"]


async def test_mover_is_applied_once_then_the_next_cycle_is_quiet(workspace: Workspace, scim: ScimReader) -> None:
    workspace.write_source([GRACE])
    await workspace.sync()
    workspace.write_source([{**GRACE, "title": "VP Sales"}])
    await workspace.sync()
    version = scim.user(email(GRACE))["meta"]["version"]
    operations = workspace.count("operation")

    report = await workspace.sync()

    assert report.summary()["unchanged"] == 1
    assert workspace.count("operation") == operations
    assert scim.user(email(GRACE))["meta"]["version"] == version


# --- leaver and rehire -------------------------------------------------------------------------


def _removed(rows: list[dict[str, str]], who: dict[str, str]) -> list[dict[str, str]]:
    return [row for row in rows if row["employee_id"] != who["employee_id"]]


def _terminated(rows: list[dict[str, str]], who: dict[str, str]) -> list[dict[str, str]]:
    return [{**row, "status": "terminated"} if row["employee_id"] == who["employee_id"] else row for row in rows]


def _out_of_scope(rows: list[dict[str, str]], who: dict[str, str]) -> list[dict[str, str]]:
    return [{**row, "department": "Contractors"} if row["employee_id"] == who["employee_id"] else row for row in rows]


LEAVING = [
    pytest.param(_removed, id="removed-from-source"),
    pytest.param(_terminated, id="status-terminated"),
    pytest.param(_out_of_scope, id="moved-out-of-scope"),
]


@pytest.mark.parametrize("leave", LEAVING)
async def test_leaver_is_disabled_on_the_server_and_others_are_untouched(
    workspace: Workspace, scim: ScimReader, leave: Any
) -> None:
    team = [ADA, GRACE]
    workspace.write_source(team)
    await workspace.sync()
    ada_version = scim.user(email(ADA))["meta"]["version"]

    workspace.write_source(leave(team, GRACE))
    report = await workspace.sync()

    assert report.summary()["disabled"] == 1
    assert scim.user(email(GRACE))["active"] is False
    ada = scim.user(email(ADA))
    assert ada["active"] is True
    assert ada["meta"]["version"] == ada_version
    leaver = workspace.operations()[-1]
    assert (leaver["identity_key"], leaver["kind"], leaver["reason"], leaver["status"]) == (
        "E1002", "disable", "leaver", "succeeded",
    )  # fmt: skip


@pytest.mark.parametrize("leave", LEAVING)
async def test_rehire_enables_the_same_account_again(workspace: Workspace, scim: ScimReader, leave: Any) -> None:
    team = [ADA, GRACE]
    workspace.write_source(team)
    await workspace.sync()
    account = scim.user(email(GRACE))["id"]
    workspace.write_source(leave(team, GRACE))
    await workspace.sync()
    assert scim.user(email(GRACE))["active"] is False

    workspace.write_source(team)
    report = await workspace.sync()

    assert report.summary()["enabled"] == 1
    rehired = scim.user(email(GRACE))
    assert rehired["active"] is True
    assert rehired["id"] == account
    rehire = workspace.operations()[-1]
    assert (rehire["kind"], rehire["reason"], rehire["status"]) == ("enable", "rehire", "succeeded")


async def test_rehire_with_a_changed_record_carries_the_change(workspace: Workspace, scim: ScimReader) -> None:
    workspace.write_source([ADA, GRACE])
    await workspace.sync()
    workspace.write_source([ADA])
    await workspace.sync()

    workspace.write_source([ADA, {**GRACE, "department": "Marketing"}])
    await workspace.sync()

    grace = scim.user(email(GRACE))
    assert grace["active"] is True
    assert grace[ENTERPRISE]["department"] == "Marketing"


async def test_leaver_already_disabled_is_not_sent_again(workspace: Workspace, scim: ScimReader) -> None:
    workspace.write_source([ADA, GRACE])
    await workspace.sync()
    workspace.write_source([ADA])
    await workspace.sync()
    operations = workspace.count("operation")
    version = scim.user(email(GRACE))["meta"]["version"]

    await workspace.sync()

    assert workspace.count("operation") == operations
    assert scim.user(email(GRACE))["meta"]["version"] == version


async def test_leaver_with_delete_policy_is_removed_from_the_server(workspace: Workspace, scim: ScimReader) -> None:
    workspace.write_config(leaver="delete")
    workspace.write_source([ADA, GRACE])
    await workspace.sync()

    workspace.write_source([ADA])
    report = await workspace.sync()

    assert report.summary()["deleted"] == 1
    assert scim.find(email(GRACE)) == []
    assert scim.user(email(ADA))["active"] is True
    leaver = workspace.operations()[-1]
    assert (leaver["kind"], leaver["reason"], leaver["status"]) == ("delete", "leaver", "succeeded")
    assert workspace.query("SELECT count(*) FROM account_link WHERE identity_key = 'E1002'") == [(0,)]


async def test_terminated_record_never_provisioned_is_not_created(workspace: Workspace, scim: ScimReader) -> None:
    workspace.write_source([ADA, {**GRACE, "status": "terminated"}])

    report = await workspace.sync()

    assert report.summary()["created"] == 1
    assert scim.find(email(GRACE)) == []


# --- manager references ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "order",
    [pytest.param("manager-first", id="manager-first"), pytest.param("report-first", id="report-first")],
)
async def test_manager_reference_is_the_managers_scim_id_after_one_cycle(
    workspace: Workspace, scim: ScimReader, order: str
) -> None:
    rows = [ADA, ALAN] if order == "manager-first" else [ALAN, ADA]
    workspace.write_source(rows)

    await workspace.sync()

    manager = scim.user(email(ADA))
    report = scim.user(email(ALAN))
    assert report[ENTERPRISE]["manager"]["value"] == manager["id"]


async def test_manager_reference_resolved_in_the_first_cycle_is_not_sent_again(
    workspace: Workspace, scim: ScimReader
) -> None:
    workspace.write_source([ALAN, ADA])
    await workspace.sync()
    operations = workspace.count("operation")

    report = await workspace.sync()

    assert report.summary()["unchanged"] == 2
    assert workspace.count("operation") == operations


async def test_manager_change_points_the_report_at_the_new_manager(workspace: Workspace, scim: ScimReader) -> None:
    workspace.write_source([ADA, GRACE, ALAN])
    await workspace.sync()

    workspace.write_source([ADA, GRACE, {**ALAN, "manager_id": GRACE["employee_id"]}])
    await workspace.sync()

    assert scim.user(email(ALAN))[ENTERPRISE]["manager"]["value"] == scim.user(email(GRACE))["id"]


async def test_manager_missing_from_the_source_leaves_the_manager_out(workspace: Workspace, scim: ScimReader) -> None:
    workspace.write_source([{**ALAN, "manager_id": "E9999"}])

    report = await workspace.sync()

    assert report.failed == 0
    alan = scim.user(email(ALAN))
    assert "manager" not in alan[ENTERPRISE]
    assert alan[ENTERPRISE]["department"] == ALAN["department"]


# --- bad records -------------------------------------------------------------------------------


async def test_record_missing_its_email_is_a_failed_row_naming_file_line_and_attribute(
    workspace: Workspace, scim: ScimReader
) -> None:
    """A JSON Lines record without ``email`` cannot render ``userName``; the others are created."""
    workspace.write_config(source_type="jsonl")
    broken = {k: v for k, v in GRACE.items() if k != "email"}
    workspace.write_source([ADA, broken, ALAN])

    report = await workspace.sync()

    assert report.summary()["created"] == 2
    assert report.failed == 1
    assert scim.user(email(ADA))["active"] is True
    assert scim.user(email(ALAN))["active"] is True
    assert len(scim.all()) == 2
    [failed] = [op for op in workspace.operations() if op["status"] == "failed"]
    assert (failed["identity_key"], failed["kind"], failed["reason"]) == ("E1002", "create", "joiner")
    reason = failed["last_error"]
    assert f"{workspace.source_path}:2" in reason
    assert f"{workspace.mapping_path}:{line_of(workspace.mapping_path, 'userName:')}" in reason
    assert "'userName'" in reason
    assert "email" in reason


async def test_csv_record_with_an_empty_email_is_rejected_naming_the_user_name_attribute(
    workspace: Workspace, scim: ScimReader
) -> None:
    workspace.write_source([ADA, {**GRACE, "email": ""}])

    report = await workspace.sync()

    assert report.summary()["created"] == 1
    [failed] = [op for op in workspace.operations() if op["status"] == "failed"]
    assert failed["identity_key"] == "E1002"
    assert f"{workspace.mapping_path}:{line_of(workspace.mapping_path, 'userName:')}" in failed["last_error"]
    assert "'userName'" in failed["last_error"]
    # Nothing was sent for a record that cannot be a valid SCIM User.
    assert workspace.count("attempt") == 1


async def test_duplicate_identity_key_rejects_both_records_and_creates_no_account_for_either(
    workspace: Workspace, scim: ScimReader
) -> None:
    """Which of two records is the person is not guessed: neither gets an account until one key is left."""
    twin = hr_row("E1001", "Augusta", "King")
    workspace.write_source([ADA, GRACE, twin])

    report = await workspace.sync()

    assert report.failed == 2
    assert scim.find(email(twin)) == [] and scim.find(email(ADA)) == []
    assert scim.user(email(GRACE))["active"] is True
    failed = [op for op in workspace.operations() if op["status"] == "failed"]
    assert {op["identity_key"] for op in failed} == {"E1001"}
    assert sorted(str(op["last_error"]).split(": employee_id 'E1001' appears 2 times")[0] for op in failed) == [
        f"{workspace.source_path}:2", f"{workspace.source_path}:4",
    ]  # fmt: skip


async def test_record_that_turns_bad_is_not_deprovisioned(workspace: Workspace, scim: ScimReader) -> None:
    """A row with more fields than the header is rejected for review; its account stays active."""
    workspace.write_source([ADA, GRACE])
    await workspace.sync()
    header = ",".join(HR_COLUMNS)
    good = ",".join(ADA[c] for c in HR_COLUMNS)
    bad = ",".join(GRACE[c] for c in HR_COLUMNS) + ",unexpected"
    workspace.source_path.write_text(f"{header}\n{good}\n{bad}\n", encoding="utf-8")

    report = await workspace.sync()

    assert report.summary()["disabled"] == 0
    assert report.failed == 1
    assert scim.user(email(GRACE))["active"] is True
    failed = workspace.operations()[-1]
    assert (failed["identity_key"], failed["status"]) == ("E1002", "failed")
    assert f"{workspace.source_path}:3" in failed["last_error"]


async def test_fixed_record_supersedes_its_failed_row_and_is_created(workspace: Workspace, scim: ScimReader) -> None:
    workspace.write_config(source_type="jsonl")
    workspace.write_source([ADA, {k: v for k, v in GRACE.items() if k != "email"}])
    await workspace.sync()

    workspace.write_source([ADA, GRACE])
    report = await workspace.sync()

    assert report.summary()["created"] == 1
    assert scim.user(email(GRACE))["active"] is True
    statuses = [(op["identity_key"], op["kind"], op["status"]) for op in workspace.operations()]
    assert ("E1002", "create", "superseded") in statuses
    assert ("E1002", "create", "succeeded") in statuses


# --- safety ------------------------------------------------------------------------------------


async def test_emptied_source_raises_safety_stop_and_disables_nobody(workspace: Workspace, scim: ScimReader) -> None:
    workspace.write_source([ADA, GRACE])
    await workspace.sync()
    operations = workspace.count("operation")

    workspace.write_source([])
    with pytest.raises(SafetyStop, match="2 linked accounts"):
        await workspace.sync()

    assert [user["active"] for user in scim.all()] == [True, True]
    assert workspace.count("operation") == operations


async def test_source_of_only_bad_records_raises_safety_stop(workspace: Workspace, scim: ScimReader) -> None:
    """Records that cannot be read are not evidence that everyone left."""
    workspace.write_source([ADA, GRACE])
    await workspace.sync()
    header = ",".join(HR_COLUMNS)
    workspace.source_path.write_text(f"{header}\n,,,,,,,,,,\n", encoding="utf-8")

    with pytest.raises(SafetyStop):
        await workspace.sync()

    assert [user["active"] for user in scim.all()] == [True, True]


# --- queue and source edge cases ---------------------------------------------------------------


async def test_truncated_csv_row_creates_no_account(workspace: Workspace, scim: ScimReader) -> None:
    header = ",".join(HR_COLUMNS)
    good = ",".join(ADA[c] for c in HR_COLUMNS)
    workspace.source_path.write_text(f"{header}\n{good}\nE1002,Grace\n", encoding="utf-8")

    report = await workspace.sync()

    assert sorted(user["userName"] for user in scim.all()) == [email(ADA)]
    assert report.failed == 1


async def test_open_leaver_operation_is_dropped_when_the_person_is_back_in_the_source(
    workspace: Workspace, scim: ScimReader
) -> None:
    workspace.write_source([ADA, GRACE])
    await workspace.sync()
    # Grace was missing from one export; that cycle queued her leaver but could not send it.
    engine = open_store(f"sqlite:///{workspace.db_path}")
    enqueue(engine, "earlier-run", "app", [Decision("E1002", Kind.DISABLE, Reason.LEAVER)])
    engine.dispose()

    report = await workspace.sync()  # the export has Grace again

    assert scim.user(email(GRACE))["active"] is True
    assert report.summary()["disabled"] == 0
