"""LeasingStore against a real PostgreSQL server, on the real reactor.

The settlement statement is the part a fake cannot check: the row locks, the
lock order between instances, take-or-create, give-backs and the refill from
the database clock. Each test starts from an empty ``buckets`` table; every
wait is bounded.
"""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import Clock
from txpostgres.txpostgres import Connection

from equalizer.buckets.interface import StoreUnavailable
from equalizer.buckets.leasing import LINGER, MIN_LEASE, LeasingStore
from equalizer.buckets.postgres.store import PostgresStore
from equalizer.config.model import BucketPolicy
from equalizer.config.rules import MAX_CAPACITY, MAX_REFILL_RATE, MIN_REFILL_RATE
from tests.integration.harness import wait_until
from tests.integration.test_postgres_store import sleep, within
from tests.postgres import buckets_locked, sql, wait_available

TTL = 0.2

Factory = Callable[..., Awaitable[LeasingStore]]


@pytest_twisted.async_yield_fixture()
async def leasing(postgres_dsn: str) -> AsyncIterator[Factory]:
    """A factory of started LeasingStores (each on a PostgresStore of its own), over an empty
    buckets table; all stopped afterwards."""
    made: list[LeasingStore] = []

    async def make(ttl: float = TTL, clock: Any = reactor, **kwargs: Any) -> LeasingStore:
        store = LeasingStore(PostgresStore(postgres_dsn, reactor, **kwargs), clock, ttl=ttl)
        await within(store.start())
        if not made:
            await sql(postgres_dsn, "TRUNCATE buckets")
        made.append(store)
        return store

    yield make
    for store in made:
        await within(store.stop())


async def tokens(dsn: str, client_id: str) -> float:
    rows = await sql(dsn, "SELECT tokens FROM buckets WHERE client_id = %s", (client_id,), True)
    return rows[0][0]


async def advance(store: LeasingStore, clock: Clock, seconds: float) -> None:
    """Move ``store``'s clock on by ``seconds`` in steps of LINGER; after each step, wait
    for the settlement it sent (if any) to be answered by the database."""
    for _ in range(round(seconds / LINGER)):
        clock.advance(LINGER)
        await wait_until(lambda: not store._settlements.in_flight, message="the settlement to land")


async def take_all(calls: list[Deferred[Any]]) -> list[Any]:
    return await within(gatherResults(calls, consumeErrors=True))


def admitted(decisions: list[Any]) -> int:
    return sum(1 for d in decisions if d is not None and d.allowed)


# --- no over-admission -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_concurrent_takes_through_one_store_admit_exactly_capacity(leasing, postgres_dsn):
    """200 simultaneous takes on a bucket of 50 that never refills admit exactly 50; the row
    ends empty once leases are back."""
    store = await leasing()
    await within(store.create("hot", 50, 50, 0))
    decisions = await take_all([store.take("hot", None) for _ in range(200)])
    assert admitted(decisions) == 50
    assert [d.allowed for d in decisions] == [True] * 50 + [False] * 150
    await sleep(TTL * 2)
    assert await tokens(postgres_dsn, "hot") == 0.0


@pytest_twisted.ensureDeferred
async def test_concurrent_takes_through_two_stores_admit_exactly_capacity(leasing, postgres_dsn):
    """Two LeasingStores on one database admit 50 of 200 simultaneous takes between them."""
    stores = [await leasing(), await leasing()]
    await within(stores[0].create("shared", 50, 50, 0))
    decisions = await take_all([stores[i % 2].take("shared", None) for i in range(200)])
    assert admitted(decisions) == 50
    await sleep(TTL * 2)
    assert await tokens(postgres_dsn, "shared") == 0.0


