"""What a leasing store holds per key (equalizer.buckets.leases.allowances), without a
database: allowances, tokens to give back, remembered decisions, the cap on keys."""

from __future__ import annotations

import pytest
from twisted.internet.defer import Deferred

from equalizer.buckets.interface import StoreUnavailable
from equalizer.buckets.leases.allowances import (
    PREFETCH_FROM,
    PREFETCH_LAST_FROM,
    PREFETCH_LEFT,
    Allowances,
    Key,
)
from equalizer.buckets.maths import decide
from equalizer.config.model import BucketPolicy
from tests.helpers import result_of

NOW = 1000.0


@pytest.fixture
def allowances() -> Allowances:
    return Allowances(ttl=5.0, max_age=10.0, remember=0.5)


def held(allowances: Allowances, client_id: str, allowance: int) -> Key:
    key = allowances.keys[client_id] = Key()
    key.allowance = allowance
    return key


def test_max_age_is_at_least_the_ttl():
    assert Allowances(ttl=5.0, max_age=1.0, remember=0.5).max_age == 5.0


def test_give_back_adds_up_and_empties_the_allowance(allowances):
    key = held(allowances, "a", 3)
    allowances.give_back("a", key)
    key.allowance = 2
    allowances.give_back("a", key)
    assert allowances.returns == {"a": 5} and key.allowance == 0
    assert allowances.leased("a") == 5


def test_give_all_back_forgets_every_key(allowances):
    held(allowances, "a", 3)
    held(allowances, "b", 0)
    allowances.give_all_back()
    assert allowances.returns == {"a": 3}
    assert allowances.keys == {}


def test_drop_forgets_what_is_held_and_moves_the_epoch(allowances):
    """An admin change: allowance, tokens to give back and remembered decision go, unsent."""
    key = held(allowances, "a", 3)
    key.until = NOW + 1
    key.cached = decide(False, 10, 0, 1)
    allowances.returns["a"] = 4
    allowances.drop("a")
    assert (key.allowance, key.until, key.cached, key.epoch) == (0, 0.0, None, 1)
    assert allowances.leased("a") == 0
    allowances.drop("unknown")  # nothing held: nothing to do
    assert allowances.leased("unknown") == 0


def test_lease_sets_the_allowance_and_keeps_the_previous_one_to_give_back(allowances):
    """What is left of the replaced allowance waits for the key's next settlement (its
    row gives it back), not for a statement row of its own."""
    key = held(allowances, "a", 3)
    info = decide(True, 1000, 500.5, 2.0)
    allowances.lease("a", key, PREFETCH_FROM, NOW, info, 500.5, 2.0, NOW + 0.1)
    assert allowances.returns == {} and key.back == 3
    assert allowances.leased("a") == 3 + PREFETCH_FROM
    assert (key.allowance, key.low) == (PREFETCH_FROM, PREFETCH_FROM // 2)
    assert (key.expires, key.dies) == (NOW + 5.0, NOW + 10.0)
    assert (key.limit, key.base, key.reset, key.window) == (1000, 500, info.reset, info.window)
    assert key.cached is None and key.until == 0.0
    allowances.lease("a", key, PREFETCH_FROM - 1, NOW, info, 500.5, 2.0, NOW)
    assert key.low == PREFETCH_LEFT  # a smaller one asks with a few tokens left
    allowances.lease("a", key, PREFETCH_LAST_FROM - 1, NOW, info, 500.5, 2.0, NOW)
    assert key.low == -1  # a tiny one is used up before the next lease


def test_lease_of_an_empty_bucket_remembers_the_refusal_until_a_token_is_due(allowances):
    key = Key()
    info = decide(True, 10, 0.75, 1.0)
    allowances.lease("a", key, 0, NOW, info, 0.75, 1.0, NOW)
    assert not key.cached.allowed and key.until == NOW + 0.25
    allowances.lease("a", key, 0, NOW, info, 0.0, 0.0, NOW)  # never refills: remember
    assert key.until == NOW + 0.5


def test_not_limited_is_remembered(allowances):
    key = Key()
    key.cached = decide(False, 10, 0, 1)
    allowances.not_limited(key, NOW)
    assert key.cached is None and key.until == NOW + 0.5


def test_serve_answers_waiters_from_the_allowance_then_the_remembered_refusal(allowances):
    key = held(allowances, "a", 2)
    key.expires = NOW + 1
    key.until = NOW + 1
    key.limit, key.base = 10, 5
    key.cached = refusal = decide(False, 10, 0, 1)
    waiters = [Deferred() for _ in range(3)]
    key.waiters = list(waiters)
    answers = []
    assert allowances.serve(key, NOW, answers)
    assert [a.allowed for _, a in answers] == [True, True, False]
    assert answers[2][1] is refusal
    assert [a.remaining for _, a in answers[:2]] == [6, 5]
    assert key.waiters == [] and key.used == 2


def test_serve_without_waiters_or_anything_to_answer_with(allowances):
    key = Key()
    answers = []
    assert not allowances.serve(key, NOW, answers)
    key.waiters = [Deferred()]
    assert not allowances.serve(key, NOW, answers)  # no allowance, nothing remembered
    assert answers == [] and len(key.waiters) == 1


def test_serve_leaves_the_rest_waiting(allowances):
    key = held(allowances, "a", 1)
    key.expires = NOW + 1
    key.waiters = [Deferred(), Deferred()]
    answers = []
    assert not allowances.serve(key, NOW, answers)
    assert len(answers) == 1 and len(key.waiters) == 1


def test_at_cap_refuses_with_the_default_and_logs_once(allowances):
    allowances.max_buckets = 1
    refusal = result_of(allowances.at_cap(BucketPolicy(10, 1)))
    assert (refusal.allowed, refusal.limit, refusal.retry_after) == (False, 10, 10)
    with pytest.raises(StoreUnavailable):
        result_of(allowances.at_cap(None))
    assert allowances.over_cap == 2 and allowances.cap_logged


def test_tokens_kept_to_give_back_go_back_with_the_allowance_or_are_dropped(allowances):
    """``give_back`` sends them with the allowance; an admin change (``drop``) forgets both."""
    key = held(allowances, "a", 2)
    key.back = 3
    allowances.give_back("a", key)
    assert allowances.returns == {"a": 5} and (key.allowance, key.back) == (0, 0)
    key.back = 4
    allowances.drop("a")
    assert allowances.returns == {} and key.back == 0
    key.back = 1
    allowances.give_all_back()
    assert allowances.returns == {"a": 1} and allowances.keys == {}
