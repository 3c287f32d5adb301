"""Token leasing: the PostgreSQL limiter without a database round trip per request.

:class:`LeasingStore` wraps a :class:`~equalizer.buckets.postgres.store.PostgresStore`
and provides :class:`~equalizer.buckets.interface.IBucketStore`. The admin calls go
to the wrapped store, in order with the settlements; ``take`` is answered from
tokens this instance has *leased* from the database, and the database is asked in
batches.

Leases
------
For each client key the instance may hold an **allowance**: tokens already taken
out of the bucket's row in the database, not yet handed to requests. A ``take``
with a live allowance is a few dict and attribute operations and answers at once
(``take_now``: no Deferred). Without one, the request waits for the next **settlement**.

A settlement is one statement, ``SELECT * FROM equalizer_settle(batch)`` (a
PL/pgSQL function of two set-based statements, migrations 0008 and 0009, that find
each key by a probe of the primary key whatever the table's statistics say, planned
once per session), for every key with waiting requests and every key with tokens to give
back, at most :data:`MAX_BATCH` keys. Per key, in client id order, under the row
lock and from the database clock (the refill of
:class:`~equalizer.buckets.postgres.store.PostgresStore`)::

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
many keys. While no request waits and every lease asked ahead of need (below) still
lasts half a second at its key's pace, one starts at most every ``relaxed`` seconds
(100 ms) instead, or as soon as 100 keys are pending
(:data:`~equalizer.buckets.leases.settlement.RELAXED_BATCH`, so that no statement holds
the reactor long): the renewals of keys that come back every second or so then share
ten to fifteen statements a second rather than forty to a hundred and fifty (measured
with 10,000 keys in turn; 3 % less CPU per request, bench/README.md). Rows are locked
in client id order, so instances settling overlapping keys never deadlock.

How much is leased (``extra``) adapts to demand: twice the demand since the
key's last settlement (waiting requests plus allowance used), four times when
that lease was sent less than a quarter of ``max_age`` before
(:data:`~equalizer.buckets.leases.settlement.BUSY_WITHIN`: a key renewing at half
its lease would otherwise keep the same lease however busy it is), at least
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
:data:`~equalizer.buckets.leases.allowances.PREFETCH_FROM` tokens is used, so its
requests do not wait; what is left of the old allowance goes back in the row of the
key's next settlement (or with the sweep, once the key has no live allowance), not in a
row of its own: at 10,000 keys in turn that halved the rows settled. A smaller allowance
of at least :data:`~equalizer.buckets.leases.allowances.PREFETCH_LAST_FROM` asks with
:data:`~equalizer.buckets.leases.allowances.PREFETCH_LEFT` tokens left: only a key that
used the rest within ``max_age`` gets there, and its next lease is about twice as large,
so a busy key's leases grow to where half of one is worth asking ahead for. (Asking at
half of a small allowance kept it small, the demand since the last settlement being half
of it: measured with 10,000 keys in turn, about one row per request from 4 tokens.) A
key still using its allowance asks too, whatever is left, when its allowance is about to
die: :data:`~equalizer.buckets.leases.allowances.RENEW_LEAD` of its usual gaps between
requests before ``max_age`` (at least
:data:`~equalizer.buckets.leases.allowances.RENEW_LEAD_MIN` before), and not before
:data:`~equalizer.buckets.leases.allowances.RENEW_AFTER` of it; one that comes back about
once a second would otherwise see its allowance die just before reaching either mark,
and asking at half of ``max_age`` settled such keys twice as often as they need.
Smaller allowances of a key that comes back less often are used up, and the next request
waits. A lease asked for ahead of need carries the key's default, so a row the wrapped
store swept meanwhile (full again: a client using less than its refill) is created
again (migration 0006) rather than leasing nothing: with 10,000 keys in turn and a
bucket that refills within the sweep's interval, every prefetch used to find its row
gone, and every key waited once per lease.

An allowance not used for ``ttl`` seconds (:data:`LEASE_TTL`, 5 s) is no longer
used, nor any allowance ``max_age`` seconds (:data:`LEASE_MAX_AGE`, 10 s) after the
statement that leased it was sent. A sweep (one ``LoopingCall`` for the whole
store, every ``ttl / 2``, :data:`~equalizer.buckets.leases.sweep.SWEEP_CHUNK` keys per
reactor turn) gives
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
``create``, ``update`` and ``delete`` through this store win over every lease and
settlement in flight when they are made (:mod:`equalizer.buckets.leases.admin`):
the key's allowance and remembered decision are dropped (without giving them back:
the new settings win) at once and again when the change is done; the change goes
to the database only once no settlement carrying the key is in flight, and the
key's next settlements wait for it, so no token leased or given back before it
lands on the row after it. A settlement in flight meanwhile still answers its
requests but leaves no allowance. Another instance
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
store once full again (:meth:`~equalizer.buckets.postgres.store.PostgresStore.sweep`).

Failures and shutdown
---------------------
A settlement that fails (database unreachable, timed out) fails all of its
waiting requests with :class:`~equalizer.buckets.interface.StoreUnavailable`, so the limiter
applies ``on_store_error``; nothing waits longer than the wrapped store's query
timeout. Tokens it was giving back are dropped (under-admission only).
Allowances already held keep being used until they expire. ``stop`` fails the
requests not yet sent, gives every allowance back in one last settlement
(waiting at most ``stop_timeout`` seconds; reads and writes in flight hold nothing
back any more) and then stops the wrapped store.

The parts
---------
This module is the facade (the store interface and the hot path, ``take``); the
parts are in :mod:`equalizer.buckets.leases`: ``allowances`` (what is held per
key), ``answers`` (what a settlement's rows mean), ``settlement`` (batching,
sending and ordering statements), ``sweep`` (releasing idle keys) and
``admin`` (the admin calls).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from zope.interface import implementer

from equalizer.buckets.interface import (
    IBucketStore,
    StoreUnavailable,
    as_deferred,
    bucket_key,
    take_elsewhere,
)
from equalizer.buckets.leases.admin import AdminCalls
from equalizer.buckets.leases.allowances import Allowances, Key
from equalizer.buckets.leases.settlement import Settlements
from equalizer.buckets.leases.sweep import Sweep
from equalizer.buckets.maths import Decision, make_tuple
from equalizer.config.model import DEFAULT_POLICY

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

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

MAX_LEASE = 1024
"""Most tokens leased per key beyond the waiting requests, per settlement (a tenth of the
bucket caps it too). A key busy enough to reach it renews at half of it: with 256, one
client at 17,000 requests a second cost 125 statements a second, some 2.5 % of the
proxy's CPU (bench/README.md); with 1,024, 32."""

