"""One lifecycle contract, run against every SCIM server the tests start.

Servers: scim2-server, SCIMMY (Node.js), and the deviant server with each of
its deviations on, one at a time. For each, ``provisioner probe --write
--suggest`` is run first and the ``quirks:`` block it prints becomes the
target's options, exactly as an operator would paste it.

The lifecycle, on 12 people with managers and the shipped mappings
(``mappings/users.yaml``, ``mappings/groups.yaml``): joiners, a no-op cycle
(0 requests reach the server), movers between groups, leavers, a rehire, a
``userName`` rename, and hand edits in the target. After each step the
server's truth (its store, ``dump()``, not its answers) is compared with the
desired state: every mapped attribute, exact group members, no duplicates,
nothing extra.

A parametrization the engine cannot pass yet is skipped with the engine
behaviour it lacks (``ENGINE_GAPS``): remove the entry once the engine has it.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest
import yaml

from provisioner.cli import main
from provisioner.config import TargetConfig, load_config
from provisioner.demo import DEMO_GROUPS, DEMO_MAPPING
from provisioner.queue import list_operations
from provisioner.store import open_store
from provisioner.sync import TargetReport, load_target_mapping, sync_target
from tests.conftest import hr_row, write_csv
from tests.servers.deviant import DEVIATIONS, start_deviant_server
from tests.servers.scimmy_server import NodeMissing, start_scimmy_server

ENTERPRISE = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
TOKEN_VARIABLE = "PROVISIONER_CONTRACT_TOKEN"

# Deviations the engine cannot converge on yet, with the behaviour it lacks.
ENGINE_GAPS: dict[str, str] = {}

# What a deviation makes impossible to store: left out of the desired state (the engine reports it).
UNSTORABLE: dict[str, set[str]] = {"attribute_dropped": {"title"}, "extension_unsupported": {ENTERPRISE}}


class Server(Protocol):
    base_url: str
    token: str

    def dump(self) -> dict[str, list[dict[str, Any]]]: ...
    def request_count(self) -> int: ...
    def stop(self) -> None: ...


def _params() -> list[Any]:
    params: list[Any] = [pytest.param("scim2-server", id="scim2-server"), pytest.param("scimmy", id="scimmy")]
    for deviation in sorted(DEVIATIONS):
        marks = [pytest.mark.skip(reason=ENGINE_GAPS[deviation])] if deviation in ENGINE_GAPS else []
        params.append(pytest.param(deviation, id=f"deviant-{deviation}", marks=marks))
    return params


@pytest.fixture(params=_params())
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    name = request.param
    if name == "scimmy":
        try:
            started: Server = start_scimmy_server()
        except NodeMissing as error:
            pytest.fail(str(error))
    else:
        # With no deviation on, the deviant server is scim2-server's application, unchanged.
        started = start_deviant_server(() if name == "scim2-server" else {name})
    try:
        yield started
    finally:
        started.stop()


def probe_suggestion(folder: Path, server: Server, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    """The ``quirks:`` block that ``provisioner probe --write --suggest`` prints for this server."""
    folder.mkdir()
    config = write_config(folder, server, quirks={})
    capsys.readouterr()
    code = main(["probe", "--config", str(config), "--target", "app", "--write", "--suggest"])
    out, err = capsys.readouterr()
    assert code == 0, err
    block = yaml.safe_load(out)
    assert set(block) == {"quirks"}, out
    assert server.dump() == {"Users": [], "Groups": []}, "the probe left test resources behind"
    return dict(block["quirks"])


def write_config(folder: Path, server: Server, *, quirks: dict[str, Any], **options: Any) -> Path:
    target: dict[str, Any] = {
        "base_url": server.base_url,
        "allow_insecure_http": True,
        "auth": {"type": "bearer", "token": f"${{{TOKEN_VARIABLE}}}"},
        "source": "hr",
        "mapping": str(DEMO_MAPPING),
        "groups": str(DEMO_GROUPS),
        "max_concurrency": 4,
        **options,
    }
    if quirks:
        target["quirks"] = quirks
    config = {
        "state": "sqlite:///state.db",
        "sources": {"hr": {"type": "csv", "path": "hr.csv", "key": "employee_id"}},
        "targets": {"app": target},
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def people() -> dict[str, dict[str, str]]:
    """Twelve people in three departments; E01 manages E02-E04, who manage the others."""
    rows = [
        hr_row("E01", "Ada", "Lovelace", department="Engineering", title="CTO", phone="+1 555 0100"),
        hr_row("E02", "Grace", "Hopper", department="Engineering", title="Head of Engineering", manager_id="E01"),
        hr_row("E03", "Alan", "Turing", department="Sales", title="Head of Sales", manager_id="E01"),
        hr_row("E04", "Edsger", "Dijkstra", department="Finance", title="Head of Finance", manager_id="E01"),
        hr_row("E05", "Barbara", "Liskov", department="Engineering", manager_id="E02"),
        hr_row("E06", "Donald", "Knuth", department="Sales", title="Account Executive", manager_id="E03"),
        hr_row("E07", "Frances", "Allen", department="Engineering", manager_id="E02"),
        hr_row("E08", "John", "Backus", department="Sales", title="Sales Engineer", manager_id="E03"),
        hr_row("E09", "Margaret", "Hamilton", department="Finance", title="Controller", manager_id="E04"),
        hr_row("E10", "Ken", "Thompson", department="Engineering", manager_id="E02"),
        hr_row("E11", "Radia", "Perlman", department="Finance", title="Accountant", manager_id="E04"),
        hr_row("E12", "Leslie", "Lamport", department="Engineering", manager_id="E02"),
    ]
    return {row["employee_id"]: row for row in rows}


def render(row: dict[str, str]) -> dict[str, Any]:
    """What mappings/users.yaml makes of a row, written out independently of the engine.

    ``manager`` holds the manager's employee id; the check turns it into the SCIM id.
    """
    email = row["email"].lower()
    user: dict[str, Any] = {
        "userName": email,
        "externalId": row["employee_id"],
        "name": {
            "givenName": row["first_name"],
            "familyName": row["last_name"],
            "formatted": f"{row['first_name']} {row['last_name']}",
        },
        "displayName": f"{row['first_name']} {row['last_name']}",
        "emails": [{"value": email, "type": "work", "primary": True}],
        "active": True,
    }
    if row["title"]:
        user["title"] = row["title"]
    if row["phone"]:
        user["phoneNumbers"] = [{"value": row["phone"], "type": "work"}]
    enterprise = {
        "employeeNumber": row["employee_id"],
        "department": row["department"],
        "costCenter": row["cost_center"],
        "division": row["division"],
        "organization": "Example Corp",
    }
    if row["manager_id"]:
        enterprise["manager"] = {"value": row["manager_id"]}
    user[ENTERPRISE] = enterprise
    return user


def differences(want: Any, have: Any, where: str) -> list[str]:
    """Where ``have`` (the server's) differs from ``want``; keys the server adds (meta, $ref, display) are ignored."""
    if isinstance(want, dict):
        if not isinstance(have, dict):
            return [f"{where}: expected an object, found {have!r}"]
        found: list[str] = []
        for key, value in want.items():
            if key not in have:
                found.append(f"{where}.{key}: missing (expected {value!r})")
            else:
                found.extend(differences(value, have[key], f"{where}.{key}"))
        return found
    if isinstance(want, list):
        if not isinstance(have, list) or len(have) != len(want):
            return [f"{where}: expected {want!r}, found {have!r}"]
        return [d for i, (w, h) in enumerate(zip(want, have, strict=True)) for d in differences(w, h, f"{where}[{i}]")]
    return [] if want == have else [f"{where}: expected {want!r}, found {have!r}"]


class Lifecycle:
    """The HR file, the engine's state and the desired state of one target, step by step."""

    def __init__(self, folder: Path, server: Server, deviation: str, quirks: dict[str, Any]) -> None:
        self.folder = folder
        self.server = server
        self.quirks = quirks
        self.unstorable = UNSTORABLE.get(deviation, set())
        self.rows = people()
        # What each person's account should hold: the last row the target accepted for them.
        self.applied: dict[str, dict[str, str]] = {}
        self.user_names: dict[str, str] = {}  # employee id -> the userName the account has
        self.groups_made: set[str] = set()
        self.hand_users: set[str] = set()
        self.hand_members: dict[str, set[str]] = defaultdict(set)  # group -> userNames added by hand
        self.options: dict[str, Any] = {}
        self.configure()

    def configure(self, **options: Any) -> None:
        self.options.update(options)
        write_config(self.folder, self.server, quirks=self.quirks, **self.options)

    def sync(self, step: str, *, may_fail: bool = False) -> TargetReport:
        write_csv(self.folder / "hr.csv", list(self.rows.values()))
        config = load_config(self.folder / "config.yaml")
        engine = open_store(config.state)
        # Operations that failed in an earlier step (a refused rename) are not this step's.
        earlier = {row["id"] for row in list_operations(engine, target="app") if row["status"] == "failed"}
        try:
            report = asyncio.run(sync_target(engine, config, "app", load_target_mapping(config, "app")))
            if not may_fail:
                failures = [
                    f"{row['kind']} {row['identity_key']}: {row['last_error']}"
                    for row in list_operations(engine, target="app")
                    if row["status"] in ("failed", "retry_wait") and row["id"] not in earlier
                ]
                assert report.failed == 0 and report.deferred == 0 and not failures, (
                    f"{step}: operations did not succeed: {report.summary()}\n" + "\n".join(failures)
                )
        finally:
            engine.dispose()
        for key, row in self.rows.items():
            if row["status"] == "active":
                self.applied[key] = dict(row)
                self.user_names.setdefault(key, row["email"].lower())
                self.groups_made |= {f"dept-{row['department'].lower()}", "all-staff"}
        return report

    def failed_operations(self) -> list[dict[str, Any]]:
        config = load_config(self.folder / "config.yaml")
        engine = open_store(config.state)
        try:
            return [row for row in list_operations(engine, target="app") if row["status"] == "failed"]
        finally:
            engine.dispose()

    # -- the desired state ----------------------------------------------------------------------

    def desired_users(self, ids: dict[str, str]) -> dict[str, dict[str, Any]]:
        """userName -> the attributes its account must hold; ``ids`` maps userNames to SCIM ids."""
        users: dict[str, dict[str, Any]] = {}
        for key, row in self.applied.items():
            user = render(row)
            user["userName"] = self.user_names[key]
            user["active"] = self.rows[key]["status"] == "active"
            manager = (user[ENTERPRISE].get("manager") or {}).get("value")
            if manager:
                user[ENTERPRISE]["manager"] = {"value": ids.get(self.user_names.get(manager, "?"), "?")}
            for attribute in self.unstorable:
                user.pop(attribute, None)
            users[user["userName"]] = user
        return users

    def desired_groups(self) -> dict[str, set[str]]:
        """displayName -> the userNames of its members."""
        groups: dict[str, set[str]] = {name: set() for name in self.groups_made}
        for key, row in self.rows.items():
            if row["status"] == "active" and key in self.applied:
                for name in (f"dept-{row['department'].lower()}", "all-staff"):
                    groups[name].add(self.user_names[key])
        for name, members in self.hand_members.items():
            groups[name] |= members
        return groups

    # -- the check ------------------------------------------------------------------------------

    def check(self, step: str) -> None:
        """The server's store equals the desired state: attributes, members, no duplicates, nothing extra."""
        dump = self.server.dump()
        problems: list[str] = []
        by_name: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for user in dump["Users"]:
            by_name[str(user.get("userName", "")).lower()].append(user)
        problems += [f"user {n}: {len(found)} accounts" for n, found in by_name.items() if len(found) > 1]
        ids = {name: str(found[0]["id"]) for name, found in by_name.items()}
        names_by_id = {v: k for k, v in ids.items()}
        desired = self.desired_users(ids)
        extra = set(by_name) - set(desired) - self.hand_users
        missing = set(desired) - set(by_name)
        problems += [f"user {n}: not in the target" for n in sorted(missing)]
        problems += [f"user {n}: in the target, not desired" for n in sorted(extra)]
        for name, want in sorted(desired.items()):
            if name in by_name:
                problems += differences(want, by_name[name][0], f"user {name}")

        member_by = self.quirks.get("member_value", "id")
        groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for group in dump["Groups"]:
            groups[str(group.get("displayName"))].append(group)
        problems += [f"group {n}: {len(found)} groups" for n, found in groups.items() if len(found) > 1]
        wanted_groups = self.desired_groups()
        problems += [f"group {n}: not in the target" for n in sorted(set(wanted_groups) - set(groups))]
        problems += [f"group {n}: in the target, not desired" for n in sorted(set(groups) - set(wanted_groups))]
        for name, members in sorted(wanted_groups.items()):
            if name not in groups:
                continue
            values = [str(m.get("value")) for m in groups[name][0].get("members") or []]
            if len(values) != len(set(values)):
                problems.append(f"group {name}: duplicate member entries {sorted(values)}")
            have = {v if member_by == "userName" else names_by_id.get(v, f"unknown id {v}") for v in values}
            if have != members:
                problems.append(
                    f"group {name}: members missing {sorted(members - have)}, not desired {sorted(have - members)}"
                )
        assert not problems, f"after {step}, the target differs from the desired state:\n" + "\n".join(problems)

    # -- hand edits, as an administrator makes them in the target's own UI --------------------

    def http(self) -> Any:
        import httpx

        headers = {"Authorization": f"Bearer {self.server.token}", "Content-Type": "application/scim+json"}
        return httpx.Client(base_url=self.server.base_url + "/", headers=headers, timeout=10)

    def group(self, name: str) -> dict[str, Any]:
        [group] = [g for g in self.server.dump()["Groups"] if g.get("displayName") == name]
        return group

    def member_value(self, user_name: str) -> str:
        if self.quirks.get("member_value") == "userName":
            return user_name
        [user] = [u for u in self.server.dump()["Users"] if str(u.get("userName")).lower() == user_name]
        return str(user["id"])

    def remove_member_by_hand(self, group_name: str, user_name: str) -> None:
        value = self.member_value(user_name)
        group_id = self.group(group_name)["id"]
        forms = [
            [{"op": "remove", "path": f'members[value eq "{value}"]'}],
            [{"op": "remove", "path": "members", "value": [{"value": value}]}],
        ]
        with self.http() as http:
            for operations in forms:
                body = {"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"], "Operations": operations}
                http.patch(f"Groups/{group_id}", json=body)
                if value not in {str(m.get("value")) for m in self.group(group_name).get("members") or []}:
                    return
        raise AssertionError(f"could not remove {user_name} from {group_name} by hand")

    def add_user_by_hand(self, user_name: str, group_name: str) -> None:
        with self.http() as http:
            made = http.post(
                "Users", json={"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": user_name}
            )
            assert made.status_code == 201, made.text
            value = user_name if self.quirks.get("member_value") == "userName" else made.json()["id"]
            operations = [{"op": "add", "path": "members", "value": [{"value": value}]}]
            body = {"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"], "Operations": operations}
            assert http.patch(f"Groups/{self.group(group_name)['id']}", json=body).status_code in (200, 204)
        self.hand_users.add(user_name)
        self.hand_members[group_name].add(user_name)


def test_lifecycle_converges(
    server: Server,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    deviation = request.node.callspec.params["server"]
    monkeypatch.setenv(TOKEN_VARIABLE, server.token)
    quirks = probe_suggestion(tmp_path / "probe", server, capsys)
    if quirks and "quirks" not in TargetConfig.model_fields:
        pytest.skip(f"the engine's target config has no quirks: block to declare {quirks}")
    world = Lifecycle(tmp_path, server, deviation, quirks)

    # Joiners, managers before their reports, and their groups.
    world.sync("joiners")
    world.check("joiners")

    # Nothing changed in the source: nothing is sent.
    before = server.request_count()
    world.sync("a no-op cycle")
    assert server.request_count() == before, "a cycle with no change in the source sent requests"
    world.check("a no-op cycle")

    # Movers: two change department (and so groups), one title, one manager, one gets a phone.
    world.rows["E05"].update(department="Sales", cost_center="CC-200")
    world.rows["E06"].update(department="Finance", cost_center="CC-300")
    world.rows["E07"].update(title="Staff Engineer")
    world.rows["E08"].update(manager_id="E04")
    world.rows["E09"].update(phone="+1 555 0109")
    world.sync("movers")
    world.check("movers")

    # Leavers: disabled and out of their groups.
    world.rows["E10"].update(status="terminated")
    world.rows["E11"].update(status="terminated")
    world.sync("leavers")
    world.check("leavers")

    # A rehire, into another department.
    world.rows["E10"].update(status="active", department="Finance", title="Analyst", manager_id="E04")
    world.sync("a rehire")
    world.check("a rehire")

    # A userName rename: the same account, renamed; never a second one.
    world.rows["E12"].update(last_name="Lamport-Smith", email="leslie.lamport-smith@example.com")
    if deviation == "immutable_username":
        world.sync("a rename the target refuses", may_fail=True)
        [failed] = world.failed_operations()
        assert failed["identity_key"] == "E12" and "mutability" in str(failed["last_error"])
        # The rest of the change is applied; the account keeps its userName.
    else:
        world.sync("a rename")
        world.user_names["E12"] = "leslie.lamport-smith@example.com"
    world.check("a rename")

    # Hand edits: a managed member removed, an account of the target's own added to a group.
    world.remove_member_by_hand("all-staff", world.user_names["E01"])
    world.add_user_by_hand("hand.made@example.com", "dept-engineering")
    world.configure(group_reconcile_every="0s")
    world.sync("hand edits")
    world.check("hand edits")
