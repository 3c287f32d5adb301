"""Tests for the backend side of equalizer.proxy, without sockets.

A client connection is the front connection from `ProxySite` on a StringTransport;
backend connections are real `UpstreamConnection`s on StringTransports, handed out by
a fake pool whose connects the test completes or fails by hand. So a test writes
the exact bytes a backend sends and reads the exact bytes the client gets.
"""

from __future__ import annotations

import errno

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectBindError, ConnectionDone, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import Logger, LogLevel, globalLogPublisher
from twisted.python.failure import Failure

from equalizer.balancer.pool import Backend, BackendPool
from equalizer.balancer.stats import TrafficStats
from equalizer.config.model import BackendConfig, ProxyConfig
from equalizer.proxy.attempt import RESEND_BODY_BYTES
from equalizer.proxy.exchange import Proxy, ThrottledWarning
from equalizer.proxy.site import ProxySite
from equalizer.proxy.upstream import UpstreamConnection
from equalizer.testing import FakePassive, FakeUpstreams
from tests.integration.harness import parse_response


class Setup:
    """A proxy with two backends, a fake pool and a fake passive health monitor."""

    def __init__(self, retries: int = 1) -> None:
        self.clock = MemoryReactorClock()
        self.pool = BackendPool([BackendConfig("http://127.0.0.1:9001"),
                                 BackendConfig("http://127.0.0.1:9002")])
        self.upstreams = FakeUpstreams()
        self.passive = FakePassive()
        self.config = ProxyConfig(retries=retries)
        self.stats = TrafficStats(started=0)
        self.proxy = Proxy(self.pool, self.upstreams, self.config, self.clock, self.stats,
                           self.passive)
        self.access: list[dict] = []
        self.proxy.access_log._logger = Logger(namespace="equalizer.access",
                                               observer=self.access.append)
        self.site = ProxySite(self.proxy, self.config, self.clock)

    def client(self, data: bytes, transport_class: type = StringTransport) -> StringTransport:
        """A client connection that has sent ``data``, over a ``transport_class``."""
        channel = self.site.buildProtocol(None)
        transport = transport_class(peerAddress=IPv4Address("TCP", "10.0.0.1", 4000))
        channel.makeConnection(transport)
        channel.dataReceived(data)
        transport.channel = channel  # so a test can send more
        return transport

    def backend_connection(self, backend: Backend | None = None) -> UpstreamConnection:
        connection = UpstreamConnection(self.upstreams, backend or self.pool.backends[0])
        connection.makeConnection(StringTransport())
        return connection

    def complete_connect(self, index: int = -1) -> UpstreamConnection:
        """Complete a pending connect; return the new connection."""
        backend, d = self.upstreams.connects[index]
        connection = self.backend_connection(backend)
        d.callback(connection)
        return connection

    def put_idle(self, backend: Backend) -> UpstreamConnection:
        connection = self.backend_connection(backend)
        self.upstreams.idle.setdefault(backend, []).append(connection)
        return connection


GET = b"GET /x HTTP/1.1\r\nHost: front\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def responses(raw: bytes) -> list[bytes]:
    """Split what a client received into its responses' status lines."""
    return [line for line in raw.split(b"\r\n") if line.startswith(b"HTTP/1.")]


# -- 1xx ------------------------------------------------------------------------------------


def test_103_forwarded_to_http_1_1_client_before_the_response():
    """A backend's 103 Early Hints reaches an HTTP/1.1 client, its Link field kept and its
    hop-by-hop fields dropped, then the final 200."""
    setup = Setup()
    client = setup.client(GET)
    backend = setup.complete_connect()
    backend.dataReceived(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n"
                         b"Connection: x\r\nContent-Length: 4\r\n\r\n" + OK)
    raw = client.value()
    assert responses(raw) == [b"HTTP/1.1 103 Early Hints", b"HTTP/1.1 200 OK"]
    early = raw.split(b"\r\n\r\n", 1)[0]
    assert b"Link: </a.css>; rel=preload" in early
    assert b"Connection" not in early and b"Content-Length" not in early
    final = parse_response(raw.split(b"\r\n\r\n", 1)[1])
    assert final.status == 200 and final.body == b"ok"


