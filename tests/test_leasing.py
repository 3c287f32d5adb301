"""LeasingStore's own logic (leases, batching, expiry), over a fake database and a fake clock.

The fake answers the settlement statement with the same arithmetic as its SQL
(tests/integration/test_leasing.py runs the real statement), on top of a
MemoryStore, which also serves the admin calls.
"""

from __future__ import annotations

import itertools

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from equalizer.buckets.interface import (
    BucketExists,
    IBucketStore,
    InvalidBucket,
    StoreUnavailable,
    take_key,
)
from equalizer.buckets.leases.allowances import (
    PREFETCH_FROM,
    PREFETCH_LAST_FROM,
    PREFETCH_LEFT,
    RENEW_AFTER,
    RENEW_LEAD,
    RENEW_LEAD_MIN,
    renew_from,
)
from equalizer.buckets.leases.answers import MAX_ATTEMPTS
from equalizer.buckets.leases.sweep import SWEEP_CHUNK as LEASE_SWEEP_CHUNK
from equalizer.buckets.leasing import LeasingStore
from equalizer.buckets.maths import Decision
from equalizer.config.model import BucketPolicy, RateLimitConfig
from equalizer.testing import FakeLeaseDatabase, SlowReadsDatabase
from tests.helpers import bounded, result_of, taken

TTL = 0.5


@pytest.fixture
def db(clock: Clock) -> FakeLeaseDatabase:
    return FakeLeaseDatabase(clock)


@pytest.fixture
def store(db: FakeLeaseDatabase, clock: Clock) -> LeasingStore:
    """A store whose allowances last TTL from their lease, used or not, that leases at least
    2 tokens and settles on the next reactor turn."""
    store = LeasingStore(db, clock, ttl=TTL, max_age=TTL, remember=TTL, min_lease=2,
                         max_lease=64, max_batch=1000, linger=0)
    result_of(store.start())
    return store


def settle(clock: Clock) -> None:
    """Let the scheduled settlement run (it is scheduled for the next reactor turn)."""
    clock.advance(0)


def seen(store: LeasingStore, clock: Clock, client_id: str, default: BucketPolicy | None) -> None:
    """Take once and settle: that settlement serves the take and leases twice it (2 tokens)."""
    d = store.take(client_id, default)
    settle(clock)
    assert result_of(d).allowed


def test_provides_the_interface(store, db):
    """LeasingStore fully provides IBucketStore and reports the wrapped store's availability."""
    assert verifyObject(IBucketStore, store)
    assert store.available is True


def test_first_take_waits_for_one_settlement_then_later_takes_are_local(store, db, clock):
    """A new key's first take costs a statement, which also leases twice the demand; takes
    within the lease answer at once without SQL, and the next lease follows the demand."""
    first = store.take("a", BucketPolicy(1000, 0))
    assert not first.called
    settle(clock)
    decision = result_of(first)
    assert decision.allowed and decision.limit == 1000
    assert db.settlements[0]["a"] == (1, 2, 0, 1000)  # 1 waiting, a lease of 2 more
    for _ in range(2):
        assert result_of(store.take("a", BucketPolicy(1000, 0))).allowed
    assert store.statements == 1 and store.settled_keys == 1
    assert db.tokens("a") == 997.0
    again = store.take("a", BucketPolicy(1000, 0))
    settle(clock)
    assert result_of(again).allowed
    # demand 1 + 2 used, by a key leased a moment ago (busy): lease 12, four times
    assert db.settlements[1]["a"] == (1, 12, 0, 1000)


def test_remaining_counts_the_database_and_the_allowance(store, db, clock):
    """remaining is the row's whole tokens after the grant plus the allowance left."""
    d = store.take("a", BucketPolicy(10, 0))
    settle(clock)
    assert result_of(d).remaining == 9  # granted 2 (1 + lease capped at 10 // 10): 8 + 1
    assert result_of(store.take("a", None)).remaining == 8


def test_requests_of_one_turn_share_one_statement_in_arrival_order(store, db, clock):
    """Requests arriving together go in one statement; the first get the tokens, the rest a
    refusal that says when to retry."""
    db.create("small", 3, 3, 0.5)
    results = [taken(store.take("small", None)) for _ in range(5)]
    settle(clock)
    assert store.statements == 1
    decisions = [r[0] for r in results]
    assert [d.allowed for d in decisions] == [True, True, True, False, False]
    assert [d.remaining for d in decisions[:3]] == [2, 1, 0]
    assert decisions[3].retry_after == 2  # one token at 0.5/s
    assert db.tokens("small") == 0.0


