"""Batched settlements with the database: which keys go in the next statement, when it
is sent, and what waits for it (see :mod:`equalizer.buckets.leasing` for the rules).

A settlement carries every key with waiting requests (or a lease asked for ahead of
need) and the tokens to give back, at most ``max_batch`` keys; at most
``max_in_flight`` are in flight, one starts at most every ``linger`` seconds, and
at most every ``relaxed`` seconds while nothing in it is urgent: no request waits
and every lease asked ahead lasts :data:`RELAXED_SLACK` seconds more at its key's
pace. Admin
calls on a key are ordered against its settlements: :meth:`Settlements.apart` runs a
call while no settlement carrying the key is in flight, and holds the key's next
ones back until the call is answered (:meth:`Settlements.apart_all`: every key).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger

from equalizer.buckets.interface import StoreUnavailable
from equalizer.buckets.leases.answers import failed, take_in

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall, IReactorTime

    from equalizer.buckets.leases.allowances import Allowances, Key
    from equalizer.buckets.leases.answers import Sent
    from equalizer.buckets.postgres.leases import LeaseDatabase, Settlement
    from equalizer.config.model import BucketPolicy

log = Logger()
T = TypeVar("T")

RELAXED_SLACK = 0.5
"""Seconds a key's allowance must still last, at the pace it was used since its lease,
for its lease asked ahead to wait for a relaxed statement (``relaxed`` apart): five of
the store's 100 ms. Less than the second a renewal asks ahead of the allowance's death
(``RENEW_LEAD_MIN``): the request that finds it due comes up to one gap later, and with
a second of slack a key coming back every second found most renewals urgent
(``bench/leases.py``, 10,000 keys in turn at 11,000 requests/s: 38 statements a second
with 1 s, 1 with 0.5 s, no wait either way)."""


BUSY_WITHIN = 0.25
"""Share of ``max_age``: a key whose last lease was sent less than this long before its
next settlement is busy, and its next lease is four times its demand, not twice. A key
asks for the next lease when half of one is used, so twice the demand is the lease it
had: a busy key's leases never grew (``bench/leases.py``: 100 keys in turn at 15,000
requests/s settled every 10 requests, 1,500 rows a second; now 119). Keys slower than
that keep twice, and their renewals by time: four times made more of those wait at
random arrivals."""


RELAXED_BATCH = 100
"""Keys pending at which a relaxed statement goes at once. Sending a key and taking its row
in costs the proxy some 20 µs, so the relaxed statements of the bench's renewal waves
(10,000 keys in under a second, up to ``max_batch`` each) held the reactor 10-20 ms and
raised p99 by 0.7-1.8 ms; at 100 keys p99 is no worse than before relaxed statements."""


def lease_factor(key: Key, busy_since: float) -> int:
    """How many times its demand a key is leased next (``BUSY_WITHIN``)."""
    return 4 if key.lease_sent > busy_since else 2


def lasts(key: Key, now: float, seconds: float) -> bool:
    """Whether the key's allowance will last ``seconds`` more: it is not that old, and at
    the pace of the tokens used since its last settlement it is not used up by then."""
    if key.dies - now < seconds:
        return False
    used = key.used
    return not used or key.allowance * (now - key.lease_sent) >= seconds * used


class Settlements:
    """The settlements of one leasing store.

    Args:
        database: where statements go (``settle(rows)``).
        allowances: the keys and the tokens to give back.
        clock: for scheduling.
        max_lease, min_lease: most and fewest tokens leased per key beyond its waiting
            requests.
        max_batch: most keys per statement.
        max_in_flight: most statements in flight at once.
        linger: least seconds between the starts of two statements.
        relaxed: ... while nothing waits for the next one (at least ``linger``).
    """

    def __init__(self, database: LeaseDatabase, allowances: Allowances, clock: IReactorTime,
                 max_lease: int, min_lease: int, max_batch: int, max_in_flight: int,
                 linger: float, relaxed: float) -> None:
        self._database = database
        self._allowances = allowances
        self._clock = clock
        self._max_lease = max_lease
        self._min_lease = min(min_lease, max_lease)
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._linger = linger
        self._relaxed = max(linger, relaxed)
        self._urgent = False  # a key pending needs the next statement within ``linger``
        self._last_sent = float("-inf")
        self.running = False
        """Settlements are made (False before start and once stopping)."""
        self.pending: dict[str, Key] = {}
        """Keys with requests waiting (or a lease asked for) for the next settlement."""
        self.returning = False
        """The sweep asked for every token to give back to go now."""
        self.scheduled: IDelayedCall | None = None
        self.in_flight = 0
        """Statements sent and not answered yet."""
        self._giving: dict[str, int] = {}  # tokens given back by statements in flight, by key
        self._held: dict[str, int] = {}  # admin calls in flight, by key: not settled now
        self._holding_all = 0  # lists in flight: nothing is settled meanwhile
        self._landed: list[Deferred[None]] = []  # fired when a statement is answered
        self._idle: list[Deferred[None]] = []  # fired when none is in flight
        self.statements = 0
        """Statements sent so far."""
        self.settled_keys = 0
        """Keys carried by those statements, in total."""

    # demand ------------------------------------------------------------------------------

    def wait(self, client_id: str, key: Key,
             default: BucketPolicy | None) -> Deferred[Any]:
        """A take without an allowance: its answer comes with the key's next settlement."""
        d: Deferred[Any] = Deferred()
        key.waiters.append(d)
        key.default = default
        self.pending[client_id] = key
        self._urgent = True
        self.schedule()
        return d

    def prefetch(self, client_id: str, key: Key, now: float) -> None:
        """Lease more for a busy key before its allowance runs out, so nobody waits: in a
        relaxed statement if the allowance lasts, so renewals share few statements."""
        if not key.settling:
            self.pending[client_id] = key
            if not lasts(key, now, RELAXED_SLACK) or len(self.pending) >= RELAXED_BATCH:
                self._urgent = True
            self.schedule()

    def return_all(self) -> None:
        """Send every token to give back now, not only along with demand (the sweep)."""
        self.returning = self._urgent = True
        self.schedule()

    def schedule(self) -> None:
        """Settle ``linger`` (``relaxed`` if nothing is urgent) after the last statement, or
        on the next turn; sooner than scheduled if something urgent came."""
        scheduled = self.scheduled
        if self.in_flight >= self._max_in_flight or (scheduled is not None and not self._urgent):
            return  # the statement's answer schedules the next, or one is due within relaxed
        now = self._clock.seconds()
        delay = max(0, self._last_sent + (self._linger if self._urgent else self._relaxed) - now)
        if scheduled is None:
            self.scheduled = self._clock.callLater(delay, self.settle)
        elif scheduled.getTime() > now + delay:
            scheduled.reset(delay)

    def settle(self) -> None:
        """Send one statement for the waiting keys and the tokens to give back, but
        for the keys an admin call is looking at (none while a list is)."""
        self.scheduled = None
        returns = self._allowances.returns
        if self.in_flight >= self._max_in_flight or not (self.pending or returns):
            return
        if self._holding_all:
            return  # the list's end schedules the next settlement
        held = {k: returns.pop(k) for k in self._held if k in returns}
        try:
            self._send()
        finally:
            returns.update(held)

    # the statement -----------------------------------------------------------------------

    def _send(self) -> None:
        """Build and send the statement (``settle`` has set aside what must wait)."""
        room = self._max_batch
        pending = self.pending
        if len(pending) <= room and not self.in_flight and not self._held:
            items = list(pending.items())
            self.pending = {}
        else:  # keys in a statement in flight wait for its answer
            items = []
            kept = {}
            for client_id, key in pending.items():
                if key.settling or len(items) >= room or client_id in self._held:
                    kept[client_id] = key
                else:
                    items.append((client_id, key))
            self.pending = kept
        returns = self._allowances.returns
        if not items and not returns:
            return
        sent = self._last_sent = self._clock.seconds()
        rows, batch = statement(items, returns, self._max_lease, self._min_lease, self._max_batch,
                                sent - self._allowances.max_age * BUSY_WITHIN)
        if not returns:
            self.returning = False
        if not self.pending:
            self._urgent = self.returning  # the rest to give back goes at once
        given = [(row[0], row[3]) for row in rows if row[3]]
        giving = self._giving
        for client_id, back in given:
            giving[client_id] = giving.get(client_id, 0) + back
        self.statements += 1
        self.settled_keys += len(rows)
        self.in_flight += 1
        d = self._database.settle(rows)
        d.addCallbacks(self._settled, failed, (batch, sent), None, (batch,), None)
        d.addErrback(lambda f: log.failure("settling leased tokens failed", f))
        d.addBoth(self._next, given)

    def _settled(self, rows: list[tuple[Any, ...]], batch: list[Sent], sent: float) -> None:
        if take_in(rows, batch, sent, self._clock.seconds(), self._allowances, self.pending):
            self._urgent = True  # requests to try again

    def _next(self, result: object, given: list[tuple[str, int]]) -> None:
        self.in_flight -= 1
        giving = self._giving
        for client_id, back in given:  # in the row now, or lost with the statement
            left = giving.pop(client_id, 0) - back
            if left > 0:
                giving[client_id] = left
        landed, self._landed = self._landed, []
        for d in landed:
            d.callback(None)
        if not self.in_flight:
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)
        # Tokens to give back wait for the sweep (then all go), or ride along with demand.
        if self.running and (self.pending or (self._allowances.returns and self.returning)):
            self.schedule()

    # admin calls in order ------------------------------------------------------------------

    def settling(self, client_id: str) -> bool:
        """Whether a statement in flight carries the key (its row is about to change)."""
        key = self._allowances.keys.get(client_id)
        return (key is not None and key.settling) or client_id in self._giving

    def _landing(self) -> Deferred[None]:
        """Fires when the next statement in flight is answered or fails (query timeout)."""
        d: Deferred[None] = Deferred()
        self._landed.append(d)
        return d

    async def apart(self, client_id: str, call: Callable[[], Awaitable[T]]) -> T:
        """``call()`` once no statement carrying the key is in flight, with the key's next
        statements held back until it is answered: the call comes after every settlement
        sent before it and before every one sent after. Once stopping nothing is held."""
        held = self.running
        if held:
            self._held[client_id] = self._held.get(client_id, 0) + 1
        try:
            while self.settling(client_id):
                await self._landing()
            return await call()
        finally:
            if held:
                count = self._held.pop(client_id, 0) - 1
                if count > 0:
                    self._held[client_id] = count
            self.resume()

    async def apart_all(self, call: Callable[[], Awaitable[T]]) -> T:
        """``call()`` once no statement is in flight, with all held back meanwhile."""
        held = self.running
        if held:
            self._holding_all += 1
        try:
            while self.in_flight:
                await self._landing()
            return await call()
        finally:
            if held:
                self._holding_all = max(0, self._holding_all - 1)
            self.resume()

    def resume(self) -> None:
        """After an admin call: settle what waited for it."""
        if self.running and (self.pending or self._allowances.returns):
            self.schedule()

    # shutdown ----------------------------------------------------------------------------

    def stop(self) -> None:
        """No more settlements but the last ones (:meth:`drain`): requests waiting fail, and
        admin calls hold nothing back any more."""
        self.running = False
        self._held.clear()
        self._holding_all = 0
        if self.scheduled is not None and self.scheduled.active():
            self.scheduled.cancel()
        self.scheduled = None
        pending, self.pending = self.pending, {}
        for key in pending.values():
            waiters, key.waiters = key.waiters, []
            for d in waiters:
                d.errback(StoreUnavailable("the store is stopping"))

    async def drain(self) -> None:
        """Give every token back: wait for the statements in flight, then send the rest."""
        while True:
            if self.in_flight:
                d: Deferred[None] = Deferred()
                self._idle.append(d)
                try:
                    await d
                except CancelledError:
                    self._idle.remove(d)
                    raise
            elif self._allowances.returns:
                self.settle()
                if not self.in_flight:
                    return  # nothing could go (no room): never spin
            else:
                return


