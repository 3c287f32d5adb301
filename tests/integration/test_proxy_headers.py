"""What the proxy changes in a request and its response, and what it leaves alone (SPEC 4.1)."""

from __future__ import annotations

import hashlib
import os
import re

import pytest
import pytest_twisted
import treq
from twisted.web import server

from tests.integration.harness import (
    equalizer_config,
    parse_response,
    raw_request,
    within,
)

pytestmark = pytest.mark.usefixtures("no_logged_errors")

HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
              b"trailer", b"transfer-encoding", b"upgrade"}


def hop_by_hop_answer(backend, request: server.Request) -> int:
    """A chunked response full of hop-by-hop headers, plus one end-to-end header."""
    for name, value in [
        (b"Connection", b"X-Hop-Response"),
        (b"X-Hop-Response", b"must not pass"),
        (b"Keep-Alive", b"timeout=5, max=100"),
        (b"Proxy-Authenticate", b'Basic realm="backend"'),
        (b"Proxy-Authorization", b"Basic YmFja2VuZA=="),
        (b"TE", b"trailers"),
        (b"Trailer", b"X-Checksum"),
        (b"Upgrade", b"foo/1"),
        (b"X-End-To-End", b"kept"),
    ]:
        request.responseHeaders.addRawHeader(name, value)
    request.write(b"hello ")
    request.write(b"world")
    request.finish()
    return server.NOT_DONE_YET


def echo(backend, request: server.Request) -> bytes:
    """Answers with the request body, and its SHA-256 in a header."""
    body = backend.requests[-1].body
    request.setHeader(b"X-Body-SHA256", hashlib.sha256(body).hexdigest().encode())
    return body


@pytest_twisted.ensureDeferred
async def test_request_hop_by_hop_headers_dropped_and_forwarding_headers_set(backends, equalizer):
    """Hop-by-hop request headers (and those Connection names) are dropped, X-Forwarded-For is
    appended to, X-Forwarded-Proto/-Host are set, and the client's X-Request-ID is kept and
    echoed."""
    backend = backends("b1")
    balancer = await equalizer(equalizer_config([backend.url]))
    raw = await raw_request(balancer.proxy_port, b"".join([
        b"GET /where?x=1 HTTP/1.1\r\n",
        b"Host: front.example:8443\r\n",
        b"Connection: close, X-Hop-Request\r\n",
        b"X-Hop-Request: must not pass\r\n",
        b"Keep-Alive: timeout=5\r\n",
        b"Proxy-Authorization: Basic Y2xpZW50\r\n",
        b"Proxy-Authenticate: Basic\r\n",
        b"TE: trailers\r\n",
        b"Trailer: X-Checksum\r\n",
        b"Upgrade: foo/1\r\n",
        b"X-Forwarded-For: 203.0.113.7, 198.51.100.2\r\n",
        b"X-Request-ID: client-chosen-id-42\r\n",
        b"X-End-To-End: kept\r\n",
        b"\r\n",
    ]))
    response = parse_response(raw)
    assert response.status == 200
    assert response.header(b"X-Request-ID") == [b"client-chosen-id-42"]

    [seen] = backend.requests
    names = {name.lower() for name, _ in seen.headers}
    assert not names & (HOP_BY_HOP | {b"x-hop-request"})
    assert seen.header(b"X-Forwarded-For") == [b"203.0.113.7, 198.51.100.2, 127.0.0.1"]
    assert seen.header(b"X-Forwarded-Proto") == [b"http"]
    assert seen.header(b"X-Forwarded-Host") == [b"front.example:8443"]
    assert seen.header(b"X-Request-ID") == [b"client-chosen-id-42"]
    assert seen.header(b"X-End-To-End") == [b"kept"]
    assert seen.header(b"Host") == [b"front.example:8443"]


@pytest_twisted.ensureDeferred
async def test_forwarded_for_started_when_client_sends_none(http, backends, equalizer):
    """Without an incoming X-Forwarded-For the backend sees just the client address."""
    backend = backends("b1")
    balancer = await equalizer(equalizer_config([backend.url]))
    response = await within(http.get(balancer.proxy_url + "/"))
    await within(treq.content(response))
    assert backend.requests[0].header(b"X-Forwarded-For") == [b"127.0.0.1"]


@pytest_twisted.ensureDeferred
async def test_request_id_generated_when_missing_and_echoed(http, backends, equalizer):
    """A request without X-Request-ID gets a fresh one, the same on the backend and the response,
    and a different one per request."""
    backend = backends("b1")
    balancer = await equalizer(equalizer_config([backend.url]))
    echoed = []
    for _ in range(2):
        response = await within(http.get(balancer.proxy_url + "/"))
        await within(treq.content(response))
        echoed.append(response.headers.getRawHeaders(b"X-Request-ID"))
    sent = [request.header(b"X-Request-ID") for request in backend.requests]
    assert echoed == sent
    assert all(len(ids) == 1 and re.fullmatch(rb"[0-9a-f]{16,}", ids[0]) for ids in sent)
    assert sent[0] != sent[1]


