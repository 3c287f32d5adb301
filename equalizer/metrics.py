from __future__ import annotations

import platform
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
        CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from equalizer import __version__
from equalizer.balancer.pool import FAILURE_REASONS, RETRY_REASONS
from equalizer.balancer.stats import status_class
from equalizer.buckets.leasing import LeasingStore
from equalizer.buckets.postgres.store import PostgresStore
from equalizer.histogram import DURATION_BUCKETS, DurationHistogram
from equalizer.traffic_metrics import management_metrics

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from equalizer.balancer.pool import Backend, BackendPool
    from equalizer.balancer.stats import TrafficStats
    from equalizer.buckets.interface import IBucketStore
    from equalizer.proxy.admission import RateLimiter

UNPROXIED = "none"
"""The ``backend`` label of requests the proxy answered itself (429, 502, 503, 504)."""


class EqualizerCollector(Collector):
    """Reads the live pool, traffic counters, limiter and store on every scrape.

    Label values are bounded: ``backend`` is a pool id (or ``none``), ``code`` the
    three-digit status (100-999), ``reason``, ``result`` and ``outcome`` fixed sets.
    """

    def __init__(self, pool: BackendPool, stats: TrafficStats, limiter: RateLimiter,
                 store: IBucketStore, clock: IReactorTime,
                 pools: Callable[[], dict[str, BackendPool]] | None = None) -> None:
        self._pool = pool
        self._pools = pools or (lambda: {"default": pool})
        self._stats = stats
        self._limiter = limiter
        self._store = store
        self._clock = clock

    def collect(self) -> Iterator:
        """Every family; with pools configured (SPEC 8) per-backend series and the queue
        figures carry a ``pool`` label too (without, they are as they always were)."""
        pools = self._pools()
        if len(pools) == 1:
            yield from self._families([self._pool])
            return
        by_id = {backend.id: name for name, pool in pools.items() for backend in pool.backends}
        for family in self._families(list(pools.values())):
            for sample in family.samples:
                backend = sample.labels.get("backend")
                if backend in by_id:
                    sample.labels["pool"] = by_id[backend]
            yield family

    def _families(self, pools: list[BackendPool]) -> Iterator:
        stats = self._stats
        backends = [backend for pool in pools for backend in pool.backends]
        yield build_info()
        yield GaugeMetricFamily("equalizer_uptime_seconds", "Seconds since the service started",
                                value=stats.uptime(self._clock))
        yield from traffic_metrics(backends, stats)
        yield from backend_metrics(backends)
        yield from backend_settings(backends)
        yield from process_figures(stats)
        decisions = CounterMetricFamily("equalizer_rate_limit_decisions",
                                        "Rate-limiter outcomes (store_error: the store was "
                                        "unreachable)", labels=["outcome"])
        for outcome, count in self._limiter.decisions.items():
            decisions.add_metric([outcome], count)
        yield decisions
        yield GaugeMetricFamily("equalizer_store_up", "1 when the bucket store is reachable",
                                value=1 if self._store.available else 0)
        yield from bucket_metrics(self._store)
        if isinstance(self._store, LeasingStore | PostgresStore):
            yield histogram("equalizer_database_query_duration_seconds",
                            "Time of each bucket-store statement, answered or failed",
                            self._store.query_durations)
        if isinstance(self._store, LeasingStore):
            yield from lease_metrics(self._store)
        yield from management_metrics(pools)


def build_info() -> GaugeMetricFamily:
    """``equalizer_build_info{version, python} 1``, the Prometheus convention for versions."""
    info = GaugeMetricFamily("equalizer_build_info", "The running equalizer: its version and "
                             "Python's, as labels; always 1", labels=["version", "python"])
    info.add_metric([__version__, platform.python_version()], 1)
    return info


def traffic_metrics(backends: list[Backend], stats: TrafficStats) -> Iterator:
    """Requests by backend and exact status (``code``, with its ``status_class``), and the
    request durations by backend."""
    requests = CounterMetricFamily(
        "equalizer_requests", "Requests answered, by backend and status (code and class)",
        labels=["backend", "code", "status_class"])
    durations = HistogramMetricFamily(
        "equalizer_request_duration_seconds", "Time from request head to response end",
        labels=["backend"])
    for label, by_code, durations_of in (
        *((b.id, b.by_code, b.durations) for b in backends),
        (UNPROXIED, stats.unproxied_by_code, stats.unproxied_durations),
    ):
        for code, count in sorted(by_code.items()):
            requests.add_metric([label, str(code), status_class(code)], count)
        durations.add_metric([label], cumulative_buckets(durations_of), durations_of.total)
    yield requests
    yield durations


