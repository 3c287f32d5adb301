"""Connections to backends: a lean HTTP/1.1 client protocol and its keep-alive pool.

Why our own protocol rather than twisted.web's ``Agent``: a proxy only needs to
write a request head it has already built, stream a body, parse one response
head and hand on the body decoded from its framing. ``Agent`` wraps each of
those steps in Deferreds, producers and response objects, and measured no
faster than the stock proxy that opens a connection per request. This protocol
does the proxy's steps and nothing else, and the pool keeps its connections
alive between requests.
"""

from __future__ import annotations

import ipaddress
import select
import socket
from typing import TYPE_CHECKING, Any, Protocol

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.protocol import ClientFactory, connectionDone
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from equalizer.proxy.framing import UpstreamError, parse_response_head, response_framing

if TYPE_CHECKING:
    from collections.abc import Callable

    from twisted.internet.interfaces import IReactorTCP, IReactorTime

    from equalizer.balancer.pool import Backend

MAX_RESPONSE_HEAD = 65536
"""Bytes a backend's status line and headers may take; more is a broken backend."""

NO_BODY_STATUSES = frozenset({204, 304})

MAX_INFORMATIONAL = 32
"""1xx responses a backend may send before its final one; more is a broken (or hostile)
backend looping to keep the exchange alive, and the exchange fails (502)."""

class ResponseHandler(Protocol):
    """What an exchange hears from its backend connection."""

    def response_informational(self, status: int, reason: bytes,
                               headers: list[tuple[bytes, bytes]]) -> None: ...

    def response_head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]],
                      chunked: bool, codings: bytes) -> None: ...

    def response_body(self, data: bytes) -> None: ...

    def response_done(self) -> None: ...

    def response_failed(self, reason: Failure, response_started: bool) -> None: ...


