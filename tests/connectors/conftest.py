"""Fixtures for the SCIM client: virtual time, a mocked target (respx), a shared limiter and policy."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import respx

from connectors import BearerAuth, RetryPolicy, ScimClient, TargetLimiter
from tests.connectors.clock import VirtualClock

BASE = "https://scim.example/v2"
TOKEN_URL = "https://login.example/oauth2/token"
USER = {"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "id": "u1", "userName": "ada"}


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock()


@pytest.fixture
def policy(clock: VirtualClock) -> RetryPolicy:
    """The production defaults, with virtual sleep and wall clock."""
    return RetryPolicy(sleep=clock.sleeper("retry"), now=clock.wall)


@pytest.fixture
def limiter(clock: VirtualClock) -> TargetLimiter:
    return TargetLimiter(clock=clock, sleep=clock.sleeper("limiter"))


@pytest.fixture
def target() -> Iterator[respx.MockRouter]:
    """The SCIM target and its token endpoint, mocked; nothing else is reachable."""
    with respx.mock(assert_all_called=False, assert_all_mocked=True) as router:
        yield router


@pytest.fixture
async def client(target: respx.MockRouter, policy: RetryPolicy, limiter: TargetLimiter) -> AsyncIterator[ScimClient]:
    async with ScimClient(BASE, auth=BearerAuth("static-token"), retry=policy, limiter=limiter) as scim:
        yield scim
