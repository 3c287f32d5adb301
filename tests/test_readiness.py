"""Start-up readiness (SPEC 4.5), driven on a MemoryReactorClock with a store whose first
connection attempt the test finishes (or never finishes) itself.

What is checked: the proxy listener opens only once that attempt is over or 10 s have
passed, the admin listener at once; bucket calls made before then wait and are then
answered; ``/health`` says ``starting`` until then; a port that cannot be bound once
ready stops the process with status 1.
"""

from __future__ import annotations

import json
from typing import Any

import psycopg2
import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from equalizer.buckets.interface import StoreUnavailable
from equalizer.buckets.memory import MemoryStore
from equalizer.buckets.outage import OutageLog
from equalizer.buckets.postgres.connection import describe
from equalizer.config.checks import database_target
from equalizer.config.loader import parse_config
from equalizer.proxy.site import ProxySite
from equalizer.readiness import READY_TIMEOUT, STORE_RETRY_SECONDS, BucketService, Readiness
from equalizer.service import EqualizerService
from tests.helpers import result_of

PROXY, ADMIN = "proxy", "admin"
LISTEN = "tcp:0:interface=127.0.0.1"
"""Port 0: the memory reactor never binds, and the service's probe leaves port 0 alone."""


class FirstAttemptStore:
    """A memory store whose start-ups wait for the test: ``attempts`` holds one Deferred
    per ``start()``, fired (or failed) by the test; ``available`` once one succeeded."""

    def __init__(self, clock: MemoryReactorClock) -> None:
        self._buckets = MemoryStore(clock)
        self.attempts: list[Deferred[None]] = []
        self.available = False

    def start(self) -> Deferred[None]:
        attempt: Deferred[None] = Deferred()
        self.attempts.append(attempt)

        def connected(result: None) -> None:
            self.available = True

        return attempt.addCallback(connected)

    def stop(self) -> Deferred[None]:
        self.available = False
        return succeed(None)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._buckets, name)


def config() -> Any:
    return parse_config({
        "proxy": {"listen": LISTEN},
        "admin": {"listen": LISTEN},
        "balancer": {"backends": [{"url": "http://127.0.0.1:9"}]},
        "health": {"interval": 0},
        "rate_limit": {"enabled": True, "default": {"capacity": 5, "refill_rate": 1}},
        "logging": {"access_log": False},
    })


def listening(reactor: MemoryReactorClock) -> list[str]:
    """Which of the service's sites listen, in the order they began to."""
    return [PROXY if isinstance(factory, ProxySite) else ADMIN
            for _, factory, *_ in reactor.tcpServers]


@pytest.fixture()
def events() -> list[dict]:
    """Every event logged during the test."""
    seen: list[dict] = []
    globalLogPublisher.addObserver(seen.append)
    yield seen
    globalLogPublisher.removeObserver(seen.append)


def started(reactor: MemoryReactorClock, store: Any = None) -> EqualizerService:
    """A service started as twistd starts it: privileged part first, then the rest."""
    service = EqualizerService(config(), reactor, store=store)
    service.privilegedStartService()
    service.startService()
    return service


def admin_call(service: EqualizerService, method: str, path: str, body: Any = None
               ) -> StringTransport:
    """Send one request to the admin site over an in-memory connection; its transport."""
    raw = b"" if body is None else json.dumps(body).encode()
    channel = service.admin_listener.factory.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(f"{method} {path} HTTP/1.1\r\nHost: admin\r\n"
                         f"Content-Length: {len(raw)}\r\n\r\n".encode() + raw)
    return transport


def status_of(transport: StringTransport) -> int | None:
    """The response's status code, or None while nothing was answered."""
    data = transport.value()
    return int(data.split(b" ", 2)[1]) if data else None


def body_of(transport: StringTransport) -> Any:
    head, _, body = transport.value().partition(b"\r\n\r\n")
    if b"chunked" in head.lower():
        size, _, rest = body.partition(b"\r\n")
        body = rest[:int(size, 16)]
    return json.loads(body)


def test_memory_store_listens_at_once() -> None:
    """With the memory store there is nothing to wait for: both ports are bound while
    twistd starts the privileged part, before the reactor runs (so a port in use is
    still one line and exit 1, before any daemonizing)."""
    reactor = MemoryReactorClock()
    service = EqualizerService(config(), reactor)
    service.privilegedStartService()
    assert listening(reactor) == [PROXY, ADMIN]
    assert service.readiness.ready


def test_proxy_opens_only_after_the_first_attempt(events: list[dict]) -> None:
    """The admin port opens at once, the proxy port only when the store's first connection
    attempt has succeeded; start-up then logs that the proxy listens and after how long."""
    reactor = MemoryReactorClock()
    store = FirstAttemptStore(reactor)
    started(reactor, store)
    assert listening(reactor) == [ADMIN]
    reactor.advance(0.25)
    store.attempts[0].callback(None)
    assert listening(reactor) == [ADMIN, PROXY]
    opened = [event for event in events if "proxy listening" in event.get("log_format", "")]
    assert len(opened) == 1
    assert opened[0]["waited"] == pytest.approx(0.25)
    assert opened[0]["store"] == "available"
    assert not any(event.get("log_format") == "bucket store available" for event in events)


def test_failed_first_attempt_opens_the_proxy_and_retries(events: list[dict]) -> None:
    """A first attempt that fails opens the proxy at once (on_store_error decides from then
    on) and the store is tried again in the background, which is logged when it succeeds."""
    reactor = MemoryReactorClock()
    store = FirstAttemptStore(reactor)
    started(reactor, store)
    store.attempts[0].errback(StoreUnavailable("connection refused"))
    assert listening(reactor) == [ADMIN, PROXY]
    reactor.advance(2.0)
    assert len(store.attempts) == 2
    store.attempts[1].callback(None)
    assert store.available
    assert events[-1]["log_format"] == "bucket store available"


def test_readiness_is_bounded_by_ten_seconds(events: list[dict]) -> None:
    """A first attempt that never finishes (a database that accepts and never answers)
    holds the proxy back exactly READY_TIMEOUT seconds, with a warning, then the proxy
    opens; the attempt finishing later changes nothing more."""
    reactor = MemoryReactorClock()
    store = FirstAttemptStore(reactor)
    service = started(reactor, store)
    reactor.advance(READY_TIMEOUT - 0.001)
    assert listening(reactor) == [ADMIN]
    assert not service.readiness.ready
    reactor.advance(0.001)
    assert listening(reactor) == [ADMIN, PROXY]
    assert any("no answer to its first connection attempt" in event.get("log_format", "")
               for event in events)
    store.attempts[0].callback(None)
    assert listening(reactor) == [ADMIN, PROXY]
    assert store.available
    assert service.proxy_listener.running
    assert events[-1]["log_format"] == "bucket store available"


def test_health_says_starting_until_ready() -> None:
    """GET /health answers 503 "starting" before readiness and 200 "ok" after it."""
    reactor = MemoryReactorClock()
    store = FirstAttemptStore(reactor)
    service = started(reactor, store)
    before = admin_call(service, "GET", "/health")
    assert status_of(before) == 503
    assert body_of(before)["status"] == "starting"
    store.attempts[0].callback(None)
    after = admin_call(service, "GET", "/health")
    assert status_of(after) == 200
    assert body_of(after)["status"] == "ok"


def test_bucket_call_waits_for_readiness() -> None:
    """A POST /buckets made before the store's first attempt is over gets no answer until
    then, and is then created (201), never 503 store_unavailable."""
    reactor = MemoryReactorClock()
    store = FirstAttemptStore(reactor)
    service = started(reactor, store)
    early = admin_call(service, "POST", "/buckets",
                       {"client_id": "early", "capacity": 3, "refill_rate": 1})
    listed = admin_call(service, "GET", "/buckets")
    assert status_of(early) is None and status_of(listed) is None
    store.attempts[0].callback(None)
    assert status_of(early) == 201
    assert status_of(listed) == 200
    assert result_of(store.get("early")).capacity == 3