class UpstreamConnection(TwistedProtocol):
    """One keep-alive HTTP/1.1 connection to a backend, used by one exchange at a time.

    The response is parsed by a small state machine: ``_head`` until the blank line, then
    one of ``_body_length``, ``_body_chunked`` or ``_body_until_close`` (which also carries
    an upgraded connection's bytes after a 101). The connection also serves as the push
    producer for the response body: the client side pauses it when its own socket is full.
    """

    def __init__(self, pool: UpstreamPool, backend: Backend) -> None:
        self.pool = pool
        self.backend = backend
        self.handler: ResponseHandler | None = None
        self.reused = False
        self.idle_since = 0.0
        self._buffer = b""
        self._receive = self._unexpected
        self._remaining = 0
        self._chunked_request = False
        self._request_complete = False
        self._response_started = False
        self._keep_alive = True
        self._head_request = False
        self._informational = 0
        self.received_any = False
        self.connected_lost = False
        self._socket: socket.socket | None = None

    def connectionMade(self) -> None:
        self._socket = _socket_of(self.transport)  # once: peer_closed runs on every reuse
        self.write = self.pool.writer(self.transport)

    # -- sending ---------------------------------------------------------------

    def send_head(self, head: bytes, handler: ResponseHandler, *, head_request: bool,
                  chunked_body: bool, body_follows: bool) -> None:
        """Start a request: its head now, its body (if any) through ``send_body``."""
        self.handler = handler
        self._buffer = b""
        self._receive = self._head
        self._response_started = False
        self._informational = 0
        self.received_any = False
        self._keep_alive = True
        self._head_request = head_request
        self._chunked_request = chunked_body
        self._request_complete = not body_follows
        self.write(head)

    def send_body(self, data: bytes) -> None:
        if self._chunked_request:
            self.write(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            self.write(data)

    def end_body(self) -> None:
        if self._chunked_request:
            self.write(b"0\r\n\r\n")
        self._request_complete = True

    # -- receiving ---------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        try:
            self._receive(data)
        except UpstreamError:
            self._fail(Failure())

    def _unexpected(self, data: bytes) -> None:
        """Bytes while no request is out: the backend is broken; drop the connection."""
        self._keep_alive = False
        self.transport.loseConnection()

    def _head(self, data: bytes) -> None:
        self.received_any = True
        buffer = self._buffer + data if self._buffer else data
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > MAX_RESPONSE_HEAD:
                raise UpstreamError("response head too large")
            self._buffer = buffer
            return
        self._buffer = b""
        rest = buffer[end + 4:]
        version, status, reason, headers = parse_response_head(buffer[:end])
        if 100 <= status < 200 and status != 101:
            self._informational_head(status, reason, headers, rest)
            return
        chunked, length, keep_alive, codings = response_framing(version, headers)
        self._response_started = True  # only now: a head we refuse is a 502, not a cut
        self._keep_alive = keep_alive
        if self._head_request or status in NO_BODY_STATUSES:
            length, chunked = 0, False
        self.body_in_hand = (bool(rest) or length == 0) and not chunked
        self.handler.response_head(status, reason, headers, chunked, codings)
        if self.handler is None:
            return
        if status == 101:
            # Switching protocols: from here on, bytes flow both ways until a side closes.
            self._keep_alive = False
            self._receive = self._body_until_close
        elif chunked:
            self._receive = self._body_chunked
            self._remaining = -1
        elif length is not None:
            self._remaining = length
            self._receive = self._body_length
            if length == 0:
                self._finish()
                if rest:
                    self._unexpected(rest)
                return
        else:
            self._keep_alive = False
            self._receive = self._body_until_close
        if rest:
            self._receive(rest)

    def _informational_head(self, status: int, reason: bytes,
                            headers: list[tuple[bytes, bytes]], rest: bytes) -> None:
        """A 1xx (not 101) goes to the exchange and the final head is still due; such a
        head has no body whatever its fields say (RFC 9112 6.3). Bounded in number."""
        self._informational += 1
        if self._informational > MAX_INFORMATIONAL:
            raise UpstreamError(f"more than {MAX_INFORMATIONAL} 1xx responses")
        self.handler.response_informational(status, reason, headers)
        if rest and self.handler is not None:
            self._head(rest)

    def _body_length(self, data: bytes) -> None:
        remaining = self._remaining
        if len(data) < remaining:
            self._remaining = remaining - len(data)
            self.handler.response_body(data)
            return
        self.handler.response_body(data[:remaining] if len(data) > remaining else data)
        self._remaining = 0
        self._finish()
        if len(data) > remaining:
            self._unexpected(data[remaining:])

    def _body_until_close(self, data: bytes) -> None:
        self.handler.response_body(data)

    def _body_chunked(self, data: bytes) -> None:
        """Decode chunked framing: ``_remaining`` is the chunk bytes still due,
        -1 while a size line is due, -2 while a chunk's CRLF is due, -3 in trailers."""
        buffer = self._buffer + data if self._buffer else data
        position = 0
        size = len(buffer)
        while position < size and self.handler is not None:
            remaining = self._remaining
            if remaining > 0:
                end = min(size, position + remaining)
                self._remaining = remaining - (end - position)
                self.handler.response_body(buffer[position:end])
                position = end
                if self._remaining == 0:
                    self._remaining = -2
                continue
            line_end = buffer.find(b"\r\n", position)
            if line_end < 0:
                if size - position > MAX_RESPONSE_HEAD:
                    raise UpstreamError("chunk framing line too long")
                break
            line = buffer[position:line_end]
            position = line_end + 2
            if remaining == -2:
                if line:
                    raise UpstreamError("chunk not followed by CRLF")
                self._remaining = -1
            elif remaining == -1:
                try:
                    chunk_size = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise UpstreamError("bad chunk size line") from None
                if chunk_size < 0:
                    raise UpstreamError("bad chunk size line")
                self._remaining = chunk_size if chunk_size else -3
            elif not line:
                self._buffer = b""
                self._finish()
                if position < size:
                    self._unexpected(buffer[position:])
                return
        self._buffer = buffer[position:]

    def _finish(self) -> None:
        """The response is complete: hand the connection back, then tell the exchange."""
        handler = self.handler
        self.handler = None
        self._receive = self._unexpected
        if self._keep_alive and self._request_complete:
            # The client side may have paused us (back-pressure) just as the body
            # ended; an idle connection must read, for the next response and to see
            # the backend close it.
            self.transport.resumeProducing()
            self.pool.release(self)
        else:
            self.transport.loseConnection()
        if handler is not None:
            handler.response_done()

    def _fail(self, reason: Failure) -> None:
        handler = self.handler
        self.handler = None
        self._receive = self._unexpected
        self.transport.abortConnection()
        if handler is not None:
            handler.response_failed(reason, self._response_started)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.connected_lost = True
        self.pool.forget(self)
        if self.handler is None:
            return
        if self._receive == self._body_until_close:
            self._finish()
        else:
            self._fail(reason)

    def peer_closed(self) -> bool:
        """Whether the backend closed this idle connection (or wrote to it unasked) in a way
        the reactor has not processed yet: one poll of the socket, with no wait.

        A backend that answers and closes without ``Connection: close`` leaves its FIN in the
        kernel while the reactor may already hand the connection to the next request; writing
        there would send a request nobody reads. True is proof that nothing of the next request
        can have reached the backend on this connection. Costs one system call per reuse.
        """
        sock = self._socket
        return self.connected_lost if sock is None else _has_input(self.pool.poller, sock.fileno())

    def abort(self) -> None:
        """Drop the connection and its exchange without telling the exchange."""
        self.handler = None
        self._receive = self._unexpected
        self.transport.abortConnection()

    # -- producer for the response body ------------------------------------------

    def pauseProducing(self) -> None:
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        self.abort()


def transport_write(transport: Any) -> Callable[[bytes], None]:
    """A transport's own write."""
    return transport.write


def _socket_of(transport: object) -> socket.socket | None:
    """The TCP socket under a transport (under TLS too), or None (a test's transport)."""
    for candidate in (transport, getattr(transport, "transport", None)):
        handle = getattr(candidate, "getHandle", None)
        if handle is not None:
            sock = handle()
            if isinstance(sock, socket.socket):
                return sock
    return None


def _has_input(poller: select.poll, fd: int) -> bool:
    """Whether ``fd`` has bytes, a FIN or an error to report: unusable either way.

    A poll with no wait rather than a non-blocking peek: a peek at nothing raises
    BlockingIOError, and building that exception cost as much again as the system call.
    """
    if fd < 0:
        return True  # the socket is closed
    poller.register(fd, select.POLLIN)
    try:
        return bool(poller.poll(0))
    finally:
        poller.unregister(fd)


class _ConnectionFactory(ClientFactory):
    """Builds one UpstreamConnection; quiet, since it runs for every new connection."""

    noisy = False

    def __init__(self, pool: UpstreamPool, backend: Backend) -> None:
        self.pool = pool
        self.backend = backend

    def buildProtocol(self, addr) -> UpstreamConnection:
        return UpstreamConnection(self.pool, self.backend)


class UpstreamPool(Service):
    """Keep-alive connections to every backend, most recently used first.

    Idle connections older than ``idle_timeout`` are closed by one sweep every
    second instead of a timer per connection, so reuse costs no timer work.
    """

    def __init__(self, reactor: IReactorTCP, clock: IReactorTime, *, connect_timeout: float,
                 idle_timeout: float, max_idle_per_backend: int = 128,
                 writer: Callable[[Any], Callable[[bytes], None]] | None = None) -> None:
        """``writer`` makes a connection's write from its transport (``site.Outbox``
        sends a turn's writes together at its end); without one, the transport's own."""
        self._reactor = reactor
        self.writer = writer or transport_write
        self._clock = clock
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.max_idle_per_backend = max_idle_per_backend
        self._idle: dict[Backend, list[UpstreamConnection]] = {}
        self._endpoints: dict[Backend, object] = {}
        self._sweeper = LoopingCall(self._sweep)
        self._sweeper.clock = clock
        self.poller = select.poll()  # for ``UpstreamConnection.peer_closed``, one fd at a time
        self.connections_made = 0
        self.stale_dropped = 0

    def configure(self, *, connect_timeout: float, idle_timeout: float) -> None:
        """New timeouts (reload): endpoints are rebuilt with the new connect timeout."""
        if connect_timeout != self.connect_timeout:
            self._endpoints.clear()
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout

    def startService(self) -> None:
        super().startService()
        self._sweeper.start(1.0, now=False)

    def stopService(self) -> None:
        """Stop sweeping and close every idle connection."""
        super().stopService()
        if self._sweeper.running:
            self._sweeper.stop()
        for connections in list(self._idle.values()):
            for connection in list(connections):
                connection.transport.loseConnection()
        self._idle.clear()

    def get_idle(self, backend: Backend) -> UpstreamConnection | None:
        """The most recently used idle connection the backend has not closed, if any.

        Connections the backend closed (or wrote to unasked) are dropped here, before
        a request goes out on them: see ``UpstreamConnection.peer_closed``.
        """
        connections = self._idle.get(backend)
        while connections:
            connection = connections.pop()
            if connection.peer_closed():
                self.stale_dropped += 1
                connection.transport.abortConnection()
                continue
            connection.reused = True
            return connection
        return None

    def connect(self, backend: Backend) -> defer.Deferred[UpstreamConnection]:
        """A new connection to ``backend``, failing after the connect timeout."""
        endpoint = self._endpoints.get(backend)
        if endpoint is None:
            endpoint = self._endpoints[backend] = self._endpoint_for(backend)
        self.connections_made += 1
        return endpoint.connect(_ConnectionFactory(self, backend))

    def _endpoint_for(self, backend: Backend) -> object:
        host = backend.host
        timeout = self.connect_timeout
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            endpoint = HostnameEndpoint(self._reactor, host, backend.port, timeout=timeout)
        else:
            endpoint_type = TCP6ClientEndpoint if address.version == 6 else TCP4ClientEndpoint
            endpoint = endpoint_type(self._reactor, host, backend.port, timeout=timeout)
        if backend.url.startswith("https:"):
            endpoint = wrapClientTLS(optionsForClientTLS(host), endpoint)
        return endpoint

    def release(self, connection: UpstreamConnection) -> None:
        """Keep a connection whose response is complete for the next request."""
        backend = connection.backend
        connections = self._idle.setdefault(backend, [])
        if connection.connected_lost or len(connections) >= self.max_idle_per_backend:
            connection.transport.loseConnection()
            return
        connection.idle_since = self._clock.seconds()
        connections.append(connection)

    def forget(self, connection: UpstreamConnection) -> None:
        """A connection closed: it must never be handed out again."""
        connections = self._idle.get(connection.backend)
        if connections and connection in connections:
            connections.remove(connection)

    def drop_backend(self, backend: Backend) -> None:
        """Close the idle connections of a backend that left the pool."""
        for connection in self._idle.pop(backend, []):
            connection.transport.loseConnection()
        self._endpoints.pop(backend, None)

    def idle_count(self, backend: Backend) -> int:
        return len(self._idle.get(backend, ()))

    def _sweep(self) -> None:
        deadline = self._clock.seconds() - self.idle_timeout
        for connections in self._idle.values():
            while connections and connections[0].idle_since < deadline:
                connections.pop(0).transport.loseConnection()
