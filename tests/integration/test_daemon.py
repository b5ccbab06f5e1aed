"""The daemon as an operator runs it: a real process, a real SCIM server, signals and kill -9."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests.conftest import hr_row, write_csv
from tests.daemons import kill_daemon, start_daemon, stop_daemon, wait_for
from provisioner.demo import DEMO_MAPPING, ScimServer, free_port, start_scim_server

USERS = 300


@pytest.fixture
def server() -> Iterator[ScimServer]:
    with start_scim_server() as srv:
        yield srv


def write_source(path: Path, count: int) -> None:
    """``count`` people in seven departments, every tenth one the manager of the next nine."""
    write_csv(path, [
        hr_row(f"E{n:05d}", f"First{n}", f"Last{n}", email=f"user{n}@example.com", department=f"Dept{n % 7}",
               manager_id=f"E{(n // 10) * 10:05d}" if n % 10 else "")
        for n in range(count)
    ])  # fmt: skip


def write_config(folder: Path, server: ScimServer, grace: int = 20) -> Path:
    path = folder / "config.yaml"
    path.write_text(
        f"""state: sqlite:///state.db
sources:
  hr: {{type: csv, path: hr.csv, key: employee_id, schedule: {{every: 1h}}}}
targets:
  app:
    base_url: {server.base_url}
    allow_insecure_http: true
    auth: {{type: bearer, token: "${{APP_TOKEN}}"}}
    source: hr
    mapping: {DEMO_MAPPING}
    max_concurrency: 2
