"""Bucket lifetime on a Clock: MemoryStore's full default buckets are swept and the cap
holds; how often the PostgreSQL store sweeps."""

from __future__ import annotations

import math
import sys

import pytest
from twisted.internet.task import Clock

from equalizer.balancer.stats import bucket_counts
from equalizer.buckets.interface import MAX_SWEEP_INTERVAL, sweep_interval
from equalizer.buckets.maths import Bucket, is_full, refill
from equalizer.buckets.memory import SWEEP_CHUNK, MemoryStore
from equalizer.buckets.postgres.store import SWEEP_IDLE, PostgresStore
from equalizer.config.model import BucketPolicy, RateLimitConfig
from tests.helpers import result_of

POLICY = BucketPolicy(capacity=4, refill_rate=1.0)  # refill window 4 s: the sweep interval


def make_store(clock: Clock, policy: BucketPolicy | None = POLICY,
               max_buckets: int = 1000) -> MemoryStore:
    store = MemoryStore(clock)
    store.configure(RateLimitConfig(default=policy, max_buckets=max_buckets))
    result_of(store.start())
    return store


def take(store: MemoryStore, client_id: str, times: int = 1, policy=POLICY) -> list[bool]:
    return [result_of(store.take(client_id, policy)).allowed for _ in range(times)]


def held(store: MemoryStore) -> set[str]:
    records, _ = result_of(store.list(100_000, 0))
    return {record.client_id for record in records}


def test_is_full_once_refilled_to_capacity():
    """A bucket is full from the moment its refill reaches the capacity, not before."""
    bucket = Bucket(4, 1.0, 1.0, 100.0)
    assert not is_full(bucket, 102.999)
    assert is_full(bucket, 103.0)
    assert not is_full(Bucket(4, 3.5, 0.0, 100.0), 1e9)
    assert is_full(Bucket(4, 4.0, 0.0, 100.0), 100.0)
    assert not is_full(Bucket(4, 3.0, 1.0, 100.0), 99.0)  # a clock behind: no refill


def test_is_full_agrees_with_refill():
    """is_full says what refill would: its tokens reach the capacity (same sum, same order)."""
    for tokens in (0.0, 0.1, 2.5, 3.999999, 4.0):
        for rate in (0.0, 0.3, 1.0, 1e9):
            for now in (99.0, 100.0, 100.0000001, 101.7, 1e6):
                bucket = Bucket(4, tokens, rate, 100.0)
                assert is_full(bucket, now) == (refill(bucket, now).tokens >= 4)


@pytest.mark.parametrize(("policy", "seconds"), [
    (None, MAX_SWEEP_INTERVAL),
    (BucketPolicy(100, 10.0), 10.0),
    (BucketPolicy(1, 1e9), 1.0),
    (BucketPolicy(100, 0.0), MAX_SWEEP_INTERVAL),
    (BucketPolicy(1000, 1.0), MAX_SWEEP_INTERVAL),
])
def test_sweep_interval_is_the_default_refill_window_within_bounds(policy, seconds):
    """The sweep runs every refill window of the default policy, from 1 s to 60 s."""
    assert sweep_interval(policy) == seconds


def test_full_default_bucket_is_swept_and_spent_one_waits_until_refilled(clock):
    """A sweep forgets default buckets that are full again and keeps a spent one until it
    has refilled, sweeping it at the first sweep after that."""
    store = make_store(clock)
    take(store, "light")
    clock.advance(3.5)
    assert take(store, "heavy", 4) == [True, True, True, True]  # 0 left at 3.5 s
    clock.advance(0.49)
    assert held(store) == {"light", "heavy"}  # no sweep before the interval
    clock.advance(0.01)  # 4 s: the first sweep
    assert held(store) == {"heavy"}
    assert store.swept == 1
    assert result_of(store.get("heavy")).tokens == pytest.approx(0.5)
    clock.advance(4)  # 8 s: "heavy" has been full since 7.5 s
    assert held(store) == set()
    assert store.swept == 2
    assert store.bucket_count == 0


def test_a_full_bucket_used_since_the_last_sweep_began_stays_until_the_next(clock):
    """A client that comes back within a sweep interval keeps its bucket, full or not
    (with a default that refills within a second, forgetting it made it again at nearly
    every return); unused for a whole interval, it goes."""
    store = make_store(clock)  # sweeps at 4, 8, ...
    take(store, "back")
    clock.advance(3.0)
    take(store, "back")  # full again at 4
    clock.advance(1.0)
    assert held(store) == {"back"}  # full, but used since the sweep before began (start)
    clock.advance(4.0)
    assert held(store) == set()  # unused since the sweep at 4 began
    assert store.swept == 1


def test_the_sweep_a_new_client_at_the_cap_starts_forgets_full_buckets_used_lately(clock):
    """Room for new clients comes first: the sweep the cap starts forgets every full
    default bucket, those used since the last sweep began too."""
    store = make_store(clock, max_buckets=2)
    clock.advance(4)  # a sweep begins
    clock.advance(0.1)
    take(store, "a")
    take(store, "b")
    clock.advance(1.1)  # both full again, both used since that sweep began
    assert take(store, "c") == [False]  # at the cap: refused, and a sweep starts
    clock.advance(0)
    assert held(store) == set()
    assert take(store, "c") == [True]


def test_a_forgotten_client_comes_back_to_a_full_bucket(clock):
    """A client whose full bucket was swept gets the same full bucket it would have had."""
    store = make_store(clock)
    take(store, "a", 2)
    clock.advance(8)
    assert held(store) == set()
    assert take(store, "a", 5) == [True, True, True, True, False]


