"""The engine with OAuth 2.0 client credentials, against a real token endpoint and a real SCIM server.

The token endpoint is :mod:`tests.connectors.tokenserver` (it issues ``tok-1``,
``tok-2``… in order, and answers a wrong secret with a 401 whose description
echoes the secret it was sent); the target is scim2-server started to accept
one of those tokens. The client secret comes from the environment, as an
operator would set it, and must never reach the state database or a log line.
"""

from __future__ import annotations

import asyncio
import base64
import csv
import io
import logging
import os
import sqlite3
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import httpx
import pytest
import structlog

from provisioner import logs
from provisioner.config import load_config
from provisioner.demo import DEMO_MAPPING, ScimServer, start_scim_server
from provisioner.store import open_store
from provisioner.sync import TargetReport, load_target_mapping, sync_target
from tests.connectors.tokenserver import CLIENT_ID, CLIENT_SECRET, TokenServer, serve_tokens

COLUMNS = ("employee_id", "first_name", "last_name", "email", "phone", "title",
           "department", "cost_center", "division", "manager_id", "status")  # fmt: skip
WRONG_SECRET = "not-the-s3cr3t:but&close=enough"
PEOPLE = 40


def people(count: int = PEOPLE) -> list[dict[str, str]]:
    rows = []
    for number in range(1, count + 1):
        rows.append({
            "employee_id": f"P{number:03d}", "first_name": "Person", "last_name": f"Number{number}",
            "email": f"person.number{number}@example.com", "phone": "", "title": "Engineer",
            "department": "Engineering", "cost_center": "CC-100", "division": "R&D",
            "manager_id": "" if number == 1 else "P001", "status": "active",
        })  # fmt: skip
    return rows


def secret_forms(secret: str) -> list[str]:
    """The ways a client secret could be written down: as is, form-encoded, inside a Basic header."""
    basic = base64.b64encode(f"{quote(CLIENT_ID, safe='')}:{quote(secret, safe='')}".encode()).decode()
    plain_basic = base64.b64encode(f"{CLIENT_ID}:{secret}".encode()).decode()
    return sorted({secret, quote(secret, safe=""), quote_plus(secret), basic, plain_basic})


class World:
    """config.yaml, hr.csv and state.db in a folder; the target authenticates with OAuth 2.0."""

    def __init__(self, root: Path, scim: ScimServer, tokens: TokenServer, secret: str) -> None:
        self.root = root
        self.secret = secret
        self.env = {"SECRET": secret}
        (root / "config.yaml").write_text(
            f"""state: sqlite:///state.db
sources:
  hr: {{type: csv, path: hr.csv, key: employee_id}}
targets:
  app:
    base_url: {scim.base_url}
    allow_insecure_http: true
    auth:
      type: oauth2
      token_url: {tokens.token_url}
      client_id: {CLIENT_ID}
      client_secret: "${{SECRET}}"
    source: hr
    mapping: {DEMO_MAPPING}
    max_concurrency: 8
    retry: {{backoff_base: 0.01, backoff_cap: 0.05, max_retry_after: 1}}
""",
            encoding="utf-8",
        )
        with (root / "hr.csv").open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(people())

    def sync(self, monkeypatch: pytest.MonkeyPatch) -> TargetReport:
        monkeypatch.setenv("SECRET", self.secret)
        config = load_config(self.root / "config.yaml")
        engine = open_store(config.state)
        try:
            return asyncio.run(sync_target(engine, config, "app", load_target_mapping(config, "app")))
        finally:
            engine.dispose()

    def rows(self, sql: str) -> list[sqlite3.Row]:
        with sqlite3.connect(self.root / "state.db") as conn:
            conn.row_factory = sqlite3.Row
            return conn.execute(sql).fetchall()

    def statuses(self) -> Counter[str]:
        return Counter(row["status"] for row in self.rows("SELECT status FROM operation"))

    def text_cells_containing(self, needles: list[str]) -> list[str]:
        """``table.column`` of every text value in the database that contains one of ``needles``."""
        found = []
        tables = [row["name"] for row in self.rows("SELECT name FROM sqlite_master WHERE type = 'table'")]
        assert {"operation", "attempt", "account_link", "run"} <= set(tables)
        for table in tables:
            for row in self.rows(f'SELECT * FROM "{table}"'):  # noqa: S608 - names from sqlite_master
                for column in row.keys():
                    value = row[column]
                    if isinstance(value, bytes):
                        value = value.decode("utf-8", "replace")
                    if isinstance(value, str) and any(needle in value for needle in needles):
                        found.append(f"{table}.{column}")
        return found

    def file_bytes_containing(self, needles: list[str]) -> list[str]:
        """Database files (main, WAL, shared memory) whose raw bytes hold one of ``needles``."""
        found = []
        for path in self.root.glob("state.db*"):
            data = path.read_bytes()
            found += [f"{path.name}: {needle!r}" for needle in needles if needle.encode() in data]
        return found


