"""Rules for a client's request head that a reverse proxy must enforce (RFC 9112, RFC 9110).

Pure functions on bytes, with no twisted.web in them: the proxy's exchange asks
them once per request, so the common case (``name`` or ``name:port``) is one
compiled-regex match.
"""

from __future__ import annotations

import ipaddress
import re

_COMMON_HOST = re.compile(rb"[A-Za-z0-9._~-]+(?::([0-9]{1,5}))?")
"""The usual Host, ``name[:port]`` in unreserved characters: the fast path of ``host_problem``."""

_NAME_CHARACTERS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset(b"0123456789ABCDEFabcdef")
_IPV6_CHARACTERS = frozenset(b"0123456789ABCDEFabcdef:.")

MAX_PORT = 65535

NOT_A_PATH = "the request target must be a path"
"""Asterisk-form (``OPTIONS *``), authority-form (CONNECT) and anything else that is
neither a path nor an absolute http(s) URI: this proxy is not a forward proxy."""


def _shown(value: bytes) -> str:
    """A client's bytes quoted for an error message: printable, and bounded."""
    text = value[:100].decode("latin-1")
    return repr(text) if len(value) <= 100 else repr(text) + "…"


def host_problem(value: bytes) -> str | None:
    """What makes ``value`` no valid Host (``uri-host [":" port]``), or None when it is one.

    RFC 9110 7.2 and RFC 9112 3.2 (a server MUST answer 400 to an invalid Host), with
    the grammar of RFC 3986 3.2.2-3.2.3. Stricter than that grammar where a real host
    never needs the freedom and a backend could be hurt by it:

    - reg-name: unreserved characters (letters, digits, ``-._~``) and well-formed
      ``%HH``; the sub-delims ``!$&'()*+,;=`` are refused, as no DNS name or address
      contains them and they are what turns a Host into an injection in a backend's
      URLs, headers or logs. An IPv4 address is a reg-name too.
    - ``[IPv6]`` only: IPvFuture (``[v1.x]``) and zone ids (``%25eth0``) are refused.
    - the port, if given, is 1 to 5 digits up to 65535; ``host:`` (empty port) is refused.
    - an empty Host (or a port with no host) is refused: an http(s) URI always has a
      host (RFC 9110 4.2.1 says to reject one without), and nginx refuses it too.
    """
    common = _COMMON_HOST.fullmatch(value)
    if common is not None:
        port = common.group(1)
        if port is None or int(port) <= MAX_PORT:
            return None
        return f"Host {_shown(value)}: port {int(port)} is over {MAX_PORT}"
    return _uncommon_host_problem(value)


def valid_host(value: bytes) -> bool:
    """Whether ``value`` is a Host this proxy passes on (see ``host_problem``)."""
    return host_problem(value) is None


def _uncommon_host_problem(value: bytes) -> str | None:
    shown = _shown(value)
    if not value:
        return "the Host header is empty"
    if b"@" in value:
        return f"Host {shown}: user information ('user@') is not allowed"
    if value.startswith(b"["):
        end = value.find(b"]")
        if end < 0:
            return f"Host {shown}: the IPv6 literal has no closing ']'"
        literal, rest = value[1:end], value[end + 1:]
        if literal[:1] in (b"v", b"V"):
            return f"Host {shown}: IPvFuture literals are not accepted"
        if not literal or not set(literal) <= _IPV6_CHARACTERS:
            return f"Host {shown}: not an IPv6 address in brackets"
        try:
            ipaddress.IPv6Address(literal.decode("ascii"))
        except ValueError:
            return f"Host {shown}: not an IPv6 address in brackets"
        if not rest:
            return None
        if rest[:1] != b":":
            return f"Host {shown}: only ':port' may follow the IPv6 address"
        return _port_problem(rest[1:], shown)
    if value.count(b":") > 1:
        return f"Host {shown}: an IPv6 address must be in brackets, with one ':port' after"
    name, colon, port = value.partition(b":")
    if not name:
        return f"Host {shown}: no host name"
    problem = _name_problem(name, shown)
    if problem is not None:
        return problem
    return _port_problem(port, shown) if colon else None


def _name_problem(name: bytes, shown: str) -> str | None:
    i = 0
    while i < len(name):
        byte = name[i]
        if byte == 0x25:  # %HH
            if len(name) < i + 3 or name[i + 1] not in _HEX or name[i + 2] not in _HEX:
                return f"Host {shown}: '%' must start a %HH escape"
            i += 3
            continue
        if byte not in _NAME_CHARACTERS:
            return f"Host {shown}: character {chr(byte)!r} is not allowed in a host name"
        i += 1
    return None


def _port_problem(port: bytes, shown: str) -> str | None:
    if not port:
        return f"Host {shown}: empty port after ':'"
    if not port.isdigit() or not port.isascii():
        return f"Host {shown}: the port must be digits only"
    if len(port) > 5 or int(port) > MAX_PORT:
        return f"Host {shown}: port {port.decode('ascii')} is over {MAX_PORT}"
    return None


def split_absolute_target(target: bytes) -> tuple[bytes, bytes] | str:
    """An absolute-form target's ``(authority, origin-form)``, or what makes it unusable.

    RFC 9112 3.2.2: a server MUST accept absolute-form (``GET http://host/p?q HTTP/1.1``),
    and 3.2.3: it then MUST use the target's authority as the host, ignoring the
    Host header. The backend gets the origin-form (path and query; an empty path is
    ``/``, RFC 9112 3.2.1). Only http and https (any case) are accepted; user
    information in the authority is refused (RFC 9110 4.2.4: a sender MUST NOT send
    it), and the authority must be a valid Host (``host_problem``). Anything not
    absolute-form at all (``*``, ``host:port``) is ``NOT_A_PATH``.
    """
    scheme, sep, rest = target.partition(b"://")
    if not sep or not scheme.isalpha() or not scheme.isascii():
        return NOT_A_PATH
    if scheme.lower() not in (b"http", b"https"):
        return f"the request target's scheme {_shown(scheme)} is not http or https"
    if b"#" in rest:
        return "the request target must not carry a fragment ('#')"
    end = len(rest)
    for delimiter in (b"/", b"?"):
        found = rest.find(delimiter)
        if 0 <= found < end:
            end = found
    authority, path = rest[:end], rest[end:]
    if b"@" in authority:
        return "the request target must not carry user information ('user@')"
    if not authority:
        return "the request target has no host"
    problem = host_problem(authority)
    if problem is not None:
        return "the request target's authority: " + problem.removeprefix("Host ")
    if not path.startswith(b"/"):
        path = b"/" + path
    return authority, path
