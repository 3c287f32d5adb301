"""Local leased allowances, per client key: what a take is answered from without the
database (see :mod:`equalizer.buckets.leasing` for the rules).

For each key the instance holds a :class:`Key`: the tokens it leased and has not
handed out (its *allowance*), until when they may be used, a remembered decision of
the database, the requests waiting for a settlement, and an *epoch* that admin
changes bump, so a settlement sent before one leaves no allowance.
:class:`Allowances` holds the keys, the tokens to give back, and the cap on keys held.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger

from equalizer.buckets.interface import StoreUnavailable
from equalizer.buckets.maths import Decision, decide, window
from equalizer.config.model import DEFAULT_MAX_BUCKETS

if TYPE_CHECKING:
    from equalizer.config.model import BucketPolicy

log = Logger()

PREFETCH_FROM = 16
"""An allowance of at least this many tokens asks for the next lease once half is used."""

PREFETCH_LAST_FROM = 4
"""A smaller allowance of at least this many tokens asks for the next lease when
:data:`PREFETCH_LEFT` tokens are left: only a key that used the rest within ``max_age``
gets that far."""

PREFETCH_LEFT = 2
"""Tokens left of a small allowance when its key asks for the next lease: two visits of
the key for the statement to land in, so a backlog of statements (many keys seen first
at the same moment) seldom makes a request wait. What is left then costs no statement
row: it goes back with the key's next settlement."""

RENEW_AFTER = 0.5
"""Share of ``max_age`` after which a key still using its allowance may ask for the next:
a key that comes back about once a second uses a dozen tokens in about ``max_age``, so
without it its allowance would die a token or two before the mark of
:data:`PREFETCH_LEFT`, and one request per lease would wait (measured with 10,000 keys
in turn at 9,300 requests/s: some 600 waits in 8 s, none at 10,700). A key whose pace is
known asks later: see :func:`renew_from`."""

RENEW_LEAD = 2.0
"""How many of its key's usual gaps between requests before its allowance dies a key
asks for its next lease (:func:`renew_from`)."""

RENEW_LEAD_MIN = 1.0
"""... and at least this many seconds before, for the statement to land in."""

Answers = list[tuple[Deferred[Any], Any]]
"""Requests to answer, each with its answer, once a settlement is taken in."""


class Key:
    """What this instance knows about one client key."""

    __slots__ = (
        "allowance", "expires", "dies", "low", "limit", "base", "reset", "window",
        "cached", "until", "waiters", "default", "used", "epoch", "settling", "attempts",
        "back", "renew", "demand", "lease_sent",
    )

    def __init__(self) -> None:
        self.allowance = 0  # leased tokens left
        self.expires = 0.0  # ... usable until then (clock seconds): idle ttl, moved by use
        self.dies = 0.0  # ... and never after this: max_age after it was leased
        self.renew = 0.0  # a use from then on asks for the next lease (RENEW_AFTER)
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
        self.settling = False  # in a statement in flight
        self.attempts = 0
        self.back = 0  # tokens of a replaced allowance: back with the key's next settlement
        self.demand = 0  # requests between the sending of its last two settlements
        self.lease_sent = 0.0  # when the statement of its allowance was sent (0: never)


def prefetch_mark(allowance: int) -> int:
    """The allowance left at which a key asks for its next lease (-1: never)."""
    if allowance >= PREFETCH_FROM:
        return allowance // 2
    return PREFETCH_LEFT if allowance >= PREFETCH_LAST_FROM else -1


def renew_from(previous: float, demand: int, sent: float, max_age: float) -> float:
    """When a key whose lease was sent at ``sent`` asks for its next one on its next use,
    given when its previous lease was sent (0: none) and the requests in between.

    As late as its pace allows: :data:`RENEW_LEAD` of its usual gaps between requests
    before the allowance dies, but not before :data:`RENEW_AFTER` of ``max_age``, nor
    before its pace is known. Asking at half of ``max_age`` made a key that comes back
    about once a second settle every 5-6 s instead of every 9: with 10,000 keys in turn
    at 11,000 requests a second, 2,000 rows a second against 1,000, and no wait either way
    (``bench/leases.py``). A key late by more than its lead waits once.
    """
    earliest = sent + max_age * RENEW_AFTER
    if not previous or not demand:
        return earliest
    lead = RENEW_LEAD * (sent - previous) / demand
    latest = sent + max_age - (lead if lead > RENEW_LEAD_MIN else RENEW_LEAD_MIN)
    return latest if latest > earliest else earliest


