"""The adapter to Twisted: the only module that may reach its private names.

The proxy listener's factory: each accepted connection is a ``FrontConnection``
(``equalizer.proxy.front``), the proxy's own HTTP/1.1 server protocol. twisted.web
serves the admin API only; its channel, refusing a malformed request head in JSON, is
here (``HeadRefusingChannel``) because that takes twisted.web's private parser state.
So is the reactor equalizer runs on (``DirectEPollReactor``), which takes the epoll
reactor's.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from twisted.internet.interfaces import IProtocolNegotiationFactory
from twisted.internet.protocol import Factory
from twisted.internet.tcp import Connection
from twisted.logger import Logger
from twisted.web import http
from zope.interface import implementer

from equalizer.proxy.front import FrontConnection, refusal_response

try:
    from twisted.internet.epollreactor import EPollReactor
except ImportError:  # no epoll (not Linux): twistd's default reactor serves
    EPollReactor = None

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from equalizer.config.model import ProxyConfig
    from equalizer.proxy.exchange import Proxy

log = Logger()


class HeadRefusingChannel(http.HTTPChannel):
    """twisted.web's HTTP/1.1 channel, refusing a request head it cannot take in JSON.

    twisted.web answers a bare ``400 Bad Request`` with no body for every parser
    refusal, and closes silently on a line over ``MAX_LENGTH``. Here:

    - a request line over ``MAX_LENGTH`` (or over ``totalHeadersSize`` by itself) → 414
      ``uri_too_long`` (RFC 9110 15.5.15), as nginx does;
    - a header line over ``MAX_LENGTH``, a head over ``totalHeadersSize`` in all, or more
      than ``maxHeaders`` fields → 431 ``header_fields_too_large`` (RFC 6585 5; nginx
      uses a 400 of its own there);
    - any other refusal of the parser (a malformed request line, header line, length
      or chunk) → 400 ``bad_request``;

    each with the JSON error body of SPEC 4.4, then the connection closes. Twisted's
    private parser state (``_receivedHeaderSize``, ``_receivedHeaderCount``,
    ``_handlingRequest``, ``_respondToBadRequestAndDisconnect``,
    ``_command``) is used in this class only.
    """

    def lineLengthExceeded(self, line: bytes) -> None:
        """A line over ``MAX_LENGTH`` (LineReceiver would close without a word)."""
        if self._in_request_line():
            self.refuse_head(414, "uri_too_long",
                             f"the request line is over {self.MAX_LENGTH} bytes")
        else:
            self.refuse_head(431, "header_fields_too_large",
                             f"a header line is over {self.MAX_LENGTH} bytes")

    def _respondToBadRequestAndDisconnect(self) -> None:
        """Every refusal of twisted.web's parser comes here; its counters say which it was.

        Told apart after the fact rather than by overriding ``lineReceived`` and
        ``headerReceived``, which would cost a Python call per header line of every request.
        """
        if self._receivedHeaderSize > self.totalHeadersSize:
            if self._in_request_line():
                self.refuse_head(414, "uri_too_long",
                                 f"the request line is over {self.totalHeadersSize} bytes")
            else:
                self.refuse_head(431, "header_fields_too_large",
                                 f"the request head is over {self.totalHeadersSize} bytes")
        elif self._receivedHeaderCount > self.maxHeaders:
            self.refuse_head(431, "header_fields_too_large",
                             f"the request has more than {self.maxHeaders} header fields")
        elif self._handlingRequest:
            self.refuse_head(400, "bad_request", "the request body is malformed")
        elif self._in_request_line():
            self.refuse_head(400, "bad_request",
                             "the request line is not 'METHOD target HTTP/1.x'")
        else:
            self.refuse_head(400, "bad_request", "the request head or body framing is malformed")

    def _in_request_line(self) -> bool:
        """Whether the current request's line is not parsed yet: twisted.web sets ``_command``
        once it is, and deletes it when the request has been read."""
        return "_command" not in self.__dict__

    def refuse_head(self, status: int, code: str, message: str) -> None:
        """Answer ``status`` with the JSON error, then close: the rest of what the client
        sent cannot be told apart from a next request. Nothing is written when a response
        on this connection has begun already (a malformed chunk in a streamed upload)."""
        transport = self.transport
        if transport is None or transport.disconnecting:
            return
        if not any(request.startedWriting for request in self.requests):
            transport.write(refusal_response(status, code, message))
        self.persistent = False
        self.loseConnection()


@implementer(IProtocolNegotiationFactory)
class ProxySite(Factory):
    """The proxy listener's factory: one ``FrontConnection`` per client connection.

    ``max_header_bytes`` and ``timeOut`` (the idle timeout, None for none) apply to
    connections accepted after they change (a reload sets them).
    """

    noisy = False

    def __init__(self, proxy: Proxy, config: ProxyConfig, reactor: IReactorTime,
                 outbox: Outbox | None = None) -> None:
        self.proxy = proxy
        self.clock = reactor
        self.outbox = outbox or Outbox(reactor)
        self.max_header_bytes = config.max_header_bytes
        self.timeOut = config.timeouts.idle or None

    def buildProtocol(self, addr) -> FrontConnection:
        return FrontConnection(self)

    def writer(self, transport) -> Callable[[bytes], None]:
        """How the connection writes to ``transport``: through the ``Outbox``."""
        return self.outbox.writer(transport)

    def acceptableProtocols(self) -> list[bytes]:
        """What an ``ssl:`` listener offers over ALPN: HTTP/1.1 only.

        Without an answer here Twisted's ALPN callback finds no protocol in common
        with a client that offers one (every browser, curl) and the handshake fails.
        """
        return [b"http/1.1"]


class Outbox:
    """Writes to plain TCP connections, sent together at the end of the reactor's turn.

    Twisted's ``write`` only queues the bytes and asks the reactor to watch the socket
    for writability, so every response cost an epoll round (two ``epoll_ctl`` calls and
    a ``doWrite`` dispatch) before its first byte left. Sending each write at once
    instead (as asyncio does) made every send wake its receiver, the backend or the
    client, sleeping on the other core: on a virtual machine that wake-up is an
    interrupt across cores, and it took an eighth of the proxy's CPU (``perf``:
    ``sock_def_readable`` under ``send``). So the writes of one turn (the events of
    one ``epoll_wait``) wait in a list and are sent one after the other, each in one
    ``send``, once the turn is over: the first send of a burst wakes the receiver, the
    rest find it awake. Measured: 159 against 225 µs of CPU per request, 1.35x the
    requests a second (1 KiB, c=32, median of five paired runs).

    When the socket takes less than all, or Twisted still holds bytes for it, or it
    is closing, the rest goes through ``write`` as usual, so the order of bytes and
    back-pressure stay Twisted's. A connection about to close calls ``flush`` first:
    Twisted may close it before the turn is over. Other transports (TLS, the tests'
    in-memory ones) keep their ``write``.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._queued: list[tuple[Connection, bytes]] = []

    def writer(self, transport) -> Callable[[bytes], None]:
        """``transport``'s write: through this outbox for a plain TCP connection."""
        if not isinstance(transport, Connection):
            return transport.write
        queued = self._queued
        later = self._clock.callLater
        flush = self.flush

        def write_at_end_of_turn(data: bytes) -> None:
            if not queued:
                later(0, flush)
            queued.append((transport, data))

        return write_at_end_of_turn

    def flush(self) -> None:
        """Send what the turn wrote, in the order it was written."""
        queued = self._queued
        if not queued:
            return
        writes = queued[:]
        queued.clear()
        for transport, data in writes:
            if (transport._tempDataLen or len(transport.dataBuffer) > transport.offset
                    or transport.disconnecting or not transport.connected):
                transport.write(data)
                continue
            try:
                sent = transport.socket.send(data)
            except OSError:
                sent = 0  # Twisted sees the error on its own next try
            if sent < len(data):
                transport.write(data[sent:] if sent else data)


