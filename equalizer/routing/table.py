"""The route table, compiled once per (re)load into one regular expression.

Each route becomes one alternative of a single pattern over a short subject
(the path, host and method, and then one value per header field any route looks
at, see :func:`_pattern`), in the routes' order: the regular expression engine tries the
alternatives left to right and stops at the first that matches, which is exactly
"first match wins", in C, whatever the number of routes. The proxy asks once per
request, and only when routes are configured.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from equalizer.config.model import RouteConfig

if TYPE_CHECKING:
    from twisted.web.http_headers import Headers

    from equalizer.proxy.exchange import Exchange
    from equalizer.routing.pools import PoolUnit


class Route:
    """What a matched route does to a request: its pool, its rate-limit policy (None:
    not limited) and the changes to the path and header fields."""

    __slots__ = ("index", "unit", "policy", "strip", "remove_request", "request_lines",
                 "remove_response", "response_fields", "rewrites_request", "rewrites_response")

    def __init__(self, index: int, config: RouteConfig, unit: PoolUnit, policy: Any) -> None:
        self.index = index
        self.unit = unit
        self.policy = policy
        prefix = config.match.path_prefix
        self.strip = prefix.encode("latin-1") if config.strip_prefix and prefix else None
        request, response = config.request_headers, config.response_headers
        self.remove_request = frozenset(
            name.lower().encode("latin-1") for name in (*request.remove, *dict(request.set)))
        self.request_lines = b"".join(
            b"%s: %s\r\n" % (name.encode("latin-1"), value.encode("latin-1"))
            for name, value in request.set)
        self.remove_response = frozenset(
            name.lower().encode("latin-1") for name in (*response.remove, *dict(response.set)))
        self.response_fields = [(name.encode("latin-1"), value.encode("latin-1"))
                                for name, value in response.set]
        self.rewrites_request = bool(self.remove_request or self.request_lines)
        self.rewrites_response = bool(self.remove_response or self.response_fields)

    def rewrite_request(self, lines: list[bytes]) -> list[bytes]:
        """The request's header lines (``Name: value\\r\\n``) with this route's changes."""
        remove = self.remove_request
        if remove:
            lines = [line for line in lines if line.split(b":", 1)[0].lower() not in remove]
        if self.request_lines:
            lines.append(self.request_lines)
        return lines

    def rewrite_response(self, fields: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """The response's fields with this route's changes."""
        remove = self.remove_response
        if remove:
            fields = [field for field in fields if field[0].lower() not in remove]
        return fields + self.response_fields


def bare_host(host: bytes | None) -> bytes:
    """The host of a Host value, lower-cased, without its port (``[::1]`` keeps brackets)."""
    if not host:
        return b""
    if host[:1] == b"[":
        return host.split(b"]", 1)[0].lower() + b"]"
    return host.split(b":", 1)[0].lower()


def _pattern(config: RouteConfig, header_names: list[str]) -> bytes:
    """One route's alternative over the subject ``path\nhost\nmethod`` (then one
    ``\n=value`` or ``\n!`` per header name), the path without its leading ``/``.

    Built so a route that does not match fails in a few steps: the path comes first,
    so a route with a path prefix starts with a literal character, which the regular
    expression engine checks before it even enters the alternative; and every ``any``
    part is possessive (``*+``), never backtracked into.
    """
    match = config.match
    prefix = match.path_prefix
    path = (re.escape(prefix[1:].encode("latin-1")) if prefix else b"") + ANY
    host = match.host
    if host is None:
        host_part = ANY
    elif host.startswith("*."):
        host_part = b"[^\n]*" + re.escape(host[1:].encode("ascii"))
    else:
        host_part = re.escape(host.encode("ascii"))
    methods = (b"(?:%s)" % b"|".join(re.escape(m.encode("ascii")) for m in match.methods)
               if match.methods else ANY)
    wanted = {name.lower(): value for name, value in match.headers}
    headers = b"".join(
        b"\n=" + re.escape(wanted[name].encode("latin-1")) if name in wanted else b"\n" + ANY
        for name in header_names)
    return b"%s\n%s\n%s%s" % (path, host_part, methods, headers)


ANY = b"[^\n]*+"
"""Any value of one part of the subject, taken whole (possessive: no backtracking)."""


class RouteTable:
    """Routes in order, compiled; :meth:`match` gives the first that matches a request."""

    def __init__(self, routes: tuple[RouteConfig, ...], units: Mapping[str, PoolUnit],
                 policies: Mapping[str, Any]) -> None:
        self.routes = [Route(index, route, units[route.pool],
                             None if route.rate_limit is None else policies[route.rate_limit])
                       for index, route in enumerate(routes)]
        self.default_unit = units["default"]
        self.default_policy = policies.get("default")
        names = sorted({name.lower() for route in routes for name, _ in route.match.headers})
        self.header_names = [name.encode("latin-1") for name in names]
        # Each alternative ends with an empty group, whose number (``lastindex``) says
        # which matched; a group around it would hide its first character from the
        # engine's quick check of each alternative.
        alternatives = b"|".join(_pattern(route, names) + b"()" for route in routes)
        self._match = re.compile(b"(?:%s)\\Z" % alternatives).match
        self._by_group = [None, *self.routes]

    def match(self, method: bytes, host: bytes | None, path: bytes,
              headers: Headers) -> Route | None:
        """The first route whose every condition holds, or None."""
        subject = b"%s\n%s\n%s" % (path[1:], bare_host(host), method)
        for name in self.header_names:
            values = headers.getRawHeaders(name)
            subject += b"\n=" + b", ".join(values) if values else b"\n!"
        found = self._match(subject)
        return None if found is None else self._by_group[found.lastindex]


def route_exchange(exchange: Exchange, host: bytes | None, lines: list[bytes]) -> list[bytes]:
    """Find the exchange's route (SPEC 8): its pool, the target the backend sees and the
    header lines it sends; no route and no default backends leave it no pool (404)."""
    request = exchange.request
    router = exchange.proxy.router
    route = router.match(exchange.method, host, request.path, request.requestHeaders)
    if route is None:
        if not router.default_unit.pool.backends:
            exchange.unit = None
        return lines
    exchange.route = route
    exchange.unit = route.unit
    strip = route.strip
    if strip is not None:
        target = exchange.target[len(strip):]
        exchange.target = target if target[:1] == b"/" else b"/" + target
    return route.rewrite_request(lines) if route.rewrites_request else lines
