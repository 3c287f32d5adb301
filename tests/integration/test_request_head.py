"""The request-head rules over real sockets on loopback: invalid Host, absolute-form
targets, and request heads too large for the proxy port or the admin port (RFC 9112)."""

from __future__ import annotations

import json

import pytest
import pytest_twisted

from equalizer.admin.guard import MAX_HEAD_BYTES
from tests.integration.harness import equalizer_config, parse_response, raw_request
from tests.test_request_head import INVALID_HOSTS

pytestmark = pytest.mark.usefixtures("no_logged_errors")


def json_error(raw: bytes) -> tuple[int, str]:
    response = parse_response(raw)
    assert response.header(b"content-type") == [b"application/json"], raw
    return response.status, json.loads(response.body)["error"]["code"]


@pytest_twisted.ensureDeferred
async def test_invalid_hosts_are_400_and_never_reach_the_backend(backends, equalizer):
    """With preserve_host on, each invalid Host gets 400 bad_request and the backend sees
    no request at all; a valid one afterwards still goes through."""
    backend = backends("b1")
    balancer = await equalizer(equalizer_config([backend.url], proxy={"preserve_host": True}))
    for name, value in INVALID_HOSTS.items():
        raw = await raw_request(balancer.proxy_port,
                                b"GET /x HTTP/1.1\r\nHost: " + value + b"\r\n\r\n")
        assert json_error(raw) == (400, "bad_request"), name
    assert backend.requests == []
    raw = await raw_request(balancer.proxy_port, b"GET /ok HTTP/1.1\r\nHost: good.example:81\r\n"
                            b"Connection: close\r\n\r\n")
    assert parse_response(raw).status == 200
    assert backend.requests[-1].header(b"host") == [b"good.example:81"]


@pytest_twisted.ensureDeferred
async def test_absolute_form_reaches_the_backend_as_a_path_with_its_authority_as_host(
        backends, equalizer):
    """``GET http://a.example:8080/p?q`` reaches the backend as ``/p?q`` with Host and
    X-Forwarded-Host ``a.example:8080``, whatever the Host header said."""
    backend = backends("b1")
    balancer = await equalizer(equalizer_config([backend.url], proxy={"preserve_host": True}))
    raw = await raw_request(balancer.proxy_port,
                            b"GET http://a.example:8080/p?q=1 HTTP/1.1\r\nHost: other.example\r\n"
                            b"Connection: close\r\n\r\n")
    assert parse_response(raw).status == 200
    seen = backend.requests[-1]
    assert seen.uri == b"/p?q=1"
    assert seen.header(b"host") == [b"a.example:8080"]
    assert seen.header(b"x-forwarded-host") == [b"a.example:8080"]


@pytest_twisted.ensureDeferred
async def test_request_line_too_long_is_414_on_both_ports(backends, equalizer):
    """An over-long request line gets 414 uri_too_long in JSON on the proxy port (over
    ``max_header_bytes``) and on the admin port (over its fixed 16 KiB), then a close."""
    backend = backends("b1")
    balancer = await equalizer(equalizer_config([backend.url],
                                                proxy={"max_header_bytes": 4096}))
    raw = await raw_request(balancer.proxy_port,
                            b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: h\r\n\r\n")
    assert json_error(raw) == (414, "uri_too_long")
    raw = await raw_request(balancer.admin_port, b"GET /" + b"a" * (MAX_HEAD_BYTES + 10)
                            + b" HTTP/1.1\r\nHost: h\r\n\r\n")
    assert json_error(raw) == (414, "uri_too_long")
    assert backend.requests == []


@pytest_twisted.ensureDeferred
async def test_huge_header_is_431_on_both_ports(backends, equalizer):
    """A header over the bound gets 431 header_fields_too_large in JSON on either port."""
    backend = backends("b1")
    balancer = await equalizer(equalizer_config([backend.url],
                                                proxy={"max_header_bytes": 4096}))
    raw = await raw_request(balancer.proxy_port, b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: "
                            + b"a" * 5000 + b"\r\n\r\n")
    assert json_error(raw) == (431, "header_fields_too_large")
    raw = await raw_request(balancer.admin_port, b"GET /health HTTP/1.1\r\nHost: h\r\nX-Big: "
                            + b"a" * (MAX_HEAD_BYTES + 10) + b"\r\n\r\n")
    assert json_error(raw) == (431, "header_fields_too_large")
    assert backend.requests == []
