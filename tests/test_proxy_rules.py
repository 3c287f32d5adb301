"""Unit tests of the proxy's pure rules: headers, client keys, response framing, admission."""

from __future__ import annotations

import ipaddress
from types import SimpleNamespace

import pytest
from twisted.internet.defer import Deferred, fail, succeed

from equalizer.balancer.stats import TrafficStats
from equalizer.buckets.interface import StoreUnavailable
from equalizer.buckets.maths import Decision
from equalizer.config.model import RateLimitConfig
from equalizer.config.rules import MAX_CLIENT_ID_LENGTH, key_digest
from equalizer.proxy.admission import ADMIT_ALL, RateLimiter
from equalizer.proxy.client import RequestFields
from equalizer.proxy.framing import UpstreamError, parse_response_head, response_framing
from equalizer.proxy.headers import (
    client_address,
    connection_tokens,
    expects_continue,
    forwarded_lines,
    split_request_headers,
)
from equalizer.proxy.keys import key_reader

# -- Connection -----------------------------------------------------------------------------


@pytest.mark.parametrize(("values", "tokens"), [
    ([b"close"], {b"close"}),
    ([b"Keep-Alive, CLOSE"], {b"keep-alive", b"close"}),
    ([b" x-foo ,close "], {b"x-foo", b"close"}),
    ([b"upgrade", b"X-Bar"], {b"upgrade", b"x-bar"}),
    ([b"x-not-closed"], {b"x-not-closed"}),
])
def test_connection_tokens_are_comma_separated_and_case_insensitive(values, tokens):
    assert connection_tokens(values) == tokens


@pytest.mark.parametrize(("value", "keep_alive"), [
    (b"x-not-closed", True), (b"close", False), (b"Keep-Alive, Close", False),
    (b"keep-alive", True), (b"upgrade, x-closer", True),
])
def test_upstream_keep_alive_reads_connection_tokens_not_substrings(value, keep_alive):
    """``Connection: x-not-closed`` names a field, it does not close the connection."""
    _, _, reused, _ = response_framing(b"HTTP/1.1", [(b"Connection", value)])
    assert reused is keep_alive


def test_http_1_0_response_is_kept_alive_only_when_it_says_so():
    assert response_framing(b"HTTP/1.0", [])[2] is False
    assert response_framing(b"HTTP/1.0", [(b"Connection", b"Keep-Alive")])[2] is True


@pytest.mark.parametrize("head", [
    b"HTTP/2 200 OK", b"HTTP/1.1 2000 OK", b"HTTP/1.1 +20 OK", b"HTTP/1.1 099 Low",
    b"HTTP/1.1 200 O\x01K", b"HTTP/1.1 200 OK\r\nBad Name: x", b"HTTP/1.1",
])
def test_bad_response_heads_are_refused(head):
    with pytest.raises(UpstreamError):
        parse_response_head(head)


@pytest.mark.parametrize("field", [
    b"A: x\ny", b"A: x\ry", b"A: \x00", b"A: x\x7f", b"A: \x1b[2J", b"A\x01: x",
    b": x", b"NoColon", b"A : x", b" A: x", b"A: x\r\n\r\nB: y", b"A: x\r\n", b"\r\nA: x",
    b"A: x\r\nB\x7f: y", b"A: x\r\nB: y\n",
])
def test_field_lines_that_rfc_9110_does_not_allow_are_refused(field):
    """A token, a colon, and a value of HTAB, SP, visible and obs-text bytes: anything else
    (a bare CR or LF above all, which a client could read as another field) is refused,
    naming the first bad line."""
    with pytest.raises(UpstreamError, match="bad header line"):
        parse_response_head(b"HTTP/1.1 200 OK\r\n" + field)


def test_field_values_may_hold_tabs_colons_and_obs_text():
    head = b"HTTP/1.1 200 OK\r\nA:\tx:y \xe9\xff\t\r\nB~!#$%&'*+-.^_`|:z"
    assert parse_response_head(head)[3] == [(b"A", b"x:y \xe9\xff"), (b"B~!#$%&'*+-.^_`|", b"z")]


def test_response_head_fields_are_split_and_stripped():
    assert parse_response_head(b"HTTP/1.1 204\r\nA:  1 \r\nB:") == (
        b"HTTP/1.1", 204, b"", [(b"A", b"1"), (b"B", b"")])


@pytest.mark.parametrize("fields", [
    [(b"Content-Length", b"x")], [(b"Content-Length", b"1"), (b"Content-Length", b"2")],
])
def test_bad_content_length_is_refused(fields):
    with pytest.raises(UpstreamError):
        response_framing(b"HTTP/1.1", fields)


