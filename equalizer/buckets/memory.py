"""Buckets in memory: one process, lost on restart (SPEC section 5).

:class:`MemoryStore` keeps buckets in a dict and does the arithmetic with
:func:`equalizer.buckets.maths.take`, reading the injected clock once per call.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from equalizer.buckets.interface import (
    KEY_SEPARATOR,
    MAX_SWEEP_INTERVAL,
    BucketExists,
    BucketRecord,
    IBucketStore,
    InvalidBucket,
    as_deferred,
    bucket_key,
    new_bucket_problem,
    split_key,
    sweep_interval,
    take_elsewhere,
    tokens_above_capacity,
    validate_fields,
)
from equalizer.buckets.maths import Bucket, Decision, is_full, make_tuple, refill, window
from equalizer.buckets.maths import take as take_token
from equalizer.config.model import (
    DEFAULT_MAX_BUCKETS,
    DEFAULT_POLICY,
    BucketPolicy,
    RateLimitConfig,
)

log = Logger()

SWEEP_CHUNK = 2_000
"""Buckets the memory store's sweep looks at per reactor turn (1 to 3 ms)."""


def _moment(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def _record(key: str, bucket: Bucket, created: float) -> BucketRecord:
    policy, client_id = split_key(key)
    return BucketRecord(
        client_id,
        bucket.capacity,
        bucket.tokens,
        bucket.refill_rate,
        _moment(created),
        _moment(bucket.updated),
        policy,
    )


def _as_of_now(key: str, entry: tuple[Bucket, float], now: float) -> BucketRecord:
    """The record with the tokens refilled up to ``now``, ``updated`` as stored."""
    bucket, created = entry
    return _record(key, refill(bucket, now)._replace(updated=bucket.updated), created)


@implementer(IBucketStore)
class MemoryStore:
    """Buckets in a dict: one process, lost on restart. Answers synchronously.

    Buckets made from the default policy are forgotten once full again (they hold
    no information) and unused since the sweep before began, by a sweep every
    :func:`sweep_interval` seconds that looks at :data:`SWEEP_CHUNK` buckets per
    reactor turn, so memory follows the clients active within about two refill
    windows, and a client that comes back within one keeps its bucket (10,000 keys
    coming back every second, with a default that refills within one, were forgotten
    and made again every second; the sweep a new client at the cap starts forgets
    every full one). Buckets created or changed through the admin API are kept
    until deleted. ``max_buckets`` caps the
    buckets held: a new client arriving at the cap is refused (429) and a sweep
    starts at once; clients with a bucket are served as ever.
    """

    available = True

    def __init__(self, clock: IReactorTime, max_buckets: int = DEFAULT_MAX_BUCKETS) -> None:
        self._clock = clock
        self.buckets: dict[str, tuple[Bucket, float]] = {}
        """Key (:func:`bucket_key`) -> (bucket, created at, clock seconds); workers' leases
        settle on it (:func:`equalizer.workers.leases.settle_in_memory`)."""
        self._kept: set[str] = set()  # made or changed through the admin API: never swept
        self.max_buckets = max_buckets
        self.interval = MAX_SWEEP_INTERVAL
        self.swept = 0
        """Default buckets forgotten because they were full again."""
        self.over_cap = 0
        """New clients refused because ``max_buckets`` buckets were held."""
        self._running = False
        self._timer: IDelayedCall | None = None
        self._pass: list[str] | None = None  # client ids the sweep under way has yet to see
        self._unused_since = 0.0  # the sweep under way forgets full buckets unused since
        self._began = 0.0  # when the sweep under way (or the last) began
        self._last: Decision | None = None  # the last take's, reused while the same (decide)
        self._last_rate = 0.0  # ... and its bucket's refill rate

    @property
    def bucket_count(self) -> int:
        """Buckets held now."""
        return len(self.buckets)

    def configure(self, config: RateLimitConfig) -> None:
        """Take the cap and the sweep interval of ``config`` (start-up and reload)."""
        self.max_buckets = config.max_buckets
        self.interval = sweep_interval(config.default)
        timer = self._timer
        if self._pass is None and timer is not None and timer.active():
            timer.reset(min(self.interval, max(0.0, timer.getTime() - self._clock.seconds())))

    def start(self) -> Deferred[None]:
        """Start sweeping (takes work without it; tests drive the sweep with a Clock)."""
        if not self._running:
            self._running = True
            self._began = self._clock.seconds()
            self._timer = self._clock.callLater(self.interval, self._sweep)
        return succeed(None)

    def stop(self) -> Deferred[None]:
        self._running = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._pass = None
        return succeed(None)

    def _sweep(self) -> None:
        """One step of a sweep: forget the full default buckets among the next
        SWEEP_CHUNK client ids, then come back on the next reactor turn, or after
        the interval once every bucket held when the sweep began has been seen."""
        self._timer = None
        try:
            now = self._clock.seconds()
            if self._pass is None:
                self._pass = list(self.buckets)
                self._peak = max(self._peak, len(self._pass))
                self._unused_since, self._began = self._began, now
            self.swept += self._forget_full(self._pass, now)
        except Exception:
            log.failure("sweeping buckets failed")
            self._pass = None
        if self._pass:
            self._timer = self._clock.callLater(0, self._sweep)
            return
        self._pass = None
        self._cap_logged = False
        self._compact()
        if self._running:
            self._timer = self._clock.callLater(self.interval, self._sweep)

    def _forget_full(self, ids: list[str], now: float) -> int:
        """Drop the full default buckets unused since ``_unused_since`` among the last
        SWEEP_CHUNK of ``ids`` (which are consumed); how many went."""
        chunk = ids[-SWEEP_CHUNK:]
        del ids[-SWEEP_CHUNK:]
        buckets = self.buckets
        kept = self._kept
        unused_since = self._unused_since
        gone = 0
        for client_id in chunk:
            entry = buckets.get(client_id)
            if entry is not None and entry[0].updated <= unused_since \
                    and client_id not in kept and is_full(entry[0], now):
                del buckets[client_id]
                gone += 1
        return gone

    def _compact(self) -> None:
        """Give back the dict's room once it holds far fewer buckets than it has room
        for: a dict never shrinks when keys are deleted, only when copied."""
        held = len(self.buckets)
        if held < self._peak // 4:
            self.buckets = dict(self.buckets)
            self._peak = held

    _peak = 0
    _cap_logged = False

    def _sweep_soon(self) -> None:
        """Start a sweep on the next reactor turn unless one is under way (cap reached)."""
        if self._running and self._pass is None:
            self._began = math.inf  # room now: every full bucket goes, used lately or not
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            self._timer = self._clock.callLater(0, self._sweep)

    def _at_cap(self, default: BucketPolicy) -> Decision:
        """The refusal of a new client while ``max_buckets`` buckets are held.

        Refusing, not evicting: every bucket held is either kept on purpose (admin
        API) or not yet full (its client spent tokens), and forgetting one would
        hand that client fresh tokens. Full ones go in the sweep this starts.
        """
        if not self._cap_logged:
            self._cap_logged = True  # again after the next sweep, if still at the cap
            log.warn("rate_limit.max_buckets ({cap}) buckets held: new clients are refused "
                     "until the sweep frees room", cap=self.max_buckets)
        self.over_cap += 1
        self._sweep_soon()
        retry = max(1, math.ceil(self.interval))
        return Decision(False, default.capacity, 0, retry, retry,
                        window(default.capacity, default.refill_rate))

    def take(self, client_id: str, default: BucketPolicy | None,
             policy: str = DEFAULT_POLICY) -> Deferred[Decision | None]:
        return as_deferred(self.take_now(client_id, default, policy))

    def take_now(self, client_id: str, default: BucketPolicy | None,
                 policy: str = DEFAULT_POLICY) -> Decision | None | Deferred[Decision | None]:
        now = self._clock.seconds()
        key = client_id if policy == DEFAULT_POLICY else bucket_key(policy, client_id)
        entry = self.buckets.get(key)
        if entry is None:
            elsewhere = take_elsewhere(self, client_id, default, policy)
            if elsewhere is not None:
                return elsewhere
            if default is None:
                return None
            if len(self.buckets) >= self.max_buckets:
                return self._at_cap(default)
            bucket = make_tuple(Bucket, (default.capacity, float(default.capacity),
                                         default.refill_rate, now))
            created = now
        else:
            bucket, created = entry
        rate = bucket.refill_rate
        bucket, decision = take_token(bucket, now, self._last if rate == self._last_rate else None)
        self.buckets[key] = (bucket, created)
        self._last, self._last_rate = decision, rate
        return decision

    def create(
        self, client_id: str, capacity: int, tokens: float, refill_rate: float,
        policy: str = DEFAULT_POLICY,
    ) -> Deferred[BucketRecord]:
        now = self._clock.seconds()
        problem = new_bucket_problem(client_id, capacity, tokens, refill_rate)
        if problem is not None:
            return fail(problem)
        key = bucket_key(policy, client_id)
        if key in self.buckets:
            return fail(BucketExists(client_id))
        bucket = Bucket(capacity, float(tokens), float(refill_rate), now)
        self.buckets[key] = (bucket, now)
        self._kept.add(key)
        return succeed(_record(key, bucket, now))

    def get(self, client_id: str, policy: str = DEFAULT_POLICY) -> Deferred[BucketRecord | None]:
        now = self._clock.seconds()
        key = bucket_key(policy, client_id)
        entry = self.buckets.get(key)
        if entry is None:
            return succeed(None)
        return succeed(_as_of_now(key, entry, now))

    def list(self, limit: int, offset: int,
             policy: str = DEFAULT_POLICY) -> Deferred[tuple[list[BucketRecord], int]]:
        now = self._clock.seconds()
        if limit < 0 or offset < 0:
            return fail(ValueError("limit and offset must be >= 0"))
        prefix = "" if policy == DEFAULT_POLICY else bucket_key(policy, "")
        keys = sorted(key for key in self.buckets
                      if (key.startswith(prefix) if prefix else KEY_SEPARATOR not in key))
        page = keys[offset : offset + limit]
        records = [_as_of_now(key, self.buckets[key], now) for key in page]
        return succeed((records, len(keys)))

    def update(
        self,
        client_id: str,
        capacity: int | None = None,
        tokens: float | None = None,
        refill_rate: float | None = None,
        policy: str = DEFAULT_POLICY,
    ) -> Deferred[BucketRecord | None]:
        now = self._clock.seconds()
        try:
            validate_fields(capacity, tokens, refill_rate)
        except InvalidBucket as e:
            return fail(e)
        key = bucket_key(policy, client_id)
        entry = self.buckets.get(key)
        if entry is None:
            return succeed(None)
        bucket, created = entry
        current = refill(bucket, now)  # settle the past under the old settings
        new_capacity = current.capacity if capacity is None else capacity
        if tokens is None:
            new_tokens = min(current.tokens, float(new_capacity))
        elif tokens > new_capacity:
            return fail(tokens_above_capacity())
        else:
            new_tokens = float(tokens)
        new_rate = current.refill_rate if refill_rate is None else float(refill_rate)
        updated = Bucket(new_capacity, new_tokens, new_rate, max(now, bucket.updated))
        self.buckets[key] = (updated, created)
        self._kept.add(key)
        return succeed(_record(key, updated, created))

    def delete(self, client_id: str, policy: str = DEFAULT_POLICY) -> Deferred[bool]:
        key = bucket_key(policy, client_id)
        self._kept.discard(key)
        return succeed(self.buckets.pop(key, None) is not None)