@pytest_twisted.ensureDeferred
async def test_leases_over_time_never_add_up_to_more_than_the_bucket(leasing, postgres_dsn):
    """Waves of takes through two stores, with leases held, expired and given back between
    them, admit exactly the bucket's 50 in total; all leases end up back in the row."""
    stores = [await leasing(), await leasing()]
    await within(stores[0].create("waves", 50, 50, 0))
    total = 0
    for _ in range(20):  # 3 + 3 takes per wave: leases are partly used when the next comes
        wave = [stores[i % 2].take("waves", None) for i in range(6)]
        total += admitted(await take_all(wave))
        assert total <= 50
        await sleep(0.005)
    await sleep(TTL * 2)  # every unused allowance is back in the row
    assert await tokens(postgres_dsn, "waves") == 50 - total
    while total < 50:
        wave = [stores[i % 2].take("waves", None) for i in range(20)]
        decisions = await take_all(wave)
        total += admitted(decisions)
        assert total <= 50
        if not admitted(decisions):
            await sleep(TTL)  # refused while the other store's lease is outstanding
    assert total == 50
    await sleep(TTL * 2)
    assert await tokens(postgres_dsn, "waves") == 0.0


@pytest_twisted.ensureDeferred
async def test_first_sight_through_two_stores_creates_one_bucket(leasing, postgres_dsn):
    """200 simultaneous first requests of a new client over two stores share one default bucket:
    exactly 50 admitted, one row."""
    stores = [await leasing(), await leasing()]
    policy = BucketPolicy(50, 0)
    decisions = await take_all([stores[i % 2].take("newcomer", policy) for i in range(200)])
    assert admitted(decisions) == 50
    rows = await sql(postgres_dsn, "SELECT count(*) FROM buckets", fetch=True)
    assert rows == [(1,)]


@pytest_twisted.ensureDeferred
async def test_leasing_and_plain_instances_share_one_bucket_exactly(leasing, postgres_dsn):
    """A LeasingStore and a plain PostgresStore on one bucket of 50 admit 50 of 200 in total."""
    store = await leasing()
    plain = PostgresStore(postgres_dsn, reactor)
    await within(plain.start())
    try:
        await within(store.create("mixed", 50, 50, 0))
        calls = [(store if i % 2 else plain).take("mixed", None) for i in range(200)]
        assert admitted(await take_all(calls)) == 50
    finally:
        await within(plain.stop())


@pytest_twisted.ensureDeferred
async def test_settlement_uses_the_row_as_last_committed(leasing, postgres_dsn):
    """A settlement blocked on a row another session is changing grants from the committed
    change, not from the row as it was when the statement began."""
    store = await leasing()
    await within(store.create("x", 100, 100, 0))
    blocker = Connection(reactor)
    await within(blocker.connect(postgres_dsn))
    try:
        await within(blocker.runOperation("BEGIN"))
        await within(blocker.runOperation("UPDATE buckets SET tokens = 3 WHERE client_id = 'x'"))
        calls = [store.take("x", None) for _ in range(10)]
        await sleep(0.2)
        assert not any(d.called for d in calls)  # waiting for the row lock
        await within(blocker.runOperation("COMMIT"))
    finally:
        blocker.close()
    assert admitted(await take_all(calls)) == 3
    assert await tokens(postgres_dsn, "x") == 0.0


@pytest_twisted.ensureDeferred
async def test_overlapping_settlements_of_two_stores_never_deadlock(leasing, postgres_dsn):
    """Two stores settling random overlapping sets of new and old keys for a while get no errors,
    and no key admits more than its capacity."""
    stores = [await leasing(query_timeout=10), await leasing(query_timeout=10)]
    policy = BucketPolicy(20, 0)
    keys = [f"k{i:03d}" for i in range(300)]
    per_key: dict[str, int] = dict.fromkeys(keys, 0)
    rng = random.Random(7)
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        chosen = [rng.choice(keys) for _ in range(200)]
        calls = [stores[i % 2].take(key, policy) for i, key in enumerate(chosen)]
        for key, decision in zip(chosen, await take_all(calls), strict=True):
            per_key[key] += decision.allowed
        await sleep(0.01)
    assert max(per_key.values()) <= 20
    assert sum(per_key.values()) > 300


