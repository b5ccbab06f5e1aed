"""A 401 earns one token refresh, never a storm; OAuth 2.0 token errors map onto the error tree."""

from __future__ import annotations

import subprocess
import sys
import traceback
from collections.abc import AsyncIterator

import httpx
import pytest
import respx

from connectors import (
    AuthError,
    BearerAuth,
    InvalidResponse,
    OAuth2ClientCredentials,
    RateLimit,
    RetryPolicy,
    ScimClient,
    TargetLimiter,
    TokenSource,
    TransientError,
)
from tests.connectors.clock import VirtualClock
from tests.connectors.conftest import BASE, TOKEN_URL, USER

USER_URL = f"{BASE}/Users/u1"
SECRET = "very-secret-value"


def token_response(n: int, expires_in: int = 3600) -> httpx.Response:
    return httpx.Response(200, json={"access_token": f"tok-{n}", "token_type": "Bearer", "expires_in": expires_in})


@pytest.fixture
def token_route(target: respx.MockRouter) -> respx.Route:
    return target.post(TOKEN_URL).mock(side_effect=[token_response(n) for n in range(1, 10)])


@pytest.fixture
async def oauth(limiter: TargetLimiter, clock: VirtualClock) -> AsyncIterator[OAuth2ClientCredentials]:
    async with OAuth2ClientCredentials(TOKEN_URL, "provisioner", SECRET, limiter=limiter, clock=clock) as auth:
        yield auth


@pytest.fixture
async def oauth_client(
    oauth: OAuth2ClientCredentials, policy: RetryPolicy, limiter: TargetLimiter
) -> AsyncIterator[ScimClient]:
    async with ScimClient(BASE, auth=oauth, retry=policy, limiter=limiter) as client:
        yield client


def bearer(route: respx.Route) -> list[str]:
    return [call.request.headers.get("Authorization", "") for call in route.calls]


async def test_401_refreshes_the_token_once_then_succeeds(
    target: respx.MockRouter, token_route: respx.Route, oauth_client: ScimClient, clock: VirtualClock
) -> None:
    route = target.get(USER_URL).mock(side_effect=[httpx.Response(401), httpx.Response(200, json=USER)])

    result = await oauth_client.get("Users", "u1")

    assert result.id == "u1"
    assert token_route.call_count == 2
    assert bearer(route) == ["Bearer tok-1", "Bearer tok-2"]
    assert [x.status for x in oauth_client.history] == [401, 200]
    assert clock.slept["retry"] == []  # a refresh is not a backoff


async def test_a_second_401_is_an_auth_error_without_a_storm(
    target: respx.MockRouter, token_route: respx.Route, oauth_client: ScimClient
) -> None:
    route = target.get(USER_URL).mock(return_value=httpx.Response(401))

    with pytest.raises(AuthError) as caught:
        await oauth_client.get("Users", "u1")

    assert caught.value.status == 401
    assert caught.value.attempts == 2
    assert route.call_count == 2
    assert token_route.call_count == 2


async def test_one_refresh_per_call_even_across_retries(
    target: respx.MockRouter, token_route: respx.Route, oauth_client: ScimClient
) -> None:
    target.get(USER_URL).mock(side_effect=[httpx.Response(401), httpx.Response(503), httpx.Response(401)])

    with pytest.raises(AuthError) as caught:
        await oauth_client.get("Users", "u1")

    assert [x.status for x in oauth_client.history] == [401, 503, 401]
    assert caught.value.attempts == 3
    assert token_route.call_count == 2


async def test_a_static_bearer_token_cannot_refresh_so_401_fails_at_once(
    target: respx.MockRouter, client: ScimClient
) -> None:
    target.get(USER_URL).mock(return_value=httpx.Response(401))

    with pytest.raises(AuthError) as caught:
        await client.get("Users", "u1")

    assert caught.value.attempts == 1
    assert len(client.history) == 1


async def test_token_requests_go_through_the_target_limiter(
    target: respx.MockRouter, clock: VirtualClock, policy: RetryPolicy
) -> None:
    limiter = TargetLimiter(rate_limit=RateLimit.per_second(1), clock=clock, sleep=clock.sleeper("limiter"))
    times: dict[str, float] = {}

    def at(name: str, response: httpx.Response):  # type: ignore[no-untyped-def]
        def respond(request: httpx.Request) -> httpx.Response:
            times[name] = clock()
            return response

        return respond

    target.post(TOKEN_URL).mock(side_effect=at("token", token_response(1)))
    target.get(USER_URL).mock(side_effect=at("scim", httpx.Response(200, json=USER)))
    async with OAuth2ClientCredentials(TOKEN_URL, "provisioner", SECRET, limiter=limiter, clock=clock) as auth:
        async with ScimClient(BASE, auth=auth, retry=policy, limiter=limiter) as client:
            await client.get("Users", "u1")

    assert times == {"token": 0.0, "scim": 1.0}


