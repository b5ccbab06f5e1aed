"""Three daemons on one real PostgreSQL and one real SCIM server: each operation sent once, none lost.

The daemons are real ``provisioner run`` processes; the target is scim2-server
behind a transparent FaultProxy (no faults), whose event log counts every
request the target received.
"""

from __future__ import annotations

import signal
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from provisioner.demo import DEMO_MAPPING, ScimServer, start_scim_server
from tests.conftest import hr_row, write_csv
from tests.daemons import kill_daemon, start_daemon, wait_for
from tests.faultproxy import FaultProxy
from tests.integration.test_daemon import server_users

USERS = 200
INSTANCES = ("d1", "d2", "d3")


@pytest.fixture
def server() -> Iterator[ScimServer]:
    with start_scim_server() as srv:
        yield srv


@pytest.fixture
def proxy(server: ScimServer) -> Iterator[FaultProxy]:
    with FaultProxy(server.base_url, rate=0.0) as counting:
        yield counting


def write_source(path: Path, numbers: range) -> None:
    # No managers: which instance creates a manager first is a race, and a report sent before its
    # manager exists is updated by a later cycle; that is a second operation, not a resend.
    write_csv(path, [hr_row(f"E{n:05d}", f"First{n}", f"Last{n}", email=f"user{n}@example.com") for n in numbers])


def write_configs(folder: Path, state: str, base_url: str, *, every: str, lease: str) -> dict[str, Path]:
    configs = {}
    for name in INSTANCES:
        path = folder / f"{name}.yaml"
        path.write_text(
            f"""state: {state}
sources:
  hr: {{type: csv, path: hr.csv, key: employee_id, schedule: {{every: {every}}}}}
targets:
  app:
    base_url: {base_url}
    allow_insecure_http: true
    auth: {{type: bearer, token: "${{APP_TOKEN}}"}}
    source: hr
    mapping: {DEMO_MAPPING}
    max_concurrency: 2
daemon: {{listen: null, shutdown_grace: 20, retry_interval: 1, instance: {name}, lease: {lease}}}
"""
        )
        configs[name] = path
    return configs


def start(config: Path, token: str) -> subprocess.Popen[bytes]:
    return start_daemon(config, {"APP_TOKEN": token}, log=config.with_suffix(".log"))


def query(url: str, sql: str) -> list[tuple[object, ...]]:
    with psycopg.connect(url.replace("postgresql://", "postgresql://", 1)) as conn:
        return list(conn.execute(sql).fetchall())


def statuses(url: str) -> dict[str, int]:
    try:
        return {str(s): int(str(c)) for s, c in query(url, "SELECT status, count(*) FROM operation GROUP BY status")}
    except psycopg.errors.UndefinedTable:
        return {}


def created(url: str) -> int:
    """Create operations that succeeded."""
    try:
        rows = query(url, "SELECT count(*) FROM operation WHERE kind = 'create' AND status = 'succeeded'")
    except psycopg.errors.UndefinedTable:
        return 0
    return int(str(rows[0][0]))


def writes(proxy: FaultProxy) -> Counter[str]:
    """Requests that change the target, by method, as the target received them."""
    return Counter(e.method for e in proxy.events if e.method in ("POST", "PUT", "PATCH", "DELETE"))


def stop_all(daemons: dict[str, subprocess.Popen[bytes]]) -> None:
    for daemon in daemons.values():
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
    for daemon in daemons.values():
        try:
            # -SIGTERM: stopped while still starting, before its signal handlers were set.
            assert daemon.wait(timeout=30) in (0, -signal.SIGKILL, -signal.SIGTERM)
        finally:
            daemon.kill()


def assert_target_has(server: ScimServer, numbers: range) -> None:
    names = [str(u["userName"]) for u in server_users(server)]
    assert len(names) == len(set(names)), "duplicate accounts in the target"
    assert sorted(names) == sorted(f"user{n}@example.com" for n in numbers)


