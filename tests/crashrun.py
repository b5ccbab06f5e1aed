"""The crash run (issue 14, "Done means"): a real daemon killed with SIGKILL while a faulty target answers.

    figures = crash_run(Path(tmp), users=150, seed=1)
    figures.duplicates, figures.unexplained, figures.open_rows   # all must be 0 / empty

What happens, in order:

1. scim2-server on 127.0.0.1 behind :class:`tests.faultproxy.FaultProxy`
   injecting every fault kind (``lost_response`` included) into ``rate`` of the
   requests; a few users are *broken*: the proxy answers 400 to every write that
   carries their userName, so their creates fail for good (a bad record).
2. An HR export of ``users`` people with managers (every tenth manages the next
   nine) in seven departments; groups ``dept-…`` and ``all-staff``.
3. ``provisioner run`` in its own process, killed with ``kill -9`` ``kills``
   times at random moments (after a random share of the operations succeeded,
   plus a random delay), restarted each time. Before the last start the export
   changes: movers (department, title) and leavers (terminated).
4. Then cycles in this process until nothing is due: before each, the waiting
   rows (and a quarantined target's next probe) are made due at once, as time
   passing would.
5. The target is read directly (not through the proxy) and compared with the
   export: every difference must be explained by a ``failed`` row of that
   identity (or of that group); no userName or group displayName twice; no row
   left pending, running, waiting or held.
"""

from __future__ import annotations

import asyncio
import os
import random
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from provisioner.config import load_config
from provisioner.demo import DEMO_MAPPING, ScimServer, start_scim_server
from provisioner.queue import recover_orphans
from provisioner.store import open_store
from provisioner.sync import load_target_mapping, sync_target
from tests.conftest import hr_row, write_csv
from tests.daemons import kill_daemon, start_daemon
from tests.faultproxy import ALL_KINDS, FaultProxy

ENTERPRISE = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
GROUPS = """groups:
  - name: "dept-{{ department | lower }}"
  - name: all-staff
"""
OPEN = ("pending", "running", "retry_wait", "held")
# Cycles after the kills before the run gives up on the queue draining.
MAX_FINAL_CYCLES = 40


@dataclass
class Figures:
    """What a crash run did and what it left."""

    users: int
    kills: int = 0
    kills_mid_work: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    requests: int = 0
    operations: Counter[str] = field(default_factory=Counter)  # rows by status
    calls: int = 0  # HTTP calls recorded on operations
    final_cycles: int = 0
    duplicates: list[str] = field(default_factory=list)
    differences: list[tuple[str, str]] = field(default_factory=list)
    unexplained: list[tuple[str, str]] = field(default_factory=list)
    failed_rows: list[tuple[str, str, str]] = field(default_factory=list)  # key, kind, error
    open_rows: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def lines(self) -> list[str]:
        """The figures as a person reads them."""
        faults = ", ".join(f"{kind} {count}" for kind, count in self.faults.most_common())
        return [
            f"users: {self.users}",
            f"faults injected: {sum(self.faults.values())} of {self.requests} requests ({faults})",
            f"kill -9: {self.kills} ({self.kills_mid_work} with operations in flight or queued)",
            f"operations: {sum(self.operations.values())} rows ({dict(self.operations)}), {self.calls} HTTP calls recorded",
            f"cycles after the kills until nothing was due: {self.final_cycles}",
            f"duplicates: {len(self.duplicates)}",
            f"differences between target and source: {len(self.differences)}, unexplained: {len(self.unexplained)}",
            f"failed rows: {len(self.failed_rows)}",
            f"left open: {self.open_rows or 0}",
            f"wall time: {self.seconds:.1f} s",
        ]


def people(users: int, *, moved: bool, rng: random.Random) -> list[dict[str, str]]:
    """The HR export: everyone active first; ``moved``: 10 % movers and 5 % leavers (never a manager)."""
    rows = []
    changes = random.Random(rng.random())
    for n in range(users):
        row = hr_row(
            f"E{n:05d}", f"First{n}", f"Last{n}", email=f"user{n}@example.com", department=f"Dept{n % 7}",
            manager_id=f"E{(n // 10) * 10:05d}" if n % 10 else "",
        )  # fmt: skip
        if moved and n % 10:
            draw = changes.random()
            if draw < 0.10:
                row.update(department=f"Dept{(n + 3) % 7}", title="Senior Engineer")
            elif draw < 0.15:
                row["status"] = "terminated"
        rows.append(row)
    return rows