@pytest_twisted.ensureDeferred
async def test_response_hop_by_hop_headers_not_relayed(backends, equalizer):
    """Hop-by-hop response headers, and those the backend's Connection names, are not relayed;
    the backend's chunked framing is replaced by the proxy's own."""
    backend = backends("b1", hop_by_hop_answer)
    balancer = await equalizer(equalizer_config([backend.url]))
    # HTTP/1.0: the proxy cannot use chunked framing itself, so a relayed
    # Transfer-Encoding would show.
    raw = await raw_request(balancer.proxy_port, b"GET / HTTP/1.0\r\nHost: front\r\n\r\n")
    response = parse_response(raw)
    assert response.status == 200
    assert response.body == b"hello world"
    names = response.names()
    assert not names & (HOP_BY_HOP - {b"connection"} | {b"x-hop-response"})
    assert set(response.header(b"Connection")) <= {b"close"}
    assert response.header(b"X-End-To-End") == [b"kept"]

    raw = await raw_request(balancer.proxy_port,
                            b"GET / HTTP/1.1\r\nHost: front\r\nConnection: close\r\n\r\n")
    response = parse_response(raw)
    assert response.body == b"hello world"
    assert not response.names() & (HOP_BY_HOP - {b"connection", b"transfer-encoding"}
                                   | {b"x-hop-response"})
    assert set(response.header(b"Connection")) <= {b"close"}
    assert response.header(b"Transfer-Encoding") in ([], [b"chunked"])


@pytest_twisted.ensureDeferred
async def test_path_prefix_joined(http, backends, equalizer):
    """A backend URL with a path prefix gets the client's path and query joined under it."""
    backend = backends("b1", prefix="/api")
    balancer = await equalizer(equalizer_config([backend.url]))
    response = await within(http.get(balancer.proxy_url + "/x?y=1"))
    await within(treq.content(response))
    assert response.code == 200
    assert [r.uri for r in backend.requests] == [b"/api/x?y=1"]


@pytest_twisted.ensureDeferred
async def test_preserve_host_true_sends_client_host(http, backends, equalizer):
    """With preserve_host true the backend sees the Host the client sent."""
    backend = backends("b1")
    balancer = await equalizer(equalizer_config([backend.url], proxy={"preserve_host": True}))
    response = await within(http.get(balancer.proxy_url + "/",
                                     headers={b"Host": [b"shop.example.com"]}))
    await within(treq.content(response))
    assert backend.requests[0].header(b"Host") == [b"shop.example.com"]
    assert backend.requests[0].header(b"X-Forwarded-Host") == [b"shop.example.com"]


@pytest_twisted.ensureDeferred
async def test_preserve_host_false_sends_backend_host(http, backends, equalizer):
    """With preserve_host false the backend sees its own host:port as Host, and the client's
    Host in X-Forwarded-Host."""
    backend = backends("b1")
    balancer = await equalizer(equalizer_config([backend.url], proxy={"preserve_host": False}))
    response = await within(http.get(balancer.proxy_url + "/",
                                     headers={b"Host": [b"shop.example.com"]}))
    await within(treq.content(response))
    assert backend.requests[0].header(b"Host") == [f"127.0.0.1:{backend.port_number}".encode()]
    assert backend.requests[0].header(b"X-Forwarded-Host") == [b"shop.example.com"]


@pytest_twisted.ensureDeferred
async def test_method_path_and_query_unchanged(http, backends, equalizer):
    """Method, path (escapes included) and query reach the backend byte for byte."""
    backend = backends("b1")
    balancer = await equalizer(equalizer_config([backend.url]))
    targets = [
        (b"GET", b"/"),
        (b"PATCH", b"/a/b%20c/;p=1?x=1&y=%2F&z"),
        (b"DELETE", b"/items/42?force=true&force=false"),
        (b"OPTIONS", b"/odd//slashes/?q=%E2%82%AC#"),
        (b"PURGE", b"/cache/key?"),
    ]
    for method, target in targets:
        raw = await raw_request(balancer.proxy_port, method + b" " + target +
                                b" HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        assert parse_response(raw).status == 200
    assert [(r.method, r.uri) for r in backend.requests] == targets


@pytest_twisted.ensureDeferred
async def test_request_and_response_bodies_intact(http, backends, equalizer):
    """A 3 MB request body reaches the backend intact and its 3 MB echo comes back intact."""
    backend = backends("b1", echo)
    balancer = await equalizer(equalizer_config([backend.url]))
    body = os.urandom(3 * 1024 * 1024 + 17)
    response = await within(http.post(balancer.proxy_url + "/upload", data=body))
    received = await within(treq.content(response))
    assert response.code == 200
    assert backend.requests[0].body == body
    assert backend.requests[0].header(b"Content-Length") == [str(len(body)).encode()]
    assert received == body
    assert response.headers.getRawHeaders(b"X-Body-SHA256") == \
        [hashlib.sha256(body).hexdigest().encode()]


@pytest_twisted.ensureDeferred
async def test_head_and_empty_bodies(http, backends, equalizer):
    """HEAD gets the backend's headers without a body and an empty POST arrives with length 0."""
    backend = backends("b1", echo)
    balancer = await equalizer(equalizer_config([backend.url]))
    response = await within(http.post(balancer.proxy_url + "/", data=b""))
    assert await within(treq.content(response)) == b""
    assert backend.requests[0].header(b"Content-Length") == [b"0"]
    raw = await raw_request(balancer.proxy_port,
                            b"HEAD / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    assert raw.endswith(b"\r\n\r\n") and raw.startswith(b"HTTP/1.1 200 ")
    assert backend.requests[1].method == b"HEAD"