def accept_in_turn(port) -> None:
    """Make a listening ``port`` shared with other processes accept one connection per
    reactor turn.

    Twisted's ``Port.doRead`` accepts in a loop (``numberAccepts``, grown by 20 each time
    the loop ran full), so the worker that wakes first on a burst of connections (wrk's
    64, a browser's six, a client pool reconnecting) takes all of them and the other
    workers none: measured with two workers, one core stayed half idle in two runs out
    of five. One accept per turn leaves the rest to whichever worker turns next, and a
    busy worker turns less often, so connections go to the less busy (nginx's
    ``accept_mutex`` off, ``multi_accept`` off). ``numberAccepts`` is public; the
    per-turn reset is a rebinding of ``doRead``, hence here.
    """
    read = port.doRead

    def read_one() -> None:
        port.numberAccepts = 1
        read()

    port.doRead = read_one


if EPollReactor is not None:

    class DirectEPollReactor(EPollReactor):
        """Twisted's epoll reactor, calling each event's handler directly.

        The stock ``doPoll`` wraps every read and write event in
        ``log.callWithLogger``: the selectable's ``logPrefix()``, a context dict
        built, copied and pushed for ``twisted.python.log``'s ``system`` key, and
        popped again. That is about 9 % of a proxied request's instructions (callgrind,
        1k-c32: 349,638 against 384,467), for a key only legacy log events read.
        ``_doReadOrWrite`` already catches and logs whatever a handler raises and
        closes its connection, so only that: an exception escaping a connection's
        handler is logged without the connection's prefix (its traceback names it).
        """

        def doPoll(self, timeout: float | None) -> None:  # noqa: N802 (Twisted's name)
            """``EPollReactor.doPoll`` without the per-event log context."""
            try:
                events = self._poller.poll(-1 if timeout is None else timeout,
                                           len(self._selectables))
            except OSError as err:
                if err.errno == errno.EINTR:
                    return
                raise
            selectables = self._selectables
            handle = self._doReadOrWrite
            for fd, event in events:
                selectable = selectables.get(fd)
                if selectable is not None:
                    try:
                        handle(selectable, fd, event)
                    except KeyboardInterrupt:
                        raise
                    except BaseException:  # as callWithLogger: the other events go on
                        log.failure("handling an event of {selectable} failed",
                                    selectable=selectable)

        doIteration = doPoll


def install_reactor() -> bool:
    """Install :class:`DirectEPollReactor` as the global reactor; whether it was.

    Not when a reactor is installed already (``twistd -r NAME`` chose one, or something
    imported Twisted's default: klein does at import, so this runs before anything of
    the admin API is imported), nor without epoll."""
    if "twisted.internet.reactor" in sys.modules or EPollReactor is None:
        return False
    from twisted.internet.main import installReactor

    installReactor(DirectEPollReactor())
    return True
