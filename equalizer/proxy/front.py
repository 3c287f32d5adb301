"""The proxy's client side: a lean HTTP/1.1 server protocol of its own.

twisted.web's ``HTTPChannel`` and ``Request`` (line parsing in Python, header
canonicalisation, a request object built for resources) cost most of a proxied
request; the admin API keeps them. Here httptools (llhttp, the parser of Node.js)
parses the client's bytes, and the rules llhttp is lenient about are checked on top
(HTTP/0.9 and versions other than 1.0 and 1.1, transfer codings other than
``chunked``, trailing whitespace in values). Field values are read as twisted.web read
them (llhttp's lenient header values): control characters other than CR, LF and NUL
stay (RFC 9110 5.5 allows it), an obsolete folded line joins its field with a space
(RFC 9112 5.2); a NUL is refused. Every request head becomes a
``ClientRequest``; pipelined requests wait in line and are answered in order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser
from twisted.internet.interfaces import IHalfCloseableDescriptor, ITCPTransport
from twisted.internet.protocol import Protocol
from twisted.web.http import datetimeToString

from equalizer.proxy.backpressure import CLIENT_BUFFER_BYTES
from equalizer.proxy.client import ClientRequest
from equalizer.proxy.headers import connection_tokens, expects_continue
from equalizer.proxy.response import JSON_HEADERS, OWN_REASONS, error_body

if TYPE_CHECKING:
    from collections.abc import Callable

    from twisted.python.failure import Failure

    from equalizer.proxy.site import ProxySite

MAX_FIELDS = 500
"""Header fields one request may carry (twisted.web's bound, kept)."""

ABORT_SECONDS = 15.0
"""How long a closing connection may take to flush before it is cut (as twisted.web)."""

LINGER_SECONDS = 30.0
"""How long a lingering close reads and discards at most (nginx's ``lingering_time``)."""

BAD_LINE = "the request line is not 'METHOD target HTTP/1.x'"
VERSIONS = {"1.1": b"HTTP/1.1", "1.0": b"HTTP/1.0"}
REASONS = {400: b"Bad Request", **OWN_REASONS}


class HeadRefused(Exception):
    """Raised from a parser callback to stop parsing: the request gets this answer."""


class RequestReader(Protocol):
    """The reading half of a client connection: bytes in, ``ClientRequest`` heads and
    bodies out, through llhttp's callbacks, within the head bounds.

    ``requests`` holds the requests whose heads are in, first the one being answered;
    the rest wait. What the line, refusals and upgrades do is ``FrontConnection``'s.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parser: HttpRequestParser | None = HttpRequestParser(self)
        self.parser.set_dangerous_leniencies(lenient_headers=True)
        self.requests: list[ClientRequest] = []
        self.head: ClientRequest | None = None  # head being parsed
        self.reading: ClientRequest | None = None  # body being parsed
        self.head_bytes = self.fields = self.head_fed = 0
        self.upgraded: list[bytes] | None = None  # bytes after an upgrade request
        self.feeding = self.closing = False
        self.unread = b""  # read, not parsed yet (behind a request that waits)

    def dataReceived(self, data: bytes) -> None:
        self.last_active = self.clock.seconds()
        if self.parser is None:
            if self.upgraded is not None:
                self.upgraded.append(data)
                self._pause()
            return
        self.unread = self.unread + data if self.unread else data
        if not self.feeding:
            self._feed()

    def _feed(self) -> None:
        """Parse what the client sent, a request head at a time: once a request waits
        behind the one being answered the rest stays unparsed, and reading pauses, so a
        pipelined flood costs its bytes, not a request object each (as twisted.web)."""
        self.feeding = True
        while self.unread and self.parser is not None:
            data = self.unread
            if self.reading is None:  # a head comes next: up to its end only
                if len(self.requests) > 1:
                    self._pause()
                    break
                end = data.find(b"\r\n\r\n") + 4
                if 4 <= end < len(data):
                    data = data[:end]
            self.unread = self.unread[len(data):]
            self._parse(data)
        self.feeding = False
        if len(self.requests) > 1:
            self._pause()

    def _parse(self, data: bytes) -> None:
        began = self.head
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as upgrade:
            rest, self.unread = data[upgrade.args[0]:] + self.unread, b""
            self._upgrade(rest)
        except HeadRefused as refused:
            self.refuse(*refused.args)
        except HttpParserError as error:
            if isinstance(error.__context__, HeadRefused):
                self.refuse(*error.__context__.args)
            else:
                self.refuse(400, "bad_request", malformed(
                    str(error), self.reading is not None, not self.fields))
        if self.head is not None:
            self._bound_unfinished_head(len(data) if began is self.head else 0)

    def _bound_unfinished_head(self, fed: int) -> None:
        """A head still incomplete after a read may not grow past the bound (llhttp hands
        a field over only when its line ends): the bytes read since it began count."""
        self.head_fed += fed
        if self.head_fed > self.limit and self.parser is not None:
            # A target that long was refused with 414 already (llhttp hands it over
            # piece by piece): this is a header line.
            self.refuse(431, "header_fields_too_large", f"a header line is over {self.limit} bytes")

    # -- parser callbacks (httptools) -----------------------------------------------------

    def on_message_begin(self) -> None:
        if self.closing:
            raise HeadRefused(0, "", "")
        self.head = ClientRequest(self)
        self.head_bytes = self.fields = self.head_fed = 0

    def on_url(self, piece: bytes) -> None:
        head = self.head
        head.target += piece
        self.head_bytes += len(piece)
        if self.head_bytes > self.limit:
            raise HeadRefused(414, "uri_too_long", f"the request line is over {self.limit} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        head = self.head
        if head is None:
            return  # a trailer field: dropped, as twisted.web does
        self.fields += 1
        self.head_bytes += len(name) + len(value) + 2
        if self.head_bytes > self.limit:
            raise HeadRefused(431, "header_fields_too_large",
                              f"the request head is over {self.limit} bytes")
        if self.fields > MAX_FIELDS:
            raise HeadRefused(431, "header_fields_too_large",
                              f"the request has more than {MAX_FIELDS} header fields")
        if b"\0" in value:
            raise HeadRefused(400, "bad_request", f"the {name.decode()} field holds a NUL")
        head.requestHeaders.add(name, value.rstrip(b" \t"))

    def on_headers_complete(self) -> None:
        request = self.head
        version = VERSIONS.get(self.parser.get_http_version())
        if version is None:
            raise HeadRefused(400, "bad_request", BAD_LINE)
        request.version = version
        request.method = self.parser.get_method()
        request.path = request.target.split(b"?", 1)[0]
        read_framing(request)
        self.head = None
        self.reading = request
        requests = self.requests
        requests.append(request)
        if len(requests) == 1:
            request.start()

    def on_body(self, data: bytes) -> None:
        self.reading.body_chunk(data)

    def on_message_complete(self) -> None:
        request, self.reading = self.reading, None
        if request is not None and not request.body_done:
            request.body_end()


class FrontConnection(RequestReader):
    """One client connection: starts each request in turn, closes when told.

    A refusal of the parser waits behind the requests ahead (then the connection
    closes), so responses never interleave. Reading pauses while requests wait.
    """

    def __init__(self, factory: ProxySite) -> None:
        super().__init__(factory.max_header_bytes)
        self.factory = factory
        self.clock = factory.clock
        self.idle_seconds = factory.timeOut
        self.refusal: tuple[int, str, str] | None = None
        self.paused = False
        self.lingering_since: float | None = None
        self.peer_host = ""
        self.send: Callable[[bytes], None] | None = None
        self.last_active = 0.0
        self.timer = None

    # -- the connection -----------------------------------------------------------------

    def connectionMade(self) -> None:
        transport = self.transport
        transport.bufferSize = CLIENT_BUFFER_BYTES
        if ITCPTransport.providedBy(transport):
            transport.setTcpNoDelay(True)
        self.peer_host = transport.getPeer().host
        self.send = self.factory.writer(transport)
        self.factory.proxy.stats.connections += 1
        self.last_active = self.clock.seconds()
        self._arm(self.idle_seconds)

    def connectionLost(self, reason: Failure) -> None:
        """One client connection fewer (``equalizer_client_connections``); every request
        still on it is abandoned."""
        self.factory.proxy.stats.connections -= 1
        self.closing = True
        self._arm(None)
        self.parser = None  # it refers to this connection: no cycle is left behind
        requests, self.requests = self.requests, []
        for request in requests:
            request.connection_lost()

    # -- requests in turn -----------------------------------------------------------------

    def request_done(self, request: ClientRequest) -> None:
        """``request``'s response is out: the next in line begins, or the connection closes."""
        requests = self.requests
        if requests and requests[0] is request:
            del requests[0]
        if not request.persistent or self.closing:
            self.close(linger=not request.body_done)
            return
        self.last_active = self.clock.seconds()
        if requests:
            requests[0].start()
        elif self.refusal is not None:
            self._answer_refusal(*self.refusal)
            return
        if self.unread and not self.feeding:
            self._feed()
        if not self.unread and self.upgraded is None and not self.closing:
            # Reading may have been paused by the line, or by an upload's back-pressure
            # whose throttle left with the request: the next request is read either way.
            self.paused = False
            self.transport.resumeProducing()

    def refuse(self, status: int, code: str, message: str) -> None:
        """Stop parsing; answer ``status`` with the JSON error once the requests ahead are
        answered, then close: the rest of what the client sent cannot be told apart from
        a next request. A request whose body broke off is dropped from the line; one
        whose response has begun already is cut off (a malformed chunk mid-upload)."""
        self.parser = None
        self.unread = b""
        if self.closing:
            return  # nothing more is read, nor answered
        broken = self.reading
        if broken is not None and broken in self.requests:
            if broken is self.requests[0]:
                self.requests.remove(broken)
                if broken.head_sent:
                    broken.connection_lost()
                    self.close()
                    return
                broken.head_sent = True  # the exchange answers no more
                broken.connection_lost()
            else:
                self.requests.remove(broken)
        self.reading = self.head = None
        if self.requests:
            self.refusal = (status, code, message)
            self._pause()
        else:
            self._answer_refusal(status, code, message)

    def _answer_refusal(self, status: int, code: str, message: str) -> None:
        self.send(refusal_response(status, code, message))
        self.close(linger=True)

    def close(self, linger: bool = False) -> None:
        """Close once what was written is out; cut it if that takes ``ABORT_SECONDS``.

        With ``linger`` (the client may still be sending: a body the answer did not wait
        for, a head refused part-way), only the sending side closes and what the client
        sends meanwhile is read and dropped, as nginx's lingering close does: closing a
        socket with unread bytes makes the kernel reset the connection, and a client that
        writes its whole upload before reading (Python's ``http.client``, most libraries)
        would get that reset instead of the answer. The client's own close ends it; so
        does ``ABORT_SECONDS`` without a byte from it, or ``LINGER_SECONDS`` in all. Over
        TLS, which cannot close one side, the connection closes as usual.
        """
        if self.closing:
            return
        self.closing = True
        self._arm(ABORT_SECONDS)
        self.factory.outbox.flush()  # Twisted may close before the turn's writes go
        transport = self.transport
        if not (linger and IHalfCloseableDescriptor.providedBy(transport)):
            transport.loseConnection()
            return
        self.parser = None  # from now on dataReceived drops what it reads
        self.unread = b""
        self.upgraded = None
        self.lingering_since = self.last_active = self.clock.seconds()
        transport.loseWriteConnection()
        transport.resumeProducing()  # reading may be paused by an upload's back-pressure

    def _pause(self) -> None:
        if not self.paused and not self.closing:
            self.paused = True
            self.transport.pauseProducing()

    # -- upgrades -------------------------------------------------------------------------

    def _upgrade(self, rest: bytes) -> None:
        """llhttp stops at a request asking to switch protocols: what follows is not HTTP
        if the backend agrees (``hand_over``), and if it does not the connection closes
        after its response."""
        self.parser = None
        self.upgraded = [rest] if rest else []
        last = self.requests[-1] if self.requests else None
        if last is not None:
            last.persistent = False
        self._pause()

    def hand_over(self, sink: Callable[[bytes], object]) -> bytes:
        """Stop reading HTTP: from now on every byte the client sends goes to ``sink`` (an
        upgraded connection's other side), and no idle timeout applies. Returns what the
        client had sent after the request."""
        self._arm(None)
        self.dataReceived = sink
        buffered = b"".join(self.upgraded or ())
        self.upgraded = None
        return buffered

    # -- idle timeout ---------------------------------------------------------------------

    def _arm(self, seconds: float | None) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = self.clock.callLater(seconds, self._timed_out) if seconds else None

    def _timed_out(self) -> None:
        """No byte from the client for ``timeouts.idle`` (a request being answered does not
        count as idle, one whose body trickles in does): close, then cut."""
        if self.closing:
            if not self._still_lingering():
                self.transport.abortConnection()
            return
        requests = self.requests
        if requests and requests[0].body_done:
            self._arm(self.idle_seconds)
            return
        idle = self.clock.seconds() - self.last_active
        if idle < self.idle_seconds:
            self._arm(self.idle_seconds - idle)
        else:
            self.close()

    def _still_lingering(self) -> bool:
        """A lingering close whose client sent bytes within ``ABORT_SECONDS`` goes on, up
        to ``LINGER_SECONDS`` in all: re-armed, True."""
        since = self.lingering_since
        if since is None:
            return False
        now = self.clock.seconds()
        left = min(since + LINGER_SECONDS, self.last_active + ABORT_SECONDS) - now
        if left <= 0:
            return False
        self._arm(left)
        return True


def malformed(error: str, in_body: bool, no_field_yet: bool) -> str:
    """Which part of the request llhttp refused (``error`` is its reason), in the words of
    SPEC 4.4."""
    if in_body:
        return "the request body is malformed"
    if no_field_yet and "header" not in error:
        return BAD_LINE
    return "the request head or body framing is malformed"


def refusal_response(status: int, code: str, message: str) -> bytes:
    """The JSON error for a request head the parser refused, closing the connection (the
    admin channel's too)."""
    body = error_body(code, message)
    fields = [*JSON_HEADERS, (b"Content-Length", b"%d" % len(body)),
              (b"Connection", b"close"), (b"Date", datetimeToString())]
    return b"HTTP/1.1 %d %s\r\n%s\r\n%s" % (
        status, REASONS[status], b"".join(b"%s: %s\r\n" % field for field in fields), body)


def read_framing(request: ClientRequest) -> None:
    """Body length, keep-alive and ``Expect`` from the fields llhttp has checked (one
    Content-Length, digits only, never with Transfer-Encoding); a transfer coding other
    than ``chunked`` alone is refused (RFC 9112 6.1: the proxy cannot decode it)."""
    index = request.requestHeaders.index
    coding = index.get(b"transfer-encoding")
    if coding is not None:
        if b",".join(coding[1]).strip().lower() != b"chunked":
            raise HeadRefused(400, "bad_request", "the only transfer coding accepted is chunked")
        request.body_length = None
    else:
        length = index.get(b"content-length")
        if length is not None:
            request.body_length = int(length[1][0])
        if not request.body_length:
            request.body_done = True
    if request.version != b"HTTP/1.1":
        request.persistent = False
    elif b"connection" in index and b"close" in connection_tokens(index[b"connection"][1]):
        request.persistent = False
        request.close_asked = True
    if b"expect" in index and request.version == b"HTTP/1.1":
        request.expects_continue = expects_continue(request)
