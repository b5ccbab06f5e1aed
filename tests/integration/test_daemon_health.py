"""The daemon's /healthz and /metrics: honest about its targets, and nothing a client does can stop it.

The daemon runs as a real process against scim2-server (behind a fault-injecting
proxy in one test); clients connect to /metrics and /healthz and drop their
connections in every way a socket can be dropped.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import sqlite3
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select, update

from provisioner import metrics
from provisioner.config import load_config
from provisioner.daemon import Daemon
from provisioner.demo import DEMO_MAPPING, ScimServer, free_port, start_scim_server
from provisioner.quarantine import TABLE, set_paused
from provisioner.store import Run, open_store
from tests.conftest import TOKEN_VARIABLE, Workspace, hr_row, write_csv
from tests.daemons import start_daemon, stop_daemon, wait_for
from tests.faultproxy import FaultProxy

USERS = 40


@pytest.fixture
def server() -> Iterator[ScimServer]:
    with start_scim_server() as srv:
        yield srv


def write_world(folder: Path, base_url: str, metrics_port: int) -> Path:
    write_csv(folder / "hr.csv", [hr_row(f"E{n:03d}", f"First{n}", f"Last{n}", email=f"user{n}@example.com")
                                  for n in range(USERS)])  # fmt: skip
    config = folder / "config.yaml"
    config.write_text(
        f"""state: sqlite:///state.db
sources:
  hr: {{type: csv, path: hr.csv, key: employee_id, schedule: {{every: 1h}}}}
targets:
  app:
    base_url: {base_url}
    allow_insecure_http: true
    auth: {{type: bearer, token: "${{APP_TOKEN}}"}}
    source: hr
    mapping: {DEMO_MAPPING}
    max_concurrency: 4
    timeout: 5
    retry: {{max_attempts: 8, backoff_base: 0.01, backoff_cap: 0.05, max_retry_after: 1}}
daemon: {{listen: "127.0.0.1:{metrics_port}", shutdown_grace: 20, retry_interval: 1}}
""",
        encoding="utf-8",
    )
    return config


def users_in(server: ScimServer) -> list[str]:
    headers = {"Authorization": f"Bearer {server.token}"}
    body = httpx.get(f"{server.base_url}/Users", params={"count": 1000}, headers=headers, timeout=10).json()
    return [str(u["userName"]) for u in body.get("Resources", [])]


def statuses(folder: Path) -> Counter[str]:
    try:
        with sqlite3.connect(folder / "state.db", timeout=30) as conn:
            return Counter(dict(conn.execute("SELECT status, count(*) FROM operation GROUP BY status").fetchall()))
    except sqlite3.OperationalError:
        return Counter()


def rude_request(port: int, path: str, how: str) -> None:
    """One client that leaves early: how the daemon's HTTP server must never be hurt."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        if how == "reset":  # send the request, then reset the connection before the answer is read
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif how == "close":  # send the request and close politely without reading
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        elif how == "half":  # half a request line
            sock.sendall(f"GET {path} HT".encode())
        elif how == "partial":  # read a few bytes of the answer, then reset
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            sock.recv(16)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # "silent": connect and close without a byte
    finally:
        sock.close()


class RudeClients:
    """A thread of clients that connect to /metrics and /healthz and drop, until stopped."""

    def __init__(self, port: int, seed: int = 3) -> None:
        self.port = port
        self.random = random.Random(seed)
        self.stop = threading.Event()
        self.made: Counter[str] = Counter()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            how = self.random.choice(["reset", "close", "half", "partial", "silent"])
            try:
                rude_request(self.port, self.random.choice(["/metrics", "/healthz"]), how)
                self.made[how] += 1
            except OSError:
                self.made["refused"] += 1
            time.sleep(0.005)

    def __enter__(self) -> RudeClients:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


def test_clients_that_drop_their_connection_never_stop_the_daemon(tmp_path: Path, server: ScimServer) -> None:
    """A raw socket sends GET /metrics and resets before reading: the daemon lives (no SIGPIPE, exit 141)."""
    port = free_port()
    config = write_world(tmp_path, server.base_url, port)
    daemon = start_daemon(config, {"APP_TOKEN": server.token})
    try:
        wait_for("the metrics server", lambda: _answers(port), 90)
        for number in range(300):
            rude_request(port, "/metrics", ["reset", "close", "partial"][number % 3])
        assert daemon.poll() is None, f"the daemon died with exit {daemon.returncode}"
        assert httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).status_code == 200
        wait_for("the first cycle", lambda: statuses(tmp_path)["succeeded"] >= USERS, 90)
    finally:
        code = stop_daemon(daemon, timeout=60)
    assert code == 0
    log = (tmp_path / "daemon.log").read_text()
    assert "Traceback" not in log and "BrokenPipe" not in log