def scim_users(server: ScimServer) -> list[dict[str, Any]]:
    headers = {"Authorization": f"Bearer {server.token}"}
    with httpx.Client(base_url=server.base_url + "/", headers=headers, timeout=10) as http:
        return list(http.get("Users", params={"count": 1000}).json().get("Resources") or [])


@pytest.fixture
def tokens() -> Iterator[TokenServer]:
    with serve_tokens() as state:
        yield state


@pytest.fixture
def quiet_logs() -> Iterator[None]:
    """Log events captured instead of printed, for tests that do not read them."""
    with structlog.testing.capture_logs():
        yield


@pytest.fixture
def rendered_logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """Every log line rendered as the CLI renders it (JSON, debug level, secrets masked), into a buffer."""
    buffer = io.StringIO()
    saved = structlog.get_config()
    root = logging.getLogger()
    saved_root = (root.handlers[:], root.level)
    saved_levels = {name: logging.getLogger(name).level for name in ("connectors", "httpx", "httpcore", "apscheduler")}
    with monkeypatch.context() as patch:
        patch.setattr(sys, "stderr", buffer)
        logs.configure("debug", "json")
    try:
        yield buffer
    finally:
        structlog.configure(**saved)
        root.handlers[:], level = saved_root
        root.setLevel(level)
        for name, level in saved_levels.items():
            logging.getLogger(name).setLevel(level)