# -- request headers --------------------------------------------------------------------------


def request_with(*fields: tuple[bytes, bytes]) -> SimpleNamespace:
    headers = RequestFields()
    for name, value in fields:
        headers.add(name, value)
    return SimpleNamespace(requestHeaders=headers)


def test_rebuilt_fields_are_held_back_and_returned():
    lines, hosts, forwarded_for, request_id = split_request_headers(request_with(
        (b"Host", b"a"), (b"X-Forwarded-For", b"1.1.1.1"), (b"X-Request-ID", b"r1"),
        (b"Accept", b"*/*"), (b"Keep-Alive", b"5"), (b"Content-Length", b"3")))
    assert lines == [b"Accept: */*\r\n"]
    assert (hosts, forwarded_for, request_id) == ([b"a"], [b"1.1.1.1"], b"r1")


def test_fields_named_by_connection_stay_behind_and_upgrade_goes_on():
    lines, *_ = split_request_headers(request_with(
        (b"Connection", b"Upgrade, X-Secret"), (b"Upgrade", b"websocket"),
        (b"X-Secret", b"s"), (b"Accept", b"a")))
    assert lines == [b"Accept: a\r\n", b"Connection: Upgrade\r\nUpgrade: websocket\r\n"]


def test_connection_without_upgrade_token_does_not_forward_upgrade():
    lines, *_ = split_request_headers(request_with(
        (b"Connection", b"close"), (b"Upgrade", b"websocket")))
    assert lines == []


def test_forwarded_lines_extend_the_chain():
    assert forwarded_lines("10.0.0.1", [b"1.1.1.1"], b"https", b"id") == (
        b"X-Forwarded-For: 1.1.1.1, 10.0.0.1\r\nX-Forwarded-Proto: https\r\n"
        b"X-Request-ID: id\r\n")
    assert forwarded_lines("10.0.0.1", None, b"http", b"id").startswith(
        b"X-Forwarded-For: 10.0.0.1\r\n")


TRUSTED = (ipaddress.ip_network("10.0.0.0/8"),)


@pytest.mark.parametrize(("peer", "forwarded_for", "trusted", "client"), [
    ("10.0.0.1", [b"1.1.1.1"], (), "10.0.0.1"),
    ("8.8.8.8", [b"1.1.1.1"], TRUSTED, "8.8.8.8"),
    ("10.0.0.1", [b"1.1.1.1, 10.0.0.2"], TRUSTED, "1.1.1.1"),
    ("10.0.0.1", [b"2.2.2.2", b"1.1.1.1,10.0.0.9"], TRUSTED, "1.1.1.1"),
    ("10.0.0.1", [b"10.0.0.3"], TRUSTED, "10.0.0.1"),
    ("10.0.0.1", None, TRUSTED, "10.0.0.1"),
    ("10.0.0.1", [b"not-an-ip"], TRUSTED, "not-an-ip"),
    ("unix-socket", [b"1.1.1.1"], TRUSTED, "unix-socket"),
], ids=["untrusted-config", "untrusted-peer", "right-most-untrusted", "several-fields",
        "all-trusted", "no-header", "garbage-hop", "non-ip-peer"])
def test_client_address(peer, forwarded_for, trusted, client):
    assert client_address(peer, forwarded_for, trusted) == client


def test_expects_continue():
    assert expects_continue(request_with((b"Expect", b"100-Continue")))
    assert not expects_continue(request_with((b"Expect", b"something")))
    assert not expects_continue(request_with())


# -- client keys ------------------------------------------------------------------------------


def exchange_with(*fields: tuple[bytes, bytes], cookies: dict | None = None):
    request = request_with(*fields)
    request.received_cookies = cookies or {}
    return SimpleNamespace(request=request, client="10.0.0.1")


@pytest.mark.parametrize(("spec", "exchange", "key"), [
    ("ip", exchange_with((b"X-Key", b"k")), "10.0.0.1"),
    ("header:X-Key", exchange_with((b"X-Key", b"k\xc3\xa9")), "ké"),
    ("header:X-Key", exchange_with((b"X-Key", b"k\xe9")), "ké"),
    ("header:X-Key", exchange_with(), "10.0.0.1"),
    ("header:X-Key", exchange_with((b"X-Key", b"")), "10.0.0.1"),
    ("cookie:s", exchange_with(cookies={b"s": b"abc"}), "abc"),
    ("cookie:s", exchange_with(cookies={b"t": b"abc"}), "10.0.0.1"),
], ids=["ip", "utf-8", "latin-1", "missing-header", "empty-header", "cookie", "missing-cookie"])
def test_key_reader(spec, exchange, key):
    assert key_reader(spec)(exchange) == key