def test_one_statement_in_flight_and_demand_accumulates(store, db, clock):
    """While a statement runs, new demand waits and goes out together in the next one."""
    db.hold = True
    first = taken(store.take("k0", BucketPolicy(100, 1)))
    settle(clock)
    later = [taken(store.take(f"k{i}", BucketPolicy(100, 1))) for i in range(1, 50)]
    settle(clock)
    assert len(db.held) == 1
    db.answer()
    assert first[0].allowed
    assert not any(later_result for later_result in later)
    settle(clock)
    assert len(db.held) == 1
    assert len(db.settlements[1]) == 49
    db.answer()
    assert all(r[0].allowed for r in later)
    assert store.statements == 2


def test_statements_carry_at_most_max_batch_keys(db, clock):
    """More waiting keys than max_batch go out in several statements, none above the bound."""
    store = LeasingStore(db, clock, ttl=TTL, max_batch=100, linger=0)
    result_of(store.start())
    results = [taken(store.take(f"k{i}", BucketPolicy(10, 1))) for i in range(250)]
    for _ in range(3):
        settle(clock)
    assert [len(s) for s in db.settlements] == [100, 100, 50]
    assert all(r[0].allowed for r in results)


@pytest.mark.parametrize(("pause", "expected"), [
    (0.2, [2, 6, 14, 30, 62, 64, 64]),  # leased 0.2 s before: twice
    (0.0, [2, 12, 52, 64, 64, 64, 64]),  # busy, within a quarter of max_age: four times
], ids=["twice", "busy"])
def test_lease_grows_with_demand_up_to_the_cap(store, db, clock, pause, expected):
    """The lease is twice the demand since the last settlement, four times for a key
    whose last lease was sent within a quarter of max_age (0.125 s), at most max_lease."""
    policy = BucketPolicy(100_000, 0)
    seen(store, clock, "hot", policy)
    extras = [db.settlements[-1]["hot"][1]]
    for _ in range(6):
        clock.advance(pause)
        while True:  # use the allowance up, then one more request waits
            d = store.take("hot", policy)
            if not d.called:
                break
        settle(clock)
        assert result_of(d).allowed
        extras.append(db.settlements[-1]["hot"][1])
    assert extras == expected


def test_lease_never_exceeds_a_tenth_of_the_bucket(store, db, clock):
    """A bucket of 50 leases at most 5 tokens beyond the waiting requests (SQL caps it)."""
    db.create("fifty", 50, 50, 0)
    d = store.take("fifty", None)
    for _ in range(40):
        store.take("fifty", None)
    settle(clock)
    assert result_of(d).allowed
    assert db.settlements[0]["fifty"][:2] == (41, 64)  # twice the demand, max_lease: asked
    assert db.tokens("fifty") == 50 - 41 - 5


def test_refusal_is_remembered_until_a_token_is_due(store, db, clock):
    """An empty bucket refuses locally until its next token is due (at most the TTL)."""
    db.create("empty", 5, 0, 8.0)  # a token every 0.125 s
    first = taken(store.take("empty", None))
    settle(clock)
    assert not first[0].allowed
    for _ in range(100):
        refused = store.take("empty", None)
        assert refused.called and not result_of(refused).allowed
    assert store.statements == 1
    clock.advance(0.125)
    again = taken(store.take("empty", None))
    settle(clock)
    assert again[0].allowed
    assert store.statements == 2


def test_refusal_of_a_bucket_that_never_refills_lasts_one_ttl(store, db, clock):
    """Without refill, the remembered refusal expires after the TTL and the database is asked."""
    db.create("never", 5, 0, 0)
    taken(store.take("never", None))
    settle(clock)
    clock.advance(TTL - 0.01)
    assert store.take("never", None).called
    clock.advance(0.01)
    assert not store.take("never", None).called
    settle(clock)
    assert store.statements == 2


def test_unknown_client_without_default_is_not_limited_and_remembered(store, db, clock):
    """With no default and no bucket the answer is None, remembered for the TTL."""
    first = taken(store.take("nobody", None))
    second = taken(store.take("nobody", None))
    settle(clock)
    assert first == [None] and second == [None]
    assert result_of(store.take("nobody", None)) is None
    assert store.statements == 1
    assert result_of(db.get("nobody")) is None


def test_empty_client_id_is_refused_at_once(store, db):
    """An empty client id fails with InvalidBucket, with no statement."""
    with pytest.raises(InvalidBucket):
        result_of(store.take("", BucketPolicy(1, 1)))
    assert store.statements == 0


@pytest.mark.parametrize("client_id", ["x" * 513, "bad\udc80", "tab\there", "\x85\x01"])
def test_unstorable_client_id_is_settled_under_its_digest(store, db, clock, client_id):
    """A client id no row can have is leased and limited under its digest, never sent as it is."""
    d = store.take(client_id, BucketPolicy(2, 0))
    settle(clock)
    assert result_of(d).allowed
    assert list(db.settlements[0]) == [take_key(client_id)]
    assert result_of(store.take(client_id, BucketPolicy(2, 0))).allowed  # from the lease
    refused = store.take(client_id, BucketPolicy(2, 0))
    settle(clock)
    assert not result_of(refused).allowed


