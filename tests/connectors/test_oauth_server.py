"""OAuth 2.0 client credentials against a real token endpoint over HTTP (tokenserver.py)."""

from __future__ import annotations

import asyncio
import traceback
from collections.abc import AsyncIterator, Iterator

import pytest

from connectors import AuthError, OAuth2ClientCredentials, RetryPolicy, ScimClient, TargetLimiter, TransientError
from tests.connectors.tokenserver import CLIENT_ID, CLIENT_SECRET, TokenServer, serve_tokens


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def no_sleep(seconds: float) -> None:
    raise AssertionError(f"nothing here should wait, yet {seconds}s was asked for")


@pytest.fixture
def server() -> Iterator[TokenServer]:
    with serve_tokens() as running:
        yield running


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def limiter() -> TargetLimiter:
    return TargetLimiter(max_concurrency=4)


@pytest.fixture
async def auth(server: TokenServer, clock: Clock, limiter: TargetLimiter) -> AsyncIterator[OAuth2ClientCredentials]:
    async with OAuth2ClientCredentials(
        server.token_url, CLIENT_ID, CLIENT_SECRET, limiter=limiter, clock=clock, allow_insecure_http=True
    ) as credentials:
        yield credentials


@pytest.fixture
async def clients(
    server: TokenServer, auth: OAuth2ClientCredentials, limiter: TargetLimiter
) -> AsyncIterator[list[ScimClient]]:
    """Four workers of one target: one limiter, one token source."""
    workers = [
        ScimClient(
            server.scim_url, auth=auth, limiter=limiter, retry=RetryPolicy(sleep=no_sleep), allow_insecure_http=True
        )
        for _ in range(4)
    ]
    yield workers
    await asyncio.gather(*(worker.aclose() for worker in workers))


async def get_many(clients: list[ScimClient], count: int) -> list[str | None]:
    results = await asyncio.gather(*(clients[i % len(clients)].get("Users", str(i)) for i in range(count)))
    return [result.id for result in results]


async def test_client_secret_basic_fetches_a_token_the_target_accepts(
    server: TokenServer, clients: list[ScimClient]
) -> None:
    result = await clients[0].get("Users", "7")

    assert result.resource == {"id": "7", "userName": "user7"}
    [request] = server.token_requests
    assert request.method == "client_secret_basic"
    assert request.form == {"grant_type": "client_credentials"}
    assert server.presented == ["tok-1"]


@pytest.mark.parametrize("auth_method", ["client_secret_basic", "client_secret_post"])
async def test_scope_and_audience_are_sent_with_either_client_authentication(
    server: TokenServer, auth_method: str
) -> None:
    async with OAuth2ClientCredentials(
        server.token_url,
        CLIENT_ID,
        CLIENT_SECRET,
        auth_method=auth_method,  # type: ignore[arg-type]
        scope="scim.read scim.write",
        audience="https://scim.example",
        allow_insecure_http=True,
    ) as auth:
        assert await auth.token() == "tok-1"

    [request] = server.token_requests
    assert request.method == auth_method
    assert request.form["scope"] == "scim.read scim.write"
    assert request.form["audience"] == "https://scim.example"
    assert ("client_secret" in request.form) == (auth_method == "client_secret_post")


async def test_the_token_is_cached_across_calls_and_clients(server: TokenServer, clients: list[ScimClient]) -> None:
    await get_many(clients, 8)
    await get_many(clients, 8)

    assert len(server.token_requests) == 1
    assert set(server.presented) == {"tok-1"}


async def test_the_token_is_renewed_leeway_seconds_before_it_expires(
    server: TokenServer, auth: OAuth2ClientCredentials, clock: Clock
) -> None:
    assert await auth.token() == "tok-1"  # expires_in 3600, leeway 60

    clock.now = 3539.9
    assert await auth.token() == "tok-1"
    clock.now = 3540.0
    assert await auth.token() == "tok-2"
    assert len(server.token_requests) == 2


async def test_a_short_lived_token_is_used_for_half_its_life_at_least(server: TokenServer, clock: Clock) -> None:
    server.expires_in = 30
    async with OAuth2ClientCredentials(
        server.token_url, CLIENT_ID, CLIENT_SECRET, leeway=60, clock=clock, allow_insecure_http=True
    ) as auth:
        await auth.token()
        clock.now = 14.9
        await auth.token()
        clock.now = 15.0
        await auth.token()

    assert len(server.token_requests) == 2


async def test_twenty_concurrent_calls_with_an_expired_token_make_exactly_one_token_request(
    server: TokenServer, clients: list[ScimClient], clock: Clock
) -> None:
    await clients[0].get("Users", "0")
    clock.now = 3600.0  # the cached token has expired

    ids = await get_many(clients, 20)

    assert ids == [str(i) for i in range(20)]
    assert len(server.token_requests) == 2
    assert server.presented[1:] == ["tok-2"] * 20


async def test_twenty_concurrent_calls_without_a_token_make_exactly_one_token_request(
    server: TokenServer, clients: list[ScimClient]
) -> None:
    await get_many(clients, 20)

    assert len(server.token_requests) == 1


async def test_twenty_concurrent_401s_make_exactly_one_refresh(
    server: TokenServer, clients: list[ScimClient]
) -> None:
    await clients[0].get("Users", "0")
    server.revoke_all()  # e.g. the target rotated its signing key

    ids = await get_many(clients, 20)

    assert ids == [str(i) for i in range(20)]
    assert len(server.token_requests) == 2
    statuses = [exchange.status for client in clients for exchange in client.history]
    refused = server.presented[1:].count("tok-1")
    # Every call either had the new token or was refused once with the old one, then retried.
    assert statuses.count(200) == 21
    assert statuses.count(401) == refused
    assert server.presented[1:].count("tok-2") == 20


async def test_wrong_credentials_are_an_auth_error_that_does_not_repeat_the_secret(server: TokenServer) -> None:
    wrong = "wrong-" + CLIENT_SECRET
    async with OAuth2ClientCredentials(server.token_url, CLIENT_ID, wrong, allow_insecure_http=True) as auth:
        with pytest.raises(AuthError) as caught:
            await auth.token()

    error = caught.value
    assert error.status == 401 and "invalid_client" in str(error)
    assert "***" in (error.detail or "")
    logged = "".join(traceback.format_exception(error))
    for text in (str(error), repr(error), error.detail or "", error.response_body or "", logged):
        assert wrong not in text


async def test_a_token_endpoint_that_is_down_is_transient(server: TokenServer, auth: OAuth2ClientCredentials) -> None:
    server.canned.append((503, {"error": "temporarily_unavailable"}, {"Retry-After": "2"}))

    with pytest.raises(TransientError) as caught:
        await auth.token()

    assert caught.value.status == 503
    assert caught.value.retry_after == 2.0
    assert await auth.token() == "tok-2"
