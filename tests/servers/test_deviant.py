"""The deviant server really deviates, one switch at a time, and is plain scim2-server with none on.

Each test sends the same requests to a conformant server and to one with the
deviation switched on, with plain httpx, and reads both answers and the stored truth.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.servers.deviant import DEVIATIONS, ENTERPRISE, DeviantServer, start_deviant_server

USER = "urn:ietf:params:scim:schemas:core:2.0:User"
GROUP = "urn:ietf:params:scim:schemas:core:2.0:Group"
PATCH = "urn:ietf:params:scim:api:messages:2.0:PatchOp"


class Client:
    """Plain httpx against one server, with helpers to make users and groups."""

    def __init__(self, server: DeviantServer) -> None:
        self.server = server
        self.http = httpx.Client(
            base_url=server.base_url + "/", headers={"Authorization": f"Bearer {server.token}"}, timeout=10
        )

    def user(self, name: str, **attributes: Any) -> dict[str, Any]:
        response = self.http.post("Users", json={"schemas": [USER], "userName": name, **attributes})
        assert response.status_code == 201, response.text
        return response.json()

    def group(self, name: str, *member_ids: str) -> dict[str, Any]:
        body = {"schemas": [GROUP], "displayName": name, "members": [{"value": m} for m in member_ids]}
        response = self.http.post("Groups", json=body)
        assert response.status_code == 201, response.text
        return response.json()

    def patch(self, endpoint: str, resource_id: str, *operations: dict[str, Any]) -> httpx.Response:
        return self.http.patch(f"{endpoint}/{resource_id}", json={"schemas": [PATCH], "Operations": list(operations)})

    def stored(self, endpoint: str, resource_id: str) -> dict[str, Any]:
        """The resource as the server stores it (its storage, not its answers)."""
        return next(r for r in self.server.dump()[endpoint] if r["id"] == resource_id)


@pytest.fixture
def serve() -> Iterator[Callable[..., Client]]:
    """Start servers with the deviations asked; every one is stopped after the test."""
    started: list[tuple[DeviantServer, Client]] = []

    def start(*deviations: str, **options: Any) -> Client:
        server = start_deviant_server(deviations, **options)
        client = Client(server)
        started.append((server, client))
        return client

    yield start
    for server, client in started:
        client.http.close()
        server.stop()


def member_values(resource: dict[str, Any]) -> list[str]:
    return sorted(m["value"] for m in resource.get("members") or [])


def test_unknown_deviation_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown deviations"):
        start_deviant_server({"no_such_thing"})


def test_conformant_server_records_requests_and_dumps_its_storage(serve: Callable[..., Client]) -> None:
    scim = serve()
    ann = scim.user("ann", title="Engineer")
    group = scim.group("staff", ann["id"])
    assert scim.http.get("Users", params={"filter": 'userName eq "bob"'}).json()["totalResults"] == 0
    dump = scim.server.dump()
    assert [u["userName"] for u in dump["Users"]] == ["ann"]
    assert dump["Groups"][0]["id"] == group["id"]
    assert member_values(dump["Groups"][0]) == [ann["id"]]
    assert [method for method, _, _ in scim.server.requests] == ["POST", "POST", "GET"]
    unauthenticated = httpx.get(scim.server.base_url + "/Users")
    assert unauthenticated.status_code == 401
    scim.server.clear()
    assert scim.server.dump() == {"Users": [], "Groups": []}
    assert scim.server.requests == []


def test_filter_ignored_answers_every_resource(serve: Callable[..., Client]) -> None:
    scim = serve("filter_ignored")
    scim.user("ann")
    scim.user("it-admin")
    listed = scim.http.get("Users", params={"filter": 'userName eq "nobody"'}).json()
    assert sorted(r["userName"] for r in listed["Resources"]) == ["ann", "it-admin"]
    searched = scim.http.post(
        "Users/.search",
        json={"schemas": ["urn:ietf:params:scim:api:messages:2.0:SearchRequest"], "filter": 'userName eq "ann"'},
    ).json()
    assert searched["totalResults"] == 2


def test_group_members_not_returned_in_any_answer(serve: Callable[..., Client]) -> None:
    scim = serve("group_members_not_returned")
    ann = scim.user("ann")
    created = scim.group("staff", ann["id"])
    assert "members" not in created
    assert "members" not in scim.http.get(f"Groups/{created['id']}").json()
    assert "members" not in scim.http.get(f"Groups/{created['id']}", params={"attributes": "members"}).json()
    assert all("members" not in g for g in scim.http.get("Groups").json()["Resources"])
    assert member_values(scim.stored("Groups", created["id"])) == [ann["id"]]


def test_member_removal_ignored_answers_200_and_removes_nothing(serve: Callable[..., Client]) -> None:
    scim = serve("member_removal_ignored")
    ann, bob = scim.user("ann"), scim.user("bob")
    group = scim.group("staff", ann["id"], bob["id"])
    answer = scim.patch("Groups", group["id"], {"op": "remove", "path": f'members[value eq "{ann["id"]}"]'})
    assert answer.status_code == 200
    assert member_values(scim.stored("Groups", group["id"])) == sorted([ann["id"], bob["id"]])
    # The value-list form, as Entra ID sends it, works.
    answer = scim.patch("Groups", group["id"], {"op": "remove", "path": "members", "value": [{"value": ann["id"]}]})
    assert answer.status_code in (200, 204)
    assert member_values(scim.stored("Groups", group["id"])) == [bob["id"]]


def test_no_put_answers_405(serve: Callable[..., Client]) -> None:
    scim = serve("no_put")
    ann = scim.user("ann", title="Engineer")
    answer = scim.http.put(f"Users/{ann['id']}", json={"schemas": [USER], "userName": "ann", "title": "Boss"})
    assert answer.status_code == 405
    assert scim.stored("Users", ann["id"])["title"] == "Engineer"
    patched = scim.patch("Users", ann["id"], {"op": "replace", "path": "title", "value": "Boss"})
    assert patched.status_code in (200, 204)
    assert scim.stored("Users", ann["id"])["title"] == "Boss"


def test_patch_501_for_a_filtered_member_path_only(serve: Callable[..., Client]) -> None:
    scim = serve("patch_501")
    ann, bob = scim.user("ann"), scim.user("bob")
    group = scim.group("staff", ann["id"], bob["id"])
    refused = scim.patch(
        "Groups",
        group["id"],
        {"op": "add", "path": "members", "value": [{"value": bob["id"]}]},
        {"op": "remove", "path": f'members[value eq "{ann["id"]}"]'},
    )
    assert refused.status_code == 501
    assert member_values(scim.stored("Groups", group["id"])) == sorted([ann["id"], bob["id"]])
    listed = scim.patch("Groups", group["id"], {"op": "remove", "path": "members", "value": [{"value": ann["id"]}]})
    assert listed.status_code in (200, 204)
    assert member_values(scim.stored("Groups", group["id"])) == [bob["id"]]


def test_count_rejected_answers_500_to_any_count(serve: Callable[..., Client]) -> None:
    scim = serve("count_rejected")
    scim.user("ann")
    assert scim.http.get("Users", params={"count": 10}).status_code == 500
    assert scim.http.get("Groups", params={"count": 1, "startIndex": 1}).status_code == 500
    assert scim.http.get("Users", params={"startIndex": 1}).json()["totalResults"] == 1


def test_members_by_username(serve: Callable[..., Client]) -> None:
    scim = serve("members_by_username")
    ann, bob = scim.user("ann"), scim.user("bob")
    empty = scim.http.post("Groups", json={"schemas": [GROUP], "displayName": "empty"})
    assert empty.status_code == 400
    assert empty.json()["scimType"] == "invalidValue"
    group = scim.group("staff", ann["id"])
    assert member_values(scim.stored("Groups", group["id"])) == ["ann"]
    assert member_values(scim.http.get(f"Groups/{group['id']}").json()) == ["ann"]
    added = scim.patch("Groups", group["id"], {"op": "add", "path": "members", "value": [{"value": bob["id"]}]})
    assert added.status_code in (200, 204)
    assert member_values(scim.stored("Groups", group["id"])) == ["ann", "bob"]
    by_id = scim.patch("Groups", group["id"], {"op": "remove", "path": f'members[value eq "{ann["id"]}"]'})
    assert by_id.status_code in (200, 204)
    assert member_values(scim.stored("Groups", group["id"])) == ["ann", "bob"]
    by_name = scim.patch("Groups", group["id"], {"op": "remove", "path": 'members[value eq "ann"]'})
    assert by_name.status_code in (200, 204)
    assert member_values(scim.stored("Groups", group["id"])) == ["bob"]
    # Members are linked users, listed by their current userName.
    assert scim.patch("Users", bob["id"], {"op": "replace", "path": "userName", "value": "robert"}).status_code in (
        200,
        204,
    )
    assert member_values(scim.http.get(f"Groups/{group['id']}").json()) == ["robert"]
    added = scim.patch("Groups", group["id"], {"op": "add", "path": "members", "value": [{"value": "ann"}]})
    assert added.status_code in (200, 204)
    assert member_values(scim.stored("Groups", group["id"])) == ["ann", "robert"]


def test_extension_unsupported(serve: Callable[..., Client]) -> None:
    scim = serve("extension_unsupported")
    types = scim.http.get("ResourceTypes").json()["Resources"]
    assert types and all("schemaExtensions" not in t for t in types)
    schema_ids = [s["id"] for s in scim.http.get("Schemas").json()["Resources"]]
    assert USER in schema_ids and ENTERPRISE not in schema_ids
    refused = scim.http.post(
        "Users", json={"schemas": [USER, ENTERPRISE], "userName": "ann", ENTERPRISE: {"department": "R&D"}}
    )
    assert refused.status_code == 400
    assert refused.json()["scimType"] == "invalidValue"
    assert scim.server.dump()["Users"] == []
    ann = scim.user("ann")
    patched = scim.patch("Users", ann["id"], {"op": "add", "path": f"{ENTERPRISE}:department", "value": "R&D"})
    assert patched.status_code == 400


def test_attribute_dropped_answers_success_without_storing_title(serve: Callable[..., Client]) -> None:
    scim = serve("attribute_dropped")
    ann = scim.user("ann", title="Engineer", displayName="Ann")
    assert "title" not in scim.stored("Users", ann["id"])
    assert scim.stored("Users", ann["id"])["displayName"] == "Ann"
    put = scim.http.put(f"Users/{ann['id']}", json={"schemas": [USER], "userName": "ann", "title": "Boss"})
    assert put.status_code == 200
    patched = scim.patch("Users", ann["id"], {"op": "replace", "path": "title", "value": "Boss"})
    assert patched.status_code == 200
    patched = scim.patch("Users", ann["id"], {"op": "replace", "value": {"title": "Boss", "displayName": "A"}})
    assert patched.status_code in (200, 204)
    assert "title" not in scim.stored("Users", ann["id"])
    assert scim.stored("Users", ann["id"])["displayName"] == "A"


@pytest.mark.parametrize("status", [400, 500])
def test_immutable_username_refuses_renames(serve: Callable[..., Client], status: int) -> None:
    scim = serve("immutable_username", rename_status=status)
    ann = scim.user("ann", title="Engineer")
    put = scim.http.put(f"Users/{ann['id']}", json={"schemas": [USER], "userName": "anna"})
    assert (put.status_code, put.json()["scimType"]) == (status, "mutability")
    patched = scim.patch("Users", ann["id"], {"op": "replace", "path": "userName", "value": "anna"})
    assert (patched.status_code, patched.json()["scimType"]) == (status, "mutability")
    assert scim.stored("Users", ann["id"])["userName"] == "ann"
    same = scim.http.put(f"Users/{ann['id']}", json={"schemas": [USER], "userName": "ann", "title": "Boss"})
    assert same.status_code == 200
    assert scim.stored("Users", ann["id"])["title"] == "Boss"


@pytest.mark.parametrize("deviation", sorted(DEVIATIONS))
def test_each_deviation_leaves_ordinary_user_writes_working(serve: Callable[..., Client], deviation: str) -> None:
    """Beside its one deviation, a server creates, reads, patches and deletes a user like scim2-server."""
    scim = serve(deviation)
    ann = scim.user("ann", displayName="Ann")
    assert scim.http.get(f"Users/{ann['id']}").json()["userName"] == "ann"
    patched = scim.patch("Users", ann["id"], {"op": "replace", "path": "displayName", "value": "Ann B"})
    assert patched.status_code in (200, 204)
    assert scim.stored("Users", ann["id"])["displayName"] == "Ann B"
    assert scim.http.delete(f"Users/{ann['id']}").status_code == 204
    assert json.dumps(scim.server.dump()) == json.dumps({"Users": [], "Groups": []})
