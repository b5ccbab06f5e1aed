"""Bad source records fail alone, end to end against a real SCIM server: the others go through.

Each test writes an HR source with one or two records that cannot become a
SCIM User as they are (a 200,000-character cell, two people with one
userName, a blank userName, an expression that misbehaves on one record) and
checks the target over HTTP: the good records have their accounts, the bad
ones have none and a failed row naming them and why, opened once.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import structlog

from provisioner.demo import ScimServer, free_port
from tests.conftest import ScimReader, Workspace, empty_server, hr_row
from tests.integration.test_cli import provisioner, replace_in_mapping

ADA = hr_row("E1001", "Ada", "Lovelace")
GRACE = hr_row("E1002", "Grace", "Hopper")
ALAN = hr_row("E1003", "Alan", "Turing")


def failed_rows(workspace: Workspace) -> list[dict[str, object]]:
    return [op for op in workspace.operations() if op["status"] == "failed"]


# --- item 6: a huge cell ----------------------------------------------------------------------------


def test_a_200000_character_cell_fails_its_record_alone(workspace: Workspace, scim: ScimReader) -> None:
    workspace.write_source([ADA, {**GRACE, "title": "x" * 200_000}, ALAN])

    result = provisioner(workspace, "sync")

    assert result.returncode == 4, result.stderr
    assert "Traceback" not in result.stderr
    assert {user["userName"] for user in scim.all()} == {"ada.lovelace@example.com", "alan.turing@example.com"}
    [failed] = failed_rows(workspace)
    assert failed["identity_key"] == "E1002"
    assert str(failed["last_error"]).startswith(f"{workspace.source_path}:3: ")
    assert "field larger than field limit" in str(failed["last_error"])


def test_a_record_whose_key_is_unreadable_is_named_by_its_line(workspace: Workspace, scim: ScimReader) -> None:
    """The key column comes after the huge cell: the record is named by its line, the others go on."""
    workspace.write_source([ADA, GRACE])
    header, ada, grace = workspace.source_path.read_text(encoding="utf-8").splitlines()
    columns = header.split(",")
    bad = ",".join("y" * 200_000 if name != "employee_id" else "E1009" for name in columns[::-1])
    workspace.source_path.write_text(
        ",".join(columns[::-1]) + "\n" + "\n".join(",".join(line.split(",")[::-1]) for line in (ada, grace))
        + "\n" + bad + "\n",
        encoding="utf-8",
    )

    report = workspace.sync_now()

    assert report.summary()["created"] == 2
    [failed] = failed_rows(workspace)
    assert failed["identity_key"] == f"<{workspace.source_path}:4>"


# --- item 7: one userName, two records ---------------------------------------------------------------


@pytest.fixture(scope="module")
def lenient_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScimServer]:
    """scim2-server with userName's uniqueness set to "none": it stores two accounts of one userName."""
    import scim2_server

    schemas = json.loads((Path(scim2_server.__file__).parent / "resources" / "default-schemas.json").read_text())
    for schema in schemas:
        for attribute in schema["attributes"]:
            if attribute["name"] == "userName":
                attribute["uniqueness"] = "none"
    path = tmp_path_factory.mktemp("lenient") / "schemas.json"
    path.write_text(json.dumps(schemas), encoding="utf-8")
    port, token = free_port(), "lenient-token"
    executable = Path(__import__("sys").executable).with_name("scim2-server")
    process = subprocess.Popen(
        [str(executable), "--hostname", "127.0.0.1", "--port", str(port), f"--bearer-token={token}",
         "--schema", str(path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    server = ScimServer(port, token, process)
    try:
        for _ in range(400):
            try:
                if httpx.get(f"{server.base_url}/ServiceProviderConfig", headers={"Authorization": f"Bearer {token}"},
                             timeout=1).status_code == 200:  # fmt: skip
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        yield server
    finally:
        server.stop()


@pytest.fixture
def lenient(tmp_path: Path, lenient_server: ScimServer, monkeypatch: pytest.MonkeyPatch) -> Workspace:
    """A workspace whose target stores duplicates; checked to really do so before the test relies on it."""
    empty_server(lenient_server)
    headers = {"Authorization": f"Bearer {lenient_server.token}"}
    user = {"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": "twin@example.com"}
    with httpx.Client(base_url=lenient_server.base_url + "/", headers=headers) as http:
        assert [http.post("Users", json=user).status_code for _ in range(2)] == [201, 201]
    empty_server(lenient_server)
    monkeypatch.setenv("PROVISIONER_TEST_TOKEN", lenient_server.token)
    return Workspace(tmp_path, lenient_server)


def users_named(server: ScimServer, user_name: str) -> list[dict[str, object]]:
    headers = {"Authorization": f"Bearer {server.token}"}
    with httpx.Client(base_url=server.base_url + "/", headers=headers) as http:
        resources = http.get("Users", params={"count": 1000}).json().get("Resources") or []
    return [r for r in resources if str(r["userName"]).lower() == user_name.lower()]


@pytest.mark.parametrize("twin_email", [pytest.param("ada.lovelace@example.com", id="exact"),
                                        pytest.param("Ada.Lovelace@Example.COM", id="by-case")])  # fmt: skip
def test_two_records_with_one_user_name_are_both_held_and_go_through_once_fixed(
    lenient: Workspace, twin_email: str
) -> None:
    twin = hr_row("E1009", "Augusta", "King", email=twin_email)
    lenient.write_source([ADA, twin, ALAN])

    first = lenient.sync_now()
    second = lenient.sync_now()

    assert users_named(lenient.server, "ada.lovelace@example.com") == []
    assert len(users_named(lenient.server, "alan.turing@example.com")) == 1
    failed = {op["identity_key"]: op["last_error"] for op in failed_rows(lenient)}
    assert failed == {
        "E1001": f"{lenient.source_path}:2: userName ada.lovelace@example.com is also rendered for identity E1009",
        "E1009": f"{lenient.source_path}:3: userName {twin_email.lower()} is also rendered for identity E1001",
    }
    assert (first.rejected, second.rejected) == (2, 2)
    assert lenient.count("operation") == 3  # the second cycle opened no new row
    assert lenient.count("attempt") == 1  # only Alan's create was ever sent

    lenient.write_source([ADA, {**twin, "email": "augusta.king@example.com"}, ALAN])
    fixed = lenient.sync_now()

    assert fixed.summary()["created"] == 2 and fixed.rejected == 0
    assert len(users_named(lenient.server, "ada.lovelace@example.com")) == 1
    assert len(users_named(lenient.server, "augusta.king@example.com")) == 1
    assert failed_rows(lenient) == []


def test_a_newcomer_with_a_linked_user_name_holds_both_and_touches_no_account(lenient: Workspace) -> None:
    lenient.write_source([ADA, ALAN])
    lenient.sync_now()
    [ada] = users_named(lenient.server, "ada.lovelace@example.com")
    twin = hr_row("E1009", "Augusta", "King", email="ADA.lovelace@example.com", title="Countess")

    lenient.write_source([{**ADA, "title": "Analyst"}, twin, ALAN])
    for _ in range(2):
        report = lenient.sync_now()
        assert report.summary()["created"] == report.summary()["updated"] == report.summary()["disabled"] == 0

    assert users_named(lenient.server, "ada.lovelace@example.com") == [ada]  # one account, unchanged
    assert sorted(op["identity_key"] for op in failed_rows(lenient)) == ["E1001", "E1009"]

    lenient.write_source([{**ADA, "title": "Analyst"}, ALAN])
    report = lenient.sync_now()

    assert report.summary()["updated"] == 1
    assert [user["title"] for user in users_named(lenient.server, "ada.lovelace@example.com")] == ["Analyst"]
    assert failed_rows(lenient) == []


# --- issue 11: one key, two records ------------------------------------------------------------------


def test_two_records_with_one_key_are_both_rejected_by_plan_and_sync_and_never_guessed(
    workspace: Workspace, scim: ScimReader
) -> None:
    """Neither record is the person: both are reported at their own line, the others go through."""
    twin = hr_row("E1001", "Augusta", "King")
    workspace.write_source([ADA, GRACE, twin])
    first = f"{workspace.source_path}:2: employee_id 'E1001' appears 2 times (also at line 4); none of them is used"
    second = f"{workspace.source_path}:4: employee_id 'E1001' appears 2 times (also at line 2); none of them is used"

    plan = provisioner(workspace, "plan", "--json")
    synced = provisioner(workspace, "sync")

    assert plan.returncode == 4, plan.stderr  # records that will fail: as sync says
    [planned] = json.loads(plan.stdout)
    assert [op["identity_key"] for op in planned["operations"]] == ["E1002"]
    assert planned["rejected"] == [
        {"identity_key": "E1001", "reason": first},
        {"identity_key": "E1001", "reason": second},
    ]
    assert synced.returncode == 4, synced.stdout + synced.stderr
    assert "Traceback" not in synced.stderr
    assert [user["userName"] for user in scim.all()] == ["grace.hopper@example.com"]
    assert sorted(str(op["last_error"]) for op in failed_rows(workspace)) == [first, second]

    workspace.write_source([ADA, GRACE])
    fixed = workspace.sync_now()

    assert fixed.summary()["created"] == 1 and fixed.rejected == 0
    assert failed_rows(workspace) == []


def test_a_linked_identity_whose_key_turns_up_twice_keeps_its_account_untouched(
    workspace: Workspace, scim: ScimReader
) -> None:
    """Not a leaver, not a mover: the account stays as it is until the source says who it is."""
    workspace.write_source([ADA, GRACE])
    workspace.sync_now()
    before = scim.user("ada.lovelace@example.com")

    terminated = hr_row("E1001", "Ada", "Lovelace", status="terminated")
    workspace.write_source([{**ADA, "title": "Analyst"}, GRACE, terminated])
    report = workspace.sync_now()

    assert report.summary()["updated"] == report.summary()["disabled"] == report.summary()["deleted"] == 0
    assert report.rejected == 2
    assert scim.user("ada.lovelace@example.com") == before


# --- item 8: blank required attributes -----------------------------------------------------------------


@pytest.mark.parametrize("blank", [pytest.param("   ", id="spaces"), pytest.param("", id="empty")])
def test_a_blank_user_name_is_rejected_before_anything_is_sent(
    workspace: Workspace, scim: ScimReader, blank: str
) -> None:
    workspace.write_source([ADA, {**GRACE, "email": blank}])

    report = workspace.sync_now()

    assert report.summary()["created"] == 1
    [failed] = failed_rows(workspace)
    assert failed["identity_key"] == "E1002"
    assert "attribute 'userName': is required" in str(failed["last_error"])
    assert workspace.count("attempt") == 1  # Ada's create; nothing for Grace
    assert [user["userName"] for user in scim.all()] == ["ada.lovelace@example.com"]


# --- rejections: one row per record and cause, silenced by resolve until the record changes ---------------


def test_a_rejection_is_opened_once_logged_by_name_and_silenced_by_resolve(workspace: Workspace) -> None:
    workspace.write_source([ADA, {**GRACE, "email": "   "}])

    with structlog.testing.capture_logs() as logs:
        first = workspace.sync_now()
    second = workspace.sync_now()

    [row] = failed_rows(workspace)
    assert (first.rejected, second.rejected, workspace.count("operation")) == (1, 1, 2)
    [event] = [e for e in logs if e["event"] == "record rejected"]
    assert event["identity"] == "E1002" and event["reason"] == row["last_error"]

    resolved = provisioner(workspace, "queue", "resolve", str(row["id"]), "--note", "HR will fix the email")
    assert resolved.returncode == 0, resolved.stderr
    quiet = provisioner(workspace, "sync")

    assert quiet.returncode == 0, quiet.stdout + quiet.stderr
    assert workspace.count("operation") == 2

    workspace.write_source([ADA, {**GRACE, "email": "   ", "title": "Admiral"}])
    changed = workspace.sync_now()

    assert changed.rejected == 1
    assert [op["identity_key"] for op in failed_rows(workspace)] == ["E1002"]
    assert workspace.count("operation") == 3


def test_a_rejection_moved_to_another_line_is_not_opened_again(workspace: Workspace) -> None:
    workspace.write_source([ADA, {**GRACE, "email": "   "}])
    workspace.sync_now()

    workspace.write_source([ALAN, ADA, {**GRACE, "email": "   "}])
    workspace.sync_now()

    assert [op["identity_key"] for op in failed_rows(workspace)] == ["E1002"]


# --- issue 11: an expression that misbehaves on one record -------------------------------------------------


PHONES = "  phoneNumbers:\n    - value: phone\n      type: \"'work'\"\n"


@pytest.mark.parametrize(
    ("old", "new", "needle"),
    [
        pytest.param(PHONES, "  phoneNumbers: \"[{'value': phone, 'display': nick}]\"\n",
                     "attribute 'phoneNumbers': the record has no column 'nick'", id="undefined-in-a-list"),
        pytest.param("  title: title\n", "  nickName: \"'x' * 10**8 if nick == 'G' else nick\"\n",
                     "attribute 'nickName': OverflowError", id="huge"),
        pytest.param("  title: title\n",
                     "  nickName: \"{% if nick == 'G' %}{% for i in range(100000) %}{% for j in range(100000) %}"
                     "{% endfor %}{% endfor %}{% endif %}{{ nick }}\"\n",
                     "attribute 'nickName': OverflowError: range() calls of one record", id="nested-ranges"),
    ],
)  # fmt: skip
def test_an_expression_that_fails_on_one_record_rejects_that_record_alone(
    workspace: Workspace, scim: ScimReader, old: str, new: str, needle: str
) -> None:
    """Before, the first made plan and sync exit 1, the second rendered 100 MB, the third never ended."""
    workspace.write_config(source_type="jsonl")
    replace_in_mapping(workspace, old, new)
    grace = {key: value for key, value in GRACE.items()} | {"phone": "+1 555 0102", "nick": "G"}
    if "undefined" in needle or "no column" in needle:
        del grace["nick"]
    workspace.write_source([{**ADA, "phone": "+1 555 0101", "nick": "A"}, grace])

    result = provisioner(workspace, "sync")

    assert result.returncode == 4, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    [failed] = failed_rows(workspace)
    assert failed["identity_key"] == "E1002"
    assert needle in str(failed["last_error"])
    assert [user["userName"] for user in scim.all()] == ["ada.lovelace@example.com"]


# --- item 9: YAML that means something else ---------------------------------------------------------------


def test_yaml_1_1_literals_reach_the_target_as_written(workspace: Workspace, scim: ScimReader) -> None:
    replace_in_mapping(workspace, "  externalId: employee_id\n", "  externalId: 0123\n  locale: NO\n")
    workspace.write_source([ADA])

    workspace.sync_now()

    user = scim.user("ada.lovelace@example.com")
    assert (user["externalId"], user["locale"]) == ("0123", "NO")


@pytest.mark.parametrize("file", ["mapping", "config"])
@pytest.mark.parametrize(
    ("text", "needle"),
    [pytest.param("!!python/name:os.system x", "the YAML tag '!!python/name:os.system' is not allowed", id="tag"),
     pytest.param(None, "expands to more than 100000 values", id="alias-bomb")],
)  # fmt: skip
def test_check_refuses_tags_and_alias_bombs_with_exit_3(
    workspace: Workspace, file: str, text: str | None, needle: str
) -> None:
    path = workspace.mapping_path if file == "mapping" else workspace.config_path
    if text is None:  # 9 levels of 9 aliases: 387 million values from a few hundred bytes
        bomb = ['x0: &x0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
        bomb += [f"x{i}: &x{i} [{','.join([f'*x{i - 1}'] * 9)}]" for i in range(1, 9)]
        path.write_text("\n".join(bomb) + "\n" + path.read_text(encoding="utf-8"), encoding="utf-8")
        line = 1
    else:
        lines = path.read_text(encoding="utf-8").splitlines()
        line = 1 + next(i for i, t in enumerate(lines) if t.startswith(("attributes:", "state:")))
        lines.insert(line, f"bad: {text}" if file == "config" else f"  title: {text}")
        line += 1
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    result = provisioner(workspace, "check")

    assert result.returncode == 3, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert f"{path.name}:{line}:" in result.stderr and needle in result.stderr


def test_the_daemon_rejects_runaway_expressions_and_still_stops_on_sigterm(workspace: Workspace, scim: ScimReader) -> None:
    """Nested range() loops end on the range budget; loops over a record's own text end on the time limit."""
    import os
    import signal
    import sys

    loops = ("{% if nick == 'ranges' %}{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
             "{% endfor %}{% elif nick == 'text' %}{% for a in notes %}{% for b in notes %}{% for c in notes %}"
             "{% endfor %}{% endfor %}{% endfor %}{% endif %}{{ nick }}")  # fmt: skip
    workspace.write_config(source_type="jsonl")
    replace_in_mapping(workspace, "  title: title\n", f'  nickName: "{loops}"\n')
    with workspace.config_path.open("a", encoding="utf-8") as handle:
        handle.write(f'daemon: {{listen: "127.0.0.1:{free_port()}", retry_interval: 1}}\n')
    workspace.write_source([{**ADA, "nick": "ok", "notes": ""}, {**GRACE, "nick": "ranges", "notes": ""},
                            {**ALAN, "nick": "text", "notes": "n" * 3000}])  # fmt: skip
    env = {**os.environ, "PROVISIONER_TEST_TOKEN": workspace.server.token}
    log = (workspace.root / "daemon.log").open("ab")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "provisioner", "--log-format", "json", "run", "--config", str(workspace.config_path)],
        cwd=workspace.root, env=env, stdout=log, stderr=log,
    )  # fmt: skip
    try:
        for _ in range(1200):
            try:
                if len(failed_rows(workspace)) == 2 and scim.all():
                    break
            except sqlite3.OperationalError:
                pass  # the daemon is still creating its tables
            time.sleep(0.05)
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=60) == 0

    reasons = {op["identity_key"]: str(op["last_error"]) for op in failed_rows(workspace)}
    assert "range() calls of one record" in reasons["E1002"]
    assert "ran longer than 2 s on this record" in reasons["E1003"]
    assert [user["userName"] for user in scim.all()] == ["ada.lovelace@example.com"]
