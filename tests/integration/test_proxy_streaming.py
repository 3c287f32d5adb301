"""Bodies stream through the proxy both ways, and a client that leaves aborts (SPEC 4.1)."""

from __future__ import annotations

import pytest
import pytest_twisted
import treq
from twisted.web import server

from tests.integration.harness import (
    equalizer_config,
    parse_response,
    raw_connect,
    wait_until,
    within,
)

pytestmark = pytest.mark.usefixtures("no_logged_errors")


def count_upload(backend, request: server.Request) -> bytes:
    """Answers a streamed upload with the number of body bytes that arrived."""
    return b"%d" % request.body_received


def chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts) + b"0\r\n\r\n"


@pytest_twisted.ensureDeferred
async def test_chunked_upload_reaches_backend_intact(backends, equalizer):
    """A Transfer-Encoding: chunked upload arrives whole, chunked, with no Content-Length."""
    backend = backends("b1")
    balancer = await equalizer(equalizer_config([backend.url]))
    parts = [b"first part|", b"x" * 70000, b"|", bytes(range(256)) * 300, b"|last"]
    client = await raw_connect(balancer.proxy_port)
    client.send(b"POST /upload HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n"
                b"Connection: close\r\n\r\n")
    client.send(chunked(*parts))
    response = parse_response(await client.wait_closed())
    assert response.status == 200
    [seen] = backend.requests
    assert seen.body == b"".join(parts)
    assert seen.header(b"Transfer-Encoding") == [b"chunked"]
    assert seen.header(b"Content-Length") == []


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest_twisted.ensureDeferred
async def test_upload_streams_to_backend_before_client_finishes(backends, equalizer, framing):
    """The backend receives the first half of a POST body while the client still holds back
    the second half: the proxy streams, it does not buffer."""
    backend = backends("b1", count_upload, streaming=True)
    balancer = await equalizer(equalizer_config([backend.url]))
    half = b"a" * 65536
    client = await raw_connect(balancer.proxy_port)
    if framing == "chunked":
        head = b"Transfer-Encoding: chunked\r\n"
        first, rest = b"%x\r\n%s\r\n" % (len(half), half), chunked(half)
    else:
        head = b"Content-Length: %d\r\n" % (2 * len(half))
        first, rest = half, half
    client.send(b"POST /stream HTTP/1.1\r\nHost: h\r\nConnection: close\r\n" + head + b"\r\n")
    client.send(first)
    await wait_until(lambda: backend.uploads and backend.uploads[0].body_received >= len(half),
                     message="the first half to reach the backend")
    assert backend.uploads[0].body_received == len(half)
    assert client.received == b""
    client.send(rest)
    response = parse_response(await client.wait_closed())
    assert (response.status, response.body) == (200, b"%d" % (2 * len(half)))


@pytest_twisted.ensureDeferred
async def test_client_disconnect_mid_response_aborts_backend_request(http, backends, equalizer):
    """A client that disconnects while the response streams makes the proxy drop the backend
    request: the backend sees its connection lost, and the proxy serves on."""
    lost = []

    def first_part_then_wait(backend, request: server.Request) -> int:
        request.notifyFinish().addErrback(lambda failure: lost.append(failure))
        request.write(b"first part;")
        return server.NOT_DONE_YET

    backend = backends("b1", first_part_then_wait)
    balancer = await equalizer(equalizer_config([backend.url]))
    client = await raw_connect(balancer.proxy_port)
    client.send(b"GET /long HTTP/1.1\r\nHost: h\r\n\r\n")
    await client.received_until(lambda data: b"first part;" in data)
    client.transport.abortConnection()
    await wait_until(lambda: lost, message="the backend to see its request abandoned")
    await wait_until(lambda: backend.connections_lost == 1,
                     message="the backend connection to close")
    pool_backend = balancer.backend(backend.url)
    assert pool_backend.in_flight == 0

    backend.handler = lambda backend, request: b"fine"
    response = await within(http.get(balancer.proxy_url + "/"))
    assert await within(treq.content(response)) == b"fine"


@pytest_twisted.ensureDeferred
async def test_client_disconnect_mid_upload_aborts_backend_request(backends, equalizer):
    """A client that disconnects halfway through its upload makes the proxy drop the backend
    connection that was receiving it."""
    backend = backends("b1", count_upload, streaming=True)
    balancer = await equalizer(equalizer_config([backend.url]))
    client = await raw_connect(balancer.proxy_port)
    client.send(b"POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: 1000000\r\n\r\n" + b"z" * 1000)
    await wait_until(lambda: backend.uploads and backend.uploads[0].body_received == 1000,
                     message="the start of the upload to reach the backend")
    client.transport.abortConnection()
    await wait_until(lambda: backend.connections_lost == 1,
                     message="the backend connection to be dropped")
    assert backend.requests == []
    assert balancer.backend(backend.url).in_flight == 0


@pytest_twisted.ensureDeferred
async def test_expect_continue_upload(backends, equalizer):
    """A client that sends Expect: 100-continue gets its 100 before sending the body, and the
    body reaches the backend without the Expect header."""
    backend = backends("b1")
    balancer = await equalizer(equalizer_config([backend.url]))
    client = await raw_connect(balancer.proxy_port)
    client.send(b"PUT /doc HTTP/1.1\r\nHost: h\r\nContent-Length: 7\r\nExpect: 100-continue\r\n"
                b"Connection: close\r\n\r\n")
    await client.received_until(lambda data: data.startswith(b"HTTP/1.1 100 "))
    client.send(b"payload")
    raw = await client.wait_closed()
    assert parse_response(raw.split(b"\r\n\r\n", 1)[1]).status == 200
    [seen] = backend.requests
    assert (seen.method, seen.body, seen.header(b"Expect")) == (b"PUT", b"payload", [])
