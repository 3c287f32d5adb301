"""What the proxy, the pool and the health monitor count for /stats, /metrics and the
dashboard: failures and retries by reason, status codes, body bytes, client connections,
the most-limited clients, an unknown health before the first check, readable check errors."""

from __future__ import annotations

import errno

import pytest
from twisted.internet.error import (
    ConnectError,
    ConnectionDone,
    ConnectionRefusedError,
    DNSLookupError,
)
from twisted.internet.error import TimeoutError as ConnectTimeout
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from equalizer.admin.views import store_json
from equalizer.balancer.health import describe
from equalizer.balancer.pool import FAILURE_REASONS, BackendPool
from equalizer.balancer.stats import TOP_COUNTERS, SpaceSaving, TrafficStats, by_class
from equalizer.buckets.leasing import LeasingStore
from equalizer.buckets.memory import MemoryStore
from equalizer.buckets.postgres.store import PostgresStore
from equalizer.config.model import BackendConfig
from tests.integration.harness import parse_response
from tests.test_proxy import GET, OK, Setup
from tests.test_proxy_flow import POST

# -- failures and retries by reason -----------------------------------------------------------


def test_a_refused_connect_is_a_connect_failure_and_its_retry_is_counted_on_that_backend():
    """The backend that refused gets the retry, under reason ``connect``; a connect timeout
    is told apart as ``connect_timeout``."""
    setup = Setup(retries=1)
    client = setup.client(GET)
    first, d = setup.upstreams.connects[-1]
    d.errback(Failure(ConnectionRefusedError()))
    second, d = setup.upstreams.connects[-1]
    d.errback(Failure(ConnectTimeout()))
    assert parse_response(client.value()).status == 504
    assert setup.passive.kinds == ["connect", "connect_timeout"]
    assert first.retries == {"connect": 1} and second.retries == {}
    assert setup.stats.retries == 1


def test_an_invalid_response_is_a_failure_and_a_retry_by_that_reason():
    """Not HTTP from the first backend: ``invalid_response`` on it, retried on the other."""
    setup = Setup(retries=1)
    setup.client(GET)
    first = setup.upstreams.connects[-1][0]
    setup.complete_connect().dataReceived(b"NOT HTTP\r\n\r\n")
    assert first.failure_reasons == {"invalid_response": 1}
    assert first.retries == {"invalid_response": 1}


@pytest.mark.parametrize(("head", "reason"), [(b"", "response_timeout"),
                                             (b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nab",
                                              "idle_timeout")])
def test_timeouts_are_told_apart(head: bytes, reason: str):
    """No response head in time and a response gone idle are two reasons."""
    setup = Setup(retries=0)
    setup.client(GET)
    backend = setup.upstreams.connects[-1][0]
    connection = setup.complete_connect()
    if head:
        connection.dataReceived(head)
        for _ in range(2):  # the first expiry saw the body begin: armed again
            setup.clock.advance(setup.config.timeouts.idle)
    else:
        setup.clock.advance(setup.config.timeouts.response)
    assert backend.failure_reasons == {reason: 1} and backend.failures == 1


