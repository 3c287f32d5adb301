"""One view of every worker: each worker's figures as a snapshot, summed in the supervisor.

A worker answers :func:`snapshot` (its totals since it started); the supervisor keeps
the last snapshot of each live worker and the sum of those of the workers that died
(:class:`Aggregate`), and writes the total into its own TrafficStats and Backends,
which /stats and /metrics read as they always do. Counters are summed, histograms
merged bucket by bucket, gauges (requests in flight) summed over live workers, and
latency percentiles taken over the merged recent windows. Each pool's queue (figures
summed, its length over live workers), outlier ejections (summed; a backend shows
ejected while some worker has it ejected, until the latest end) and the most limited
clients (Space-Saving summaries merged: counts and error bounds summed) are summed too.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

from equalizer.balancer.pool import LATENCY_WINDOW

if TYPE_CHECKING:
    from collections.abc import Iterable

    from equalizer.balancer.pool import Backend, BackendPool
    from equalizer.balancer.stats import TrafficStats
    from equalizer.histogram import DurationHistogram

LATENCIES_SENT = 256
"""Most recent latencies per backend a snapshot carries (for merged percentiles)."""

COUNTERS = ("total", "rate_limited", "errors", "retries", "bytes_in", "bytes_out")
GAUGES = ("in_flight", "connections")
BACKEND_COUNTERS = ("requests", "failures", "ejections")
QUEUE_COUNTERS = ("queued", "refused", "timed_out")
CODE_MAPS = ("by_code", "unproxied_by_code")
BACKEND_MAPS = ("by_code", "failure_reasons", "retries")


def _histogram(h: DurationHistogram) -> list:
    return [list(h.counts), h.total]


def snapshot(stats: TrafficStats, pools: Iterable[BackendPool],
             in_flight: int) -> dict[str, Any]:
    """A worker's figures, as JSON-ready data (backends of every pool: their ids are
    unique across pools)."""
    figures: dict[str, Any] = {name: getattr(stats, name) for name in COUNTERS}
    figures["by_code"] = stats.by_code
    figures["unproxied_by_code"] = stats.unproxied_by_code
    figures["unproxied_durations"] = _histogram(stats.unproxied_durations)
    figures["in_flight"] = in_flight
    figures["connections"] = stats.connections
    figures["backends"] = {b.id: _backend(b) for pool in pools for b in pool.backends}
    figures["queues"] = {pool.name: _queue(pool) for pool in pools}
    figures["limited_clients"] = stats.limited_clients.summary()
    return figures


def _queue(pool: BackendPool) -> dict[str, int]:
    queue = pool.queue
    return {"length": len(queue), **{name: getattr(queue, name) for name in QUEUE_COUNTERS}}


def _backend(b: Backend) -> dict[str, Any]:
    latencies = list(b.latencies)[-LATENCIES_SENT:]
    return {"requests": b.requests, "failures": b.failures, "ejections": b.ejections,
            "ejected_until": b.ejected_until, "in_flight": b.in_flight,
            "by_code": b.by_code, "failure_reasons": b.failure_reasons, "retries": b.retries,
            "durations": _histogram(b.durations), "latencies": latencies}


def _add_map(into: dict, more: dict, numeric_keys: bool) -> None:
    for key, count in more.items():
        key = int(key) if numeric_keys else key
        into[key] = into.get(key, 0) + count


def _add_histogram(into: list, more: list) -> None:
    counts, total = more
    if not into:
        into.extend([[0] * len(counts), 0.0])
    into[0] = [a + b for a, b in zip(into[0], counts, strict=True)]
    into[1] += total


def merge(total: dict[str, Any], figures: dict[str, Any], gauges: bool = True) -> None:
    """Add ``figures`` (a snapshot, as decoded from JSON) into ``total``."""
    for name in COUNTERS:
        total[name] = total.get(name, 0) + figures.get(name, 0)
    for name in CODE_MAPS:
        _add_map(total.setdefault(name, {}), figures.get(name, {}), True)
    _add_histogram(total.setdefault("unproxied_durations", []), figures["unproxied_durations"])
    if gauges:
        for name in GAUGES:
            total[name] = total.get(name, 0) + figures.get(name, 0)
    backends = total.setdefault("backends", {})
    for backend_id, more in figures.get("backends", {}).items():
        _add_backend(backends.setdefault(backend_id, {"latencies": []}), more, gauges)
    queues = total.setdefault("queues", {})
    for name, more in figures.get("queues", {}).items():
        _add_queue(queues.setdefault(name, {}), more, gauges)
    _add_limited(total.setdefault("limited_clients", {}), figures.get("limited_clients", {}))


def _add_backend(into: dict[str, Any], more: dict[str, Any], gauges: bool) -> None:
    for name in BACKEND_COUNTERS:
        into[name] = into.get(name, 0) + more.get(name, 0)
    for name in BACKEND_MAPS:
        _add_map(into.setdefault(name, {}), more[name], name == "by_code")
    _add_histogram(into.setdefault("durations", []), more["durations"])
    if gauges:
        into["in_flight"] = into.get("in_flight", 0) + more["in_flight"]
        into["latencies"].extend(more["latencies"])
        ends = [end for end in (into.get("ejected_until"), more.get("ejected_until"))
                if end is not None]
        into["ejected_until"] = max(ends, default=None)


def _add_queue(into: dict[str, int], more: dict[str, int], gauges: bool) -> None:
    for name in QUEUE_COUNTERS:
        into[name] = into.get(name, 0) + more[name]
    if gauges:
        into["length"] = into.get("length", 0) + more["length"]


def _add_limited(into: dict[str, Any], more: dict[str, Any]) -> None:
    """Sum two Space-Saving summaries. A client one of them does not hold may have had up
    to that one's floor there: added to its count and to its error alike, so the true
    count stays between ``count - error`` and ``count``."""
    counters = into.setdefault("counters", {})
    floor, more_floor = into.get("floor", 0), more.get("floor", 0)
    extra = more.get("counters", {})
    for client, (count, error) in counters.items():
        if client not in extra:
            counters[client] = [count + more_floor, error + more_floor]
    for client, (count, error) in extra.items():
        held = counters.get(client, (floor, floor))
        counters[client] = [held[0] + count, held[1] + error]
    into["floor"] = floor + more_floor


class Aggregate:
    """The live workers' last snapshots and what dead workers had counted."""

    def __init__(self) -> None:
        self.live: dict[int, dict[str, Any]] = {}
        self.retired: dict[str, Any] = {}

    def retire(self, pid: int) -> None:
        """A worker died: its counts stay, its gauges go."""
        figures = self.live.pop(pid, None)
        if figures is not None:
            merge(self.retired, figures, gauges=False)

    def total(self) -> dict[str, Any]:
        total: dict[str, Any] = {}
        merge(total, self.retired, gauges=False) if self.retired else None
        for figures in self.live.values():
            merge(total, figures)
        return total

    def write_into(self, stats: TrafficStats, pools: Iterable[BackendPool]) -> None:
        """Show the total through the supervisor's own stats and backends (of every pool)."""
        if not self.live and not self.retired:
            return
        total = self.total()
        for name in (*COUNTERS, "connections"):
            setattr(stats, name, total.get(name, 0))
        stats.by_code = total.get("by_code", {})
        stats.unproxied_by_code = total.get("unproxied_by_code", {})
        _set_histogram(stats.unproxied_durations, total.get("unproxied_durations"))
        stats.limited_clients.hold(total["limited_clients"].get("counters", {}))
        backends = total.get("backends", {})
        for pool in pools:
            _write_queue(pool, total["queues"].get(pool.name))
            for backend in pool.backends:
                figures = backends.get(backend.id)
                if figures is not None:
                    _write_backend(backend, figures)


def _set_histogram(h: DurationHistogram, value: list | None) -> None:
    if value:
        h.counts = list(value[0])
        h.total = value[1]


def _write_queue(pool: BackendPool, figures: dict[str, int] | None) -> None:
    """The workers' queue figures of ``pool`` (the supervisor's own queue stays empty)."""
    if figures is not None:
        queue = pool.queue
        queue.queued, queue.refused, queue.timed_out = (
            figures[name] for name in QUEUE_COUNTERS)
        queue.elsewhere = figures.get("length", 0)


def _write_backend(backend: Backend, figures: dict[str, Any]) -> None:
    backend.requests = figures.get("requests", 0)
    backend.failures = figures.get("failures", 0)
    backend.ejections = figures.get("ejections", 0)
    backend.ejected_until = figures.get("ejected_until")
    backend.in_flight = figures.get("in_flight", 0)
    backend.by_code = figures.get("by_code", {})
    backend.failure_reasons = figures.get("failure_reasons", {})
    backend.retries = figures.get("retries", {})
    _set_histogram(backend.durations, figures.get("durations"))
    backend.latencies = deque(figures.get("latencies", ()), maxlen=LATENCY_WINDOW)
