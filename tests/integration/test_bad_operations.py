"""One bad record, one concurrent edit, one busy target: each stays its own business (issue 14, items 1 to 4).

Against a real scim2-server over HTTP; where the case needs a target that
misbehaves on demand, through :class:`tests.faultproxy.FaultProxy` in front of it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from provisioner.config import load_config
from provisioner.demo import ScimServer
from provisioner.queue import Selection, retry_now
from provisioner.quarantine import state
from provisioner.store import open_store
from provisioner.sync import load_target_mapping, sync_target
from tests.conftest import ScimReader, Workspace, hr_row
from tests.faultproxy import fault_proxy  # noqa: F401 - a fixture, found by name

GOOD1 = hr_row("E1", "Good", "One", email="good1@example.com")
BAD = hr_row("E2", "Bad", "Record", email="bad@example.com")
GOOD2 = hr_row("E3", "Good", "Two", email="good2@example.com")
ENG = """groups:
  - name: Eng
    members: "employee_id == 'E1'"
"""
# Quick in-call retries: the queue retries across rounds; nobody waits for real backoff.
RETRY = "{max_attempts: 2, backoff_base: 0.01, backoff_cap: 0.02}"


def bad_writes(method: str, path: str, body: bytes | None) -> int | None:
    """The target answers 500 to every write of bad@, whatever is sent."""
    return 500 if method != "GET" and body and b"bad@example.com" in body else None


def groups(reader: ScimReader) -> list[dict[str, Any]]:
    response = reader.http.get("Groups", params={"count": 100})
    response.raise_for_status()
    return list(response.json().get("Resources") or [])


def behind(workspace: Workspace, proxy_url: str, token: str, **options: str) -> None:
    """Point the workspace's target at the proxy in front of its server."""
    workspace.server = SimpleNamespace(base_url=proxy_url, token=token)  # type: ignore[assignment]
    workspace.write_config(retry=RETRY, **options)


def bad_record_synced(workspace: Workspace, scim_server: ScimServer, fault_proxy: Any) -> tuple[Any, Any]:
    """good1@ and bad@ synced once behind a proxy refusing bad@'s writes; the proxy and the state's engine."""
    proxy = fault_proxy(scim_server.base_url, answer=bad_writes)
    behind(workspace, proxy.base_url, scim_server.token)
    workspace.write_source([GOOD1, BAD])
    workspace.sync_now()
    return proxy, open_store(f"sqlite:///{workspace.db_path}")


def good2_joins_and_group_eng_is_due(workspace: Workspace, proxy_url: str, token: str) -> None:
    (workspace.root / "groups.yaml").write_text(ENG)
    behind(workspace, proxy_url, token, groups="groups.yaml")
    workspace.write_source([GOOD1, BAD, GOOD2])


def test_one_record_whose_writes_always_fail_never_quarantines_the_target(
    workspace: Workspace, scim_server: ScimServer, scim: ScimReader, fault_proxy: Any
) -> None:
    """The issue's set-up: good1@ and bad@, three rounds of retry + sync, then good2@ joins and group Eng is due."""
    proxy, engine = bad_record_synced(workspace, scim_server, fault_proxy)

    for _ in range(3):
        retry_now(engine, Selection(status="retry_wait"))
        workspace.sync_now()

    health = state(engine, "app")
    assert health is not None and not health.quarantined, health.quarantine_reason
    good2_joins_and_group_eng_is_due(workspace, proxy.base_url, scim_server.token)

    report = workspace.sync_now()

    assert report.done["create"] == 1 and report.done["group_create"] == 1
    assert scim.find("good2@example.com") and not scim.find("bad@example.com")
    [eng] = groups(scim)
    assert eng["displayName"] == "Eng"
    assert [m["value"] for m in eng["members"]] == [scim.user("good1@example.com")["id"]]
    rows = {row["identity_key"]: row for row in workspace.operations() if row["status"] != "succeeded"}
    assert set(rows) == {"E2"}, "bad@ is the only one left, waiting for its own retries"
    assert rows["E2"]["status"] == "retry_wait" and rows["E2"]["last_http_status"] == 500
    # Two attempts in each of the four rounds it was due in; not due in the last one.
    assert proxy.stats.faults["answer"] == 8
    engine.dispose()


def test_a_quarantined_target_is_probed_by_new_work_and_group_operations_probe_too(
    workspace: Workspace, scim_server: ScimServer, scim: ScimReader, fault_proxy: Any
) -> None:
    """Quarantined (a real outage earlier), with bad@ due: good2@'s create probes, and group Eng is created."""
    proxy, engine = bad_record_synced(workspace, scim_server, fault_proxy)
    quarantine(engine)
    retry_now(engine, Selection(status="retry_wait"))
    good2_joins_and_group_eng_is_due(workspace, proxy.base_url, scim_server.token)

    report = workspace.sync_now()

    assert report.done["create"] == 1 and report.done["group_create"] == 1
    assert not state(engine, "app").quarantined  # type: ignore[union-attr]
    assert [g["displayName"] for g in groups(scim)] == ["Eng"]
    engine.dispose()


