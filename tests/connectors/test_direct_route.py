"""Requests sent straight to httpx's transport are the ones ``AsyncClient`` would have sent.

The client builds its requests itself when its authentication is a header
(none, a bearer token, a token source) and hands them to the transport httpx
would have chosen. These tests hold that to what httpx builds, header for
header, and check the cases that must stay on httpx's own path.
"""

from __future__ import annotations

import httpx
import pytest

from connectors import BearerAuth, ScimClient
from connectors._client import _ClientRoute, _DirectRoute

BASE = "https://scim.example.test/v2"
TOKEN = "direct-route-token-0123456789"


def httpx_built(client: ScimClient, method: str, path: str, **kwargs: object) -> httpx.Request:
    """What the client's AsyncClient builds and its BearerAuth signs."""
    request = client._http.build_request(method, path, **kwargs)  # type: ignore[arg-type]
    next(BearerAuth(TOKEN).auth_flow(request))
    return request


@pytest.mark.parametrize(
    ("method", "path", "content", "params", "headers"),
    [
        ("GET", "Users", None, {"filter": 'userName eq "a b\\"c ü"', "count": 5}, {}),
        ("GET", "Users/a%2Fb%20c", None, None, {}),
        ("POST", "Users", b'{"userName":"x"}', None, {"Content-Type": "application/scim+json"}),
        ("PATCH", "Users/1", b'{"a":1}', None, {"Content-Type": "application/scim+json", "If-Match": 'W/"1"'}),
        ("GET", "/Schemas", None, None, {}),
        ("GET", f"{BASE}/Users/1", None, None, {}),
        ("DELETE", "Groups/9", None, None, {"accept": "application/json"}),
    ],
)
def test_a_request_is_built_as_httpx_builds_it(
    method: str, path: str, content: bytes | None, params: dict[str, object] | None, headers: dict[str, str]
) -> None:
    client = ScimClient(BASE, auth=BearerAuth(TOKEN))
    assert isinstance(client._route, _DirectRoute)

    ours = client._route.request(method, path, content, params, headers)
    theirs = httpx_built(client, method, path, content=content, params=params, headers=headers)

    assert ours.url == theirs.url
    assert sorted(ours.headers.multi_items()) == sorted(theirs.headers.multi_items())
    assert ours.content == theirs.content and ours.extensions == theirs.extensions


def test_a_proxy_named_in_the_environment_is_still_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example.test:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    client = ScimClient(BASE, auth=BearerAuth(TOKEN))
    assert isinstance(client._route, _DirectRoute)
    assert client._route.transport is client._http._transport_for_url(httpx.URL(BASE))
    assert client._route.transport is not client._http._transport  # the proxy's, not the direct pool


async def test_another_httpx_auth_goes_through_httpx() -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"schemas": [], "patch": {"supported": True}})

    client = ScimClient(BASE, auth=httpx.BasicAuth("user", "pass"), transport=httpx.MockTransport(answer))
    assert isinstance(client._route, _ClientRoute)
    async with client:
        await client.capabilities()
    assert seen[0].headers["Authorization"].startswith("Basic ")
