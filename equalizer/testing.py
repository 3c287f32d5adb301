"""Fakes the unit tests share: drive a site over an in-memory connection, a store whose
start-up and availability the test decides.

Nothing here opens a socket or reads a clock: a test hands in a
``twisted.internet.testing.MemoryReactorClock`` (or ``Clock``) and advances it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import attrs
from attrs import define, field
from twisted.internet.defer import Deferred, fail
from twisted.internet.testing import StringTransport
from twisted.web.server import Site

from equalizer.balancer.pool import Backend
from equalizer.buckets.interface import StoreUnavailable
from equalizer.buckets.memory import MemoryStore
from equalizer.proxy.upstream import UpstreamConnection


@attrs.frozen
class Response:
    """One HTTP/1.1 response as a client read it off the wire."""

    status: int
    headers: dict[bytes, bytes]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def send(site: Site, method: str, path: str, body: bytes = b"",
         headers: Iterable[tuple[str, str]] = (), host: str = "admin") -> Response:
    """Send one request to ``site`` over a StringTransport; its response, which must be
    complete (every Deferred the site waits on has fired)."""
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}",
             *(f"{name}: {value}" for name, value in headers)]
    channel.dataReceived("\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + body)
    return parse_response(transport.value())


def parse_response(data: bytes) -> Response:
    """A raw HTTP/1.1 response (length-delimited or chunked) as a Response."""
    head, separator, rest = data.partition(b"\r\n\r\n")
    if not separator:
        raise AssertionError(f"no complete response head: {data[:200]!r}")
    status_line, *header_lines = head.split(b"\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        body = b""
        while True:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            body, rest = body + rest[:size], rest[size + 2:]
    else:
        body = rest[:int(headers.get(b"content-length", len(rest)))]
    return Response(int(status_line.split(b" ", 2)[1]), headers, body)


class FakeStore(MemoryStore):
    """A memory store that can be down: while ``available`` is False every bucket call
    fails with StoreUnavailable. ``attempts`` holds one Deferred per ``start()``, left
    for the test to fire when ``manual_start`` (a database's first connection attempt)."""

    def __init__(self, clock: Any, *, manual_start: bool = False) -> None:
        super().__init__(clock)
        self.available = not manual_start
        self.manual_start = manual_start
        self.attempts: list[Deferred[None]] = []
        self.stopped = False

    def start(self) -> Deferred[None]:
        if not self.manual_start:
            return super().start()
        attempt: Deferred[None] = Deferred()
        self.attempts.append(attempt)
        return attempt.addCallback(self._connected)

    def _connected(self, result: None) -> None:
        self.available = True

    def stop(self) -> Deferred[None]:
        self.stopped = True
        return super().stop()

    def _down(self) -> Deferred[Any]:
        return fail(StoreUnavailable("the fake store is down"))

    def create(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        return super().create(*args, **kwargs) if self.available else self._down()

    def get(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        return super().get(*args, **kwargs) if self.available else self._down()

    def list(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        return super().list(*args, **kwargs) if self.available else self._down()

    def update(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        return super().update(*args, **kwargs) if self.available else self._down()

    def delete(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        return super().delete(*args, **kwargs) if self.available else self._down()


# -- the proxy ------------------------------------------------------------------------------


@define
class FakeUpstreams:
    """The proxy's UpstreamPool as a test drives it: idle connections the test put there,
    and connects that wait for the test."""

    idle: dict = field(factory=dict)
    connects: list[tuple[Backend, Deferred]] = field(factory=list)
    released: list[UpstreamConnection] = field(factory=list)

    def get_idle(self, backend: Backend) -> UpstreamConnection | None:
        connections = self.idle.get(backend)
        if connections:
            connection = connections.pop()
            connection.reused = True
            return connection
        return None

    def connect(self, backend: Backend) -> Deferred:
        d: Deferred = Deferred()
        self.connects.append((backend, d))
        return d

    def release(self, connection: UpstreamConnection) -> None:
        self.released.append(connection)

    def forget(self, connection: UpstreamConnection) -> None:
        pass


@define
class FakePassive:
    """The health monitor as the proxy reports to it: what it heard, kept."""

    failures: list[tuple[Backend, str]] = field(factory=list)
    kinds: list[str] = field(factory=list)
    successes: int = 0

    def record_connect_failure(self, backend: Backend, reason: str,
                               kind: str = "connect") -> None:
        self.failures.append((backend, reason))
        self.kinds.append(kind)

    def record_connect_success(self, backend: Backend) -> None:
        self.successes += 1
