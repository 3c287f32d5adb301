"""Tests for the request-head rules (equalizer.request_head) and where the proxy and admin
channels apply them, without sockets: a client channel on a StringTransport (see
tests/test_proxy.py), backend connections the test completes by hand."""

from __future__ import annotations

import json

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from equalizer.admin.api import AdminAPI
from equalizer.admin.guard import MAX_HEAD_BYTES
from equalizer.balancer.pool import BackendPool
from equalizer.balancer.stats import TrafficStats
from equalizer.buckets.memory import MemoryStore
from equalizer.config.model import ProxyConfig
from equalizer.proxy.request_head import (
    NOT_A_PATH,
    host_problem,
    split_absolute_target,
    valid_host,
)
from equalizer.proxy.site import ProxySite
from tests.integration.harness import parse_response
from tests.test_proxy import OK, Setup

INVALID_HOSTS = {
    "path and query": b"evil.example/path?x",
    "space": b"a b",
    "userinfo": b"user@evil.example",
    "unclosed IPv6": b"[::1",
    "port not digits": b"h:99999x",
    "port over 65535": b"h:65536",
    "DEL": b"a\x7fb.example",
    "TAB": b"a\tb.example",
    "empty port": b"h:",
    "empty": b"",
    "port only": b":80",
    "bare IPv6": b"::1",
    "IPvFuture": b"[v1.fe]",
    "IPv6 zone": b"[fe80::1%25eth0]",
    "bad IPv6": b"[::g]",
    "sub-delim": b"a,b.example",
    "quote": b"a'b.example",
    "broken escape": b"a%zz",
    "six-digit port": b"h:000080",
    "junk after IPv6": b"[::1]x",
    "backslash": b"a\\b",
}

VALID_HOSTS = [b"example.com", b"example.com.", b"api.example.com:8080", b"h:0", b"h:65535",
               b"127.0.0.1", b"127.0.0.1:80", b"[::1]", b"[::1]:8443", b"[2001:db8::1]",
               b"under_score.example", b"caf%C3%A9.example", b"x~y-z"]


@pytest.mark.parametrize("value", VALID_HOSTS)
def test_valid_hosts_accepted(value):
    """Names in unreserved characters (and %HH), IPv4, bracketed IPv6, with a port ≤ 65535."""
    assert valid_host(value)
    assert host_problem(value) is None


@pytest.mark.parametrize("value", list(INVALID_HOSTS.values()), ids=list(INVALID_HOSTS))
def test_invalid_hosts_refused_with_a_reason(value):
    """Every invalid Host gets a message naming what is wrong with it."""
    problem = host_problem(value)
    assert problem is not None and not valid_host(value)
    assert "Host" in problem


@pytest.mark.parametrize(("target", "authority", "origin"), [
    (b"http://h.example/p?q=1", b"h.example", b"/p?q=1"),
    (b"HTTPS://h.example:8443", b"h.example:8443", b"/"),
    (b"http://h.example?q", b"h.example", b"/?q"),
    (b"hTtP://[::1]:81/a/b", b"[::1]:81", b"/a/b"),
])
def test_absolute_target_split_into_authority_and_origin_form(target, authority, origin):
    """An absolute-form target gives its authority and the origin-form (empty path → /)."""
    assert split_absolute_target(target) == (authority, origin)


@pytest.mark.parametrize(("target", "words"), [
    (b"*", NOT_A_PATH),
    (b"h.example:443", NOT_A_PATH),
    (b"ftp://h.example/", "not http or https"),
    (b"http://user:pw@h.example/", "user information"),
    (b"http:///p", "no host"),
    (b"http://a b/", "not allowed"),
    (b"http://h:99999/", "over 65535"),
    (b"http://h/#frag", "fragment"),
    (b"http:/p", NOT_A_PATH),
])
def test_unusable_absolute_targets_refused(target, words):
    """Other schemes, userinfo, invalid authorities and non-absolute forms are refused."""
    problem = split_absolute_target(target)
    assert isinstance(problem, str) and words in problem