MIN_LEASE = 8
"""Fewest tokens leased beyond the waiting requests (a tenth of the bucket caps it)."""

MAX_BATCH = 1000
"""Most keys in one settlement statement."""

MAX_IN_FLIGHT = 1
"""Most settlement statements in flight at once."""

LINGER = 0.002
"""Least seconds between the starts of two settlements, so that each carries more keys."""

RELAXED_LINGER = 0.1
"""... while no request waits and every lease asked ahead of need has time: a key coming
back every second or so renews its lease in one of ten statements a second at most."""


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
        relaxed: ... while no request waits for the next (settlement.RELAXED_SLACK).
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
        relaxed: float = RELAXED_LINGER,
        stop_timeout: float = 2.0,
    ) -> None:
        self._store = store
        self._clock = clock
        self._ttl = ttl
        self._stop_timeout = stop_timeout
        self._allowances = Allowances(ttl, max_age, remember)
        self._keys = self._allowances.keys  # the hot path's: never rebound
        self._settlements = Settlements(store.leases(), self._allowances, clock, max_lease,
                                        min_lease, max_batch, max_in_flight, linger,
                                        relaxed)
        self._sweep = Sweep(self._allowances, self._settlements, clock)
        self._admin = AdminCalls(store, self._allowances, self._settlements)
        self.waits = 0
        """Takes that found no allowance and waited for a settlement."""

    def leases(self):
        """The wrapped store's settlements: worker processes lease through the supervisor
        (:mod:`equalizer.workers.leases`) as other instances do."""
        return self._store.leases()

    @property
    def statements(self) -> int:
        """Settlement statements sent so far."""
        return self._settlements.statements

    @property
    def settled_keys(self) -> int:
        """Keys carried by those statements, in total."""
        return self._settlements.settled_keys

    @property
    def key_count(self) -> int:
        """Client keys held (allowance, remembered decision or waiting requests)."""
        return len(self._keys)

    @property
    def over_cap(self) -> int:
        """New keys refused because ``max_buckets`` keys were held."""
        return self._allowances.over_cap

    @property
    def max_buckets(self) -> int:
        return self._allowances.max_buckets

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
        self._allowances.max_buckets = config.max_buckets
        self._store.configure(config)

    # life cycle ----------------------------------------------------------------------

    def start(self) -> Deferred[None]:
        """Start the wrapped store, then serve and sweep."""
        return self._store.start().addCallback(self._started)

    def _started(self, result: None) -> None:
        self._settlements.running = True
        self._sweep.start()

    def stop(self) -> Deferred[None]:
        """Give allowances back (within ``stop_timeout``), then stop the wrapped store."""
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self._settlements.stop()
        self._sweep.stop()
        self._allowances.give_all_back()
        try:
            await Deferred.fromCoroutine(self._settlements.drain()).addTimeout(
                self._stop_timeout, self._clock)
        except Exception as e:  # best effort: tokens not given back are under-admission
            log.warn("could not give leased tokens back on stop: {error}", error=e)
        self._allowances.returns.clear()
        await self._store.stop()

    # the hot path ----------------------------------------------------------------------

    def take(self, client_id: str, default: BucketPolicy | None,
             policy: str = DEFAULT_POLICY) -> Deferred[Decision | None]:
        return as_deferred(self.take_now(client_id, default, policy))

    def take_now(self, client_id: str, default: BucketPolicy | None,
                 policy: str = DEFAULT_POLICY) -> Decision | None | Deferred[Decision | None]:
        raw_id = client_id
        if policy != DEFAULT_POLICY:  # leased by one key: see bucket_key
            client_id = bucket_key(policy, client_id)
        key = self._keys.get(client_id)
        if key is not None:
            now = self._clock.seconds()
            if key.allowance:
                if now < key.expires:
                    key.allowance -= 1
                    key.used += 1
                    expires = now + self._ttl
                    key.expires = expires if expires < key.dies else key.dies
                    if key.allowance == key.low or now >= key.renew:
                        key.renew = key.dies  # once per lease
                        self._settlements.prefetch(client_id, key, now)
                    return make_tuple(Decision, (
                        True, key.limit, key.base + key.allowance, 0, key.reset, key.window))
                self._allowances.give_back(client_id, key)
            elif now < key.until:
                return key.cached
        elif not self._settlements.running:
            return fail(StoreUnavailable("the store is not running"))
        else:
            # A client id no row can have (it would fail the whole settlement) goes by its digest.
            elsewhere = take_elsewhere(self, raw_id, default, policy)
            if elsewhere is not None:
                return elsewhere
            if len(self._keys) >= self._allowances.max_buckets:
                return self._allowances.at_cap(default)
            key = self._keys[client_id] = Key()
        self.waits += 1
        return self._settlements.wait(client_id, key, default)

    # admin -------------------------------------------------------------------------------

    def create(
        self, client_id: str, capacity: int, tokens: float, refill_rate: float,
        policy: str = DEFAULT_POLICY,
    ) -> Deferred[BucketRecord]:
        return self._admin.create(client_id, capacity, tokens, refill_rate, policy)

    def get(self, client_id: str, policy: str = DEFAULT_POLICY) -> Deferred[BucketRecord | None]:
        return self._admin.get(client_id, policy)

    def list(self, limit: int, offset: int,
             policy: str = DEFAULT_POLICY) -> Deferred[tuple[list[BucketRecord], int]]:
        return self._admin.list(limit, offset, policy)

    def update(
        self,
        client_id: str,
        capacity: int | None = None,
        tokens: float | None = None,
        refill_rate: float | None = None,
        policy: str = DEFAULT_POLICY,
    ) -> Deferred[BucketRecord | None]:
        return self._admin.update(client_id, capacity, tokens, refill_rate, policy)

    def delete(self, client_id: str, policy: str = DEFAULT_POLICY) -> Deferred[bool]:
        return self._admin.delete(client_id, policy)
