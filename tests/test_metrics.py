"""``GET /metrics``: the collector reads the live pool, counters, limiter and store at
scrape time; each family has the documented name, labels and value."""

from __future__ import annotations

import platform

import pytest
from prometheus_client import generate_latest
from twisted.internet.task import Clock

from equalizer import __version__
from equalizer.balancer.pool import FAILURE_REASONS, RETRY_REASONS, BackendPool
from equalizer.balancer.stats import TrafficStats
from equalizer.buckets.leasing import LeasingStore
from equalizer.buckets.postgres.store import PostgresStore
from equalizer.config.model import BackendConfig, RateLimitConfig
from equalizer.histogram import DURATION_BUCKETS
from equalizer.metrics import EqualizerCollector, cumulative_buckets, metrics_registry
from equalizer.proxy.admission import RateLimiter
from equalizer.testing import FakeStore


def scrape(pool: BackendPool, stats: TrafficStats, store: object, clock: Clock) -> set[str]:
    """The exposition's sample lines (comments left out)."""
    limiter = RateLimiter(store, RateLimitConfig(), stats)
    limiter.decisions["limited"] += 2
    limiter.decisions["store_error"] += 1
    registry = metrics_registry(EqualizerCollector(pool, stats, limiter, store, clock))
    text = generate_latest(registry).decode()
    return {line for line in text.splitlines() if not line.startswith("#")}


@pytest.fixture
def clock() -> Clock:
    clock = Clock()
    clock.advance(100)
    return clock


@pytest.fixture
def pool() -> BackendPool:
    pool = BackendPool([BackendConfig(url="http://127.0.0.1:9001", weight=3)])
    backend = pool.backends[0]
    backend.in_flight = 2
    for reason in ("connect", "connect", "connect", "cut_off"):
        backend.fail(reason)
    backend.health_checks["ok"] = 5
    pool.set_healthy(backend, False, "test")
    return pool


def test_every_family_reads_the_live_figures(pool: BackendPool, clock: Clock) -> None:
    stats = TrafficStats(started=40)
    backend = pool.backends[0]
    stats.record(200, backend, 0.003)
    stats.record(503, None, 0.2)
    stats.retries = 6
    backend.retries["connect"] = 6
    lines = scrape(pool, stats, FakeStore(clock), clock)
    name = backend.id
    url = backend.url
    assert {
        "equalizer_uptime_seconds 60.0",
        f'equalizer_requests_total{{backend="{name}",code="200",status_class="2xx"}} 1.0',
        'equalizer_requests_total{backend="none",code="503",status_class="5xx"} 1.0',
        f'equalizer_request_duration_seconds_bucket{{backend="{name}",le="0.005"}} 1.0',
        f'equalizer_request_duration_seconds_bucket{{backend="{name}",le="0.0025"}} 0.0',
        f'equalizer_request_duration_seconds_count{{backend="{name}"}} 1.0',
        f'equalizer_backend_in_flight{{backend="{name}"}} 2.0',
        f'equalizer_backend_up{{backend="{name}",url="{url}"}} 0.0',
        f'equalizer_health_checks_total{{backend="{name}",result="ok"}} 5.0',
        f'equalizer_backend_failures_total{{backend="{name}",reason="connect"}} 3.0',
        f'equalizer_backend_failures_total{{backend="{name}",reason="cut_off"}} 1.0',
        f'equalizer_backend_failures_total{{backend="{name}",reason="closed"}} 0.0',
        f'equalizer_backend_weight{{backend="{name}",url="{url}"}} 3.0',
        f'equalizer_backend_enabled{{backend="{name}",url="{url}"}} 1.0',
        f'equalizer_backend_draining{{backend="{name}",url="{url}"}} 0.0',
        'equalizer_rate_limit_decisions_total{outcome="limited"} 2.0',
        "equalizer_store_up 1.0",
        "equalizer_buckets 0.0",
        "equalizer_buckets_swept_total 0.0",
        "equalizer_buckets_over_cap_total 0.0",
        f'equalizer_retries_total{{backend="{name}",reason="connect"}} 6.0',
        f'equalizer_retries_total{{backend="{name}",reason="closed"}} 0.0',
    } <= lines


def test_a_store_down_and_a_count_unknown_are_shown_as_such(pool: BackendPool,
                                                            clock: Clock) -> None:
    store = PostgresStore("dbname=unused", clock)  # not started: down, rows not counted yet
    lines = scrape(pool, TrafficStats(started=0), store, clock)
    assert "equalizer_store_up 0.0" in lines
    assert not any(line.startswith("equalizer_buckets ") for line in lines)