def test_unused_allowance_expires_and_is_given_back_in_one_statement(store, db, clock):
    """After the TTL allowances are no longer used; the sweep gives them all back together."""
    for i in range(20):
        taken(store.take(f"k{i}", BucketPolicy(1000, 0)))
    settle(clock)
    for i in range(20):
        assert store.take(f"k{i}", BucketPolicy(1000, 0)).called  # one of the 2 leased
    assert db.tokens("k0") == 997.0
    statements = store.statements
    clock.advance(TTL)  # the sweep runs every TTL / 2
    settle(clock)
    assert store.statements == statements + 1
    assert len(db.settlements[-1]) == 20
    assert all(v == (0, 0, 1, None) for v in db.settlements[-1].values())
    assert db.tokens("k0") == 998.0


def test_expired_allowance_is_not_used(store, db, clock):
    """A take after the TTL goes to the database, and the stale allowance goes back with it."""
    clock.advance(0.1)  # out of step with the sweep, which would otherwise give it back first
    seen(store, clock, "a", BucketPolicy(1000, 0))
    clock.advance(0.4)  # both sweeps so far ran before the allowance expired
    clock.advance(0.11)
    d = store.take("a", BucketPolicy(1000, 0))
    assert not d.called
    settle(clock)
    assert result_of(d).allowed
    want, _, back, _ = db.settlements[-1]["a"]
    assert (want, back) == (1, 2)


def test_idle_keys_are_forgotten(store, db, clock):
    """Keys not used for a while take no memory: after the sweep nothing is kept about them."""
    for i in range(10_000):
        taken(store.take(f"k{i}", BucketPolicy(10, 1)))
    for _ in range(10):
        settle(clock)
    assert len(store._keys) == 10_000
    for _ in range(4):  # kept for a TTL after their lease, to lease if they come back
        clock.advance(TTL / 2)
    assert not store._keys
    assert not store._settlements.pending and not store._allowances.returns


def test_requests_arriving_during_a_settlement_use_its_grant(store, db, clock):
    """Requests that came while their key was settling are served from the new allowance."""
    db.create("k", 1000, 1000, 0)
    db.hold = True
    first = taken(store.take("k", None))
    settle(clock)
    late = [taken(store.take("k", None)) for _ in range(2)]
    settle(clock)
    db.answer()
    assert first[0].allowed and all(r[0].allowed for r in late)
    settle(clock)
    assert store.statements == 1


def test_requests_arriving_during_a_refusal_are_refused_with_it(store, db, clock):
    """Requests that came while their key was found empty are refused without another statement."""
    db.hold = True
    db.create("k", 2, 0, 0)
    first = taken(store.take("k", None))
    settle(clock)
    late = taken(store.take("k", None))
    db.answer()
    assert not first[0].allowed and not late[0].allowed
    settle(clock)
    assert store.statements == 1


def test_update_and_delete_drop_the_allowance(store, db, clock):
    """An admin update or delete through the store stops the old allowance being used."""
    taken(store.take("a", BucketPolicy(1000, 0)))
    settle(clock)
    result_of(store.update("a", tokens=0))
    d = store.take("a", None)
    assert not d.called
    settle(clock)
    assert not result_of(d).allowed
    assert db.settlements[-1]["a"][2] == 0  # nothing given back onto the admin's value
    result_of(store.delete("a"))
    d = store.take("a", None)  # the remembered refusal went with the bucket
    assert not d.called
    settle(clock)
    assert result_of(d) is None


def test_update_during_a_settlement_leaves_no_allowance(store, db, clock):
    """A grant from before an admin change answers its requests but leaves nothing to lease."""
    db.hold = True
    db.create("a", 1000, 1000, 0)
    first = taken(store.take("a", None))
    settle(clock)
    store.update("a", tokens=500)
    db.answer()
    assert first[0].allowed
    d = store.take("a", None)
    assert not d.called


def test_create_drops_a_remembered_not_limited(store, db, clock):
    """Creating a bucket through the store ends the remembered "not limited" for its key."""
    d = store.take("new", None)
    settle(clock)
    assert result_of(d) is None
    result_of(store.create("new", 1, 0, 0))
    d = store.take("new", None)
    settle(clock)
    assert not result_of(d).allowed


def test_database_failure_fails_the_waiting_requests(store, db, clock):
    """A failed statement fails all its requests with StoreUnavailable; the next one works."""
    db.failing = StoreUnavailable("down")
    results = [taken(store.take(f"k{i}", BucketPolicy(10, 1))) for i in range(5)]
    settle(clock)
    assert all(r[0].check(StoreUnavailable) for r in results)
    db.failing = None
    d = store.take("k0", BucketPolicy(10, 1))
    settle(clock)
    assert result_of(d).allowed


