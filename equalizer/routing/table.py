"""The route table, compiled once per (re)load (see :class:`RouteTable`): the proxy asks
it once per request, and only when routes are configured."""

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


MAX_CLASSES = 4096
"""Request classes whose path matcher is kept; past it a class is matched route by route."""

Key = tuple[Any, ...]
"""A request's class: method, host and header values as far as any route tells them apart."""


class RouteTable:
    """Routes in order, compiled; :meth:`match` gives the first that matches a request.

    A request's method, host and watched header values sort it into a class: the value
    itself when some route names it, else "none of them". Every route either admits a
    whole class or none of it, so per class only the path is left to test: the class's
    candidate routes become one regular expression of their path prefixes, in order
    (the engine tries alternatives left to right, skipping in C those whose first
    character differs: first match wins), compiled when the class is first seen and
    kept (at most :data:`MAX_CLASSES`; they are bounded by the configuration anyway).
    """

    def __init__(self, routes: tuple[RouteConfig, ...], units: Mapping[str, PoolUnit],
                 policies: Mapping[str, Any]) -> None:
        self.routes = [Route(index, route, units[route.pool],
                             None if route.rate_limit is None else policies[route.rate_limit])
                       for index, route in enumerate(routes)]
        self._configs = routes
        self.default_unit = units["default"]
        self.default_policy = policies.get("default")
        hosts = {route.match.host for route in routes if route.match.host}
        self._exact = {host.encode("ascii") for host in hosts if not host.startswith("*.")}
        self._wildcards = {host[1:].encode("ascii") for host in hosts if host.startswith("*.")}
        self._methods = {m.encode("ascii") for route in routes for m in route.match.methods}
        names = sorted({name.lower() for route in routes for name, _ in route.match.headers})
        self.header_names = [name.encode("latin-1") for name in names]
        self._values = [{value.encode("latin-1") for route in routes
                         for field, value in route.match.headers if field.lower() == name}
                        for name in names]
        self._classes: dict[Key, tuple[Any, list[Route]]] = {}

    def match(self, method: bytes, host: bytes | None, path: bytes,
              headers: Headers) -> Route | None:
        """The first route whose every condition holds, or None."""
        key = self._key(method, host, headers)
        matcher = self._classes.get(key)
        if matcher is None:
            matcher = self._matcher(key)
        test, candidates = matcher
        if test is None:
            return None
        found = test(path[1:])
        return None if found is None else candidates[found.lastindex - 1]

    def _key(self, method: bytes, host: bytes | None, headers: Headers) -> Key:
        exact = matched = values = None
        if self._exact or self._wildcards:
            bare = bare_host(host)
            if bare in self._exact:
                exact = bare
            wildcards = self._wildcards
            if wildcards:
                matched = tuple(bare[i:] for i in range(1, len(bare))
                                if bare[i] == 46 and bare[i:] in wildcards)  # 46: "."
        if self.header_names:
            values = []
            for name, known in zip(self.header_names, self._values, strict=True):
                found = headers.getRawHeaders(name)
                value = b", ".join(found) if found else None
                values.append(value if value in known else None)
            values = tuple(values)
        return (method if method in self._methods else None, exact, matched, values)

    def _matcher(self, key: Key) -> tuple[Any, list[Route]]:
        """The path test of a class and its candidate routes (kept for the next request)."""
        candidates = [route for route, config in zip(self.routes, self._configs, strict=True)
                      if _admits(config, key, self.header_names)]
        # Each alternative ends with an empty group, whose number (``lastindex``) says
        # which matched; a group around it would hide its first character from the
        # engine's quick check of each alternative.
        pattern = b"|".join(
            re.escape(prefix[1:].encode("latin-1")) + b"()" if prefix else b"()"
            for prefix in (self._configs[route.index].match.path_prefix
                           for route in candidates))
        matcher = (re.compile(pattern).match if candidates else None, candidates)
        if len(self._classes) < MAX_CLASSES:
            self._classes[key] = matcher
        return matcher


def _admits(config: RouteConfig, key: Key, header_names: list[bytes]) -> bool:
    """Whether every request of class ``key`` meets the route's conditions but the path."""
    match = config.match
    method, exact, wildcards, values = key
    if match.methods and (method is None or method.decode("ascii") not in match.methods):
        return False
    host = match.host
    if host is not None:
        wanted = host.encode("ascii")
        if not (wanted == exact or (host.startswith("*.") and wanted[1:] in (wildcards or ()))):
            return False
    by_name = dict(zip(header_names, values or (), strict=True))
    return all(by_name[name.lower().encode("latin-1")] == value.encode("latin-1")
               for name, value in match.headers)


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
