"""MemoryStore: IBucketStore semantics, driven by a fake clock."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

import pytest
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from equalizer.buckets.interface import (
    BucketExists,
    BucketRecord,
    IBucketStore,
    InvalidBucket,
    take_key,
)
from equalizer.buckets.maths import NO_REFILL_SECONDS, Decision
from equalizer.buckets.memory import MemoryStore
from equalizer.config.model import BucketPolicy
from equalizer.config.rules import (
    MAX_CAPACITY,
    MAX_CLIENT_ID_LENGTH,
    MAX_REFILL_RATE,
    MIN_REFILL_RATE,
)
from tests.helpers import result_of

DEFAULT = BucketPolicy(capacity=3, refill_rate=1.0)


@pytest.fixture
def store(clock: Clock) -> MemoryStore:
    store = MemoryStore(clock)
    result_of(store.start())
    return store


def test_provides_the_interface(store):
    """MemoryStore fully provides IBucketStore and is always available."""
    assert verifyObject(IBucketStore, store)
    assert store.available is True
    assert result_of(store.stop()) is None


def test_default_policy_creates_a_full_bucket_on_first_sight(store):
    """An unknown client gets a full bucket from the default policy; the first take costs one."""
    decision = result_of(store.take("10.0.0.1", DEFAULT))
    assert decision.allowed
    assert decision.limit == 3
    assert decision.remaining == 2
    record = result_of(store.get("10.0.0.1"))
    assert (record.capacity, record.tokens, record.refill_rate) == (3, 2.0, 1.0)


def test_a_decision_that_says_what_the_last_said_is_that_one(store, clock):
    """Clients slower than their refill get the same decision object (none made per
    request), across clients of one policy too; a bucket of another capacity or refill
    rate, or one an admin change set anew, gets its own."""
    first = result_of(store.take("10.0.0.5", DEFAULT))
    clock.advance(5)  # full again
    assert result_of(store.take("10.0.0.5", DEFAULT)) is first
    assert result_of(store.take("10.0.0.6", DEFAULT)) is first
    result_of(store.create("fast", 3, 3, 2.0))  # remaining 2 and reset 1 too, window 2
    assert result_of(store.take("fast", DEFAULT)) == Decision(True, 3, 2, 0, 1, 2)
    result_of(store.create("slow", 3, 3, 1.0))
    assert result_of(store.take("slow", DEFAULT)) == Decision(True, 3, 2, 0, 1, 3)
    result_of(store.update("10.0.0.5", capacity=4, tokens=3))  # remaining 2, reset 1 again
    assert result_of(store.take("10.0.0.5", DEFAULT)) == Decision(True, 4, 2, 0, 1, 4)


def test_no_default_means_unlimited(store):
    """Without a default policy a client with no bucket is not limited (None), and gets none."""
    for _ in range(10):
        assert result_of(store.take("10.0.0.2", None)) is None
    assert result_of(store.get("10.0.0.2")) is None


def test_own_bucket_wins_over_default(store):
    """A client with a bucket of its own is limited by it, not by the default."""
    result_of(store.create("vip", capacity=1, tokens=1, refill_rate=0))
    assert result_of(store.take("vip", DEFAULT)).allowed
    refused = result_of(store.take("vip", DEFAULT))
    assert not refused.allowed
    assert refused.limit == 1
    assert refused.retry_after == NO_REFILL_SECONDS


def test_existing_bucket_is_limited_without_default(store):
    """take(..., None) still applies a bucket that exists."""
    result_of(store.create("k", capacity=1, tokens=1, refill_rate=1))
    assert result_of(store.take("k", None)).allowed
    assert not result_of(store.take("k", None)).allowed


def test_refill_follows_the_clock(store, clock):
    """Tokens come back with the fake clock, exactly at the rate."""
    for _ in range(3):
        assert result_of(store.take("c", DEFAULT)).allowed
    refused = result_of(store.take("c", DEFAULT))
    assert not refused.allowed
    assert refused.retry_after == 1
    clock.advance(0.999)
    assert not result_of(store.take("c", DEFAULT)).allowed
    clock.advance(0.001)
    assert result_of(store.take("c", DEFAULT)).allowed


def test_create_and_get(store, clock):
    """create returns the record with timestamps from the clock; get reads it back."""
    created = result_of(store.create("a", capacity=10, tokens=4, refill_rate=2))
    moment = datetime.fromtimestamp(clock.seconds(), UTC)
    assert created == BucketRecord("a", 10, 4.0, 2.0, moment, moment)
    assert result_of(store.get("a")) == created


def test_get_reports_tokens_as_of_now(store, clock):
    """get refills up to now without changing what is stored."""
    result_of(store.create("a", capacity=10, tokens=4, refill_rate=2))
    clock.advance(1.5)
    record = result_of(store.get("a"))
    assert record.tokens == 7.0
    assert record.updated_at == record.created_at


def test_create_twice_fails(store):
    """Creating a bucket that exists fails with BucketExists and changes nothing."""
    result_of(store.create("a", capacity=10, tokens=4, refill_rate=2))
    with pytest.raises(BucketExists):
        result_of(store.create("a", capacity=1, tokens=1, refill_rate=1))
    assert result_of(store.get("a")).capacity == 10


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"capacity": 0, "tokens": 0, "refill_rate": 1}, "capacity"),
        ({"capacity": 1.5, "tokens": 0, "refill_rate": 1}, "capacity"),
        ({"capacity": True, "tokens": 0, "refill_rate": 1}, "capacity"),
        ({"capacity": 5, "tokens": -1, "refill_rate": 1}, "tokens"),
        ({"capacity": 5, "tokens": 6, "refill_rate": 1}, "tokens"),
        ({"capacity": 5, "tokens": float("nan"), "refill_rate": 1}, "tokens"),
        ({"capacity": 5, "tokens": 5, "refill_rate": -0.1}, "refill_rate"),
        ({"capacity": 5, "tokens": 5, "refill_rate": float("inf")}, "refill_rate"),
        ({"capacity": 2**31, "tokens": 0, "refill_rate": 1}, "capacity"),
        ({"capacity": 5, "tokens": 5, "refill_rate": 1e308}, "refill_rate"),
        ({"capacity": 5, "tokens": 5, "refill_rate": 1e9 * 1.0000001}, "refill_rate"),
        ({"capacity": 5, "tokens": 5, "refill_rate": 5e-324}, "refill_rate"),
        ({"capacity": 5, "tokens": 5, "refill_rate": 9.99e-7}, "refill_rate"),
        ({"capacity": 5, "tokens": 5, "refill_rate": 10**400}, "refill_rate"),
        ({"capacity": 5, "tokens": 10**400, "refill_rate": 1}, "tokens"),
    ],
)
def test_create_rejects_invalid_values(store, fields, field):
    """Out-of-range or mistyped values fail with InvalidBucket naming the field."""
    with pytest.raises(InvalidBucket) as caught:
        result_of(store.create("bad", **fields))
    assert caught.value.field == field
    assert result_of(store.get("bad")) is None


@pytest.mark.parametrize("rate", [0, MIN_REFILL_RATE, MAX_REFILL_RATE])
def test_bucket_bounds_stay_computable(store, clock, rate):
    """The extreme accepted values refill, take and report finite durations, years later."""
    record = result_of(store.create("edge", capacity=MAX_CAPACITY, tokens=0, refill_rate=rate))
    assert record.refill_rate == rate
    clock.advance(10 * 365 * 86400)
    decision = result_of(store.take("edge", None))
    assert decision.window >= 1 and decision.reset >= 0
    assert 0 <= result_of(store.get("edge")).tokens <= MAX_CAPACITY


def test_update_rejects_values_outside_the_bounds(store):
    """update refuses the same out-of-bounds values as create and changes nothing."""
    result_of(store.create("a", capacity=5, tokens=5, refill_rate=1))
    for fields, field in [({"refill_rate": 1e308}, "refill_rate"),
                          ({"refill_rate": 5e-324}, "refill_rate"),
                          ({"capacity": 2**31}, "capacity")]:
        with pytest.raises(InvalidBucket) as caught:
            result_of(store.update("a", **fields))
        assert caught.value.field == field
    assert (result_of(store.get("a")).capacity, result_of(store.get("a")).refill_rate) == (5, 1)


UNUSABLE_CLIENT_IDS = ["x" * (MAX_CLIENT_ID_LENGTH + 1), "a\x00b", "line\nfeed", "cr\rhere",
                       "tab\there", "del\x7f", "\x1b[31m", "\ud800", "lone\udc80surrogate"]


@pytest.mark.parametrize("client_id", ["", *UNUSABLE_CLIENT_IDS])
def test_unusable_client_ids_are_refused(store, client_id):
    """Empty, over-long, non-UTF-8 or control-character client ids cannot be created, and
    nothing is."""
    with pytest.raises(InvalidBucket) as caught:
        result_of(store.create(client_id, capacity=1, tokens=1, refill_rate=1))
    assert caught.value.field == "client_id"
    assert result_of(store.list(10, 0)) == ([], 0)


def test_empty_client_id_cannot_take(store):
    """A take for the empty client id fails with InvalidBucket (the proxy never sends one)."""
    with pytest.raises(InvalidBucket):
        result_of(store.take("", DEFAULT))


@pytest.mark.parametrize("client_id", UNUSABLE_CLIENT_IDS)
def test_unusable_client_ids_take_from_their_digest(store, client_id):
    """A take for a client id no bucket can have is limited by the bucket of its digest."""
    key = take_key(client_id)
    assert key == "sha256:" + hashlib.sha256(
        client_id.encode("utf-8", "surrogatepass")).hexdigest()
    decisions = [result_of(store.take(client_id, DEFAULT)) for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert result_of(store.get(key)).tokens == 0
    assert result_of(store.get(client_id)) is None


def test_usable_client_ids_are_their_own_take_key():
    """Printable text, non-ASCII included, keys its own bucket."""
    for client_id in ["10.0.0.1", "::1", "ä ö", "sp ace", "\u2028", "x" * MAX_CLIENT_ID_LENGTH]:
        assert take_key(client_id) == client_id


def test_list_is_ordered_by_client_id_and_paged(store):
    """list pages through buckets in code-point order of client_id and reports the total."""
    for name in ["b", "a", "C", "ä", "aa"]:
        result_of(store.create(name, capacity=1, tokens=1, refill_rate=0))
    items, total = result_of(store.list(limit=2, offset=0))
    assert total == 5
    assert [r.client_id for r in items] == ["C", "a"]
    items, _ = result_of(store.list(limit=10, offset=2))
    assert [r.client_id for r in items] == ["aa", "b", "ä"]
    items, total = result_of(store.list(limit=10, offset=99))
    assert (items, total) == ([], 5)


def test_update_is_partial(store, clock):
    """update changes only the given fields and moves updated_at."""
    result_of(store.create("u", capacity=10, tokens=10, refill_rate=1))
    clock.advance(5)
    record = result_of(store.update("u", refill_rate=3))
    assert (record.capacity, record.tokens, record.refill_rate) == (10, 10.0, 3.0)
    assert record.updated_at > record.created_at
    record = result_of(store.update("u", tokens=2.5))
    assert (record.capacity, record.tokens, record.refill_rate) == (10, 2.5, 3.0)


def test_update_settles_refill_under_old_rate(store, clock):
    """Time before a rate change refills at the old rate, time after at the new one."""
    result_of(store.create("u", capacity=100, tokens=0, refill_rate=1))
    clock.advance(10)
    result_of(store.update("u", refill_rate=5))
    clock.advance(2)
    assert result_of(store.get("u")).tokens == 20.0


def test_lowering_capacity_clamps_tokens(store):
    """Lowering the capacity below the tokens held brings the tokens down to it."""
    result_of(store.create("u", capacity=10, tokens=8, refill_rate=0))
    record = result_of(store.update("u", capacity=3))
    assert (record.capacity, record.tokens) == (3, 3.0)
    decision = result_of(store.take("u", None))
    assert decision.remaining == 2


def test_update_rejects_tokens_above_capacity(store):
    """Explicit tokens above the (new or stored) capacity fail and change nothing."""
    result_of(store.create("u", capacity=10, tokens=8, refill_rate=0))
    with pytest.raises(InvalidBucket) as caught:
        result_of(store.update("u", tokens=11))
    assert caught.value.field == "tokens"
    with pytest.raises(InvalidBucket):
        result_of(store.update("u", capacity=5, tokens=6))
    assert result_of(store.get("u")).tokens == 8.0


def test_update_missing_bucket_is_none(store):
    """Updating a bucket that does not exist answers None."""
    assert result_of(store.update("ghost", capacity=3)) is None


def test_delete(store):
    """delete reports whether there was a bucket, and forgets it."""
    result_of(store.create("d", capacity=1, tokens=1, refill_rate=0))
    assert result_of(store.delete("d")) is True
    assert result_of(store.delete("d")) is False
    assert result_of(store.get("d")) is None


def test_deleted_client_starts_again_from_default(store):
    """After its bucket is deleted a client gets a fresh default bucket on the next request."""
    for _ in range(3):
        result_of(store.take("r", DEFAULT))
    assert not result_of(store.take("r", DEFAULT)).allowed
    result_of(store.delete("r"))
    assert result_of(store.take("r", DEFAULT)).remaining == 2


def test_to_json_shape(store):
    """to_json gives the SPEC section 6 fields, with the policy of section 8, with ISO-8601
    UTC timestamps."""
    record = result_of(store.create("j", capacity=5, tokens=1.25, refill_rate=0.5))
    assert record.to_json() == {
        "policy": "default",
        "client_id": "j",
        "capacity": 5,
        "tokens": 1.25,
        "refill_rate": 0.5,
        "created_at": "2023-11-14T22:13:20.000Z",
        "updated_at": "2023-11-14T22:13:20.000Z",
    }


def test_a_bucket_belongs_to_a_policy(store):
    """(policy, client_id) is a bucket's identity (SPEC 8): the same client id under two
    policies is two buckets, each listed, read, changed and deleted under its policy only;
    without a policy every call means ``default``."""
    assert result_of(store.take("c", BucketPolicy(1, 0), "api")).allowed
    assert not result_of(store.take("c", BucketPolicy(1, 0), "api")).allowed
    assert result_of(store.take("c", BucketPolicy(1, 0))).allowed
    created = result_of(store.create("d", 5, 5, 0, "api"))
    assert created.to_json()["policy"] == "api"
    with pytest.raises(BucketExists):
        result_of(store.create("d", 5, 5, 0, "api"))
    assert result_of(store.create("d", 7, 7, 0)).policy == "default"
    records, total = result_of(store.list(10, 0, "api"))
    assert (total, [(r.policy, r.client_id) for r in records]) == (2, [("api", "c"), ("api", "d")])
    assert [r.client_id for r in result_of(store.list(10, 0))[0]] == ["c", "d"]
    assert result_of(store.update("d", capacity=9, policy="api")).capacity == 9
    assert result_of(store.get("d")).capacity == 7
    assert result_of(store.delete("d", "api")) and result_of(store.get("d", "api")) is None
    assert result_of(store.get("d")) is not None


def test_take_now_answers_with_the_decision_itself(store):
    """take_now is take without the Deferred: the decision (or None: not limited) as a value,
    counted on the same bucket."""
    decision = store.take_now("10.0.0.9", DEFAULT)
    assert isinstance(decision, Decision) and decision.remaining == 2
    assert result_of(store.take("10.0.0.9", DEFAULT)).remaining == 1
    assert store.take_now("10.0.0.10", None) is None