def test_unexpected_errors_become_store_unavailable(store, db, clock):
    """Any other error of the statement reaches the limiter as StoreUnavailable."""
    db.failing = RuntimeError("boom")
    result = taken(store.take("k", BucketPolicy(10, 1)))
    settle(clock)
    assert result[0].check(StoreUnavailable)


def test_bucket_vanishing_under_the_statement_is_retried_then_given_up(store, db, clock):
    """A key the statement neither found nor created is retried, and fails after a few tries."""
    db.hidden.add("ghost")
    result = taken(store.take("ghost", BucketPolicy(10, 1)))
    for _ in range(MAX_ATTEMPTS + 1):
        settle(clock)
    assert result[0].check(StoreUnavailable)
    assert store.statements == MAX_ATTEMPTS + 1
    db.hidden.clear()
    d = store.take("ghost", BucketPolicy(10, 1))
    settle(clock)
    assert result_of(d).allowed


def test_stop_gives_allowances_back_and_stops_the_database(store, db, clock):
    """stop() returns unused tokens, fails requests not yet sent, then stops the wrapped store."""
    seen(store, clock, "a", BucketPolicy(1000, 0))
    assert db.tokens("a") == 997.0
    waiting = taken(store.take("b", BucketPolicy(1000, 0)))
    result_of(store.stop())
    assert waiting[0].check(StoreUnavailable)
    assert db.tokens("a") == 999.0
    assert db.stopped
    with pytest.raises(StoreUnavailable):
        result_of(store.take("a", BucketPolicy(1000, 0)))
    assert not clock.getDelayedCalls()


def test_stop_waits_a_bounded_time_for_a_hung_database(store, db, clock):
    """stop() gives up giving tokens back after stop_timeout and stops anyway."""
    seen(store, clock, "a", BucketPolicy(1000, 0))
    db.hold = True
    stopped = taken(store.stop())
    assert not stopped
    clock.advance(2.0)
    assert stopped == [None]
    assert db.stopped


def test_stop_waits_for_the_settlement_in_flight(store, db, clock):
    """stop() lets the running statement finish before giving the tokens back."""
    db.hold = True
    first = taken(store.take("a", BucketPolicy(1000, 0)))
    settle(clock)
    stopped = taken(store.stop())
    db.answer()
    assert first[0].allowed
    assert not stopped  # now giving back the lease
    db.answer()
    assert stopped == [None]
    assert db.tokens("a") == 999.0


def test_busy_key_gets_its_next_lease_before_running_out(store, db, clock):
    """A tiny allowance (below PREFETCH_LAST_FROM) is used up and the next request waits; a
    larger one asks for the next lease with PREFETCH_LEFT tokens left, one of PREFETCH_FROM
    or more once half is used, so no further request of a busy key waits. What was left of
    the old lease goes back in the key's next row; a lease ahead carries the default.
    Each lease is used 0.2 s after it came (more than a quarter of max_age: twice the
    demand)."""
    assert (PREFETCH_LAST_FROM, PREFETCH_LEFT, PREFETCH_FROM) == (4, 2, 16)
    policy = BucketPolicy(100_000, 0)
    seen(store, clock, "hot", policy)  # granted 1 + 2: tiny, used up
    clock.advance(0.2)
    for _ in range(2):
        assert store.take("hot", policy).called
    d = store.take("hot", policy)
    settle(clock)
    assert result_of(d).allowed and db.settlements[-1]["hot"] == (1, 6, 0, 100_000)
    waits = store.waits
    # (tokens used until the next lease is asked for, its row: want, lease, given back)
    for used, row in ((4, (0, 8, 0)), (6, (0, 12, 2)), (10, (0, 20, 2)), (10, (0, 20, 2))):
        clock.advance(0.2)
        for _ in range(used):
            assert store.take("hot", policy).called
        assert "hot" in store._settlements.pending
        settle(clock)
        assert db.settlements[-1]["hot"] == (*row, 100_000)
    assert store.waits == waits and store.statements == 6
    admitted = 1 + 2 + 1 + 4 + 6 + 10 + 10
    assert db.tokens("hot") + store._allowances.leased("hot") == 100_000 - admitted


def test_second_statement_in_flight_leaves_out_keys_already_settling(db, clock):
    """With two statements allowed in flight, new keys go out at once; a key already in flight
    waits for its answer instead of going out twice."""
    store = LeasingStore(db, clock, ttl=TTL, max_in_flight=2, linger=0)
    result_of(store.start())
    db.hold = True
    first = taken(store.take("a", BucketPolicy(1000, 0)))
    settle(clock)
    second = [taken(store.take(key, BucketPolicy(1000, 0))) for key in ("a", "b")]
    settle(clock)
    assert [sorted(s) for s in db.settlements] == [["a"], ["b"]]
    third = taken(store.take("c", BucketPolicy(1000, 0)))
    settle(clock)
    assert len(db.held) == 2  # at most two in flight: "c" waits
    db.answer()
    assert first[0].allowed and second[0][0].allowed  # "a" late request used the new lease
    settle(clock)
    assert sorted(db.settlements[-1]) == ["c"]
    db.answer()
    db.answer()
    assert second[1][0].allowed and third[0].allowed


