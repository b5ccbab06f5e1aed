"""Virtual time for tests: sleeps are recorded and pass instantly, in deadline order."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections import defaultdict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

EPOCH = datetime(2026, 1, 5, 9, 0, 0, tzinfo=UTC)

# How many times the driver yields to the event loop before deciding that every task waits.
_SETTLE = 100


class VirtualClock:
    """A monotonic clock (call it) and a wall clock (``wall``) that only sleeps move.

    Each sleeper (``clock.sleeper("retry")``) records what it was asked to
    wait in ``slept[name]``. Time jumps to the earliest deadline once every
    runnable task has had its turn, so concurrent sleepers overlap as they
    would in real time, and no test ever waits.
    """

    def __init__(self, start: datetime = EPOCH) -> None:
        self.now = 0.0
        self.start = start
        self.slept: defaultdict[str, list[float]] = defaultdict(list)
        self._timers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()
        self._driver: asyncio.Task[None] | None = None

    def __call__(self) -> float:
        return self.now

    def wall(self) -> datetime:
        return self.start + timedelta(seconds=self.now)

    def sleeper(self, name: str) -> Callable[[float], Awaitable[None]]:
        async def sleep(seconds: float) -> None:
            self.slept[name].append(seconds)
            await self._wait(seconds)

        return sleep

    async def _wait(self, seconds: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._timers, (self.now + max(seconds, 0.0), next(self._order), future))
        if self._driver is None or self._driver.done():
            self._driver = asyncio.create_task(self._advance())
        await future

    async def _advance(self) -> None:
        while self._timers:
            for _ in range(_SETTLE):
                await asyncio.sleep(0)
            deadline, _, future = heapq.heappop(self._timers)
            self.now = max(self.now, deadline)
            if not future.done():
                future.set_result(None)