def test_three_daemons_send_each_operation_exactly_once(
    tmp_path: Path, pg_url: str, server: ScimServer, proxy: FaultProxy
) -> None:
    write_source(tmp_path / "hr.csv", range(USERS))
    # A lease no busy machine outlasts between renewals: this test is about sharing, not taking back.
    configs = write_configs(tmp_path, pg_url, proxy.base_url, every="1h", lease="60s")
    daemons = {name: start(path, server.token) for name, path in configs.items()}
    try:
        wait_for("every account created", lambda: created(pg_url) >= USERS and not statuses(pg_url).get("running"),
                 90, state=lambda: table(pg_url))
    finally:
        stop_all(daemons)

    assert_target_has(server, range(USERS))
    kinds = query(pg_url, "SELECT kind, reason, claimed_by, count(*) FROM operation GROUP BY kind, reason, claimed_by")
    assert statuses(pg_url) == {"succeeded": USERS}, (kinds, writes(proxy))
    # Each create was POSTed once, and nothing else was written.
    assert writes(proxy) == Counter({"POST": USERS}), writes(proxy)
    sent_by = dict(query(pg_url, "SELECT claimed_by, count(*) FROM operation GROUP BY claimed_by"))
    assert set(sent_by) <= set(INSTANCES)
    for name, path in configs.items():
        log = path.with_suffix(".log").read_bytes()
        assert f'"instance": "{name}"'.encode() in log, "each log line names its instance"
    print(f"\nrequests received by the target: {dict(Counter(e.method for e in proxy.events))}; "
          f"operations sent by instance: {sent_by}")  # fmt: skip


def table(url: str) -> list[tuple[object, ...]]:
    return query(url, "SELECT kind, status, claimed_by, count(*) FROM operation GROUP BY kind, status, claimed_by")


def test_kill_9_mid_cycle_the_others_finish_its_rows_after_the_lease_and_take_over_planning(
    tmp_path: Path, pg_url: str, server: ScimServer, proxy: FaultProxy
) -> None:
    write_source(tmp_path / "hr.csv", range(USERS))
    # A short lease: the survivors take the victim's rows back quickly.
    configs = write_configs(tmp_path, pg_url, proxy.base_url, every="2s", lease="3s")
    daemons = {name: start(path, server.token) for name, path in configs.items()}
    try:

        def planner() -> str | None:
            for name, path in configs.items():
                log = path.with_suffix(".log")
                if log.exists() and b"planning this target" in log.read_bytes():
                    return name
            return None

        def holders() -> dict[str, int]:
            rows = query(pg_url, "SELECT claimed_by, count(*) FROM operation WHERE status = 'running' GROUP BY 1")
            return {str(name): int(str(count)) for name, count in rows}

        wait_for("a planner, rows held and 20 accounts", lambda: planner() and holders() and created(pg_url) >= 20,
                 90, state=lambda: table(pg_url))
        held, planning = holders(), planner()
        # Mid-cycle: an instance holding running rows, the planner when it holds some.
        victim = planning if held.get(str(planning)) else max(held, key=held.__getitem__)
        assert victim is not None
        kill_daemon(daemons[victim])
        stranded = query(pg_url, f"SELECT count(*) FROM operation WHERE status = 'running' AND claimed_by = '{victim}'")
        assert stranded[0][0], "the kill came too late to test anything"
        if planning != victim:
            # Planning must be taken over too: the planner goes as well, whatever it was doing.
            kill_daemon(daemons[str(planning)])

        # The survivors take the victims' rows back once their lease has run out, and finish them.
        wait_for("every account created", lambda: created(pg_url) >= USERS and not statuses(pg_url).get("running"),
                 90, state=lambda: table(pg_url))
        # One of them plans now: people who join after the kill are created too.
        write_source(tmp_path / "hr.csv", range(USERS + 20))
        wait_for("the joiners created", lambda: created(pg_url) >= USERS + 20 and not statuses(pg_url).get("running"),
                 90, state=lambda: table(pg_url))  # fmt: skip
    finally:
        stop_all(daemons)

    assert_target_has(server, range(USERS + 20))
    assert statuses(pg_url) == {"succeeded": USERS + 20}, f"0 lost operations {table(pg_url)} {writes(proxy)}"
    posts = writes(proxy)["POST"]
    # A create in flight when a process died may have reached the target: its retry finds the
    # account (match first on retries) and adopts it instead of POSTing again.
    assert USERS + 20 <= posts <= USERS + 20 + 4, writes(proxy)
    print(f"\nkilled {victim} holding {stranded[0][0]} running operations (planner: {planning}); "
          f"requests received by the target: {dict(Counter(e.method for e in proxy.events))}")  # fmt: skip
