"""Token leasing: the PostgreSQL limiter without a database round trip per request.

:class:`LeasingStore` wraps a :class:`~equalizer.stores.PostgresStore` and provides
:class:`~equalizer.stores.IBucketStore`. Everything but ``take`` goes to the wrapped
store; ``take`` is answered from tokens this instance has *leased* from the
database, and the database is asked in batches.

Leases
------
For each client key the instance may hold an **allowance**: tokens already taken
out of the bucket's row in the database, not yet handed to requests. A ``take``
with a live allowance is a few dict and attribute operations and answers at once
(``succeed``). Without one, the request waits for the next **settlement**.

A settlement is one statement, ``SELECT * FROM equalizer_settle(batch)`` (a
PL/pgSQL function, migration 0002, whose inner statements are planned once per
session), for every key with waiting requests and every key with tokens to give
back, at most :data:`MAX_BATCH` keys. Per key, in client id order, under the row
lock and from the database clock (the refill of
:class:`~equalizer.stores.PostgresStore`)::

    T        = min(C, refilled T + given back)
    granted  = min(floor(T), waiting + min(extra, max(1, C // 10)))
    T        = T - granted

A key without a row is created from the default policy, full, minus the grant;
with no default it is not limited (``None``). The first ``waiting`` tokens go to
the waiting requests in arrival order, the rest becomes the allowance; requests
left without a token are refused with the decision the row gives
(``Retry-After`` and all). At most ``max_in_flight`` settlements (default 1) are
in flight, and one starts at most every ``linger`` seconds (2 ms): requests
arriving meanwhile gather for the next, so statements per second are bounded by
the database's latency, not by the request rate, and under load each carries
many keys. Rows are locked in client id order, so instances settling
overlapping keys never deadlock.

How much is leased (``extra``) adapts to demand: twice the demand since the
key's last settlement (waiting requests plus allowance used), at least
``min_lease`` (:data:`MIN_LEASE`), at most ``max_lease`` (:data:`MAX_LEASE`)
and never more than a tenth of the bucket (at least 1), so instances share
small buckets fairly. A key's first settlement leases too: clients come in
bursts (a page and what it loads), so the next requests of a new client are
answered at once instead of each waiting for a statement of its own; a client
that never comes back costs one more row, when its lease goes back. With 8
tokens at least, a client that comes back every second or two waits once per 9
requests (or per ``max_age``), not once per 5 as with 4 (measured with 10,000
keys in turn at 6,500 requests a second: 9-10k waits in 8 s with 4, none after
the first sight with 8, and 4-8% less CPU per request).

A busy key asks for its next lease when half of an allowance of at least
:data:`PREFETCH_FROM` tokens is used, so its requests do not wait; what is left
of the old allowance then goes back. Smaller allowances are used up first: for
a key that comes back every few seconds an early lease would cost a statement
row for it and another for what goes back, for a wait it seldom has (measured
with 10,000 keys in turn: about one row per request with prefetching from 4
tokens, one row per key without). Hence :data:`PREFETCH_FROM` is twice
:data:`MIN_LEASE`: a first lease is used up, a grown one is renewed ahead.

An allowance not used for ``ttl`` seconds (:data:`LEASE_TTL`, 5 s) is no longer
used, nor any allowance ``max_age`` seconds (:data:`LEASE_MAX_AGE`, 10 s) after the
statement that leased it was sent. A sweep (one ``LoopingCall`` for the whole
store, every ``ttl / 2``, :data:`SWEEP_CHUNK` keys per reactor turn) gives
expired allowances back, all in the next
settlement (``T = min(C, T + returned)``), and forgets keys idle for another
``ttl``, so memory follows the keys active in the last few seconds. The idle
time is what makes a key that comes back every few seconds find its allowance:
10,000 keys in turn at 3,000 requests a second come back every 3.3 s, and with
a ``ttl`` shorter than that every request waited for a statement (measured:
the proxy was busy 78% of the time instead of 95%).

Decisions from the database are remembered briefly: when a settlement leaves a
bucket with less than one token and this instance with no allowance, the key is
refused locally until its next token is due, at most ``remember`` seconds
(:data:`REMEMBER`, 0.5 s); a flood on an empty bucket costs one row per
``remember``, not a statement per request. A key with no bucket and no default
is likewise remembered as not limited.

Bounds across instances
-----------------------
No over-admission in total. Tokens are taken out of the row, under its lock,
*before* a request is admitted with them, so any number of instances (and plain
PostgresStore instances on the same database) together never admit more than the
bucket hands out: at most ``C + R * t`` in the ``t`` seconds since it was
created, exactly as one instance alone; with ``R = 0`` never more than ``C`` in
all. Tokens given back were never used, so giving them back mints none.

The one slack is *when* a token is used: up to ``max_age`` after the database
handed it out. Over any window of ``L`` seconds all instances together admit at
most ``C + R * L`` plus the allowances they held when the window began, i.e. at
most ``sum over instances of min(max_lease, max(1, C // 10))`` and at most
``R * max_age`` beyond one bucket (nothing for a bucket that does not refill).

Under-admission is the price, and it is bounded too: a key may be refused on one
instance while another holds an allowance for it, at most
``min(max_lease, max(1, C // 10))`` tokens per other instance, until that
allowance is used or idle for ``ttl`` (plus the sweep's ``ttl / 2``) or
``max_age`` old. A remembered refusal may refuse, for up to ``remember``, a
request the database would have admitted (tokens given back meanwhile). Tokens
given back to a bucket that filled up meanwhile are lost, as refill above
capacity is.

What requests see
-----------------
``remaining`` is approximate: the whole tokens in the row after this instance's
last settlement for the key plus its allowance left, not counting other
instances' allowances; ``reset`` is as of that settlement. A remembered refusal
repeats the settlement's decision, so its ``Retry-After`` may be up to
``remember`` pessimistic.

Admin changes
-------------
``create``, ``update`` and ``delete`` through this store drop the key's
allowance (without giving it back: the new settings win) and its remembered
decision, when called and again when the change is done; a settlement in flight
meanwhile still answers its requests but leaves no allowance. Another instance
admits at most the allowance it held when the change was made (see above) and
sees the new settings at its next settlement for the key: when that allowance
runs out, goes idle for ``ttl`` or reaches ``max_age``; its remembered decisions
last at most ``remember``. ``get`` and ``list`` show the row plus what
this instance took out of it and did not use (its allowance, expired or not,
and tokens waiting to go back; capped at the capacity). A read is made while
no settlement for its key is in flight: it waits for one to land, and holds
the key's next one back until it is answered (a list does so for every key),
so each leased token is counted once, in the row or here: exact with one
instance; other instances' allowances count as taken.

Keys held
---------
At most ``max_buckets`` keys (``rate_limit.max_buckets``) are held; a new key
beyond them is refused (429, ``Retry-After`` twice ``ttl``, when idle keys are
forgotten) and leaves no state. The rows themselves are swept by the wrapped
store once full again (:meth:`~equalizer.stores.PostgresStore.sweep`).

Failures and shutdown
---------------------
A settlement that fails (database unreachable, timed out) fails all of its
waiting requests with :class:`~equalizer.stores.StoreUnavailable`, so the limiter
applies ``on_store_error``; nothing waits longer than the wrapped store's query
timeout. Tokens it was giving back are dropped (under-admission only).
Allowances already held keep being used until they expire. ``stop`` fails the
requests not yet sent, gives every allowance back in one last settlement
(waiting at most ``stop_timeout`` seconds) and then stops the wrapped store.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from equalizer.buckets.interface import (
    IBucketStore,
    StoreDataError,
    StoreUnavailable,
    take_elsewhere,
)
from equalizer.buckets.maths import Decision, credit, decide, window
from equalizer.config.model import DEFAULT_MAX_BUCKETS

if TYPE_CHECKING:
    from equalizer.buckets.interface import BucketRecord
    from equalizer.buckets.postgres.store import PostgresStore
    from equalizer.config.model import BucketPolicy, RateLimitConfig
    from equalizer.histogram import DurationHistogram

log = Logger()

LEASE_TTL = 5.0
"""Seconds an allowance may go unused before it goes back to the database."""

LEASE_MAX_AGE = 10.0
"""Seconds an allowance may be used at most, from the statement that leased it."""

REMEMBER = 0.5
"""Most seconds a refusal (or "not limited") from the database is repeated locally."""

MAX_LEASE = 256
"""Most tokens leased per key beyond the waiting requests, per settlement."""

MIN_LEASE = 8
"""Fewest tokens leased beyond the waiting requests (a tenth of the bucket caps it)."""

PREFETCH_FROM = 16
"""An allowance of at least this many tokens asks for the next lease once half is used."""

MAX_BATCH = 1000
"""Most keys in one settlement statement."""

SWEEP_CHUNK = 2000
"""Keys the lease sweep looks at per reactor turn."""

MAX_IN_FLIGHT = 1
"""Most settlement statements in flight at once."""

LINGER = 0.002
"""Least seconds between the starts of two settlements, so that each carries more keys."""

MAX_ATTEMPTS = 3
"""Settlements a key's requests may go through without an answer (its bucket deleted
and created again by others while the statement ran), before they fail."""



class _Key:
    """What this instance knows about one client key."""

    __slots__ = (
        "allowance", "expires", "dies", "low", "limit", "base", "reset", "window",
        "cached", "until", "waiters", "default", "used", "epoch", "settling", "attempts",
    )

    def __init__(self) -> None:
        self.allowance = 0  # leased tokens left
        self.expires = 0.0  # ... usable until then (clock seconds): idle ttl, moved by use
        self.dies = 0.0  # ... and never after this: max_age after it was leased
        self.low = -1  # ask for the next lease when the allowance is down to this
        self.limit = 0  # capacity, floor(DB tokens), reset, window: for decisions
        self.base = 0
        self.reset = 0
        self.window = 0
        self.cached: Decision | None = None  # a remembered refusal, or None: not limited
        self.until = 0.0  # ... valid until then
        self.waiters: list[Deferred[Decision | None]] = []
        self.default: BucketPolicy | None = None
        self.used = 0  # tokens of the allowance used since the last settlement
        self.epoch = 0  # bumped by admin changes: older settlements leave no allowance
        self.settling = False  # in the statement in flight
        self.attempts = 0


@implementer(IBucketStore)
class LeasingStore:
    """A PostgresStore whose takes are served from leased tokens (module docstring).

    Args:
        store: the PostgresStore holding the buckets; started and stopped by this.
        clock: for lease expiry, the sweep and scheduling settlements.
        ttl: seconds an allowance may go unused before it goes back.
        max_age: seconds an allowance may be used at most (at least ``ttl``).
        remember: most seconds a refusal or "not limited" is repeated locally.
        max_lease: most tokens leased per key beyond the waiting requests.
        min_lease: fewest tokens so leased.
        max_batch: most keys per settlement statement.
        max_in_flight: most settlement statements in flight at once.
        linger: least seconds between the starts of two settlements.
        stop_timeout: seconds ``stop`` waits to give allowances back.
    """

    def __init__(
        self,
        store: PostgresStore,
        clock: IReactorTime,
        ttl: float = LEASE_TTL,
        max_age: float = LEASE_MAX_AGE,
        remember: float = REMEMBER,
        max_lease: int = MAX_LEASE,
        min_lease: int = MIN_LEASE,
        max_batch: int = MAX_BATCH,
        max_in_flight: int = MAX_IN_FLIGHT,
        linger: float = LINGER,
        stop_timeout: float = 2.0,
    ) -> None:
        self._store = store
        self._database = store.leases()
        self._clock = clock
        self._ttl = ttl
        self._max_age = max(ttl, max_age)
        self._remember = remember
        self._max_lease = max_lease
        self._min_lease = min(min_lease, max_lease)
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._linger = linger
        self._last_sent = float("-inf")
        self._stop_timeout = stop_timeout
        self._keys: dict[str, _Key] = {}
        self._pending: dict[str, _Key] = {}  # keys with requests waiting for a settlement
        self._returns: dict[str, int] = {}  # tokens to give back, by key
        self._returning = False  # the sweep asked for all of them to go back now
        self._scheduled: IDelayedCall | None = None
        self._in_flight = 0  # settlements sent and not answered yet
        self._idle: list[Deferred[None]] = []  # fired when no settlement is in flight
        self._sweeper: LoopingCall | None = None
        self._sweeping: list[str] | None = None  # keys the sweep under way has yet to see
        self._running = False
        self._giving: dict[str, int] = {}  # tokens given back by settlements in flight, by key
        self._reading: dict[str, int] = {}  # bucket reads in flight, by key: not settled now
        self._listing = 0  # bucket lists in flight: nothing is settled meanwhile
        self._landed: list[Deferred[None]] = []  # fired when a settlement is answered
        self.max_buckets = DEFAULT_MAX_BUCKETS
        self.over_cap = 0
        """New keys refused because ``max_buckets`` keys were held."""
        self._cap_logged = False
        self.statements = 0
        """Settlement statements sent so far."""
        self.settled_keys = 0
        """Keys carried by those statements, in total."""
        self.waits = 0
        """Takes that found no allowance and waited for a settlement."""

    @property
    def key_count(self) -> int:
        """Client keys held (allowance, remembered decision or waiting requests)."""
        return len(self._keys)

    @property
    def available(self) -> bool:
        return self._store.available

    @property
    def bucket_count(self) -> int | None:
        """Rows in the buckets table as of the wrapped store's last sweep."""
        return self._store.bucket_count

    @property
    def swept(self) -> int:
        return self._store.swept

    @property
    def query_durations(self) -> DurationHistogram:
        return self._store.query_durations

    def configure(self, config: RateLimitConfig) -> None:
        """The cap on keys held (``max_buckets``); the sweep's interval goes to the store."""
        self.max_buckets = config.max_buckets
        self._store.configure(config)

    # life cycle ----------------------------------------------------------------------

    def start(self) -> Deferred[None]:
        """Start the wrapped store, then serve and sweep."""
        return self._store.start().addCallback(self._started)

    def _started(self, result: None) -> None:
        self._running = True
        if self._sweeper is None:
            self._sweeper = LoopingCall(self._sweep)
            self._sweeper.clock = self._clock
            self._sweeper.start(self._ttl / 2, now=False)

    def stop(self) -> Deferred[None]:
        """Give allowances back (within ``stop_timeout``), then stop the wrapped store."""
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self._running = False
        self._reading.clear()  # give everything back now: reads in flight may be off
        self._listing = 0
        if self._sweeper is not None:
            self._sweeper.stop()
            self._sweeper = None
        if self._scheduled is not None and self._scheduled.active():
            self._scheduled.cancel()
        self._scheduled = None
        pending, self._pending = self._pending, {}
        for key in pending.values():
            waiters, key.waiters = key.waiters, []
            for d in waiters:
                d.errback(StoreUnavailable("the store is stopping"))
        for client_id, key in self._keys.items():
            if key.allowance:
                self._give_back(client_id, key)
        self._keys.clear()
        try:
            await Deferred.fromCoroutine(self._drain()).addTimeout(
                self._stop_timeout, self._clock)
        except Exception as e:  # best effort: tokens not given back are under-admission
            log.warn("could not give leased tokens back on stop: {error}", error=e)
        self._returns.clear()
        await self._store.stop()

    async def _drain(self) -> None:
        while True:
            if self._in_flight:
                d: Deferred[None] = Deferred()
                self._idle.append(d)
                try:
                    await d
                except CancelledError:
                    self._idle.remove(d)
                    raise
            elif self._returns:
                self._settle()
            else:
                return

    # the hot path ----------------------------------------------------------------------

    def take(self, client_id: str, default: BucketPolicy | None) -> Deferred[Decision | None]:
        key = self._keys.get(client_id)
        if key is not None:
            now = self._clock.seconds()
            if key.allowance:
                if now < key.expires:
                    key.allowance -= 1
                    key.used += 1
                    expires = now + self._ttl
                    key.expires = expires if expires < key.dies else key.dies
                    if key.allowance == key.low:
                        self._prefetch(client_id, key)
                    return succeed(Decision(
                        True, key.limit, key.base + key.allowance, 0, key.reset, key.window))
                self._give_back(client_id, key)
            elif now < key.until:
                return succeed(key.cached)
        elif not self._running:
            return fail(StoreUnavailable("the store is not running"))
        else:
            # A client id no row can have (it would fail the whole settlement) goes by its digest.
            elsewhere = take_elsewhere(self, client_id, default)
            if elsewhere is not None:
                return elsewhere
            if len(self._keys) >= self.max_buckets:
                return self._at_cap(default)
            key = self._keys[client_id] = _Key()
        self.waits += 1
        d: Deferred[Decision | None] = Deferred()
        key.waiters.append(d)
        key.default = default
        self._pending[client_id] = key
        if self._scheduled is None:
            self._schedule()
        return d

    def _at_cap(self, default: BucketPolicy | None) -> Deferred[Decision | None]:
        """A new key while ``max_buckets`` keys are held: refused (429), so memory stays
        bounded and no client goes unlimited; idle keys are forgotten within
        ``2 * ttl``, which is when to come back. Without a default there is no
        policy to refuse by: the store is as good as unavailable for it."""
        if not self._cap_logged:
            self._cap_logged = True  # again after the next sweep, if still at the cap
            log.warn("rate_limit.max_buckets ({cap}) client keys held: new clients are "
                     "refused until idle keys are forgotten", cap=self.max_buckets)
        self.over_cap += 1
        if default is None:
            return fail(StoreUnavailable("rate_limit.max_buckets client keys held"))
        retry = max(1, math.ceil(2 * self._ttl))
        return succeed(Decision(False, default.capacity, 0, retry, retry,
                                window(default.capacity, default.refill_rate)))

    def _prefetch(self, client_id: str, key: _Key) -> None:
        """Lease more for a busy key before its allowance runs out, so nobody waits."""
        if not key.settling:
            self._pending[client_id] = key
            if self._scheduled is None:
                self._schedule()

    def _give_back(self, client_id: str, key: _Key) -> None:
        self._returns[client_id] = self._returns.get(client_id, 0) + key.allowance
        key.allowance = 0

    # settlements -------------------------------------------------------------------------

    def _schedule(self) -> None:
        """Settle on the next reactor turn, or once ``linger`` has passed since the last one."""
        if self._in_flight < self._max_in_flight:
            delay = self._last_sent + self._linger - self._clock.seconds()
            self._scheduled = self._clock.callLater(delay if delay > 0 else 0, self._settle)

    def _settle(self) -> None:
        """Send one statement for the waiting keys and the tokens to give back, but
        for the keys a bucket read is looking at (none while a list is)."""
        self._scheduled = None
        if self._in_flight >= self._max_in_flight or not (self._pending or self._returns):
            return
        if self._listing:
            return  # the list's end schedules the next settlement
        reading = self._reading
        held = {k: self._returns.pop(k) for k in reading if k in self._returns}
        try:
            self._send()
        finally:
            self._returns.update(held)

    def _send(self) -> None:
        """Build and send the statement (``_settle`` has set aside what must wait)."""
        room = self._max_batch
        pending = self._pending
        if len(pending) <= room and not self._in_flight and not self._reading:
            items = list(pending.items())
            self._pending = {}
        else:  # keys in a statement in flight wait for its answer
            items = []
            kept = {}
            for client_id, key in pending.items():
                if key.settling or len(items) >= room or client_id in self._reading:
                    kept[client_id] = key
                else:
                    items.append((client_id, key))
            self._pending = kept
        returns = self._returns
        if not items and not returns:
            return
        max_lease = self._max_lease
        min_lease = self._min_lease
        rows: list[tuple[str, int, int, int, int | None, float | None]] = []
        batch = []
        for client_id, key in items:
            waiters, key.waiters = key.waiters, []
            want = len(waiters)
            default = key.default
            back = returns.pop(client_id, 0) if returns else 0
            extra = min(max_lease, max(min_lease, 2 * (want + key.used)))
            if default is None or not want:
                rows.append((client_id, want, extra, back, None, None))
            else:
                rows.append((client_id, want, extra, back, default.capacity, default.refill_rate))
            key.used = 0
            key.settling = True
            batch.append((client_id, key, waiters, key.epoch, default))
        while returns and len(rows) < room:
            client_id, back = returns.popitem()
            rows.append((client_id, 0, 0, back, None, None))
        if not returns:
            self._returning = False
        given = [(row[0], row[3]) for row in rows if row[3]]
        giving = self._giving
        for client_id, back in given:
            giving[client_id] = giving.get(client_id, 0) + back
        sent = self._last_sent = self._clock.seconds()
        self.statements += 1
        self.settled_keys += len(rows)
        self._in_flight += 1
        d = self._database.settle(rows)
        d.addCallbacks(self._settled, self._failed, (batch, sent), None, (batch,), None)
        d.addErrback(lambda f: log.failure("settling leased tokens failed", f))
        d.addBoth(self._next, given)

    def _next(self, result: object, given: list[tuple[str, int]]) -> None:
        self._in_flight -= 1
        giving = self._giving
        for client_id, back in given:  # in the row now, or lost with the statement
            left = giving.pop(client_id, 0) - back
            if left > 0:
                giving[client_id] = left
        landed, self._landed = self._landed, []
        for d in landed:
            d.callback(None)
        if not self._in_flight:
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)
        # Tokens to give back wait for the sweep (then all go), or ride along with demand.
        if self._running and self._scheduled is None and (
            self._pending or (self._returns and self._returning)
        ):
            self._schedule()

    def _settled(self, rows: list[tuple[Any, ...]], batch: list[Any], sent: float) -> None:
        now = self._clock.seconds()
        found = {row[0]: row for row in rows}
        answers: list[tuple[Deferred[Any], Any]] = []
        errors: list[Deferred[Any]] = []
        for client_id, key, waiters, epoch, default in batch:
            key.settling = False
            current = key.epoch == epoch and self._keys.get(client_id) is key
            row = found.get(client_id)
            if row is None:
                if not waiters:
                    continue  # a lease asked for ahead of need: nothing to answer
                if default is None:
                    answers.extend((d, None) for d in waiters)
                    if current:
                        key.cached = None
                        key.until = now + self._remember
                        self._answer_late(client_id, key, now, answers)
                else:  # created or deleted by someone else meanwhile: again
                    key.attempts += 1
                    if key.attempts > MAX_ATTEMPTS:
                        key.attempts = 0
                        errors.extend(waiters)
                    else:
                        key.waiters[:0] = waiters
                        self._pending[client_id] = key
                continue
            key.attempts = 0
            _, granted, tokens, capacity, rate = row
            served = min(granted, len(waiters))
            base = int(tokens)
            info = decide(True, capacity, tokens, rate)
            reset, window = info.reset, info.window
            for i, d in enumerate(waiters[:served]):
                answers.append((d, Decision(True, capacity, base + granted - i - 1, 0, reset,
                                            window)))
            if served < len(waiters):
                refusal = decide(False, capacity, tokens, rate)
                answers.extend((d, refusal) for d in waiters[served:])
            if key.epoch != epoch:
                continue  # an admin change came in meanwhile: no allowance from before it
            if not current:  # stopping: straight back to the database
                if granted > served:
                    self._returns[client_id] = self._returns.get(client_id, 0) + granted - served
                continue
            if key.allowance:  # what is left of the previous lease goes back
                self._give_back(client_id, key)
            key.allowance = allowance = granted - served
            key.low = allowance // 2 if allowance >= PREFETCH_FROM else -1
            key.dies = sent + self._max_age
            key.expires = min(sent + self._ttl, key.dies)
            key.limit, key.base, key.reset, key.window = capacity, base, reset, window
            if not key.allowance and tokens < 1:
                due = (1 - tokens) / rate if rate > 0 else self._remember
                key.cached = decide(False, capacity, tokens, rate)
                key.until = now + min(due, self._remember)
            self._answer_late(client_id, key, now, answers)
        for d, answer in answers:
            d.callback(answer)
        for d in errors:
            d.errback(StoreUnavailable("the bucket kept changing under the lease"))

    def _answer_late(
        self, client_id: str, key: _Key, now: float, answers: list[tuple[Deferred[Any], Any]]
    ) -> None:
        """Answer requests that came while the key was settling, from what it brought."""
        waiters = key.waiters
        if not waiters:
            return
        served = 0
        while served < len(waiters) and key.allowance and now < key.expires:
            key.allowance -= 1
            key.used += 1
            answers.append((waiters[served], Decision(
                True, key.limit, key.base + key.allowance, 0, key.reset, key.window)))
            served += 1
        if served < len(waiters) and not key.allowance and now < key.until:
            answers.extend((d, key.cached) for d in waiters[served:])
            served = len(waiters)
        if served:
            del waiters[:served]
            if not waiters:
                self._pending.pop(client_id, None)

    def _failed(self, failure: Failure, batch: list[Any]) -> None:
        if not failure.check(StoreUnavailable, StoreDataError):  # those are logged where raised
            log.failure("settling leased tokens failed", failure)
        message = failure.getErrorMessage()
        for _, key, waiters, _, _ in batch:
            key.settling = False
            for d in waiters:
                d.errback(StoreUnavailable(message))

    def _sweep(self) -> None:
        """Give expired allowances back and forget idle keys (the LoopingCall's tick):
        :data:`SWEEP_CHUNK` keys per reactor turn, so a million keys never stall it."""
        if self._sweeping is not None:
            return  # the last one is still under way
        self._cap_logged = False
        self._sweeping = list(self._keys)
        self._sweep_chunk()

    def _sweep_chunk(self) -> None:
        ids = self._sweeping
        if ids is None or not self._running:
            self._sweeping = None
            return
        try:
            chunk = ids[-SWEEP_CHUNK:]
            del ids[-SWEEP_CHUNK:]
            now = self._clock.seconds()
            keys = self._keys
            for client_id in chunk:
                key = keys.get(client_id)
                if key is None:
                    continue
                if key.allowance:
                    if now < key.expires:
                        continue
                    self._give_back(client_id, key)
                if (
                    not key.waiters
                    and not key.settling
                    and now >= key.until
                    and now >= key.expires + self._ttl  # remembered a while, to lease if seen again
                ):
                    del keys[client_id]
            if ids:
                self._clock.callLater(0, self._sweep_chunk)
                return
            self._sweeping = None
            if self._returns:
                self._returning = True
                if self._scheduled is None:
                    self._schedule()
        except Exception:
            self._sweeping = None
            log.failure("sweeping leases failed")

    # admin -------------------------------------------------------------------------------

    def _drop(self, client_id: str) -> None:
        """Forget the key's allowance and remembered decision: an admin change wins."""
        self._returns.pop(client_id, None)
        key = self._keys.get(client_id)
        if key is not None:
            key.epoch += 1
            key.allowance = 0
            key.until = 0.0
            key.cached = None

    def _dropping(self, result: Any, client_id: str) -> Any:
        self._drop(client_id)
        return result

    def create(
        self, client_id: str, capacity: int, tokens: float, refill_rate: float
    ) -> Deferred[BucketRecord]:
        self._drop(client_id)
        d = self._store.create(client_id, capacity, tokens, refill_rate)
        return d.addBoth(self._dropping, client_id)

    def get(self, client_id: str) -> Deferred[BucketRecord | None]:
        return Deferred.fromCoroutine(self._get(client_id))

    async def _get(self, client_id: str) -> BucketRecord | None:
        """The row plus what this instance holds of it, read while no settlement
        for the key is in flight (it waits for one to land, and holds the next
        back), so every leased token is counted once: in the row or here."""
        while self._settling(client_id):
            await self._landing()
        self._reading[client_id] = self._reading.get(client_id, 0) + 1
        try:
            return self._with_leased(await self._store.get(client_id))
        finally:
            count = self._reading.pop(client_id, 0) - 1
            if count > 0:
                self._reading[client_id] = count
            self._resume()

    def list(self, limit: int, offset: int) -> Deferred[tuple[list[BucketRecord], int]]:
        return Deferred.fromCoroutine(self._list(limit, offset))

    async def _list(self, limit: int, offset: int) -> tuple[list[BucketRecord], int]:
        """A page of rows plus what this instance holds of them, read while no
        settlement is in flight (as ``get``, for every key)."""
        while self._in_flight:
            await self._landing()
        self._listing += 1
        try:
            records, total = await self._store.list(limit, offset)
            return [self._with_leased(record) for record in records], total
        finally:
            self._listing = max(0, self._listing - 1)
            self._resume()

    def _settling(self, client_id: str) -> bool:
        """Whether a settlement in flight carries the key (its row is about to change)."""
        key = self._keys.get(client_id)
        return (key is not None and key.settling) or client_id in self._giving

    def _landing(self) -> Deferred[None]:
        """Fires when the next settlement in flight is answered (or fails: it is bounded
        by the store's query timeout)."""
        d: Deferred[None] = Deferred()
        self._landed.append(d)
        return d

    def _resume(self) -> None:
        """After a read: settle what waited for it."""
        if self._running and self._scheduled is None and (self._pending or self._returns):
            self._schedule()

    def _with_leased(self, record: BucketRecord | None) -> BucketRecord | None:
        """Count the tokens this instance took out of the row and did not use as the
        client's: its allowance, live or expired, and tokens waiting to go back.
        Exact with one instance; other instances' leases count as taken."""
        if record is None:
            return None
        client_id = record.client_id
        key = self._keys.get(client_id)
        leased = self._returns.get(client_id, 0) + (key.allowance if key is not None else 0)
        if not leased:
            return record
        return attrs.evolve(record, tokens=credit(record.capacity, record.tokens, leased))

    def update(
        self,
        client_id: str,
        capacity: int | None = None,
        tokens: float | None = None,
        refill_rate: float | None = None,
    ) -> Deferred[BucketRecord | None]:
        self._drop(client_id)
        d = self._store.update(client_id, capacity, tokens, refill_rate)
        return d.addBoth(self._dropping, client_id)

    def delete(self, client_id: str) -> Deferred[bool]:
        self._drop(client_id)
        return self._store.delete(client_id).addBoth(self._dropping, client_id)
