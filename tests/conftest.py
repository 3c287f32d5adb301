"""Shared pytest fixtures. The PostgreSQL cluster logic lives in tests/postgres.py."""

from __future__ import annotations

import socket
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


class IPSocketForbidden(OSError):
    """A unit test tried to bind or connect an IP socket; such tests live in tests/integration."""


def _refuse_ip(original):
    def guarded(sock, address, *args, **kwargs):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            raise IPSocketForbidden(f"unit tests use no IP sockets: {original.__name__}{address!r}")
        return original(sock, address, *args, **kwargs)
    return guarded


@pytest.fixture(autouse=True)
def _no_ip_sockets(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unit tests (everything outside tests/integration) run with IP ``bind``/``connect``
    refused, so each says what broke without a network in the way."""
    if "integration" in request.node.path.parts:
        return
    for name in ("bind", "connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, name, _refuse_ip(getattr(socket.socket, name)))
