"""Shared pytest fixtures. The PostgreSQL cluster logic lives in tests/postgres.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from twisted.internet.task import Clock

from tests import postgres as _postgres


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[_postgres.PostgresServer]:
    """The session's PostgreSQL server: stoppable when ephemeral (see tests/postgres.py)."""
    yield from _postgres.postgres_server()


@pytest.fixture(scope="session")
def postgres_dsn(postgres_server: _postgres.PostgresServer) -> str:
    """A libpq DSN for a database of our own that lasts the whole test session."""
    return postgres_server.dsn


@pytest.fixture
def clock() -> Clock:
    """A fake clock set to a realistic epoch time, for code that stamps wall time."""
    clock = Clock()
    clock.advance(1_700_000_000)
    return clock
