"""The lifecycle through a fault-injecting proxy ends where it ends without faults (issue 3, "Done means").

The same scenario — joiners with managers, a quiet second cycle, movers,
leavers (rows removed, status terminated), rehires — runs twice, each on its
own fresh scim2-server: once directly, once through :class:`tests.faultproxy.FaultProxy`
injecting every fault kind (``lost_response`` included) into 20 % of the
requests on a fixed seed. Operations that give up within a cycle wait in the
queue (``retry_wait``); the test makes them due at once and sends them again
with :func:`provisioner.sync.send_due`, the way the daemon's retry job does
minutes later. Then both servers must hold the same users with the same
attributes, with no duplicate and no operation left failed.

The target is sent one request at a time (``max_concurrency: 1``): the proxy
draws faults in arrival order, so the run, its faults and its figures are the
same every time.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from sqlalchemy import Engine, func, select, update

from provisioner.config import load_config
from provisioner.demo import DEMO_MAPPING, ScimServer, start_scim_server
from provisioner.store import Attempt, Operation, open_store, utcnow
from provisioner.sync import TargetReport, load_target_mapping, send_due, sync_target
from tests.faultproxy import ALL_KINDS, FaultProxy, fault_proxy  # noqa: F401 - fault_proxy is a fixture

ENTERPRISE = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
COLUMNS = ("employee_id", "first_name", "last_name", "email", "phone", "title",
           "department", "cost_center", "division", "manager_id", "status")  # fmt: skip
OP = Operation.__table__
ATTEMPT = Attempt.__table__
# Rounds of send_due after a cycle before the test gives up on the queue draining.
MAX_DRAIN_ROUNDS = 12
SEED = 7
RATE = 0.2


def person(eid: str, first: str, last: str, **columns: str) -> dict[str, str]:
    row = dict.fromkeys(COLUMNS, "")
    row.update(employee_id=eid, first_name=first, last_name=last, email=f"{first}.{last}@example.com".lower(),
               phone=f"+1 555 01{eid[-2:]}", title="Engineer", department="Engineering", cost_center="CC-100",
               division="R&D", status="active")  # fmt: skip
    row.update(columns)
    return row


FIRST = ("Ada", "Grace", "Alan", "Edsger", "Barbara", "Ken", "Dennis", "Donald", "John", "Frances", "Niklaus",
         "Leslie", "Tony", "Margaret", "Radia", "Butler", "Shafi", "Robin", "Adele", "Jim")  # fmt: skip
LAST = ("Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov")
HEADS = ("E002", "E003", "E004")


def joiners() -> list[dict[str, str]]:
    """A company of 100: a CEO, three heads, 96 people under them (every fourth two levels down)."""
    rows = [
        person("E001", "Ada", "Lovelace", title="CEO", department="Board"),
        person("E002", "Grace", "Hopper", title="Head of Engineering", manager_id="E001"),
        person("E003", "Alan", "Turing", title="Head of Research", department="Research", manager_id="E001"),
        person("E004", "Edsger", "Dijkstra", title="Head of Sales", department="Sales", cost_center="CC-200",
               division="Commercial", manager_id="E001"),  # fmt: skip
    ]
    for number in range(5, 101):
        first, last = FIRST[number % len(FIRST)], LAST[number // len(FIRST) % len(LAST)]
        # Every fourth reports to the person before them: a manager who is not a head.
        manager = f"E{number - 1:03d}" if number % 4 == 0 and number > 5 else HEADS[number % 3]
        rows.append(person(f"E{number:03d}", first, f"{last}{number}", manager_id=manager))
    # Never provisioned: a leaver before the first cycle, and a contractor (out of the mapping's scope).
    rows.append(person("E900", "Charles", "Babbage", status="terminated"))
    rows.append(person("E901", "Hedy", "Lamarr", department="Contractors"))
    return rows


def change(rows: list[dict[str, str]], eid: str, **columns: str) -> list[dict[str, str]]:
    return [{**row, **columns} if row["employee_id"] == eid else row for row in rows]


def without(rows: list[dict[str, str]], *eids: str) -> list[dict[str, str]]:
    return [row for row in rows if row["employee_id"] not in eids]


def scenario() -> list[tuple[str, list[dict[str, str]]]]:
    """The lifecycle, cycle by cycle: (name, the HR export of that cycle)."""
    start = joiners()
    moved = start
    for number in range(5, 101, 5):  # 20 movers: department, title, manager, a phone emptied
        moved = change(moved, f"E{number:03d}", department="Research", cost_center="CC-300")
        moved = change(moved, f"E{number + 1:03d}", title="Senior Engineer")
    moved = change(moved, "E007", manager_id="E001")
    moved = change(moved, "E009", phone="")
    moved = change(moved, "E002", title="VP Engineering")
    left = without(moved, *(f"E{n:03d}" for n in range(10, 100, 20)))  # 5 rows removed
    for number in range(20, 101, 20):  # 5 terminated
        left = change(left, f"E{number:03d}", status="terminated")
    rehired = change(left, "E020", status="active", title="Principal Engineer")
    rehired = change(rehired, "E040", status="active")
    rehired = [*rehired, *(row for row in moved if row["employee_id"] in ("E010", "E030"))]
    return [
        ("joiners", start),
        ("no change", start),
        ("movers", moved),
        ("leavers", left),
        ("rehires", rehired),
        ("settle", rehired),
    ]


@dataclass
class CycleFigures:
    name: str
    summary: dict[str, int]
    drain_rounds: int
    drained: Counter[str] = field(default_factory=Counter)


class World:
    """A config folder (config.yaml, hr.csv, state.db) whose target is reached at ``base_url``."""

    def __init__(self, root: Path, base_url: str, token: str, monkeypatch: pytest.MonkeyPatch) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        variable = f"FAULTS_TOKEN_{root.name.upper()}"
        monkeypatch.setenv(variable, token)
        (root / "config.yaml").write_text(
            f"""state: sqlite:///state.db
