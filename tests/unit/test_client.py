"""The SCIM client on answers a real server will not give on demand (respx).

Malformed JSON on a 201, a 503, a 500 with a SCIM error body, a listing split
into pages. Retries never wait for real time: the policy's sleep is recorded.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import respx

from connectors import (
    BearerAuth,
    Capabilities,
    InvalidResponse,
    PermanentError,
    RetryPolicy,
    ScimClient,
    TransientError,
)

BASE = "https://scim.example.test/v2"
TOKEN = "client-test-token-0123456789"
LIST_SCHEMA = "urn:ietf:params:scim:api:messages:2.0:ListResponse"


class Sleeps:
    """Records the waits a retry policy asks for instead of waiting."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
async def client(sleeps: Sleeps) -> AsyncIterator[ScimClient]:
    async with ScimClient(BASE, auth=BearerAuth(TOKEN), retry=RetryPolicy(max_attempts=3, sleep=sleeps)) as scim:
        yield scim


@pytest.fixture
async def single_try(sleeps: Sleeps) -> AsyncIterator[ScimClient]:
    """A client that never retries: the answer to one request is what the test sees."""
    async with ScimClient(BASE, auth=BearerAuth(TOKEN), retry=RetryPolicy(max_attempts=1, sleep=sleeps)) as scim:
        yield scim


def listing(resources: list[dict[str, Any]], total: int, start: int) -> httpx.Response:
    body = {"schemas": [LIST_SCHEMA], "totalResults": total, "startIndex": start, "itemsPerPage": len(resources),
            "Resources": resources}  # fmt: skip
    return httpx.Response(200, json=body)


USERS = [{"id": f"u{i}", "userName": f"user{i}@example.com"} for i in range(1, 6)]


# --- pagination ---------------------------------------------------------------------------------


@respx.mock(base_url=BASE)
async def test_iter_resources_follows_total_results_page_by_page(respx_mock: respx.MockRouter, client: ScimClient) -> None:
    starts: list[int] = []

    def page(request: httpx.Request) -> httpx.Response:
        start, count = int(request.url.params["startIndex"]), int(request.url.params["count"])
        starts.append(start)
        return listing(USERS[start - 1 : start - 1 + count], len(USERS), start)

    respx_mock.get("/Users").mock(side_effect=page)

    found = [user["id"] async for user in client.iter_resources("Users", page_size=2)]

    assert found == ["u1", "u2", "u3", "u4", "u5"]
    assert starts == [1, 3, 5]


@respx.mock(base_url=BASE)
async def test_iter_resources_takes_everything_from_a_server_that_ignores_count(
    respx_mock: respx.MockRouter, client: ScimClient
) -> None:
    route = respx_mock.get("/Users").mock(return_value=listing(USERS, len(USERS), 1))

    found = [user["id"] async for user in client.iter_resources("Users", page_size=2)]

    assert found == [user["id"] for user in USERS]
    assert route.call_count == 1


@respx.mock(base_url=BASE)
async def test_iter_resources_stops_on_an_empty_page_whatever_total_results_says(
    respx_mock: respx.MockRouter, client: ScimClient
) -> None:
    def page(request: httpx.Request) -> httpx.Response:
        start = int(request.url.params["startIndex"])
        return listing(USERS[:2] if start == 1 else [], 1000, start)

    route = respx_mock.get("/Users").mock(side_effect=page)

    found = [user["id"] async for user in client.iter_resources("Users", page_size=2)]

    assert found == ["u1", "u2"]
    assert route.call_count == 2


@respx.mock(base_url=BASE)
async def test_find_sends_the_value_escaped_in_an_eq_filter(respx_mock: respx.MockRouter, client: ScimClient) -> None:
    route = respx_mock.get("/Users").mock(return_value=listing([], 0, 1))

    assert await client.find("Users", "userName", 'o"brien\\x@example.com') == []

    sent = route.calls.last.request.url.params["filter"]
    assert sent == 'userName eq "o\\"brien\\\\x@example.com"'


# --- edge-case answers ----------------------------------------------------------------------------


@respx.mock(base_url=BASE)
async def test_malformed_json_on_201_is_an_invalid_response(respx_mock: respx.MockRouter, single_try: ScimClient) -> None:
    respx_mock.post("/Users").mock(
        return_value=httpx.Response(201, content=b'{"id": "u1", "userName": ', headers={"Content-Type": "application/scim+json"})
    )

    with pytest.raises(InvalidResponse) as raised:
        await single_try.create("Users", {"userName": "ada@example.com"})

    assert isinstance(raised.value, TransientError)
    assert raised.value.status == 201
    assert raised.value.response_body == '{"id": "u1", "userName": '
    [exchange] = single_try.history
    assert (exchange.method, exchange.status) == ("POST", 201)


