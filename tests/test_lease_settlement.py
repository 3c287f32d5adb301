"""Batched settlements (equalizer.buckets.leases.settlement and .answers) on their own,
over the fake lease database and a fake clock: the statement's rows, when one is sent,
what holds one back, what a statement's rows mean, and the last ones at stop."""

from __future__ import annotations

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from equalizer.buckets.interface import StoreUnavailable
from equalizer.buckets.leases.allowances import Allowances, Key
from equalizer.buckets.leases.answers import take_in
from equalizer.buckets.leases.settlement import RELAXED_BATCH, Settlements, lasts, statement
from equalizer.config.model import BucketPolicy
from equalizer.testing import FakeLeaseDatabase
from tests.helpers import result_of, taken


@pytest.fixture
def db(clock: Clock) -> FakeLeaseDatabase:
    return FakeLeaseDatabase(clock)


@pytest.fixture
def allowances() -> Allowances:
    return Allowances(ttl=1.0, max_age=1.0, remember=0.5)


def settlements(db: FakeLeaseDatabase, allowances: Allowances, clock: Clock, *,
                max_batch: int = 100, max_in_flight: int = 1, linger: float = 0,
                relaxed: float = 0) -> Settlements:
    made = Settlements(db, allowances, clock, max_lease=64, min_lease=2, max_batch=max_batch,
                       max_in_flight=max_in_flight, linger=linger, relaxed=relaxed)
    made.running = True
    return made


def waiting(allowances: Allowances, made: Settlements, client_id: str,
            default: BucketPolicy | None = None) -> list:
    key = allowances.keys.setdefault(client_id, Key())
    return taken(made.wait(client_id, key, default))


# -- the statement ---------------------------------------------------------------------------


def test_statement_rows_carry_demand_lease_and_tokens_given_back():
    """One row per waiting key or lease asked for ahead of need (with the key's default,
    so the database creates a swept row again), then tokens given back up to the batch's
    room; the keys are marked settling and their use is reset."""
    waited, prefetched = Key(), Key()
    waited.waiters = [Deferred(), Deferred()]
    waited.default = BucketPolicy(100, 2.0)
    waited.used = 5
    prefetched.default = BucketPolicy(100, 2.0)
    prefetched.back = 2  # left of its replaced allowance: rides along
    returns = {"a": 1, "x": 3, "y": 4}
    rows, batch = statement([("a", waited), ("b", prefetched)], returns, 64, 2, 3, 0.0)
    assert rows[:2] == [("a", 2, 14, 1, 100, 2.0), ("b", 0, 2, 2, 100, 2.0)]
    assert prefetched.back == 0
    assert len(rows) == 3 and rows[2][3] in (3, 4) and len(returns) == 1
    assert waited.settling and waited.used == 0 and waited.waiters == []
    assert [(client_id, len(w), epoch) for client_id, _, w, epoch, _ in batch] == [
        ("a", 2, 0), ("b", 0, 0)]


def test_a_busy_key_is_leased_four_times_its_demand():
    """A key whose last lease was sent after ``busy_since`` gets four times its demand; a
    slower one, or one never leased, twice (both within min_lease and max_lease)."""
    busy, slow, new = Key(), Key(), Key()
    busy.lease_sent, slow.lease_sent = 9.5, 7.0
    for key in (busy, slow, new):
        key.used = 10
    rows, _ = statement([("busy", busy), ("slow", slow), ("new", new)], {}, 64, 2, 10, 7.5)
    assert [row[2] for row in rows] == [40, 20, 20]
    busy.used = 20
    rows, _ = statement([("busy", busy)], {}, 64, 2, 10, 7.5)
    assert rows[0][2] == 64


def test_nothing_to_settle_sends_nothing(db, allowances, clock):
    made = settlements(db, allowances, clock)
    made.settle()
    assert db.settlements == []


def test_tokens_to_give_back_wait_for_demand_or_the_sweep(db, allowances, clock):
    """Tokens to give back alone start no statement; demand or return_all sends them."""
    made = settlements(db, allowances, clock)
    allowances.returns["x"] = 3
    got = waiting(allowances, made, "a", BucketPolicy(10, 0))
    clock.advance(0)
    assert got[0].allowed and db.settlements[-1] == {"a": (1, 2, 0, 10), "x": (0, 0, 3, None)}
    allowances.returns["x"] = 2
    clock.advance(0)
    assert len(db.settlements) == 1
    made.return_all()
    clock.advance(0)
    assert db.settlements[-1] == {"x": (0, 0, 2, None)} and not made.returning