def statement(items: list[tuple[str, Key]], returns: dict[str, int], max_lease: int,
              min_lease: int, max_batch: int,
              busy_since: float) -> tuple[list[Settlement], list[Sent]]:
    """The rows of a statement for the keys of ``items`` (their waiting requests go with
    it; keys leased after ``busy_since`` are busy, :func:`lease_factor`) and as many tokens
    to give back as fit in ``max_batch`` rows (taken out of ``returns``); and what each key
    sent, to answer its requests when the rows come back."""
    rows: list[Settlement] = []
    batch: list[Sent] = []
    for client_id, key in items:
        waiters, key.waiters = key.waiters, []
        want = len(waiters)
        default = key.default
        back = (returns.pop(client_id, 0) if returns else 0) + key.back
        key.back = 0
        key.demand = demand = want + key.used
        extra = min(max_lease, max(min_lease, lease_factor(key, busy_since) * demand))
        if default is None:  # a lease ahead of need carries it too: its row may be swept
            rows.append((client_id, want, extra, back, None, None))
        else:
            rows.append((client_id, want, extra, back, default.capacity, default.refill_rate))
        key.used = 0
        key.settling = True
        batch.append((client_id, key, waiters, key.epoch, default))
    while returns and len(rows) < max_batch:
        client_id, back = returns.popitem()
        rows.append((client_id, 0, 0, back, None, None))
    return rows, batch
