"""The engine against a SCIM server that deviates from the RFCs in one way at a time (tests/servers/deviant.py).

Each test switches one deviation on, runs real cycles over HTTP, and checks
what the server really stores (``dump()``, read from its storage, not over
HTTP) and what the engine recorded and learned.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from provisioner.alerts import AlertsConfig, evaluate
from provisioner.cli import main
from provisioner.daemon import target_facts
from provisioner.store import open_store
from tests.conftest import ENTERPRISE, TOKEN_VARIABLE, Workspace, hr_row
from tests.integration.test_groups import World, person
from tests.servers.deviant import DEVIATIONS, DeviantServer, start_deviant_server

CORE_GROUP = "urn:ietf:params:scim:schemas:core:2.0:Group"
CORE_USER = "urn:ietf:params:scim:schemas:core:2.0:User"


def deviating(*deviations: str, **options: Any) -> pytest.MarkDecorator:
    """Run the test against a deviant server with these deviations on."""
    return pytest.mark.parametrize("deviant", [(deviations, options)], indirect=True, ids=["+".join(deviations)])


@pytest.fixture
def deviant(request: pytest.FixtureRequest) -> Iterator[DeviantServer]:
    """A deviant server with the deviations the test names (``@deviating(...)``)."""
    deviations, options = request.param
    with start_deviant_server(deviations, **options) as server:
        yield server


def users(server: DeviantServer) -> dict[str, dict[str, Any]]:
    """What the server stores, by userName."""
    return {u["user_name"] if "user_name" in u else u["userName"]: u for u in _camel(server.dump()["Users"])}


def groups(server: DeviantServer) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for group in _camel(server.dump()["Groups"]):
        out.setdefault(group["displayName"], []).append(group)
    return out


def members(server: DeviantServer, name: str) -> list[str]:
    """The userNames of a group's members as stored, duplicates kept (values may be ids or userNames)."""
    [group] = groups(server)[name]
    by_id = {u["id"]: name for name, u in users(server).items()}
    return sorted(by_id.get(m["value"], m["value"]) for m in group.get("members") or [])


def _camel(resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """dump() gives scim2-models' python names; the tests read SCIM's."""
    def convert(value: Any) -> Any:
        if isinstance(value, dict):
            return {_camel_name(k): convert(v) for k, v in value.items()}
        if isinstance(value, list):
            return [convert(v) for v in value]
        return value

    return [convert(r) for r in resources]


def _camel_name(name: str) -> str:
    if ":" in name or "_" not in name:
        return name
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def learned(root: Path) -> dict[str, Any]:
    with sqlite3.connect(root / "state.db") as conn:
        return dict(conn.execute("SELECT name, value FROM target_quirk").fetchall())


def operations(root: Path) -> list[dict[str, Any]]:
    with sqlite3.connect(root / "state.db") as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute("SELECT * FROM operation ORDER BY id")]


