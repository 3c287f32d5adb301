"""Tests for equalizer.upstream: the backend connection's response parsing and its pool,
driven through StringTransport (no network: the sockets under the peek are never connected).

A recording handler stands in for the proxy's exchange, so each test sees exactly
what the connection reports: 1xx heads, the final head, body pieces, the end.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from attrs import define, field
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.error import (
    ConnectBindError,
    ConnectError,
    ConnectionDone,
    ConnectionRefusedError,
)
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from equalizer.balancer.failures import is_local_resource_error
from equalizer.balancer.pool import Backend
from equalizer.proxy.upstream import (
    MAX_INFORMATIONAL,
    UpstreamConnection,
    UpstreamError,
    UpstreamPool,
    response_framing,
)


@define
class Recorder:
    """A ResponseHandler that writes down everything it hears."""

    informational: list[tuple[int, bytes, list]] = field(factory=list)
    heads: list[tuple[int, bool, bytes]] = field(factory=list)
    body: bytearray = field(factory=bytearray)
    done: int = 0
    failures: list[tuple[Failure, bool]] = field(factory=list)

    def response_informational(self, status, reason, headers) -> None:
        self.informational.append((status, reason, headers))

    def response_head(self, status, reason, headers, chunked, codings) -> None:
        self.heads.append((status, chunked, codings))

    def response_body(self, data: bytes) -> None:
        self.body += data

    def response_done(self) -> None:
        self.done += 1

    def response_failed(self, reason: Failure, response_started: bool) -> None:
        self.failures.append((reason, response_started))


def make_pool() -> UpstreamPool:
    clock = MemoryReactorClock()
    return UpstreamPool(clock, clock, connect_timeout=1.0, idle_timeout=10.0)


def connected(pool: UpstreamPool | None = None, target: Backend | None = None
              ) -> tuple[UpstreamConnection, Recorder]:
    """A connection on a StringTransport with a GET already sent."""
    pool = pool or make_pool()
    target = target or Backend.from_url("b1", "http://127.0.0.1:9001")
    connection = UpstreamConnection(pool, target)
    connection.makeConnection(StringTransport())
    recorder = Recorder()
    connection.send_head(b"GET / HTTP/1.1\r\nHost: b\r\n\r\n", recorder, head_request=False,
                         chunked_body=False, body_follows=False)
    return connection, recorder


# -- 1xx ---------------------------------------------------------------------------------


def test_1xx_heads_are_reported_before_the_final_response():
    """A 103 and a 100 are each handed to the exchange, then the final response as usual."""
    connection, recorder = connected()
    connection.dataReceived(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
                            b"HTTP/1.1 100 Continue\r\n\r\n"
                            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert [(s, r) for s, r, _ in recorder.informational] == [(103, b"Early Hints"),
                                                              (100, b"Continue")]
    assert recorder.informational[0][2] == [(b"Link", b"</s.css>; rel=preload")]
    assert recorder.heads == [(200, False, b"")] and bytes(recorder.body) == b"ok"
    assert recorder.done == 1


def test_1xx_head_split_across_reads_is_reported_once():
    """A 1xx head arriving in pieces is reported once, when complete."""
    connection, recorder = connected()
    for piece in (b"HTTP/1.1 10", b"2 Processing\r\n", b"\r\nHTTP/1.1 204 No", b" Content\r\n\r\n"):
        connection.dataReceived(piece)
    assert [s for s, _, _ in recorder.informational] == [102]
    assert recorder.heads == [(204, False, b"")] and recorder.done == 1


def test_1xx_with_framing_fields_has_no_body():
    """A 1xx ends after its head whatever Content-Length says (RFC 9112 6.3)."""
    connection, recorder = connected()
    connection.dataReceived(b"HTTP/1.1 103 Early Hints\r\nContent-Length: 5\r\n\r\n"
                            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx")
    assert recorder.heads == [(200, False, b"")] and bytes(recorder.body) == b"x"


def test_too_many_1xx_fail_the_exchange():
    """A backend that sends 1xx after 1xx, never a final answer, fails the exchange (502)."""
    connection, recorder = connected()
    connection.dataReceived(b"HTTP/1.1 103 Early Hints\r\n\r\n" * (MAX_INFORMATIONAL + 1))
    assert len(recorder.informational) == MAX_INFORMATIONAL
    [(failure, started)] = recorder.failures
    assert failure.check(UpstreamError) and started is False
    assert connection.transport.disconnecting or connection.transport.disconnected


def test_101_is_not_informational():
    """A 101 is the final response of an upgrade, not a 1xx to relay and wait past."""
    connection, recorder = connected()
    connection.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\nhi")
    assert recorder.informational == [] and recorder.heads == [(101, False, b"")]
    assert bytes(recorder.body) == b"hi"


@pytest.mark.parametrize("status_line", [
    b"HTTP/1.1 200 OK\nInjected: yes", b"HTTP/1.1 200 O\rK", b"HTTP/1.1 +20 OK",
    b"HTTP/1.1 2_0 OK", b"HTTP/1.1 0200 OK", b"HTTP/1.1 20 OK", b"HTTP/1.1 200 \x00",
], ids=["bare-lf", "bare-cr", "sign", "underscore", "four-digits", "two-digits", "nul"])
def test_bad_status_lines_fail_the_exchange(status_line):
    """A status line whose code is not three digits, or whose reason (copied to the client)
    holds a control character, is refused before anything reaches the client."""
    connection, recorder = connected()
    connection.dataReceived(status_line + b"\r\nContent-Length: 0\r\n\r\n")
    assert recorder.heads == [] and recorder.informational == []
    [(failure, started)] = recorder.failures
    assert failure.check(UpstreamError) and started is False


# -- framing -------------------------------------------------------------------------------


def test_204_with_content_length_ends_after_its_head():
    """A 204 with Content-Length: 5 ends after its head; the stray bytes close the connection."""
    connection, recorder = connected()
    connection.dataReceived(b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nhello")
    assert recorder.heads == [(204, False, b"")] and recorder.done == 1
    assert bytes(recorder.body) == b""
    assert connection.transport.disconnecting


@pytest.mark.parametrize(("fields", "expected"), [
    ([(b"Transfer-Encoding", b"chunked")], (True, None, True, b"")),
    ([(b"Transfer-Encoding", b"gzip, chunked")], (True, None, True, b"gzip")),
    ([(b"Transfer-Encoding", b"gzip"), (b"Transfer-Encoding", b"chunked")],
     (True, None, True, b"gzip")),
    ([(b"Transfer-Encoding", b"x-custom;q=1 ,  deflate, CHUNKED")],
     (True, None, True, b"x-custom;q=1, deflate")),
    ([(b"Transfer-Encoding", b"gzip")], (False, None, False, b"gzip")),
    ([(b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"5")], (True, None, False, b"")),
    ([(b"Content-Length", b"5")], (False, 5, True, b"")),
], ids=["chunked", "gzip-chunked", "two-fields", "params-and-case", "gzip-until-close",
        "te-and-cl", "length"])
def test_response_framing(fields, expected):
    """Transfer codings other than chunked are returned as sent; Transfer-Encoding overrides
    Content-Length, and a response carrying both is not reused."""
    assert response_framing(b"HTTP/1.1", fields) == expected


@pytest.mark.parametrize("value", [b"chunked, gzip", b"chunked, chunked"])
def test_chunked_not_final_or_twice_is_refused(value):
    """chunked applied before another coding, or twice, is not HTTP (RFC 9112 7): refused."""
    with pytest.raises(UpstreamError):
        response_framing(b"HTTP/1.1", [(b"Transfer-Encoding", value)])


def test_gzip_chunked_body_is_dechunked_with_its_coding_reported():
    """A ``gzip, chunked`` body is decoded from its chunks only; the gzip bytes pass as they
    are and the coding is reported with the head."""
    connection, recorder = connected()
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
                            b"3\r\n\x1f\x8b\x08\r\n0\r\n\r\n")
    assert recorder.heads == [(200, True, b"gzip")]
    assert bytes(recorder.body) == b"\x1f\x8b\x08" and recorder.done == 1


# -- stale pooled connections ------------------------------------------------------------------


class FakeSocket(socket.socket):
    """A socket object, never connected (no traffic), whose ``fileno`` is the test's own
    descriptor: a pipe in the state the test wants; the real socket is in the integration
    tests."""

    def __init__(self, fd: int) -> None:
        super().__init__(socket.AF_INET, socket.SOCK_STREAM)
        self.fake_fd = fd

    def fileno(self) -> int:
        return self.fake_fd


class HandleTransport(StringTransport):
    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self.sock = sock

    def getHandle(self) -> socket.socket:
        return self.sock


@contextmanager
def socket_in_state(state: str) -> Iterator[FakeSocket]:
    """A FakeSocket over a descriptor with nothing to read ("open"), a FIN (the writer
    gone), bytes nobody asked for, an error (a write end whose reader is gone), or none
    ("closed"); every descriptor is closed afterwards."""
    fd, to_close = -1, []
    if state != "closed":
        read, write = os.pipe()
        fd, to_close = read, [read, write]
        if state == "fin":
            os.close(write)
            to_close = [read]
        elif state == "unasked-bytes":
            os.write(write, b"H")
        elif state == "error":
            os.close(read)
            fd, to_close = write, [write]
    sock = FakeSocket(fd)
    try:
        yield sock
    finally:
        sock.fake_fd = -1  # close the socket object's own descriptor, not the pipe's
        sock.close()
        for descriptor in to_close:
            os.close(descriptor)


@pytest.mark.parametrize(("state", "closed"), [
    ("open", False), ("fin", True), ("unasked-bytes", True), ("error", True), ("closed", True),
])
def test_peer_closed_polls_the_socket(state, closed):
    """An idle connection whose socket has a pending FIN, bytes nobody asked for or an error,
    or is closed, is closed; one with nothing to read is usable."""
    with socket_in_state(state) as sock:
        connection = UpstreamConnection(make_pool(), Backend.from_url("b1", "http://h:1"))
        connection.makeConnection(HandleTransport(sock))
        assert connection.peer_closed() is closed


def test_pool_drops_idle_connections_the_backend_closed():
    """get_idle skips (and aborts) idle connections whose backend closed them, and hands out
    the next usable one."""
    pool = make_pool()
    backend = Backend.from_url("b1", "http://127.0.0.1:9001")
    with socket_in_state("open") as good_sock, socket_in_state("fin") as stale_sock:
        good = UpstreamConnection(pool, backend)
        good.makeConnection(HandleTransport(good_sock))
        stale = UpstreamConnection(pool, backend)
        stale.makeConnection(HandleTransport(stale_sock))
        pool.release(good)
        pool.release(stale)  # most recently used: offered first
        assert pool.get_idle(backend) is good
        assert good.reused and not stale.reused
        assert stale.transport.disconnecting and pool.stale_dropped == 1
        assert pool.get_idle(backend) is None


# -- local resource errors ----------------------------------------------------------------------


@pytest.mark.parametrize(("error", "local"), [
    (ConnectBindError(errno.EMFILE, "Too many open files"), True),
    (ConnectBindError(errno.ENFILE, "File table overflow"), True),
    (ConnectBindError(errno.ENOBUFS, "No buffer space"), True),
    (ConnectError(errno.EADDRNOTAVAIL, "Cannot assign requested address"), True),
    (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), False),
    (ConnectError(string="no route"), False),
    (ValueError("x"), False),
], ids=["emfile", "enfile", "enobufs", "eaddrnotavail", "refused", "other", "not-connect"])
def test_local_resource_errors(error, local):
    """EMFILE and its kin (the proxy's own shortage) are told apart from backend failures."""
    assert is_local_resource_error(Failure(error)) is local



# -- body framing -----------------------------------------------------------------------------


def test_length_body_split_across_reads_then_extra_bytes_drop_the_connection():
    connection, recorder = connected()
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab")
    connection.dataReceived(b"cdeXTRA")
    assert bytes(recorder.body) == b"abcde" and recorder.done == 1
    assert connection.transport.disconnecting  # bytes nobody asked for: not reusable


def test_chunked_body_with_extensions_and_trailers():
    connection, recorder = connected()
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                            b"3;ext=1\r\nabc\r\n2\r")
    connection.dataReceived(b"\nde\r\n0\r\nTrailer: x\r\n\r\n")
    assert bytes(recorder.body) == b"abcde" and recorder.done == 1
    assert connection.pool.idle_count(connection.backend) == 1