def test_group_operations_probe_a_quarantined_target_when_no_account_is_due(
    workspace: Workspace, scim_server: ScimServer, scim: ScimReader
) -> None:
    workspace.write_source([GOOD1])
    workspace.sync_now()
    engine = open_store(f"sqlite:///{workspace.db_path}")
    quarantine(engine)
    (workspace.root / "groups.yaml").write_text(ENG)
    workspace.write_config(groups="groups.yaml")

    report = workspace.sync_now()

    assert report.done["group_create"] == 1
    assert not state(engine, "app").quarantined  # type: ignore[union-attr]
    engine.dispose()


def quarantine(engine: Any) -> None:
    """The target quarantined by an earlier outage, due for a probe now."""
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "UPDATE target_state SET quarantined = 1, quarantine_reason = 'outage', probe_interval = 60, "
            "next_probe_at = '2000-01-01 00:00:00.000000'"
        )


class EditFirst:
    """An answer hook that edits a resource in the server just before the engine's first write to it arrives.

    The engine's request then carries a stale ``If-Match`` and the real server answers 412.
    """

    def __init__(self, server: ScimServer, prefix: str, edit: Any) -> None:
        self.http = httpx.Client(base_url=server.base_url + "/", headers={"Authorization": f"Bearer {server.token}"})
        self.prefix = prefix
        self.edit = edit
        self.armed = False
        self.done = False

    def __call__(self, method: str, path: str, body: bytes | None) -> int | None:
        if self.armed and not self.done and method in ("PATCH", "PUT") and self.prefix in path:
            self.done = True
            resource_path = path.split("/v2/", 1)[1]
            self.edit(self.http, resource_path)
        return None


def rename_by_hand(http: httpx.Client, path: str) -> None:
    user = http.get(path).json()
    assert http.put(path, json={**user, "displayName": "Someone Else"}).status_code == 200


def test_after_a_412_the_whole_difference_is_sent_and_what_is_applied_is_true(
    workspace: Workspace, scim_server: ScimServer, scim: ScimReader, fault_proxy: Any
) -> None:
    """A leaver's disable meets a displayName changed by someone else: both are set right, in the same operation."""
    hook = EditFirst(scim_server, "/Users/", rename_by_hand)
    proxy = fault_proxy(scim_server.base_url, answer=hook)
    behind(workspace, proxy.base_url, scim_server.token)
    workspace.write_source([GOOD1])
    workspace.sync_now()
    workspace.write_source([{**GOOD1, "status": "terminated"}])
    hook.armed = True

    report = workspace.sync_now()

    assert hook.done and report.done["disable"] == 1
    user = scim.user("good1@example.com")
    assert user["active"] is False and user["displayName"] == "Good One"
    [disable] = [row for row in workspace.operations() if row["kind"] == "disable"]
    methods = workspace.query("SELECT method, http_status, request_body FROM attempt WHERE operation_id = ?", disable["id"])
    assert [(m, s) for m, s, _ in methods] == [("PATCH", 412), ("GET", 200), ("PATCH", 204)]
    assert '"displayName"' in methods[2][2] and '"active"' in methods[2][2]
    # What is recorded as applied is what the target holds: the next cycle has nothing to send.
    again = workspace.sync_now()
    assert again.planned.get("update", 0) == 0 and again.planned.get("disable", 0) == 0
    writes = [(e.method, e.status) for e in proxy.events if e.method != "GET"]
    assert writes == [("POST", 201), ("PATCH", 412), ("PATCH", 204)]


def test_a_member_removed_by_someone_else_during_a_group_update_comes_back_in_the_same_cycle(
    workspace: Workspace, scim_server: ScimServer, scim: ScimReader, fault_proxy: Any
) -> None:
    people = [GOOD1, GOOD2]
    first_id: dict[str, str] = {}

    def remove_good1(http: httpx.Client, path: str) -> None:
        patch = {"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
                 "Operations": [{"op": "remove", "path": f'members[value eq "{first_id["id"]}"]'}]}  # fmt: skip
        assert http.patch(path, json=patch).status_code in (200, 204)

    hook = EditFirst(scim_server, "/Groups/", remove_good1)
    proxy = fault_proxy(scim_server.base_url, answer=hook)
    (workspace.root / "groups.yaml").write_text('groups:\n  - name: Eng\n    members: "department == \'Engineering\'"\n')
    behind(workspace, proxy.base_url, scim_server.token, groups="groups.yaml")
    workspace.write_source(people)
    workspace.sync_now()
    first_id["id"] = scim.user("good1@example.com")["id"]
    workspace.write_source([*people, hr_row("E4", "Good", "Three", email="good3@example.com")])
    hook.armed = True

    workspace.sync_now()

    assert hook.done
    assert [e.status for e in proxy.events if e.method == "PATCH" and "/Groups/" in e.path][-2:] == [412, 204]
    [eng] = groups(scim)
    expected = {scim.user(f"good{n}@example.com")["id"] for n in (1, 2, 3)}
    assert {m["value"] for m in eng["members"]} == expected
    stored = {row[0] for row in workspace.query("SELECT member_id FROM group_member_state WHERE group_key = 'Eng'")}
    assert stored == expected
