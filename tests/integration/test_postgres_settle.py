"""The PostgreSQL settlement function's plans, against a real server: every key is found
by its index, whatever the table's statistics said when a connection planned it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest_twisted
from twisted.internet import reactor
from txpostgres.txpostgres import Connection

from equalizer.buckets.postgres.store import PostgresStore
from tests.integration.test_postgres_store import within
from tests.postgres import sql

SETTLE = "SELECT * FROM equalizer_settle(%s::json)"


@pytest_twisted.async_yield_fixture()
async def session(postgres_dsn: str) -> AsyncIterator[Connection]:
    """One connection (its plans are its own) to a migrated database whose buckets table
    was analyzed holding a single row, as on a fresh install."""
    store = PostgresStore(postgres_dsn, reactor)
    await within(store.start())
    await within(store.stop())
    await sql(postgres_dsn, "TRUNCATE buckets")
    await sql(postgres_dsn, "INSERT INTO buckets (client_id, capacity, tokens, refill_rate,"
                            " from_default) VALUES ('first', 10, 10, 1, true)")
    await sql(postgres_dsn, "ANALYZE buckets")
    connection = Connection(reactor)
    await within(connection.connect(postgres_dsn))
    yield connection
    connection.close()
    await sql(postgres_dsn, "TRUNCATE buckets")
    await sql(postgres_dsn, "ANALYZE buckets")


def settlement(keys: list[str]) -> tuple[str]:
    return (json.dumps([[key, 1, 0, 0, 10, 1.0] for key in keys]),)


async def sequential_scans(connection: Connection) -> int:
    """Sequential scans of the buckets table so far, this session's included."""
    await within(connection.runQuery("SELECT pg_stat_force_next_flush()"))
    await within(connection.runQuery("SELECT pg_stat_clear_snapshot()"))
    rows = await within(connection.runQuery(
        "SELECT seq_scan FROM pg_stat_user_tables WHERE relname = 'buckets'"))
    return rows[0][0]


@pytest_twisted.ensureDeferred
async def test_settlements_find_keys_by_the_index_after_the_table_grew(session):
    """Migration 0007: the plans a connection keeps from settlements made while the table
    held one row still find each key by its index once it holds many: no settlement scans
    the whole table (before, each key of such a connection cost one sequential scan)."""
    for _ in range(8):  # past the five custom plans: the connection keeps a generic one
        await within(session.runQuery(SETTLE, settlement(["first"])))
    keys = [f"k{n:04d}" for n in range(500)]
    await within(session.runQuery(SETTLE, settlement(keys)))
    before = await sequential_scans(session)
    rows = await within(session.runQuery(SETTLE, settlement(keys[:100])))
    assert len(rows) == 100 and all(row[1] == 1 for row in rows)
    assert await sequential_scans(session) == before
