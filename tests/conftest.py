"""Shared fixtures: a real SCIM server over HTTP, a workspace around it, HR rows.

The SCIM server is the ``scim2-server`` package started on a free port of
127.0.0.1 (``provisioner.demo.start_scim_server``), one per test module; its
data lives in memory and is emptied before every test that uses it. Tests read the server's
state with plain httpx, never through the engine's own client.
"""

from __future__ import annotations

import asyncio
import csv
import json
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from provisioner.config import load_config
from provisioner.demo import DEMO_MAPPING, ScimServer, start_scim_server
from provisioner.store import open_store
from provisioner.sync import TargetReport, load_target_mapping, sync_target

ENTERPRISE = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
HR_COLUMNS = (
    "employee_id", "first_name", "last_name", "email", "phone", "title",
    "department", "cost_center", "division", "manager_id", "status",
)  # fmt: skip
TOKEN_VARIABLE = "PROVISIONER_TEST_TOKEN"


def hr_row(employee_id: str, first: str, last: str, **columns: str) -> dict[str, str]:
    """One HR record with every column of ``examples/hr.csv``; keywords override the defaults."""
    row = dict.fromkeys(HR_COLUMNS, "")
    row.update(
        employee_id=employee_id,
        first_name=first,
        last_name=last,
        email=f"{first}.{last}@example.com".lower(),
        title="Engineer",
        department="Engineering",
        cost_center="CC-100",
        division="R&D",
        status="active",
    )
    row.update(columns)
    return row


def write_csv(path: Path, rows: Sequence[dict[str, str]], columns: Sequence[str] = HR_COLUMNS) -> None:
    """Write HR rows as the CSV export a source reads."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)


class ScimReader:
    """Reads a SCIM server's users and groups over HTTP, independently of the engine."""

    def __init__(self, server: ScimServer) -> None:
        self.http = httpx.Client(
            base_url=server.base_url + "/",
            headers={"Authorization": f"Bearer {server.token}", "Accept": "application/scim+json"},
            timeout=10,
        )

    def close(self) -> None:
        self.http.close()

    def find(self, user_name: str) -> list[dict[str, Any]]:
        """Every user whose userName equals ``user_name``."""
        response = self.http.get("Users", params={"filter": f"userName eq {json.dumps(user_name)}"})
        response.raise_for_status()
        return list(response.json().get("Resources") or [])

    def user(self, user_name: str) -> dict[str, Any]:
        """The one user with this userName; fails the test when there is not exactly one."""
        found = self.find(user_name)
        assert len(found) == 1, f"expected one user {user_name!r} on the server, found {len(found)}"
        return found[0]

    def all(self) -> list[dict[str, Any]]:
        """Every user on the server."""
        response = self.http.get("Users", params={"count": 1000})
        response.raise_for_status()
        return list(response.json().get("Resources") or [])

    def group_members(self, display_name: str) -> set[str] | None:
        """The member ids of the group with this displayName; None when there is no such group."""
        response = self.http.get("Groups", params={"filter": f"displayName eq {json.dumps(display_name)}"})
        response.raise_for_status()
        # The filter is the server's claim: keep only exact matches, and fail the test on two.
        found = [g for g in response.json().get("Resources") or [] if g["displayName"] == display_name]
        if not found:
            return None
        [group] = found
        return {m["value"] for m in group.get("members") or []}


