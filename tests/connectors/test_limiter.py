"""The per-target limiter: concurrency, token-bucket spacing, and a 429 that slows the whole target."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import respx

from connectors import BearerAuth, RateLimit, RetryPolicy, ScimClient, TargetLimiter
from tests.connectors.clock import VirtualClock
from tests.connectors.conftest import BASE, USER


async def pass_through(limiter: TargetLimiter, clock: VirtualClock, times: list[float]) -> None:
    async with limiter.slot():
        times.append(clock())


async def test_rate_limit_spaces_requests_evenly(clock: VirtualClock) -> None:
    limiter = TargetLimiter(rate_limit=RateLimit.per_second(2), clock=clock, sleep=clock.sleeper("limiter"))
    times: list[float] = []

    await asyncio.gather(*(pass_through(limiter, clock, times) for _ in range(5)))

    assert times == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert clock.slept["limiter"] == [0.5] * 4


async def test_rate_limit_per_minute_with_a_burst(clock: VirtualClock) -> None:
    limiter = TargetLimiter(rate_limit=RateLimit.per_minute(180, burst=3), clock=clock, sleep=clock.sleeper("limiter"))
    times: list[float] = []

    await asyncio.gather(*(pass_through(limiter, clock, times) for _ in range(6)))

    # Three at once from the full bucket, then one every 60/180 s.
    assert times == pytest.approx([0.0, 0.0, 0.0, 1 / 3, 2 / 3, 1.0])


async def test_an_idle_bucket_refills_only_up_to_its_burst(clock: VirtualClock) -> None:
    limiter = TargetLimiter(rate_limit=RateLimit.per_second(1, burst=2), clock=clock, sleep=clock.sleeper("limiter"))
    times: list[float] = []
    await pass_through(limiter, clock, times)
    await clock.sleeper("idle")(100.0)

    await asyncio.gather(*(pass_through(limiter, clock, times) for _ in range(3)))

    assert times == [0.0, 100.0, 100.0, 101.0]


async def test_max_concurrency_bounds_requests_in_flight(clock: VirtualClock) -> None:
    limiter = TargetLimiter(max_concurrency=3, clock=clock, sleep=clock.sleeper("limiter"))
    work = clock.sleeper("work")
    peak = 0

    async def request() -> None:
        nonlocal peak
        async with limiter.slot():
            peak = max(peak, limiter.in_flight)
            await work(1.0)

    await asyncio.gather(*(request() for _ in range(10)))

    assert peak == 3
    assert clock() == 4.0  # ceil(10 / 3) rounds of one second


async def test_max_concurrency_is_shared_by_every_client_of_the_target(
    target: respx.MockRouter, clock: VirtualClock
) -> None:
    limiter = TargetLimiter(max_concurrency=2, clock=clock, sleep=clock.sleeper("limiter"))
    in_flight: list[int] = []

    async def slow(request: httpx.Request) -> httpx.Response:
        in_flight.append(limiter.in_flight)
        await clock.sleeper("server")(1.0)
        return httpx.Response(200, json=USER)

    target.get(f"{BASE}/Users/u1").mock(side_effect=slow)
    clients = [ScimClient(BASE, limiter=limiter, retry=RetryPolicy(sleep=clock.sleeper("retry"))) for _ in range(4)]

    await asyncio.gather(*(clients[i % 4].get("Users", "u1") for i in range(8)))

    assert max(in_flight) == 2
    assert clock() == 4.0
    await asyncio.gather(*(c.aclose() for c in clients))


async def test_a_429_slows_down_other_concurrent_requests_to_the_target(
    target: respx.MockRouter, clock: VirtualClock, limiter: TargetLimiter
) -> None:
    seen: dict[str, list[float]] = {"a": [], "b": []}
    throttled = asyncio.Event()

    def answer(name: str, *responses: httpx.Response):  # type: ignore[no-untyped-def]
        queue = list(responses)

        def respond(request: httpx.Request) -> httpx.Response:
            seen[name].append(clock())
            return queue.pop(0)

        return respond

    target.get(f"{BASE}/Users/a").mock(
        side_effect=answer(
            "a", httpx.Response(429, headers={"Retry-After": "5"}), httpx.Response(200, json={"id": "a"})
        )
    )
    target.get(f"{BASE}/Users/b").mock(side_effect=answer("b", httpx.Response(200, json={"id": "b"})))

    async def retry_sleep(seconds: float) -> None:
        throttled.set()  # A was told to wait: the whole target is paused by now.
        await clock.sleeper("retry")(seconds)

    policy = RetryPolicy(sleep=retry_sleep, now=clock.wall)
    auth = BearerAuth("t")
    async with ScimClient(BASE, auth=auth, retry=policy, limiter=limiter) as a, ScimClient(
        BASE, auth=auth, retry=policy, limiter=limiter
    ) as b:

        async def b_after_a_is_throttled() -> None:
            await throttled.wait()
            await b.get("Users", "b")

        await asyncio.gather(a.get("Users", "a"), b_after_a_is_throttled())

    assert seen == {"a": [0.0, 5.0], "b": [5.0]}
    assert clock.slept["retry"] == [5.0]
    assert clock.slept["limiter"] == [5.0]  # B waited for the pause, not for its own 429


@pytest.fixture
def pauses(limiter: TargetLimiter, monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Every pause the client asked the target's limiter for."""
    asked: list[float] = []
    original = limiter.slow_down

    def slow_down(seconds: float) -> None:
        asked.append(seconds)
        original(seconds)

    monkeypatch.setattr(limiter, "slow_down", slow_down)
    return asked


async def test_a_429_without_retry_after_pauses_the_target_for_the_backoff(
    target: respx.MockRouter, client: ScimClient, clock: VirtualClock, pauses: list[float]
) -> None:
    target.get(f"{BASE}/Users/u1").mock(side_effect=[httpx.Response(429), httpx.Response(200, json=USER)])

    await client.get("Users", "u1")

    assert pauses == clock.slept["retry"]
    assert 0.0 <= pauses[0] <= 0.5


async def test_a_503_does_not_pause_the_whole_target(
    target: respx.MockRouter, client: ScimClient, pauses: list[float]
) -> None:
    target.get(f"{BASE}/Users/u1").mock(side_effect=[httpx.Response(503), httpx.Response(200, json=USER)])

    await client.get("Users", "u1")

    assert pauses == []


def test_limiter_refuses_no_slots() -> None:
    with pytest.raises(ValueError):
        TargetLimiter(max_concurrency=0)


@pytest.mark.parametrize("args", [(0, 1.0), (1, 0.0), (1, 1.0, 0)])
def test_rate_limit_refuses_nonsense(args: tuple[float, ...]) -> None:
    with pytest.raises(ValueError):
        RateLimit(*args)  # type: ignore[arg-type]