def test_linger_spaces_the_starts_of_statements(db, allowances, clock):
    made = settlements(db, allowances, clock, linger=0.01)
    waiting(allowances, made, "a", BucketPolicy(10, 0))
    clock.advance(0)
    waiting(allowances, made, "b", BucketPolicy(10, 0))
    clock.advance(0.005)
    assert len(db.settlements) == 1
    clock.advance(0.005)
    assert len(db.settlements) == 2


def leased(allowances: Allowances, client_id: str, allowance: int, used: int,
           lease_sent: float, dies: float, now: float = 0.0) -> Key:
    """A key holding ``allowance`` tokens, ``used`` used since its lease was sent; times
    relative to ``now``."""
    key = allowances.keys[client_id] = Key()
    key.allowance, key.used = allowance, used
    key.lease_sent, key.dies = now + lease_sent, now + dies
    return key


def test_an_allowance_lasts_by_its_pace_and_its_age():
    """10 tokens left, 5 used in the 2 s since the lease: 4 s more at that pace."""
    allowances = Allowances(ttl=5.0, max_age=10.0, remember=0.5)
    key = leased(allowances, "a", allowance=10, used=5, lease_sent=0.0, dies=10.0)
    assert lasts(key, 2.0, 3.9) and not lasts(key, 2.0, 4.1)
    key.dies = 5.0  # ... but the allowance dies in 3 s
    assert not lasts(key, 2.0, 3.1)
    key.used = 0  # no pace yet: only its age counts
    assert lasts(key, 2.0, 2.9)


def test_a_lease_asked_ahead_with_time_to_spare_waits_for_a_relaxed_statement(
        db, allowances, clock):
    """Renewals of keys with time left share statements ``relaxed`` apart; a request that
    waits brings the next statement forward to ``linger``."""
    made = settlements(db, allowances, clock, linger=0.002, relaxed=0.1)
    waiting(allowances, made, "first", BucketPolicy(10, 0))
    clock.advance(0)
    slow = leased(allowances, "slow", allowance=10, used=2, lease_sent=-8.0, dies=2.0,
                  now=clock.seconds())
    made.prefetch("slow", slow, clock.seconds())
    clock.advance(0.05)
    assert len(db.settlements) == 1
    waiting(allowances, made, "new", BucketPolicy(10, 0))
    clock.advance(0)
    assert list(db.settlements[-1]) == ["slow", "new"]


def test_a_lease_asked_ahead_that_may_run_out_goes_within_linger(db, allowances, clock):
    """A key using its allowance fast (or one about to die) is renewed at once."""
    made = settlements(db, allowances, clock, linger=0.002, relaxed=0.1)
    waiting(allowances, made, "first", BucketPolicy(10, 0))
    clock.advance(0)
    busy = leased(allowances, "busy", allowance=64, used=64, lease_sent=-0.1, dies=9.9,
                  now=clock.seconds())
    made.prefetch("busy", busy, clock.seconds())  # 64 left, 64 used in 0.1 s: 0.1 s more
    clock.advance(0.002)
    assert list(db.settlements[-1]) == ["busy"]
    old = leased(allowances, "old", allowance=10, used=0, lease_sent=-9.7, dies=0.3,
                 now=clock.seconds())
    made.prefetch("old", old, clock.seconds())
    clock.advance(0.002)
    assert list(db.settlements[-1]) == ["old"]


def test_a_full_relaxed_batch_goes_within_linger(db, allowances, clock):
    """Once RELAXED_BATCH keys are pending a relaxed statement waits no longer, so no
    statement holds the reactor for long."""
    made = settlements(db, allowances, clock, linger=0.002, relaxed=0.1)
    waiting(allowances, made, "first", BucketPolicy(10, 0))
    clock.advance(0)
    for i in range(RELAXED_BATCH):
        if i == RELAXED_BATCH - 1:
            clock.advance(0.002)
            assert len(db.settlements) == 1
        key = leased(allowances, f"k{i}", allowance=10, used=1, lease_sent=-1.0, dies=9.0,
                     now=clock.seconds())
        made.prefetch(f"k{i}", key, clock.seconds())
    clock.advance(0)
    assert len(db.settlements) == 2 and len(db.settlements[-1]) == RELAXED_BATCH