def _answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def test_the_daemon_against_a_faulty_target_while_clients_drop_reaches_the_truth(
    tmp_path: Path, server: ScimServer
) -> None:
    """429, 5xx, resets, truncated bodies and 412s from the target; rude clients on the metrics port.

    Every account arrives exactly once, the daemon never dies, and /healthz is
    consistent at every read: 200 exactly when its status is ok, and its status
    the most urgent of its targets'.
    """
    port = free_port()
    kinds = {"429": 1, "503": 1, "502": 1, "reset": 1, "invalid_json": 1, "412": 1}
    with FaultProxy(server.base_url, rate=0.2, seed=11, kinds=kinds).start() as proxy:
        config = write_world(tmp_path, proxy.base_url, port)
        daemon = start_daemon(config, {"APP_TOKEN": server.token})
        seen: list[tuple[int, str, list[str]]] = []
        try:
            with RudeClients(port) as rude:
                wait_for("the metrics server", lambda: _answers(port), 90)

                def done() -> bool:
                    health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
                    body = health.json()
                    seen.append((health.status_code, body["status"], [t["status"] for t in body["targets"].values()]))
                    assert daemon.poll() is None, f"the daemon died with exit {daemon.returncode}"
                    return len(users_in(server)) == USERS and statuses(tmp_path)["succeeded"] >= USERS

                wait_for("every account created", done, 90)
            assert sum(rude.made.values()) >= 20, rude.made
            assert proxy.stats.injected > 0
            assert daemon.poll() is None
        finally:
            code = stop_daemon(daemon, timeout=60)
    assert code == 0
    names = users_in(server)
    assert sorted(names) == sorted(f"user{n}@example.com" for n in range(USERS))
    for code_, status, targets in seen:
        assert (code_ == 200) is (status == "ok"), (code_, status)
        if status not in ("stopping", "stuck"):
            assert status == min(targets, key=["quarantined", "paused", "refused", "held", "failed", "waiting",
                                               "ok"].index)  # fmt: skip
    log = (tmp_path / "daemon.log").read_text()
    assert "Traceback" not in log


# --- /healthz in process ------------------------------------------------------------------------


@pytest.fixture
def daemon_of(workspace: Workspace, monkeypatch: pytest.MonkeyPatch) -> Iterator[Daemon]:
    monkeypatch.setenv(TOKEN_VARIABLE, workspace.server.token)
    workspace.write_source([hr_row("E1", "Ada", "Lovelace")])
    config = load_config(workspace.config_path)
    engine = open_store(config.state)
    yield Daemon(config, engine)
    engine.dispose()


def _healthz(daemon: Daemon) -> tuple[int, dict[str, object]]:
    http = metrics.serve(f"127.0.0.1:{free_port()}", daemon.health)
    try:
        host, port = http.server_address[:2]
        answer = httpx.get(f"http://{host}:{port}/healthz", timeout=10)
        return answer.status_code, answer.json()
    finally:
        http.shutdown()
        http.server_close()


def test_healthz_is_ok_only_while_every_target_is_ok(daemon_of: Daemon) -> None:
    assert _healthz(daemon_of)[0] == 200

    set_paused(daemon_of.engine, "app", True, "vendor maintenance")
    code, body = _healthz(daemon_of)

    assert (code, body["status"]) == (503, "paused")
    assert body["targets"]["app"]["problems"] == ["paused: vendor maintenance"]  # type: ignore[index]

    set_paused(daemon_of.engine, "app", False)
    with daemon_of.engine.begin() as conn:
        conn.execute(update(TABLE).where(TABLE.c.target == "app").values(quarantined=True,
                                                                         quarantine_reason="12 of 12 calls failed"))  # fmt: skip
    code, body = _healthz(daemon_of)
    assert (code, body["status"]) == (503, "quarantined")


