"""Traffic counters the proxy keeps, read by /stats and /metrics.

The proxy only bumps plain integers here on each request; /metrics turns them
into Prometheus families when it is scraped (``equalizer.metrics``), so the hot
path pays for no label lookups or locks.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import TYPE_CHECKING

from attrs import define, field

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from equalizer.balancer.pool import Backend
    from equalizer.buckets.interface import IBucketStore

STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")

DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Upper bounds, in seconds, of the request-duration histogram (plus +Inf)."""


def status_class(status: int) -> str:
    return STATUS_CLASSES[min(max(status // 100, 1), 5) - 1]


@define
class DurationHistogram:
    """Counts per bucket (not cumulative) and the sum, as Prometheus needs them."""

    counts: list[int] = field(factory=lambda: [0] * (len(DURATION_BUCKETS) + 1))
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.total += seconds


@define
class TrafficStats:
    """Totals over the life of the process; per-backend figures live on each Backend."""

    started: float
    total: int = 0
    by_status: dict[str, int] = field(factory=lambda: dict.fromkeys(STATUS_CLASSES, 0))
    rate_limited: int = 0
    errors: int = 0
    retries: int = 0
    unproxied_durations: DurationHistogram = field(factory=DurationHistogram)
    unproxied_by_status: dict[str, int] = field(factory=lambda: dict.fromkeys(STATUS_CLASSES, 0))

    def record(self, status: int, backend: Backend | None, seconds: float) -> None:
        """Count one answered request, against its backend when one answered it."""
        kind = status_class(status)
        self.total += 1
        self.by_status[kind] += 1
        if backend is None:
            self.unproxied_by_status[kind] += 1
            self.unproxied_durations.observe(seconds)
            return
        backend.requests += 1
        backend.by_status[kind] += 1
        backend.latencies.append(seconds)
        backend.durations.observe(seconds)

    def uptime(self, clock: IReactorTime) -> float:
        """Seconds since start, to the millisecond, for /stats and /metrics alike."""
        return round(clock.seconds() - self.started, 3)

    def to_json(self) -> dict:
        return {
            "total": self.total,
            "by_status": dict(self.by_status),
            "rate_limited": self.rate_limited,
            "errors": self.errors,
        }


def bucket_counts(store: IBucketStore) -> dict[str, int | None]:
    """What /stats shows of the bucket store: buckets held (null until the postgres
    store's first sweep has counted its rows), forgotten by sweeps, and new clients
    that found ``rate_limit.max_buckets`` reached."""
    return {"held": store.bucket_count, "swept": store.swept, "over_cap": store.over_cap}