# -- the proxy's channel --------------------------------------------------------------------


def error_of(raw: bytes) -> tuple[int, dict]:
    response = parse_response(raw)
    assert response.header(b"content-type") == [b"application/json"]
    return response.status, json.loads(response.body)["error"]


@pytest.mark.parametrize("value", list(INVALID_HOSTS.values()), ids=list(INVALID_HOSTS))
def test_invalid_host_is_a_400_and_nothing_goes_upstream(value):
    """A request with an invalid Host is answered 400 bad_request by the proxy and no
    backend connection is even asked for."""
    setup = Setup()
    client = setup.client(b"GET /x HTTP/1.1\r\nHost: " + value + b"\r\n\r\n")
    setup.clock.advance(0)
    status, error = error_of(client.value())
    assert (status, error["code"]) == (400, "bad_request")
    assert "Host" in error["message"]
    assert setup.upstreams.connects == []


def test_absolute_form_goes_upstream_as_origin_form_with_its_authority_as_host():
    """``GET http://a.example/p?q`` reaches the backend as ``GET /p?q`` with Host and
    X-Forwarded-Host taken from the target, not from the Host header (RFC 9112 3.2.3)."""
    setup = Setup()
    client = setup.client(b"GET http://a.example:8080/p?q=1 HTTP/1.1\r\nHost: other.example\r\n"
                          b"\r\n")
    backend = setup.complete_connect()
    sent = backend.transport.value()
    assert sent.startswith(b"GET /p?q=1 HTTP/1.1\r\nHost: a.example:8080\r\n")
    assert b"X-Forwarded-Host: a.example:8080\r\n" in sent
    assert b"other.example" not in sent
    backend.dataReceived(OK)
    assert parse_response(client.value()).status == 200
    assert setup.access[-1]["path"] == "/p?q=1"


def test_absolute_form_without_a_path_goes_upstream_as_slash():
    """An absolute-form target with no path reaches the backend as ``/``."""
    setup = Setup()
    setup.client(b"GET https://a.example HTTP/1.1\r\nHost: a.example\r\n\r\n")
    assert setup.complete_connect().transport.value().startswith(b"GET / HTTP/1.1\r\n")


@pytest.mark.parametrize(("data", "words"), [
    (b"GET http://a.example/ HTTP/1.1\r\n\r\n", "must carry a Host"),
    (b"GET http://a.example/ HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "one Host"),
    (b"GET http://a.example/ HTTP/1.1\r\nHost: a b\r\n\r\n", "not allowed"),
    (b"GET ftp://a.example/ HTTP/1.1\r\nHost: a\r\n\r\n", "not http or https"),
    (b"GET http://u@a.example/ HTTP/1.1\r\nHost: a\r\n\r\n", "user information"),
    (b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n", NOT_A_PATH),
    (b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n", NOT_A_PATH),
])
def test_refused_targets_are_400_and_nothing_goes_upstream(data, words):
    """Absolute-form keeps the Host rules; bad schemes, userinfo, ``*`` and CONNECT are 400."""
    setup = Setup()
    client = setup.client(data)
    setup.clock.advance(0)
    status, error = error_of(client.value())
    assert (status, error["code"]) == (400, "bad_request") and words in error["message"]
    assert setup.upstreams.connects == []


def proxy_client(data: bytes, max_header_bytes: int = 2048) -> tuple[Setup, StringTransport]:
    setup = Setup()
    setup.config = ProxyConfig(max_header_bytes=max_header_bytes)
    setup.site = ProxySite(setup.proxy, setup.config, setup.clock)
    return setup, setup.client(data)


@pytest.mark.parametrize("data", [
    b"GET /" + b"a" * 3000 + b" HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET /" + b"a" * 3000,  # no line end yet
], ids=["whole", "unfinished"])
def test_proxy_request_line_over_the_bound_is_414(data):
    """A request line over ``max_header_bytes`` gets 414 uri_too_long and the connection
    closes."""
    setup, client = proxy_client(data)
    status, error = error_of(client.value())
    assert (status, error["code"]) == (414, "uri_too_long")
    assert client.disconnecting
    assert setup.upstreams.connects == []


@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: " + b"a" * 3000 + b"\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\r\n" + (b"X-Some: " + b"a" * 500 + b"\r\n") * 5 + b"\r\n",
    b"GET / HTTP/1.1\r\nHost: h\r\n" + b"X: y\r\n" * 501 + b"\r\n",
], ids=["one long line", "head over the total", "too many fields"])
def test_proxy_header_section_too_large_is_431(data):
    """A header line over the bound, a head over ``max_header_bytes`` in all, or more than
    500 fields get 431 header_fields_too_large, and nothing goes upstream."""
    setup, client = proxy_client(data, max_header_bytes=2048 if b"X: y" not in data else 65536)
    status, error = error_of(client.value())
    assert (status, error["code"]) == (431, "header_fields_too_large")
    assert client.disconnecting
    assert setup.upstreams.connects == []


@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.1 extra\r\nHost: h\r\n\r\n",
    b"GET / HTTP/1.1\r\nNo colon here\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: five\r\n\r\n",
])
def test_other_parser_refusals_are_a_json_400(data):
    """What twisted.web's parser refuses gets a small JSON 400, not a bare one."""
    setup, client = proxy_client(data)
    status, error = error_of(client.value())
    assert (status, error["code"]) == (400, "bad_request")
    assert client.disconnecting


