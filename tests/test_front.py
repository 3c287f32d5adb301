"""The front protocol's own rules, without sockets: what llhttp lets through and the proxy
refuses, pipelined requests in line, the idle timeout."""

from __future__ import annotations

import json

import pytest

from equalizer.proxy.front import ABORT_SECONDS, LINGER_SECONDS
from equalizer.testing import HalfCloseableTransport
from tests.integration.harness import parse_response
from tests.test_proxy import GET, OK, Setup


def error_of(raw: bytes) -> tuple[int, str]:
    response = parse_response(raw)
    return response.status, json.loads(response.body)["error"]["message"]


@pytest.mark.parametrize(("data", "words"), [
    (b"GET /\r\n\r\n", "METHOD target HTTP/1.x"),
    (b"GET / HTTP/2.0\r\nHost: h\r\n\r\n", "METHOD target HTTP/1.x"),
    (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n"
     b"\r\n0\r\n\r\n", "chunked"),
    (b"GET / HTTP/1.1\nHost: h\r\n\r\n", "METHOD target HTTP/1.x"),
    (b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\x00b\r\n\r\n", "X-A field holds a NUL"),
    (b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\rb\r\n\r\n", "malformed"),
], ids=["HTTP/0.9", "HTTP/2.0", "gzip then chunked", "bare LF", "NUL", "bare CR"])
def test_what_llhttp_lets_through_or_refuses_is_a_json_400(data, words):
    """HTTP/0.9, other versions and codings llhttp accepts are refused on top of it; its
    own refusals are the same JSON 400; nothing goes upstream and the connection closes."""
    setup = Setup()
    client = setup.client(data)
    status, message = error_of(client.value())
    assert status == 400 and words in message
    assert client.disconnecting and setup.upstreams.connects == []


def test_folded_line_joins_its_field_and_other_control_characters_stay():
    """As twisted.web read them: RFC 9112 5.2 lets a proxy replace obs-fold with a space,
    RFC 9110 5.5 lets it keep control characters other than CR, LF and NUL."""
    setup = Setup()
    setup.client(b"GET / HTTP/1.1\r\nHost: h\r\nX-A: b\r\n folded\r\nX-B: a\x01\x7fb\r\n\r\n")
    sent = setup.complete_connect().transport.value()
    assert b"X-A: b folded\r\n" in sent and b"X-B: a\x01\x7fb\r\n" in sent


def test_whitespace_after_a_value_is_not_part_of_it():
    setup = Setup()
    setup.client(b"GET / HTTP/1.1\r\nHost: front  \r\nX-A: b \t\r\n\r\n")
    sent = setup.complete_connect().transport.value()
    assert b"Host: front\r\n" in sent and b"X-A: b\r\n" in sent
    assert b"X-Forwarded-Host: front\r\n" in sent


def test_pipelined_requests_start_one_after_the_other_and_reading_pauses():
    setup = Setup()
    client = setup.client(GET + b"POST /y HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nhi")
    assert len(setup.upstreams.connects) == 1 and client.producerState == "paused"
    setup.complete_connect().dataReceived(OK)
    second = setup.complete_connect()
    assert second.transport.value().startswith(b"POST /y HTTP/1.1\r\n")
    assert second.transport.value().endswith(b"\r\n\r\nhi")
    second.dataReceived(OK)
    assert client.value().count(b"HTTP/1.1 200 OK\r\n") == 2
    assert client.producerState == "producing"


def test_a_refusal_behind_a_pipelined_request_waits_for_its_response():
    """The 400 of a malformed request goes out after the response to the request ahead of
    it, never in the middle of it."""
    setup = Setup()
    client = setup.client(GET + b"GET / HTTP/1.1\r\nNo colon\r\n\r\n")
    assert client.value() == b"" and not client.disconnecting
    setup.complete_connect().dataReceived(OK)
    first, refusal = client.value().split(b"okHTTP/1.1 ")
    assert first.startswith(b"HTTP/1.1 200 OK\r\n")
    assert refusal.startswith(b"400 Bad Request\r\n") and b"head or body framing" in refusal
    assert client.disconnecting


def test_connection_close_of_a_pipelined_request_closes_after_its_own_response():
    setup = Setup()
    client = setup.client(GET + b"GET /z HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    setup.complete_connect().dataReceived(OK)
    assert not client.disconnecting
    setup.complete_connect().dataReceived(OK)
    assert client.disconnecting
    assert client.value().count(b"Connection: close\r\n") == 1


def test_an_answer_before_the_request_body_has_come_says_it_closes():
    """The rest of the body could not be told from a next request, so the connection
    closes after the response, and the response says so (RFC 9112 9.6): a client that
    reused it would have lost its next request to the close."""
    setup = Setup()
    for backend in setup.pool.backends:
        setup.pool.set_healthy(backend, False, "test")
    client = setup.client(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\n")
    response = parse_response(client.value())
    assert response.status == 503 and response.header(b"connection") == [b"close"]
    assert client.disconnecting


def test_a_backend_answer_before_the_request_body_has_come_says_it_closes():
    setup = Setup()
    client = setup.client(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nhalf")
    setup.complete_connect().dataReceived(OK)
    response = parse_response(client.value())
    assert response.status == 200 and response.header(b"connection") == [b"close"]
    assert client.disconnecting


def test_an_answer_after_the_whole_body_keeps_the_connection():
    setup = Setup()
    client = setup.client(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nhi" + GET)
    setup.complete_connect().dataReceived(OK)
    setup.complete_connect().dataReceived(OK)
    assert client.value().count(b"HTTP/1.1 200 OK\r\n") == 2
    assert b"Connection: close" not in client.value() and not client.disconnecting


# -- lingering close ------------------------------------------------------------------------

UPLOAD = b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 1000000\r\n\r\n"


def refused_upload(setup: Setup) -> HalfCloseableTransport:
    """An upload answered 503 (no backend) right after its head, the body still coming."""
    for backend in setup.pool.backends:
        setup.pool.set_healthy(backend, False, "test")
    client = setup.client(UPLOAD + b"a" * 100, HalfCloseableTransport)
    assert parse_response(client.value()).status == 503
    return client


def test_an_answer_before_the_whole_upload_closes_only_the_sending_side():
    """The rest of the upload is read and dropped rather than left unread, which would make
    the kernel reset the connection (and the client lose the answer): nginx's lingering
    close. Nothing of it is parsed, kept or sent on, and the client's close ends it."""
    setup = Setup()
    client = refused_upload(setup)
    assert client.write_closed and not client.disconnecting
    assert client.producerState == "producing"
    answer = client.value()
    for _ in range(10):
        client.channel.dataReceived(b"GET / HTTP/1.1\r\n\r\n" * 100)  # not a request now
    assert client.value() == answer and setup.upstreams.connects == []
    assert client.channel.unread == b"" and client.channel.requests == []
    client.channel.connectionLost(None)
    assert setup.proxy.stats.connections == 0


def test_a_backend_answering_an_upload_early_lingers_too():
    """A backend's 413 before the upload has ended: the client gets it, not a reset."""
    setup = Setup()
    client = setup.client(UPLOAD + b"a" * 100, HalfCloseableTransport)
    setup.complete_connect().dataReceived(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n")
    assert parse_response(client.value()).status == 413
    assert client.write_closed and not client.disconnecting


def test_a_lingering_close_reads_again_where_back_pressure_paused_the_upload():
    setup = Setup()
    client = setup.client(UPLOAD, HalfCloseableTransport)
    backend = setup.complete_connect()
    backend.transport.producer.pauseProducing()  # the backend socket is full
    client.channel.dataReceived(b"a" * 100)
    assert client.producerState == "paused"
    backend.dataReceived(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n")
    assert client.write_closed and client.producerState == "producing"


def test_a_lingering_close_is_cut_when_the_client_stops_sending():
    setup = Setup()
    client = refused_upload(setup)
    setup.clock.advance(ABORT_SECONDS - 1)
    client.channel.dataReceived(b"a")
    setup.clock.advance(ABORT_SECONDS - 0.5)
    assert not client.disconnected  # it sent a byte 14.5 s ago
    setup.clock.advance(1)
    assert client.disconnected


def test_a_lingering_close_is_cut_after_its_time_even_if_the_client_goes_on():
    setup = Setup()
    client = refused_upload(setup)
    while not client.disconnected:
        setup.clock.advance(1)
        client.channel.dataReceived(b"a" * 1000)
    assert setup.clock.seconds() == LINGER_SECONDS


def test_a_head_refused_part_way_lingers_too():
    setup = Setup()
    client = setup.client(b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: ", HalfCloseableTransport)
    for _ in range(20):  # max_header_bytes is 16 KiB
        client.channel.dataReceived(b"a" * 1000)
    assert error_of(client.value())[0] == 431
    assert client.write_closed and not client.disconnecting


def test_an_answer_after_the_whole_request_closes_at_once():
    """Nothing more is due from a client whose request was read to its end: ``Connection:
    close`` closes the connection as usual."""
    setup = Setup()
    client = setup.client(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
                          HalfCloseableTransport)
    setup.complete_connect().dataReceived(OK)
    assert client.disconnecting and not client.write_closed


def test_a_connection_that_cannot_close_one_side_closes_as_before():
    """TLS has no half-close: a refused upload over it closes the whole connection."""
    setup = Setup()
    for backend in setup.pool.backends:
        setup.pool.set_healthy(backend, False, "test")
    client = setup.client(UPLOAD)
    assert parse_response(client.value()).status == 503 and client.disconnecting


class FlushCounter:
    """An outbox that only counts its flushes (the tests' transports are written at once)."""

    flushes = 0

    def writer(self, transport):
        return transport.write

    def flush(self) -> None:
        self.flushes += 1


@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n", UPLOAD], ids=["close", "linger"])
def test_a_closing_connection_sends_the_turns_writes_first(data):
    """Twisted may close the socket before the turn is over and its writes go out."""
    setup = Setup()
    setup.site.outbox = FlushCounter()
    client = setup.client(data, HalfCloseableTransport)
    setup.complete_connect().dataReceived(OK)
    assert setup.site.outbox.flushes == 1 and (client.disconnecting or client.write_closed)


def test_idle_client_is_closed_but_not_while_its_request_is_answered():
    setup = Setup()
    setup.site.timeOut = 5
    client = setup.client(GET)
    setup.clock.advance(6)
    assert not client.disconnecting  # the backend is still connecting
    setup.complete_connect().dataReceived(OK)
    setup.clock.advance(4)
    assert not client.disconnecting
    setup.clock.advance(2)
    assert client.disconnecting


def test_a_trickling_head_is_cut_by_the_idle_timeout():
    setup = Setup()
    setup.site.timeOut = 5
    client = setup.client(b"GET / HTTP/1.1\r\n")
    for _ in range(3):
        setup.clock.advance(3)
        client.channel.dataReceived(b"X: y\r\n")
    assert not client.disconnecting
    setup.clock.advance(5)
    assert client.disconnecting


def test_a_header_line_that_never_ends_is_431():
    setup = Setup()
    client = setup.client(b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: ")
    for _ in range(20):  # max_header_bytes is 16 KiB
        client.channel.dataReceived(b"a" * 1000)
    status, _ = error_of(client.value())
    assert status == 431 and client.disconnecting
