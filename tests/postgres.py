"""A PostgreSQL server for the integration tests: an ephemeral cluster, or one you name.

Which server the session uses:

1. ``EQUALIZER_TEST_DATABASE_URL`` set (a libpq DSN or ``postgresql://`` URL): the
   session creates a fresh database ``equalizer_test_<pid>`` on that server, runs
   against it and drops it at the end, so nothing of yours is touched. The role
   needs CREATEDB. The server cannot be stopped from here, so fault tests skip
   (or fail under CI).
2. Otherwise: an ephemeral cluster. ``initdb`` and ``pg_ctl`` come from ``PATH``
   or ``/usr/lib/postgresql/*/bin``; the cluster lives in a temporary directory,
   listens on 127.0.0.1 on a free port and on a unix socket inside that directory,
   trusts local connections, and is stopped (``pg_ctl stop -m fast``) and deleted
   at the end. Running as root, the binaries run as the ``postgres`` OS user
   (``runuser``), because PostgreSQL refuses to run as root. Durability is off
   (``fsync=off``): the cluster is thrown away anyway.
3. Neither possible: the tests are skipped with the reason, except when the ``CI``
   environment variable is set: a missing database must fail CI, never skip it.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any, NoReturn

import psycopg2
import psycopg2.extensions
import pytest
from attrs import define, field
from txpostgres.txpostgres import Connection

from tests.pg_cluster import ClusterUnavailable, EphemeralCluster, start_cluster

ENV_URL = "EQUALIZER_TEST_DATABASE_URL"


def in_ci() -> bool:
    """Whether we run under CI, where missing prerequisites fail instead of skipping."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def unavailable(reason: str) -> NoReturn:
    """Skip the test for ``reason``, or fail it under CI."""
    if in_ci():
        pytest.fail(f"{reason} (CI is set, so this fails instead of skipping)", pytrace=False)
    pytest.skip(reason)


class ServerNotControllable(Exception):
    """The server belongs to someone else; it cannot be stopped or started from here."""


@define
class PostgresServer:
    """A PostgreSQL server the tests may use, and (if ephemeral) stop and start."""

    dsn: str
    _cluster: EphemeralCluster | None = field(default=None, alias="cluster")

    @property
    def controllable(self) -> bool:
        """Whether :meth:`stop` and :meth:`start` work (ephemeral clusters only)."""
        return self._cluster is not None

    def stop(self) -> None:
        """Stop the server (fast shutdown: sessions are terminated). Blocks."""
        if self._cluster is None:
            raise ServerNotControllable(self.dsn)
        self._cluster.stop()

    def start(self) -> None:
        """Start the server again on the same port and data. Blocks until it accepts."""
        if self._cluster is None:
            raise ServerNotControllable(self.dsn)
        self._cluster.start()


def _ephemeral() -> Iterator[PostgresServer]:
    try:
        cluster = start_cluster()
    except ClusterUnavailable as e:
        unavailable(f"no PostgreSQL server for the integration tests: {e} (or set {ENV_URL})")
    try:
        yield PostgresServer(cluster.dsn, cluster=cluster)
    finally:
        cluster.remove()


def _external(url: str) -> Iterator[PostgresServer]:
    name = f"equalizer_test_{os.getpid()}"
    try:
        admin = psycopg2.connect(url, connect_timeout=10)
    except psycopg2.Error as e:
        unavailable(f"{ENV_URL} is set but the server refuses connections: {e}")
    admin.autocommit = True
    try:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}"')
            cursor.execute(f'CREATE DATABASE "{name}"')
    except psycopg2.Error as e:
        admin.close()
        unavailable(f"could not create the test database {name} through {ENV_URL}: {e}")
    try:
        yield PostgresServer(psycopg2.extensions.make_dsn(url, dbname=name))
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def postgres_server() -> Iterator[PostgresServer]:
    """Yield the session's server (see the module docstring) and clean it up afterwards."""
    url = os.environ.get(ENV_URL)
    if url:
        yield from _external(url)
    else:
        yield from _ephemeral()


SQL_TIMEOUT = 30.0


async def sql(dsn: str, query: str, params: Any = None, fetch: bool = False) -> Any:
    """Run one statement on a connection of its own, without blocking the reactor."""
    from twisted.internet import reactor

    connection = Connection(reactor)
    await connection.connect(dsn).addTimeout(SQL_TIMEOUT, reactor)
    try:
        run = connection.runQuery if fetch else connection.runOperation
        return await run(query, params).addTimeout(SQL_TIMEOUT, reactor)
    finally:
        connection.close()


@asynccontextmanager
async def buckets_locked(dsn: str) -> AsyncIterator[None]:
    """Hold an exclusive lock on the buckets table, as a stuck transaction would."""
    from twisted.internet import reactor

    blocker = Connection(reactor)
    await blocker.connect(dsn).addTimeout(SQL_TIMEOUT, reactor)
    try:
        await blocker.runOperation("BEGIN").addTimeout(SQL_TIMEOUT, reactor)
        await blocker.runOperation("LOCK TABLE buckets IN ACCESS EXCLUSIVE MODE").addTimeout(
            SQL_TIMEOUT, reactor)
        yield
    finally:
        await blocker.runOperation("ROLLBACK").addTimeout(SQL_TIMEOUT, reactor)
        blocker.close()


async def wait_available(store: object, seconds: float = 10.0) -> None:
    """Poll until a store says it is available again, failing after ``seconds``."""
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    deadline = time.monotonic() + seconds
    while not store.available:
        assert time.monotonic() < deadline, f"store did not come back within {seconds:g} s"
        await deferLater(reactor, 0.05, lambda: None)