# -- the admin channel ----------------------------------------------------------------------


def admin_client(data: bytes) -> StringTransport:
    clock = Clock()
    api = AdminAPI(BackendPool([]), TrafficStats(started=0), clock, MemoryStore(clock), None)
    channel = api.site().buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(data)
    return transport


def test_admin_request_line_over_the_bound_is_414():
    """The admin port answers a request line over 16 KiB with 414 in its JSON error shape
    (Twisted would close without a word)."""
    transport = admin_client(b"GET /" + b"a" * MAX_HEAD_BYTES + b" HTTP/1.1\r\nHost: a\r\n\r\n")
    status, error = error_of(transport.value())
    assert (status, error["code"]) == (414, "uri_too_long")
    assert transport.disconnecting


@pytest.mark.parametrize("data", [
    b"GET /health HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * MAX_HEAD_BYTES + b"\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: a\r\n" + (b"X-Some: " + b"a" * 1000 + b"\r\n") * 17
    + b"\r\n",
], ids=["one long line", "head over the total"])
def test_admin_header_section_too_large_is_431(data):
    """The admin port answers a head over 16 KiB with 431 in its JSON error shape."""
    transport = admin_client(data)
    status, error = error_of(transport.value())
    assert (status, error["code"]) == (431, "header_fields_too_large")
    assert transport.disconnecting


def test_admin_malformed_request_line_is_a_json_400():
    """A request line the admin port cannot parse gets the API's JSON 400."""
    status, error = error_of(admin_client(b"GARBAGE\r\n\r\n").value())
    assert (status, error["code"]) == (400, "bad_request")


def test_admin_still_serves_a_normal_request():
    """The admin channel answers ordinary requests as before."""
    raw = admin_client(b"GET /openapi.json HTTP/1.1\r\nHost: a\r\n\r\n").value()
    assert parse_response(raw).status == 200


def test_admin_unparsable_multipart_body_is_a_json_400_naming_the_body():
    """twisted.web's own refusal of a form body (no multipart boundary) is the API's JSON 400
    and says the body is at fault, not the request line."""
    body = b"--x\r\nbroken"
    raw = admin_client(b"POST /buckets HTTP/1.1\r\nHost: a\r\nContent-Type: multipart/form-data"
                       b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body).value()
    status, error = error_of(raw)
    assert (status, error["code"]) == (400, "bad_request") and "body" in error["message"]