def test_settlements_start_at_most_once_per_linger(db, clock):
    """A settlement starts no sooner than ``linger`` after the previous one, so demand gathers."""
    store = LeasingStore(db, clock, ttl=TTL, linger=0.002)
    result_of(store.start())
    first = taken(store.take("k0", BucketPolicy(10, 1)))
    settle(clock)
    assert first and store.statements == 1
    second = [taken(store.take(f"k{i}", BucketPolicy(10, 1))) for i in range(1, 4)]
    settle(clock)
    assert store.statements == 1 and not any(second)
    clock.advance(0.002)
    assert store.statements == 2 and all(second)
    assert len(db.settlements[-1]) == 3


def test_an_allowance_in_use_lives_on_until_max_age(db, clock):
    """An allowance used at least once per ttl stays usable, up to max_age after its lease
    (even when the lease its key asked for half way through has not landed); one left
    unused for ttl goes back."""
    store = LeasingStore(db, clock, ttl=1.0, max_age=2.5, min_lease=2, max_lease=3, linger=0)
    result_of(store.start())
    policy = BucketPolicy(1000, 0)
    for key in ("busy", "idle"):
        seen(store, clock, key, policy)  # and 2 more leased for each
    statements = store.statements
    clock.advance(0.9)
    assert store.take("busy", policy).called  # used: good for another second
    clock.advance(0.9)
    assert store.take("busy", policy).called
    assert db.settlements[-1] == {"idle": (0, 0, 2, None)}  # given back by the sweep
    assert store.statements == statements + 1
    seen(store, clock, "busy", policy)  # allowance used up: leases 3 more (max_lease)
    db.hold = True  # the lease asked for half way through max_age does not land
    local = 0
    while True:  # one request every 0.9 s: the allowance of 3 outlives max_age, 2.5 s
        clock.advance(0.9)
        d = store.take("busy", policy)
        if not d.called:
            break
        local += 1
    assert local == 2
    assert len(db.held) == 1 and db.settlements[-1]["busy"][:2] == (0, 3)  # asked at 1.8 s
    db.answer()
    assert result_of(d).allowed  # from the lease asked ahead
    settle(clock)
    assert db.settlements[-1]["busy"][2] == 1  # what was left of the dead allowance, back


def test_a_key_in_use_half_way_through_max_age_asks_for_its_next_lease(db, clock):
    """A key that comes back about once a second never reaches the tokens-left marks of a
    small allowance before it dies: it asks for the next lease once RENEW_AFTER of max_age
    has passed, so none of its requests waits, and asks once per lease."""
    assert RENEW_AFTER == 0.5
    store = LeasingStore(db, clock, ttl=1.0, max_age=2.5, min_lease=2, max_lease=3, linger=0)
    result_of(store.start())
    policy = BucketPolicy(1000, 0)
    seen(store, clock, "steady", policy)
    waits, statements = store.waits, store.statements
    for _ in range(20):
        clock.advance(0.9)
        assert store.take("steady", policy).called
        settle(clock)
    assert store.waits == waits
    assert store.statements - statements == 10  # one lease every other request: 1.8 s
    assert db.tokens("steady") + store._allowances.leased("steady") == 1000 - 21


def test_a_key_of_steady_pace_asks_for_its_next_lease_its_lead_before_it_dies(db, clock):
    """A key whose allowance outlasts max_age at its pace asks for the next lease
    RENEW_LEAD of its gaps before the allowance dies, not at RENEW_AFTER of max_age:
    one statement per 9 s instead of per 5.4 s at one request per 0.9 s, none waiting."""
    assert (RENEW_AFTER, RENEW_LEAD) == (0.5, 2.0)
    store = LeasingStore(db, clock, ttl=1.0, max_age=10.0, min_lease=100, max_lease=100,
                         linger=0)  # 100 tokens a lease: its marks are never reached
    result_of(store.start())
    policy = BucketPolicy(10_000, 0)
    clock.advance(1.0)
    seen(store, clock, "steady", policy)  # t=1: its pace is not known yet
    asked = [clock.seconds()]
    for _ in range(60):
        clock.advance(0.9)
        statements = len(db.settlements)
        assert store.take("steady", policy).called
        settle(clock)
        if len(db.settlements) > statements:
            asked.append(clock.seconds())
    assert store.waits == 1  # the first sight only
    gaps = [round(later - earlier, 1) for earlier, later in itertools.pairwise(asked)]
    assert gaps == [5.4, 9.0, 9.0, 9.0, 9.0, 9.0]  # RENEW_AFTER, then 10 - 2 * 0.9 and on
    assert db.tokens("steady") + store._allowances.leased("steady") == 10_000 - 61