# --- leases: give-back, refill, batching ---------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_unused_leases_are_given_back_after_the_ttl(leasing, postgres_dsn):
    """Tokens leased but not used return to the row once the lease expires."""
    store = await leasing()
    await within(store.create("lease", 1000, 1000, 0))
    for _ in range(2):  # a key seen a second time gets a lease
        assert (await within(store.take("lease", None))).allowed
    assert await tokens(postgres_dsn, "lease") < 998.0
    await sleep(TTL * 2)
    assert await tokens(postgres_dsn, "lease") == 998.0


@pytest_twisted.ensureDeferred
async def test_stop_gives_leases_back(leasing, postgres_dsn):
    """Stopping the store returns its unused tokens to the row."""
    store = await leasing(ttl=60)
    await within(store.create("bye", 1000, 1000, 0))
    for _ in range(2):
        assert (await within(store.take("bye", None))).allowed
    assert await tokens(postgres_dsn, "bye") < 998.0
    await within(store.stop())
    assert await tokens(postgres_dsn, "bye") == 998.0


@pytest_twisted.ensureDeferred
async def test_refill_is_shared_across_leases(leasing, postgres_dsn):
    """A bucket of 10 refilling 10/s, hammered through two stores for a second, admits about
    its 10 plus the 10 refilled, never more than the database handed out."""
    stores = [await leasing(), await leasing()]
    await within(stores[0].create("refill", 10, 10, 10))
    total = 0
    began = time.monotonic()
    while time.monotonic() - began < 1.0:
        total += admitted(await take_all([s.take("refill", None) for s in stores]))
        await sleep(0.002)
    elapsed = time.monotonic() - began
    assert 17 <= total <= 10 + 10 * elapsed + 1


@pytest_twisted.ensureDeferred
async def test_many_distinct_keys_take_few_statements(leasing, postgres_dsn):
    """10,000 clients, each taking four times, are served with a handful of statements: the
    first two rounds settle in batches of 1000 keys, the others use the leases."""
    store = await leasing(ttl=5)
    policy = BucketPolicy(100, 1)
    ids = [f"client-{i}" for i in range(10_000)]
    for _ in range(4):
        assert admitted(await take_all([store.take(c, policy) for c in ids])) == 10_000
    assert store.statements <= 24  # 40,000 takes
    rows = await sql(postgres_dsn, "SELECT count(*), sum(tokens) FROM buckets", fetch=True)
    assert rows[0][0] == 10_000


@pytest_twisted.ensureDeferred
async def test_flood_on_an_empty_bucket_takes_few_statements(leasing, postgres_dsn):
    """Thousands of refused requests over a second cost about one statement per TTL."""
    store = await leasing()
    await within(store.create("empty", 5, 0, 0))
    began = time.monotonic()
    refused = 0
    while time.monotonic() - began < 1.0:
        decisions = await take_all([store.take("empty", None) for _ in range(100)])
        refused += sum(not d.allowed for d in decisions)
        await sleep(0.01)
    assert refused >= 2000
    assert store.statements <= 1.0 / TTL + 3


@pytest_twisted.ensureDeferred
async def test_unknown_client_without_default_is_not_limited(leasing, postgres_dsn):
    """With no default a client without a bucket is not limited, and gets no row."""
    store = await leasing()
    assert await within(store.take("nobody", None)) is None
    assert await within(store.take("nobody", None)) is None
    assert await within(store.get("nobody")) is None


@pytest_twisted.ensureDeferred
async def test_idle_keys_are_released(leasing, postgres_dsn):
    """Keys nobody uses any more leave no state behind, and their tokens go back.

    The store's own time runs on a test clock, moved on in steps, each step's settlement
    (on the real database) landing before the next: a busy machine changes nothing."""
    clock = Clock()
    store = await leasing(clock=clock)
    ids = [f"idle-{i}" for i in range(2000)]
    takes = [store.take(c, BucketPolicy(10, 0)) for c in ids]
    await advance(store, clock, 10 * LINGER)  # two statements of MAX_BATCH keys
    await take_all(takes)
    assert len(store._keys) == 2000
    await advance(store, clock, TTL * 2.5)
    assert not store._keys and not store._allowances.returns and not store._settlements.pending
    assert not store._settlements.in_flight
    rows = await sql(postgres_dsn, "SELECT min(tokens), max(tokens) FROM buckets", fetch=True)
    assert rows == [(9.0, 9.0)]


