"""ScimClient.send applies the RetryPolicy: status by status, with recorded (virtual) sleeps."""

from __future__ import annotations

from datetime import timedelta
from email.utils import format_datetime

import httpx
import pytest
import respx

from connectors import (
    Conflict,
    InvalidResponse,
    NotFound,
    PermanentError,
    PreconditionFailed,
    RetryPolicy,
    ScimClient,
    TargetLimiter,
    TransientError,
    Unsupported,
)
from tests.connectors.clock import VirtualClock
from tests.connectors.conftest import BASE, USER

USER_URL = f"{BASE}/Users/u1"
SCHEMA_ERROR = "urn:ietf:params:scim:api:messages:2.0:Error"


def statuses(client: ScimClient) -> list[int | None]:
    return [exchange.status for exchange in client.history]


async def test_429_with_retry_after_seconds_waits_that_long(
    target: respx.MockRouter, client: ScimClient, clock: VirtualClock
) -> None:
    throttled = httpx.Response(429, headers={"Retry-After": "7"})
    target.get(USER_URL).mock(side_effect=[throttled, httpx.Response(200, json=USER)])

    result = await client.get("Users", "u1")

    assert result.id == "u1"
    assert clock.slept["retry"] == [7.0]
    assert statuses(client) == [429, 200]


async def test_429_with_retry_after_http_date_waits_until_that_date(
    target: respx.MockRouter, client: ScimClient, clock: VirtualClock
) -> None:
    when = format_datetime(clock.wall() + timedelta(seconds=42), usegmt=True)
    throttled = httpx.Response(429, headers={"Retry-After": when})
    target.get(USER_URL).mock(side_effect=[throttled, httpx.Response(200, json=USER)])

    await client.get("Users", "u1")

    assert clock.slept["retry"] == [42.0]


async def test_retry_after_is_capped_by_max_retry_after(target: respx.MockRouter, clock: VirtualClock) -> None:
    policy = RetryPolicy(max_retry_after=120.0, sleep=clock.sleeper("retry"), now=clock.wall)
    target.get(USER_URL).mock(
        side_effect=[httpx.Response(429, headers={"Retry-After": "86400"}), httpx.Response(200, json=USER)]
    )
    limiter = TargetLimiter(clock=clock, sleep=clock.sleeper("limiter"))
    async with ScimClient(BASE, retry=policy, limiter=limiter) as client:
        await client.get("Users", "u1")

    assert clock.slept["retry"] == [120.0]


async def test_429_without_retry_after_backs_off_with_jitter(
    target: respx.MockRouter, client: ScimClient, clock: VirtualClock
) -> None:
    target.get(USER_URL).mock(side_effect=[httpx.Response(429), httpx.Response(429), httpx.Response(200, json=USER)])

    await client.get("Users", "u1")

    first, second = clock.slept["retry"]
    assert 0.0 <= first <= 0.5
    assert 0.0 <= second <= 1.0
    assert statuses(client) == [429, 429, 200]


async def test_503_then_201_creates_once_with_two_history_entries(
    target: respx.MockRouter, client: ScimClient, clock: VirtualClock
) -> None:
    route = target.post(f"{BASE}/Users").mock(side_effect=[httpx.Response(503), httpx.Response(201, json=USER)])

    result = await client.create("Users", {"userName": "ada"})

    assert result.id == "u1"
    assert route.call_count == 2
    assert statuses(client) == [503, 201]
    assert [x.request_body for x in client.history] == [{"userName": "ada"}] * 2
    assert isinstance(client.history[0].error, TransientError)
    assert client.history[1].error is None
    assert len(clock.slept["retry"]) == 1


async def test_500_five_times_raises_the_last_transient_error_after_five_attempts(
    target: respx.MockRouter, client: ScimClient, clock: VirtualClock
) -> None:
    target.get(USER_URL).mock(return_value=httpx.Response(500, text="down"))

    with pytest.raises(TransientError) as caught:
        await client.get("Users", "u1")

    assert caught.value.attempts == 5
    assert caught.value.status == 500
    assert caught.value is client.history[-1].error
    assert statuses(client) == [500] * 5
    waits = clock.slept["retry"]
    assert len(waits) == 4
    for attempt, wait in enumerate(waits, start=1):
        assert 0.0 <= wait <= min(30.0, 0.5 * 2 ** (attempt - 1))


@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_server_errors_that_say_try_again_are_retried(
    target: respx.MockRouter, client: ScimClient, status: int
) -> None:
    target.get(USER_URL).mock(side_effect=[httpx.Response(status), httpx.Response(200, json=USER)])

    await client.get("Users", "u1")

    assert statuses(client) == [status, 200]