def backend_metrics(backends: list[Backend]) -> Iterator:
    """In flight, up, health checks (count and duration), failures and retries by reason."""
    in_flight = GaugeMetricFamily("equalizer_backend_in_flight",
                                  "Requests in flight per backend", labels=["backend"])
    up = GaugeMetricFamily("equalizer_backend_up", "1 when the backend is healthy (or not "
                           "checked yet: it takes traffic)", labels=["backend", "url"])
    checks = CounterMetricFamily("equalizer_health_checks", "Active health checks by result",
                                 labels=["backend", "result"])
    check_durations = HistogramMetricFamily(
        "equalizer_health_check_duration_seconds", "Time of each active health check",
        labels=["backend"])
    failures = CounterMetricFamily("equalizer_backend_failures",
                                   "Failed attempts on a backend, by reason",
                                   labels=["backend", "reason"])
    retries = CounterMetricFamily("equalizer_retries", "Requests sent on to another backend "
                                  "after this one failed, by reason",
                                  labels=["backend", "reason"])
    for backend in backends:
        name = backend.id
        in_flight.add_metric([name], backend.in_flight)
        up.add_metric([name, backend.url], 1 if backend.healthy else 0)
        for result, count in backend.health_checks.items():
            checks.add_metric([name, result], count)
        check_durations.add_metric([name], cumulative_buckets(backend.check_durations),
                                   backend.check_durations.total)
        for reason in FAILURE_REASONS:
            failures.add_metric([name, reason], backend.failure_reasons.get(reason, 0))
        for reason in RETRY_REASONS:
            retries.add_metric([name, reason], backend.retries.get(reason, 0))
    yield from (in_flight, up, checks, check_durations, failures, retries)


def process_figures(stats: TrafficStats) -> Iterator:
    """Client connections open, body bytes both ways, configuration reloads."""
    yield GaugeMetricFamily("equalizer_client_connections",
                            "Client connections open on the proxy port",
                            value=stats.connections)
    yield CounterMetricFamily("equalizer_request_bytes", "Request body bytes received "
                              "from clients", value=stats.bytes_in)
    yield CounterMetricFamily("equalizer_response_bytes", "Response body bytes sent to "
                              "clients", value=stats.bytes_out)
    reloads = CounterMetricFamily("equalizer_reloads", "Configuration reloads (SIGHUP) by "
                                  "result", labels=["result"])
    for result, count in stats.reloads.items():
        reloads.add_metric([result], count)
    yield reloads
    if stats.last_reload is not None:
        yield GaugeMetricFamily("equalizer_last_reload_success_timestamp_seconds",
                                "When the configuration was last reloaded (Unix time)",
                                value=stats.last_reload)


def histogram(name: str, documentation: str, durations: DurationHistogram
              ) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation)
    family.add_metric([], cumulative_buckets(durations), durations.total)
    return family


def backend_settings(backends: list[Backend]) -> Iterator:
    """What /stats shows of each backend besides its health: weight, enabled, draining,
    max_requests and the backup flag."""
    labels = ["backend", "url"]
    weight = GaugeMetricFamily("equalizer_backend_weight", "The backend's weight",
                               labels=labels)
    enabled = GaugeMetricFamily("equalizer_backend_enabled", "1 when the backend is enabled",
                                labels=labels)
    draining = GaugeMetricFamily("equalizer_backend_draining",
                                 "1 while the backend drains before removal", labels=labels)
    max_requests = GaugeMetricFamily("equalizer_backend_max_requests",
                                     "Requests in flight the backend takes at most "
                                     "(0 = no limit)", labels=labels)
    backup = GaugeMetricFamily("equalizer_backend_backup", "1 for a backup backend",
                               labels=labels)
    for backend in backends:
        names = [backend.id, backend.url]
        weight.add_metric(names, backend.weight)
        enabled.add_metric(names, 1 if backend.enabled else 0)
        draining.add_metric(names, 1 if backend.draining else 0)
        max_requests.add_metric(names, backend.max_requests)
        backup.add_metric(names, 1 if backend.backup else 0)
    yield from (weight, enabled, draining, max_requests, backup)


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
    """A registry of our own (no process-global state shared between services or tests)
    with prometheus_client's process, platform and garbage-collector figures."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry
