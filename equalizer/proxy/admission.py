"""Admission: what decides, once per request, whether the proxy sends it on.

The proxy calls ``admit(exchange)`` once per request; the admission answers by calling
back ``exchange.dispatch()`` or ``exchange.respond_locally(...)``, now or later, having
set ``exchange.limit_lines``, the header lines its response carries. ``AdmitAll`` admits
every request; ``RateLimiter`` is the rate limiter.

Before a request goes to a backend the limiter takes one token from the
client's bucket in the store. Admitted requests go on; refused ones get a 429
with ``Retry-After``; every response that went through the limiter carries the
RateLimit fields (SPEC 5). While the store is unreachable ``on_store_error``
decides: ``allow`` lets requests through unlimited, ``deny`` answers 503.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from equalizer.buckets.interface import StoreDataError, StoreUnavailable
from equalizer.buckets.maths import Decision, field_pairs, header_renderer
from equalizer.config.model import DEFAULT_POLICY, PolicyConfig
from equalizer.proxy.keys import key_reader

if TYPE_CHECKING:
    from equalizer.balancer.stats import TrafficStats
    from equalizer.buckets.interface import IBucketStore
    from equalizer.config.model import RateLimitConfig
    from equalizer.proxy.exchange import Exchange

log = Logger()

DECISIONS = ("allowed", "limited", "unlimited", "store_error")
"""Outcomes of the limiter, counted for /metrics and written in the access log."""


class Admission(Protocol):
    """The one interface between the proxy and whatever limits its traffic."""

    owned_fields: frozenset[bytes]
    """Lower-case names of the fields the admission writes: a backend's fields of those
    names give way to them."""

    def admit(self, exchange: Exchange) -> None:
        """Call ``exchange.dispatch()`` or ``exchange.respond_locally(...)``, now or later,
        first setting ``exchange.limit_lines`` (header lines, each ending in CRLF; empty
        unless set) when the response carries fields of the admission's."""


class AdmitAll:
    """Admission with no limit: every request goes on, and no fields are added."""

    owned_fields: frozenset[bytes] = frozenset()

    def admit(self, exchange: Exchange) -> None:
        exchange.dispatch()


ADMIT_ALL = AdmitAll()


class Policy:
    """A named rate-limit policy as the limiter applies it (SPEC 8): how a client is
    keyed, the bucket a new one gets, and the RateLimit fields naming it."""

    __slots__ = ("name", "client_key", "default", "render")

    def __init__(self, name: str, config: PolicyConfig, headers: str) -> None:
        self.name = name
        self.client_key = key_reader(config.key)
        self.default = config.default
        self.render = header_renderer(headers, name)


class RateLimiter:
    """Admits or refuses each exchange by its client's token bucket, under the policy of
    its route (``default`` without routes)."""

    def __init__(self, store: IBucketStore, config: RateLimitConfig, stats: TrafficStats) -> None:
        self.store = store
        self.stats = stats
        self.decisions = dict.fromkeys(DECISIONS, 0)
        self.configure(config)

    def configure(self, config: RateLimitConfig) -> None:
        """Take new settings (start-up and SIGHUP reload)."""
        self.config = config
        self.default = config.default
        self.take_now = self.store.take_now
        self.client_key = key_reader(config.key)
        self._render = header_renderer(config.headers)
        self.policies = {name: Policy(name, policy, config.headers)
                         for name, policy in config.all_policies().items()}
        self.default_policy = self.policies[DEFAULT_POLICY]
        # Lower-case names of the fields an admitted response gets: the backend's
        # fields of those names give way to ours.
        self.owned_fields = frozenset(
            name.lower() for name, _ in field_pairs(self._render[Decision(True, 1, 1, 0, 1, 1)]))
        self.deny_on_store_error = config.on_store_error == "deny"

    def admit(self, exchange: Exchange) -> None:
        """Dispatch the exchange, or answer it here.

        A request the store admits at once (memory store, a live lease) is dispatched
        here, inline: it is the path of most requests, and each Python call on it costs
        (bench/README.md). No request arrives while the store makes its first
        connection: the proxy listener opens only once that attempt is over (SPEC 4.5,
        equalizer.readiness), so a fresh instance never lets traffic through unlimited
        merely because it is young.
        """
        answer = self.take_now(self.client_key(exchange), self.default)
        if answer.__class__ is Decision and answer.allowed:
            exchange.limit_lines = self._render[answer]
            exchange.rate_limit = "allowed"
            self.decisions["allowed"] += 1
            exchange.dispatch()
        else:
            self._answered(answer, exchange)

    def admit_routed(self, exchange: Exchange) -> None:
        """``admit`` when routes are configured: under the policy of the exchange's route
        (``default`` without one), or not limited when the route says ``null``."""
        route = exchange.route
        policy = self.default_policy if route is None else route.policy
        if policy is None:
            self._decided(None, exchange)
            return
        exchange.policy = policy
        if policy.name == DEFAULT_POLICY:
            answer = self.take_now(policy.client_key(exchange), policy.default)
        else:
            answer = self.take_now(policy.client_key(exchange), policy.default, policy.name)
        self._answered(answer, exchange)

    def _answered(self, answer: Decision | None | Deferred[Decision | None],
                  exchange: Exchange) -> None:
        """Decide now when the store answered at once (memory store, a live lease), else
        once its Deferred fires.

        An answer given at once is told apart by its class rather than by
        ``isinstance(answer, Deferred)``: Deferred is an ABC (``Awaitable``), so that
        check costs a Python-level ``__instancecheck__``, ten times the class test, on
        every limited request."""
        if answer is None or answer.__class__ is Decision:
            self._decided(answer, exchange)
        else:
            answer.addCallbacks(self._decided, self._store_failed, (exchange,), None,
                                (exchange,), None)

    def routed(self) -> Admission:
        """This limiter as the admission of a proxy with routes."""
        return RoutedAdmission(self)

    def _decided(self, decision: Decision | None, exchange: Exchange) -> None:
        if decision is None:
            self._count(exchange, "unlimited")
            exchange.dispatch()
            return
        policy = getattr(exchange, "policy", None)  # None: not routed
        exchange.limit_lines = (self._render if policy is None else policy.render)[decision]
        if decision.allowed:
            self._count(exchange, "allowed")
            exchange.dispatch()
            return
        self._count(exchange, "limited")
        self.stats.rate_limited += 1
        self.stats.limited_clients.add(
            self.client_key(exchange) if policy is None else policy.client_key(exchange))
        exchange.respond_locally(429, "rate_limited", "too many requests; retry later")

    def _store_failed(self, failure: Failure, exchange: Exchange) -> None:
        # A data error (StoreDataError) is no outage, but this request has no decision
        # either: on_store_error applies; the store logged the refused statement.
        if not failure.check(StoreUnavailable, StoreDataError):
            log.failure("rate-limit store failed", failure)
        self._count(exchange, "store_error")
        if self.deny_on_store_error:
            exchange.respond_locally(503, "store_unavailable",
                                     "the rate-limit store is unreachable",
                                     ((b"Retry-After", b"1"),))
        else:
            exchange.dispatch()

    def _count(self, exchange: Exchange, outcome: str) -> None:
        exchange.rate_limit = outcome
        self.decisions[outcome] += 1


class RoutedAdmission:
    """A :class:`RateLimiter` as the admission of a proxy with routes (SPEC 8)."""

    def __init__(self, limiter: RateLimiter) -> None:
        self.owned_fields = limiter.owned_fields
        self.admit = limiter.admit_routed