daemon: {{listen: "127.0.0.1:{free_port()}", shutdown_grace: {grace}, retry_interval: 1}}
"""
    )
    return path


def statuses(folder: Path) -> dict[str, int]:
    database = folder / "state.db"
    if not database.exists():
        return {}
    with sqlite3.connect(database, timeout=30) as conn:
        try:
            return dict(conn.execute("SELECT status, count(*) FROM operation GROUP BY status").fetchall())
        except sqlite3.OperationalError:
            return {}


def server_users(server: ScimServer) -> list[dict[str, object]]:
    headers = {"Authorization": f"Bearer {server.token}"}
    users: list[dict[str, object]] = []
    with httpx.Client(base_url=server.base_url + "/", headers=headers) as http:
        start = 1
        while True:
            page = http.get("Users", params={"startIndex": start, "count": 200}).json()
            users += page.get("Resources", [])
            start += len(page.get("Resources", []))
            if not page.get("Resources") or start > page["totalResults"]:
                return users


def assert_target_complete(server: ScimServer) -> None:
    users = server_users(server)
    names = [u["userName"] for u in users]
    assert len(names) == len(set(names)), "duplicate accounts in the target"
    assert sorted(names) == sorted(f"user{n}@example.com" for n in range(USERS))
    enterprise = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
    by_name = {u["userName"]: u for u in users}
    # Every report points at its manager's account, whatever the crash interrupted.
    for n in range(USERS):
        if n % 10:
            manager = by_name[f"user{(n // 10) * 10}@example.com"]
            assert by_name[f"user{n}@example.com"][enterprise]["manager"]["value"] == manager["id"]


def finish_with_a_new_daemon(folder: Path, config: Path, server: ScimServer) -> None:
    daemon = start_daemon(config, {"APP_TOKEN": server.token})
    try:
        wait_for("every operation done",
                 lambda: statuses(folder).get("succeeded", 0) >= USERS and not statuses(folder).get("running"))
        # The second cycle of the restarted daemon must find nothing left to do.
    finally:
        assert stop_daemon(daemon) == 0


def test_kill_9_mid_cycle_loses_nothing_and_duplicates_nothing(tmp_path: Path, server: ScimServer) -> None:
    write_source(tmp_path / "hr.csv", USERS)
    config = write_config(tmp_path, server)
    daemon = start_daemon(config, {"APP_TOKEN": server.token})
    wait_for("40 operations done", lambda: statuses(tmp_path).get("succeeded", 0) >= 40)
    kill_daemon(daemon)
    interrupted = statuses(tmp_path)
    assert interrupted.get("succeeded", 0) < USERS, f"the kill came too late to test anything: {interrupted}"
    # The killed daemon's cycle runs no more, and status does not say it does, nor that all is well.
    status = subprocess.run([sys.executable, "-m", "provisioner", "status", "--config", str(config)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert status.returncode == 4, status.stdout + status.stderr
    assert "app: waiting" in status.stdout and "(abandoned)" in status.stdout, status.stdout
    assert "last cycle abandoned: its process ended" in status.stdout, status.stdout

    finish_with_a_new_daemon(tmp_path, config, server)

    assert_target_complete(server)
    final = statuses(tmp_path)
    assert set(final) == {"succeeded"}, final


def test_sigterm_finishes_in_flight_requests_and_exits_0(tmp_path: Path, server: ScimServer) -> None:
    write_source(tmp_path / "hr.csv", USERS)
    config = write_config(tmp_path, server)
    daemon = start_daemon(config, {"APP_TOKEN": server.token})
    wait_for("40 operations done", lambda: statuses(tmp_path).get("succeeded", 0) >= 40)

    assert stop_daemon(daemon) == 0
    stopped = statuses(tmp_path)
    assert "running" not in stopped, stopped
    assert stopped.get("succeeded", 0) < USERS and stopped.get("pending", 0) > 0, stopped

    finish_with_a_new_daemon(tmp_path, config, server)
    assert_target_complete(server)


def test_a_second_daemon_on_the_same_state_file_is_refused_with_a_clear_message(
    tmp_path: Path, server: ScimServer
) -> None:
    write_source(tmp_path / "hr.csv", 5)
    config = write_config(tmp_path, server)
    first = start_daemon(config, {"APP_TOKEN": server.token})
    try:
        wait_for("the first cycle", lambda: statuses(tmp_path).get("succeeded", 0) >= 5)
        env = {**os.environ, "APP_TOKEN": server.token}
        command = [sys.executable, "-m", "provisioner", "run", "--config", str(config)]
        second = subprocess.run(command, env=env, capture_output=True, timeout=30)
        err = second.stderr
        assert second.returncode == 3
        assert b"another provisioner process" in err and str(first.pid).encode() in err
        assert b"Traceback" not in err
    finally:
        assert stop_daemon(first) == 0


class _HangingTarget(BaseHTTPRequestHandler):
    """A SCIM target that describes itself at once and then never answers a write."""

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        body = b'{"patch": {"supported": true}}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802 - the http.server API
        time.sleep(60)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        return


def serve_hanging(handler: type[_HangingTarget]) -> tuple[ThreadingHTTPServer, ScimServer]:
    """Serve ``handler`` on a thread; the caller shuts the server down. Returns it and the target to configure."""
    hanging = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    hanging.daemon_threads = True
    threading.Thread(target=hanging.serve_forever, daemon=True).start()
    target = ScimServer(hanging.server_address[1], "token-for-the-hanging-target", process=None)  # type: ignore[arg-type]
    return hanging, target


def test_a_second_signal_exits_at_once_while_requests_hang(tmp_path: Path) -> None:
    hanging, target = serve_hanging(_HangingTarget)
    write_source(tmp_path / "hr.csv", 20)
    config = write_config(tmp_path, target)
    daemon = start_daemon(config, {"APP_TOKEN": target.token})
    try:
        wait_for("a request in flight", lambda: statuses(tmp_path).get("running", 0) > 0)
        daemon.send_signal(signal.SIGTERM)
        wait_for("the daemon stopping", lambda: b"stopping" in (tmp_path / "daemon.log").read_bytes())

        daemon.send_signal(signal.SIGTERM)

        assert daemon.wait(timeout=5) == 130
        assert sum(statuses(tmp_path).values()) == 20, "every operation is still in the queue"
    finally:
        daemon.kill()
        hanging.shutdown()


class _CountedHangingTarget(_HangingTarget):
    """A hanging target that says when a write has reached it."""

    written = threading.Event()

    def do_POST(self) -> None:  # noqa: N802 - the http.server API
        self.written.set()
        super().do_POST()


def test_sigterm_against_a_hung_target_waits_the_grace_and_records_the_cycle_as_interrupted(tmp_path: Path) -> None:
    """An operator's restart is neither a safety stop nor an unexplained error, and the grace is honoured."""
    hanging, target = serve_hanging(_CountedHangingTarget)
    write_source(tmp_path / "hr.csv", 20)
    config = write_config(tmp_path, target, grace=2)
    daemon = start_daemon(config, {"APP_TOKEN": target.token})
    try:
        wait_for("a request in flight", _CountedHangingTarget.written.is_set)

        assert stop_daemon(daemon) == 0

        events = [json.loads(line) for line in (tmp_path / "daemon.log").read_text().splitlines() if line.startswith("{")]
        [stopping] = [e for e in events if e["event"].startswith("stopping")]
        assert stopping["in_flight"] == 1 and stopping["claimed_operations"] > 0, stopping
        assert stopping["event"].endswith("waiting up to 2s for their requests"), stopping
        # The hung requests were given the grace, then cut: said, not silent.
        assert any(e["event"].startswith("grace period over") for e in events), [e["event"] for e in events]
        assert any(e["event"] == "cycle interrupted" for e in events), [e["event"] for e in events]
        with sqlite3.connect(tmp_path / "state.db") as conn:
            [(run_status, note)] = conn.execute("SELECT status, error FROM run").fetchall()
        assert run_status == "interrupted" and note
        assert sum(statuses(tmp_path).values()) == 20, "every operation is still in the queue"

        status = subprocess.run([sys.executable, "-m", "provisioner", "status", "--config", str(config)],
                                cwd=tmp_path, capture_output=True, text=True, timeout=60)  # fmt: skip
        assert status.returncode == 4, status.stdout + status.stderr
        assert "app: waiting" in status.stdout and "last cycle interrupted" in status.stdout, status.stdout
        assert "refused" not in status.stdout and "error" not in status.stdout, status.stdout
    finally:
        daemon.kill()
        hanging.shutdown()