def test_renewal_keeps_a_second_for_the_statement_and_never_comes_before_half_way():
    """However fast a key's pace, it asks at least RENEW_LEAD_MIN before its allowance
    dies; however slow, or unknown, not before RENEW_AFTER of max_age."""
    assert renew_from(100.0, 1000, 110.0, 10.0) == 110.0 + 10.0 - RENEW_LEAD_MIN
    assert renew_from(100.0, 10, 110.0, 10.0) == 110.0 + 10.0 - RENEW_LEAD * 1.0
    assert renew_from(100.0, 2, 110.0, 10.0) == 110.0 + 10.0 * RENEW_AFTER  # one per 5 s
    assert renew_from(0.0, 5, 110.0, 10.0) == 110.0 + 10.0 * RENEW_AFTER  # first lease
    assert renew_from(100.0, 0, 110.0, 10.0) == 110.0 + 10.0 * RENEW_AFTER


def test_remembered_decisions_last_at_most_remember(db, clock):
    """Refusals and "not limited" are repeated locally for ``remember`` seconds, however long
    allowances last."""
    store = LeasingStore(db, clock, ttl=5.0, remember=0.5, linger=0)
    result_of(store.start())
    db.create("empty", 5, 0, 0)
    for key in ("empty", "nobody"):
        taken(store.take(key, None))
    settle(clock)
    clock.advance(0.49)
    assert store.take("empty", None).called and store.take("nobody", None).called
    clock.advance(0.01)
    assert not store.take("empty", None).called
    assert not store.take("nobody", None).called


def test_min_lease_sets_the_least_lease_of_a_key(db, clock):
    """A key leases at least min_lease tokens beyond its waiting requests, from its first take."""
    store = LeasingStore(db, clock, ttl=TTL, min_lease=8, linger=0)
    result_of(store.start())
    seen(store, clock, "a", BucketPolicy(1000, 0))
    assert db.settlements[-1]["a"][:2] == (1, 8)
    assert store._keys["a"].allowance == 8


# -- exact reads around the give-back window -----------------------------------------------

NO_REFILL = BucketPolicy(100, 0)


def test_read_counts_an_expired_allowance_not_yet_given_back(db, clock):
    """A read between an allowance's expiry and the sweep that gives it back shows the
    leased tokens as the client's, as before the expiry and after the give-back."""
    store = LeasingStore(db, clock, ttl=1.0, max_age=1.0, min_lease=2, linger=0)
    result_of(store.start())
    clock.advance(0.1)
    seen(store, clock, "a", NO_REFILL)  # 1 used, 2 leased: 97 in the row
    assert db.tokens("a") == 97
    assert result_of(store.get("a")).tokens == 99
    clock.advance(0.9)  # the sweeps at 0.5 and 1.0 s find it live
    clock.advance(0.15)  # expired at 1.1 s; the next sweep is at 1.5 s
    assert db.tokens("a") == 97
    assert result_of(store.get("a")).tokens == 99
    records, _ = result_of(store.list(10, 0))
    assert [r.tokens for r in records] == [99]
    clock.advance(0.4)  # the sweep gives them back
    assert db.tokens("a") == 99
    assert result_of(store.get("a")).tokens == 99


def test_read_counts_tokens_waiting_to_go_back(db, clock):
    """Tokens the sweep set aside to give back, not yet sent, still count as the client's."""
    store = LeasingStore(db, clock, ttl=1.0, max_age=1.0, min_lease=2, linger=10.0)
    result_of(store.start())
    seen(store, clock, "a", NO_REFILL)
    clock.advance(1.5)  # given back by the sweep, but the next settlement is due at 10 s
    assert db.tokens("a") == 97
    assert result_of(store.get("a")).tokens == 99
    clock.advance(10)
    assert db.tokens("a") == 99
    assert result_of(store.get("a")).tokens == 99


def test_read_waits_for_the_give_back_in_flight(db, clock):
    """A read while the statement giving a key's tokens back is in flight waits for it to
    land, then counts them once (in the row), never as spent."""
    store = LeasingStore(db, clock, ttl=1.0, max_age=1.0, min_lease=2, linger=0)
    result_of(store.start())
    seen(store, clock, "a", NO_REFILL)
    db.hold = True
    clock.advance(1.0)  # expired and given back: the statement is held
    assert len(db.held) == 1
    read = taken(store.get("a"))
    listed = taken(store.list(10, 0))
    assert read == [] and listed == []
    db.answer()
    assert read[0].tokens == 99
    assert [r.tokens for r in listed[0][0]] == [99]


