"""``GET /metrics``: the proxy's counters as Prometheus families, built at scrape time.

The request path only bumps plain integers (``equalizer.stats``); this collector
reads them when Prometheus scrapes, and prometheus_client writes the exposition
format. Nothing here runs per request.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from equalizer.balancer.stats import DURATION_BUCKETS, STATUS_CLASSES, DurationHistogram
from equalizer.buckets.leasing import LeasingStore
from equalizer.traffic_metrics import traffic_metrics

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from equalizer.balancer.pool import Backend, BackendPool
    from equalizer.balancer.stats import TrafficStats
    from equalizer.buckets.interface import IBucketStore
    from equalizer.proxy.admission import RateLimiter

UNPROXIED = "none"
"""The ``backend`` label of requests the proxy answered itself (429, 502, 503, 504)."""


class EqualizerCollector(Collector):
    """Reads the live pool, traffic counters, limiter and store on every scrape."""

    def __init__(self, pool: BackendPool, stats: TrafficStats, limiter: RateLimiter,
                 store: IBucketStore, clock: IReactorTime) -> None:
        self._pool = pool
        self._stats = stats
        self._limiter = limiter
        self._store = store
        self._clock = clock

    def collect(self) -> Iterator:
        backends = self._pool.backends
        stats = self._stats
        yield GaugeMetricFamily("equalizer_uptime_seconds", "Seconds since the service started",
                                value=stats.uptime(self._clock))
        requests = CounterMetricFamily(
            "equalizer_requests", "Requests answered, by backend and status class",
            labels=["backend", "status_class"])
        durations = HistogramMetricFamily(
            "equalizer_request_duration_seconds", "Time from request head to response end",
            labels=["backend"])
        for label, by_status, histogram in (
            *((b.id, b.by_status, b.durations) for b in backends),
            (UNPROXIED, stats.unproxied_by_status, stats.unproxied_durations),
        ):
            for kind in STATUS_CLASSES:
                requests.add_metric([label, kind], by_status[kind])
            durations.add_metric([label], cumulative_buckets(histogram), histogram.total)
        yield requests
        yield durations
        in_flight = GaugeMetricFamily("equalizer_backend_in_flight",
                                      "Requests in flight per backend", labels=["backend"])
        up = GaugeMetricFamily("equalizer_backend_up", "1 when the backend is healthy",
                               labels=["backend", "url"])
        checks = CounterMetricFamily("equalizer_health_checks",
                                     "Active health checks by result",
                                     labels=["backend", "result"])
        failures = CounterMetricFamily("equalizer_backend_failures",
                                       "Failed attempts (connection, timeout, broken response)",
                                       labels=["backend"])
        for backend in backends:
            in_flight.add_metric([backend.id], backend.in_flight)
            up.add_metric([backend.id, backend.url], 1 if backend.healthy else 0)
            failures.add_metric([backend.id], backend.failures)
            for result, count in backend.health_checks.items():
                checks.add_metric([backend.id, result], count)
        yield from (in_flight, up, checks, failures)
        yield from backend_settings(backends)
        decisions = CounterMetricFamily("equalizer_rate_limit_decisions",
                                        "Rate-limiter outcomes", labels=["outcome"])
        for outcome, count in self._limiter.decisions.items():
            decisions.add_metric([outcome], count)
        yield decisions
        yield CounterMetricFamily("equalizer_store_errors",
                                  "Requests that found the bucket store unreachable",
                                  value=self._limiter.decisions["store_error"])
        yield GaugeMetricFamily("equalizer_store_up", "1 when the bucket store is reachable",
                                value=1 if self._store.available else 0)
        yield from bucket_metrics(self._store)
        if isinstance(self._store, LeasingStore):
            yield from lease_metrics(self._store)
        yield CounterMetricFamily("equalizer_retries", "Attempts retried on another backend",
                                  value=stats.retries)
        yield from traffic_metrics(self._pool)


def backend_settings(backends: list[Backend]) -> Iterator:
    """What /stats shows of each backend besides its health: weight, enabled, draining."""
    labels = ["backend", "url"]
    weight = GaugeMetricFamily("equalizer_backend_weight", "The backend's weight",
                               labels=labels)
    enabled = GaugeMetricFamily("equalizer_backend_enabled", "1 when the backend is enabled",
                                labels=labels)
    draining = GaugeMetricFamily("equalizer_backend_draining",
                                 "1 while the backend drains before removal", labels=labels)
    for backend in backends:
        names = [backend.id, backend.url]
        weight.add_metric(names, backend.weight)
        enabled.add_metric(names, 1 if backend.enabled else 0)
        draining.add_metric(names, 1 if backend.draining else 0)
    yield from (weight, enabled, draining)


def bucket_metrics(store: IBucketStore) -> Iterator:
    """Buckets held (once known), swept, and new clients over ``max_buckets``."""
    if store.bucket_count is not None:
        yield GaugeMetricFamily("equalizer_buckets", "Buckets held (postgres: rows in the table "
                                "as of the last sweep)", value=store.bucket_count)
    yield CounterMetricFamily("equalizer_buckets_swept",
                              "Full default buckets forgotten by this process's sweeps",
                              value=store.swept)
    yield CounterMetricFamily("equalizer_buckets_over_cap",
                              "New clients refused because rate_limit.max_buckets were held",
                              value=store.over_cap)


def lease_metrics(store: LeasingStore) -> Iterator:
    """How the postgres limiter's leases fare: statements, keys per statement, waits."""
    yield CounterMetricFamily("equalizer_lease_settlements",
                              "Settlement statements sent to the database", value=store.statements)
    yield CounterMetricFamily("equalizer_lease_settled_keys",
                              "Keys carried by settlement statements", value=store.settled_keys)
    yield CounterMetricFamily("equalizer_lease_waits",
                              "Requests that waited for a settlement (no allowance for their key)",
                              value=store.waits)
    yield GaugeMetricFamily("equalizer_lease_keys", "Client keys this instance holds state for",
                            value=store.key_count)


def cumulative_buckets(histogram: DurationHistogram) -> list[tuple[str, int]]:
    running = 0
    buckets = []
    for bound, count in zip((*map(str, DURATION_BUCKETS), "+Inf"), histogram.counts,
                            strict=True):
        running += count
        buckets.append((bound, running))
    return buckets


def metrics_registry(collector: EqualizerCollector) -> CollectorRegistry:
    """A registry of our own: no process-global state shared between services or tests."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry

