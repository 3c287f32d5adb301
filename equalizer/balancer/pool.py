"""The backend pool: every backend's state, and the choice of one for a request.

Backends change state (health, enabled, draining) rarely and are chosen on every
request, so the pool keeps the list of available backends ready and rebuilds it
only when a state changes. So a backend's state is changed only through the pool's
methods (``add``, ``remove``, ``set_weight``, ``set_enabled``, ``drain``,
``cancel_drain``, ``set_healthy``, ``set_ejected``, ``set_limits``): each rebuilds the
list, and no caller has to remember to.

Traffic management (SPEC 4.6) hangs off the same list: backup backends are in it
only while no primary is available; a backend at its ``max_requests`` is left out
per pick; slow start (``slowstart.py``) thins the picks of a backend that has just
come (back); and the pool's wait queue (``queue.py``) is offered slots whenever the
list changes.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Collection, Iterable, Iterator
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from attrs import define, field
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from equalizer.balancer.queue import WaitQueue
from equalizer.balancer.slowstart import SlowStart
from equalizer.balancer.strategies import Strategy, make_strategy
from equalizer.config.model import BackendConfig, QueueConfig
from equalizer.histogram import DurationHistogram

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

log = Logger()

LATENCY_WINDOW = 1024
"""How many recent request durations each backend keeps for its p50/p99."""

FAILURE_REASONS = ("connect", "connect_timeout", "response_timeout", "idle_timeout",
                   "invalid_response", "closed", "cut_off")
"""Why an attempt on a backend failed, the ``reason`` of failures and retries: connection
refused or reset, connect timeout, no response head in ``timeouts.response``, silent past
``timeouts.idle`` mid-response, a response that is not valid HTTP, the connection closed
before a response, and a response broken off after it began."""

RETRY_REASONS = (*FAILURE_REASONS, "status")
"""The ``reason`` of retries: a failure above, or ``status``, an answer whose status
``proxy.retry_on`` lists (502, 503, 504)."""


class DrainCancelled(Exception):
    """A drain ended without the backend leaving: a configuration reload kept it."""


@define(eq=False)
class Backend:
    """One backend server: where it is, and what the balancer knows of it."""

    id: str
    url: str
    weight: int
    host: str
    port: int
    prefix: bytes
    host_header: bytes
    address: str = ""
    pool: str = "default"
    enabled: bool = True
    draining: bool = False
    healthy: bool = True
    checked: bool = False
    down_since: float | None = None
    max_requests: int = 0
    backup: bool = False
    ejected_until: float | None = None
    ejections: int = 0
    in_flight: int = 0
    requests: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    last_check: dict = field(factory=dict)
    latencies: deque = field(factory=lambda: deque(maxlen=LATENCY_WINDOW))
    by_code: dict[int, int] = field(factory=dict)
    durations: DurationHistogram = field(factory=DurationHistogram)
    failure_reasons: dict[str, int] = field(factory=dict)
    retries: dict[str, int] = field(factory=dict)
    health_checks: dict[str, int] = field(factory=lambda: {"ok": 0, "failed": 0})
    check_durations: DurationHistogram = field(factory=DurationHistogram)

    @classmethod
    def from_url(cls, backend_id: str, url: str, weight: int = 1, *, max_requests: int = 0,
                 backup: bool = False) -> Backend:
        """Parse a validated http:// URL once, so the hot path only reads attributes."""
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        prefix = parts.path.rstrip("/").encode("ascii")
        return cls(
            id=backend_id,
            url=url,
            weight=weight,
            host=parts.hostname or "",
            port=port,
            prefix=prefix,
            host_header=parts.netloc.rsplit("@", 1)[-1].encode("ascii"),
            address=_address(parts.hostname or "", port),
            max_requests=max_requests,
            backup=backup,
        )

    @property
    def available(self) -> bool:
        return self.enabled and self.healthy and not self.draining and self.ejected_until is None

    @property
    def full(self) -> bool:
        """At its ``max_requests`` in flight: no candidate until one ends."""
        return 0 < self.max_requests <= self.in_flight

    def record_check(self, status: int | None, error: str | None, at: float,
                     duration: float) -> None:
        """Keep one active health check's outcome: counted, and the last one shown."""
        ok = error is None
        self.checked = True
        self.health_checks["ok" if ok else "failed"] += 1
        self.check_durations.observe(duration)
        self.last_check = {"ok": ok, "status": status, "error": error, "at": at,
                           "duration_ms": round(duration * 1000, 3)}

    def fail(self, reason: str) -> None:
        """Count one failed attempt, by reason (one of ``FAILURE_REASONS``)."""
        self.failures += 1
        self.failure_reasons[reason] = self.failure_reasons.get(reason, 0) + 1

    def latency_ms(self) -> dict[str, float | None]:
        """p50 and p99 of the recent window, in milliseconds."""
        if not self.latencies:
            return {"p50": None, "p99": None}
        ordered = sorted(self.latencies)
        return {
            "p50": round(_percentile(ordered, 0.50) * 1000, 3),
            "p99": round(_percentile(ordered, 0.99) * 1000, 3),
        }


def _address(host: str, port: int) -> str:
    """``host:port`` as the access log names a backend (nginx's ``$upstream_addr``);
    an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _percentile(ordered: list[float], share: float) -> float:
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


class BackendPool:
    """The backends, their availability, and the strategy that picks among them."""

    def __init__(self, backends: Iterable[BackendConfig], strategy: str = "round_robin", *,
                 clock: IReactorTime | None = None, slow_start: float = 0.0,
                 queue: QueueConfig | None = None, name: str = "default",
                 ids: Iterator[int] | None = None) -> None:
        self.name = name
        """The pool's name (SPEC 8); its backends carry it."""
        self._ids = itertools.count(1) if ids is None else ids  # shared by every pool
        self.elsewhere = None
        """Where requests run instead of here (the worker processes' supervisor, SPEC 9):
        its ``drain(backend)`` answers drains."""
        self.active_checks = False
        """Whether active health checks run (the health monitor says): until a backend's
        first check its health is then unknown (``health_state``)."""
        self.backends: list[Backend] = []
        self.strategy: Strategy = make_strategy(strategy)
        self.strategy_name = strategy
        self._available: list[Backend] = []
        self._limited = False
        self._using_backups = False
        self._clock = clock
        self._drain_waiters: dict[Backend, list[Deferred[None]]] = {}
        queue = queue or QueueConfig()
        self.queue = WaitQueue(clock, queue.max, queue.timeout)
        self._wake_call = None
        self.slow_start = SlowStart(clock)
        for config in backends:
            self.add(config.url, config.weight, max_requests=config.max_requests,
                     backup=config.backup)
        # Backends present at start-up take their full share at once; later ones ramp.
        self.slow_start.configure(slow_start)

    def use_strategy(self, name: str) -> None:
        """Pick with a new strategy (reload), from its first choice on."""
        self.strategy = make_strategy(name)
        self.strategy_name = name

    def configure(self, *, slow_start: float, queue: QueueConfig) -> None:
        """New slow-start window and queue bounds (start-up and reload)."""
        self.slow_start.configure(slow_start)
        self.queue.configure(queue.max, queue.timeout)

    def add(self, url: str, weight: int = 1, *, max_requests: int = 0,
            backup: bool = False) -> Backend:
        backend = Backend.from_url(f"b{next(self._ids)}", url, weight,
                                   max_requests=max_requests, backup=backup)
        backend.pool = self.name
        self.backends.append(backend)
        self._came_back(backend)
        self._changed()
        return backend

    def _came_back(self, backend: Backend) -> None:
        self.slow_start.begin(backend)

    def get(self, backend_id: str) -> Backend | None:
        for backend in self.backends:
            if backend.id == backend_id:
                return backend
        return None

    def remove(self, backend: Backend) -> None:
        self.backends.remove(backend)
        self.slow_start.forget(backend)
        self._changed()

    def drain(self, backend: Backend) -> Deferred[None]:
        """Stop sending new requests to ``backend``; fires once none is in flight (here
        and, through ``elsewhere``, in every worker process)."""
        backend.draining = True
        self._changed()
        if self.elsewhere is not None:
            return self.elsewhere.drain(backend)
        waiter: Deferred[None] = Deferred()
        if backend.in_flight == 0:
            waiter.callback(None)
        else:
            self._drain_waiters.setdefault(backend, []).append(waiter)
        return waiter

    def cancel_drain(self, backend: Backend) -> None:
        """Keep a draining backend after all (a reload listed it): its waiters fail."""
        backend.draining = False
        self._changed()
        for waiter in self._drain_waiters.pop(backend, []):
            waiter.errback(DrainCancelled(backend.id))

    def drained(self, backend: Backend) -> None:
        """The proxy saw a draining backend's last request finish."""
        for waiter in self._drain_waiters.pop(backend, []):
            waiter.callback(None)

    def set_weight(self, backend: Backend, weight: int) -> None:
        """Give ``backend`` a new weight (a validated one); strategies use it from the next pick."""
        backend.weight = weight
        self._changed()

    def set_enabled(self, backend: Backend, enabled: bool) -> None:
        """Let ``backend`` take requests or not (an operator's switch, apart from health)."""
        if enabled and not backend.enabled:
            self._came_back(backend)
        backend.enabled = enabled
        self._changed()

    def set_limits(self, backend: Backend, max_requests: int, backup: bool) -> None:
        """A new ``max_requests`` (0 = none) and backup flag (validated ones)."""
        backend.max_requests = max_requests
        backend.backup = backup
        self._changed()

    def set_ejected(self, backend: Backend, until: float | None) -> None:
        """Eject ``backend`` until that time (outlier detection), or end its ejection."""
        if until is not None:
            backend.ejections += 1
        elif backend.ejected_until is not None:
            self._came_back(backend)
        backend.ejected_until = until
        self._changed()

    def _changed(self) -> None:
        """Rebuild the candidate list: every method above that changes a backend's state
        (added, removed, weight, limits, enabled, draining, healthy, ejected) ends here.

        Backups are candidates only while no primary is (SPEC 4.6)."""
        available = [b for b in self.backends if b.available]
        primaries = [b for b in available if not b.backup]
        using_backups = not primaries and len(available) > 0
        if using_backups != self._using_backups:
            self._using_backups = using_backups
            if using_backups:
                log.warn("no primary backend is available: the backup backends take traffic")
            else:
                log.info("a primary backend is available: backups no longer take traffic")
        self._available = available if using_backups else primaries
        self._limited = any(b.max_requests for b in self._available)
        if len(self.queue) and self._wake_call is None and self._clock is not None:
            # Not from inside the change (a health transition, an admin call): next turn.
            self._wake_call = self._clock.callLater(0, self._wake)

    def _wake(self) -> None:
        self._wake_call = None
        self.queue.wake()

    def health_state(self, backend: Backend) -> bool | None:
        """``backend.healthy`` as /backends and /stats show it: None (unknown) while active
        checks run and none has finished for it yet; it takes traffic all the same."""
        if self.active_checks and not backend.checked:
            return None
        return backend.healthy

    @property
    def available(self) -> list[Backend]:
        return self._available

    def choose(self, key: bytes | None = None, tried: Collection[Backend] = ()) -> Backend | None:
        """A backend for one request, not one already tried nor full; None when none can
        take it (see ``all_full``)."""
        candidates = self._available
        if tried:
            candidates = [b for b in candidates if b not in tried]
        if self._limited:
            candidates = [b for b in candidates if not b.full]
        if not candidates:
            return None
        chosen = self.strategy.choose(candidates, key)
        if self.slow_start.ramping and getattr(self.strategy, "ramps", True):
            return self.slow_start.pick(chosen, candidates, self.strategy, key)
        return chosen

    def all_full(self, tried: Collection[Backend] = ()) -> bool:
        """Whether ``choose`` found nothing only because every candidate is full: the
        request may wait in the queue for a slot."""
        return self._limited and any(b not in tried for b in self._available)

    def set_healthy(self, backend: Backend, healthy: bool, reason: str,
                    now: float | None = None) -> None:
        """Record a health transition at ``now`` (clock seconds, kept as ``down_since``),
        logging it (down: warning, up: info)."""
        backend.checked = True
        if backend.healthy == healthy:
            return
        backend.healthy = healthy
        backend.down_since = None if healthy else now
        if healthy:
            self._came_back(backend)
        self._changed()
        if healthy:
            log.info("backend {backend_id} ({url}) is up: {reason}",
                     backend_id=backend.id, url=backend.url, reason=reason)
        else:
            log.warn("backend {backend_id} ({url}) is down: {reason}",
                     backend_id=backend.id, url=backend.url, reason=reason)