def test_a_read_holds_back_settlements_of_its_key(clock):
    """While a bucket read is in flight the key's next settlement waits for it, so the row
    read and the allowance counted are of the same moment; then requests are served."""
    db = SlowReadsDatabase(clock)
    store = LeasingStore(db, clock, ttl=TTL, max_age=TTL, remember=TTL, min_lease=2,
                         linger=0)
    result_of(store.start())
    seen(store, clock, "a", NO_REFILL)  # 97 in the row, 2 leased
    read = taken(store.get("a"))
    takes = [taken(store.take("a", NO_REFILL)) for _ in range(3)]  # the third waits
    statements = len(db.settlements)
    settle(clock)
    assert len(db.settlements) == statements
    assert takes[2] == []
    db.answer_read()
    assert read[0].tokens == 97  # 3 used, none leased
    settle(clock)
    assert len(db.settlements) == statements + 1
    assert takes[2][0].allowed


def test_new_key_at_the_cap_is_refused_without_state(db, clock):
    """At max_buckets keys held a new key is refused (Retry-After twice the ttl) and leaves
    no state; without a default it is a store error; known keys are served."""
    store = LeasingStore(db, clock, ttl=1.0, max_age=1.0, min_lease=2, linger=0)
    store.configure(RateLimitConfig(default=NO_REFILL, max_buckets=1))
    result_of(store.start())
    seen(store, clock, "a", NO_REFILL)
    refused = result_of(store.take("b", NO_REFILL))
    assert (refused.allowed, refused.retry_after, refused.limit) == (False, 2, 100)
    with pytest.raises(StoreUnavailable):
        result_of(store.take("c", None))
    assert store.over_cap == 2 and store.max_buckets == 1
    assert store.key_count == 1
    assert result_of(store.take("a", NO_REFILL)).allowed


def test_the_lease_sweep_looks_at_one_chunk_of_keys_per_reactor_turn(db, clock):
    """The lease sweep goes through SWEEP_CHUNK keys per reactor turn, and still gives every
    expired allowance back and forgets every idle key."""
    store = LeasingStore(db, clock, ttl=1.0, max_age=1.0, min_lease=2, linger=0)
    result_of(store.start())
    count = 2 * LEASE_SWEEP_CHUNK + 7
    takes = [store.take(f"k{i}", NO_REFILL) for i in range(count)]
    while not all(d.called for d in takes):
        settle(clock)
    turns: list[int] = []
    sweep = store._sweep
    chunk = sweep.chunk

    def turn() -> None:
        turns.append(len(sweep.sweeping or ()))
        chunk()

    sweep.chunk = turn  # what each turn has left to look at
    clock.advance(1.0)  # expired: given back
    clock.advance(0.5)
    clock.advance(0.5)  # idle for another ttl: forgotten
    assert turns[:3] == [count, count - LEASE_SWEEP_CHUNK, count - 2 * LEASE_SWEEP_CHUNK]
    assert store.key_count == 0
    assert all(db.tokens(f"k{i}") == 99 for i in range(count))


# -- admin writes win over settlements in flight -------------------------------------------

BIG = BucketPolicy(1000, 0)


def test_update_wins_over_tokens_given_back_in_flight(db, clock):
    """An update made while a statement giving the key's tokens back is in flight goes to
    the database after it: the give-back cannot land on the new value. (The statement
    reaching the database after the update gave [200, 200] for a bucket set to 1 token.)"""
    store = LeasingStore(db, clock, ttl=1.0, max_age=1.0, min_lease=2, linger=0)
    result_of(store.start())
    db.create("a", 1000, 1000, 0)
    seen(store, clock, "a", None)  # 1 used, 2 leased: 997 in the row
    db.hold = True
    clock.advance(1.0)  # expired: the sweep gives the 2 back, the statement is held
    assert db.settlements[-1] == {"a": (0, 0, 2, None)} and len(db.held) == 1
    updated = taken(store.update("a", tokens=1))
    assert updated == []  # waits for the give-back to land
    db.answer()
    assert updated[0].tokens == 1
    assert db.tokens("a") == 1
    db.hold = False
    takes = [taken(store.take("a", None)) for _ in range(2)]
    settle(clock)
    assert [t[0].allowed for t in takes] == [True, False]


def test_update_wins_over_a_lease_in_flight(store, db, clock):
    """An update made while a statement leasing the key's tokens is in flight comes after
    it: the lease's requests are answered, it leaves no allowance, and the new value is
    what the next requests take from."""
    db.create("a", 1000, 1000, 0)
    db.hold = True
    first = taken(store.take("a", None))
    settle(clock)
    updated = taken(store.update("a", tokens=1))
    late = taken(store.take("a", None))  # held back until the update is answered
    db.answer()
    assert first[0].allowed and updated[0].tokens == 1
    assert late == []
    db.hold = False
    settle(clock)
    assert late[0].allowed and late[0].remaining == 0
    assert not result_of(store.take("a", None)).allowed  # remembered: the row is empty
    assert db.tokens("a") == 0


