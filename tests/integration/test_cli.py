"""The ``provisioner`` command line, run as a user runs it: a subprocess against a real SCIM server.

Exit codes are the README's: 0 ok, 3 config/mapping/source error, 4 failed
operations, 5 refused for safety. Errors are one clear line naming
``file:line``, never a traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ENTERPRISE, HR_COLUMNS, TOKEN_VARIABLE, ScimReader, Workspace, hr_row, write_csv

ADA = hr_row("E1001", "Ada", "Lovelace")
GRACE = hr_row("E1002", "Grace", "Hopper", department="Sales", manager_id="E1001")
ALAN = hr_row("E1003", "Alan", "Turing", department="Finance")


def provisioner(workspace: Workspace, *args: str, token: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``python -m provisioner ARGS --config config.yaml`` in the workspace folder."""
    env = {k: v for k, v in os.environ.items() if k != TOKEN_VARIABLE}
    if token:
        env[TOKEN_VARIABLE] = workspace.server.token
    command = [sys.executable, "-m", "provisioner", "--log-format", "json", *args]
    if "--config" not in args:
        command += ["--config", str(workspace.config_path)]
    return subprocess.run(command, cwd=workspace.root, env=env, capture_output=True, text=True, timeout=120)


def line_of(path: Path, prefix: str) -> int:
    """The 1-based line of ``path`` whose stripped text starts with ``prefix``."""
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if text.strip().startswith(prefix):
            return number
    raise AssertionError(f"{prefix!r} is not in {path}")


def replace_in_mapping(workspace: Workspace, old: str, new: str) -> None:
    text = workspace.mapping_path.read_text(encoding="utf-8")
    assert old in text
    workspace.mapping_path.write_text(text.replace(old, new, 1), encoding="utf-8")


def with_profile_urls(workspace: Workspace, urls: dict[str, str]) -> None:
    """Map ``profileUrl`` from a new column; the target rejects a value that is not a URI (400 invalidValue)."""
    if "profileUrl" not in workspace.mapping_path.read_text(encoding="utf-8"):
        replace_in_mapping(workspace, "  title: title\n", "  title: title\n  profileUrl: profile_url\n")
    rows = [{**row, "profile_url": urls[row["employee_id"]]} for row in (ADA, GRACE)]
    write_csv(workspace.source_path, rows, [*HR_COLUMNS, "profile_url"])


GOOD_URL = "https://people.example.com/ada"


# --- sync ---------------------------------------------------------------------------------------


def test_sync_exits_0_and_prints_what_it_did(workspace: Workspace, scim: ScimReader) -> None:
    workspace.write_source([ADA, GRACE])

    result = provisioner(workspace, "sync", "--json")

    assert result.returncode == 0, result.stderr
    [summary] = json.loads(result.stdout)
    assert summary["target"] == "app"
    assert (summary["created"], summary["failed"]) == (2, 0)
    assert scim.user(ADA["email"])["active"] is True
    assert scim.user(GRACE["email"])[ENTERPRISE]["manager"]["value"] == scim.user(ADA["email"])["id"]


def test_sync_twice_exits_0_with_nothing_to_do_and_says_so(workspace: Workspace) -> None:
    workspace.write_source([ADA, GRACE])
    assert workspace.sync_now().failed == 0

    result = provisioner(workspace, "sync")

    assert result.returncode == 0, result.stderr
    [line] = result.stdout.splitlines()
    assert line.startswith("app: created 0  updated 0 ")
    assert "unchanged 2" in line and "failed 0" in line


def test_sync_exits_4_when_the_target_rejects_an_operation(workspace: Workspace, scim: ScimReader) -> None:
    with_profile_urls(workspace, {"E1001": GOOD_URL, "E1002": "not a url"})

    result = provisioner(workspace, "sync", "--json")

    assert result.returncode == 4, result.stderr
    assert "Traceback" not in result.stderr
    [summary] = json.loads(result.stdout)
    assert (summary["created"], summary["failed"]) == (1, 1)
    assert scim.user(ADA["email"])["profileUrl"] == GOOD_URL
    assert scim.find(GRACE["email"]) == []


