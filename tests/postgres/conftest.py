"""Fixtures on a real PostgreSQL: one private server per test session, one fresh database per test."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from tests.postgres.server import PostgresServer, PostgresUnavailable

_numbers = itertools.count(1)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """The session's PostgreSQL server; a missing server fails the tests, it never skips them."""
    try:
        server = PostgresServer()
    except PostgresUnavailable as exc:
        pytest.fail(str(exc))
    with server:
        yield server


@pytest.fixture
def pg_url(postgres: PostgresServer) -> str:
    """The URL of an empty database of its own for one test."""
    return postgres.create_database(f"test_{next(_numbers)}")
