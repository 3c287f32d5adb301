"""PostgresStore against a real PostgreSQL server, on the real reactor.

The server comes from the session's ``postgres_server`` fixture (tests/postgres.py):
an ephemeral cluster, or the database named by EQUALIZER_TEST_DATABASE_URL. Each
test starts from an empty ``buckets`` table. Every wait is bounded, so a broken
store fails a test instead of hanging the suite.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import psycopg2
import psycopg2.errors
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import LogLevel, globalLogPublisher
from txpostgres.txpostgres import Connection
from zope.interface.verify import verifyObject

from equalizer.buckets.interface import (
    BucketExists,
    IBucketStore,
    InvalidBucket,
    StoreDataError,
    StoreUnavailable,
    take_key,
)
from equalizer.buckets.postgres.migrations import migrations
from equalizer.buckets.postgres.store import PostgresStore
from equalizer.config.model import BucketPolicy
from equalizer.config.rules import MAX_CAPACITY, MAX_REFILL_RATE, MIN_REFILL_RATE
from tests import postgres as _postgres
from tests.pg_cluster import free_port
from tests.postgres import buckets_locked, sql, wait_available

TIMEOUT = 30.0


def within(d: Deferred[Any] | Awaitable[Any], seconds: float = TIMEOUT) -> Deferred[Any]:
    """``d`` with a deadline, so that a hang fails the test."""
    if not isinstance(d, Deferred):
        d = ensureDeferred(d)
    return d.addTimeout(seconds, reactor)


def sleep(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)



async def started(dsn: str, **kwargs: Any) -> PostgresStore:
    store = PostgresStore(dsn, reactor, **kwargs)
    await within(store.start())
    return store


@pytest_twisted.async_yield_fixture()
async def stores(postgres_dsn: str) -> AsyncIterator[Callable[..., Awaitable[PostgresStore]]]:
    """A factory of started stores on the test database, all stopped afterwards."""
    made: list[PostgresStore] = []

    async def make(**kwargs: Any) -> PostgresStore:
        store = await started(postgres_dsn, **kwargs)
        made.append(store)
        return store

    yield make
    for store in made:
        await within(store.stop())


@pytest_twisted.async_yield_fixture()
async def store(stores: Callable[..., Awaitable[PostgresStore]], postgres_dsn: str):
    """A started store over an empty buckets table."""
    started_store = await stores()
    await sql(postgres_dsn, "TRUNCATE buckets")
    yield started_store


async def take_many(targets: list[PostgresStore], client_id: str, n: int, default=None):
    """Fire ``n`` takes at once, spread over ``targets``; their decisions, in order."""
    calls = [targets[i % len(targets)].take(client_id, default) for i in range(n)]
    return await within(gatherResults(calls, consumeErrors=True))


# --- schema --------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_migrations_are_idempotent_and_race_free(postgres_dsn, stores):
    """Two stores migrating an empty database at once apply each version exactly once; restarts
    apply nothing."""
    await sql(postgres_dsn, "DROP TABLE IF EXISTS buckets, schema_migrations")
    first = PostgresStore(postgres_dsn, reactor)
    second = PostgresStore(postgres_dsn, reactor)
    try:
        await within(gatherResults([first.start(), second.start()], consumeErrors=True))
        assert first.available and second.available
        await first.stop()
        await within(first.start())
        third = await stores()
        assert third.available
    finally:
        await first.stop()
        await second.stop()
    rows = await sql(
        postgres_dsn, "SELECT version, name FROM schema_migrations ORDER BY version", fetch=True
    )
    assert rows == [(version, name) for version, name, _ in migrations()]
    assert rows[0] == (1, "buckets")


@pytest.mark.parametrize(
    ("values", "constraint"),
    [
        (("c", 0, 0.0, 1.0), "buckets_capacity_check"),
        (("c", 5, -0.5, 1.0), "buckets_tokens_check"),
        (("c", 5, 5.5, 1.0), "buckets_tokens_check"),
        (("c", 5, float("nan"), 1.0), "buckets_tokens_check"),
        (("c", 5, 1.0, -1.0), "buckets_refill_rate_check"),
        (("c", 5, 1.0, float("nan")), "buckets_refill_rate_check"),
        (("c", 5, 1.0, float("inf")), "buckets_refill_rate_check"),
        (("c", 5, 1.0, 1e308), "buckets_refill_rate_check"),
        (("c", 5, 1.0, 5e-324), "buckets_refill_rate_check"),
        (("", 5, 1.0, 1.0), "buckets_client_id_check"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_check_constraints_reject_bad_rows(store, postgres_dsn, values, constraint):
    """The schema itself refuses rows that break a bucket invariant, whoever writes them."""
    with pytest.raises(psycopg2.errors.CheckViolation) as caught:
        await sql(
            postgres_dsn,
            "INSERT INTO buckets (client_id, capacity, tokens, refill_rate)"
            " VALUES (%s, %s, %s, %s)",
            values,
        )
    assert caught.value.diag.constraint_name == constraint


@pytest_twisted.ensureDeferred
async def test_start_fails_fast_when_the_database_is_unreachable():
    """start() fails with StoreUnavailable, within the connect timeout, when nothing listens."""
    dsn = f"host=127.0.0.1 port={free_port()} user=postgres dbname=postgres"
    store = PostgresStore(dsn, reactor, connect_timeout=2)
    began = time.monotonic()
    with pytest.raises(StoreUnavailable):
        await within(store.start())
    assert time.monotonic() - began < 3
    assert not store.available
    with pytest.raises(StoreUnavailable):
        await within(store.take("x", BucketPolicy(1, 1)))
    await store.stop()


# --- CRUD ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_provides_the_interface(store):
    """PostgresStore fully provides IBucketStore and is available once started."""
    assert verifyObject(IBucketStore, store)
    assert store.available


@pytest_twisted.ensureDeferred
async def test_create_get_delete(store):
    """A created bucket reads back as created; delete removes it once."""
    created = await within(store.create("a", 10, 4, 0))
    assert (created.client_id, created.capacity, created.tokens, created.refill_rate) == (
        "a",
        10,
        4.0,
        0.0,
    )
    assert created.created_at == created.updated_at
    assert created.created_at.utcoffset().total_seconds() == 0
    assert await within(store.get("a")) == created
    with pytest.raises(BucketExists):
        await within(store.create("a", 1, 1, 1))
    assert await within(store.delete("a")) is True
    assert await within(store.delete("a")) is False
    assert await within(store.get("a")) is None


@pytest_twisted.ensureDeferred
async def test_get_refills_from_the_database_clock(store):
    """get reports tokens as of now, refilled at the bucket's rate."""
    await within(store.create("r", 1000, 0, 1000))
    await sleep(0.05)
    record = await within(store.get("r"))
    assert 40 <= record.tokens <= 1000
    assert record.updated_at == record.created_at