@pytest.mark.parametrize("body", [
    b"3\r\nabcX\r\n", b"zz\r\n", b"-1\r\n", b"1" * 70000,
], ids=["no-crlf-after-chunk", "bad-size", "negative-size", "size-line-too-long"])
def test_bad_chunk_framing_fails_the_response(body):
    connection, recorder = connected()
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
    assert len(recorder.failures) == 1 and recorder.failures[0][1] is True


def test_head_too_large_fails_before_the_response_started():
    connection, recorder = connected()
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70000)
    assert recorder.failures[0][1] is False


def test_chunked_request_body_is_framed():
    connection = UpstreamConnection(make_pool(), Backend.from_url("b1", "http://127.0.0.1:9001"))
    connection.makeConnection(StringTransport())
    connection.send_head(b"POST / HTTP/1.1\r\n\r\n", Recorder(), head_request=False,
                         chunked_body=True, body_follows=True)
    connection.send_body(b"abc")
    connection.end_body()
    assert connection.transport.value().endswith(b"3\r\nabc\r\n0\r\n\r\n")


def test_bytes_while_idle_drop_the_connection():
    connection, recorder = connected()
    connection.dataReceived(OK_RESPONSE)
    connection.dataReceived(b"surprise")
    assert connection.transport.disconnecting


