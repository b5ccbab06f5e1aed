"""Groups and memberships against a real SCIM server (scim2-server over HTTP).

The server's state is read with plain httpx; HTTP calls are counted from the
operation's attempt rows and by wrapping httpx's transport (``AsyncHTTPTransport.handle_async_request``).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from provisioner.config import load_config
from tests.conftest import hr_row, write_csv
from provisioner.demo import DEMO_MAPPING, ScimServer, start_scim_server
from provisioner.errors import ConfigError
from provisioner.mapping import load_mapping
from provisioner.queue import get_operation, list_operations
from provisioner.store import open_store
from provisioner.sync import TargetReport, sync_target

GROUPS = """groups:
  - name: "dept-{{ department | lower }}"
  - name: all-staff
"""


@pytest.fixture
def server() -> Iterator[ScimServer]:
    with start_scim_server() as srv:
        yield srv


def person(eid: str, department: str = "Engineering", **extra: str) -> dict[str, str]:
    return hr_row(eid, "P", eid, email=f"{eid.lower()}@example.com", department=department, **extra)


class CountingTransport:
    """Counts every request the engine's httpx clients send, by method and first path segment."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: Counter[tuple[str, str]] = Counter()
        original = httpx.AsyncHTTPTransport.handle_async_request
        counter = self.calls

        async def send(transport: httpx.AsyncHTTPTransport, request: httpx.Request) -> httpx.Response:
            resource = request.url.path.split("/v2/", 1)[-1].split("/", 1)[0]
            counter[(request.method, resource)] += 1
            return await original(transport, request)

        monkeypatch.setattr(httpx.AsyncHTTPTransport, "handle_async_request", send)

    def of(self, method: str, resource: str = "Groups") -> int:
        return self.calls[(method, resource)]

    def reset(self) -> None:
        self.calls.clear()


class World:
    """A config, a CSV source, a groups file and a state database around one real SCIM server."""

    def __init__(self, tmp: Path, server: ScimServer, monkeypatch: pytest.MonkeyPatch, groups: str = GROUPS) -> None:
        self.tmp = tmp
        self.server = server
        self.csv = tmp / "hr.csv"
        (tmp / "groups.yaml").write_text(groups)
        monkeypatch.setenv("TARGET_TOKEN", server.token)
        self.configure()

    def configure(self, **options: str) -> None:
        lines = "".join(f"\n    {k}: {v}" for k, v in options.items())
        (self.tmp / "config.yaml").write_text(
            f"""state: sqlite:///state.db
sources:
  hr: {{type: csv, path: hr.csv, key: employee_id}}
targets:
  app:
    base_url: {self.server.base_url}
    allow_insecure_http: true
    auth: {{type: bearer, token: "${{TARGET_TOKEN}}"}}
    source: hr
    mapping: {DEMO_MAPPING}
    groups: groups.yaml
    max_concurrency: 4{lines}
"""
        )

    def write(self, rows: list[dict[str, str]]) -> None:
        write_csv(self.csv, rows)

    def sync(self) -> TargetReport:
        config = load_config(self.tmp / "config.yaml")
        engine = open_store(config.state)
        return asyncio.run(sync_target(engine, config, "app", load_mapping(config.targets["app"].mapping)))

    def engine(self):  # noqa: ANN201 - an SQLAlchemy engine
        return open_store(load_config(self.tmp / "config.yaml").state)

    def group_operations(self) -> list[dict[str, Any]]:
        rows = list_operations(self.engine(), target="app")
        return [row for row in rows if row["kind"].startswith("group_")]

    def http(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.server.token}", "Content-Type": "application/scim+json"}
        return httpx.Client(base_url=self.server.base_url + "/", headers=headers)

    def groups(self) -> dict[str, list[dict[str, Any]]]:
        """Every group in the target by displayName (a list: names may repeat)."""
        with self.http() as http:
            resources = http.get("Groups", params={"count": 1000}).json().get("Resources", [])
        out: dict[str, list[dict[str, Any]]] = {}
        for group in resources:
            out.setdefault(group["displayName"], []).append(group)
        return out

    def members(self, name: str) -> set[str]:
        """The userNames of a group's members in the target."""
        [group] = self.groups()[name]
        ids = {m["value"] for m in group.get("members", [])}
        with self.http() as http:
            users = http.get("Users", params={"count": 1000}).json().get("Resources", [])
        return {u["userName"] for u in users if u["id"] in ids}

    def user_id(self, user_name: str) -> str:
        with self.http() as http:
            [user] = http.get("Users", params={"filter": f'userName eq "{user_name}"'}).json()["Resources"]
            return str(user["id"])


