"""The PostgreSQL settlement function against a real server: every key is found by its
index, whatever the table's statistics said when a connection planned it, and rows are
locked in key order, so settlements never wait on each other in a cycle."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import psycopg2
import pytest
import pytest_twisted
from twisted.internet import reactor
from txpostgres.txpostgres import Connection

from equalizer.buckets.postgres.store import PostgresStore
from tests.integration.harness import wait_until
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


@asynccontextmanager
async def transaction(dsn: str) -> AsyncIterator[Connection]:
    """A connection of its own inside an open transaction, rolled back unless committed."""
    connection = Connection(reactor)
    await within(connection.connect(dsn))
    try:
        await within(connection.runOperation("BEGIN"))
        yield connection
    finally:
        await within(connection.runOperation("ROLLBACK"))
        connection.close()


async def settlement_waiting(dsn: str) -> None:
    """Until a settlement waits for a lock another session holds."""
    waiting = ("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
               " AND query LIKE '%%equalizer_settle%%'")

    async def waits() -> int:
        return (await sql(dsn, waiting, fetch=True))[0][0]

    await wait_until(waits, message="the settlement to wait for a lock")


async def lockable(connection: Connection, client_id: str) -> bool:
    """Whether ``connection`` can lock the key's row at once (no one else holds it)."""
    try:
        await within(connection.runOperation("SAVEPOINT probe"))
        await within(connection.runOperation(
            "SELECT 1 FROM buckets WHERE client_id = %s FOR UPDATE NOWAIT", (client_id,)))
    except psycopg2.errors.LockNotAvailable:
        return False
    finally:
        await within(connection.runOperation("ROLLBACK TO SAVEPOINT probe"))
    return True


async def session_statistic(connection: Connection, query: str) -> int:
    """One figure of the statistics views, with what ``connection``'s own session did."""
    await within(connection.runQuery("SELECT pg_stat_force_next_flush()"))
    await within(connection.runQuery("SELECT pg_stat_clear_snapshot()"))
    return (await within(connection.runQuery(query)))[0][0]


async def sequential_scans(connection: Connection) -> int:
    """Sequential scans of the buckets table so far."""
    return await session_statistic(
        connection, "SELECT seq_scan FROM pg_stat_user_tables WHERE relname = 'buckets'")


async def index_reads(connection: Connection) -> int:
    """Entries read from the buckets table's indexes so far."""
    return await session_statistic(
        connection, "SELECT sum(idx_tup_read) FROM pg_stat_user_indexes WHERE relname = 'buckets'")


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


@pytest_twisted.ensureDeferred
async def test_settlements_read_only_their_keys_when_the_table_was_analyzed_empty(
        session, postgres_dsn):
    """Migration 0009: analyzed once the sweep had emptied it (no rows, its pages kept),
    the table grows back to 2,000 rows; a settlement of 100 of them and one of 100 new
    keys each read about their own keys from the indexes, not the whole table per key
    (0008's join and update read 4,000 entries for the 100 keys found, and on 10,000 rows
    a 1,000-key settlement took 10 s)."""
    await sql(postgres_dsn, "ALTER TABLE buckets SET (autovacuum_enabled = false)")
    try:
        fill = ("INSERT INTO buckets (client_id, capacity, tokens, refill_rate, from_default)"
                " SELECT 'k' || lpad(n::text, 4, '0'), 10, 10, 1, true"
                " FROM generate_series(0, 1999) AS n")
        await sql(postgres_dsn, fill)
        await sql(postgres_dsn, "DELETE FROM buckets")
        await sql(postgres_dsn, "ANALYZE buckets")
        await sql(postgres_dsn, fill)
        for keys in ([f"k{n:04d}" for n in range(0, 2000, 20)], [f"new{n}" for n in range(100)]):
            before = await index_reads(session)
            rows = await within(session.runQuery(SETTLE, settlement(keys)))
            assert sorted(row[0] for row in rows) == sorted(keys)
            assert await index_reads(session) - before < 1000
    finally:
        await sql(postgres_dsn, "ALTER TABLE buckets RESET (autovacuum_enabled)")


@pytest_twisted.ensureDeferred
async def test_settlement_locks_rows_in_key_order(session, postgres_dsn):
    """Whatever order a batch names its keys in, their rows are locked in key order: while
    another session holds "b", a settlement of c, b, a holds "a" and has not touched "c"
    (two settlements of overlapping keys can then never each hold what the other waits for)."""
    await sql(postgres_dsn, "INSERT INTO buckets (client_id, capacity, tokens, refill_rate,"
                            " from_default) SELECT k, 10, 10, 0, true FROM"
                            " unnest(ARRAY['a', 'b', 'c']) AS k")
    async with transaction(postgres_dsn) as holder, transaction(postgres_dsn) as probe:
        await within(holder.runOperation(
            "SELECT 1 FROM buckets WHERE client_id = 'b' FOR UPDATE"))
        settled = session.runQuery(SETTLE, settlement(["c", "b", "a"]))
        await settlement_waiting(postgres_dsn)
        assert not await lockable(probe, "a")
        assert await lockable(probe, "c")
        await within(holder.runOperation("COMMIT"))
        await within(holder.runOperation("BEGIN"))  # for the context's ROLLBACK
        rows = await within(settled)
    assert sorted((row[0], row[1], row[2]) for row in rows) == [
        ("a", 1, 9.0), ("b", 1, 9.0), ("c", 1, 9.0)]


@pytest_twisted.ensureDeferred
async def test_key_created_meanwhile_is_left_to_the_next_settlement(session, postgres_dsn):
    """A missing key another session is creating: the settlement's insert waits for it, then
    leaves that row as the other session made it and answers no row for the key (the
    leasing store sends it again), while the keys it found are settled. Looking at the new
    row again would lock it after rows further on in key order."""
    async with transaction(postgres_dsn) as creator:
        await within(creator.runOperation(
            "INSERT INTO buckets (client_id, capacity, tokens, refill_rate, from_default)"
            " VALUES ('new', 5, 5, 0, true)"))
        settled = session.runQuery(SETTLE, settlement(["first", "new"]))
        await settlement_waiting(postgres_dsn)
        await within(creator.runOperation("COMMIT"))
        await within(creator.runOperation("BEGIN"))
        rows = await within(settled)
    assert [(row[0], row[1]) for row in rows] == [("first", 1)]
    made = await sql(postgres_dsn, "SELECT capacity, tokens FROM buckets"
                                   " WHERE client_id = 'new'", fetch=True)
    assert made == [(5, 5.0)]


@pytest.mark.parametrize("known", [True, False])
@pytest_twisted.ensureDeferred
async def test_settlement_without_a_default_creates_nothing(session, postgres_dsn, known):
    """A key with no row and no default, or with nothing wanted, gets no row; a key with
    one is settled beside it either way."""
    batch = [["first", 1, 0, 0, None, None], ["nodefault", 1, 4, 0, None, None],
             ["giveback", 0, 0, 3, 10, 1.0]]
    if not known:
        batch = batch[1:]
    rows = await within(session.runQuery(SETTLE, (json.dumps(batch),)))
    assert [row[0] for row in rows] == (["first"] if known else [])
    count = await sql(postgres_dsn, "SELECT count(*) FROM buckets", fetch=True)
    assert count == [(1,)]
