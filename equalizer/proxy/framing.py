"""A backend's response head: parsed, checked and read for its framing.

Pure functions of the bytes the backend sent, so the rules (what a valid status line
and field line are, which framing wins, when a connection may be reused) are tested
without a connection.
"""

from __future__ import annotations

import re

from equalizer.proxy.headers import connection_tokens


class UpstreamError(Exception):
    """The backend broke HTTP: a response we cannot parse or relay."""


_FIELD_LINE = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t\x20-\x7e\x80-\xff]*"
_FIELD_LINES = re.compile(_FIELD_LINE + rb"(?:\r\n" + _FIELD_LINE + rb")*")
"""Header lines as RFC 9110 allows them: a token, a colon, a value without control
characters (so no CR or LF: nothing a client could read as another field). Checked
in one pass over the head, so the proxy can copy the fields to its client as they are."""


_REASON = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
"""A reason phrase as RFC 9112 4 allows it: HTAB, SP, visible and obs-text bytes."""


def parse_response_head(head: bytes) -> tuple[bytes, int, bytes, list[tuple[bytes, bytes]]]:
    """Split a response head into (version, status, reason, [(name, value), ...])."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or len(parts[1]) != 3 \
            or not parts[1].isdigit() or (len(parts) == 3 and _REASON.fullmatch(parts[2]) is None):
        # Three digits (int() would take "+20" or "2_0"); a reason without control
        # characters, since it is copied to the client: a bare LF there splits a response.
        raise UpstreamError(f"bad status line {lines[0][:80]!r}")
    status = int(parts[1])
    if not 100 <= status <= 999:
        raise UpstreamError(f"bad status code {status}")
    headers = []
    if len(lines) > 1:
        if _FIELD_LINES.fullmatch(head, len(lines[0]) + 2) is None:
            bad = next(line for line in lines[1:] if _FIELD_LINES.fullmatch(line) is None)
            raise UpstreamError(f"bad header line {bad[:80]!r}")
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers.append((name, value.strip()))
    return parts[0], status, parts[2] if len(parts) == 3 else b"", headers


def response_framing(version: bytes, headers: list[tuple[bytes, bytes]]
                     ) -> tuple[bool, int | None, bool, bytes]:
    """(chunked, content length or None, keep-alive, transfer codings other than chunked)
    from a response's headers.

    Transfer-Encoding overrides Content-Length (RFC 9112 6.3); a response carrying both
    may be a smuggling attempt, so its connection is not reused. Codings before the
    final ``chunked`` (``gzip, chunked``) are returned, as sent, for the exchange to
    keep: dropping them would hand the client gzip bytes as if they were the content.
    """
    length = None
    keep_alive = version == b"HTTP/1.1"
    transfer_codings = None
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"content-length":
            if not value.isdigit() or (length is not None and int(value) != length):
                raise UpstreamError("bad Content-Length")
            length = int(value)
        elif lowered == b"transfer-encoding":
            if transfer_codings is None:
                transfer_codings = []
            transfer_codings += [c.strip() for c in value.split(b",") if c.strip()]
        elif lowered == b"connection":
            tokens = connection_tokens((value,))
            if b"close" in tokens:
                keep_alive = False
            elif b"keep-alive" in tokens:
                keep_alive = True
    if transfer_codings is None:
        return False, length, keep_alive, b""
    return _transfer_framing(transfer_codings, length, keep_alive)


def _transfer_framing(codings: list[bytes], length: int | None, keep_alive: bool
                      ) -> tuple[bool, int | None, bool, bytes]:
    """The framing of a response with Transfer-Encoding: chunked if it is the final coding
    (applied once only, RFC 9112 7), else the body runs until the connection closes."""
    names = [coding.split(b";", 1)[0].strip().lower() for coding in codings]
    if b"chunked" in names[:-1]:
        raise UpstreamError("chunked is not the final transfer coding")
    chunked = bool(names) and names[-1] == b"chunked"
    others = b", ".join(codings[:-1] if chunked else codings)
    if length is not None or not chunked:
        keep_alive = False
    return chunked, None, keep_alive, others
