"""The PostgreSQL store's sweep of full default rows, against a real server.

Time passing is simulated by moving rows' ``updated_at`` back (the refill is
computed from the database clock), so no test sleeps for a refill. Each test
starts from an empty ``buckets`` table and calls :meth:`PostgresStore.sweep`
itself; the periodic sweep of these stores is 60 s away.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest_twisted
from twisted.internet import reactor
from txpostgres.txpostgres import Connection

from equalizer.buckets.postgres import store as stores_module
from equalizer.buckets.postgres.sql import SWEEP, SWEEP_LOCK
from equalizer.buckets.postgres.store import SWEEP_BATCH, SWEEP_IDLE, PostgresStore
from equalizer.config.model import BucketPolicy, RateLimitConfig
from tests.integration.harness import wait_until
from tests.integration.test_postgres_settle import index_reads
from tests.integration.test_postgres_store import within
from tests.postgres import sql

POLICY = BucketPolicy(10, 1.0)


@pytest_twisted.async_yield_fixture()
async def store(postgres_dsn: str) -> AsyncIterator[PostgresStore]:
    """A started store over an empty buckets table, sweeping full rows however recently
    they changed (the wait for rows of active clients has a test of its own)."""
    started = PostgresStore(postgres_dsn, reactor, sweep_idle=0)
    await within(started.start())
    await sql(postgres_dsn, "TRUNCATE buckets")
    yield started
    await within(started.stop())


async def age(dsn: str, seconds: float, client_id: str | None = None) -> None:
    """Make rows look ``seconds`` older: as if that long had passed since their last change."""
    where = "" if client_id is None else " WHERE client_id = %s"
    await sql(dsn, f"UPDATE buckets SET updated_at = updated_at - %s * interval '1 second'"
                   f"{where}", (seconds,) if client_id is None else (seconds, client_id))


async def ids(dsn: str) -> set[str]:
    return {row[0] for row in await sql(dsn, "SELECT client_id FROM buckets", None, True)}


async def insert_full_default_rows(dsn: str, count: int) -> None:
    await sql(dsn, "INSERT INTO buckets (client_id, capacity, tokens, refill_rate, from_default)"
                   " SELECT 'k' || lpad(i::text, 6, '0'), 10, 10, 1, true"
                   " FROM generate_series(1, %s) AS i", (count,))


@pytest_twisted.ensureDeferred
async def test_sweep_deletes_full_default_rows_and_nothing_else(store, postgres_dsn):
    """Full rows made from the default (by a take or a settlement) go; a spent default row,
    API-made rows, a default row changed by PUT and rows from before migration 0004 stay."""
    await within(store.take("full", POLICY))
    for _ in range(10):
        await within(store.take("spent", POLICY))
    await within(store.create("api", 10, 10, 1.0))
    await within(store.take("changed", POLICY))
    await within(store.update("changed", tokens=10))
    await sql(postgres_dsn, "INSERT INTO buckets (client_id, capacity, tokens, refill_rate)"
                            " VALUES ('legacy', 10, 10, 1)")
    await within(store.query("SELECT * FROM equalizer_settle(%s::json)",
                             (json.dumps([["settled", 1, 0, 0, 10, 1.0]]),)))
    await age(postgres_dsn, 5)  # "spent" holds 5 of 10; the others are full
    assert await within(store.sweep()) == 2
    assert await ids(postgres_dsn) == {"spent", "api", "changed", "legacy"}
    assert (store.swept, store.bucket_count) == (2, 4)


@pytest_twisted.ensureDeferred
async def test_full_rows_are_swept_only_once_unchanged_for_sweep_idle(postgres_dsn):
    """A full default row changed within SWEEP_IDLE seconds (its client still active: a
    lease settled on it) stays, so it is updated rather than deleted and made again; it
    goes once unchanged that long."""
    assert SWEEP_IDLE == 10.0
    store = PostgresStore(postgres_dsn, reactor)
    await within(store.start())
    try:
        await sql(postgres_dsn, "TRUNCATE buckets")
        await insert_full_default_rows(postgres_dsn, 2)
        await age(postgres_dsn, 9.5, "k000001")
        await age(postgres_dsn, 10.5, "k000002")
        assert await within(store.sweep()) == 1
        assert await ids(postgres_dsn) == {"k000001"}
        await age(postgres_dsn, 1)
        assert await within(store.sweep()) == 1
        assert await ids(postgres_dsn) == set()
    finally:
        await within(store.stop())


@pytest_twisted.ensureDeferred
async def test_spent_row_is_swept_only_once_refilled(store, postgres_dsn):
    """A default row is not swept while it is below its capacity, and is at the first sweep
    after its refill reaches it."""
    for _ in range(10):
        await within(store.take("spent", POLICY))
    await age(postgres_dsn, 9.9)
    assert await within(store.sweep()) == 0
    assert await ids(postgres_dsn) == {"spent"}
    await age(postgres_dsn, 0.2)
    assert await within(store.sweep()) == 1
    assert await ids(postgres_dsn) == set()


@pytest_twisted.ensureDeferred
async def test_sweep_goes_by_batches_and_runs_resume(store, postgres_dsn, monkeypatch):
    """A run sends statements of SWEEP_BATCH rows up to SWEEP_MAX_BATCHES, and the next run
    goes on from where the last one stopped, wrapping around at the end."""
    await insert_full_default_rows(postgres_dsn, 2 * SWEEP_BATCH + 500)
    monkeypatch.setattr(stores_module, "SWEEP_MAX_BATCHES", 1)
    assert await within(store.sweep()) == SWEEP_BATCH
    assert await within(store.sweep()) == SWEEP_BATCH
    assert store.bucket_count == 500
    assert await within(store.sweep()) == 500
    assert store.bucket_count == 0
    await insert_full_default_rows(postgres_dsn, 3)  # ids before where the last run stopped
    assert await within(store.sweep()) == 3  # that run reached the end: this one starts over


@pytest_twisted.ensureDeferred
async def test_sweep_skips_rows_locked_by_others(store, postgres_dsn):
    """A row locked by another transaction (a take in progress) is skipped, not waited for,
    and swept by a later run."""
    await insert_full_default_rows(postgres_dsn, 2)
    holder = Connection(reactor)
    await within(holder.connect(postgres_dsn))
    try:
        await within(holder.runOperation("BEGIN"))
        await within(holder.runOperation(
            "SELECT 1 FROM buckets WHERE client_id = 'k000001' FOR UPDATE"))
        assert await within(store.sweep(), 5) == 1
        await within(holder.runOperation("ROLLBACK"))
    finally:
        holder.close()
    assert await within(store.sweep()) == 1
    assert await ids(postgres_dsn) == set()


@pytest_twisted.ensureDeferred
async def test_one_instance_sweeps_at_a_time(store, postgres_dsn):
    """While another session holds the sweep lock, a run deletes nothing and ends at once."""
    await insert_full_default_rows(postgres_dsn, 3)
    holder = Connection(reactor)
    await within(holder.connect(postgres_dsn))
    try:
        await within(holder.runQuery("SELECT pg_advisory_lock(%s)", (SWEEP_LOCK,)))
        assert await within(store.sweep(), 5) == 0
        assert len(await ids(postgres_dsn)) == 3
        # Unlock in the session itself: a closed connection's locks go only once the
        # server has noticed the close, which the next sweep could beat.
        await within(holder.runQuery("SELECT pg_advisory_unlock(%s)", (SWEEP_LOCK,)))
    finally:
        holder.close()
    assert await within(store.sweep()) == 3


@pytest_twisted.ensureDeferred
async def test_the_store_sweeps_by_itself_every_interval(store, postgres_dsn):
    """A started store sweeps every refill window of its configured default policy (1 s)."""
    store.configure(RateLimitConfig(default=BucketPolicy(1, 1e9)))
    assert store.interval == 1.0
    await insert_full_default_rows(postgres_dsn, 5)
    await wait_until(lambda: store.swept == 5, 10, interval=0.05, message="the periodic sweep")
    assert await ids(postgres_dsn) == set()


@pytest_twisted.ensureDeferred
async def test_lease_ahead_of_need_recreates_a_swept_row(store, postgres_dsn):
    """Migration 0006: a settlement row asking for a lease with nobody waiting creates the
    key's swept default row (full, less the grant), as a waiting request does; a row that
    only gives tokens back creates nothing."""
    settle = "SELECT * FROM equalizer_settle(%s::json)"
    await within(store.take("busy", POLICY))
    await age(postgres_dsn, 5)
    assert await within(store.sweep()) == 1
    rows = await within(store.query(settle, (json.dumps(
        [["busy", 0, 4, 0, 10, 1.0], ["gone", 0, 0, 3, 10, 1.0]]),)))
    assert [(row[0], row[1], row[2]) for row in rows] == [("busy", 1, 9.0)]  # C // 10 caps it
    assert await ids(postgres_dsn) == {"busy"}


@pytest_twisted.ensureDeferred
async def test_sweep_reads_each_row_a_bounded_number_of_times_after_a_stale_analyze(
        store, postgres_dsn):
    """Analyzed while it held one row, the table grows to 5,000 full default rows: the sweep
    statements delete them all reading fewer than three index entries per row (their locks
    and deletes joined the batch to the whole table, six a row here, and 3 s a
    batch at 10,000 rows).

    The statements run here, as ``PostgresStore.sweep`` runs them, on a connection of the
    test's own: the statistics views count another session's reads only once it flushes
    them, up to 10 s later, and ``index_reads`` flushes this session's."""
    rows = 5000
    await sql(postgres_dsn, "ALTER TABLE buckets SET (autovacuum_enabled = false)")
    connection = Connection(reactor)
    await within(connection.connect(postgres_dsn))
    try:
        await insert_full_default_rows(postgres_dsn, 1)
        await sql(postgres_dsn, "ANALYZE buckets")
        await sql(postgres_dsn, "TRUNCATE buckets")
        await insert_full_default_rows(postgres_dsn, rows)
        before = await index_reads(connection)
        gone, after = 0, ("", "")
        while True:
            params = {"lock": SWEEP_LOCK, "after_policy": after[0], "after": after[1],
                      "batch": SWEEP_BATCH, "idle": 0}
            got, examined, last, deleted = (await within(connection.runQuery(SWEEP, params)))[0]
            assert got
            gone += deleted
            if examined < SWEEP_BATCH:
                break
            after = tuple(last)
        assert gone == rows
        assert await index_reads(connection) - before < 3 * rows
    finally:
        connection.close()
        await sql(postgres_dsn, "ALTER TABLE buckets RESET (autovacuum_enabled)")
