"""Plant distinctive secrets, run the engine as an operator does, and find none of them anywhere.

Planted: an OAuth 2.0 client secret and the access token the token endpoint
hands out for it; a static bearer token; a webhook's bearer token; a
``password`` attribute (with a line break in it) rendered from the HR file.
The targets are hostile: one echoes the access token and the request body
(password included) in a 400, the other echoes the bearer token in a 401.

Then ``sync``, every read-only command, and the daemon run; every table of
the state database, every log line, every command's output and every alert
body are scanned: none of the secrets, nor any line of them, is there.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import httpx
import pytest

from provisioner.demo import DEMO_MAPPING, ScimServer, free_port, start_scim_server
from tests.conftest import HR_COLUMNS, hr_row, write_csv
from tests.daemons import start_daemon, stop_daemon
from tests.connectors.tokenserver import CLIENT_ID, TokenServer, serve_tokens
from tests.webhook import Receiver

CLIENT_SECRET = "CS-planted-0c4f1e9a77d2"
ACCESS_TOKEN = "AT-planted-5e8b2d0c91f4aa"
BEARER_TOKEN = "BT-planted-3a6d9f0e27c1"
WEBHOOK_TOKEN = "WH-planted-8d2c7b1e40a9"
PASSWORD = "PW-planted-b71e0d\nsecond-line-44c9e2"
SECRETS = (CLIENT_SECRET, ACCESS_TOKEN, BEARER_TOKEN, WEBHOOK_TOKEN, PASSWORD)
ECHO_USER = "echo.me@example.com"


def needles() -> list[str]:
    """Every secret as it could be written down: as is, URL-encoded, each line of it, JSON-escaped."""
    found: set[str] = set()
    for secret in SECRETS:
        found |= {secret, quote(secret, safe=""), quote_plus(secret), json.dumps(secret)[1:-1]}
        found |= set(secret.splitlines())
    return sorted(found)


class Hostile(ThreadingHTTPServer):
    """A SCIM target on 127.0.0.1 that repeats what it is sent in its errors.

    With an ``upstream`` (scim2-server) it forwards every request, except a
    create of ``ECHO_USER``: 400, the caller's token and the request body in
    ``detail``. Without one, it answers every request 401 with the token it saw.
    """

    daemon_threads = True

    def __init__(self, upstream: str | None) -> None:
        self.upstream = upstream
        super().__init__(("127.0.0.1", 0), _HostileHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v2"


class _HostileHandler(BaseHTTPRequestHandler):
    server: Hostile
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        return

    def _handle(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        token = self.headers.get("Authorization", "").partition(" ")[2]
        if self.server.upstream is None:
            return self._reply(401, {"schemas": ["urn:ietf:params:scim:api:messages:2.0:Error"], "status": "401",
                                     "detail": f"token {token} is not valid here"})  # fmt: skip
        if self.command == "POST" and ECHO_USER.encode() in body:
            return self._reply(400, {"schemas": ["urn:ietf:params:scim:api:messages:2.0:Error"], "status": "400",
                                     "scimType": "invalidValue",
                                     "detail": f"caller {token} sent {body.decode()}"})  # fmt: skip
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length", "connection")}
        path = self.path.removeprefix("/v2")
        answer = httpx.request(self.command, f"{self.server.upstream}{path}", headers=headers, content=body, timeout=30)
        self._send(answer.status_code, answer.content, answer.headers.get("Content-Type", "application/scim+json"),
                   answer.headers.get("ETag"))  # fmt: skip

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        self._send(status, json.dumps(body).encode(), "application/scim+json")

    def _send(self, status: int, content: bytes, content_type: str, etag: str | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if etag:
            self.send_header("ETag", etag)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[dict[str, Any]]:
    with serve_tokens(delay=0) as tokens, start_scim_server(token=ACCESS_TOKEN) as scim:
        # Every token request is answered with the planted access token.
        tokens.canned = [(200, {"access_token": ACCESS_TOKEN, "token_type": "Bearer", "expires_in": 3600}, {})] * 100
        oauth_target, bearer_target, receiver = Hostile(scim.base_url), Hostile(None), Receiver()
        try:
            yield _write_world(tmp_path, tokens, scim, oauth_target, bearer_target, receiver)
        finally:
            for server in (oauth_target, bearer_target, receiver.server):
                server.shutdown()


def _write_world(root: Path, tokens: TokenServer, scim: ScimServer, oauth_target: Hostile, bearer_target: Hostile,
                 receiver: Receiver) -> dict[str, Any]:  # fmt: skip
    mapping = root / "users.yaml"
    mapping.write_text(DEMO_MAPPING.read_text(encoding="utf-8").replace(
        "  title: title\n", "  title: title\n  password: initial_password\n"), encoding="utf-8")  # fmt: skip
    rows = [hr_row(f"E{n:03d}", f"First{n}", f"Last{n}", email=f"user{n}@example.com") for n in range(5)]
    rows.append(hr_row("E900", "Echo", "Me", email=ECHO_USER))
    write_csv(root / "hr.csv", [{**row, "initial_password": PASSWORD} for row in rows], [*HR_COLUMNS, "initial_password"])
    metrics_port = free_port()
    (root / "config.yaml").write_text(
        f"""state: sqlite:///state.db