def test_sync_exits_0_after_the_failed_record_is_fixed(workspace: Workspace, scim: ScimReader) -> None:
    with_profile_urls(workspace, {"E1001": GOOD_URL, "E1002": "not a url"})
    assert workspace.sync_now().failed == 1

    with_profile_urls(workspace, {"E1001": GOOD_URL, "E1002": "https://people.example.com/grace"})
    result = provisioner(workspace, "sync")

    assert result.returncode == 0, result.stderr
    assert scim.user(GRACE["email"])["profileUrl"] == "https://people.example.com/grace"


BROKEN_MAPPINGS = [
    pytest.param("  title: title\n", "  titel: title\n", "titel", "did you mean 'title'", id="unknown-attribute"),
    pytest.param(
        '  displayName: "{{ first_name }} {{ last_name }}"\n', '  displayName: "{{ first_name }} {{ last_name"\n',
        "displayName", "invalid expression", id="invalid-jinja-syntax",
    ),
    pytest.param("  title: title\n", "  active: true\n", "active", "cannot be mapped", id="engine-managed-attribute"),
    pytest.param("  userName: email | lower\n", "  userName: email | lowr\n", "userName", "lowr", id="unknown-filter"),
]  # fmt: skip


@pytest.mark.parametrize(("old", "new", "attribute", "message"), BROKEN_MAPPINGS)
def test_sync_exits_3_for_a_broken_mapping_naming_file_line_and_attribute(
    workspace: Workspace, scim: ScimReader, old: str, new: str, attribute: str, message: str
) -> None:
    replace_in_mapping(workspace, old, new)
    line = line_of(workspace.mapping_path, new.strip())
    workspace.write_source([ADA, GRACE])

    result = provisioner(workspace, "sync")

    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    assert f"{workspace.mapping_path}:{line}" in result.stderr
    assert attribute in result.stderr
    assert message in result.stderr
    assert scim.all() == []


def test_check_reports_a_broken_mapping_with_exit_3(workspace: Workspace) -> None:
    replace_in_mapping(workspace, "  title: title\n", "  titel: title\n")
    workspace.write_source([ADA])

    result = provisioner(workspace, "check")

    assert result.returncode == 3
    assert f"{workspace.mapping_path}:{line_of(workspace.mapping_path, 'titel:')}" in result.stderr


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        pytest.param("    leaver: delete\n", "    leavr: delete\n", "leavr", id="target-key"),
    ],
)
def test_sync_exits_3_for_an_unknown_config_key_naming_file_line(
    workspace: Workspace, scim: ScimReader, old: str, new: str, key: str
) -> None:
    workspace.write_config(leaver="delete")
    text = workspace.config_path.read_text(encoding="utf-8")
    assert old in text
    workspace.config_path.write_text(text.replace(old, new), encoding="utf-8")
    workspace.write_source([ADA])

    result = provisioner(workspace, "sync")

    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    assert f"{workspace.config_path}:{line_of(workspace.config_path, key + ':')}" in result.stderr
    assert key in result.stderr
    assert "unknown key" in result.stderr
    assert scim.all() == []


def test_sync_exits_3_for_an_http_target_without_allow_insecure_http(workspace: Workspace, scim: ScimReader) -> None:
    text = workspace.config_path.read_text(encoding="utf-8")
    workspace.config_path.write_text(text.replace("    allow_insecure_http: true\n", ""), encoding="utf-8")
    workspace.write_source([ADA])

    result = provisioner(workspace, "sync")

    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    assert f"{workspace.config_path}:{line_of(workspace.config_path, 'base_url:')}" in result.stderr
    assert "base_url" in result.stderr
    assert workspace.count("operation") == 0
    assert scim.all() == []


def test_sync_exits_3_when_the_token_variable_is_not_set(workspace: Workspace) -> None:
    workspace.write_source([ADA])

    result = provisioner(workspace, "sync", token=False)

    assert result.returncode == 3
    assert "Traceback" not in result.stderr
    assert f"{workspace.config_path}:{line_of(workspace.config_path, 'auth:')}" in result.stderr
    assert TOKEN_VARIABLE in result.stderr


def test_sync_exits_3_when_the_source_file_is_missing(workspace: Workspace) -> None:
    result = provisioner(workspace, "sync")

    assert result.returncode == 3
    assert "Traceback" not in result.stderr
    assert str(workspace.source_path) in result.stderr


