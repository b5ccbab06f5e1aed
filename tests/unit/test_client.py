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
    Quirks,
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
async def test_an_empty_page_short_of_total_results_is_an_invalid_response_not_absent(
    respx_mock: respx.MockRouter, client: ScimClient
) -> None:
    """A listing that stops before what totalResults announced cannot be read as "the rest is absent"."""

    def page(request: httpx.Request) -> httpx.Response:
        start = int(request.url.params["startIndex"])
        return listing(USERS[:2] if start in (0, 1) else [], 1000, start)

    respx_mock.get("/Users").mock(side_effect=page)

    found: list[str] = []
    with pytest.raises(InvalidResponse, match="2 of the 1000"):
        async for user in client.iter_resources("Users", page_size=2):
            found.append(user["id"])

    assert found == ["u1", "u2"]


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


# --- lookups are checked, not believed (RFC 7644 §3.4.2.2) ----------------------------------------

ADMIN = {"id": "a1", "userName": "it-admin@example.com"}


def filtered(request: httpx.Request) -> str | None:
    return request.url.params.get("filter")


@respx.mock(base_url=BASE)
async def test_find_never_returns_an_unrelated_account_from_a_target_that_ignores_filters(
    respx_mock: respx.MockRouter, client: ScimClient
) -> None:
    """The worst case: a joiner's lookup answered with every account, an admin first."""
    everyone = [ADMIN, *USERS]
    route = respx_mock.get("/Users").mock(return_value=listing(everyone, len(everyone), 1))
    learned: list[tuple[str, object, str]] = []
    client.quirks.on_learn = lambda name, value, reason: learned.append((name, value, reason))

    found = await client.find("Users", "userName", "USER3@example.com", case_exact=False)

    assert [user["id"] for user in found] == ["u3"]
    assert client.quirks.filter == "client"
    assert [(name, value) for name, value, _ in learned] == [("filter", "client")]
    assert "USER3" not in learned[0][2]  # the reason names the attribute, never the value
    # The first answer gave it away; the fallback paged through without a filter.
    assert [filtered(call.request) for call in route.calls] == ['userName eq "USER3@example.com"', None]


@respx.mock(base_url=BASE)
async def test_find_for_an_absent_value_on_a_target_that_ignores_filters_finds_nothing(
    respx_mock: respx.MockRouter, client: ScimClient
) -> None:
    respx_mock.get("/Users").mock(return_value=listing([ADMIN], 1, 1))

    assert await client.find("Users", "userName", "new.joiner@example.com", case_exact=False) == []
    assert client.quirks.filter == "client"


@respx.mock(base_url=BASE)
async def test_find_on_a_target_known_to_ignore_filters_sends_no_filter(respx_mock: respx.MockRouter) -> None:
    route = respx_mock.get("/Users").mock(return_value=listing([ADMIN, *USERS], 6, 1))
    async with ScimClient(BASE, auth=BearerAuth(TOKEN), quirks=Quirks(filter="client")) as scim:
        found = await scim.find("Users", "userName", "user2@example.com")

    assert [user["id"] for user in found] == ["u2"]
    assert [filtered(call.request) for call in route.calls] == [None]


@respx.mock(base_url=BASE)
async def test_find_drops_duplicates_by_id_and_keeps_every_real_match(
    respx_mock: respx.MockRouter, client: ScimClient
) -> None:
    sales = {"id": "g1", "displayName": "Sales"}
    twins = [sales, dict(sales), {"id": "g2", "displayName": "Sales"}]
    respx_mock.get("/Groups").mock(return_value=listing(twins, 3, 1))

    found = await client.find("Groups", "displayName", "Sales")

    assert [group["id"] for group in found] == ["g1", "g2"]
    assert client.quirks.filter == "server"


@respx.mock(base_url=BASE)
async def test_find_case_exact_drops_a_result_that_differs_only_by_case_without_learning(
    respx_mock: respx.MockRouter, client: ScimClient
) -> None:
    """externalId is caseExact: "E-7" is not "e-7", but a target comparing without case is not ignoring filters."""
    respx_mock.get("/Users").mock(return_value=listing([{"id": "u9", "externalId": "e-7"}], 1, 1))

    assert await client.find("Users", "externalId", "E-7") == []
    assert client.quirks.filter == "server"


@respx.mock(base_url=BASE)
async def test_find_matches_a_multi_valued_and_an_extension_attribute(
    respx_mock: respx.MockRouter, client: ScimClient
) -> None:
    enterprise = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
    user = {"id": "u7", "emails": [{"value": "a@x.test"}, {"value": "ada@example.com", "primary": True}],
            enterprise: {"employeeNumber": "701"}}  # fmt: skip
    respx_mock.get("/Users").mock(return_value=listing([user], 1, 1))

    assert await client.find("Users", "emails.value", "ADA@example.com", case_exact=False) == [user]
    assert await client.find("Users", f"{enterprise}:employeeNumber", "701") == [user]
    assert client.quirks.filter == "server"


@respx.mock(base_url=BASE)
async def test_find_matches_client_side_when_the_target_refuses_the_filter(
    respx_mock: respx.MockRouter, client: ScimClient
) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        if filtered(request):
            return httpx.Response(400, json={"scimType": "invalidFilter", "detail": "unsupported attribute"})
        return listing([ADMIN, *USERS], 6, 1)

    respx_mock.get("/Users").mock(side_effect=answer)

    found = await client.find("Users", "nickName", "x")

    assert found == []
    assert client.quirks.filter == "server"


# --- robust paging (RFC 7644 §3.4.2.4) ------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 500])
@respx.mock(base_url=BASE)
async def test_a_target_that_refuses_count_is_paged_without_it_and_remembered(
    respx_mock: respx.MockRouter, client: ScimClient, status: int
) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        if "count" in request.url.params:
            return httpx.Response(status)
        return listing(USERS, len(USERS), 1)

    route = respx_mock.get("/Users").mock(side_effect=answer)

    first = [user["id"] async for user in client.iter_resources("Users", page_size=2)]
    again = [user["id"] async for user in client.iter_resources("Users", page_size=2)]

    assert first == again == [user["id"] for user in USERS]
    assert client.quirks.page_count is False
    sent_count = ["count" in call.request.url.params for call in route.calls]
    # 500 is retried by the policy first (3 attempts), 400 is not; then never again.
    assert sent_count == [True] * (3 if status == 500 else 1) + [False, False]


@respx.mock(base_url=BASE)
async def test_a_target_counting_start_index_from_0_loses_no_one(
    respx_mock: respx.MockRouter, client: ScimClient
) -> None:
    def page(request: httpx.Request) -> httpx.Response:
        offset, count = int(request.url.params["startIndex"]), int(request.url.params["count"])
        return listing(USERS[offset : offset + count], len(USERS), offset)

    respx_mock.get("/Users").mock(side_effect=page)

    found = [user["id"] async for user in client.iter_resources("Users", page_size=2)]

    assert sorted(found) == ["u1", "u2", "u3", "u4", "u5"]


@respx.mock(base_url=BASE)
async def test_overlapping_pages_yield_each_resource_once(respx_mock: respx.MockRouter, client: ScimClient) -> None:
    """A target whose pages start one item early repeats the last item of each page."""

    def page(request: httpx.Request) -> httpx.Response:
        start, count = int(request.url.params["startIndex"]), int(request.url.params["count"])
        offset = max(start - 2, 0)
        return listing(USERS[offset : offset + count], len(USERS), start)

    respx_mock.get("/Users").mock(side_effect=page)

    found = [user["id"] async for user in client.iter_resources("Users", page_size=2)]

    assert found == ["u1", "u2", "u3", "u4", "u5"]


@respx.mock(base_url=BASE)
async def test_a_repeated_page_ends_the_listing_without_duplicates(
    respx_mock: respx.MockRouter, client: ScimClient
) -> None:
    """A target that ignores startIndex, without totalResults: the second page is the first again."""
    body = {"schemas": [LIST_SCHEMA], "Resources": USERS[:2]}
    route = respx_mock.get("/Users").mock(return_value=httpx.Response(200, json=body))

    found = [user["id"] async for user in client.iter_resources("Users", page_size=2)]

    assert found == ["u1", "u2"]
    assert route.call_count == 2


@respx.mock(base_url=BASE)
async def test_a_repeated_page_short_of_total_results_is_an_invalid_response(
    respx_mock: respx.MockRouter, client: ScimClient
) -> None:
    respx_mock.get("/Users").mock(return_value=listing(USERS[:2], len(USERS), 1))

    with pytest.raises(InvalidResponse, match="2 of the 5"):
        [user async for user in client.iter_resources("Users", page_size=2)]


@respx.mock(base_url=BASE)
async def test_without_total_results_paging_goes_on_past_short_pages_until_an_empty_one(
    respx_mock: respx.MockRouter, client: ScimClient
) -> None:
    """A target may cap count at its own maximum (here 2 of the 3 asked): a short page is not the end."""

    def page(request: httpx.Request) -> httpx.Response:
        start = int(request.url.params["startIndex"])
        return httpx.Response(200, json={"schemas": [LIST_SCHEMA], "Resources": USERS[start - 1 : start + 1]})

    route = respx_mock.get("/Users").mock(side_effect=page)

    found = [user["id"] async for user in client.iter_resources("Users", page_size=3)]

    assert found == ["u1", "u2", "u3", "u4", "u5"]
    assert route.call_count == 4