@pytest_twisted.ensureDeferred
async def test_create_rejects_invalid_values(store):
    """Invalid values fail with InvalidBucket naming the field, and nothing is written."""
    with pytest.raises(InvalidBucket) as caught:
        await within(store.create("bad", 3, 4, 1))
    assert caught.value.field == "tokens"
    with pytest.raises(InvalidBucket) as caught:
        await within(store.create("bad", 0, 0, 1))
    assert caught.value.field == "capacity"
    assert await within(store.get("bad")) is None


@pytest_twisted.ensureDeferred
async def test_list_pages_in_client_id_order(store):
    """list pages in code-point order of client_id and counts every bucket."""
    for name in ["b", "a", "C", "ä", "aa"]:
        await within(store.create(name, 1, 1, 0))
    items, total = await within(store.list(2, 0))
    assert total == 5
    assert [r.client_id for r in items] == ["C", "a"]
    items, _ = await within(store.list(10, 2))
    assert [r.client_id for r in items] == ["aa", "b", "ä"]
    assert await within(store.list(10, 99)) == ([], 5)


@pytest_twisted.ensureDeferred
async def test_list_of_nothing(store):
    """An empty table lists as no items and a total of 0."""
    assert await within(store.list(50, 0)) == ([], 0)


@pytest_twisted.ensureDeferred
async def test_update_is_partial_and_clamps(store):
    """update changes only what it is given; a lower capacity clamps the tokens held."""
    await within(store.create("u", 10, 8, 0))
    record = await within(store.update("u", refill_rate=2.5))
    assert (record.capacity, record.tokens, record.refill_rate) == (10, 8.0, 2.5)
    assert record.updated_at >= record.created_at
    record = await within(store.update("u", capacity=3, refill_rate=0))
    assert (record.capacity, record.tokens, record.refill_rate) == (3, 3.0, 0.0)
    record = await within(store.update("u", tokens=1.5))
    assert (record.capacity, record.tokens) == (3, 1.5)
    assert await within(store.update("ghost", capacity=1)) is None