def test_sync_exits_3_for_a_source_in_the_wrong_encoding(workspace: Workspace, scim: ScimReader) -> None:
    header = ",".join(HR_COLUMNS)
    row = ",".join({**ADA, "first_name": "Zoë"}[c] for c in HR_COLUMNS)
    workspace.source_path.write_bytes(f"{header}\n{row}\n".encode("latin-1"))

    result = provisioner(workspace, "sync")

    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    assert str(workspace.source_path) in result.stderr
    assert scim.all() == []


def test_sync_exits_2_for_wrong_usage(workspace: Workspace) -> None:
    result = provisioner(workspace, "sync", "--no-such-option")

    assert result.returncode == 2


def _empty_csv(workspace: Workspace) -> None:
    workspace.write_source([])


def _zero_bytes(workspace: Workspace) -> None:
    workspace.source_path.write_bytes(b"")


@pytest.mark.parametrize(
    "empty",
    [
        pytest.param(_empty_csv, id="header-only"),
        pytest.param(_zero_bytes, id="zero-bytes"),
    ],
)
def test_sync_exits_5_when_the_source_is_emptied_after_a_first_sync(
    workspace: Workspace, scim: ScimReader, empty: Any
) -> None:
    workspace.write_source([ADA, GRACE])
    assert workspace.sync_now().failed == 0
    operations = workspace.count("operation")

    empty(workspace)
    result = provisioner(workspace, "sync")

    assert result.returncode == 5, result.stderr
    assert "Traceback" not in result.stderr
    assert "refused" in result.stderr
    assert [user["active"] for user in scim.all()] == [True, True]
    assert workspace.count("operation") == operations


# --- plan ---------------------------------------------------------------------------------------


def test_plan_json_lists_creates_for_a_new_target(workspace: Workspace, scim: ScimReader) -> None:
    workspace.write_source([ADA, GRACE])

    result = provisioner(workspace, "plan", "--json")

    assert result.returncode == 0, result.stderr
    [plan] = json.loads(result.stdout)
    assert plan["target"] == "app"
    assert plan["counts"]["create"] == 2
    creates = {(op["identity_key"], op["kind"], op["reason"], op["userName"]) for op in plan["operations"]}
    assert creates == {("E1001", "create", "joiner", ADA["email"]), ("E1002", "create", "joiner", GRACE["email"])}
    assert scim.all() == []


def test_plan_json_after_a_change_lists_updates_naming_the_changed_attribute(workspace: Workspace) -> None:
    workspace.write_source([ADA, GRACE, ALAN])
    assert workspace.sync_now().failed == 0
    workspace.write_source([ADA, {**GRACE, "department": "Research"}, {**ALAN, "title": "Cryptanalyst"}])

    result = provisioner(workspace, "plan", "--json")

    assert result.returncode == 0, result.stderr
    [plan] = json.loads(result.stdout)
    assert plan["counts"]["update"] == 2
    assert plan["counts"]["unchanged"] == 1
    changes = {op["identity_key"]: op["changes"] for op in plan["operations"]}
    assert changes == {"E1002": [f"{ENTERPRISE}:department"], "E1003": ["title"]}
    assert all((op["kind"], op["reason"]) == ("update", "mover") for op in plan["operations"])


def test_plan_json_lists_leavers_and_rehires(workspace: Workspace) -> None:
    workspace.write_source([ADA, GRACE, ALAN])
    assert workspace.sync_now().failed == 0
    workspace.write_source([ADA, ALAN])
    assert workspace.sync_now().failed == 0
    workspace.write_source([ADA, GRACE])

    [plan] = json.loads(provisioner(workspace, "plan", "--json").stdout)

    kinds = {op["identity_key"]: (op["kind"], op["reason"]) for op in plan["operations"]}
    assert kinds == {"E1002": ("enable", "rehire"), "E1003": ("disable", "leaver")}