def write_workspace(folder: Path, proxy: FaultProxy) -> Path:
    (folder / "groups.yaml").write_text(GROUPS)
    config = folder / "config.yaml"
    config.write_text(
        f"""state: sqlite:///state.db
sources:
  hr: {{type: csv, path: hr.csv, key: employee_id, schedule: {{every: 1h}}}}
targets:
  app:
    base_url: {proxy.base_url}
    allow_insecure_http: true
    auth: {{type: bearer, token: "${{CRASH_TOKEN}}"}}
    source: hr
    mapping: {DEMO_MAPPING}
    groups: groups.yaml
    max_concurrency: 4
    timeout: 1
    max_deprovision: 100000
    max_deprovision_share: 1.0
    retry: {{max_attempts: 3, backoff_base: 0.01, backoff_cap: 0.05, max_retry_after: 1}}
daemon: {{listen: null, shutdown_grace: 5, retry_interval: 1}}
"""
    )
    return config


def statuses(folder: Path) -> dict[str, int]:
    database = folder / "state.db"
    if not database.exists():
        return {}
    try:
        with sqlite3.connect(database, timeout=30) as conn:
            return dict(conn.execute("SELECT status, count(*) FROM operation GROUP BY status").fetchall())
    except sqlite3.OperationalError:
        return {}


def kill_at_random(folder: Path, config: Path, token: str, rng: random.Random, share: float, figures: Figures) -> None:
    """Start the daemon, let a random share of ``share`` × users succeed (or 30 s pass), then kill -9 it."""
    before = statuses(folder).get("succeeded", 0)
    goal = before + max(1, int(figures.users * share * rng.uniform(0.3, 1.0)))
    daemon = start_daemon(config, {"CRASH_TOKEN": token})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and daemon.poll() is None:
        if statuses(folder).get("succeeded", 0) >= goal:
            break
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 0.2))
    in_flight = {k: v for k, v in statuses(folder).items() if k in ("pending", "running", "retry_wait")}
    kill_daemon(daemon)
    figures.kills += 1
    figures.kills_mid_work += bool(in_flight)


def make_due(folder: Path) -> None:
    """What time passing does: waiting rows fall due, a quarantined target's next probe too."""
    with sqlite3.connect(folder / "state.db", timeout=30) as conn:
        conn.execute("UPDATE operation SET next_attempt_at = '2000-01-01 00:00:00.000000' WHERE status = 'retry_wait'")
        conn.execute("UPDATE target_state SET next_probe_at = '2000-01-01 00:00:00.000000' WHERE quarantined")


async def cycle(config_path: Path) -> int:
    """One cycle as ``provisioner sync`` runs it (rows a killed process left running are taken back first).

    Returns how many operations it sent.
    """
    config = load_config(config_path)
    mapping = load_target_mapping(config, "app")
    engine = open_store(config.state)
    recover_orphans(engine)
    try:
        report = await sync_target(engine, config, "app", mapping)
    finally:
        engine.dispose()
    return sum(report.statuses.values())


def read_target(server: ScimServer, endpoint: str) -> list[dict[str, Any]]:
    headers = {"Authorization": f"Bearer {server.token}"}
    found: list[dict[str, Any]] = []
    with httpx.Client(base_url=server.base_url + "/", headers=headers, timeout=30) as http:
        start = 1
        while True:
            page = http.get(endpoint, params={"startIndex": start, "count": 500}).json()
            found += page.get("Resources") or []
            start += len(page.get("Resources") or [])
            if not page.get("Resources") or start > page["totalResults"]:
                return found