# --- admin changes ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_update_and_delete_through_the_store_take_effect_at_once(leasing, postgres_dsn):
    """Emptying or deleting a bucket through the admin API stops its lease being used here at
    once; another instance admits at most the tokens it had leased before the change."""
    here, there = await leasing(), await leasing()
    await within(here.create("admin", 1000, 1000, 0))
    assert (await within(here.take("admin", None))).allowed
    assert (await within(there.take("admin", None))).allowed  # and leased MIN_LEASE more
    leased = there._keys["admin"].allowance
    assert leased == MIN_LEASE
    await within(here.update("admin", tokens=0))
    assert not (await within(here.take("admin", None))).allowed
    late = 0
    began = time.monotonic()
    while time.monotonic() - began < TTL * 3:
        late += (await within(there.take("admin", None))).allowed
        await sleep(0.01)
    assert late <= leased
    assert not (await within(there.take("admin", None))).allowed
    await within(here.delete("admin"))
    assert await within(here.take("admin", None)) is None
    assert await within(here.get("admin")) is None


# --- failures ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_unreachable_database_fails_takes_without_hanging(leasing, postgres_dsn):
    """A settlement stuck behind a lock fails its takes with StoreUnavailable at the query
    timeout; later takes fail at once, and the store serves again once it is free."""
    store = await leasing(query_timeout=0.5)
    await within(store.create("locked", 10, 10, 0))
    async with buckets_locked(postgres_dsn):
        began = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await within(store.take("locked", None))
        assert time.monotonic() - began < 2
        with pytest.raises(StoreUnavailable):
            await within(store.take("locked", None), 0.1)
    await wait_available(store)
    assert (await within(store.take("locked", None))).allowed


@pytest.mark.parametrize("rate", [MIN_REFILL_RATE, MAX_REFILL_RATE])
@pytest_twisted.ensureDeferred
async def test_settlement_computes_buckets_at_the_bounds(leasing, postgres_dsn, rate):
    """The settlement function refills and leases from buckets at the bounds (capacity
    2^31 - 1, slowest and fastest refill) a century old, and creates them from such a default."""
    store = await leasing()
    await within(store.create("edge", MAX_CAPACITY, 0, rate))
    await sql(postgres_dsn, "UPDATE buckets SET updated_at = updated_at - interval '100 years'")
    default = BucketPolicy(MAX_CAPACITY, rate)
    decisions = await take_all([store.take("edge", default), store.take("new", default)])
    assert all(d.allowed and d.limit == MAX_CAPACITY for d in decisions)
    assert store.available


@pytest_twisted.ensureDeferred
async def test_reads_with_one_instance_stay_exact_through_expiry_and_give_back(
        leasing, postgres_dsn):
    """With one instance and refill 0, reads of a bucket and of the list show the same tokens
    while its lease is live, expired, being given back and back in the row."""
    store = await leasing()
    policy = BucketPolicy(100, 0)
    for _ in range(3):
        assert (await within(store.take("exact", policy))).allowed
    assert await tokens(postgres_dsn, "exact") < 97.0  # a lease is out
    seen: list[float] = []
    deadline = time.monotonic() + 10
    while await tokens(postgres_dsn, "exact") != 97.0 or len(seen) < 50:
        assert time.monotonic() < deadline, seen
        record = await within(store.get("exact"))
        page, _ = await within(store.list(10, 0))
        seen += [record.tokens, page[0].tokens]
    assert set(seen) == {97.0}