def test_plan_prints_the_changes_and_sends_nothing(workspace: Workspace, scim: ScimReader) -> None:
    workspace.write_source([ADA, GRACE])
    assert workspace.sync_now().failed == 0
    before = sorted((user["userName"], user["active"], user["meta"]["version"]) for user in scim.all())
    operations, attempts = workspace.count("operation"), workspace.count("attempt")
    workspace.write_source([{**ADA, "cost_center": "CC-999"}, ALAN])

    result = provisioner(workspace, "plan")

    assert result.returncode == 0, result.stderr
    lines = {key: line for line in result.stdout.splitlines() for key in ("E1001", "E1002", "E1003") if key in line}
    assert "update" in lines["E1001"] and f"{ENTERPRISE}:costCenter" in lines["E1001"]
    assert "disable" in lines["E1002"] and "leaver" in lines["E1002"]
    assert "create" in lines["E1003"] and ALAN["email"] in lines["E1003"]
    after = sorted((user["userName"], user["active"], user["meta"]["version"]) for user in scim.all())
    assert after == before
    assert (workspace.count("operation"), workspace.count("attempt")) == (operations, attempts)


# --- queue --------------------------------------------------------------------------------------


@pytest.fixture
def failed_workspace(workspace: Workspace) -> Workspace:
    """A workspace after one sync in which the target refused Grace (400 invalidValue on profileUrl)."""
    with_profile_urls(workspace, {"E1001": GOOD_URL, "E1002": "not a url"})
    assert workspace.sync_now().failed == 1
    return workspace


def test_queue_list_json_shows_the_failed_operation_with_its_scim_error(failed_workspace: Workspace) -> None:
    result = provisioner(failed_workspace, "queue", "list", "--json")

    assert result.returncode == 0, result.stderr
    listing = json.loads(result.stdout)
    assert (listing["limit"], listing["truncated"]) == (200, False)
    rows = listing["operations"]
    assert {row["identity_key"]: row["status"] for row in rows} == {"E1001": "succeeded", "E1002": "failed"}
    assert [row["payload"]["userName"] for row in rows if row["identity_key"] == "E1001"] == ["ada.lovelace@example.com"]
    [failed] = [row for row in rows if row["status"] == "failed"]
    assert (failed["kind"], failed["reason"], failed["attempts"]) == ("create", "joiner", 1)
    assert failed["last_http_status"] == 400
    assert failed["last_scim_type"] == "invalidValue"
    assert "profileUrl" in failed["last_detail"]
    assert failed["created_at"] and failed["updated_at"]


def test_queue_list_by_status_prints_the_failed_operation_and_its_problem(failed_workspace: Workspace) -> None:
    result = provisioner(failed_workspace, "queue", "list", "--status", "failed")

    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert "status" in header and "problem" in header
    [row] = rows
    assert "E1002" in row and "failed" in row and "400" in row and "invalidValue" in row


def test_queue_show_json_has_the_operation_and_its_http_call(failed_workspace: Workspace) -> None:
    [failed] = [op for op in failed_workspace.operations() if op["status"] == "failed"]

    result = provisioner(failed_workspace, "queue", "show", str(failed["id"]), "--json")

    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert (shown["id"], shown["identity_key"], shown["kind"], shown["reason"], shown["status"]) == (
        failed["id"], "E1002", "create", "joiner", "failed",
    )  # fmt: skip
    assert shown["attempts"] == 1
    assert shown["last_http_status"] == 400
    assert shown["last_scim_type"] == "invalidValue"
    assert "profileUrl" in shown["last_detail"]
    [call] = shown["calls"]
    assert call["method"] == "POST"
    assert call["url"].endswith("/Users")
    assert call["http_status"] == 400
    assert call["scim_type"] == "invalidValue"
    assert "not a url" in call["request_body"]
    assert failed_workspace.server.token not in result.stdout


def test_queue_show_of_an_unknown_id_exits_3(failed_workspace: Workspace) -> None:
    result = provisioner(failed_workspace, "queue", "show", "999999")

    assert result.returncode == 3
    assert "999999" in result.stderr


def test_queue_list_works_without_the_token_variable(failed_workspace: Workspace) -> None:
    result = provisioner(failed_workspace, "queue", "list", "--json", token=False)

    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["operations"]) == 2


def test_no_log_line_carries_the_token(workspace: Workspace) -> None:
    workspace.write_source([ADA, GRACE])

    result = provisioner(workspace, "--log-level", "debug", "sync")

    assert result.returncode == 0
    assert workspace.server.token not in result.stderr
    assert workspace.server.token not in result.stdout