@pytest_twisted.ensureDeferred
async def test_update_refuses_tokens_above_stored_capacity(store):
    """Tokens above the stored capacity are refused by the schema, reported as InvalidBucket."""
    await within(store.create("u", 5, 5, 0))
    with pytest.raises(InvalidBucket) as caught:
        await within(store.update("u", tokens=6))
    assert caught.value.field == "tokens"
    assert (await within(store.get("u"))).tokens == 5.0


# --- taking tokens ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_take_with_default_creates_the_bucket(store):
    """An unknown client gets a full bucket from the default, and the first take costs one."""
    decision = await within(store.take("10.0.0.1", BucketPolicy(3, 0.5)))
    assert decision.allowed
    assert (decision.limit, decision.remaining, decision.window) == (3, 2, 6)
    record = await within(store.get("10.0.0.1"))
    assert (record.capacity, record.refill_rate) == (3, 0.5)
    assert 2.0 <= record.tokens < 2.1


@pytest_twisted.ensureDeferred
async def test_take_without_default_is_unlimited_for_unknown_clients(store):
    """With no default, a client without a bucket is not limited and gets no bucket."""
    assert await within(store.take("nobody", None)) is None
    assert await within(store.get("nobody")) is None


@pytest_twisted.ensureDeferred
async def test_take_refuses_an_empty_bucket(store):
    """An empty bucket that never refills refuses, with retry-after capped at an hour."""
    await within(store.create("empty", 2, 1, 0))
    admitted = await within(store.take("empty", BucketPolicy(100, 100)))
    assert admitted.allowed
    assert admitted.remaining == 0
    refused = await within(store.take("empty", None))
    assert not refused.allowed
    assert (refused.limit, refused.retry_after, refused.reset) == (2, 3600, 3600)


@pytest_twisted.ensureDeferred
async def test_refused_take_reports_when_to_retry(store):
    """A refusal on a refilling bucket reports the whole seconds until the next token."""
    await within(store.create("slow", 1, 0, 0.25))
    refused = await within(store.take("slow", None))
    assert not refused.allowed
    assert refused.retry_after == 4


UNSTORABLE = ["x" * 513, "a\x00b", "\ud800", "line\nfeed", "tab\there", "del\x7f"]


@pytest.mark.parametrize("client_id", UNSTORABLE)
@pytest_twisted.ensureDeferred
async def test_unstorable_client_id_takes_from_its_digest(store, client_id):
    """A take for a client id no row can have is limited under its digest, not refused."""
    decisions = await take_many([store], client_id, 3, BucketPolicy(2, 0))
    assert sorted(d.allowed for d in decisions) == [False, True, True]
    assert (await within(store.get(take_key(client_id)))).tokens == 0.0


@pytest.mark.parametrize("client_id", UNSTORABLE)
@pytest_twisted.ensureDeferred
async def test_unstorable_client_id_cannot_be_created_or_found(store, client_id):
    """create refuses such a client id naming client_id, writing nothing; get, update and
    delete find no bucket, without an error."""
    with pytest.raises(InvalidBucket) as caught:
        await within(store.create(client_id, 3, 3, 1))
    assert caught.value.field == "client_id"
    assert await within(store.list(10, 0)) == ([], 0)
    assert await within(store.get(client_id)) is None
    assert await within(store.update(client_id, capacity=1)) is None
    assert await within(store.delete(client_id)) is False


