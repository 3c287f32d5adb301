"""The adapter to twisted.web: the only module that knows its internals.

twisted.web's ``HTTPChannel`` parses the client side. Our ``ProxyRequest`` starts the
exchange as soon as the request head is parsed (twisted.web would otherwise buffer
the whole body before ``render``) and forwards each body chunk as it arrives. What
the proxy needs of the channel's private state (the parsed request line, refusals of
its parser, the bytes buffered when a connection is upgraded) is reached here and
offered to the rest of the proxy by public methods: ``request_line``, ``refuse_head``,
``hand_over``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from twisted.internet.interfaces import IProtocolNegotiationFactory
from twisted.web import http
from zope.interface import implementer

from equalizer.proxy.backpressure import CLIENT_BUFFER_BYTES
from equalizer.proxy.exchange import Exchange
from equalizer.proxy.headers import connection_tokens
from equalizer.proxy.response import JSON_HEADERS, OWN_REASONS, error_body

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime
    from twisted.python.failure import Failure

    from equalizer.config.model import ProxyConfig
    from equalizer.proxy.exchange import Proxy


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
    ``_command``/``_path``/``_version``,
    ``_dataBuffer``) is used in this class only, behind ``request_line`` and
    ``hand_over`` for the rest of the proxy.
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

    def request_line(self) -> tuple[bytes, bytes, bytes]:
        """The method, target and version of the request whose head was just parsed
        (twisted.web hands them to ``requestReceived`` only after the whole body)."""
        return self._command, self._path, self._version

    def hand_over(self, sink: Callable[[bytes], object]) -> bytes:
        """Stop parsing HTTP: from now on every byte the client sends goes to ``sink`` (an
        upgraded connection's other side), and no idle timeout applies. Returns what the
        client had sent after the request, parsed no further; the channel forgets it."""
        self.setTimeout(None)
        self.dataReceived = sink
        buffered = b"".join(self._dataBuffer)
        self._dataBuffer = []
        return buffered

    def refuse_head(self, status: int, code: str, message: str) -> None:
        """Answer ``status`` with the JSON error, then close: the rest of what the client
        sent cannot be told apart from a next request. Nothing is written when a response
        on this connection has begun already (a malformed chunk in a streamed upload)."""
        transport = self.transport
        if transport is None or transport.disconnecting:
            return
        if not any(request.startedWriting for request in self.requests):
            body = error_body(code, message)
            reason = OWN_REASONS.get(status) or http.RESPONSES[status]
            fields = [*JSON_HEADERS, (b"Content-Length", b"%d" % len(body)),
                      (b"Connection", b"close"), (b"Date", http.datetimeToString())]
            transport.write(b"HTTP/1.1 %d %s\r\n%s\r\n%s" % (
                status, reason, b"".join(b"%s: %s\r\n" % field for field in fields), body))
        self.persistent = False
        self.loseConnection()


class ProxyChannel(HeadRefusingChannel):
    """twisted.web's HTTP/1.1 channel, reading ``Connection`` as the comma list it is.

    ``HTTPChannel.checkPersistence`` splits the header on spaces only, so
    ``Connection: close, X-Foo`` would keep the connection open.
    """

    _peer = None
    _local = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self.transport.bufferSize = CLIENT_BUFFER_BYTES
        self.site.proxy.stats.connections += 1

    def connectionLost(self, reason: Failure) -> None:
        """One client connection fewer (``equalizer_client_connections``)."""
        self.site.proxy.stats.connections -= 1
        super().connectionLost(reason)

    def getPeer(self):
        """The peer address, read once per connection (Request asks on every request)."""
        if self._peer is None:
            self._peer = self.transport.getPeer()
        return self._peer

    def getHost(self):
        if self._local is None:
            self._local = self.transport.getHost()
        return self._local

    def checkPersistence(self, request, version):
        values = request.requestHeaders.getRawHeaders(b"connection") or ()
        if version == b"HTTP/1.1" and b"close" in connection_tokens(values):
            request.responseHeaders.setRawHeaders(b"Connection", [b"close"])
            return False
        return super().checkPersistence(request, version)


@implementer(IProtocolNegotiationFactory)
class ProxySite(http.HTTPFactory):
    """The listening side: twisted.web's HTTP/1.1 parser with our streaming request."""

    noisy = False

    protocol = ProxyChannel

    def __init__(self, proxy: Proxy, config: ProxyConfig, reactor: IReactorTime) -> None:
        super().__init__(timeout=config.timeouts.idle or None, reactor=reactor)
        self.proxy = proxy
        self.max_header_bytes = config.max_header_bytes

    def buildProtocol(self, addr):
        channel = super().buildProtocol(addr)
        channel.requestFactory = ProxyRequest
        channel.site = self
        channel.totalHeadersSize = self.max_header_bytes
        channel.MAX_LENGTH = self.max_header_bytes
        return channel

    def acceptableProtocols(self) -> list[bytes]:
        """What an ``ssl:`` listener offers over ALPN: HTTP/1.1 only.

        Without an answer here Twisted's ALPN callback finds no protocol in common
        with a client that offers one (every browser, curl) and the handshake fails.
        """
        return [b"http/1.1"]

    def log(self, request) -> None:
        """Access lines are the proxy's own (``Proxy.exchange_done``), with its fields."""


class ProxyRequest(http.Request):
    """A request that reaches the proxy as soon as its head is parsed.

    ``gotLength`` runs right after the headers; for a request with a body we
    start the exchange there and feed it each chunk from ``handleContentChunk``.
    A request without a body starts in ``requestReceived``, as usual.
    """

    exchange: Exchange | None = None
    answered = False  # its exchange is over: body bytes and a lost connection go nowhere
    body_done = False
    body_length: int | None = 0
    parsing = False

    def gotLength(self, length: int | None) -> None:
        self.body_length = length
        if length != 0:
            channel = self.channel
            self.parsing = True
            try:
                self._begin(*channel.request_line())
            finally:
                self.parsing = False

    def handleContentChunk(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is not None:
            exchange.body_chunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        self.body_done = True
        exchange = self.exchange
        if exchange is not None:
            exchange.body_end()
        elif not self.answered:
            self._begin(command, path, version)

    def _begin(self, command: bytes, path: bytes, version: bytes) -> None:
        self.method = command
        self.uri = path
        self.path = path.split(b"?", 1)[0]
        self.clientproto = version
        proxy = self.channel.site.proxy
        if proxy.stopping:
            self.channel.persistent = False
        self.exchange = Exchange(proxy, self)
        self.exchange.start()

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        exchange = self.exchange
        if exchange is not None:
            exchange.client_lost()