@respx.mock(base_url=BASE)
async def test_a_target_that_pages_forever_is_stopped(respx_mock: respx.MockRouter) -> None:
    def page(request: httpx.Request) -> httpx.Response:
        start = int(request.url.params["startIndex"])
        return listing([{"id": f"x{start}"}], 10**9, start)

    respx_mock.get("/Users").mock(side_effect=page)

    async with ScimClient(BASE, auth=BearerAuth(TOKEN), max_pages=50) as scim:
        with pytest.raises(InvalidResponse, match="50 pages"):
            [user async for user in scim.iter_resources("Users", page_size=1)]


@respx.mock(base_url=BASE)
async def test_iter_resources_asks_for_attributes(respx_mock: respx.MockRouter, client: ScimClient) -> None:
    route = respx_mock.get("/Groups").mock(return_value=listing([], 0, 1))

    assert [g async for g in client.iter_resources("Groups", attributes=["displayName", "members"])] == []

    assert route.calls.last.request.url.params["attributes"] == "displayName,members"


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"schemas": [LIST_SCHEMA], "totalResults": 3}, id="no-Resources"),
        pytest.param({"schemas": [LIST_SCHEMA]}, id="nothing-at-all"),
        pytest.param({"totalResults": 1, "Resources": {"id": "u1"}}, id="Resources-not-a-list"),
        pytest.param({"totalResults": 1, "Resources": [{"userName": "x"}]}, id="item-without-id"),
        pytest.param({"totalResults": 1, "Resources": ["u1"]}, id="item-not-an-object"),
    ],
)
@respx.mock(base_url=BASE)
async def test_a_list_answer_of_the_wrong_shape_is_an_invalid_response(
    respx_mock: respx.MockRouter, single_try: ScimClient, body: dict[str, object]
) -> None:
    respx_mock.get("/Users").mock(return_value=httpx.Response(200, json=body))

    with pytest.raises(InvalidResponse):
        await single_try.find("Users", "userName", "ada@example.com")


@respx.mock(base_url=BASE)
async def test_an_empty_list_may_leave_out_resources(respx_mock: respx.MockRouter, single_try: ScimClient) -> None:
    respx_mock.get("/Users").mock(return_value=httpx.Response(200, json={"schemas": [LIST_SCHEMA], "totalResults": 0}))

    assert await single_try.find("Users", "userName", "ada@example.com") == []


# --- capabilities: garbage is not "no PATCH, no ETags" ----------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(httpx.Response(200, json={"error": "maintenance"}), id="another-object"),
        pytest.param(httpx.Response(200, json={"patch": True, "etag": "yes"}), id="sections-not-objects"),
        pytest.param(httpx.Response(200, content=b""), id="empty"),
        pytest.param(httpx.Response(200, json=[{"patch": {"supported": True}}]), id="a-list"),
        pytest.param(httpx.Response(200, text="<html>login</html>"), id="html"),
    ],
)
@respx.mock(base_url=BASE)
async def test_a_service_provider_config_that_is_not_one_is_an_invalid_response(
    respx_mock: respx.MockRouter, single_try: ScimClient, answer: httpx.Response
) -> None:
    """Taking garbage for "no PATCH, no ETags" would switch every update to PUT without If-Match."""
    respx_mock.get("/ServiceProviderConfig").mock(return_value=answer)

    with pytest.raises(InvalidResponse):
        await single_try.capabilities()


@pytest.mark.parametrize("status", [404, 501])
@respx.mock(base_url=BASE)
async def test_no_service_provider_config_endpoint_means_defaults(
    respx_mock: respx.MockRouter, single_try: ScimClient, status: int
) -> None:
    respx_mock.get("/ServiceProviderConfig").mock(return_value=httpx.Response(status))

    assert await single_try.capabilities() == Capabilities()


@respx.mock(base_url=BASE)
async def test_a_500_after_count_was_answered_is_an_outage_not_a_quirk(
    respx_mock: respx.MockRouter, single_try: ScimClient
) -> None:
    respx_mock.get("/Users").mock(side_effect=[listing(USERS, len(USERS), 1), httpx.Response(500)])

    assert len([user async for user in single_try.iter_resources("Users")]) == len(USERS)
    with pytest.raises(TransientError):
        [user async for user in single_try.iter_resources("Users")]

    assert single_try.quirks.page_count is True