@pytest.mark.parametrize("rate", [0, MIN_REFILL_RATE, 1, MAX_REFILL_RATE])
@pytest_twisted.ensureDeferred
async def test_extreme_accepted_values_stay_computable(store, postgres_dsn, rate):
    """A bucket at the bounds (capacity 2^31 - 1, the slowest and fastest refill) can be read,
    taken from and updated after a century, in SQL."""
    await within(store.create("edge", MAX_CAPACITY, 0, rate))
    await sql(postgres_dsn, "UPDATE buckets SET updated_at = updated_at - interval '100 years'")
    assert 0 <= (await within(store.get("edge"))).tokens <= MAX_CAPACITY
    decision = await within(store.take("edge", BucketPolicy(MAX_CAPACITY, rate)))
    assert decision.limit == MAX_CAPACITY and decision.window >= 1
    await within(store.update("edge", refill_rate=rate))
    assert store.available


@pytest.mark.parametrize(
    ("fields", "field"),
    [((10, 0, 1e308), "refill_rate"), ((10, 0, 5e-324), "refill_rate"),
     ((10, 0, 1e-7), "refill_rate"), ((2**31, 0, 1), "capacity")],
)
@pytest_twisted.ensureDeferred
async def test_values_outside_the_bounds_are_refused(store, fields, field):
    """Values whose refill would overflow or underflow (or a capacity over the column) are
    InvalidBucket naming the field, and nothing is written."""
    with pytest.raises(InvalidBucket) as caught:
        await within(store.create("huge", *fields))
    assert caught.value.field == field
    assert await within(store.get("huge")) is None


@pytest_twisted.ensureDeferred
async def test_a_statement_the_server_cannot_compute_leaves_the_store_available(store):
    """A data exception (here a float overflow) fails that call with StoreDataError and
    one error line, no traceback; the store stays available and keeps serving."""
    logged = []
    globalLogPublisher.addObserver(logged.append)
    try:
        with pytest.raises(StoreDataError):
            await within(store.query("SELECT %s::float8 * 10", (1e308,)))
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert store.available
    assert [e.get("log_failure") for e in logged if e.get("log_level") == LogLevel.error] == [None]
    assert (await within(store.take("after", BucketPolicy(1, 1)))).allowed


@pytest_twisted.ensureDeferred
async def test_migration_repairs_refill_rates_outside_the_bounds(postgres_dsn, stores):
    """Rows stored before the bounds with rates that overflow or underflow get the nearest
    bound when the store migrates, and can be read again; in-bound rows are untouched."""
    await sql(postgres_dsn, "DROP TABLE IF EXISTS buckets, schema_migrations")
    await sql(postgres_dsn, "CREATE TABLE schema_migrations (version integer PRIMARY KEY, "
              "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT clock_timestamp())")
    for version, name, script in migrations()[:2]:
        await sql(postgres_dsn, script)
        await sql(postgres_dsn, "INSERT INTO schema_migrations VALUES (%s, %s)", (version, name))
    for client_id, rate in [("fast", 1e308), ("slow", 5e-324), ("slowish", 1e-10), ("ok", 2.5)]:
        await sql(postgres_dsn, "INSERT INTO buckets (client_id, capacity, tokens, refill_rate, "
                  "updated_at) VALUES (%s, 10, 0, %s, clock_timestamp() - interval '1 day')",
                  (client_id, rate))
    store = await stores()
    rates = {r.client_id: r.refill_rate for r in (await within(store.list(10, 0)))[0]}
    assert rates == {"fast": 1e9, "slow": 1e-6, "slowish": 1e-6, "ok": 2.5}
    assert (await within(store.get("fast"))).tokens == 10


@pytest_twisted.ensureDeferred
async def test_concurrent_takes_through_one_store_admit_exactly_capacity(store):
    """200 simultaneous takes on a bucket of 50 that never refills admit exactly 50."""
    await within(store.create("hot", 50, 50, 0))
    decisions = await take_many([store], "hot", 200)
    assert sum(d.allowed for d in decisions) == 50
    assert (await within(store.get("hot"))).tokens == 0.0


@pytest_twisted.ensureDeferred
async def test_concurrent_takes_through_two_stores_admit_exactly_capacity(store, stores):
    """Two stores with separate pools on one database admit 50 of 200 between them, in total."""
    other = await stores()
    await within(store.create("shared", 50, 50, 0))
    decisions = await take_many([store, other], "shared", 200)
    assert sum(d.allowed for d in decisions) == 50
    assert sum(d.allowed for d in decisions[0::2]) > 0
    assert sum(d.allowed for d in decisions[1::2]) > 0


