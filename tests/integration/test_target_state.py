"""What the engine does when the target's state is not what our links say, on a real SCIM server."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from provisioner.config import load_config
from tests.conftest import hr_row, write_csv
from provisioner.demo import DEMO_MAPPING, ScimServer, start_scim_server
from provisioner.mapping import load_mapping
from provisioner.queue import list_operations
from provisioner.store import open_store
from provisioner.sync import TargetReport, sync_target



@pytest.fixture
def server() -> Iterator[ScimServer]:
    with start_scim_server() as srv:
        yield srv


person = hr_row


class World:
    """A config, a CSV source and a state database around one real SCIM server."""

    def __init__(self, tmp: Path, server: ScimServer, monkeypatch: pytest.MonkeyPatch, **target: str) -> None:
        self.server = server
        self.csv = tmp / "hr.csv"
        monkeypatch.setenv("TARGET_TOKEN", server.token)
        options = "".join(f"\n    {k}: {v}" for k, v in target.items())
        (tmp / "config.yaml").write_text(
            f"""state: sqlite:///state.db
sources:
  hr: {{type: csv, path: hr.csv, key: employee_id}}
targets:
  app:
    base_url: {server.base_url}
    allow_insecure_http: true
    auth: {{type: bearer, token: "${{TARGET_TOKEN}}"}}
    source: hr
    mapping: {DEMO_MAPPING}{options}
"""
        )
        self.config_path = tmp / "config.yaml"

    def write(self, rows: list[dict[str, str]]) -> None:
        write_csv(self.csv, rows)

    def sync(self) -> TargetReport:
        config = load_config(self.config_path)
        engine = open_store(config.state)
        return asyncio.run(sync_target(engine, config, "app", load_mapping(config.targets["app"].mapping)))

    def operations(self) -> list[dict[str, object]]:
        return list_operations(open_store(load_config(self.config_path).state))

    def http(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.server.token}", "Content-Type": "application/scim+json"}
        return httpx.Client(base_url=self.server.base_url + "/", headers=headers)

    def users(self, user_name: str) -> list[dict[str, object]]:
        with self.http() as http:
            response = http.get("Users", params={"filter": f'userName eq "{user_name}"'})
            return list(response.json().get("Resources", []))


def test_a_409_on_create_adopts_the_existing_account_and_puts_the_desired_state(
    tmp_path: Path, server: ScimServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = World(tmp_path, server, monkeypatch, match_before_create="never")
    with world.http() as http:
        made = http.post("Users", json={"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
                                        "userName": "ada.lovelace@example.com", "title": "Old title"})  # fmt: skip
        assert made.status_code == 201
    world.write([person("E1", "Ada", "Lovelace", title="Countess")])

    report = world.sync()

    assert report.summary()["created"] == 1 and report.failed == 0
    [user] = world.users("ada.lovelace@example.com")
    assert user["id"] == made.json()["id"]
    assert user["title"] == "Countess"
    [op] = world.operations()
    assert "409" in str(op["note"])
    assert world.sync().summary()["unchanged"] == 1


def test_match_before_create_links_an_existing_account_without_a_409(
    tmp_path: Path, server: ScimServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = World(tmp_path, server, monkeypatch, match_before_create="always")
    with world.http() as http:
        made = http.post("Users", json={"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
                                        "userName": "alan.turing@example.com"})  # fmt: skip
    world.write([person("E2", "Alan", "Turing"), person("E3", "Grace", "Hopper")])

    report = world.sync()

    assert report.summary()["created"] == 2 and report.failed == 0
    [alan] = world.users("alan.turing@example.com")
    assert alan["id"] == made.json()["id"] and alan["name"] == {"givenName": "Alan", "familyName": "Turing",
                                                                "formatted": "Alan Turing"}  # fmt: skip
    assert len(world.users("grace.hopper@example.com")) == 1


def test_two_identities_with_the_same_user_name_do_not_share_one_account(
    tmp_path: Path, server: ScimServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = World(tmp_path, server, monkeypatch, max_concurrency="1")
    world.write([person("E4", "Sam", "Lee"), person("E5", "Sam", "Lee")])

    report = world.sync()

    # Found in the snapshot before anything is sent: both held, neither gets (or shares) an account.
    assert report.summary()["created"] == 0
    assert report.failed == 2
    failed = {op["identity_key"]: str(op["last_error"]) for op in world.operations() if op["status"] == "failed"}
    assert "userName sam.lee@example.com is also rendered for identity E5" in failed["E4"]
    assert "userName sam.lee@example.com is also rendered for identity E4" in failed["E5"]
    assert world.users("sam.lee@example.com") == []


def test_an_update_for_an_account_deleted_in_the_target_creates_it_again(
    tmp_path: Path, server: ScimServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = World(tmp_path, server, monkeypatch)
    world.write([person("E6", "Edsger", "Dijkstra")])
    world.sync()
    [user] = world.users("edsger.dijkstra@example.com")
    with world.http() as http:
        assert http.delete(f"Users/{user['id']}").status_code == 204
    world.write([person("E6", "Edsger", "Dijkstra", department="Research")])

    report = world.sync()

    assert report.failed == 0
    [again] = world.users("edsger.dijkstra@example.com")
    assert again["id"] != user["id"]
    assert again["urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"]["department"] == "Research"


def test_an_update_for_a_missing_account_goes_to_review_when_configured(
    tmp_path: Path, server: ScimServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = World(tmp_path, server, monkeypatch, on_missing="review")
    world.write([person("E7", "Barbara", "Liskov")])
    world.sync()
    [user] = world.users("barbara.liskov@example.com")
    with world.http() as http:
        http.delete(f"Users/{user['id']}")
    world.write([person("E7", "Barbara", "Liskov", title="Professor")])

    report = world.sync()

    assert report.failed == 1
    assert world.users("barbara.liskov@example.com") == []
    assert world.operations()[0]["last_http_status"] == 404


def test_disabling_an_account_already_gone_from_the_target_succeeds_with_a_note(
    tmp_path: Path, server: ScimServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = World(tmp_path, server, monkeypatch)
    world.write([person("E8", "Ken", "Thompson"), person("E9", "Dennis", "Ritchie")])
    world.sync()
    [ken] = world.users("ken.thompson@example.com")
    with world.http() as http:
        http.delete(f"Users/{ken['id']}")
    world.write([person("E9", "Dennis", "Ritchie")])

    report = world.sync()

    assert report.summary()["disabled"] == 1 and report.failed == 0
    assert "not found" in str(world.operations()[0]["note"])
