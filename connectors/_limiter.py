"""Politeness per target: how many requests at once, how many per second, and backing off together.

One :class:`TargetLimiter` per target, passed to every :class:`~connectors.ScimClient`
of that target (one per worker) and to its token source: every HTTP request to
the target, retries and token requests included, takes a slot and a turn here.
A limiter belongs to one event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RateLimit:
    """``requests`` per ``per`` seconds, as a token bucket holding at most ``burst`` requests."""

    requests: float
    per: float = 1.0
    burst: int = 1

    def __post_init__(self) -> None:
        if self.requests <= 0 or self.per <= 0:
            raise ValueError(f"a rate limit needs requests > 0 and per > 0, not {self.requests}/{self.per}s")
        if self.burst < 1:
            raise ValueError(f"burst must be at least 1, not {self.burst}")

    @classmethod
    def per_second(cls, requests: float, *, burst: int = 1) -> RateLimit:
        return cls(requests, 1.0, burst)

    @classmethod
    def per_minute(cls, requests: float, *, burst: int = 1) -> RateLimit:
        return cls(requests, 60.0, burst)

    @property
    def interval(self) -> float:
        """Seconds between two requests at the steady rate."""
        return self.per / self.requests


class TargetLimiter:
    """A concurrency cap, an optional token bucket, and a pause shared by the whole target."""

    def __init__(
        self,
        max_concurrency: int = 4,
        rate_limit: RateLimit | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, not {max_concurrency}")
        self.max_concurrency = max_concurrency
        self.rate_limit = rate_limit
        self._clock = clock
        self._sleep = sleep
        self._slots = asyncio.Semaphore(max_concurrency)
        # Turns are handed out one at a time, in arrival order.
        self._turns = asyncio.Lock()
        self._tokens = float(rate_limit.burst) if rate_limit else 0.0
        self._refilled_at = clock()
        self._paused_until = float("-inf")
        # Requests holding a slot right now (for metrics and tests).
        self.in_flight = 0

    def __repr__(self) -> str:
        return f"TargetLimiter(max_concurrency={self.max_concurrency}, rate_limit={self.rate_limit!r})"

    @property
    def paused_until(self) -> float | None:
        """The clock reading before which no request starts, if the target is paused."""
        return self._paused_until if self._paused_until > self._clock() else None

    def slow_down(self, seconds: float) -> None:
        """Pause every request to the target for ``seconds`` (a 429 was answered to one of them)."""
        self._paused_until = max(self._paused_until, self._clock() + max(seconds, 0.0))

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one of the target's ``max_concurrency`` slots, once the rate and any pause allow."""
        async with self._slots:
            # Nothing to wait for (no rate, no pause, nobody queued for a turn): the turn is taken at once,
            # without the lock; anyone queued keeps their place.
            if self.rate_limit is not None or self._turns.locked() or self._clock() < self._paused_until:
                await self._wait_turn()
            self.in_flight += 1
            try:
                yield
            finally:
                self.in_flight -= 1

    async def _wait_turn(self) -> None:
        async with self._turns:
            while True:
                now = self._clock()
                if now < self._paused_until:
                    await self._sleep(self._paused_until - now)
                    continue
                if self.rate_limit is None:
                    return
                self._refill(now)
                if self._tokens >= 1.0:
                    self._tokens -= 1.0
                    return
                await self._sleep((1.0 - self._tokens) * self.rate_limit.interval)

    def _refill(self, now: float) -> None:
        assert self.rate_limit is not None
        # Time spent paused earns no tokens: no burst the moment a pause ends.
        start = max(self._refilled_at, self._paused_until)
        if now > start:
            self._tokens = min(float(self.rate_limit.burst), self._tokens + (now - start) / self.rate_limit.interval)
        self._refilled_at = max(now, self._refilled_at)