class Workspace:
    """A config folder (config.yaml, hr.csv, state.db) whose target is a real SCIM server."""

    def __init__(self, root: Path, server: ScimServer) -> None:
        self.root = root
        self.server = server
        self.config_path = root / "config.yaml"
        self.source_path = root / "hr.csv"
        self.mapping_path = root / "users.yaml"
        self.db_path = root / "state.db"
        # The shipped mapping, copied: tests that break it do not touch the repository.
        self.mapping_path.write_text(DEMO_MAPPING.read_text(encoding="utf-8"), encoding="utf-8")
        self.write_config()

    def write_config(self, *, source_type: str = "csv", **target_options: Any) -> None:
        """Write config.yaml (relative paths, token from the environment) with extra target options."""
        # These tests read what was sent in the call log: every call keeps its bodies unless a test says.
        target_options.setdefault("call_bodies", "all")
        extra = "".join(f"\n    {key}: {value}" for key, value in target_options.items())
        self.source_path = self.root / ("hr.jsonl" if source_type == "jsonl" else "hr.csv")
        self.config_path.write_text(
            f"""state: sqlite:///state.db
sources:
  hr:
    type: {source_type}
    path: {self.source_path.name}
    key: employee_id
targets:
  app:
    base_url: {self.server.base_url}
    allow_insecure_http: true
    auth: {{type: bearer, token: "${{{TOKEN_VARIABLE}}}"}}
    source: hr
    mapping: users.yaml{extra}
""",
            encoding="utf-8",
        )

    def write_source(self, rows: Sequence[dict[str, Any]]) -> None:
        """Write the source file the config reads: CSV rows, or one JSON object per line."""
        if self.source_path.suffix == ".jsonl":
            self.source_path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        else:
            write_csv(self.source_path, rows)

    def sync_now(self) -> TargetReport:
        """:meth:`sync` for tests that are not coroutines."""
        return asyncio.run(self.sync())

    async def sync(self) -> TargetReport:
        """One cycle of the target, as ``provisioner sync`` runs it, in this process."""
        config = load_config(self.config_path)
        mapping = load_target_mapping(config, "app")
        engine = open_store(config.state)
        try:
            return await sync_target(engine, config, "app", mapping)
        finally:
            engine.dispose()

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        """Rows of the state database, read with plain sqlite3."""
        with sqlite3.connect(self.db_path) as conn:
            return conn.execute(sql, params).fetchall()

    def count(self, table: str) -> int:
        if not self.db_path.exists():
            return 0
        return int(self.query(f"SELECT count(*) FROM {table}")[0][0])  # noqa: S608 - table names are ours

    def operations(self) -> list[dict[str, Any]]:
        """Every queue row, oldest first, as a dict of its columns."""
        with sqlite3.connect(self.db_path) as conn:
            conn.row_factory = sqlite3.Row
            return [dict(row) for row in conn.execute("SELECT * FROM operation ORDER BY id")]

    def held(self) -> list[dict[str, Any]]:
        """The queue rows held for an operator's approval, oldest first."""
        return [op for op in self.operations() if op["status"] == "held"]


@pytest.fixture(scope="module")
def module_scim_server() -> Iterator[ScimServer]:
    """One scim2-server per test module (starting one costs most of a second)."""
    server = start_scim_server()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def scim_server(module_scim_server: ScimServer) -> ScimServer:
    """The module's SCIM server, emptied of every resource before the test: each test starts from nothing."""
    empty_server(module_scim_server)
    return module_scim_server


def empty_server(server: ScimServer) -> None:
    """DELETE every User and Group of a server, then check that none is left."""
    headers = {"Authorization": f"Bearer {server.token}"}
    with httpx.Client(base_url=server.base_url + "/", headers=headers, timeout=10) as http:
        for endpoint in ("Users", "Groups"):
            while resources := http.get(endpoint, params={"count": 1000}).json().get("Resources") or []:
                for resource in resources:
                    assert http.delete(f"{endpoint}/{resource['id']}").status_code == 204
            assert http.get(endpoint).json()["totalResults"] == 0


@pytest.fixture
def scim(scim_server: ScimServer) -> Iterator[ScimReader]:
    """Reads the test's SCIM server over HTTP."""
    reader = ScimReader(scim_server)
    try:
        yield reader
    finally:
        reader.close()


@pytest.fixture
def workspace(tmp_path: Path, scim_server: ScimServer, monkeypatch: pytest.MonkeyPatch) -> Workspace:
    """A config folder pointing at the test's SCIM server; the token is in the environment."""
    monkeypatch.setenv(TOKEN_VARIABLE, scim_server.token)
    return Workspace(tmp_path, scim_server)