def test_bucket_call_waits_at_most_ten_seconds() -> None:
    """A bucket call waiting on a first attempt that never finishes is answered after
    READY_TIMEOUT: the store is still unavailable then, so 503 store_unavailable."""
    reactor = MemoryReactorClock()
    store = FirstAttemptStore(reactor)
    store.get = lambda client_id: fail(StoreUnavailable("not connected"))
    service = started(reactor, store)
    early = admin_call(service, "GET", "/buckets/somebody")
    reactor.advance(READY_TIMEOUT - 0.001)
    assert status_of(early) is None
    reactor.advance(0.001)
    assert status_of(early) == 503
    assert body_of(early)["error"]["code"] == "store_unavailable"


def test_waiting_bucket_call_of_a_gone_client_is_forgotten() -> None:
    """A bucket call whose client disconnects while waiting is dropped from the waiters."""
    reactor = MemoryReactorClock()
    store = FirstAttemptStore(reactor)
    service = started(reactor, store)
    waiting = len(service.readiness._waiters)  # the proxy listener's own wait
    channel = service.admin_listener.factory.buildProtocol(None)
    channel.makeConnection(StringTransport())
    channel.dataReceived(b"GET /buckets/x HTTP/1.1\r\nHost: admin\r\n\r\n")
    assert len(service.readiness._waiters) == waiting + 1
    channel.connectionLost(Failure(ConnectionError("gone")))
    assert len(service.readiness._waiters) == waiting
    store.attempts[0].callback(None)


def test_stopping_before_ready_never_opens_the_proxy() -> None:
    """A service stopped while it waits for the store never opens the proxy port later."""
    reactor = MemoryReactorClock()
    store = FirstAttemptStore(reactor)
    service = started(reactor, store)
    result_of(service.stopService())
    store.attempts[0].callback(None)
    reactor.advance(READY_TIMEOUT)
    assert listening(reactor) == [ADMIN]


def test_bucket_call_waiting_when_the_service_stops_is_answered() -> None:
    """Stopping while a bucket call waits for readiness answers it (503 store_unavailable)
    instead of leaving it hanging, and still opens no proxy port."""
    reactor = MemoryReactorClock()
    store = FirstAttemptStore(reactor)
    store.get = lambda client_id: fail(StoreUnavailable("stopped"))
    service = started(reactor, store)
    waiting = admin_call(service, "GET", "/buckets/somebody")
    result_of(service.stopService())
    assert status_of(waiting) == 503
    assert listening(reactor) == [ADMIN]


class PortTakenReactor(MemoryReactorClock):
    """Binding the proxy port fails: another process took it while we waited."""

    def listenTCP(self, port, factory, backlog=50, interface=""):
        if isinstance(factory, ProxySite):
            raise CannotListenError(interface, port, OSError(98, "Address already in use"))
        return super().listenTCP(port, factory, backlog, interface)


def test_port_taken_by_the_time_of_readiness_stops_with_status_1(capfd) -> None:
    """A proxy port that cannot be bound once ready is one error line on stderr and a stop
    with exit status 1, not a traceback and not a process that serves nothing."""
    reactor = PortTakenReactor()
    store = FirstAttemptStore(reactor)
    stops: list[int] = []
    service = EqualizerService(config(), reactor, store=store, stop_process=stops.append)
    service.privilegedStartService()
    service.startService()
    store.attempts[0].callback(None)
    assert stops == [1]
    assert service.exit_status == 1
    assert capfd.readouterr().err == (
        f"error: cannot listen on proxy.listen '{LISTEN}': "
        "Address already in use\n")
    result_of(service.stopService())


def test_readiness_releases_waiters_in_order_and_forgets_cancelled_ones() -> None:
    """Readiness fires each waiter once, in arrival order; a cancelled one is not fired."""
    readiness = Readiness()
    fired: list[str] = []
    first, gone, last = readiness.wait(), readiness.wait(), readiness.wait()
    first.addCallback(lambda _: fired.append("first"))
    last.addCallback(lambda _: fired.append("last"))
    gone.addErrback(lambda failure: fired.append("cancelled"))
    gone.cancel()
    readiness.set()
    readiness.set()
    assert fired == ["cancelled", "first", "last"]
    assert result_of(readiness.wait()) is None