@pytest_twisted.ensureDeferred
async def test_concurrent_first_sight_creates_one_bucket(store, stores):
    """200 simultaneous first requests of a new client, over two stores, share one default
    bucket: exactly 50 admitted."""
    other = await stores()
    decisions = await take_many([store, other], "newcomer", 200, BucketPolicy(50, 0))
    assert sum(d.allowed for d in decisions) == 50
    items, total = await within(store.list(10, 0))
    assert total == 1


@pytest_twisted.ensureDeferred
async def test_buckets_survive_a_store_restart(store, stores):
    """Buckets and their tokens outlive the store that wrote them."""
    await within(store.create("keep", 10, 10, 0))
    for _ in range(3):
        await within(store.take("keep", None))
    await within(store.stop())
    assert not store.available
    with pytest.raises(StoreUnavailable):
        await within(store.take("keep", None))
    await within(store.start())
    assert (await within(store.get("keep"))).tokens == 7.0
    fresh = await stores()
    assert (await within(fresh.take("keep", None))).remaining == 6


# --- failures ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_hung_query_times_out_and_the_store_recovers(stores, postgres_dsn):
    """A query stuck behind a lock fails with StoreUnavailable at the timeout; the store
    reconnects by itself and serves again."""
    store = await stores(query_timeout=0.5)
    await sql(postgres_dsn, "TRUNCATE buckets")
    await within(store.create("locked", 10, 10, 0))
    async with buckets_locked(postgres_dsn):
        began = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await within(store.take("locked", None))
        assert 0.4 < time.monotonic() - began < 2
        assert not store.available
        with pytest.raises(StoreUnavailable):  # fails fast meanwhile
            await within(store.take("locked", None), 0.1)
    await wait_available(store)
    assert (await within(store.take("locked", None))).allowed


@pytest_twisted.ensureDeferred
async def test_one_slow_query_does_not_take_a_live_store_down(stores, postgres_dsn):
    """A take stuck on a locked row times out alone while the server keeps answering others."""
    store = await stores(pool_size=2, query_timeout=0.5)
    await sql(postgres_dsn, "TRUNCATE buckets")
    await within(store.create("locked", 10, 10, 0))
    await within(store.create("free", 1000, 1000, 0))
    blocker = Connection(reactor)
    await within(blocker.connect(postgres_dsn))
    try:
        await within(blocker.runOperation("BEGIN"))
        await within(
            blocker.runOperation("SELECT 1 FROM buckets WHERE client_id = 'locked' FOR UPDATE")
        )
        stuck = store.take("locked", None)
        outcome: list[object] = []
        stuck.addBoth(outcome.append)
        began = time.monotonic()
        while time.monotonic() - began < 1.0:
            assert (await within(store.take("free", None))).allowed
            assert store.available
            await sleep(0.02)
        assert len(outcome) == 1
        assert outcome[0].check(StoreUnavailable)
    finally:
        await within(blocker.runOperation("ROLLBACK"))
        blocker.close()
    assert store.available
    assert (await within(store.get("locked"))).tokens >= 9.0