def test_relaxed_statements_start_relaxed_apart(db, allowances, clock):
    """The first goes at once (none for ``relaxed``), the next ``relaxed`` after it."""
    made = settlements(db, allowances, clock, linger=0.002, relaxed=0.1)
    for name, after in (("a", 0.05), ("b", 0.04)):
        key = leased(allowances, name, allowance=10, used=1, lease_sent=-1.0, dies=9.0,
                     now=clock.seconds())
        made.prefetch(name, key, clock.seconds())
        clock.advance(0)
        clock.advance(after)
    assert [list(s) for s in db.settlements] == [["a"]]
    clock.advance(0.01)
    assert [list(s) for s in db.settlements] == [["a"], ["b"]]


def test_prefetch_leaves_a_key_already_settling_alone(db, allowances, clock):
    made = settlements(db, allowances, clock)
    key = allowances.keys["a"] = Key()
    key.settling = True
    made.prefetch("a", key, clock.seconds())
    assert made.pending == {} and made.scheduled is None
    key.settling = False
    made.prefetch("a", key, clock.seconds())
    assert made.pending == {"a": key} and made.scheduled is not None


def test_a_failed_statement_fails_its_requests_and_loses_its_give_back(db, allowances, clock):
    made = settlements(db, allowances, clock)
    db.failing = StoreUnavailable("down")
    allowances.returns["x"] = 3
    got = waiting(allowances, made, "a", BucketPolicy(10, 0))
    clock.advance(0)
    assert got[0].check(StoreUnavailable)
    assert not allowances.keys["a"].settling and not made.settling("x")
    assert allowances.returns == {} and made.in_flight == 0


# -- what the rows mean ------------------------------------------------------------------------


def test_rows_of_a_forgotten_key_answer_and_send_the_rest_back(allowances):
    """Once the store stops (keys forgotten) a grant answers its requests and what is left
    goes straight back; a key with no bucket is answered "not limited", unremembered."""
    granted, unlimited = Key(), Key()
    first, second = Deferred(), Deferred()
    batch = [("a", granted, [first], 0, None), ("n", unlimited, [second], 0, None)]
    pending: dict[str, Key] = {}
    take_in([("a", 3, 7.0, 10, 0.0)], batch, 0.0, 0.0, allowances, pending)
    assert result_of(first).allowed and result_of(second) is None
    assert allowances.returns == {"a": 2}
    assert unlimited.until == 0.0 and pending == {}


def test_a_statement_that_answers_nobody_leaves_nothing(allowances):
    key = allowances.keys["a"] = Key()
    key.settling = True
    take_in([], [("a", key, [], 0, BucketPolicy(10, 0))], 0.0, 0.0, allowances, {})
    assert not key.settling and key.attempts == 0


# -- admin calls in order ----------------------------------------------------------------------


def test_a_held_key_is_left_out_and_its_tokens_kept_for_later(db, allowances, clock):
    """While an admin call holds a key, statements carry other keys only; the held key's
    requests and tokens to give back go once the call is answered."""
    made = settlements(db, allowances, clock)
    call: Deferred[str] = Deferred()
    done = taken(Deferred.fromCoroutine(made.apart("a", lambda: call)))
    allowances.returns["a"] = 2
    held = waiting(allowances, made, "a", BucketPolicy(10, 0))
    other = waiting(allowances, made, "b", BucketPolicy(10, 0))
    clock.advance(0)
    assert db.settlements == [{"b": (1, 2, 0, 10)}] and other[0].allowed
    assert held == [] and allowances.returns == {"a": 2}
    call.callback("answered")
    assert done == ["answered"]
    clock.advance(0)
    assert db.settlements[-1] == {"a": (1, 2, 2, 10)} and held[0].allowed