def test_delete_wins_over_a_bucket_created_by_a_settlement_in_flight(store, db, clock):
    """A delete made while a statement creating the bucket from the default is in flight
    removes what that statement created."""
    db.hold = True
    first = taken(store.take("b", BucketPolicy(10, 0)))
    settle(clock)
    deleted = taken(store.delete("b"))
    db.answer()
    assert first[0].allowed
    assert deleted == [True]
    assert result_of(db.get("b")) is None
    assert result_of(store.get("b")) is None


def test_create_after_a_settlement_in_flight_created_the_bucket(store, db, clock):
    """A create made while a statement creating the bucket from the default is in flight
    comes after it, so it finds the bucket (409), as it would a moment later."""
    db.hold = True
    taken(store.take("b", BucketPolicy(10, 0)))
    settle(clock)
    created = taken(store.create("b", 5, 5, 0))
    db.answer()
    assert created[0].check(BucketExists)
    assert db.tokens("b") == 10 - 2  # the grant: 1 waiting + a tenth of the bucket


def test_a_failed_write_still_drops_the_allowance(store, db, clock):
    """A write that fails (here: tokens above the capacity) still ends the old allowance."""
    seen(store, clock, "a", BIG)
    assert store._keys["a"].allowance == 2
    with pytest.raises(InvalidBucket):
        result_of(store.update("a", tokens=5000))
    assert store._keys["a"].allowance == 0
    d = store.take("a", BIG)
    assert not d.called


def test_writes_hold_nothing_back_once_stopping(store, db, clock):
    """After stop a write goes straight to the wrapped store."""
    db.create("a", 10, 10, 0)
    result_of(store.stop())
    assert result_of(store.update("a", tokens=3)).tokens == 3
    assert result_of(store.get("a")).tokens == 3
    assert result_of(store.get("nobody")) is None


# -- stop with reads in flight -------------------------------------------------------------


def test_stop_finishes_while_a_read_waits_for_a_settlement(clock):
    """stop() while a read waits for the key's settlement in flight: the read does not hold
    the last give-back back, so stopping ends (it used to spin, blocking the reactor)."""
    db = SlowReadsDatabase(clock)
    store = LeasingStore(db, clock, ttl=TTL, max_age=TTL, remember=TTL, min_lease=2, linger=0)
    result_of(store.start())
    db.hold = True
    first = taken(store.take("a", BIG))
    settle(clock)
    read = taken(store.get("a"))
    stopped = taken(store.stop())
    with bounded():
        db.answer()  # the lease lands; its 2 unused tokens go straight back
    assert first[0].allowed
    assert db.settlements[-1] == {"a": (0, 0, 2, None)}
    assert stopped == []
    db.answer()
    assert stopped == [None] and db.stopped
    db.answer_read()
    assert read[0].tokens == 999
    assert not clock.getDelayedCalls()


def test_a_read_started_while_stopping_holds_nothing_back(clock):
    """A read made while stop() gives tokens back neither waits for nor delays them."""
    db = SlowReadsDatabase(clock)
    store = LeasingStore(db, clock, ttl=TTL, max_age=TTL, remember=TTL, min_lease=2, linger=0)
    result_of(store.start())
    seen(store, clock, "a", BIG)  # 2 leased
    db.hold = True
    stopped = taken(store.stop())
    read = taken(store.get("a"))
    db.answer()
    assert stopped == [None]
    db.answer_read()
    assert read[0].tokens == 999


def test_keys_are_policy_and_client_id(store, db, clock):
    """One client id under two policies leases from two buckets (SPEC 8): the settlement
    carries each as its own key, and the admin calls reach each by (policy, client id)."""
    tight, loose = BucketPolicy(2, 0), BucketPolicy(100, 0)
    first = [store.take("c", tight, "api") for _ in range(3)]
    other = store.take("c", loose)
    settle(clock)
    assert [result_of(d).allowed for d in first] == [True, True, False]
    assert result_of(other).allowed
    assert set(db.settlements[0]) == {"api\x1fc", "c"}
    assert result_of(store.get("c", "api")).policy == "api"
    assert result_of(store.get("c", "api")).capacity == 2
    assert result_of(store.get("c")).capacity == 100
    assert result_of(store.list(10, 0, "api"))[1] == 1
    assert result_of(store.delete("c", "api"))
    assert result_of(store.get("c", "api")) is None and result_of(store.get("c")) is not None


def test_take_now_answers_a_live_lease_as_a_value_and_a_wait_as_a_deferred(store, db, clock):
    """On a live lease take_now answers with the decision itself (the limiter's hot path);
    without one it is the Deferred of the settlement, as take is."""
    waiting = store.take_now("a", BucketPolicy(1000, 0))
    assert isinstance(waiting, Deferred) and not waiting.called
    settle(clock)
    assert result_of(waiting).allowed
    decision = store.take_now("a", BucketPolicy(1000, 0))
    assert isinstance(decision, Decision) and decision.allowed
    assert store.statements == 1