def test_closed_before_a_response_and_cut_off_after_one():
    """A connection closed before the head is ``closed``; a body broken off is ``cut_off``."""
    for data, reason in ((b"", "closed"),
                         (b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nab", "cut_off")):
        setup = Setup(retries=0)
        setup.client(POST + b"abcdef")
        backend = setup.upstreams.connects[-1][0]
        connection = setup.complete_connect()
        if data:
            connection.dataReceived(data)
        connection.connectionLost(Failure(ConnectionDone()))
        assert backend.failure_reasons == {reason: 1}, reason
    assert set(FAILURE_REASONS) >= {"closed", "cut_off"}


# -- status codes, bytes, connections ----------------------------------------------------------


def test_requests_are_counted_by_exact_status_and_folded_into_classes():
    """429, 502, 503 and 504 stay apart; /stats' classes are their sums."""
    stats = TrafficStats(started=0)
    for status in (429, 502, 503, 503, 504, 200):
        stats.record(status, None, 0.01)
    assert stats.unproxied_by_code == {429: 1, 502: 1, 503: 2, 504: 1, 200: 1}
    assert by_class(stats.by_code) == {"1xx": 0, "2xx": 1, "3xx": 0, "4xx": 1, "5xx": 4}
    assert stats.to_json()["by_status"]["5xx"] == 4


def test_body_bytes_both_ways_and_open_client_connections_are_counted():
    """A POST's 6 body bytes in, the backend's 2 out; the client connection is open until it
    closes."""
    setup = Setup()
    client = setup.client(POST + b"abcdef")
    assert setup.stats.connections == 1
    setup.complete_connect().dataReceived(OK)
    assert (setup.stats.bytes_in, setup.stats.bytes_out) == (6, 2)
    client.channel.connectionLost(Failure(ConnectionDone()))
    assert setup.stats.connections == 0


def test_reloads_are_counted_by_result_with_the_last_good_one_kept():
    stats = TrafficStats(started=0)
    stats.reloaded(True, 100.0)
    stats.reloaded(False, 200.0)
    assert stats.reloads == {"success": 1, "failure": 1} and stats.last_reload == 100.0


# -- most-limited clients -------------------------------------------------------------------------


def test_space_saving_keeps_the_heavy_hitters_in_bounded_counters():
    """Thousands of one-off clients cannot push out the two that are refused most; the
    counters never exceed their number, and a count is over by at most its error."""
    top = SpaceSaving(size=10)
    for n in range(5000):
        top.add(f"once-{n}")
        if n % 3 == 0:
            top.add("greedy")
        if n % 4 == 0:
            top.add("busy")
    shown = top.top(3)
    assert [entry["client"] for entry in shown[:2]] == ["greedy", "busy"]
    assert len(top._counts) == 10
    greedy = shown[0]
    assert greedy["count"] - greedy["error"] <= 1667 <= greedy["count"]


def test_space_saving_counts_exactly_while_it_has_room():
    top = SpaceSaving()
    for key in ["a", "b", "a", "c", "a", "b"]:
        top.add(key)
    assert top.top() == [{"client": "a", "count": 3, "error": 0},
                         {"client": "b", "count": 2, "error": 0},
                         {"client": "c", "count": 1, "error": 0}]
    assert TOP_COUNTERS == 100


def test_refused_requests_feed_the_most_limited_clients():
    """Each 429 counts against the client's rate-limit key."""
    stats = TrafficStats(started=0)
    stats.limited_clients.add("10.0.0.1")
    assert stats.limited_clients.top(1) == [{"client": "10.0.0.1", "count": 1, "error": 0}]


# -- health: unknown until checked, down since, readable errors -------------------------------


def test_health_is_unknown_until_the_first_check_while_checks_run():
    """A new backend is a candidate at once but reported null until a check finished; with
    active checks off there is no first check to wait for."""
    pool = BackendPool([BackendConfig("http://127.0.0.1:9001")])
    backend = pool.backends[0]
    assert pool.health_state(backend) is True
    pool.active_checks = True
    added = pool.add("http://127.0.0.1:9002")
    assert pool.health_state(added) is None and added in pool.available
    added.record_check(200, None, 10.0, 0.004)
    assert pool.health_state(added) is True
    assert added.check_durations.counts[2] == 1  # 2.5 ms < 4 ms <= 5 ms


def test_down_since_is_set_when_taken_out_and_cleared_when_back():
    pool = BackendPool([BackendConfig("http://127.0.0.1:9001")])
    backend = pool.backends[0]
    pool.set_healthy(backend, False, "test", now=50.0)
    assert backend.down_since == 50.0 and pool.health_state(backend) is False
    pool.set_healthy(backend, True, "test", now=60.0)
    assert backend.down_since is None


@pytest.mark.parametrize(("error", "words"), [
    (ConnectionRefusedError(), "connection refused"),
    (DNSLookupError("nowhere.invalid"), "host name not found"),
    (ConnectionDone(), "connection closed before a response"),
    (ConnectError(osError=errno.EHOSTUNREACH), "cannot connect: no route to host"),
])
def test_check_errors_read_as_short_words(error: Exception, words: str):
    assert describe(Failure(error)) == words


def test_stats_say_which_store_runs_and_whether_it_is_reachable():
    """A PostgreSQL outage shows in /stats (and on the dashboard): the store's kind and
    ``available`` false."""
    clock = Clock()
    assert store_json(MemoryStore(clock)) == {"kind": "memory", "available": True}
    down = LeasingStore(PostgresStore("dbname=unused", clock), clock)  # never connected
    assert store_json(down) == {"kind": "postgres", "available": False}