sources:
  hr: {{type: csv, path: hr.csv, key: employee_id}}
targets:
  app:
    base_url: {base_url}
    allow_insecure_http: true
    auth: {{type: bearer, token: "${{{variable}}}"}}
    source: hr
    mapping: {DEMO_MAPPING}
    update_method: patch
    max_concurrency: 1
    max_deprovision_share: 0.5
    timeout: 0.5
    retry: {{backoff_base: 0.01, backoff_cap: 0.05, max_retry_after: 1}}
""",
            encoding="utf-8",
        )
        self.config = load_config(root / "config.yaml")
        self.engine: Engine = open_store(self.config.state)
        self.cycles: list[CycleFigures] = []

    def write(self, rows: list[dict[str, str]]) -> None:
        with (self.root / "hr.csv").open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

    async def cycle(self, name: str, rows: list[dict[str, str]]) -> CycleFigures:
        """One sync cycle, then the queue's retries made due and sent until nothing waits."""
        self.write(rows)
        self.mapping = load_target_mapping(self.config, "app")
        report = await sync_target(self.engine, self.config, "app", self.mapping)
        figures = CycleFigures(name, report.summary(), 0)
        while self.waiting():
            assert figures.drain_rounds < MAX_DRAIN_ROUNDS, f"{name}: the queue did not drain: {self.by_status()}"
            figures.drain_rounds += 1
            self.make_due()
            later: TargetReport = await send_due(self.engine, self.config, "app", self.mapping)
            figures.drained.update(later.statuses)
        self.cycles.append(figures)
        return figures

    def waiting(self) -> int:
        with self.engine.connect() as conn:
            query = select(func.count()).select_from(OP).where(OP.c.status.in_(("pending", "running", "retry_wait")))
            return int(conn.execute(query).scalar_one())

    def make_due(self) -> None:
        """Test setup: the retries the queue scheduled minutes ahead are due now."""
        with self.engine.begin() as conn:
            conn.execute(
                update(OP).where(OP.c.status == "retry_wait").values(next_attempt_at=utcnow() - timedelta(seconds=1))
            )

    def by_status(self) -> Counter[str]:
        with self.engine.connect() as conn:
            return Counter(dict(conn.execute(select(OP.c.status, func.count()).group_by(OP.c.status)).all()))

    def operations(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return [dict(row) for row in conn.execute(select(OP).order_by(OP.c.id)).mappings()]

    def attempts(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return [dict(row) for row in conn.execute(select(ATTEMPT).order_by(ATTEMPT.c.id)).mappings()]

    def close(self) -> None:
        self.engine.dispose()


def server_users(server: ScimServer) -> list[dict[str, Any]]:
    """Every user on a server, read directly (never through the proxy or the engine)."""
    headers = {"Authorization": f"Bearer {server.token}", "Accept": "application/scim+json"}
    with httpx.Client(base_url=server.base_url + "/", headers=headers, timeout=10) as http:
        response = http.get("Users", params={"count": 1000})
        response.raise_for_status()
        body = response.json()
    users = list(body.get("Resources") or [])
    assert body["totalResults"] == len(users)
    return users


def comparable(users: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Users by userName, without server-made fields; a manager named by userName instead of id."""
    names = {user["id"]: user["userName"] for user in users}
    out: dict[str, dict[str, Any]] = {}
    for user in users:
        data = {k: v for k, v in user.items() if k not in ("id", "meta")}
        data["schemas"] = sorted(data.get("schemas") or [])
        enterprise = data.get(ENTERPRISE)
        if isinstance(enterprise, dict) and isinstance(enterprise.get("manager"), dict):
            manager = dict(enterprise["manager"])
            manager["value"] = names.get(manager.get("value"), f"<no user with id {manager.get('value')}>")
            if "$ref" in manager:
                manager["$ref"] = names.get(str(manager["$ref"]).rstrip("/").rsplit("/", 1)[-1], "<dangling $ref>")
            data[ENTERPRISE] = {**enterprise, "manager": manager}
        out[user["userName"]] = data
    return out


def differences(a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]]) -> list[str]:
    """Human-readable differences between two comparable states."""
    found = [f"only on the first server: {name}" for name in sorted(a.keys() - b.keys())]
    found += [f"only on the second server: {name}" for name in sorted(b.keys() - a.keys())]
    for name in sorted(a.keys() & b.keys()):
        if a[name] != b[name]:
            keys = sorted(k for k in a[name].keys() | b[name].keys() if a[name].get(k) != b[name].get(k))
            found += [f"{name}: {k}: {a[name].get(k)!r} != {b[name].get(k)!r}" for k in keys]
    return found


def expected_active() -> dict[str, bool]:
    """userName → active, as the final HR export says."""
    final = scenario()[-1][1]
    rows = {row["employee_id"]: row for row in joiners()}
    rows.update({row["employee_id"]: row for row in final})
    out = {}
    for eid, row in rows.items():
        if eid in ("E900", "E901"):
            continue  # never provisioned
        present = any(r["employee_id"] == eid for r in final)
        out[row["email"]] = present and row["status"] == "active"
    return out


@pytest.fixture
def quiet_logs() -> Iterator[list[dict[str, Any]]]:
    """Log events captured instead of printed: the figures printed with -s stay readable."""
    with structlog.testing.capture_logs() as events:
        yield events


@pytest.fixture
def clean_server() -> Iterator[ScimServer]:
    with start_scim_server() as server:
        yield server


@pytest.fixture
def faulty_server() -> Iterator[ScimServer]:
    with start_scim_server() as server:
        yield server


async def run_scenario(world: World) -> None:
    for name, rows in scenario():
        await world.cycle(name, rows)


async def test_lifecycle_through_20_percent_faults_ends_as_without_faults(
    tmp_path: Path,
    clean_server: ScimServer,
    faulty_server: ScimServer,
    fault_proxy: Any,  # noqa: F811 - the fixture imported above
    monkeypatch: pytest.MonkeyPatch,
    quiet_logs: list[dict[str, Any]],
) -> None:
    clean = World(tmp_path / "clean", clean_server.base_url, clean_server.token, monkeypatch)
    proxy: FaultProxy = fault_proxy(faulty_server.base_url, rate=RATE, seed=SEED, kinds=ALL_KINDS, delay=1.0)
    faulty = World(tmp_path / "faulty", proxy.base_url, faulty_server.token, monkeypatch)
    try:
        await run_scenario(clean)
        await run_scenario(faulty)

        # Without faults: every cycle did exactly its work at once, and the quiet cycles sent nothing.
        for figures in clean.cycles:
            assert figures.drain_rounds == 0, figures
            assert figures.summary["failed"] == 0 and figures.summary["deferred"] == 0, figures
        quiet = {f.name: f.summary for f in clean.cycles if f.name in ("no change", "settle")}
        for summary in quiet.values():
            assert sum(v for k, v in summary.items() if k != "unchanged") == 0, quiet
        done = {f.name: f.summary for f in clean.cycles}
        assert done["joiners"]["created"] == 100
        assert done["movers"]["updated"] == 42
        assert done["leavers"]["disabled"] == 10
        assert done["rehires"]["enabled"] == 4

        clean_users, faulty_users = server_users(clean_server), server_users(faulty_server)
        clean_state, faulty_state = comparable(clean_users), comparable(faulty_users)
        # The clean run is what the HR export says.
        assert {name: user["active"] for name, user in clean_state.items()} == expected_active()
        # No duplicates on either server.
        for users in (clean_users, faulty_users):
            counts = Counter(user["userName"] for user in users)
            assert [name for name, n in counts.items() if n > 1] == []
        diffs = differences(clean_state, faulty_state)

        operations = faulty.operations()
        attempts = faulty.attempts()
        statuses = Counter(op["status"] for op in operations)
        failed = [op for op in operations if op["status"] == "failed"]
        calls_failed = [a for a in attempts if a["error"] is not None or a["http_status"] is None]
        queue_retries = sum(op["attempts"] - 1 for op in operations if op["attempts"] > 1)
        stats = proxy.stats
        print_figures(clean, faulty, operations, attempts, calls_failed, queue_retries, stats, diffs, statuses)

        # Lost answers and 412 races are the faults that test idempotence: make sure they happened.
        assert stats.injected >= 30 and stats.faults["lost_response"] >= 1 and stats.faults["412"] >= 1, stats
        assert stats.upstream_errors == 0
        assert failed == [], [(op["identity_key"], op["kind"], op["last_error"]) for op in failed]
        assert statuses.keys() <= {"succeeded", "superseded"}, statuses
        assert diffs == []
        # Every fault injected into an operation's request is in that operation's record as a failed call
        # (capability and resource type discovery is not an operation's; a real 412 after a lost PATCH adds to the count).
        discovery = sum(1 for e in proxy.events if e.fault and e.path.endswith(("/ServiceProviderConfig", "/ResourceTypes")))
        assert len(calls_failed) >= stats.injected - discovery
    finally:
        clean.close()
        faulty.close()


def print_figures(
    clean: World,
    faulty: World,
    operations: list[dict[str, Any]],
    attempts: list[dict[str, Any]],
    calls_failed: list[dict[str, Any]],
    queue_retries: int,
    stats: Any,
    diffs: list[str],
    statuses: Counter[str],
) -> None:
    clean_ops = clean.operations()
    # A resend: the same method and URL again within one round of one operation (backoff retries, 412 rounds).
    sends = Counter((a["operation_id"], a["number"], a["method"], a["url"]) for a in attempts)
    resends = sum(n - 1 for n in sends.values())
    lines = [
        "",
        f"== lifecycle through FaultProxy(rate={RATE}, seed={SEED}, kinds=all incl. lost_response) ==",
        f"operations: {len(operations)} through faults ({dict(Counter(op['kind'] for op in operations))}), "
        f"{len(clean_ops)} without",
        f"operation statuses (faults): {dict(statuses)}",
        f"requests the proxy received: {stats.requests}; forwarded upstream: {stats.forwarded}",
        f"faults injected: {stats.injected} {dict(sorted(stats.faults.items()))}; race writes (412 bumps): "
        f"{stats.race_writes}",
        f"HTTP calls recorded in the queue: {len(attempts)} with faults, {len(clean.attempts())} without; "
        f"failed calls (retried or given up): {len(calls_failed)} "
        f"{dict(Counter(str(a['http_status']) for a in calls_failed))}",
        f"client resends of a request within an operation's round: {resends}",
        f"queue-level retries (operations sent again in a later round): {queue_retries}; "
        f"operations that waited in retry_wait: {sum(op['attempts'] > 1 for op in operations)}",
    ]
    for op in operations:
        if op["attempts"] > 1:
            first = next(a for a in attempts if a["operation_id"] == op["id"] and a["number"] == 1 and a["error"])
            calls = [f"{a['method']} {a['http_status']}" for a in attempts if a["operation_id"] == op["id"]]
            lines.append(
                f"  waited in retry_wait: {op['identity_key']} {op['kind']}, calls over {op['attempts']} rounds: "
                f"{', '.join(calls)}; first error: {first['error']}"
            )
    for figures in faulty.cycles:
        lines.append(
            f"  cycle {figures.name!r}: {figures.summary}; drain rounds {figures.drain_rounds} {dict(figures.drained)}"
        )
    lines.append(f"final differences between the two servers: {len(diffs)}")
    lines += [f"  {d}" for d in diffs]
    text = "\n".join(lines)
    print(text)
    (faulty.root.parent / "figures.txt").write_text(text, encoding="utf-8")


async def test_a_412_race_on_patch_ends_with_the_update_applied(
    tmp_path: Path,
    faulty_server: ScimServer,
    fault_proxy: Any,  # noqa: F811 - the fixture imported above
    monkeypatch: pytest.MonkeyPatch,
    quiet_logs: list[dict[str, Any]],
) -> None:
    """Someone else changes the account between our read and our PATCH: refetch its version, PATCH again."""
    proxy: FaultProxy = fault_proxy(
        faulty_server.base_url, rate=1.0, seed=1, kinds={"412": 1}, max_faults=1,
        applies_to=lambda method, _path: method == "PATCH",
    )  # fmt: skip
    world = World(tmp_path / "race", proxy.base_url, faulty_server.token, monkeypatch)
    try:
        rows = [person("E01", "Ada", "Lovelace", title="CEO"), person("E02", "Grace", "Hopper", manager_id="E01")]
        created = await world.cycle("joiners", rows)
        assert created.summary["created"] == 2 and proxy.stats.injected == 0

        moved = await world.cycle("movers", change(rows, "E02", title="Rear Admiral"))

        assert moved.summary["updated"] == 1 and moved.summary["failed"] == 0 and moved.drain_rounds == 0
        assert proxy.stats.faults == Counter({"412": 1})
        assert proxy.stats.race_writes == 2  # the version really moved upstream
        [grace] = [u for u in server_users(faulty_server) if u["userName"] == "grace.hopper@example.com"]
        assert grace["title"] == "Rear Admiral"
        assert "nickName" not in grace  # the race's own change was undone
        update_op = world.operations()[-1]
        assert (update_op["kind"], update_op["status"]) == ("update", "succeeded")
        calls = [(a["method"], a["http_status"]) for a in world.attempts() if a["operation_id"] == update_op["id"]]
        # RFC 7644 §3.5.2: a PATCH succeeds with 200 and the resource, or 204 without it (scim2-server).
        assert calls in ([("PATCH", 412), ("GET", 200), ("PATCH", 200)], [("PATCH", 412), ("GET", 200), ("PATCH", 204)])
        patches = [json.loads(a["request_body"]) for a in world.attempts() if a["operation_id"] == update_op["id"]
                   and a["method"] == "PATCH"]  # fmt: skip
        assert patches[0] == patches[1]  # the same change, sent again on top of the fresh version

        # The link keeps the version the PATCH returned: the next change goes through at once.
        again = await world.cycle("movers again", change(rows, "E02", title="Commodore"))
        assert again.summary["updated"] == 1
        last = world.operations()[-1]
        sent = [(a["method"], a["http_status"]) for a in world.attempts() if a["operation_id"] == last["id"]]
        assert sent in ([("PATCH", 200)], [("PATCH", 204)])
    finally:
        world.close()
