"""Header rules of the proxy, in one place: which fields describe one connection only,
how ``Connection`` is read, and the fields the proxy adds for its backends.

Both directions use them: the request going to a backend, the response coming back,
the backend client's keep-alive decision and the client channel's persistence check.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from equalizer.proxy.client import ClientRequest as Request

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
    b"trailer", b"transfer-encoding", b"upgrade", b"proxy-connection",
})
"""Headers that describe one connection, not the message: never forwarded."""

REBUILT_REQUEST_HEADERS = HOP_BY_HOP | {
    b"host", b"content-length", b"expect", b"x-forwarded-for", b"x-forwarded-proto",
    b"x-forwarded-host", b"x-request-id",
}
"""Request headers the proxy writes itself rather than copying."""

INFORMATIONAL_DROPPED = HOP_BY_HOP | {b"content-length"}
"""Fields of a backend's 1xx that do not go on: they describe its connection, or a body
a 1xx never has (RFC 9110 8.6)."""


def connection_tokens(values: Iterable[bytes]) -> set[bytes]:
    """The options of ``Connection`` field values: comma-separated tokens, case-insensitive
    (RFC 9110 7.6.1). ``close`` is a token, not a substring: ``x-not-closed`` is not it."""
    return {token.strip().lower() for value in values for token in value.split(b",")}


def split_request_headers(request: Request
                          ) -> tuple[list[bytes], list[bytes] | None, list[bytes] | None,
                                     bytes | None]:
    """The request's end-to-end header lines as they go to a backend, and the fields the
    proxy rebuilds itself: (lines, Host values, X-Forwarded-For values, X-Request-ID).

    Fields the client's ``Connection`` names are hop-by-hop too and stay behind; an
    upgrade the client asked for goes on as ``Connection: Upgrade``.
    """
    lines = []
    host = forwarded_for = request_id = named = None
    for name, values in request.requestHeaders.getAllRawHeaders():
        lowered = name.lower()
        if lowered in REBUILT_REQUEST_HEADERS:
            if lowered == b"host":
                host = values
            elif lowered == b"x-forwarded-for":
                forwarded_for = values
            elif lowered == b"x-request-id":
                request_id = values[0]
            elif lowered == b"connection":
                named = connection_tokens(values)
            continue
        for value in values:
            lines.append(b"%s: %s\r\n" % (name, value))
    if named:
        lines = [line for line in lines if line.split(b":", 1)[0].lower() not in named]
        upgrade = request.requestHeaders.getRawHeaders(b"upgrade")
        if upgrade and b"upgrade" in named:
            lines.append(b"Connection: Upgrade\r\nUpgrade: %s\r\n" % upgrade[0])
    return lines, host, forwarded_for, request_id


def forwarded_lines(peer: str, forwarded_for: list[bytes] | None, scheme: bytes,
                    request_id: bytes) -> bytes:
    """X-Forwarded-For (the chain so far plus the peer), X-Forwarded-Proto and X-Request-ID,
    as header lines ending in CRLF."""
    address = peer.encode("ascii")
    chain = b", ".join(forwarded_for + [address]) if forwarded_for else address
    return b"X-Forwarded-For: %s\r\nX-Forwarded-Proto: %s\r\nX-Request-ID: %s\r\n" % (
        chain, scheme, request_id)


def client_address(peer: str, forwarded_for: list[bytes] | None,
                   trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> str:
    """The client's address: the peer, or behind trusted proxies the right-most untrusted hop.

    A header from an untrusted peer is ignored, so a client cannot choose its own
    rate-limit key by sending X-Forwarded-For.
    """
    if not trusted or not _is_trusted(peer, trusted):
        return peer
    hops = [hop.strip() for value in forwarded_for or () for hop in value.split(b",")]
    for hop in reversed(hops):
        address = hop.decode("latin-1")
        if not _is_trusted(address, trusted):
            return address
    return peer


def _is_trusted(address: str, trusted: tuple) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)


def expects_continue(request: Request) -> bool:
    """Whether the request asks for ``Expect: 100-continue`` (the proxy answers it itself,
    for an HTTP/1.1 request, when the request is first in line)."""
    expect = request.requestHeaders.getRawHeaders(b"expect")
    return bool(expect) and expect[0].lower() == b"100-continue"