class Allowances:
    """The keys this instance holds state for and the tokens it took out of their rows.

    Args:
        ttl: seconds an allowance may go unused.
        max_age: seconds an allowance may be used at most, from the statement that leased it.
        remember: most seconds a refusal or "not limited" is repeated.
    """

    def __init__(self, ttl: float, max_age: float, remember: float) -> None:
        self.ttl = ttl
        self.max_age = max(ttl, max_age)
        self.remember = remember
        self.keys: dict[str, Key] = {}
        """By client key. Never rebound (the store's hot path holds it), only changed."""
        self.returns: dict[str, int] = {}
        """Tokens to give back to the database, by key."""
        self.max_buckets = DEFAULT_MAX_BUCKETS
        self.over_cap = 0
        """New keys refused because ``max_buckets`` keys were held."""
        self.cap_logged = False

    def give_back(self, client_id: str, key: Key) -> None:
        """The key's allowance is no longer used: it goes back with the next settlement,
        and so do the tokens that were waiting for the key's own (``Key.back``)."""
        self.returns[client_id] = self.returns.get(client_id, 0) + key.allowance + key.back
        key.allowance = key.back = 0

    def give_all_back(self) -> None:
        """Every allowance goes back, and every key is forgotten (the store stops)."""
        for client_id, key in self.keys.items():
            if key.allowance or key.back:
                self.give_back(client_id, key)
        self.keys.clear()

    def drop(self, client_id: str) -> None:
        """Forget the key's allowance, tokens to give back and remembered decision, without
        giving anything back: an admin change wins. Settlements sent before leave no
        allowance (the epoch)."""
        self.returns.pop(client_id, None)
        key = self.keys.get(client_id)
        if key is not None:
            key.epoch += 1
            key.allowance = key.back = 0
            key.until = 0.0
            key.cached = None

    def leased(self, client_id: str) -> int:
        """Tokens this instance took out of the key's row and did not use: its allowance,
        live or expired, and tokens waiting to go back."""
        key = self.keys.get(client_id)
        held = key.allowance + key.back if key is not None else 0
        return self.returns.get(client_id, 0) + held

    def lease(self, client_id: str, key: Key, allowance: int, sent: float,
              decision: Decision, tokens: float, rate: float, now: float) -> None:
        """A settlement sent at ``sent`` left ``allowance`` tokens and ``tokens`` in the row;
        ``decision`` is the row's, as an admitted request's. What is left of the previous
        allowance goes back with the key's next settlement, which a key busy enough to
        have asked for this lease ahead will soon have: no statement row of its own (the
        sweep sends it if the key goes idle first). An empty bucket's refusal is
        remembered until a token is due."""
        key.back += key.allowance
        key.allowance = allowance
        key.low = prefetch_mark(allowance)
        key.dies = sent + self.max_age
        key.renew = renew_from(key.lease_sent, key.demand, sent, self.max_age)
        key.lease_sent = sent
        expires = sent + self.ttl
        key.expires = expires if expires < key.dies else key.dies
        _, key.limit, key.base, _, key.reset, key.window = decision
        if not allowance and tokens < 1:
            due = (1 - tokens) / rate if rate > 0 else self.remember
            key.cached = decide(False, decision.limit, tokens, rate)
            key.until = now + min(due, self.remember)

    def not_limited(self, key: Key, now: float) -> None:
        """The key has no bucket and no default: remember it as not limited."""
        key.cached = None
        key.until = now + self.remember

    def serve(self, key: Key, now: float, answers: Answers) -> bool:
        """Answer requests that came while the key was settling from what the settlement
        brought; whether that answered all of them (and at least one)."""
        waiters = key.waiters
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
        if not served:
            return False
        del waiters[:served]
        return not waiters

    def at_cap(self, default: BucketPolicy | None) -> Deferred[Decision | None]:
        """A new key while ``max_buckets`` keys are held: refused (429), so memory stays
        bounded and no client goes unlimited; idle keys are forgotten within
        ``2 * ttl``, which is when to come back. Without a default there is no
        policy to refuse by: the store is as good as unavailable for it."""
        if not self.cap_logged:
            self.cap_logged = True  # again after the next sweep, if still at the cap
            log.warn("rate_limit.max_buckets ({cap}) client keys held: new clients are "
                     "refused until idle keys are forgotten", cap=self.max_buckets)
        self.over_cap += 1
        if default is None:
            return fail(StoreUnavailable("rate_limit.max_buckets client keys held"))
        retry = max(1, math.ceil(2 * self.ttl))
        return succeed(Decision(False, default.capacity, 0, retry, retry,
                                window(default.capacity, default.refill_rate)))