@pytest_twisted.ensureDeferred
async def test_database_restart_mid_traffic(store, stores, postgres_server):
    """Stopping the server mid-traffic fails takes fast with StoreUnavailable; once it is back
    the store serves again within 10 s, with every bucket intact."""
    if not postgres_server.controllable:
        _postgres.unavailable(
            "the fault test needs an ephemeral cluster it can stop; "
            f"unset {_postgres.ENV_URL} to get one"
        )
    idle = await stores()  # a second store, stopped while it is reconnecting
    await within(store.create("steady", 100_000, 100_000, 0))
    outcomes = {"ok": 0, "unavailable": 0}
    others: list[BaseException] = []
    slowest = 0.0
    running = True

    async def traffic() -> None:
        nonlocal slowest
        while running:
            began = time.monotonic()
            try:
                await within(store.take("steady", None), 10)
                outcomes["ok"] += 1
            except StoreUnavailable:
                outcomes["unavailable"] += 1
            except Exception as e:  # anything else is a bug
                others.append(e)
            slowest = max(slowest, time.monotonic() - began)
            await sleep(0.002)

    workers = [ensureDeferred(traffic()) for _ in range(5)]
    try:
        await sleep(0.2)
        before_stop = outcomes["ok"]
        assert before_stop > 0
        await within(deferToThread(postgres_server.stop))
        await sleep(0.3)
        assert not store.available
        began = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await within(store.take("steady", None))
        assert time.monotonic() - began < 0.5
        await within(idle.stop())
        assert not [
            call
            for call in reactor.getDelayedCalls()
            if getattr(call.func, "__self__", None) is idle
        ]
        await sleep(0.5)
    finally:
        await within(deferToThread(postgres_server.start), 60)
    restarted = time.monotonic()
    while not store.available:
        assert time.monotonic() - restarted < 10, "store did not reconnect within 10 s"
        await sleep(0.05)
    served_again = outcomes["ok"]
    await sleep(0.2)
    running = False
    await within(gatherResults(workers))
    assert not others
    assert outcomes["unavailable"] > 0
    assert outcomes["ok"] > served_again
    assert slowest < 1.0
    record = await within(store.get("steady"))
    # Every admitted take is in the table; a take cut off by the shutdown may have committed
    # without its answer arriving, so at most one per pooled connection more is missing.
    assert 100_000 - outcomes["ok"] - 8 <= record.tokens <= 100_000 - outcomes["ok"]


@pytest_twisted.ensureDeferred
async def test_unprepared_takes_behave_the_same(store, stores):
    """With prepare=False (for poolers in transaction mode) takes give the same decisions."""
    plain = await stores(prepare=False)
    first = await within(plain.take("p", BucketPolicy(2, 0)))
    assert (first.allowed, first.remaining) == (True, 1)
    assert (await within(plain.take("p", None))).allowed
    assert not (await within(store.take("p", None))).allowed
    assert await within(plain.take("unknown", None)) is None
    decisions = await take_many([plain, store], "p2", 40, BucketPolicy(10, 0))
    assert sum(d.allowed for d in decisions) == 10


# --- policies (SPEC 8, migration 0005) ---------------------------------------------


@pytest_twisted.ensureDeferred
async def test_buckets_stored_before_policies_survive_under_default(postgres_dsn, stores):
    """The schema as it was before policies, with rows (kept and from the default), then
    the store migrates: every row is there under ``default``, with its values, and takes
    and admin calls reach it as before."""
    await sql(postgres_dsn, "DROP TABLE IF EXISTS buckets, schema_migrations")
    await sql(postgres_dsn, "CREATE TABLE schema_migrations (version integer PRIMARY KEY, "
              "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT clock_timestamp())")
    before = [m for m in migrations() if m[0] < 5]
    assert [m[0] for m in before] == [1, 2, 3, 4]
    for version, name, script in before:
        await sql(postgres_dsn, script)
        await sql(postgres_dsn, "INSERT INTO schema_migrations VALUES (%s, %s)", (version, name))
    for client_id, capacity, tokens, from_default in [("alice", 10, 3, False),
                                                      ("10.0.0.7", 100, 40, True)]:
        await sql(postgres_dsn, "INSERT INTO buckets (client_id, capacity, tokens, refill_rate,"
                  " from_default) VALUES (%s, %s, %s, 0, %s)",
                  (client_id, capacity, tokens, from_default))

    store = await stores()
    rows = await sql(postgres_dsn, "SELECT policy, client_id, capacity, tokens, from_default "
                     "FROM buckets ORDER BY client_id", fetch=True)
    assert rows == [("default", "10.0.0.7", 100, 40.0, True), ("default", "alice", 10, 3.0, False)]
    records, total = await within(store.list(10, 0))
    assert total == 2 and {(r.policy, r.client_id) for r in records} == {
        ("default", "alice"), ("default", "10.0.0.7")}
    decision = await within(store.take("alice", BucketPolicy(50, 0)))
    assert (decision.allowed, decision.remaining) == (True, 2)
    assert (await within(store.take("alice", BucketPolicy(50, 0), "api"))).remaining == 49
    assert (await within(store.get("alice", "api"))).capacity == 50
    assert (await within(store.get("alice"))).tokens == 2.0
    assert (await within(store.list(10, 0, "api")))[1] == 1
    assert await within(store.delete("alice", "api"))
    assert (await within(store.get("alice"))) is not None