def test_close_delimited_body_ends_with_the_connection():
    connection, recorder = connected()
    connection.dataReceived(b"HTTP/1.1 200 OK\r\n\r\nabc")
    connection.connectionLost(Failure(ConnectionDone()))
    assert bytes(recorder.body) == b"abc" and recorder.done == 1


def test_producer_calls_reach_the_transport():
    connection, _ = connected()
    connection.pauseProducing()
    assert connection.transport.producerState == "paused"
    connection.resumeProducing()
    assert connection.transport.producerState == "producing"
    connection.stopProducing()
    assert connection.handler is None


# -- the pool ---------------------------------------------------------------------------------

OK_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


def backend(url: str = "http://127.0.0.1:9001") -> Backend:
    return Backend.from_url("b1", url)


def test_connect_opens_a_tcp_connection_with_the_connect_timeout():
    pool = make_pool()
    b1 = backend()
    d = pool.connect(b1)
    host, port, factory, timeout, _ = pool._reactor.tcpClients[0]
    assert (host, port, timeout) == ("127.0.0.1", 9001, 1.0)
    protocol = factory.buildProtocol(None)
    protocol.makeConnection(StringTransport())
    assert isinstance(d.result, UpstreamConnection) and d.result.backend is b1
    pool.connect(b1)
    assert pool.connections_made == 2 and len(pool._endpoints) == 1