def post(server: DeviantServer, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
    import httpx

    headers = {"Authorization": f"Bearer {server.token}", "Content-Type": "application/scim+json"}
    response = httpx.post(f"{server.base_url}/{endpoint}", json=body, headers=headers, timeout=10)
    assert response.status_code == 201, response.text
    return dict(response.json())


def workspace(tmp_path: Path, server: DeviantServer, monkeypatch: pytest.MonkeyPatch, **options: Any) -> Workspace:
    monkeypatch.setenv(TOKEN_VARIABLE, server.token)
    space = Workspace(tmp_path, server)  # type: ignore[arg-type]
    space.write_config(**options)
    return space


# ---------------------------------------------------------------- users


@deviating("filter_ignored")
def test_a_target_that_ignores_filters_never_gets_a_joiner_written_over_another_account(
    tmp_path: Path, deviant: DeviantServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    admin = post(deviant, "Users", {"schemas": [CORE_USER], "userName": "it-admin", "title": "Administrator"})
    space = workspace(tmp_path, deviant, monkeypatch, match_before_create="always")
    space.write_source([hr_row("E1", "Ada", "Lovelace")])
    space.sync_now()

    stored = users(deviant)
    assert stored["it-admin"]["title"] == "Administrator" and stored["it-admin"]["id"] == admin["id"]
    assert stored["ada.lovelace@example.com"]["title"] == "Engineer"
    assert [op["status"] for op in operations(tmp_path)] == ["succeeded"]
    assert learned(tmp_path).get("filter") == '"client"'


@deviating("no_put")
def test_a_target_without_put_adopts_an_existing_account_with_patch(
    tmp_path: Path, deviant: DeviantServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    post(deviant, "Users", {"schemas": [CORE_USER], "userName": "ada.lovelace@example.com", "title": "Old"})
    space = workspace(tmp_path, deviant, monkeypatch)
    space.write_source([hr_row("E1", "Ada", "Lovelace", title="Analyst")])
    space.sync_now()

    [op] = operations(tmp_path)
    assert op["status"] == "succeeded", op["last_error"]
    assert "adopted" in op["note"]
    [user] = users(deviant).values()
    assert user["title"] == "Analyst" and user["name"]["givenName"] == "Ada"
    assert learned(tmp_path)["put"] == "false"
    # Learned once, kept: the next write goes straight to PATCH.
    deviant.reset_requests()
    space.write_source([hr_row("E1", "Ada", "Lovelace", title="Lead")])
    space.sync_now()
    assert not [r for r in deviant.requests if r[0] == "PUT"]
    assert users(deviant)["ada.lovelace@example.com"]["title"] == "Lead"


@deviating("immutable_username", rename_status=500)
def test_a_refused_rename_fails_at_once_and_the_rest_of_the_change_is_applied(
    tmp_path: Path, deviant: DeviantServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    space = workspace(tmp_path, deviant, monkeypatch)
    space.write_source([hr_row("E1", "Ada", "Lovelace")])
    space.sync_now()
    deviant.reset_requests()
    space.write_source([hr_row("E1", "Ada", "Lovelace", email="ada.king@example.com", title="Countess")])
    space.sync_now()

    op = operations(tmp_path)[-1]
    assert op["status"] == "failed"
    assert op["last_error"].startswith("the target does not allow changing userName (mutability)")
    assert op["attempts"] == 1
    writes = [r for r in deviant.requests if r[0] in ("PUT", "PATCH")]
    assert len(writes) == 2, writes  # the rename once (no retries), then the rest without it
    [user] = users(deviant).values()
    assert user["userName"] == "ada.lovelace@example.com" and user["title"] == "Countess"


@deviating("attribute_dropped")
def test_an_attribute_accepted_but_not_stored_marks_the_operation(
    tmp_path: Path, deviant: DeviantServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    space = workspace(tmp_path, deviant, monkeypatch)
    space.write_source([hr_row("E1", "Ada", "Lovelace", title="Analyst")])
    space.sync_now()

    [op] = operations(tmp_path)
    assert op["status"] == "succeeded" and op["note"] == "target dropped title"
    assert main(["status", "--config", str(space.config_path)]) == 0
    assert "UNSTORED: 1 writes" in capsys.readouterr().out
    engine = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    conditions = evaluate([target_facts(engine, "app")], AlertsConfig())
    assert [c.key for c in conditions] == ["unstored_writes:app"]


@deviating("extension_unsupported")
def test_an_extension_the_target_does_not_list_is_left_out_instead_of_failing_every_create(
    tmp_path: Path, deviant: DeviantServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    space = workspace(tmp_path, deviant, monkeypatch)
    space.write_source([hr_row("E1", "Ada", "Lovelace"), hr_row("E2", "Alan", "Turing")])
    space.sync_now()

    assert [op["status"] for op in operations(tmp_path)] == ["succeeded", "succeeded"]
    assert all(ENTERPRISE not in u for u in users(deviant).values())
    # Unchanged records send nothing the next cycle: the held-back extension is not a change.
    deviant.reset_requests()
    space.sync_now()
    assert not [r for r in deviant.requests if r[0] in ("POST", "PUT", "PATCH")]


@deviating("extension_unsupported")
def test_an_unsupported_extension_can_be_refused_instead(
    tmp_path: Path, deviant: DeviantServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    space = workspace(tmp_path, deviant, monkeypatch, unsupported_attributes="refuse")
    space.write_source([hr_row("E1", "Ada", "Lovelace")])
    space.sync_now()

    [op] = operations(tmp_path)
    assert op["status"] == "failed" and ENTERPRISE in op["last_error"]
    assert users(deviant) == {}


# ---------------------------------------------------------------- groups


def world(tmp_path: Path, server: DeviantServer, monkeypatch: pytest.MonkeyPatch, **options: str) -> World:
    w = World(tmp_path, server, monkeypatch)  # type: ignore[arg-type]
    if options:
        w.configure(**options)
    return w


@deviating("filter_ignored")
def test_a_target_that_ignores_filters_never_gets_another_group_linked_renamed_or_filled(
    tmp_path: Path, deviant: DeviantServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    admins = post(deviant, "Groups", {"schemas": [CORE_GROUP], "displayName": "Administrators"})
    w = world(tmp_path, deviant, monkeypatch)
    w.write([person("E1"), person("E2", "Sales")])
    w.sync()

    stored = groups(deviant)
    assert [g["id"] for g in stored["Administrators"]] == [admins["id"]]
    assert not stored["Administrators"][0].get("members")
    assert members(deviant, "all-staff") == ["e1@example.com", "e2@example.com"]
    assert members(deviant, "dept-engineering") == ["e1@example.com"]


@deviating("patch_501")
def test_a_501_for_the_filter_removal_switches_to_the_list_form_and_keeps_the_adds(
    tmp_path: Path, deviant: DeviantServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = world(tmp_path, deviant, monkeypatch, max_members_per_patch="1000")
    w.write([person("E1"), person("E2"), person("E3", "Sales")])
    w.sync()
    # E1 moves to Sales, E4 joins Engineering: one PATCH to dept-engineering adds E4 and removes E1.
    w.write([person("E1", "Sales"), person("E2"), person("E3", "Sales"), person("E4")])
    w.sync()

    assert members(deviant, "dept-engineering") == ["e2@example.com", "e4@example.com"]
    assert members(deviant, "dept-sales") == ["e1@example.com", "e3@example.com"]
    assert learned(tmp_path)["member_removal"] == '"list"'
    assert all(op["status"] == "succeeded" for op in operations(tmp_path)), [op["last_error"] for op in operations(tmp_path)]


@deviating("member_removal_ignored")
def test_a_removal_answered_200_that_removed_nothing_falls_back_to_the_list_form(
    tmp_path: Path, deviant: DeviantServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = world(tmp_path, deviant, monkeypatch, quirks="{verify_writes: true}")
    w.write([person("E1"), person("E2")])
    w.sync()
    w.write([person("E1", "Sales"), person("E2")])
    w.sync()

    assert members(deviant, "dept-engineering") == ["e2@example.com"]
    assert learned(tmp_path)["member_removal"] == '"list"'
    assert all(op["status"] == "succeeded" for op in operations(tmp_path))


@deviating("group_members_not_returned")
def test_group_reads_without_members_are_not_read_as_empty(
    tmp_path: Path, deviant: DeviantServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mover and a leaver leave their old groups although the target never lists members."""
    w = world(tmp_path, deviant, monkeypatch, group_reconcile_every="0s")
    w.write([person("E1"), person("E2"), person("E3")])
    w.sync()
    w.write([person("E1", "Sales"), person("E2"), person("E3", status="terminated")])
    w.sync()
    w.sync()

    assert members(deviant, "dept-engineering") == ["e2@example.com"]
    assert members(deviant, "dept-sales") == ["e1@example.com"]
    assert members(deviant, "all-staff") == ["e1@example.com", "e2@example.com"]
    assert learned(tmp_path)["group_members_returned"] == "false"


@deviating("members_by_username")
def test_a_target_that_keeps_members_by_username_gets_groups_with_members_and_exact_removals(
    tmp_path: Path, deviant: DeviantServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = world(tmp_path, deviant, monkeypatch, quirks="{member_value: userName}")
    w.write([person("E1"), person("E2")])
    w.sync()
    assert members(deviant, "dept-engineering") == ["e1@example.com", "e2@example.com"]
    assert learned(tmp_path)["group_create_with_members"] == "true"

    w.write([person("E1", "Sales"), person("E2", status="terminated")])
    w.sync()
    assert members(deviant, "dept-engineering") == []
    assert members(deviant, "all-staff") == ["e1@example.com"]
    # A rehire: back in, once.
    w.write([person("E1", "Sales"), person("E2")])
    w.sync()
    assert members(deviant, "all-staff") == ["e1@example.com", "e2@example.com"]
    assert all(op["status"] == "succeeded" for op in operations(tmp_path)), [op["last_error"] for op in operations(tmp_path)]


@deviating("member_removal_ignored")
def test_a_read_back_that_finds_a_removed_member_teaches_verify_writes_and_the_next_form(
    tmp_path: Path, deviant: DeviantServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing declared: the daily read-back (here every cycle) sees the member still there."""
    w = world(tmp_path, deviant, monkeypatch, group_reconcile_every="0s")
    w.write([person("E1"), person("E2")])
    w.sync()
    w.write([person("E1", "Sales"), person("E2")])
    w.sync()  # the removal is answered 200 and does nothing
    w.sync()  # the read-back sees E1 still in dept-engineering: removed again, verified, by the list form

    assert members(deviant, "dept-engineering") == ["e2@example.com"]
    assert learned(tmp_path)["verify_writes"] == "true"
    assert learned(tmp_path)["member_removal"] == '"list"'


@deviating("members_by_username")
def test_members_by_username_is_learned_from_what_the_target_lists(
    tmp_path: Path, deviant: DeviantServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = world(tmp_path, deviant, monkeypatch, group_reconcile_every="0s")
    w.write([person("E1"), person("E2")])
    w.sync()
    w.write([person("E1", "Sales"), person("E2")])
    w.sync()
    w.sync()

    assert members(deviant, "dept-engineering") == ["e2@example.com"]
    assert members(deviant, "all-staff") == ["e1@example.com", "e2@example.com"]
    assert learned(tmp_path)["member_value"] == '"userName"'


# ---------------------------------------------------------------- the whole lifecycle, learning only

LIFECYCLE = [
    [person("E1"), person("E2"), person("E3", "Sales")],
    # a no-op cycle
    [person("E1"), person("E2"), person("E3", "Sales")],
    # a mover, a leaver, a joiner
    [person("E1", "Sales"), person("E2", status="terminated"), person("E3", "Sales"), person("E4")],
    # a rehire
    [person("E1", "Sales"), person("E2"), person("E3", "Sales"), person("E4")],
    # a userName rename
    [person("E1", "Sales"), person("E2"), dict(person("E3", "Sales"), email="e3.new@example.com"), person("E4")],
]


@pytest.mark.parametrize(
    "deviant", [((), {}), *(((name,), {}) for name in sorted(DEVIATIONS))], indirect=True,
    ids=["conformant", *sorted(DEVIATIONS)],
)  # fmt: skip
def test_the_lifecycle_converges_on_each_deviation_with_nothing_declared(
    tmp_path: Path, deviant: DeviantServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Joiners, a no-op, a mover, a leaver, a rehire and a rename: the target ends exactly as desired.

    Nothing is declared: what the target does differently is learned from its answers.
    The only operation allowed to fail is the rename a target refuses (immutable userName).
    """
    w = world(tmp_path, deviant, monkeypatch, group_reconcile_every="0s")
    for rows in LIFECYCLE:
        w.write(rows)
        w.sync()
    w.sync()

    renamed = "e3@example.com" if "immutable_username" in deviant.deviations else "e3.new@example.com"
    everyone = sorted(["e1@example.com", "e2@example.com", renamed, "e4@example.com"])
    stored = users(deviant)
    assert sorted(stored) == everyone
    assert all(u.get("active", True) for u in stored.values())
    assert members(deviant, "dept-engineering") == ["e2@example.com", "e4@example.com"]
    assert members(deviant, "dept-sales") == sorted(["e1@example.com", renamed])
    assert members(deviant, "all-staff") == everyone
    assert all(len(found) == 1 for found in groups(deviant).values())
    failed = [(op["kind"], op["last_error"]) for op in operations(tmp_path) if op["status"] not in ("succeeded", "superseded")]
    if "immutable_username" in deviant.deviations:
        assert [kind for kind, _ in failed] == ["update"]
        assert failed[0][1].startswith("the target does not allow changing userName (mutability)")
    else:
        assert failed == []