def test_overlong_key_is_a_digest():
    value = "é".encode() * (MAX_CLIENT_ID_LENGTH // 2 + 1)
    key = key_reader("header:X-Key")(exchange_with((b"X-Key", value)))
    assert key == key_digest(value)


def test_a_key_of_the_longest_length_is_itself_and_one_byte_more_a_digest():
    read = key_reader("header:X-Key")
    longest = b"k" * MAX_CLIENT_ID_LENGTH
    assert read(exchange_with((b"X-Key", longest))) == longest.decode()
    assert read(exchange_with((b"X-Key", longest + b"k"))) == key_digest(longest + b"k")


# -- admission --------------------------------------------------------------------------------


class FakeExchange:
    """What admission sees of an exchange, and what it was told."""

    def __init__(self) -> None:
        self.request = request_with()
        self.client = "10.0.0.1"
        self.limit_lines = b""
        self.rate_limit = "off"
        self.outcome = None

    def dispatch(self) -> None:
        self.outcome = "dispatched"

    def respond_locally(self, status, code, message, extra_headers=()) -> None:
        self.outcome = (status, code, extra_headers)


class FakeStore:
    """A bucket store answering each take with what the test gave it."""

    def __init__(self, answer) -> None:
        self.answer = answer
        self.taken: list[str] = []

    def take(self, client_id, default):
        self.taken.append(client_id)
        return self.answer

    take_now = take  # the limiter's hot path: the answers here are Deferreds


ALLOWED = Decision(True, 10, 9, 0, 1, 1)
REFUSED = Decision(False, 10, 0, 3, 3, 1)


def limiter(answer, **settings) -> tuple[RateLimiter, TrafficStats]:
    stats = TrafficStats(started=0)
    return RateLimiter(FakeStore(answer), RateLimitConfig(**settings), stats), stats


def test_admit_all_dispatches_and_adds_nothing():
    exchange = FakeExchange()
    ADMIT_ALL.admit(exchange)
    assert exchange.outcome == "dispatched"
    assert exchange.limit_lines == b"" and not ADMIT_ALL.owned_fields


def test_allowed_request_is_dispatched_with_its_fields():
    admission, _ = limiter(succeed(ALLOWED))
    exchange = FakeExchange()
    admission.admit(exchange)
    assert exchange.outcome == "dispatched" and exchange.rate_limit == "allowed"
    assert b"RateLimit" in exchange.limit_lines
    assert admission.store.taken == ["10.0.0.1"]
    assert admission.decisions["allowed"] == 1


def test_refused_request_is_429_and_counted():
    admission, stats = limiter(succeed(REFUSED))
    exchange = FakeExchange()
    admission.admit(exchange)
    assert exchange.outcome[:2] == (429, "rate_limited")
    assert stats.rate_limited == 1 and exchange.rate_limit == "limited"
    assert b"Retry-After: 3" in exchange.limit_lines


def test_no_bucket_is_unlimited():
    admission, _ = limiter(succeed(None))
    exchange = FakeExchange()
    admission.admit(exchange)
    assert exchange.outcome == "dispatched" and exchange.rate_limit == "unlimited"
    assert exchange.limit_lines == b""


def test_late_answer_goes_through_the_callback():
    pending: Deferred = Deferred()
    admission, _ = limiter(pending)
    exchange = FakeExchange()
    admission.admit(exchange)
    assert exchange.outcome is None
    pending.callback(ALLOWED)
    assert exchange.outcome == "dispatched"


@pytest.mark.parametrize(("on_error", "outcome"), [
    ("allow", "dispatched"),
    ("deny", (503, "store_unavailable", ((b"Retry-After", b"1"),))),
])
def test_store_outage_follows_on_store_error(on_error, outcome):
    admission, _ = limiter(fail(StoreUnavailable("down")), on_store_error=on_error)
    exchange = FakeExchange()
    admission.admit(exchange)
    assert exchange.outcome == outcome and exchange.rate_limit == "store_error"


def test_unexpected_store_failure_is_logged_and_treated_as_an_outage():
    admission, _ = limiter(fail(RuntimeError("bug")))
    exchange = FakeExchange()
    admission.admit(exchange)
    assert exchange.outcome == "dispatched" and exchange.rate_limit == "store_error"


def test_owned_fields_follow_the_header_mode():
    admission, _ = limiter(succeed(ALLOWED), headers="none")
    assert not admission.owned_fields
    admission.configure(RateLimitConfig(headers="both"))
    fields = admission.owned_fields
    assert fields and all(name == name.lower() for name in fields)
