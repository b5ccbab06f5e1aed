"""A target's quirks in config, learned quirks kept across restarts, and group links that stay unique.

Against scim2-server over HTTP; the deviating server's cases are in test_deviations.py.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from provisioner.cli import main
from provisioner.config import load_config
from provisioner.demo import ScimServer, start_scim_server
from provisioner.errors import ConfigError
from provisioner.quirks import learned, load_quirks
from provisioner.store import open_store
from tests.conftest import TOKEN_VARIABLE, Workspace
from tests.integration.test_groups import World, person


def test_a_bad_quirk_value_names_file_line_and_key(workspace: Workspace) -> None:
    workspace.write_config(quirks="{member_removal: sometimes}")
    with pytest.raises(ConfigError) as caught:
        load_config(workspace.config_path)
    message = str(caught.value)
    assert "config.yaml:" in message and "targets.app.quirks.member_removal" in message


def test_an_unknown_quirk_is_refused(workspace: Workspace) -> None:
    workspace.write_config(quirks="{put_allowed: false}")
    with pytest.raises(ConfigError, match="targets.app.quirks.put_allowed: unknown key"):
        load_config(workspace.config_path)


def test_a_learned_quirk_is_kept_loaded_at_start_and_shown_by_status(
    workspace: Workspace, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(TOKEN_VARIABLE, workspace.server.token)
    config = load_config(workspace.config_path)
    engine = open_store(config.state)
    quirks = load_quirks(engine, "app", config.targets["app"])
    assert quirks.put is True
    quirks.learn("put", False, "PUT /Users/{id} answered 405")

    again = load_quirks(engine, "app", config.targets["app"])
    assert again.put is False
    assert [(q.name, q.value, q.reason) for q in learned(engine, "app")] == [("put", False, "PUT /Users/{id} answered 405")]

    assert main(["status", "--config", str(workspace.config_path)]) == 0
    out = capsys.readouterr().out
    assert "learned quirks.put: false (PUT /Users/{id} answered 405;" in out


def test_a_declared_quirk_wins_over_a_learned_one(workspace: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_VARIABLE, workspace.server.token)
    workspace.write_config(quirks="{put: true, member_removal: list}")
    config = load_config(workspace.config_path)
    engine = open_store(config.state)
    load_quirks(engine, "app", config.targets["app"]).learn("put", False, "PUT answered 501")
    quirks = load_quirks(engine, "app", config.targets["app"])
    assert (quirks.put, quirks.member_removal, quirks.filter) == (True, "list", "server")


TWO_RULES_ONE_GROUP = """groups:
  - name: Administrators
    key: admins
    members: "department == 'IT'"
  - name: Administrators
    key: it-admins
    members: "department == 'IT'"
"""


def test_two_group_rules_resolving_to_one_existing_group_link_it_once(
    tmp_path: Path, server: ScimServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four workers, two rules, one existing group: one rule links it, the other goes to review."""
    world = World(tmp_path, server, monkeypatch, groups=TWO_RULES_ONE_GROUP)
    with world.http() as http:
        created = http.post("Groups", json={"schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"],
                                            "displayName": "Administrators"})  # fmt: skip
        assert created.status_code == 201
    world.write([person("E1", "IT"), person("E2", "IT")])
    world.sync()

    with sqlite3.connect(tmp_path / "state.db") as conn:
        links = conn.execute("SELECT group_key, scim_id FROM group_link").fetchall()
    assert [scim_id for _, scim_id in links] == [created.json()["id"]]
    ops = {row["identity_key"]: row for row in world.group_operations()}
    loser = ({"admins", "it-admins"} - {links[0][0]}).pop()
    assert ops[links[0][0]]["status"] == "succeeded"
    assert ops[loser]["status"] == "failed"
    assert f"already linked to group {links[0][0]!r}" in ops[loser]["last_error"]
    assert len(world.groups()["Administrators"]) == 1
    assert world.members("Administrators") == {"e1@example.com", "e2@example.com"}


@pytest.fixture
def server() -> Iterator[ScimServer]:
    with start_scim_server() as srv:
        yield srv


def test_an_existing_state_file_gets_the_unique_group_link_index(tmp_path: Path) -> None:
    """create_all adds tables, not indexes: a state file from before the index gets it at open."""
    db = tmp_path / "state.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE group_link (target VARCHAR NOT NULL, group_key VARCHAR NOT NULL, scim_id VARCHAR NOT NULL,"
                     " display_name VARCHAR NOT NULL, etag VARCHAR, verified_at DATETIME, updated_at DATETIME NOT NULL,"
                     " PRIMARY KEY (target, group_key))")  # fmt: skip
    open_store(f"sqlite:///{db}").dispose()
    with sqlite3.connect(db) as conn:
        names = {row[1] for row in conn.execute("PRAGMA index_list(group_link)")}
    assert "ux_group_link_scim_id" in names

