"""Fakes the unit tests share: drive a site over an in-memory connection, a store whose
start-up and availability the test decides, a database that settles leased tokens.

Nothing here opens a socket or reads a clock: a test hands in a
``twisted.internet.testing.MemoryReactorClock`` (or ``Clock``) and advances it.
"""

from __future__ import annotations

import json
import select
from collections.abc import Iterable
from typing import Any

import attrs
from attrs import define, field
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IHalfCloseableDescriptor
from twisted.internet.testing import StringTransport
from twisted.web.server import Site
from zope.interface import implementer

from equalizer.balancer.pool import Backend
from equalizer.buckets.interface import StoreUnavailable
from equalizer.buckets.maths import refill
from equalizer.buckets.memory import MemoryStore
from equalizer.proxy.upstream import UpstreamConnection, transport_write
from equalizer.workers.leases import settle_in_memory


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


class FakeLeaseDatabase(MemoryStore):
    """A PostgresStore as token leasing sees it: a MemoryStore (the admin calls) that also
    answers settlements (``leases().settle``) with the arithmetic of their SQL.

    ``settlements`` records each statement's rows by key (waiting, extra, given back,
    default capacity). While ``hold`` is True statements wait in ``held`` until
    ``answer()`` runs the oldest one, on the rows as they are then (as a statement that
    reaches the database after an admin write would). ``failing`` fails every
    statement; keys in ``hidden`` are neither found nor created.
    """

    def __init__(self, clock: Any) -> None:
        super().__init__(clock)
        self.hold = False
        self.held: list[tuple[str, Deferred[Any]]] = []
        self.settlements: list[dict[str, tuple[int, int, int, int | None]]] = []
        self.failing: Exception | None = None
        self.hidden: set[str] = set()
        self.stopped = False

    def stop(self) -> Deferred[None]:
        self.stopped = True
        return super().stop()

    def leases(self) -> FakeLeaseDatabase:
        """The settlements' database: this fake answers them itself."""
        return self

    def settle(self, batch: list[Any]) -> Deferred[list[tuple[Any, ...]]]:
        text = json.dumps(batch, ensure_ascii=False)  # as the real statement's parameter
        self.settlements.append({c: (w, e, b, d) for c, w, e, b, d, _ in json.loads(text)})
        if self.failing is not None:
            return fail(self.failing)
        if self.hold:
            d: Deferred[list[tuple[Any, ...]]] = Deferred()
            self.held.append((text, d))
            return d
        return succeed(self._apply(text))

    def answer(self) -> None:
        """Run and answer the oldest held settlement."""
        text, d = self.held.pop(0)
        d.callback(self._apply(text))

    def tokens(self, client_id: str) -> float:
        """The tokens of the client's row, as of now."""
        stored, _ = self.buckets[client_id]
        return refill(stored, self._clock.seconds()).tokens

    def _apply(self, text: str) -> list[tuple[Any, ...]]:
        batch = [entry for entry in json.loads(text) if entry[0] not in self.hidden]
        return settle_in_memory(self, batch, self._clock.seconds())


class SlowReadsDatabase(FakeLeaseDatabase):
    """A FakeLeaseDatabase whose bucket reads wait in ``reads`` until ``answer_read()``,
    which answers the oldest with the row as of then (as a database would)."""

    def __init__(self, clock: Any) -> None:
        super().__init__(clock)
        self.reads: list[tuple[str, str, Deferred[Any]]] = []

    def get(self, client_id: str, policy: str = "default") -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.reads.append((client_id, policy, d))
        return d

    def answer_read(self) -> None:
        client_id, policy, d = self.reads.pop(0)
        MemoryStore.get(self, client_id, policy).chainDeferred(d)


# -- the proxy ------------------------------------------------------------------------------


@implementer(IHalfCloseableDescriptor)
class HalfCloseableTransport(StringTransport):
    """A StringTransport that can close its sending side alone, as a TCP connection can
    (TLS cannot): ``write_closed`` once asked to."""

    write_closed = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True


@define
class FakeUpstreams:
    """The proxy's UpstreamPool as a test drives it: idle connections the test put there,
    and connects that wait for the test."""

    idle: dict = field(factory=dict)
    connects: list[tuple[Backend, Deferred]] = field(factory=list)
    released: list[UpstreamConnection] = field(factory=list)
    poller: select.poll = field(factory=select.poll)
    writer = staticmethod(transport_write)

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