sources:
  hr: {{type: csv, path: hr.csv, key: employee_id, schedule: {{every: 1h}}}}
targets:
  oauth-app:
    base_url: {oauth_target.base_url}
    allow_insecure_http: true
    auth:
      type: oauth2
      token_url: {tokens.token_url}
      client_id: {CLIENT_ID}
      client_secret: "${{PLANTED_CLIENT_SECRET}}"
    source: hr
    mapping: users.yaml
    retry: {{max_attempts: 2, backoff_base: 0.01, backoff_cap: 0.02}}
  bearer-app:
    base_url: {bearer_target.base_url}
    allow_insecure_http: true
    auth: {{type: bearer, token: "${{PLANTED_BEARER}}"}}
    source: hr
    mapping: users.yaml
    retry: {{max_attempts: 2, backoff_base: 0.01, backoff_cap: 0.02}}
daemon: {{listen: "127.0.0.1:{metrics_port}", retry_interval: 1}}
alerts:
  rules: {{failed_operations: 0}}
  webhook:
    url: "{receiver.url}"
    headers: {{Authorization: "Bearer ${{PLANTED_WEBHOOK}}"}}
""",
        encoding="utf-8",
    )
    env = {**os.environ, "PLANTED_CLIENT_SECRET": CLIENT_SECRET, "PLANTED_BEARER": BEARER_TOKEN,
           "PLANTED_WEBHOOK": WEBHOOK_TOKEN}  # fmt: skip
    return {"root": root, "env": env, "scim": scim, "receiver": receiver, "tokens": tokens}


def cli(world: dict[str, Any], *args: str) -> str:
    command = [sys.executable, "-m", "provisioner", "--log-format", "json", *args, "--config", "config.yaml"]
    result = subprocess.run(command, cwd=world["root"], env=world["env"], capture_output=True, text=True, timeout=120)
    assert result.returncode in (0, 4), f"{args}: exit {result.returncode}\n{result.stderr}"
    return result.stdout + result.stderr


def read_only(world: dict[str, Any], commands: list[list[str]]) -> str:
    """Run read-only commands one after another in one fresh process (starting one costs seconds here).

    Such a process knows the config's secrets only, as each of them alone would.
    """
    script = (
        "import sys, json\n"
        "from provisioner.cli import main\n"
        "for args in json.loads(sys.argv[1]):\n"
        "    code = main(['--log-format', 'json', *args, '--config', 'config.yaml'])\n"
        "    print(f'=== exit {code}', flush=True)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, json.dumps(commands)], cwd=world["root"],
                            env=world["env"], capture_output=True, text=True, timeout=300)  # fmt: skip
    return result.stdout + result.stderr


def database_cells(database: Path) -> dict[str, str]:
    """Every text value of every table, as ``table.column#rowid`` -> text."""
    cells = {}
    with sqlite3.connect(database) as conn:
        tables = [row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            cursor = conn.execute(f'SELECT * FROM "{table}"')  # noqa: S608 - names from sqlite_master
            columns = [d[0] for d in cursor.description]
            for number, row in enumerate(cursor):
                for column, value in zip(columns, row, strict=True):
                    if isinstance(value, bytes):
                        value = value.decode("utf-8", "replace")
                    if isinstance(value, str):
                        cells[f"{table}.{column}#{number}"] = value
    return cells


def test_no_planted_secret_is_found_in_the_state_logs_outputs_or_alerts(world: dict[str, Any]) -> None:
    outputs: dict[str, str] = {}
    outputs["sync"] = cli(world, "sync")
    outputs["sync again"] = cli(world, "sync")

    # The engine worked: the accounts exist with their password, the hostile answers are recorded.
    with sqlite3.connect(world["root"] / "state.db") as conn:
        by_status = dict(conn.execute("SELECT target || ':' || status, count(*) FROM operation GROUP BY 1").fetchall())
        echoed = conn.execute("SELECT count(*) FROM attempt WHERE response_body LIKE '%caller ***%'").fetchone()[0]
    assert by_status.get("oauth-app:succeeded") == 5 and by_status.get("oauth-app:failed") == 1, by_status
    assert by_status.get("bearer-app:retry_wait") == 6, by_status
    assert echoed >= 1
    assert world["receiver"].bodies, "alerts were expected at the webhook"

    with sqlite3.connect(world["root"] / "state.db") as conn:
        # One operation of each target and status: the succeeded, the echoed 400, the 401s waiting.
        ids = [row[0] for row in conn.execute("SELECT min(id) FROM operation GROUP BY target, status")]
    commands = [["status"], ["status", "--json"], ["queue", "list"], ["queue", "list", "--json"],
                ["queue", "export", "--format", "csv"], ["queue", "export", "--format", "json"],
                ["plan"], ["plan", "--json"], ["check"],
                *(["queue", "show", str(i), *extra] for i in ids for extra in ([], ["--json"])),
                # Last: preview renders the password, which makes this process know it.
                ["preview", "E001", "E900", "--target", "oauth-app"]]  # fmt: skip
    outputs["read-only commands"] = read_only(world, commands)
    # status exits 4 here, as sync would: this world holds a failed operation and others waiting for a retry.
    said = outputs["read-only commands"]
    assert (said.count("=== exit 4"), said.count("=== exit 0")) == (2, len(commands) - 2), said[-3000:]

    # The daemon: a few rounds, its alerts, then SIGTERM.
    log_path = world["root"] / "daemon.log"
    daemon = start_daemon(world["root"] / "config.yaml", world["env"], log=log_path)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and log_path.read_text().count('"event": "cycle"') < 2:
            time.sleep(0.2)
    finally:
        assert stop_daemon(daemon, timeout=60) == 0
    outputs["daemon log"] = log_path.read_text()

    # The password reached the target, where it belongs.
    scim: ScimServer = world["scim"]
    users = httpx.get(f"{scim.base_url}/Users", headers={"Authorization": f"Bearer {ACCESS_TOKEN}"}).json()
    assert len(users["Resources"]) == 5

    found = []
    for where, text in database_cells(world["root"] / "state.db").items():
        found += [f"state.db {where}: {n!r}" for n in needles() if n in text]
    for where, text in outputs.items():
        found += [f"output of {where}: {n!r}" for n in needles() if n in text]
    for number, body in enumerate(world["receiver"].bodies):
        found += [f"alert body {number}: {n!r}" for n in needles() if n in body]
    assert found == []
    # The webhook's own credential went where it belongs: its header.
    assert set(world["receiver"].authorizations) == {f"Bearer {WEBHOOK_TOKEN}"}
    # And the scan can fail: the secrets were really there to be leaked.
    assert ACCESS_TOKEN in world["tokens"].canned[0][1]["access_token"]