def test_healthz_says_stuck_when_the_event_loop_stops_ticking(daemon_of: Daemon) -> None:
    """A mapping expression that never ends blocks the loop; /healthz answers from its own thread."""
    daemon_of.heartbeat = time.monotonic() - daemon_of.config.daemon.stuck_after - 5

    code, body = _healthz(daemon_of)

    assert (code, body["status"]) == (503, "stuck")
    assert float(body["stuck_for_seconds"]) > daemon_of.config.daemon.stuck_after  # type: ignore[arg-type]
    assert json.dumps(body)  # JSON all the way down


def test_a_cycle_stopped_before_it_finished_is_not_a_successful_one(daemon_of: Daemon) -> None:
    """Stopped after planning, before sending: it returns its report, but its work waits in the queue."""
    success = metrics.LAST_SUCCESS.labels("app")
    before = success._value.get()
    daemon_of.stopping.set()

    asyncio.run(daemon_of.cycle("app"))

    with daemon_of.engine.connect() as conn:
        [(run_status,)] = conn.execute(select(Run.__table__.c.status)).all()
    assert run_status == "interrupted"
    assert daemon_of.last_cycle["app"]["status"] == "incomplete"
    assert success._value.get() == before


# --- a slow source ------------------------------------------------------------------------------


class HeldHrSystem:
    """An HR system's SCIM endpoint that holds every request until released: a source as slow as we like."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        held = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
                held.entered.set()
                held.release.wait(120)
                body = json.dumps({"schemas": ["urn:ietf:params:scim:api:messages:2.0:ListResponse"],
                                   "totalResults": 0, "Resources": []}).encode()  # fmt: skip
                self.send_response(200)
                self.send_header("Content-Type", "application/scim+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - http.server's name
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.http.server_address[1]}/v2"
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)

    def __enter__(self) -> HeldHrSystem:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.http.shutdown()
        self.http.server_close()


def test_a_slow_source_holds_up_neither_other_targets_nor_healthz(tmp_path: Path, server: ScimServer) -> None:
    """While one source's read hangs, the daemon's loop goes on: another target's cycles run, /healthz says so."""
    port = free_port()
    fast = [hr_row(f"F{n}", f"Fast{n}", "Source", email=f"fast{n}@example.com") for n in range(3)]
    with HeldHrSystem() as hr:
        write_csv(tmp_path / "hr.csv", fast[:1])
        config = tmp_path / "config.yaml"
        target = (f"base_url: {server.base_url}, allow_insecure_http: true, mapping: {DEMO_MAPPING}, "
                  'auth: {type: bearer, token: "${APP_TOKEN}"}')  # fmt: skip
        config.write_text(
            f"""state: sqlite:///state.db
sources:
  hr: {{type: csv, path: hr.csv, key: employee_id, schedule: {{every: 1s}}}}
  slow: {{type: scim, base_url: {hr.base_url}, allow_insecure_http: true, auth: {{type: bearer, token: t}},
          key: employeeNumber, timeout: 600, schedule: {{every: 1h}}}}
targets:
  fast: {{source: hr, {target}}}
  held: {{source: slow, {target}}}
daemon: {{listen: "127.0.0.1:{port}", shutdown_grace: 5, retry_interval: 60}}
""",
            encoding="utf-8",
        )
        daemon = start_daemon(config, {"APP_TOKEN": server.token})
        try:
            assert hr.entered.wait(90), "the held source was never read"
            write_csv(tmp_path / "hr.csv", fast)  # two joiners, for a cycle that starts while the read hangs

            seen: list[object] = []

            def fast_cycle_done() -> bool:
                assert daemon.poll() is None, f"the daemon died with exit {daemon.returncode}"
                try:
                    body = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).json()
                except httpx.TransportError:
                    return False
                seen[:] = [body["status"], body["targets"]["fast"]["last_cycle"]]
                last = body["targets"]["fast"]["last_cycle"] or {}
                return last.get("created") == 2 and body["status"] != "stuck"

            wait_for("a cycle of the other target while the source hangs", fast_cycle_done, 60, state=lambda: seen)
            assert not hr.release.is_set()
            assert sorted(users_in(server)) == [f"fast{n}@example.com" for n in range(3)]
        finally:
            hr.release.set()
            code = stop_daemon(daemon, timeout=60)
    assert code == 0
