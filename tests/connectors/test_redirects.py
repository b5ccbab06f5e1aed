"""Redirects are followed to the same scheme, host and port only; credentials never leave the target."""

from __future__ import annotations

import httpx
import pytest
import respx

from connectors import PermanentError, ScimClient
from tests.connectors.conftest import BASE, USER

USER_URL = f"{BASE}/Users/u1"


@pytest.mark.parametrize(
    "location",
    [
        "https://evil.example/v2/Users/u1",
        "http://scim.example/v2/Users/u1",
        "https://scim.example:8443/v2/Users/u1",
        "//evil.example/v2/Users/u1",
    ],
    ids=["other-host", "other-scheme", "other-port", "scheme-relative-other-host"],
)
async def test_redirect_to_another_origin_is_refused_and_no_credentials_follow(
    target: respx.MockRouter, client: ScimClient, location: str
) -> None:
    target.put(USER_URL).mock(return_value=httpx.Response(307, headers={"Location": location}))
    elsewhere = target.route(url__regex=r"^(?!https://scim\.example/)")
    elsewhere.mock(return_value=httpx.Response(200, json=USER))

    with pytest.raises(PermanentError, match="another origin, not followed") as caught:
        await client.replace("Users", "u1", {"userName": "ada"})

    assert caught.value.status == 307
    assert caught.value.attempts == 1
    assert not elsewhere.called
    assert all(call.request.url.host == "scim.example" for call in target.calls)
    assert [(x.status, x.error) for x in client.history] == [(307, caught.value)]


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_same_origin_redirect_is_followed_keeping_method_body_and_credentials(
    target: respx.MockRouter, client: ScimClient, status: int
) -> None:
    target.put(USER_URL).mock(return_value=httpx.Response(status, headers={"Location": "/v2/Users/u2"}))
    moved = target.put(f"{BASE}/Users/u2").mock(return_value=httpx.Response(200, json={**USER, "id": "u2"}))

    result = await client.replace("Users", "u1", {"userName": "ada"}, etag='W/"1"')

    assert result.id == "u2"
    sent = moved.calls.last.request
    assert sent.headers["Authorization"] == "Bearer static-token"
    assert sent.headers["If-Match"] == 'W/"1"'
    assert sent.content == b'{"userName":"ada","id":"u1"}'
    assert [(x.method, x.url, x.status) for x in client.history] == [
        ("PUT", USER_URL, status),
        ("PUT", f"{BASE}/Users/u2", 200),
    ]


async def test_303_after_a_create_fetches_the_result_with_get(target: respx.MockRouter, client: ScimClient) -> None:
    target.post(f"{BASE}/Users").mock(return_value=httpx.Response(303, headers={"Location": f"{BASE}/Users/u1"}))
    fetched = target.get(USER_URL).mock(return_value=httpx.Response(200, json=USER))

    result = await client.create("Users", {"userName": "ada"})

    assert result.id == "u1"
    request = fetched.calls.last.request
    assert request.content == b"" and "Content-Type" not in request.headers
    assert [(x.method, x.request_body) for x in client.history] == [("POST", {"userName": "ada"}), ("GET", None)]


async def test_too_many_redirects_is_permanent(target: respx.MockRouter, client: ScimClient) -> None:
    target.get(USER_URL).mock(return_value=httpx.Response(302, headers={"Location": USER_URL}))

    with pytest.raises(PermanentError, match="more than 5 redirects"):
        await client.get("Users", "u1")

    assert len(client.history) == 6


async def test_redirect_without_location_is_reported_not_followed(target: respx.MockRouter, client: ScimClient) -> None:
    target.get(USER_URL).mock(return_value=httpx.Response(302))

    with pytest.raises(PermanentError, match="not followed"):
        await client.get("Users", "u1")