@respx.mock(base_url=BASE)
async def test_503_is_transient_and_retried_without_waiting_for_real(
    respx_mock: respx.MockRouter, client: ScimClient, sleeps: Sleeps
) -> None:
    route = respx_mock.post("/Users").mock(return_value=httpx.Response(503, text="Service Unavailable"))

    with pytest.raises(TransientError) as raised:
        await client.create("Users", {"userName": "ada@example.com"})

    assert raised.value.status == 503
    assert route.call_count == 3
    assert len(sleeps.waits) == 2
    assert [exchange.status for exchange in client.history] == [503, 503, 503]


@respx.mock(base_url=BASE)
async def test_503_then_success_creates_the_resource(
    respx_mock: respx.MockRouter, client: ScimClient, sleeps: Sleeps
) -> None:
    respx_mock.post("/Users").mock(
        side_effect=[httpx.Response(503), httpx.Response(201, json={"id": "u1", "userName": "ada@example.com"})]
    )

    result = await client.create("Users", {"userName": "ada@example.com"})

    assert result.id == "u1"
    assert len(sleeps.waits) == 1


@respx.mock(base_url=BASE)
async def test_500_with_a_scim_error_body_keeps_scim_type_and_detail(
    respx_mock: respx.MockRouter, single_try: ScimClient
) -> None:
    body = {"schemas": ["urn:ietf:params:scim:api:messages:2.0:Error"], "status": "500", "scimType": "invalidValue",
            "detail": "backend directory unavailable"}  # fmt: skip
    respx_mock.put("/Users/u1").mock(return_value=httpx.Response(500, json=body))

    with pytest.raises(TransientError) as raised:
        await single_try.replace("Users", "u1", {"userName": "ada@example.com"})

    error = raised.value
    assert (error.status, error.scim_type, error.detail) == (500, "invalidValue", "backend directory unavailable")
    assert error.request is not None and error.request.url == f"{BASE}/Users/u1"


@respx.mock(base_url=BASE)
async def test_400_is_permanent_and_not_retried(respx_mock: respx.MockRouter, client: ScimClient, sleeps: Sleeps) -> None:
    route = respx_mock.post("/Users").mock(
        return_value=httpx.Response(400, json={"scimType": "invalidValue", "detail": "bad"})
    )

    with pytest.raises(PermanentError):
        await client.create("Users", {"userName": "x"})

    assert route.call_count == 1
    assert sleeps.waits == []


@respx.mock(base_url=BASE)
async def test_requests_carry_the_token_but_history_never_does(
    respx_mock: respx.MockRouter, single_try: ScimClient
) -> None:
    route = respx_mock.post("/Users").mock(return_value=httpx.Response(201, json={"id": "u1"}))

    await single_try.create("Users", {"userName": "ada@example.com"})

    assert route.calls.last.request.headers["Authorization"] == f"Bearer {TOKEN}"
    assert route.calls.last.request.headers["Content-Type"] == "application/scim+json"
    assert json.loads(route.calls.last.request.content) == {"userName": "ada@example.com"}
    assert TOKEN not in repr(single_try.history)


@respx.mock(base_url=BASE)
async def test_patch_sends_a_patch_op_with_if_match(respx_mock: respx.MockRouter, single_try: ScimClient) -> None:
    route = respx_mock.patch("/Users/u1").mock(return_value=httpx.Response(204))

    await single_try.patch("Users", "u1", [{"op": "replace", "path": "active", "value": False}], etag='W/"3"')

    request = route.calls.last.request
    assert request.headers["If-Match"] == 'W/"3"'
    assert json.loads(request.content)["Operations"] == [{"op": "replace", "path": "active", "value": False}]


# --- capabilities --------------------------------------------------------------------------------


@respx.mock(base_url=BASE)
async def test_capabilities_come_from_the_service_provider_config(
    respx_mock: respx.MockRouter, single_try: ScimClient
) -> None:
    respx_mock.get("/ServiceProviderConfig").mock(
        return_value=httpx.Response(
            200, json={"patch": {"supported": True}, "etag": {"supported": False}, "filter": {"supported": True, "maxResults": 50}}
        )
    )

    assert await single_try.capabilities() == Capabilities(patch=True, etag=False, filter=True, max_results=50)


@respx.mock(base_url=BASE)
async def test_a_target_without_a_service_provider_config_gets_safe_defaults(
    respx_mock: respx.MockRouter, single_try: ScimClient
) -> None:
    respx_mock.get("/ServiceProviderConfig").mock(return_value=httpx.Response(404))

    assert await single_try.capabilities() == Capabilities(patch=False, etag=False)
