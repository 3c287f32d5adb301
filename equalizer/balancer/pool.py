"""The backend pool: every backend's state, and the choice of one for a request.

Backends change state (health, enabled, draining) rarely and are chosen on every
request, so the pool keeps the list of available backends ready and rebuilds it
only when a state changes. So a backend's state is changed only through the pool's
methods (``add``, ``remove``, ``set_weight``, ``set_enabled``, ``drain``,
``cancel_drain``, ``set_healthy``): each rebuilds the list, and no caller has to
remember to.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Collection, Iterable
from urllib.parse import urlsplit

from attrs import define, field
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from equalizer.balancer.strategies import Strategy, make_strategy
from equalizer.config.model import BackendConfig
from equalizer.histogram import DurationHistogram

log = Logger()

LATENCY_WINDOW = 1024
"""How many recent request durations each backend keeps for its p50/p99."""

FAILURE_REASONS = ("connect", "connect_timeout", "response_timeout", "idle_timeout",
                   "invalid_response", "closed", "cut_off")
"""Why an attempt on a backend failed, the ``reason`` of failures and retries: connection
refused or reset, connect timeout, no response head in ``timeouts.response``, silent past
``timeouts.idle`` mid-response, a response that is not valid HTTP, the connection closed
before a response, and a response broken off after it began."""


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
    enabled: bool = True
    draining: bool = False
    healthy: bool = True
    checked: bool = False
    down_since: float | None = None
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
    def from_url(cls, backend_id: str, url: str, weight: int = 1) -> Backend:
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
        )

    @property
    def available(self) -> bool:
        return self.enabled and self.healthy and not self.draining

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

    def __init__(self, backends: Iterable[BackendConfig], strategy: str = "round_robin") -> None:
        self._ids = itertools.count(1)
        self.active_checks = False
        """Whether active health checks run (the health monitor says): until a backend's
        first check its health is then unknown (``health_state``)."""
        self.backends: list[Backend] = []
        self.strategy: Strategy = make_strategy(strategy)
        self._available: list[Backend] = []
        self._drain_waiters: dict[Backend, list[Deferred[None]]] = {}
        for config in backends:
            self.add(config.url, config.weight)

    def add(self, url: str, weight: int = 1) -> Backend:
        backend = Backend.from_url(f"b{next(self._ids)}", url, weight)
        self.backends.append(backend)
        self._changed()
        return backend

    def get(self, backend_id: str) -> Backend | None:
        for backend in self.backends:
            if backend.id == backend_id:
                return backend
        return None

    def remove(self, backend: Backend) -> None:
        self.backends.remove(backend)
        self._changed()

    def drain(self, backend: Backend) -> Deferred[None]:
        """Stop sending new requests to ``backend``; fires once none is in flight."""
        backend.draining = True
        self._changed()
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
        backend.enabled = enabled
        self._changed()

    def _changed(self) -> None:
        """Rebuild the candidate list: every method above that changes a backend's state
        (added, removed, weight, enabled, draining, healthy) ends here."""
        self._available = [b for b in self.backends if b.available]

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
        """A backend for one request, not one already tried; None when none can take it."""
        candidates = self._available
        if tried:
            candidates = [b for b in candidates if b not in tried]
        if not candidates:
            return None
        return self.strategy.choose(candidates, key)

    def set_healthy(self, backend: Backend, healthy: bool, reason: str,
                    now: float | None = None) -> None:
        """Record a health transition at ``now`` (clock seconds, kept as ``down_since``),
        logging it (down: warning, up: info)."""
        backend.checked = True
        if backend.healthy == healthy:
            return
        backend.healthy = healthy
        backend.down_since = None if healthy else now
        self._changed()
        if healthy:
            log.info("backend {backend_id} ({url}) is up: {reason}",
                     backend_id=backend.id, url=backend.url, reason=reason)
        else:
            log.warn("backend {backend_id} ({url}) is down: {reason}",
                     backend_id=backend.id, url=backend.url, reason=reason)
