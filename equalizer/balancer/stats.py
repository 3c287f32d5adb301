"""Traffic counters the proxy keeps, read by /stats and /metrics.

The proxy only bumps plain integers here on each request; /metrics turns them
into Prometheus families when it is scraped (``equalizer.metrics``), so the hot
path pays for no label lookups or locks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from attrs import define, field

from equalizer.histogram import DurationHistogram

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from equalizer.balancer.pool import Backend
    from equalizer.buckets.interface import IBucketStore

STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


def status_class(status: int) -> str:
    return STATUS_CLASSES[min(max(status // 100, 1), 5) - 1]


def by_class(by_code: dict[int, int]) -> dict[str, int]:
    """Counts per exact status folded into the five classes (all five always present)."""
    classes = dict.fromkeys(STATUS_CLASSES, 0)
    for code, count in by_code.items():
        classes[status_class(code)] += count
    return classes


TOP_COUNTERS = 100
"""Counters the most-limited-clients summary keeps (Space-Saving's m): its memory bound."""

TOP_SHOWN = 10
"""Clients /stats lists as the most limited."""


class SpaceSaving:
    """The most frequent keys of an unbounded stream in ``size`` counters (Metwally, Agrawal
    and El Abbadi's Space-Saving): a key seen is counted; a new key when every counter is
    taken replaces the smallest, inheriting its count plus one, and that inherited part is
    its ``error`` (its true count is between ``count - error`` and ``count``). Any key seen
    more than total/size times is always held. Memory is bounded by ``size``; an update is
    a dictionary step, plus a scan of the counters when a new key evicts one.
    """

    def __init__(self, size: int = TOP_COUNTERS) -> None:
        self._size = size
        self._counts: dict[str, int] = {}
        self._errors: dict[str, int] = {}

    def add(self, key: str) -> None:
        counts = self._counts
        if key in counts:
            counts[key] += 1
            return
        if len(counts) < self._size:
            counts[key] = 1
            self._errors[key] = 0
            return
        smallest = min(counts, key=counts.__getitem__)
        floor = counts.pop(smallest)
        del self._errors[smallest]
        counts[key] = floor + 1
        self._errors[key] = floor

    def summary(self) -> dict[str, Any]:
        """Every counter, ``{client: [count, error]}``, and the floor: the count a client
        not held may have had (the smallest counter once all are taken, else 0)."""
        full = len(self._counts) >= self._size
        return {"counters": {key: [count, self._errors[key]]
                             for key, count in self._counts.items()},
                "floor": min(self._counts.values()) if full else 0}

    def hold(self, counters: dict[str, list[int]]) -> None:
        """Keep the ``size`` largest of ``counters`` (a sum of summaries) instead."""
        keys = sorted(counters, key=lambda key: counters[key][0], reverse=True)[:self._size]
        self._counts = {key: counters[key][0] for key in keys}
        self._errors = {key: counters[key][1] for key in keys}

    def top(self, n: int = TOP_SHOWN) -> list[dict[str, str | int]]:
        """The ``n`` largest counters, largest first: client, count, error."""
        keys = sorted(self._counts, key=self._counts.__getitem__, reverse=True)[:n]
        return [{"client": key, "count": self._counts[key], "error": self._errors[key]}
                for key in keys]


@define
class TrafficStats:
    """Totals over the life of the process; per-backend figures live on each Backend."""

    started: float
    total: int = 0
    by_code: dict[int, int] = field(factory=dict)
    rate_limited: int = 0
    errors: int = 0
    retries: int = 0
    connections: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    reloads: dict[str, int] = field(factory=lambda: {"success": 0, "failure": 0})
    last_reload: float | None = None
    unproxied_durations: DurationHistogram = field(factory=DurationHistogram)
    unproxied_by_code: dict[int, int] = field(factory=dict)
    limited_clients: SpaceSaving = field(factory=SpaceSaving)

    def record(self, status: int, backend: Backend | None, seconds: float,
               received: int = 0, sent: int = 0) -> None:
        """Count one answered request (and its body bytes both ways), against its backend
        when one answered it. Counted by exact status: the classes are summed at read time."""
        self.total += 1
        by_code = self.by_code
        by_code[status] = by_code.get(status, 0) + 1
        self.bytes_in += received
        self.bytes_out += sent
        if backend is None:
            by_code = self.unproxied_by_code
            by_code[status] = by_code.get(status, 0) + 1
            self.unproxied_durations.observe(seconds)
            return
        backend.requests += 1
        by_code = backend.by_code
        by_code[status] = by_code.get(status, 0) + 1
        backend.latencies.append(seconds)
        backend.durations.observe(seconds)

    def reloaded(self, ok: bool, now: float) -> None:
        """Count one configuration reload (SIGHUP), and when the last good one was."""
        self.reloads["success" if ok else "failure"] += 1
        if ok:
            self.last_reload = now

    def uptime(self, clock: IReactorTime) -> float:
        """Seconds since start, to the millisecond, for /stats and /metrics alike."""
        return round(clock.seconds() - self.started, 3)

    def to_json(self) -> dict:
        return {
            "total": self.total,
            "by_status": by_class(self.by_code),
            "rate_limited": self.rate_limited,
            "errors": self.errors,
        }


def bucket_counts(store: IBucketStore) -> dict[str, int | None]:
    """What /stats shows of the bucket store: buckets held (null until the postgres
    store's first sweep has counted its rows), forgotten by sweeps, and new clients
    that found ``rate_limit.max_buckets`` reached."""
    return {"held": store.bucket_count, "swept": store.swept, "over_cap": store.over_cap}