def test_1xx_not_sent_to_http_1_0_client():
    """An HTTP/1.0 client never gets a 1xx (RFC 9110 15.2), only the final response."""
    setup = Setup()
    client = setup.client(b"GET /x HTTP/1.0\r\n\r\n")
    setup.complete_connect().dataReceived(b"HTTP/1.1 103 Early Hints\r\nLink: <a>\r\n\r\n" + OK)
    assert responses(client.value()) == [b"HTTP/1.0 200 OK"]


def test_no_second_100_continue_when_twisted_sent_one():
    """With ``Expect: 100-continue`` twisted.web sends the 100 itself; the backend's 100 is
    not repeated, other 1xx still are."""
    setup = Setup()
    client = setup.client(b"PUT /x HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\n"
                          b"Content-Length: 2\r\n\r\n")
    backend = setup.complete_connect()
    backend.dataReceived(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n")
    assert responses(client.value()) == [b"HTTP/1.1 100 Continue", b"HTTP/1.1 102 Processing"]


def test_backend_100_forwarded_when_client_did_not_expect():
    """A backend's 100 Continue to a request without Expect is relayed like any 1xx."""
    setup = Setup()
    client = setup.client(GET)
    setup.complete_connect().dataReceived(b"HTTP/1.1 100 Continue\r\n\r\n" + OK)
    assert responses(client.value()) == [b"HTTP/1.1 100 Continue", b"HTTP/1.1 200 OK"]


# -- transfer codings and framing -------------------------------------------------------------


def test_gzip_chunked_keeps_its_coding_for_http_1_1():
    """``Transfer-Encoding: gzip, chunked`` reaches an HTTP/1.1 client as ``gzip, chunked``,
    the gzip bytes unchanged inside the chunks, any Content-Length dropped."""
    setup = Setup()
    client = setup.client(GET)
    setup.complete_connect().dataReceived(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 99\r\n\r\n"
        b"4\r\n\x1f\x8b\x08\x00\r\n0\r\n\r\n")
    response = parse_response(client.value())
    assert response.header(b"transfer-encoding") == [b"gzip, chunked"]
    assert response.header(b"content-length") == []
    assert response.body == b"\x1f\x8b\x08\x00"


def test_gzip_until_close_is_chunked_with_its_coding():
    """A close-delimited ``Transfer-Encoding: gzip`` body goes to an HTTP/1.1 client as
    ``gzip, chunked``."""
    setup = Setup()
    client = setup.client(GET)
    backend = setup.complete_connect()
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n\x1f\x8b")
    backend.connectionLost(Failure(ConnectionDone()))
    response = parse_response(client.value())
    assert response.header(b"transfer-encoding") == [b"gzip, chunked"]
    assert response.body == b"\x1f\x8b"


def test_transfer_coding_to_http_1_0_client_is_502_not_a_backend_failure():
    """An HTTP/1.0 client cannot be sent Transfer-Encoding: a gzip-coded body is a 502, the
    backend connection dropped, and the backend not counted as failing."""
    setup = Setup()
    client = setup.client(b"GET /x HTTP/1.0\r\n\r\n")
    backend = setup.complete_connect()
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n")
    response = parse_response(client.value())
    assert response.status == 502 and b"HTTP/1.0 client" in response.body
    assert backend.transport.disconnecting
    assert setup.pool.backends[0].failures == 0
    assert setup.access[-1]["status"] == 502


def test_plain_chunked_to_http_1_0_client_is_relayed_until_close():
    """Plain chunked framing is only framing: an HTTP/1.0 client gets the decoded body."""
    setup = Setup()
    client = setup.client(b"GET /x HTTP/1.0\r\n\r\n")
    setup.complete_connect().dataReceived(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")
    raw = client.value()
    assert raw.startswith(b"HTTP/1.0 200 OK") and raw.endswith(b"\r\n\r\nok")
    assert b"Transfer-Encoding" not in raw


@pytest.mark.parametrize("status", [204, 304])
def test_no_body_statuses_end_after_the_head(status):
    """A 204 or 304 ends after its head; a 204 loses its Content-Length (RFC 9110 8.6), a
    304 keeps it (the length of the representation it stands for)."""
    setup = Setup()
    client = setup.client(GET)
    setup.complete_connect().dataReceived(
        b"HTTP/1.1 %d X\r\nContent-Length: 5\r\n\r\n" % status)
    raw = client.value()
    assert raw.endswith(b"\r\n\r\n") and responses(raw) == [b"HTTP/1.1 %d X" % status]
    assert (b"Content-Length" in raw) is (status == 304)
    assert b"Transfer-Encoding" not in raw
    assert setup.access[-1]["status"] == status


# -- resending on stale pooled connections ----------------------------------------------------


def test_idempotent_put_resent_with_its_kept_body_after_reused_connection_dies():
    """A PUT written on a reused connection that dies before any response byte goes again
    on a fresh connection, its body resent from what was kept; not a backend failure."""
    setup = Setup()
    first = setup.pool.backends[0]
    reused = setup.put_idle(first)
    setup.put_idle(setup.pool.backends[1])
    client = setup.client(b"PUT /x HTTP/1.1\r\nHost: h\r\nContent-Length: 8\r\n\r\nbody")
    assert reused.transport.value().endswith(b"body")
    reused.connectionLost(Failure(ConnectionDone()))
    assert len(setup.upstreams.connects) == 1  # fresh, though an idle one was there
    fresh = setup.complete_connect()
    assert fresh.transport.value().endswith(b"\r\n\r\nbody")
    client.channel.dataReceived(b"more")  # the rest of the body follows on the fresh one
    assert fresh.transport.value().endswith(b"\r\n\r\nbodymore")
    fresh.dataReceived(OK)
    assert parse_response(client.value()).status == 200
    assert setup.pool.backends[0].failures == 0 and setup.pool.backends[1].failures == 0


def test_post_written_on_reused_connection_that_dies_is_502():
    """A POST that went out on a reused connection which then died is not sent again (the
    backend may have applied it, RFC 9112 9.3.1.1): 502."""
    setup = Setup()
    reused = setup.put_idle(setup.pool.backends[0])
    client = setup.client(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n\r\nbody")
    reused.connectionLost(Failure(ConnectionDone()))
    assert setup.upstreams.connects == []
    assert parse_response(client.value()).status == 502


def test_get_on_reused_connection_that_dies_is_resent_once():
    """A GET whose reused connection dies before any response byte is resent on a fresh
    connection; if that one dies too, the ordinary retry rules take over."""
    setup = Setup(retries=0)
    reused = setup.put_idle(setup.pool.backends[0])
    client = setup.client(GET)
    reused.connectionLost(Failure(ConnectionDone()))
    fresh = setup.complete_connect()
    fresh.dataReceived(OK)
    assert parse_response(client.value()).status == 200
    assert setup.access[-1]["upstream_addr"] == fresh.backend.address


def test_reused_connection_dying_after_response_bytes_is_not_resent():
    """Once a response byte arrived the backend had the request: no resend, 502."""
    setup = Setup(retries=0)
    reused = setup.put_idle(setup.pool.backends[0])
    client = setup.client(GET)
    reused.dataReceived(b"HTTP/1.1 20")
    reused.connectionLost(Failure(ConnectionDone()))
    assert setup.upstreams.connects == []
    assert parse_response(client.value()).status == 502


def test_body_past_the_resend_bound_is_not_kept():
    """A body longer than RESEND_BODY_BYTES on a reused connection is not kept, so when that
    connection dies the PUT is a 502 rather than a resend with a truncated body."""
    setup = Setup(retries=0)
    reused = setup.put_idle(setup.pool.backends[0])
    size = RESEND_BODY_BYTES + 10
    client = setup.client(b"PUT /x HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % size
                          + b"x" * size)
    reused.connectionLost(Failure(ConnectionDone()))
    assert setup.upstreams.connects == []
    assert parse_response(client.value()).status == 502


# -- the proxy's own resource errors ----------------------------------------------------------


def emfile() -> Failure:
    return Failure(ConnectBindError(errno.EMFILE, "Too many open files"))


def test_emfile_is_503_not_a_backend_failure():
    """A connect that fails with EMFILE answers 503 proxy_overloaded with Retry-After, records
    no passive failure, tries no other backend, and logs no backend address."""
    setup = Setup()
    client = setup.client(GET)
    setup.upstreams.connects[0][1].errback(emfile())
    response = parse_response(client.value())
    assert response.status == 503 and response.header(b"retry-after") == [b"1"]
    assert b"proxy_overloaded" in response.body
    assert setup.passive.failures == [] and len(setup.upstreams.connects) == 1
    assert all(b.failures == 0 and b.in_flight == 0 for b in setup.pool.backends)
    assert setup.access[-1]["upstream_addr"] == "-" and setup.stats.errors == 1


def test_emfile_warnings_are_rate_limited():
    """A flood of EMFILE connects logs one warning per interval, with the count held back."""
    setup = Setup()
    warnings = []

    def observe(event):
        if event.get("log_level") == LogLevel.warn and "held_back" in event:
            warnings.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        for _ in range(5):
            setup.client(GET)
            setup.upstreams.connects[-1][1].errback(emfile())
        setup.clock.advance(11)
        setup.client(GET)
        setup.upstreams.connects[-1][1].errback(emfile())
    finally:
        globalLogPublisher.removeObserver(observe)
    assert [event["held_back"] for event in warnings] == [0, 4]


def test_throttled_warning_interval():
    """ThrottledWarning logs at once, then not again until its interval has passed."""
    clock = MemoryReactorClock()
    warning = ThrottledWarning(clock, 10.0)
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        warning.report("e")
        clock.advance(9.9)
        warning.report("e")
        clock.advance(0.2)
        warning.report("e")
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert [e["held_back"] for e in events if "held_back" in e] == [0, 1]


def test_connection_refused_still_counts_and_retries():
    """An ordinary refused connection is still a backend failure and retried elsewhere."""
    setup = Setup()
    setup.client(GET)
    setup.upstreams.connects[0][1].errback(Failure(ConnectionRefusedError()))
    assert len(setup.passive.failures) == 1 and len(setup.upstreams.connects) == 2


# -- access log -------------------------------------------------------------------------------


def test_access_event_names_the_backend_address_and_id():
    """The access event carries the answering backend's host:port and its id."""
    setup = Setup()
    setup.client(GET)
    connection = setup.complete_connect()
    connection.dataReceived(OK)
    [event] = setup.access
    assert event["upstream_addr"] == "127.0.0.1:9001" and event["backend"] == "b1"
    assert 'upstream_addr="127.0.0.1:9001" backend=b1' in event["log_format"].format(**event)


def test_access_event_lists_every_address_tried_in_order():
    """After a retry the access event lists every address tried, as nginx does: ``a:1, b:2``."""
    setup = Setup()
    setup.client(GET)
    setup.upstreams.connects[0][1].errback(Failure(ConnectionRefusedError()))
    setup.complete_connect().dataReceived(OK)
    [event] = setup.access
    assert event["upstream_addr"] == "127.0.0.1:9001, 127.0.0.1:9002"
    assert event["backend"] == "b1,b2" and event["status"] == 200


def test_access_event_without_backend_is_dash():
    """A 503 the proxy answers itself (no healthy backend) logs ``-`` for the address."""
    setup = Setup()
    for backend in setup.pool.backends:
        setup.pool.set_healthy(backend, False, "test")
    client = setup.client(GET)
    assert parse_response(client.value()).status == 503
    [event] = setup.access
    assert event["upstream_addr"] == "-" and event["backend"] == "-"


def test_ipv6_backend_address_in_brackets():
    """An IPv6 backend is named ``[addr]:port``, as nginx prints it."""
    assert Backend.from_url("b1", "http://[::1]:8080/p").address == "[::1]:8080"
    assert Backend.from_url("b2", "https://example.com/").address == "example.com:443"