async def test_a_busy_token_endpoint_is_transient_and_retried_with_backoff(
    target: respx.MockRouter, oauth_client: ScimClient, clock: VirtualClock
) -> None:
    tokens = target.post(TOKEN_URL).mock(
        side_effect=[httpx.Response(503), httpx.Response(429, headers={"Retry-After": "3"}), token_response(1)]
    )
    target.get(USER_URL).mock(return_value=httpx.Response(200, json=USER))

    await oauth_client.get("Users", "u1")

    assert tokens.call_count == 3
    assert len(clock.slept["retry"]) == 2 and clock.slept["retry"][1] == 3.0


async def test_an_unreachable_token_endpoint_is_transient(
    target: respx.MockRouter, oauth: OAuth2ClientCredentials
) -> None:
    target.post(TOKEN_URL).mock(side_effect=httpx.ConnectError("refused"))

    with pytest.raises(TransientError, match="token request failed"):
        await oauth.token()


async def test_refused_client_credentials_are_an_auth_error_without_the_secret(
    target: respx.MockRouter, oauth: OAuth2ClientCredentials
) -> None:
    target.post(TOKEN_URL).mock(
        return_value=httpx.Response(
            401, json={"error": "invalid_client", "error_description": f"bad secret {SECRET}"}
        )
    )

    with pytest.raises(AuthError) as caught:
        await oauth.token()

    error = caught.value
    assert error.status == 401
    assert "invalid_client" in str(error)
    logged = "".join(traceback.format_exception(error))
    kept = (str(error), repr(error), error.detail or "", error.response_body or "", str(error.request), logged)
    for text in kept:
        assert SECRET not in text


@pytest.mark.parametrize(
    ("response", "error"),
    [
        (httpx.Response(200, json={"token_type": "Bearer"}), InvalidResponse),
        (httpx.Response(200, text="<html>login</html>"), InvalidResponse),
        (httpx.Response(200, json={"access_token": "x", "token_type": "mac"}), AuthError),
        (httpx.Response(400, text="bad request"), AuthError),
        (httpx.Response(502, text="bad gateway"), TransientError),
    ],
    ids=["no-access-token", "not-json", "not-bearer", "4xx-not-json", "5xx"],
)
async def test_token_endpoint_failures_map_onto_the_error_tree(
    target: respx.MockRouter, oauth: OAuth2ClientCredentials, response: httpx.Response, error: type[Exception]
) -> None:
    target.post(TOKEN_URL).mock(return_value=response)

    with pytest.raises(error) as caught:
        await oauth.token()

    assert type(caught.value) is error


async def test_client_secret_post_sends_the_secret_in_the_form(target: respx.MockRouter) -> None:
    route = target.post(TOKEN_URL).mock(return_value=token_response(1))
    async with OAuth2ClientCredentials(
        TOKEN_URL, "provisioner", SECRET, auth_method="client_secret_post", scope=["scim:read", "scim:write"]
    ) as auth:
        assert await auth.token() == "tok-1"

    request = route.calls.last.request
    assert "Authorization" not in request.headers
    form = dict(httpx.QueryParams(request.content.decode()))
    assert form == {
        "grant_type": "client_credentials",
        "scope": "scim:read scim:write",
        "client_id": "provisioner",
        "client_secret": SECRET,
    }


def test_the_secret_never_appears_in_repr_or_str() -> None:
    auth = OAuth2ClientCredentials(TOKEN_URL, "provisioner", SECRET, scope="scim", audience="https://api.example")

    assert SECRET not in repr(auth) and SECRET not in str(auth)
    assert "client_secret=***" in repr(auth)
    assert repr(BearerAuth(SECRET)) == "BearerAuth(token=***)"


def test_oauth_client_credentials_is_a_token_source() -> None:
    assert isinstance(OAuth2ClientCredentials(TOKEN_URL, "id", SECRET), TokenSource)
    assert not isinstance(BearerAuth("x"), TokenSource)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((TOKEN_URL, "", SECRET), "client_id is empty"),
        ((TOKEN_URL, "id", ""), "client_secret for client 'id' is empty"),
    ],
)
def test_oauth_settings_are_checked(args: tuple[str, str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        OAuth2ClientCredentials(*args)


def test_unknown_auth_method_is_refused() -> None:
    with pytest.raises(ValueError, match="client_secret_basic, client_secret_post"):
        OAuth2ClientCredentials(TOKEN_URL, "id", SECRET, auth_method="private_key_jwt")  # type: ignore[arg-type]


def test_importing_connectors_raises_no_warning_even_when_warnings_are_errors() -> None:
    """Authlib's "prefer httpx2" notice is handled where Authlib is imported, not hidden globally."""
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", "import connectors"],
        capture_output=True,
        text=True,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_other_authlib_deprecations_are_still_shown() -> None:
    code = (
        "import warnings, connectors\n"
        "from authlib.deprecate import deprecate\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    deprecate('something else is deprecated')\n"
        "print(len(seen))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)

    assert result.stdout.strip() == "1"