def test_apart_waits_for_the_statement_in_flight_with_the_key(db, allowances, clock):
    made = settlements(db, allowances, clock)
    db.hold = True
    allowances.returns["a"] = 2
    made.return_all()
    clock.advance(0)
    assert made.settling("a")
    calls = []
    done = taken(Deferred.fromCoroutine(made.apart("a", lambda: _answered(calls, "read"))))
    assert calls == []
    db.answer()
    assert calls == ["read"] and done == ["read"] and not made.settling("a")


def test_apart_all_holds_every_key_until_the_call_is_answered(db, allowances, clock):
    made = settlements(db, allowances, clock)
    db.hold = True
    waiting(allowances, made, "a", BucketPolicy(10, 0))
    clock.advance(0)
    call: Deferred[str] = Deferred()
    done = taken(Deferred.fromCoroutine(made.apart_all(lambda: call)))
    got = waiting(allowances, made, "b", BucketPolicy(10, 0))
    db.answer()
    db.hold = False
    clock.advance(0)
    assert len(db.settlements) == 1 and got == []
    call.callback("page")
    clock.advance(0)
    assert done == ["page"] and got[0].allowed


def test_admin_calls_hold_nothing_back_once_stopped(db, allowances, clock):
    made = settlements(db, allowances, clock)
    made.stop()
    assert result_of(Deferred.fromCoroutine(made.apart("a", lambda: _answered([], 1)))) == 1
    assert result_of(Deferred.fromCoroutine(made.apart_all(lambda: _answered([], 2)))) == 2
    assert made.scheduled is None


async def _answered(calls: list, value: object) -> object:
    calls.append(value)
    return value


# -- stop -------------------------------------------------------------------------------------


def test_stop_fails_waiting_requests_and_cancels_the_next_statement(db, allowances, clock):
    made = settlements(db, allowances, clock)
    got = waiting(allowances, made, "a", BucketPolicy(10, 0))
    made.stop()
    assert got[0].check(StoreUnavailable)
    assert not clock.getDelayedCalls() and not made.running


def test_drain_sends_what_is_left_after_the_statement_in_flight(db, allowances, clock):
    made = settlements(db, allowances, clock)
    db.hold = True
    waiting(allowances, made, "a", BucketPolicy(10, 0))
    clock.advance(0)
    made.stop()
    allowances.returns["x"] = 1
    drained = taken(Deferred.fromCoroutine(made.drain()))
    db.answer()
    assert drained == [] and db.settlements[-1] == {"x": (0, 0, 1, None)}
    db.answer()
    assert drained == [None]


def test_drain_gives_up_when_nothing_can_be_sent_rather_than_spin(db, allowances, clock):
    made = settlements(db, allowances, clock, max_in_flight=0)
    made.stop()
    allowances.returns["x"] = 1
    assert result_of(Deferred.fromCoroutine(made.drain())) is None
    assert db.settlements == []


def test_a_cancelled_drain_stops_waiting(db, allowances, clock):
    made = settlements(db, allowances, clock)
    db.hold = True
    waiting(allowances, made, "a", BucketPolicy(10, 0))
    clock.advance(0)
    drained = Deferred.fromCoroutine(made.drain())
    drained.cancel()
    assert taken(drained)[0].check(Exception)
    db.answer()  # lands with nobody waiting for it
    assert made.in_flight == 0


def test_two_calls_on_one_key_hold_it_until_both_are_answered(db, allowances, clock):
    made = settlements(db, allowances, clock)
    first: Deferred[int] = Deferred()
    second: Deferred[int] = Deferred()
    Deferred.fromCoroutine(made.apart("a", lambda: first))
    Deferred.fromCoroutine(made.apart("a", lambda: second))
    got = waiting(allowances, made, "a", BucketPolicy(10, 0))
    first.callback(1)
    clock.advance(0)
    assert got == [] and db.settlements == []
    second.callback(2)
    clock.advance(0)
    assert got[0].allowed


def test_a_key_given_back_by_two_statements_is_settling_until_both_land(db, allowances, clock):
    made = settlements(db, allowances, clock, max_in_flight=2)
    db.hold = True
    for back in (2, 3):
        allowances.returns["a"] = back
        made.return_all()
        clock.advance(0)
    assert len(db.held) == 2
    db.answer()
    assert made.settling("a")
    db.answer()
    assert not made.settling("a")
