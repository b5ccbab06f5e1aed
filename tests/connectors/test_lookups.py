"""Lookups, listings and refusals from a real SCIM server (scim2-server over HTTP), checked as anywhere.

A conformant server's answers must pass every check without teaching the
client a quirk; the checks themselves are tried on odd answers in
tests/unit/test_client.py (respx), since no real server gives those on demand.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from connectors import BearerAuth, Quirks, RetryPolicy, ScimClient, ScimRequest, Unsupported
from provisioner.demo import ScimServer

CORE = "urn:ietf:params:scim:schemas:core:2.0:User"
ENTERPRISE = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"


@pytest.fixture
def people(scim_server: ScimServer) -> dict[str, str]:
    """Five users on the server, by userName: their ids."""
    ids = {}
    headers = {"Authorization": f"Bearer {scim_server.token}"}
    with httpx.Client(base_url=scim_server.base_url + "/", headers=headers, timeout=10) as http:
        for i in range(1, 6):
            user = {"schemas": [CORE, ENTERPRISE], "userName": f"User{i}@Example.com", "externalId": f"E-{i}",
                    "emails": [{"value": f"user{i}@mail.example", "primary": True}],
                    ENTERPRISE: {"employeeNumber": str(700 + i)}}  # fmt: skip
            response = http.post("Users", json=user)
            assert response.status_code == 201, response.text
            ids[user["userName"]] = response.json()["id"]
    return ids


@pytest.fixture
async def client(scim_server: ScimServer) -> AsyncIterator[ScimClient]:
    async with ScimClient(
        scim_server.base_url, auth=BearerAuth(scim_server.token), allow_insecure_http=True,
        retry=RetryPolicy(max_attempts=1), quirks=Quirks(),
    ) as scim:  # fmt: skip
        yield scim


async def test_user_name_is_found_whatever_its_case(client: ScimClient, people: dict[str, str]) -> None:
    found = await client.find("Users", "userName", "user3@example.COM", case_exact=False)

    assert [user["id"] for user in found] == [people["User3@Example.com"]]
    assert client.quirks == Quirks()


async def test_external_id_is_found_only_exactly(client: ScimClient, people: dict[str, str]) -> None:
    assert [u["id"] for u in await client.find("Users", "externalId", "E-2")] == [people["User2@Example.com"]]
    assert await client.find("Users", "externalId", "e-2") == []


async def test_an_extension_attribute_is_found_by_its_urn(client: ScimClient, people: dict[str, str]) -> None:
    found = await client.find("Users", f"{ENTERPRISE}:employeeNumber", "704")

    assert [user["id"] for user in found] == [people["User4@Example.com"]]
    assert client.quirks.filter == "server"


async def test_a_multi_valued_attribute_is_found_by_any_value(client: ScimClient, people: dict[str, str]) -> None:
    found = await client.find("Users", "emails.value", "user5@mail.example")

    assert [user["id"] for user in found] == [people["User5@Example.com"]]


async def test_client_side_matching_finds_what_the_server_filter_finds(
    scim_server: ScimServer, people: dict[str, str]
) -> None:
    """The fallback for targets that ignore filters gives the same answers on an honest one."""
    async with ScimClient(scim_server.base_url, auth=BearerAuth(scim_server.token), allow_insecure_http=True,
                          quirks=Quirks(filter="client")) as scim:  # fmt: skip
        by_name = await scim.find("Users", "userName", "USER1@example.com", case_exact=False)
        by_number = await scim.find("Users", f"{ENTERPRISE}:employeeNumber", "702")
        nobody = await scim.find("Users", "userName", "nobody@example.com", case_exact=False)

    assert [user["id"] for user in by_name] == [people["User1@Example.com"]]
    assert [user["id"] for user in by_number] == [people["User2@Example.com"]]
    assert nobody == []
    assert all("filter" not in str(exchange.url) for exchange in scim.history)


async def test_paging_reads_every_user_once(client: ScimClient, people: dict[str, str]) -> None:
    found = [user["id"] async for user in client.iter_resources("Users", page_size=2)]

    assert sorted(found) == sorted(people.values())
    assert len(client.history) == 3
    assert client.quirks == Quirks()


async def test_paging_asks_only_for_the_attributes_named(client: ScimClient, people: dict[str, str]) -> None:
    found = [user async for user in client.iter_resources("Users", attributes=["userName"], page_size=2)]

    assert sorted(user["userName"] for user in found) == sorted(people)
    assert all("externalId" not in user and "emails" not in user for user in found)


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [pytest.param("DELETE", "Users", 405, id="405-method"), pytest.param("GET", "Me", 501, id="501-not-implemented")],
)
async def test_a_form_the_server_does_not_support_is_unsupported_and_not_retried(
    scim_server: ScimServer, method: str, path: str, status: int
) -> None:
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    async with ScimClient(scim_server.base_url, auth=BearerAuth(scim_server.token), allow_insecure_http=True,
                          retry=RetryPolicy(sleep=sleep)) as scim:  # fmt: skip
        with pytest.raises(Unsupported) as raised:
            await scim.send(ScimRequest(method, path))

    assert (raised.value.status, raised.value.attempts, waits) == (status, 1, [])
    assert raised.value.detail