def test_a_full_sync_with_oauth2_fetches_one_token_and_never_records_the_secret(
    tmp_path: Path,
    tokens: TokenServer,
    monkeypatch: pytest.MonkeyPatch,
    rendered_logs: io.StringIO,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with start_scim_server(token="tok-1") as scim:
        world = World(tmp_path, scim, tokens, CLIENT_SECRET)

        report = world.sync(monkeypatch)

        assert report.summary()["created"] == PEOPLE and report.failed == 0 and report.deferred == 0
        users = scim_users(scim)
    assert sorted(u["userName"] for u in users) == sorted(row["email"] for row in people())
    # One token for the whole cycle: discovery and 40 creates from 8 concurrent workers.
    assert len(tokens.token_requests) == 1
    [request] = tokens.token_requests
    assert request.method == "client_secret_basic"
    assert request.form.get("grant_type") == "client_credentials"
    assert world.statuses() == Counter({"succeeded": PEOPLE})
    assert len(world.rows("SELECT id FROM attempt")) == PEOPLE

    needles = secret_forms(CLIENT_SECRET)
    assert world.text_cells_containing(needles) == []
    assert world.file_bytes_containing(needles) == []
    # The bearer token is a credential too: in no request record.
    assert world.text_cells_containing(["Bearer tok-", "Basic "]) == []
    text = rendered_logs.getvalue() + caplog.text
    assert '"event": "operation"' in text  # the logs were captured at all
    assert [n for n in needles if n in text] == []
    print(f"\noauth2: {PEOPLE} users created with {len(tokens.token_requests)} token request(s); "
          f"secret found in 0 database cells and 0 log lines")  # fmt: skip


def test_a_token_the_target_refuses_is_refreshed_once_and_the_cycle_goes_on(
    tmp_path: Path, tokens: TokenServer, monkeypatch: pytest.MonkeyPatch, quiet_logs: None
) -> None:
    """The target accepts only the second token issued: the first 401 costs exactly one more token request."""
    with start_scim_server(token="tok-2") as scim:
        world = World(tmp_path, scim, tokens, CLIENT_SECRET)

        report = world.sync(monkeypatch)

        assert report.summary()["created"] == PEOPLE and report.failed == 0 and report.deferred == 0
        assert len(scim_users(scim)) == PEOPLE
    assert len(tokens.token_requests) == 2


def test_a_wrong_client_secret_leaves_operations_queued_not_failed_and_masks_the_secret(
    tmp_path: Path,
    tokens: TokenServer,
    monkeypatch: pytest.MonkeyPatch,
    rendered_logs: io.StringIO,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with start_scim_server(token="tok-1") as scim:
        world = World(tmp_path, scim, tokens, WRONG_SECRET)

        report = world.sync(monkeypatch)

        assert scim_users(scim) == []
    assert report.failed == 0
    assert report.summary()["created"] == 0
    assert report.deferred == PEOPLE
    statuses = world.statuses()
    assert sum(statuses.values()) == PEOPLE
    # Nothing goes to review for a credential problem: every operation is still queued for a later round.
    assert set(statuses) <= {"retry_wait", "pending"}, statuses
    # The target is flagged: its health record names the refusal (alerts read it).
    [health] = world.rows("SELECT last_error, auth_failures FROM target_state WHERE target = 'app'")
    assert "invalid_client" in health["last_error"] and health["auth_failures"] == 1
    # The token endpoint echoed the wrong secret in its error description: it is cut out everywhere.
    assert tokens.token_requests, "the token endpoint was asked"
    needles = secret_forms(WRONG_SECRET)
    assert world.text_cells_containing(needles) == []
    assert world.file_bytes_containing(needles) == []
    text = rendered_logs.getvalue() + caplog.text
    assert "invalid_client" in text
    assert [n for n in needles if n in text] == []
    assert "Traceback" not in text


def test_a_wrong_client_secret_puts_operations_in_retry_wait_with_the_reason(
    tmp_path: Path, tokens: TokenServer, monkeypatch: pytest.MonkeyPatch, quiet_logs: None
) -> None:
    with start_scim_server(token="tok-1") as scim:
        world = World(tmp_path, scim, tokens, WRONG_SECRET)
        world.sync(monkeypatch)
    assert world.statuses() == Counter({"retry_wait": PEOPLE})
    waiting = world.rows("SELECT last_error, next_attempt_at FROM operation")
    assert all(row["next_attempt_at"] is not None for row in waiting)
    assert all("invalid_client" in (row["last_error"] or "") for row in waiting)


def test_the_cli_sync_with_a_wrong_client_secret_exits_4_without_a_traceback(
    tmp_path: Path, tokens: TokenServer
) -> None:
    with start_scim_server(token="tok-1") as scim:
        world = World(tmp_path, scim, tokens, WRONG_SECRET)
        env = {**os.environ, "SECRET": WRONG_SECRET}
        done = subprocess.run(
            [sys.executable, "-m", "provisioner", "--log-format", "json", "--log-level", "debug", "sync",
             "--config", str(tmp_path / "config.yaml")],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert scim_users(scim) == []
    output = done.stdout + done.stderr
    assert done.returncode == 4, output
    assert "Traceback" not in output
    assert "invalid_client" in output
    assert [n for n in secret_forms(WRONG_SECRET) if n in output] == []
    statuses = world.statuses()
    assert sum(statuses.values()) == PEOPLE and set(statuses) <= {"retry_wait", "pending"}, statuses
    assert f"deferred {PEOPLE}" in done.stdout, done.stdout  # the summary line says what waits