def test_buckets_made_or_changed_through_the_api_are_never_swept(clock):
    """Buckets created (POST) or changed (PUT) through the admin API stay, full or not,
    until deleted; one taken from again after its deletion is a default bucket again."""
    store = make_store(clock)
    result_of(store.create("api", 10, 10, 1.0))
    take(store, "changed")
    result_of(store.update("changed", tokens=4))
    clock.advance(60)
    assert held(store) == {"api", "changed"}
    assert result_of(store.delete("api"))
    take(store, "api")
    clock.advance(60)
    assert held(store) == {"changed"}


def test_a_sweep_looks_at_one_chunk_per_reactor_turn(clock):
    """A sweep over more buckets than SWEEP_CHUNK forgets them a chunk per reactor turn,
    so one turn never stalls the reactor, and finishes within the same moment."""
    store = MemoryStore(clock)
    store.configure(RateLimitConfig(default=POLICY))
    turns: list[int] = []
    sweep = store._sweep

    def turn() -> None:
        turns.append(store.bucket_count)
        sweep()

    store._sweep = turn  # what each reactor turn of the sweep finds
    result_of(store.start())
    count = SWEEP_CHUNK * 2 + 5
    for i in range(count):
        store.take(f"k{i}", POLICY)
    clock.advance(4)
    assert turns == [count, count - SWEEP_CHUNK, count - 2 * SWEEP_CHUNK]
    assert store.bucket_count == 0
    assert store.swept == count


def test_reconfiguring_a_shorter_window_brings_the_next_sweep_forward(clock):
    """A reload to a default with a shorter refill window moves the pending sweep up to it."""
    store = make_store(clock, BucketPolicy(1000, 10.0))  # a 60 s interval
    take(store, "a")
    store.configure(RateLimitConfig(default=POLICY))
    clock.advance(4)
    assert held(store) == set()


def test_new_client_at_the_cap_is_refused_and_a_sweep_starts(clock):
    """At max_buckets a new client is refused (429, Retry-After the sweep interval) and a
    sweep starts at once; clients with a bucket are served; a freed place admits again."""
    store = make_store(clock, max_buckets=3)
    take(store, "a", 3)
    for client_id in ("b", "c"):
        take(store, client_id, 2)
    refused = result_of(store.take("d", POLICY))
    assert not refused.allowed
    assert refused.retry_after == math.ceil(sweep_interval(POLICY)) == 4
    assert (refused.limit, refused.remaining) == (4, 0)
    assert store.over_cap == 1
    assert take(store, "a") == [True]
    assert [call.getTime() for call in clock.getDelayedCalls()] == [clock.seconds()]
    clock.advance(0)  # the sweep: nothing is full yet, nothing goes
    assert held(store) == {"a", "b", "c"}
    assert take(store, "d") == [False]
    clock.advance(0)
    clock.advance(3)  # b and c are full, and no sweep has run since
    assert take(store, "e") == [False]  # ... this refusal starts one
    clock.advance(0)
    assert held(store) == {"a"}
    assert take(store, "d") == [True]
    assert take(store, "e") == [True]
    assert store.over_cap == 3


def test_the_cap_counts_but_never_refuses_admin_buckets(clock):
    """Buckets created through the admin API count towards max_buckets but are not refused."""
    store = make_store(clock, max_buckets=1)
    result_of(store.create("api-1", 5, 5, 1.0))
    result_of(store.create("api-2", 5, 5, 1.0))
    assert take(store, "client") == [False]
    assert store.bucket_count == 2


def test_stop_ends_the_sweep(clock):
    """A stopped store schedules nothing more."""
    store = make_store(clock)
    take(store, "a")
    result_of(store.stop())
    assert clock.getDelayedCalls() == []


def test_a_large_sweep_gives_the_dict_room_back(clock):
    """After a sweep that forgets most buckets, the store's dict is rebuilt at its new size
    (a dict never shrinks on deletion)."""
    store = make_store(clock)
    for i in range(50_000):
        store.take(f"k{i}", POLICY)
    grown = sys.getsizeof(store.buckets)
    clock.advance(4)
    assert store.bucket_count == 0
    assert sys.getsizeof(store.buckets) < grown // 100


def test_bucket_counts_for_stats(clock):
    """/stats reports buckets held, swept and refused at the cap, from the store."""
    store = make_store(clock, max_buckets=1)
    take(store, "a")
    take(store, "b")
    assert bucket_counts(store) == {"held": 1, "swept": 0, "over_cap": 1}
    clock.advance(4)
    assert bucket_counts(store) == {"held": 0, "swept": 1, "over_cap": 1}


def test_postgres_store_sweeps_no_more_often_than_rows_may_go():
    """The PostgreSQL store sweeps every refill window, but at most once per ``sweep_idle``
    (a row goes only once unchanged that long): a bucket refilling within a second is
    swept every 10 s, not every second; a longer window is kept as it is."""
    store = PostgresStore("dbname=unused", Clock())  # not started: configure only
    store.configure(RateLimitConfig(default=BucketPolicy(capacity=10, refill_rate=1e9)))
    assert store.interval == SWEEP_IDLE == 10.0
    store.configure(RateLimitConfig(default=BucketPolicy(capacity=30, refill_rate=1.0)))
    assert store.interval == 30.0
    store.configure(RateLimitConfig(default=None))
    assert store.interval == MAX_SWEEP_INTERVAL
