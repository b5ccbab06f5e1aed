"""The SCIMMY app starts from the project's own files and serves what a provisioning lifecycle needs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.servers import scimmy_server
from tests.servers.scimmy_server import NodeMissing, ScimmyServer, running_scimmy

USER = "urn:ietf:params:scim:schemas:core:2.0:User"
ENTERPRISE = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
GROUP = "urn:ietf:params:scim:schemas:core:2.0:Group"
PATCH = "urn:ietf:params:scim:api:messages:2.0:PatchOp"


@pytest.fixture(scope="module")
def scimmy() -> Iterator[ScimmyServer]:
    yield from running_scimmy()


@pytest.fixture
def http(scimmy: ScimmyServer) -> Iterator[httpx.Client]:
    scimmy.clear()
    with httpx.Client(
        base_url=scimmy.base_url + "/", headers={"Authorization": f"Bearer {scimmy.token}"}, timeout=10
    ) as client:
        yield client


def test_without_node_the_error_says_to_install_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(NodeMissing, match="Node.js is not installed"):
        scimmy_server.install(tmp_path)


def test_a_request_without_the_token_is_refused(scimmy: ScimmyServer) -> None:
    assert httpx.get(scimmy.base_url + "/Users").status_code == 401
    assert httpx.get(scimmy.base_url + "/Users", headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_discovery_announces_patch_filter_and_the_enterprise_extension(http: httpx.Client) -> None:
    config = http.get("ServiceProviderConfig").json()
    assert config["patch"]["supported"] and config["filter"]["supported"]
    user_type = next(t for t in http.get("ResourceTypes").json()["Resources"] if t["id"] == "User")
    assert [e["schema"] for e in user_type["schemaExtensions"]] == [ENTERPRISE]
    assert ENTERPRISE in [s["id"] for s in http.get("Schemas").json()["Resources"]]


def test_users_and_groups_lifecycle(scimmy: ScimmyServer, http: httpx.Client) -> None:
    ann = http.post(
        "Users",
        json={"schemas": [USER, ENTERPRISE], "userName": "ann", "title": "Engineer", ENTERPRISE: {"department": "R&D"}},
    )
    assert ann.status_code == 201, ann.text
    ann_id = ann.json()["id"]
    duplicate = http.post("Users", json={"schemas": [USER], "userName": "ANN"})
    assert (duplicate.status_code, duplicate.json()["scimType"]) == (409, "uniqueness")
    bob_id = http.post("Users", json={"schemas": [USER], "userName": "bob"}).json()["id"]

    found = http.get("Users", params={"filter": 'userName eq "ann"', "startIndex": 1, "count": 10}).json()
    assert [r["id"] for r in found["Resources"]] == [ann_id]
    assert http.get("Users", params={"filter": 'userName eq "nobody"'}).json()["totalResults"] == 0
    page = http.get("Users", params={"startIndex": 2, "count": 1}).json()
    assert (page["totalResults"], len(page["Resources"])) == (2, 1)

    group = http.post("Groups", json={"schemas": [GROUP], "displayName": "staff", "members": [{"value": ann_id}]})
    assert group.status_code == 201
    group_id = group.json()["id"]
    ops = [
        {"op": "add", "path": "members", "value": [{"value": bob_id}]},
        {"op": "remove", "path": f'members[value eq "{ann_id}"]'},
    ]
    assert http.patch(f"Groups/{group_id}", json={"schemas": [PATCH], "Operations": ops}).status_code == 200
    assert [m["value"] for m in http.get(f"Groups/{group_id}").json()["members"]] == [bob_id]

    replaced = http.put(f"Users/{ann_id}", json={"schemas": [USER], "userName": "ann.b", "active": False})
    assert replaced.status_code == 200
    patched = http.patch(
        f"Users/{bob_id}",
        json={"schemas": [PATCH], "Operations": [{"op": "replace", "path": "title", "value": "Lead"}]},
    )
    assert patched.status_code == 200

    dump = scimmy.dump()
    users = {u["id"]: u for u in dump["Users"]}
    assert users[ann_id]["userName"] == "ann.b" and users[ann_id]["active"] is False
    assert "title" not in users[ann_id]  # PUT replaced the whole resource
    assert users[bob_id]["title"] == "Lead"
    assert [m["value"] for m in dump["Groups"][0]["members"]] == [bob_id]

    before = scimmy.request_count()
    assert http.delete(f"Users/{ann_id}").status_code == 204
    assert http.get(f"Users/{ann_id}").status_code == 404
    assert scimmy.request_count() == before + 2