def compare(server: ScimServer, rows: list[dict[str, str]], figures: Figures) -> list[tuple[str, str]]:
    """Differences between the target and the export, as (identity or group key, what differs)."""
    users = read_target(server, "Users")
    groups = read_target(server, "Groups")
    names = Counter(u["userName"] for u in users)
    figures.duplicates = [n for n, c in names.items() if c > 1]
    figures.duplicates += [f"group {n}" for n, c in Counter(g["displayName"] for g in groups).items() if c > 1]
    by_name = {u["userName"]: u for u in users}
    by_key = {row["employee_id"]: row for row in rows}
    diffs: list[tuple[str, str]] = []
    known = set()
    members: dict[str, set[str]] = {}
    for row in rows:
        key, name = row["employee_id"], row["email"]
        known.add(name)
        active = row["status"] != "terminated"
        account = by_name.get(name)
        if account is None:
            if active:
                diffs.append((key, "no account"))
            continue
        want = {
            "active": active,
            "displayName": f"{row['first_name']} {row['last_name']}",
            "title": row["title"],
            "department": row["department"],
        }
        have = {
            "active": account.get("active", True),
            "displayName": account.get("displayName"),
            "title": account.get("title"),
            "department": (account.get(ENTERPRISE) or {}).get("department"),
        }
        diffs += [(key, f"{attr}: {have[attr]!r} instead of {want[attr]!r}") for attr in want if have[attr] != want[attr]]
        manager = by_name.get(by_key[row["manager_id"]]["email"]) if row["manager_id"] else None
        have_manager = ((account.get(ENTERPRISE) or {}).get("manager") or {}).get("value")
        if manager is not None and have_manager != manager["id"]:
            diffs.append((key, f"manager: {have_manager!r} instead of {manager['id']!r}"))
        if active:
            for group in (f"dept-{row['department'].lower()}", "all-staff"):
                members.setdefault(group, set()).add(account["id"])
    diffs += [(u["userName"], "an account nobody asked for") for u in users if u["userName"] not in known]
    ids = {u["id"]: u["userName"] for u in users}
    key_of = {row["email"]: row["employee_id"] for row in rows}
    for group in groups:
        have = {str(m["value"]) for m in group.get("members") or []}
        want = members.pop(group["displayName"], set())
        diffs += [(key_of.get(ids.get(m, ""), group["displayName"]), f"not in {group['displayName']}") for m in want - have]
        diffs += [(key_of.get(ids.get(m, ""), group["displayName"]), f"in {group['displayName']} by mistake") for m in have - want]
    diffs += [(name, "group missing") for name in members]
    return diffs


def crash_run(
    folder: Path, *, users: int = 150, rate: float = 0.2, kills: int = 3, broken: int = 3, seed: int = 1
) -> Figures:
    """Run it all (see the module docstring) in ``folder``; return the figures. Asserts nothing."""
    started = time.monotonic()
    rng = random.Random(seed)
    figures = Figures(users)
    # Broken users are never managers (n % 10 == 0): their reports would differ only because of them.
    broken_names = {f"user{n}@example.com".encode() for n in rng.sample([n for n in range(users) if n % 10], broken)}

    def refuse_broken(method: str, path: str, body: bytes | None) -> int | None:
        return 400 if method in ("POST", "PUT", "PATCH") and body and any(b in body for b in broken_names) else None

    server = start_scim_server()
    proxy = FaultProxy(server.base_url, rate=rate, seed=seed, kinds=ALL_KINDS, delay=1.5, answer=refuse_broken).start()
    previous = os.environ.get("CRASH_TOKEN")
    os.environ["CRASH_TOKEN"] = server.token  # the cycles run in this process read it from here
    try:
        config = write_workspace(folder, proxy)
        write_csv(folder / "hr.csv", people(users, moved=False, rng=rng))
        for number in range(kills):
            if number == kills - 1:
                final_rows = people(users, moved=True, rng=random.Random(seed))
                write_csv(folder / "hr.csv", final_rows)
            kill_at_random(folder, config, server.token, rng, 0.4, figures)
        if kills == 0:
            final_rows = people(users, moved=True, rng=random.Random(seed))
            write_csv(folder / "hr.csv", final_rows)
        for _ in range(MAX_FINAL_CYCLES):
            make_due(folder)
            sent = asyncio.run(cycle(config))
            figures.final_cycles += 1
            left = {k: v for k, v in statuses(folder).items() if k in OPEN}
            if not left and not sent:
                break
        proxy_stats = proxy.stats
        figures.faults = proxy_stats.faults
        figures.requests = proxy_stats.requests
        with sqlite3.connect(folder / "state.db") as conn:
            figures.operations = Counter(dict(conn.execute("SELECT status, count(*) FROM operation GROUP BY status")))
            figures.calls = int(conn.execute("SELECT count(*) FROM attempt").fetchone()[0])
            figures.failed_rows = [
                (key, kind, error or "")
                for key, kind, error in conn.execute(
                    "SELECT identity_key, kind, last_error FROM operation WHERE status = 'failed'"
                )
            ]
        figures.open_rows = {k: v for k, v in figures.operations.items() if k in OPEN}
        figures.differences = compare(server, final_rows, figures)
        failed_keys = {key for key, _, _ in figures.failed_rows}
        figures.unexplained = [d for d in figures.differences if d[0] not in failed_keys]
    finally:
        if previous is None:
            os.environ.pop("CRASH_TOKEN", None)
        else:
            os.environ["CRASH_TOKEN"] = previous
        proxy.stop()
        server.stop()
    figures.seconds = time.monotonic() - started
    return figures
