"""What the client gets back: the response head (a backend's, relayed, or the proxy's
own) and the one JSON shape of every answer the proxy makes itself (SPEC 4.4)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from twisted.web.http import NO_BODY_CODES

from equalizer.proxy.headers import (
    HOP_BY_HOP,
    INFORMATIONAL_DROPPED,
    connection_tokens,
)

if TYPE_CHECKING:
    from equalizer.proxy.exchange import Exchange

JSON_HEADERS = ((b"Content-Type", b"application/json"), (b"Cache-Control", b"no-store"))

OWN_REASONS = {429: b"Too Many Requests", 414: b"URI Too Long",
               431: b"Request Header Fields Too Large"}
"""Reason phrases of statuses the proxy answers itself that twisted.web does not know."""


def error_body(code: str, message: str) -> bytes:
    """The one JSON shape of every answer the proxy makes itself (SPEC 4.4)."""
    return json.dumps({"error": {"code": code, "message": message}}).encode("utf-8")


def write_head(exchange: Exchange, status: int, reason: bytes,
               headers: list[tuple[bytes, bytes]], chunked: bool, codings: bytes = b"", *,
               hold: bool = False) -> None:
    """Send the response head to the client, in one write.

    The backend's fields were checked by the upstream parser (token names, no
    control characters in values), so they go out as they came, less the
    hop-by-hop ones. ``Transfer-Encoding: chunked`` goes to an HTTP/1.1 client when
    the length is unknown, and ``Connection: close`` when the connection closes after
    this response: as asked, or because the request's body has not ended (RFC 9112 9.6;
    its rest could not be told from a next request). Transfer codings other than chunked
    (``codings``) stay in that field, ahead of chunked; a 204 never carries
    Content-Length (RFC 9110 8.6). With ``hold``, the head waits for the first body bytes
    or the end of the response, which are due in the same turn of the reactor: one send
    instead of two (on loopback each send also runs the receiver's side of TCP).
    """
    request = exchange.request
    proxy = exchange.proxy
    own = exchange.limit_lines
    owned = proxy.owned_fields if own else ()
    fields = []
    named = None
    request_id_seen = length_known = False
    for name, value in headers:
        lowered = name.lower()
        if lowered in HOP_BY_HOP:
            if lowered == b"connection":  # what it names goes too (hop-by-hop names: gone)
                tokens = connection_tokens((value,)) - HOP_BY_HOP
                named = tokens if named is None else named | tokens
            continue
        if lowered == b"content-length":
            if chunked or codings or status == 204:
                continue
            length_known = True
        elif lowered == b"x-request-id":
            request_id_seen = True
        elif lowered in owned:
            continue
        fields.append((name, value))
    if named:
        fields = [(name, value) for name, value in fields if name.lower() not in named]
        length_known = length_known and b"content-length" not in named
    if not request_id_seen:
        fields.append((b"X-Request-ID", exchange.request_id))
    route = exchange.route
    if route is not None and route.rewrites_response:
        fields = route.rewrite_response(fields)
    version = request.version
    if not request.body_done:  # the rest of the body cannot be told from a next request
        request.no_keep_alive()
    if version == b"HTTP/1.1":
        if not request.persistent:
            fields.append((b"Connection", b"close"))
        if not length_known and request.method != b"HEAD" and status not in NO_BODY_CODES:
            fields.append((b"Transfer-Encoding",
                           codings + b", chunked" if codings else b"chunked"))
            request.chunked = True
    request.head_sent = True
    # One joined write: the transport checks every piece of a writeSequence in a
    # Python call (four per field, a tenth of a proxied request's CPU in all). The
    # fields are joined in C (``map``), with no loop of ours; ``own`` is ready lines,
    # each ending in CRLF (or none). A route may have removed every field.
    head = b"%s %d %s\r\n%s%s%s\r\n" % (
        version, status, reason, b"\r\n".join(map(b": ".join, fields)),
        b"\r\n" if fields else b"", own)
    if hold:
        request.held_head = head
    else:
        request.send(head)


def relay_informational(exchange: Exchange, status: int, reason: bytes,
                        headers: list[tuple[bytes, bytes]]) -> None:
    """Relay a backend's 1xx (not 101) ahead of its final response.

    RFC 9110 15.2: a proxy MUST forward 1xx responses, but never to an HTTP/1.0
    client. A 100 Continue is not repeated when the proxy already sent its own
    for the client's ``Expect: 100-continue``.
    """
    request = exchange.request
    if exchange.finished or request.transport is None or request.version != b"HTTP/1.1" \
            or request.head_sent:
        return
    if status == 100 and request.expects_continue:
        return
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
    lines += [b"%s: %s\r\n" % (name, value) for name, value in headers
              if name.lower() not in INFORMATIONAL_DROPPED]
    lines.append(b"\r\n")
    request.send(b"".join(lines))
