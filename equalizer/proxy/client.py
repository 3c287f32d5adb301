"""One client request as the proxy sees it: its head, its body as it arrives, and the
way its response goes back. The exchange (``equalizer.proxy.exchange``) talks to this
narrow interface only; ``equalizer.proxy.front`` parses the connection and makes one
``ClientRequest`` per request head.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from equalizer.proxy.exchange import Exchange

if TYPE_CHECKING:
    from equalizer.proxy.front import FrontConnection

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class RequestFields:
    """The request's header fields by lowercase name, values in the order received.

    Read through ``getRawHeaders`` and ``getAllRawHeaders``, the two names of
    twisted.web's ``Headers`` that routing and the header rules use, so those work on
    either; the client key (``equalizer.proxy.keys``), read on every limited request,
    reads ``index`` itself.
    """

    __slots__ = ("index",)

    def __init__(self) -> None:
        self.index: dict[bytes, tuple[bytes, list[bytes]]] = {}

    def add(self, name: bytes, value: bytes) -> None:
        lowered = name.lower()
        entry = self.index.get(lowered)
        if entry is None:
            self.index[lowered] = (name, [value])
        else:
            entry[1].append(value)

    def getRawHeaders(self, name: bytes) -> list[bytes] | None:  # noqa: N802 (Headers' name)
        entry = self.index.get(name.lower())
        return entry[1] if entry is not None else None

    def getAllRawHeaders(self):  # noqa: N802 (Headers' name)
        """(name as the client spelled it first, values) per field name."""
        return self.index.values()

    def setRawHeaders(self, name: bytes, values: list[bytes]) -> None:  # noqa: N802
        self.index[name.lower()] = (name, values)


class ClientRequest:
    """One request on a client connection, from its head to the end of its response.

    Its exchange starts when the request is first in line on the connection (at once,
    unless pipelined behind another); body bytes that come before then wait here.
    ``transport`` is None once the client has gone.
    """

    __slots__ = (
        "connection", "transport", "method", "target", "path", "version", "requestHeaders",
        "body_length", "body_done", "exchange", "answered", "head_sent", "chunked",
        "early_body", "expects_continue", "peer_host", "cookies", "persistent", "close_asked",
        "send", "held_head", "__weakref__",
    )

    def __init__(self, connection: FrontConnection) -> None:
        self.connection = connection
        self.transport = connection.transport
        self.send = connection.send  # the transport's write, or one that sends at once
        self.held_head: bytes | None = None  # see ``response.write_head``
        self.peer_host = connection.peer_host
        self.method = b""
        self.target = b""
        self.path = b""
        self.version = b"HTTP/1.1"
        self.requestHeaders = RequestFields()
        self.body_length: int | None = 0
        self.body_done = False
        self.exchange: Exchange | None = None
        self.answered = False  # its exchange is over: body bytes and a lost client go nowhere
        self.head_sent = False
        self.chunked = False
        self.early_body: list[bytes] | None = None
        self.expects_continue = False
        self.cookies: dict[bytes, bytes] | None = None
        self.persistent = True  # the connection stays open after this response
        self.close_asked = False  # the client sent ``Connection: close``

    # -- from the connection ----------------------------------------------------------

    def start(self) -> None:
        """First in line: answer ``Expect: 100-continue`` and begin the exchange, with the
        body bytes that arrived while it waited."""
        proxy = self.connection.factory.proxy
        if proxy.stopping:
            self.persistent = False
        if self.expects_continue and not self.body_done:
            self.send(CONTINUE)
        exchange = self.exchange = Exchange(proxy, self)
        early, self.early_body = self.early_body, None
        exchange.start(early)

    def body_chunk(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is not None:
            exchange.body_chunk(data)
        elif not self.answered:
            if self.early_body is None:
                self.early_body = []
            self.early_body.append(data)

    def body_end(self) -> None:
        self.body_done = True
        exchange = self.exchange
        if exchange is not None:
            exchange.body_end()

    def connection_lost(self) -> None:
        self.transport = None
        exchange = self.exchange
        if exchange is not None:
            exchange.client_lost()

    # -- from the exchange ------------------------------------------------------------

    @property
    def received_cookies(self) -> dict[bytes, bytes]:
        """The cookies of the ``Cookie`` fields by name, parsed on first use."""
        cookies = self.cookies
        if cookies is None:
            cookies = self.cookies = {}
            for value in self.requestHeaders.getRawHeaders(b"cookie") or ():
                for pair in value.split(b";"):
                    key, sep, found = pair.strip().partition(b"=")
                    if sep:
                        cookies[key] = found  # the last one wins, as in twisted.web
        return cookies

    def no_keep_alive(self) -> None:
        """Close the connection once this response is out."""
        self.persistent = False

    def write(self, data: bytes) -> None:
        """Body bytes, in chunked framing when the head said so (with the head, if held)."""
        if self.chunked:
            if not data:
                return  # an empty chunk would end the body
            data = b"%x\r\n%s\r\n" % (len(data), data)
        self.send(self._after_held_head(data))

    def register_producer(self, producer) -> None:
        """The backend connection, paused while the client's socket is full."""
        self.transport.registerProducer(producer, True)

    def unregister_producer(self) -> None:
        if self.transport is not None:
            self.transport.unregisterProducer()

    def finish(self) -> None:
        """The response is complete: the next request on the connection may begin."""
        end = self._after_held_head(b"0\r\n\r\n" if self.chunked else b"")
        if end:
            self.send(end)
        self.connection.request_done(self)

    def _after_held_head(self, data: bytes) -> bytes:
        """``data``, behind the response head if ``write_head`` held it back."""
        head = self.held_head
        if head is None:
            return data
        self.held_head = None
        return head + data