def test_a_department_change_moves_the_user_between_two_groups(
    tmp_path: Path, server: ScimServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = World(tmp_path, server, monkeypatch)
    world.write([person("E1"), person("E2"), person("E3", "Sales")])
    first = world.sync()
    assert first.failed == 0 and first.done["group_create"] == 3
    assert world.members("dept-engineering") == {"e1@example.com", "e2@example.com"}
    assert world.members("dept-sales") == {"e3@example.com"}

    world.write([person("E1"), person("E2", "Sales"), person("E3", "Sales")])
    calls = CountingTransport(monkeypatch)
    report = world.sync()

    assert report.failed == 0 and report.done["group_members"] == 2
    assert world.members("dept-engineering") == {"e1@example.com"}
    assert world.members("dept-sales") == {"e2@example.com", "e3@example.com"}
    assert world.members("all-staff") == {"e1@example.com", "e2@example.com", "e3@example.com"}
    # One PATCH per group that changed; all-staff is untouched; no group is read or created.
    assert calls.of("PATCH") == 2 and calls.of("POST") == 0 and calls.of("GET") == 0
    moved = {op["identity_key"]: op for op in world.group_operations() if op["kind"] == "group_members"}
    assert set(moved) == {"dept-engineering", "dept-sales"}
    assert moved["dept-engineering"]["note"] == "group 'dept-engineering' -1 members"


def test_a_group_of_250_members_is_built_in_3_patch_calls(
    tmp_path: Path, server: ScimServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = World(tmp_path, server, monkeypatch, groups="groups:\n  - name: all-staff\n")
    world.write([person(f"E{i:03d}") for i in range(250)])
    calls = CountingTransport(monkeypatch)

    report = world.sync()

    assert report.failed == 0
    [op] = world.group_operations()
    _row, attempts = get_operation(world.engine(), op["id"])
    assert [a["method"] for a in attempts] == ["GET", "POST", "PATCH", "PATCH", "PATCH"]
    assert calls.of("PATCH") == 3 and calls.of("POST") == 1
    assert len(world.members("all-staff")) == 250
    calls.reset()
    assert world.sync().failed == 0
    assert calls.of("PATCH") == calls.of("GET") == 0


def test_a_member_removed_by_hand_is_added_back_on_the_next_full_cycle(
    tmp_path: Path, server: ScimServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = World(tmp_path, server, monkeypatch)
    world.write([person("E1"), person("E2")])
    world.sync()
    [group] = world.groups()["dept-engineering"]
    victim = world.user_id("e1@example.com")
    with world.http() as http:
        removed = http.patch(
            f"Groups/{group['id']}",
            json={"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
                  "Operations": [{"op": "remove", "path": f'members[value eq "{victim}"]'}]},  # fmt: skip
        )
        assert removed.status_code in (200, 204)
    assert world.members("dept-engineering") == {"e2@example.com"}

    # An ordinary cycle trusts what it applied: nothing is read, nothing is sent.
    world.sync()
    assert world.members("dept-engineering") == {"e2@example.com"}

    world.configure(group_reconcile_every="0s")
    report = world.sync()

    assert report.failed == 0
    assert world.members("dept-engineering") == {"e1@example.com", "e2@example.com"}
    [drift] = [op for op in world.group_operations() if op["reason"] == "drift"]
    assert drift["identity_key"] == "dept-engineering" and drift["status"] == "succeeded"


def test_a_group_of_the_same_name_in_the_target_is_linked_not_duplicated(
    tmp_path: Path, server: ScimServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = World(tmp_path, server, monkeypatch)
    with world.http() as http:
        made = http.post("Groups", json={"schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"],
                                         "displayName": "dept-engineering"})  # fmt: skip
        assert made.status_code == 201
    world.write([person("E1"), person("E2")])

    report = world.sync()

    assert report.failed == 0
    [group] = world.groups()["dept-engineering"]
    assert group["id"] == made.json()["id"]
    assert world.members("dept-engineering") == {"e1@example.com", "e2@example.com"}
    linked = [op for op in world.group_operations() if op["identity_key"] == "dept-engineering"]
    assert "linked an existing group" in str(linked[0]["note"])


def test_two_groups_of_one_name_in_the_target_go_to_review_rather_than_a_guess(
    tmp_path: Path, server: ScimServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = World(tmp_path, server, monkeypatch)
    with world.http() as http:
        for _ in range(2):
            http.post("Groups", json={"schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"],
                                      "displayName": "dept-engineering"})  # fmt: skip
    world.write([person("E1")])

    report = world.sync()

    assert report.failed == 1
    [failed] = [op for op in world.group_operations() if op["status"] == "failed"]
    assert failed["identity_key"] == "dept-engineering" and "matches 2 groups" in failed["last_error"]
    assert len(world.groups()["dept-engineering"]) == 2


def test_a_leaver_is_removed_from_every_group_unless_configured_otherwise(
    tmp_path: Path, server: ScimServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = World(tmp_path, server, monkeypatch)
    world.write([person("E1"), person("E2"), person("E3")])
    world.sync()

    world.configure(remove_leavers_from_groups="false")
    world.write([person("E1"), person("E2"), person("E3", status="terminated")])
    world.sync()
    assert "e3@example.com" in world.members("all-staff")

    world.configure()
    world.write([person("E1"), person("E2", status="terminated"), person("E3", status="terminated")])
    report = world.sync()

    assert report.failed == 0
    assert world.members("all-staff") == {"e1@example.com"}
    assert world.members("dept-engineering") == {"e1@example.com"}


def test_a_renamed_rule_renames_its_groups_in_place_when_they_have_a_key(
    tmp_path: Path, server: ScimServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    keyed = 'groups:\n  - name: "dept-{{ department | lower }}"\n    key: "department:{{ department }}"\n'
    world = World(tmp_path, server, monkeypatch, groups=keyed)
    world.write([person("E1"), person("E2", "Sales")])
    world.sync()
    before = {name: group["id"] for name, [group] in world.groups().items()}

    (tmp_path / "groups.yaml").write_text(keyed.replace('"dept-{{', '"team-{{'))
    report = world.sync()

    assert report.failed == 0 and report.done["group_create"] == 0
    after = {name: group["id"] for name, [group] in world.groups().items()}
    assert after == {"team-engineering": before["dept-engineering"], "team-sales": before["dept-sales"]}
    assert world.members("team-sales") == {"e2@example.com"}


def test_a_template_name_with_a_literal_key_is_refused_naming_its_line(
    tmp_path: Path, server: ScimServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = World(tmp_path, server, monkeypatch,
                  groups='groups:\n  - name: "dept-{{ department }}"\n    key: departments\n')  # fmt: skip
    world.write([person("E1")])

    with pytest.raises(ConfigError, match=r"groups.yaml:3: a group named by a template needs a template key"):
        world.sync()