def test_leasing_store_adds_its_lease_figures(pool: BackendPool, clock: Clock) -> None:
    store = LeasingStore(PostgresStore("dbname=unused", clock), clock)
    lines = scrape(pool, TrafficStats(started=0), store, clock)
    assert {"equalizer_lease_settlements_total 0.0", "equalizer_lease_settled_keys_total 0.0",
            "equalizer_lease_waits_total 0.0", "equalizer_lease_keys 0.0"} <= lines


def test_histogram_buckets_are_cumulative_and_end_at_inf() -> None:
    stats = TrafficStats(started=0)
    for seconds in (0.0005, 0.003, 0.003, 30.0):
        stats.unproxied_durations.observe(seconds)
    buckets = cumulative_buckets(stats.unproxied_durations)
    assert buckets[0] == ("0.001", 1)
    assert dict(buckets)["0.005"] == 3
    assert buckets[-1] == ("+Inf", 4)


def test_process_build_info_and_no_duplicate_store_error_series(pool: BackendPool,
                                                                clock: Clock) -> None:
    """The process collector, the build info; store errors only as a decision outcome."""
    lines = scrape(pool, TrafficStats(started=0), FakeStore(clock), clock)
    names = {line.split("{")[0].split(" ")[0] for line in lines}
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes",
            "process_open_fds", "python_info"} <= names
    assert (f'equalizer_build_info{{python="{platform.python_version()}",'
            f'version="{__version__}"}} 1.0') in lines
    assert 'equalizer_rate_limit_decisions_total{outcome="store_error"} 1.0' in lines
    assert not any(name.startswith("equalizer_store_errors") for name in names)


def test_status_codes_connections_bytes_and_reloads(pool: BackendPool, clock: Clock) -> None:
    """429, 502, 503 and 504 the proxy answered itself are four series, not one 5xx; open
    connections, body bytes and reloads by result are read as they are."""
    stats = TrafficStats(started=0)
    for status in (429, 502, 503, 504, 504):
        stats.record(status, None, 0.01)
    stats.connections = 3
    stats.record(200, pool.backends[0], 0.01, received=10, sent=250)
    stats.reloaded(True, 1700000000.5)
    stats.reloaded(False, 1700000100.0)
    lines = scrape(pool, stats, FakeStore(clock), clock)
    assert {
        'equalizer_requests_total{backend="none",code="429",status_class="4xx"} 1.0',
        'equalizer_requests_total{backend="none",code="502",status_class="5xx"} 1.0',
        'equalizer_requests_total{backend="none",code="503",status_class="5xx"} 1.0',
        'equalizer_requests_total{backend="none",code="504",status_class="5xx"} 2.0',
        "equalizer_client_connections 3.0",
        "equalizer_request_bytes_total 10.0",
        "equalizer_response_bytes_total 250.0",
        'equalizer_reloads_total{result="success"} 1.0',
        'equalizer_reloads_total{result="failure"} 1.0',
        "equalizer_last_reload_success_timestamp_seconds 1.7000000005e+09",
    } <= lines


def test_failures_and_retries_carry_a_bounded_reason(pool: BackendPool, clock: Clock) -> None:
    """Every reason of FAILURE_REASONS (failures) and RETRY_REASONS (retries: those and
    a status retry_on lists) per backend, zero or not: fixed label sets."""
    lines = scrape(pool, TrafficStats(started=0), FakeStore(clock), clock)
    for family, wanted in (("equalizer_backend_failures_total", FAILURE_REASONS),
                           ("equalizer_retries_total", RETRY_REASONS)):
        reasons = {line.split('reason="')[1].split('"')[0]
                   for line in lines if line.startswith(family + "{")}
        assert reasons == set(wanted)


def test_health_check_and_database_durations_are_histograms_up_to_a_minute(
        pool: BackendPool, clock: Clock) -> None:
    """Check durations per backend; statement durations for the postgres store only."""
    backend = pool.backends[0]
    backend.record_check(200, None, 1.0, 0.02)
    store = LeasingStore(PostgresStore("dbname=unused", clock), clock)
    store.query_durations.observe(45.0)
    lines = scrape(pool, TrafficStats(started=0), store, clock)
    assert {
        f'equalizer_health_check_duration_seconds_bucket{{backend="{backend.id}",le="0.025"}} 1.0',
        'equalizer_database_query_duration_seconds_bucket{le="30.0"} 0.0',
        'equalizer_database_query_duration_seconds_bucket{le="60.0"} 1.0',
        "equalizer_database_query_duration_seconds_count 1.0",
    } <= lines
    memory = scrape(pool, TrafficStats(started=0), FakeStore(clock), clock)
    assert not any(line.startswith("equalizer_database_query") for line in memory)
    assert max(DURATION_BUCKETS) >= 60.0
