"""Token leasing: the PostgreSQL limiter without a database round trip per request.

:class:`LeasingStore` wraps a :class:`~equalizer.stores.PostgresStore` and provides
:class:`~equalizer.stores.IBucketStore`. Everything but ``take`` goes straight to
the wrapped store; ``take`` is answered from tokens this instance has *leased*
from the database, and the database is asked in batches.

Leases
------
For each client key the instance may hold a small **allowance**: tokens already
taken out of the bucket's row in the database, not yet handed to requests. A
``take`` with a live allowance is a few dict and attribute operations and answers
at once (``succeed``). Without one, the request waits for the next **settlement**.

A settlement is one SQL statement for every key that has waiting requests (at
most :data:`MAX_BATCH` keys; more wait for the next one) and every key with
tokens to give back. Per key, under the row lock and from the database clock
(the same refill as :class:`~equalizer.stores.PostgresStore`)::

    T        = min(C, refilled T + given back)
    granted  = min(floor(T), waiting + min(extra, max(1, C // 10)))
    T        = T - granted

A key without a row is created from the default policy in the same statement,
full, minus the grant; with no default it is not limited (``None``). The first
``waiting`` tokens of a grant go to the waiting requests in arrival order, the
rest becomes the allowance; waiting requests left without a token are refused
with the decision the row gives (``Retry-After`` and all). Only one settlement
is in flight at a time; requests arriving meanwhile gather for the next, so
the number of statements per second is bounded by the database's latency, not
by the request rate, and under load each statement carries many keys.

The lease (``extra``) adapts: twice the demand the key saw since its last
settlement (waiting requests plus allowance used), at most ``max_lease``
(:data:`MAX_LEASE`), and never more than a tenth of the bucket (at least 1), so
instances share a small bucket fairly.

An allowance lives for ``ttl`` seconds (:data:`LEASE_TTL`) from the moment its
statement was sent. After that it is no longer used, and a sweep (one
``LoopingCall`` for the whole store, every ``ttl / 2``) gives unused tokens back
to the database in the next settlement (``T = min(C, T + returned)``) and forgets
idle keys, so memory follows the keys active in the last second or so.

Refusals are remembered: when a settlement leaves a bucket with less than one
token and this instance with no allowance, further requests for the key are
refused locally until the next token is due, at most ``ttl`` seconds. A flood on
an empty bucket costs one key in a statement per ``ttl``, not a statement per
request. Likewise a key with no bucket and no default is remembered as not
limited for ``ttl``.

Bounds across instances
-----------------------
No over-admission in total. Tokens are taken out of the database row *before* a
request is admitted with them, under the row lock, so N instances together never
admit more than the bucket hands out: at most ``C + R * t`` over any ``t``
seconds since the bucket was created, exactly as one instance with
:class:`~equalizer.stores.PostgresStore` alone; with ``R = 0``, never more than
``C`` in all. Given-back tokens are tokens that were never used, so giving them
back never mints any. The one slack is *when* a token is used: up to ``ttl``
after the database handed it out. Over a window of ``L`` seconds, all instances
together admit at most ``C + R * (L + ttl)``, i.e. at most ``R * ttl`` tokens
beyond what one bucket would admit in that window (0 for buckets that do not
refill).

Under-admission is the price, and it is bounded: a key may be refused on one
instance while another holds an allowance for it, at most
``min(max_lease, max(1, C // 10))`` tokens per other instance, for at most
``ttl`` (plus the sweep interval, ``ttl / 2``, until they are back in the row).
A remembered refusal may refuse for up to ``ttl`` a request that the database
would have admitted (tokens another instance gave back meanwhile). Tokens given
back to a bucket that filled up meanwhile are lost, as the bucket's own refill
above capacity is.

What requests see
-----------------
``remaining`` is approximate: the whole tokens the database row held after the
last settlement plus this instance's allowance left, not counting other
instances' allowances. ``reset`` is as of that settlement. A locally
remembered refusal repeats the settlement's decision, so its ``Retry-After``
may be up to ``ttl`` pessimistic.

Admin changes
-------------
``create``, ``update`` and ``delete`` through this store drop the key's
allowance (without giving it back: the new settings win) and its remembered
decision, when called and again when the change is done; a settlement in flight
meanwhile still answers its requests but leaves no allowance. Other instances
see the change within ``ttl``, when their allowances and remembered decisions
expire. ``get`` and ``list`` show the database row, in which leased tokens count
as taken.

Failures and shutdown
---------------------
A settlement that fails (database unreachable, timed out) fails all of its
waiting requests with :class:`~equalizer.stores.StoreUnavailable`, so the
limiter applies ``on_store_error``; nothing waits longer than the wrapped
store's query timeout. Tokens it was giving back are dropped (under-admission
only). Allowances already held keep being used until they expire. ``stop``
refuses requests not yet sent, gives every allowance back in one last
settlement (waiting at most ``stop_timeout`` seconds) and then stops the
wrapped store.
"""

from __future__ import annotations

from itertools import islice
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from equalizer.ratelimit import Decision, decide
from equalizer.stores import (
    _REFILLED,
    IBucketStore,
    StoreUnavailable,
    _client_id_problem,
)

if TYPE_CHECKING:
    from equalizer.config import BucketPolicy
    from equalizer.stores import BucketRecord, PostgresStore

log = Logger()

LEASE_TTL = 0.5
"""Seconds an allowance may be used after the statement that leased it was sent."""

MAX_LEASE = 64
"""Most tokens leased per key beyond the waiting requests, per settlement."""

MAX_BATCH = 1000
"""Most keys in one settlement statement."""

MAX_ATTEMPTS = 3
"""Settlements a key's requests may go through without an answer (a bucket created
or deleted by someone else between the statement's snapshot and its insert)."""

_REFILLED_AT = _REFILLED.format(now="n.now")
_HELD = f"least(b.capacity::float8, {_REFILLED_AT} + w.back)"

# One settlement. Parameters, one array element per key: client id, requests
# waiting, lease wanted beyond them, tokens given back, and the default policy
# (capacity NULL: none). Rows are locked in client id order ("l") before any
# insert ("ins" only starts once "l" is read to its end), so two instances
# settling overlapping keys never deadlock. "l" is SELECT ... FOR UPDATE, which
# returns the row as last committed, and "upd" writes values computed from it
# under that lock. Keys with no row are inserted from the default; a row another
# instance inserted meanwhile is left alone (DO NOTHING) and its key is retried.
_SETTLE = (
    "WITH w AS MATERIALIZED (SELECT * FROM unnest("
    "%s::text[], %s::integer[], %s::integer[], %s::integer[], %s::integer[], %s::float8[])"
    " AS w(client_id, want, extra, back, dcap, drate)),"
    " n AS MATERIALIZED (SELECT clock_timestamp() AS now),"
    " l AS MATERIALIZED (SELECT b.client_id, w.want,"
    f" {_HELD} AS t,"
    f" least(floor({_HELD})::integer,"
    " w.want + least(w.extra, greatest(1, b.capacity / 10))) AS granted,"
    " greatest(b.updated_at, n.now) AS at"
    " FROM w JOIN buckets AS b ON b.client_id = w.client_id CROSS JOIN n"
    " ORDER BY b.client_id FOR UPDATE OF b),"
    " upd AS (UPDATE buckets AS b SET tokens = l.t - l.granted, updated_at = l.at,"
    " last_allowed = CASE WHEN l.want > 0 THEN l.granted > 0 ELSE b.last_allowed END"
    " FROM l WHERE b.client_id = l.client_id"
    " RETURNING b.client_id, l.granted, b.tokens, b.capacity, b.refill_rate),"
    " ins AS (INSERT INTO buckets AS b"
    " (client_id, capacity, tokens, refill_rate, last_allowed, created_at, updated_at)"
    " SELECT w.client_id, w.dcap,"
    " w.dcap - least(w.dcap, w.want + least(w.extra, greatest(1, w.dcap / 10))),"
    " w.drate, true, n.now, n.now FROM w CROSS JOIN n"
    " WHERE w.want > 0 AND w.dcap IS NOT NULL"
    " AND NOT EXISTS (SELECT 1 FROM l WHERE l.client_id = w.client_id)"
    " ORDER BY w.client_id ON CONFLICT (client_id) DO NOTHING"
    " RETURNING b.client_id, (b.capacity - b.tokens)::integer, b.tokens, b.capacity,"
    " b.refill_rate)"
    " SELECT * FROM upd UNION ALL SELECT * FROM ins"
)


class _Key:
    """What this instance knows about one client key."""

    __slots__ = (
        "allowance", "expires", "limit", "base", "reset", "window",
        "cached", "until", "waiters", "default", "used", "epoch", "settling", "attempts",
    )

    def __init__(self) -> None:
        self.allowance = 0  # leased tokens left
        self.expires = 0.0  # ... usable until then (clock seconds)
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
        ttl: seconds an allowance, a remembered refusal or "not limited" lasts.
        max_lease: most tokens leased per key beyond the waiting requests.
        max_batch: most keys per settlement statement.
        stop_timeout: seconds ``stop`` waits to give allowances back.
    """

    def __init__(
        self,
        store: PostgresStore,
        clock: IReactorTime,
        ttl: float = LEASE_TTL,
        max_lease: int = MAX_LEASE,
        max_batch: int = MAX_BATCH,
        stop_timeout: float = 2.0,
    ) -> None:
        self._store = store
        self._clock = clock
        self._ttl = ttl
        self._max_lease = max_lease
        self._max_batch = max_batch
        self._stop_timeout = stop_timeout
        self._keys: dict[str, _Key] = {}
        self._pending: dict[str, _Key] = {}  # keys with requests waiting for a settlement
        self._returns: dict[str, int] = {}  # tokens to give back, by key
        self._scheduled: IDelayedCall | None = None
        self._in_flight: Deferred[Any] | None = None
        self._idle: list[Deferred[None]] = []  # fired when no settlement is in flight
        self._sweeper: LoopingCall | None = None
        self._running = False
        self.statements = 0
        """Settlement statements sent so far."""
        self.settled_keys = 0
        """Keys carried by those statements, in total."""

    @property
    def available(self) -> bool:
        return self._store.available

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
            if self._in_flight is not None:
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
                    return succeed(Decision(
                        True, key.limit, key.base + key.allowance, 0, key.reset, key.window))
                self._give_back(client_id, key)
            elif now < key.until:
                return succeed(key.cached)
        elif not self._running:
            return fail(StoreUnavailable("the store is not running"))
        else:
            problem = _client_id_problem(client_id)
            if problem is not None:
                return fail(problem)
            key = self._keys[client_id] = _Key()
        d: Deferred[Decision | None] = Deferred()
        key.waiters.append(d)
        key.default = default
        self._pending[client_id] = key
        if self._scheduled is None and self._in_flight is None:
            self._scheduled = self._clock.callLater(0, self._settle)
        return d

    def _give_back(self, client_id: str, key: _Key) -> None:
        self._returns[client_id] = self._returns.get(client_id, 0) + key.allowance
        key.allowance = 0

    # settlements -------------------------------------------------------------------------

    def _settle(self) -> None:
        """Send one statement for the waiting keys and the tokens to give back."""
        self._scheduled = None
        if self._in_flight is not None or not (self._pending or self._returns):
            return
        room = self._max_batch
        pending = self._pending
        if len(pending) <= room:
            items = list(pending.items())
            self._pending = {}
        else:
            rest = iter(pending.items())
            items = list(islice(rest, room))
            self._pending = dict(rest)
        returns = self._returns
        max_lease = self._max_lease
        ids: list[str] = []
        wants: list[int] = []
        extras: list[int] = []
        backs: list[int] = []
        dcaps: list[int | None] = []
        drates: list[float | None] = []
        batch = []
        for client_id, key in items:
            waiters, key.waiters = key.waiters, []
            want = len(waiters)
            default = key.default
            ids.append(client_id)
            wants.append(want)
            extras.append(min(max_lease, 2 * (want + key.used)))
            backs.append(returns.pop(client_id, 0) if returns else 0)
            if default is None:
                dcaps.append(None)
                drates.append(None)
            else:
                dcaps.append(default.capacity)
                drates.append(default.refill_rate)
            key.used = 0
            key.settling = True
            batch.append((client_id, key, waiters, key.epoch, default))
        while returns and len(ids) < room:
            client_id, back = returns.popitem()
            ids.append(client_id)
            wants.append(0)
            extras.append(0)
            backs.append(back)
            dcaps.append(None)
            drates.append(None)
        sent = self._clock.seconds()
        self.statements += 1
        self.settled_keys += len(ids)
        d = self._store._query(_SETTLE, (ids, wants, extras, backs, dcaps, drates))
        self._in_flight = d
        d.addCallbacks(self._settled, self._failed, (batch, sent), None, (batch,), None)
        d.addErrback(lambda f: log.failure("settling leased tokens failed", f))
        d.addBoth(self._next)

    def _next(self, result: object) -> None:
        self._in_flight = None
        idle, self._idle = self._idle, []
        for d in idle:
            d.callback(None)
        if (
            self._running
            and self._scheduled is None
            and (self._pending or self._returns)
        ):
            self._scheduled = self._clock.callLater(0, self._settle)

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
                if default is None:
                    answers.extend((d, None) for d in waiters)
                    if current:
                        key.cached = None
                        key.until = now + self._ttl
                        self._answer_late(client_id, key, now, answers)
                elif waiters:  # created or deleted by someone else meanwhile: again
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
            key.allowance = granted - served
            key.expires = sent + self._ttl
            key.limit, key.base, key.reset, key.window = capacity, base, reset, window
            if not key.allowance and tokens < 1:
                due = (1 - tokens) / rate if rate > 0 else self._ttl
                key.cached = decide(False, capacity, tokens, rate)
                key.until = now + min(due, self._ttl)
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
        if not failure.check(StoreUnavailable):
            log.failure("settling leased tokens failed", failure)
        message = failure.getErrorMessage()
        for _, key, waiters, _, _ in batch:
            key.settling = False
            for d in waiters:
                d.errback(StoreUnavailable(message))

    def _sweep(self) -> None:
        """Give expired allowances back and forget idle keys (the LoopingCall's tick)."""
        try:
            now = self._clock.seconds()
            keys = self._keys
            for client_id, key in list(keys.items()):
                if key.allowance:
                    if now < key.expires:
                        continue
                    self._give_back(client_id, key)
                if not key.waiters and not key.settling and now >= key.until:
                    del keys[client_id]
            if self._returns and self._scheduled is None and self._in_flight is None:
                self._scheduled = self._clock.callLater(0, self._settle)
        except Exception:
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
        return self._store.get(client_id)

    def list(self, limit: int, offset: int) -> Deferred[tuple[list[BucketRecord], int]]:
        return self._store.list(limit, offset)

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