@pytest.mark.parametrize(("url", "kind"), [
    ("http://[::1]:9001", TCP6ClientEndpoint),
    ("http://backend.internal:9001", HostnameEndpoint),
])
def test_endpoint_kinds(url, kind):
    assert isinstance(make_pool()._endpoint_for(backend(url)), kind)


def test_https_backend_is_wrapped_in_tls():
    endpoint = make_pool()._endpoint_for(backend("https://127.0.0.1:9443"))
    assert not isinstance(endpoint, TCP4ClientEndpoint) and hasattr(endpoint, "connect")


def test_new_connect_timeout_rebuilds_endpoints():
    pool = make_pool()
    pool.connect(backend())
    pool.configure(connect_timeout=1.0, idle_timeout=5.0)
    assert pool._endpoints and pool.idle_timeout == 5.0
    pool.configure(connect_timeout=2.0, idle_timeout=5.0)
    assert not pool._endpoints


def test_released_connection_is_handed_out_again_once():
    pool = make_pool()
    connection, _ = connected(pool)
    connection.dataReceived(OK_RESPONSE)  # complete: released
    assert pool.get_idle(connection.backend) is connection and connection.reused
    assert pool.get_idle(connection.backend) is None


def test_release_beyond_the_idle_cap_or_after_close_drops_the_connection():
    pool = UpstreamPool(MemoryReactorClock(), MemoryReactorClock(), connect_timeout=1.0,
                        idle_timeout=10.0, max_idle_per_backend=1)
    first, _ = connected(pool)
    first.dataReceived(OK_RESPONSE)
    second, _ = connected(pool, first.backend)
    second.dataReceived(OK_RESPONSE)
    assert second.transport.disconnecting and pool.idle_count(first.backend) == 1
    first.connectionLost(Failure(ConnectionDone()))  # forgotten
    assert pool.idle_count(first.backend) == 0
    third, _ = connected(pool)
    third.connected_lost = True
    pool.release(third)
    assert third.transport.disconnecting


def test_sweep_closes_connections_idle_too_long_and_stop_closes_the_rest():
    pool = make_pool()
    clock = pool._clock
    pool.startService()
    old, _ = connected(pool)
    old.dataReceived(OK_RESPONSE)
    clock.advance(6)
    young, _ = connected(pool)
    young.dataReceived(OK_RESPONSE)
    clock.advance(5)
    assert old.transport.disconnecting and not young.transport.disconnecting
    pool.stopService()
    assert young.transport.disconnecting and pool.idle_count(young.backend) == 0


def test_drop_backend_closes_its_idle_connections():
    pool = make_pool()
    connection, _ = connected(pool)
    connection.dataReceived(OK_RESPONSE)
    pool.drop_backend(connection.backend)
    assert connection.transport.disconnecting and pool.idle_count(connection.backend) == 0