@pytest.mark.parametrize("status", [501, 405])
async def test_501_and_405_are_unsupported_and_never_retried(
    target: respx.MockRouter, client: ScimClient, clock: VirtualClock, status: int
) -> None:
    """Asking again is useless: the caller must send another form of the request."""
    target.get(USER_URL).mock(return_value=httpx.Response(status))

    with pytest.raises(Unsupported) as caught:
        await client.get("Users", "u1")

    assert caught.value.attempts == 1
    assert clock.slept["retry"] == []


@pytest.mark.parametrize(
    "failure",
    [
        httpx.ReadTimeout("timed out"),
        httpx.ConnectTimeout("timed out"),
        httpx.ReadError("[Errno 104] Connection reset by peer"),
        httpx.RemoteProtocolError("Server disconnected without sending a response."),
        httpx.ConnectError("[Errno 111] Connection refused"),
    ],
    ids=["read-timeout", "connect-timeout", "connection-reset", "disconnected", "connection-refused"],
)
async def test_timeouts_and_connection_errors_are_retried(
    target: respx.MockRouter, client: ScimClient, clock: VirtualClock, failure: Exception
) -> None:
    target.get(USER_URL).mock(side_effect=[failure, httpx.Response(200, json=USER)])

    result = await client.get("Users", "u1")

    assert result.id == "u1"
    assert statuses(client) == [None, 200]
    error = client.history[0].error
    assert isinstance(error, TransientError) and error.status is None
    assert error.__cause__ is failure
    assert len(clock.slept["retry"]) == 1


async def test_timeouts_every_time_raise_transient_error_with_attempts(
    target: respx.MockRouter, client: ScimClient
) -> None:
    target.get(USER_URL).mock(side_effect=httpx.ReadTimeout("timed out"))

    with pytest.raises(TransientError, match="timed out") as caught:
        await client.get("Users", "u1")

    assert caught.value.attempts == 5
    assert len(client.history) == 5


@pytest.mark.parametrize(
    "body", [b'{"id": "u1", "userNa', b"<html>gateway</html>", b"[1, 2]"], ids=["truncated", "html", "not-an-object"]
)
async def test_invalid_json_on_a_success_status_is_retried(
    target: respx.MockRouter, client: ScimClient, body: bytes
) -> None:
    target.get(USER_URL).mock(side_effect=[httpx.Response(200, content=body), httpx.Response(200, json=USER)])

    result = await client.get("Users", "u1")

    assert result.resource == USER
    assert statuses(client) == [200, 200]
    assert isinstance(client.history[0].error, InvalidResponse)


@pytest.mark.parametrize(
    ("status", "error"),
    [(400, PermanentError), (403, PermanentError), (404, NotFound), (409, Conflict), (412, PreconditionFailed)],
)
async def test_other_4xx_are_never_retried(
    target: respx.MockRouter, client: ScimClient, clock: VirtualClock, status: int, error: type[Exception]
) -> None:
    scim_error = {"schemas": [SCHEMA_ERROR], "scimType": "invalidValue", "detail": "no"}
    route = target.put(USER_URL).mock(return_value=httpx.Response(status, json=scim_error))

    with pytest.raises(error) as caught:
        await client.replace("Users", "u1", {"userName": "ada"})

    assert type(caught.value) is error
    assert caught.value.attempts == 1
    assert caught.value.scim_type == "invalidValue"
    assert route.call_count == 1
    assert clock.slept["retry"] == []


async def test_one_attempt_policy_never_retries(target: respx.MockRouter, clock: VirtualClock) -> None:
    target.get(USER_URL).mock(return_value=httpx.Response(503))
    policy = RetryPolicy(max_attempts=1, sleep=clock.sleeper("retry"))

    async with ScimClient(BASE, retry=policy) as client:
        with pytest.raises(TransientError) as caught:
            await client.get("Users", "u1")

    assert caught.value.attempts == 1
    assert clock.slept["retry"] == []


def test_retry_policy_is_a_value_built_from_config() -> None:
    assert RetryPolicy(max_attempts=3, base=1.0) == RetryPolicy(max_attempts=3, base=1.0)
    assert RetryPolicy() != RetryPolicy(max_attempts=3)
    assert "max_attempts=5" in repr(RetryPolicy())


@pytest.mark.parametrize(
    "settings", [{"max_attempts": 0}, {"base": 0}, {"base": 2.0, "cap": 1.0}, {"max_retry_after": -1}]
)
def test_retry_policy_refuses_nonsense(settings: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**settings)  # type: ignore[arg-type]