def test_bucket_service_without_connection_is_ready_from_the_start() -> None:
    """A store that needs no connection (memory) makes the service ready before it starts,
    and no readiness timer is left behind."""
    reactor = MemoryReactorClock()
    store = MemoryStore(reactor)
    service = BucketService(store, reactor, needs_connection=False)
    assert service.readiness.ready
    service.startService()
    # The memory store's own sweep timer is the only one.
    assert [call for call in reactor.getDelayedCalls()
            if getattr(call.func, "__self__", None) is not store] == []


# -- how an outage of the store is logged -----------------------------------------------------


def lines(events: list[dict]) -> list[str]:
    """The messages OutageLog logged."""
    return [formatEvent(event) for event in events
            if event.get("log_namespace") == "equalizer.buckets.outage"]


def test_an_outage_is_logged_when_it_starts_changes_every_minute_and_ends(events) -> None:
    """Failures retried every 2 s give one line at the first, one when the reason changes,
    one a minute later while it lasts, and one when it is over: not one per retry."""
    clock = Clock()
    outage = OutageLog(clock, "bucket store")
    for _ in range(10):
        outage.failed("PostgreSQL at eq@db:5432/eq: Connection refused", retry="reconnecting")
        clock.advance(2)
    outage.failed("PostgreSQL at eq@db:5432/eq: the database system is starting up")
    for _ in range(31):
        clock.advance(2)
        outage.failed("PostgreSQL at eq@db:5432/eq: the database system is starting up")
    outage.recovered()
    outage.recovered()
    assert lines(events) == [
        "bucket store unavailable: PostgreSQL at eq@db:5432/eq: Connection refused; reconnecting",
        "bucket store unavailable for 20s (11 failed attempts): PostgreSQL at eq@db:5432/eq: "
        "the database system is starting up",
        "bucket store unavailable for 80s (41 failed attempts): PostgreSQL at eq@db:5432/eq: "
        "the database system is starting up",
        "bucket store available again after 82.0s (42 failed attempts)",
    ]


def test_start_up_retries_are_not_logged_every_two_seconds(events) -> None:
    """A database down at start-up is retried every 2 s but logged once a minute."""
    reactor = MemoryReactorClock()
    store = FirstAttemptStore(reactor)
    started(reactor, store)
    for attempt in range(31):
        store.attempts[attempt].errback(StoreUnavailable("PostgreSQL at db:5432/eq: refused"))
        reactor.advance(STORE_RETRY_SECONDS)
    assert lines(events) == [
        "bucket store unavailable: PostgreSQL at db:5432/eq: refused; retrying every 2s",
        "bucket store unavailable for 60s (31 failed attempts): PostgreSQL at db:5432/eq: "
        "refused; retrying every 2s",
    ]


@pytest.mark.parametrize(("dsn", "target"), [
    ("postgresql://eq:pa55@127.0.0.1:5433/eqdb", "eq@127.0.0.1:5433/eqdb"),
    ("host=db user=eq password=pa55", "eq@db:5432/eq"),
    ("postgresql:///eqdb", "local socket:5432/eqdb"),
    ("postgresql://u@[::1]/d", "u@[::1]:5432/d"),
    ("host=a,b port=1,2 dbname=x", "a,b:1,2/x"),
])
def test_database_target_never_shows_the_password(dsn: str, target: str) -> None:
    assert database_target(dsn) == target


def test_libpq_errors_are_one_line_without_the_address() -> None:
    """The address libpq repeats is dropped (the target names it); lines join with '; '."""
    error = psycopg2.OperationalError(
        'connection to server at "127.0.0.1", port 5433 failed: Connection refused\n'
        "\tIs the server running on that host and accepting TCP/IP connections?\n")
    assert describe(error) == ("Connection refused; Is the server running on that host and "
                               "accepting TCP/IP connections?")
    assert describe(psycopg2.OperationalError(
        'connection to server at "127.0.0.1", port 5432 failed: FATAL:  role "x" does not '
        "exist\n")) == 'FATAL: role "x" does not exist'
