"""The proxy: client requests in, backend responses out, both streamed.

twisted.web's ``Site`` parses the client side. Our ``ProxyRequest`` starts the
backend exchange as soon as the request head is parsed (twisted.web would
otherwise buffer the whole body before ``render``), forwards each body chunk as
it arrives, and relays the response with back-pressure in both directions: a
full backend socket pauses reading from the client, a full client socket pauses
reading from the backend.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError
from twisted.internet.error import TimeoutError as ConnectTimeout
from twisted.internet.interfaces import IProtocolNegotiationFactory
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from zope.interface import implementer

from equalizer.config.loader import ProxyConfig
from equalizer.logs.service import AccessLog
from equalizer.proxy.request_head import NOT_A_PATH, host_problem, split_absolute_target
from equalizer.proxy.upstream import UpstreamError, is_local_resource_error

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall, IReactorTime

    from equalizer.balancer.pool import Backend, BackendPool
    from equalizer.balancer.stats import TrafficStats
    from equalizer.proxy.upstream import UpstreamConnection, UpstreamPool

log = Logger()

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
    b"trailer", b"transfer-encoding", b"upgrade", b"proxy-connection",
})
"""Headers that describe one connection, not the message: never forwarded."""

REBUILT_REQUEST_HEADERS = HOP_BY_HOP | {
    b"host", b"content-length", b"expect", b"x-forwarded-for", b"x-forwarded-proto",
    b"x-forwarded-host", b"x-request-id",
}
"""Request headers the proxy writes itself rather than copying."""

CLIENT_BUFFER_BYTES = 256 * 1024
"""Bytes a client socket may have queued before the backend is paused (Twisted's
default, 64 KiB, pauses and resumes the backend several times for every 100 KiB
response; each costs epoll calls). Bounds memory per client connection."""

IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"TRACE"})

RESEND_BODY_BYTES = 64 * 1024
"""Request body bytes kept, per request sent on a reused backend connection, until the
first response byte, so that an idempotent request can go again on a fresh connection
if the backend had closed the reused one; a longer body is not kept (nor resent)."""

INFORMATIONAL_DROPPED = HOP_BY_HOP | {b"content-length"}
"""Fields of a backend's 1xx that do not go on: they describe its connection, or a body
a 1xx never has (RFC 9110 8.6)."""

RESOURCE_WARNING_SECONDS = 10.0
"""At most one warning this often while the proxy cannot open sockets (EMFILE)."""

JSON_HEADERS = ((b"Content-Type", b"application/json"), (b"Cache-Control", b"no-store"))

OWN_REASONS = {429: b"Too Many Requests", 414: b"URI Too Long",
               431: b"Request Header Fields Too Large"}
"""Reason phrases of statuses the proxy answers itself that twisted.web does not know."""


def error_body(code: str, message: str) -> bytes:
    """The one JSON shape of every answer the proxy makes itself (SPEC 4.4)."""
    return json.dumps({"error": {"code": code, "message": message}}).encode("utf-8")


def client_address(peer: str, forwarded_for: list[bytes] | None,
                   trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> str:
    """The client's address: the peer, or behind trusted proxies the right-most untrusted hop.

    A header from an untrusted peer is ignored, so a client cannot choose its own
    rate-limit key by sending X-Forwarded-For.
    """
    if not trusted or not _is_trusted(peer, trusted):
        return peer
    hops = [hop.strip() for value in forwarded_for or () for hop in value.split(b",")]
    for hop in reversed(hops):
        address = hop.decode("latin-1")
        if not _is_trusted(address, trusted):
            return address
    return peer


def _is_trusted(address: str, trusted: tuple) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)


class _UploadThrottle:
    """Pauses reading from the client while the backend socket is full.

    Registered as the producer of the backend transport during an upload. It
    never stops the client connection: a lost backend must not drop the client
    before it has its 502.
    """

    def __init__(self, client_transport) -> None:
        self.client_transport = client_transport
        self.paused = False

    def pauseProducing(self) -> None:
        self.paused = True
        self.client_transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        self.client_transport.resumeProducing()

    def stopProducing(self) -> None:
        pass


class Exchange:
    """One client request on its way to a backend and its response on the way back.

    Lifecycle: ``start`` → choose a backend → connect (or reuse) → send head and
    body → relay the response → ``_done``. A connection failure before anything
    was sent retries on another backend; so does any failure before the response
    began, for idempotent requests whose body has not started going out.
    """

    __slots__ = (
        "proxy", "request", "client", "method", "request_id", "started", "backend", "tried",
        "resend_chunks", "resend_bytes", "fresh_only",
        "connection", "pending", "body_chunks", "body_sent", "body_ended", "throttle", "timer",
        "progress", "bytes_sent", "status", "finished", "headers_block", "host", "chunked_body",
        "body_follows", "head_request", "rate_limit", "decision", "last_failure",
        "several_hosts", "problem",
    )

    def __init__(self, proxy: Proxy, request: ProxyRequest) -> None:
        self.proxy = proxy
        proxy.active += 1
        self.request = request
        self.method = request.method
        self.started = proxy.clock.seconds()
        self.backend: Backend | None = None
        self.tried: list[Backend] = []
        self.connection: UpstreamConnection | None = None
        self.pending = None
        self.body_chunks: list[bytes] | None = None
        self.body_sent = False
        self.body_ended = request.body_done
        self.throttle: _UploadThrottle | None = None
        self.timer: IDelayedCall | None = None
        self.progress = 0
        self.bytes_sent = 0
        self.status = 0
        self.finished = False
        self.rate_limit = "off"
        self.decision = None
        self.last_failure: Failure | None = None
        self.several_hosts = False
        self.problem: str | None = None
        self.resend_chunks: list[bytes] | None = None
        self.resend_bytes = 0
        self.fresh_only = False
        length = request.body_length
        self.chunked_body = length is None
        self.body_follows = length != 0
        self.head_request = self.method == b"HEAD"
        self._read_request_headers()

    # -- request head --------------------------------------------------------------

    def _read_request_headers(self) -> None:
        """Copy the end-to-end headers once; the Host and request line differ per backend."""
        request = self.request
        proxy = self.proxy
        lines = []
        host = forwarded_for = request_id = connection_tokens = None
        raw = request.requestHeaders.getAllRawHeaders()
        for name, values in raw:
            lowered = name.lower()
            if lowered in REBUILT_REQUEST_HEADERS:
                if lowered == b"host":
                    host = values[0]
                    self.several_hosts = len(values) > 1
                elif lowered == b"x-forwarded-for":
                    forwarded_for = values
                elif lowered == b"x-request-id":
                    request_id = values[0]
                elif lowered == b"connection":
                    connection_tokens = {t.strip().lower() for v in values for t in v.split(b",")}
                continue
            for value in values:
                lines.append(b"%s: %s\r\n" % (name, value))
        if connection_tokens:
            lines = [line for line in lines
                     if line.split(b":", 1)[0].lower() not in connection_tokens]
            upgrade = request.requestHeaders.getRawHeaders(b"upgrade")
            if upgrade and b"upgrade" in connection_tokens:
                lines.append(b"Connection: Upgrade\r\nUpgrade: %s\r\n" % upgrade[0])
        peer = request.client.host
        self.client = client_address(peer, forwarded_for, proxy.config.trusted_proxies)
        self.request_id = request_id or os.urandom(16).hex().encode("ascii")
        chain = b", ".join(forwarded_for + [peer.encode("ascii")]) if forwarded_for \
            else peer.encode("ascii")
        lines.append(b"X-Forwarded-For: %s\r\nX-Forwarded-Proto: %s\r\nX-Request-ID: %s\r\n"
                     % (chain, proxy.scheme, self.request_id))
        self.problem, host = self._check_target_and_host(host)
        if host is not None:
            lines.append(b"X-Forwarded-Host: %s\r\n" % host)
        if self.chunked_body:
            lines.append(b"Transfer-Encoding: chunked\r\n")
        elif self.body_follows or request.requestHeaders.hasHeader(b"content-length"):
            lines.append(b"Content-Length: %d\r\n" % request.body_length)
        lines.append(b"\r\n")
        self.host = host
        self.headers_block = b"".join(lines)

    def _head_for(self, backend: Backend) -> bytes:
        host = self.host if self.proxy.config.preserve_host and self.host else backend.host_header
        return b"%s %s%s HTTP/1.1\r\nHost: %s\r\n%s" % (
            self.method, backend.prefix, self.request.uri, host, self.headers_block)

    # -- choosing and connecting -----------------------------------------------------

    def start(self) -> None:
        problem = self.problem
        if problem is None:
            self.proxy.admit(self)
        else:
            self.request.channel.persistent = False
            self.respond_locally(400, "bad_request", problem)

    def _check_target_and_host(self, host: bytes | None) -> tuple[str | None, bytes | None]:
        """What makes the request one a reverse proxy must refuse (RFC 9112 3.2), if anything,
        and the host it is for.

        An absolute-form target (RFC 9112 3.2.2) becomes the origin-form the backend
        gets, and its authority the host (3.2.3: the Host header is then ignored, though
        it must still be there, once, and valid). Asterisk-form and CONNECT's
        authority-form are refused: this is not a forward proxy.
        """
        request = self.request
        if self.method == b"CONNECT":
            return NOT_A_PATH, host
        if self.several_hosts:
            return "a request carries one Host header only", host
        if host is None:
            if request.clientproto == b"HTTP/1.1":
                return "an HTTP/1.1 request must carry a Host header", host
        else:
            problem = host_problem(host)
            if problem is not None:
                return problem, host
        target = request.uri
        if target[:1] != b"/":
            split = split_absolute_target(target)
            if isinstance(split, str):
                return split, host
            host, target = split
            request.uri = target
            request.path = target.split(b"?", 1)[0]
            request.requestHeaders.setRawHeaders(b"host", [host])
        return None, host

    def dispatch(self) -> None:
        """Send the request to a backend not tried yet, or answer for the backends."""
        if self.finished:
            return
        proxy = self.proxy
        hash_key = proxy.hash_key
        backend = proxy.pool.choose(
            hash_key(self).encode("utf-8", "surrogateescape") if hash_key else None, self.tried)
        if backend is None:
            if self.tried:
                self._gateway_failure()
            else:
                self.respond_locally(503, "no_healthy_backend", "no healthy backend is available",
                                     ((b"Retry-After", b"1"),))
            return
        self.backend = backend
        self.tried.append(backend)
        backend.in_flight += 1
        connection = None if self.fresh_only else proxy.upstreams.get_idle(backend)
        if connection is not None:
            self._send(connection)
            return
        if self.body_follows and not self.body_ended:
            self._pause_client()
        self.pending = proxy.upstreams.connect(backend)
        self.pending.addCallbacks(self._connected, self._connect_failed)

    def _connected(self, connection: UpstreamConnection) -> None:
        self.pending = None
        self.proxy.passive.record_connect_success(connection.backend)
        if self.finished:
            self.proxy.upstreams.release(connection)
            return
        self._send(connection)

    def _connect_failed(self, reason: Failure) -> None:
        self.pending = None
        if self.finished:
            return  # cancelled by client_lost, which has left the backend already
        backend = self.backend
        self._leave_backend()
        if is_local_resource_error(reason):
            self._out_of_resources(backend, reason)
            return
        self.last_failure = reason
        # Counted in backend.failures by the health monitor, with the passive check.
        self.proxy.passive.record_connect_failure(backend, reason.getErrorMessage())
        log.debug("connect to {url} failed: {error}", url=backend.url,
                  error=reason.getErrorMessage())
        self._retry_or_fail()

    def _out_of_resources(self, backend: Backend, reason: Failure) -> None:
        """The proxy could not even create a socket (EMFILE and the like): its own shortage,
        not the backend's failure, and no other backend would fare better. 503 with
        Retry-After, no attempt recorded, and a warning at most every few seconds."""
        self.tried.remove(backend)
        self.proxy.resource_warning.report(reason.getErrorMessage())
        self.respond_locally(503, "proxy_overloaded",
                             "the proxy is out of connections (file descriptors); retry shortly",
                             ((b"Retry-After", b"1"),))

    def _retry_or_fail(self) -> None:
        if len(self.tried) <= self.proxy.config.retries:
            self.proxy.stats.retries += 1
            self.dispatch()
        else:
            self._gateway_failure()

    def _gateway_failure(self) -> None:
        """502 or 504 for the last attempt's failure, in words that tell an operator which."""
        failure = self.last_failure
        if failure is not None and failure.check(ConnectTimeout):
            self.respond_locally(504, "gateway_timeout",
                                 "the backend did not accept the connection in time")
        elif failure is None or failure.check(ConnectError):
            self.respond_locally(502, "bad_gateway", "no backend could be reached")
        elif failure.check(UpstreamError):
            self.respond_locally(502, "bad_gateway", "the backend's response was not valid HTTP")
        else:
            self.respond_locally(502, "bad_gateway", "the backend failed before answering")

    def _send(self, connection: UpstreamConnection) -> None:
        self.connection = connection
        connection.send_head(self._head_for(connection.backend), self,
                             head_request=self.head_request, chunked_body=self.chunked_body,
                             body_follows=self.body_follows)
        if self.body_follows:
            if connection.reused and self.method in IDEMPOTENT_METHODS:
                self.resend_chunks, self.resend_bytes = [], 0
            self.throttle = _UploadThrottle(self.request.channel.transport)
            connection.transport.registerProducer(self.throttle, True)
            if self.body_chunks:
                self.body_sent = True
                for chunk in self.body_chunks:
                    connection.send_body(chunk)
                    if self.resend_chunks is not None:
                        self._keep_for_resend(chunk)
                self.body_chunks = None
            self._resume_client()
            if self.body_ended:
                self._end_body()
        else:
            self._arm(self.proxy.config.timeouts.response)

    # -- request body --------------------------------------------------------------

    def body_chunk(self, data: bytes) -> None:
        if self.finished:
            return
        connection = self.connection
        if connection is not None:
            self.body_sent = True
            connection.send_body(data)
            if self.resend_chunks is not None:
                self._keep_for_resend(data)
            if self.throttle is not None and self.throttle.paused:
                self.request.channel.transport.pauseProducing()
        else:
            if self.body_chunks is None:
                self.body_chunks = []
            self.body_chunks.append(data)
            self._pause_client()

    def _keep_for_resend(self, data: bytes) -> None:
        """Keep a body chunk sent on a reused connection until the response begins, up to
        ``RESEND_BODY_BYTES``; past it the request can no longer be sent again."""
        self.resend_bytes += len(data)
        if self.resend_bytes > RESEND_BODY_BYTES:
            self.resend_chunks = None
        else:
            self.resend_chunks.append(data)

    def body_end(self) -> None:
        self.body_ended = True
        if self.connection is not None and not self.finished:
            self._end_body()

    def _end_body(self) -> None:
        connection = self.connection
        connection.end_body()
        if self.throttle is not None:
            connection.transport.unregisterProducer()
            self.throttle = None
        if self.status == 0:
            self._arm(self.proxy.config.timeouts.response)

    def _pause_client(self) -> None:
        transport = self.request.channel.transport if self.request.channel else None
        if transport is not None:
            transport.pauseProducing()

    def _resume_client(self) -> None:
        transport = self.request.channel.transport if self.request.channel else None
        if transport is not None:
            transport.resumeProducing()

    # -- response (ResponseHandler) ----------------------------------------------------

    def response_informational(self, status: int, reason: bytes,
                               headers: list[tuple[bytes, bytes]]) -> None:
        """Relay a backend's 1xx (not 101) ahead of its final response.

        RFC 9110 15.2: a proxy MUST forward 1xx responses, but never to an HTTP/1.0
        client. A 100 Continue is not repeated when twisted.web already sent its own
        for the client's ``Expect: 100-continue``.
        """
        self.resend_chunks = None
        request = self.request
        if self.finished or request.channel is None or request.clientproto != b"HTTP/1.1" \
                or request.startedWriting:
            return
        if status == 100 and _expects_continue(request):
            return
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
        lines += [b"%s: %s\r\n" % (name, value) for name, value in headers
                  if name.lower() not in INFORMATIONAL_DROPPED]
        lines.append(b"\r\n")
        request.channel.transport.write(b"".join(lines))

    def response_head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]],
                      chunked: bool, codings: bytes) -> None:
        self.status = status
        self.resend_chunks = None
        if status == 101:
            self._start_tunnel(reason, headers)
            return
        request = self.request
        if codings and request.clientproto != b"HTTP/1.1" and not self.head_request \
                and status not in http.NO_BODY_CODES:
            self._refuse_codings()
            return
        self._arm(self.proxy.config.timeouts.idle)
        request.setResponseCode(status, reason)
        self._write_head(status, reason, headers, chunked, codings)
        request.registerProducer(self.connection, True)

    def _refuse_codings(self) -> None:
        """502 for a body in a transfer coding (``gzip``) an HTTP/1.0 client cannot be sent:
        RFC 9112 6.1 forbids Transfer-Encoding towards it, and passing the bytes as the
        content would corrupt it. The backend did nothing wrong: not counted against it."""
        self._disarm()
        connection = self.connection
        self.connection = None
        connection.abort()
        self._leave_backend()
        self.respond_locally(502, "bad_gateway", "the backend's response uses a transfer "
                             "coding that cannot be sent to an HTTP/1.0 client")

    def _write_head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]],
                    chunked: bool, codings: bytes = b"") -> None:
        """Send the response head to the client, as twisted.web's first ``write`` would.

        Written here rather than through ``request.responseHeaders``: the backend's
        fields were checked by the upstream parser (token names, no control
        characters in values), so copying them into a ``Headers`` (canonicalising
        and sanitising each) only to read them out again cost about a tenth of a
        proxied request. What twisted.web decides on the first write is decided the
        same way: ``Transfer-Encoding: chunked`` to an HTTP/1.1 client when the
        length is unknown, and fields already set on the request (``Connection:
        close``) go out too. Transfer codings other than chunked (``codings``) stay
        in that field, ahead of chunked; a 204 never carries Content-Length (RFC
        9110 8.6).
        """
        request = self.request
        own = self.proxy.response_lines(self)
        owned = self.proxy.owned_fields if own else ()
        fields = []
        named = None
        request_id_seen = length_known = False
        for name, value in headers:
            lowered = name.lower()
            if lowered in HOP_BY_HOP:
                if lowered == b"connection":
                    named = {t.strip().lower() for t in value.split(b",")}
                continue
            if lowered == b"content-length":
                if chunked or codings or status == 204:
                    continue
                length_known = True
            elif lowered == b"x-request-id":
                request_id_seen = True
            elif lowered in owned:
                continue
            fields.append((name, value))
        if named:
            fields = [(name, value) for name, value in fields if name.lower() not in named]
            length_known = length_known and b"content-length" not in named
        if not request_id_seen:
            fields.append((b"X-Request-ID", self.request_id))
        for name, values in request.responseHeaders.getAllRawHeaders():
            fields.extend((name, value) for value in values)
        version = request.clientproto
        if (version == b"HTTP/1.1" and not length_known and request.method != b"HEAD"
                and status not in http.NO_BODY_CODES):
            fields.append((b"Transfer-Encoding", codings + b", chunked" if codings else b"chunked"))
            request.chunked = 1
        lines = [b"%s %d %s" % (version, status, reason)]
        lines += [b"%s: %s" % field for field in fields]
        lines.append(own)  # ready lines, each ending in CRLF (or none)
        request.startedWriting = 1
        # One joined write: the transport checks every piece of a writeSequence in a
        # Python call (four per field, a tenth of a proxied request's CPU in all).
        request.channel.transport.write(b"\r\n".join(lines) + b"\r\n")

    def _start_tunnel(self, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        """After a 101, join the two connections: bytes flow both ways until one closes.

        The 101 head goes to the client as the backend sent it (Connection and
        Upgrade included: they are the point of it), plus the request id and the
        limiter's fields like every other response. The client channel's own
        parsing stops; what it had buffered after the request goes on first.
        """
        self._disarm()
        request = self.request
        channel = request.channel
        client = channel.transport
        lines = [b"HTTP/1.1 101 %s\r\n" % reason]
        lines.extend(b"%s: %s\r\n" % (name, value) for name, value in headers)
        if not any(name.lower() == b"x-request-id" for name, _ in headers):
            lines.append(b"X-Request-ID: %s\r\n" % self.request_id)
        lines.append(self.proxy.response_lines(self))
        lines.append(b"\r\n")
        client.writeSequence(lines)
        request.startedWriting = True
        channel.setTimeout(None)
        backend_side = self.connection.transport
        channel.dataReceived = backend_side.write
        buffered = channel.take_buffered()
        if buffered:
            backend_side.write(buffered)
        client.unregisterProducer()
        client.registerProducer(backend_side, True)
        backend_side.registerProducer(_UploadThrottle(client), True)
        client.resumeProducing()

    def response_body(self, data: bytes) -> None:
        self.progress += 1
        self.bytes_sent += len(data)
        if self.status == 101:
            self.request.channel.transport.write(data)
        else:
            self.request.write(data)

    def response_done(self) -> None:
        self._disarm()
        self.connection = None
        if self.status == 101:
            self._finish_exchange()
            self.request.channel.transport.loseConnection()
            return
        self.request.unregisterProducer()
        self._complete()

    def response_failed(self, reason: Failure, response_started: bool) -> None:
        self._disarm()
        connection = self.connection
        self.connection = None
        backend = self.backend
        self._leave_backend()
        if self.finished:
            return
        self.last_failure = reason
        if response_started:
            backend.failures += 1
            log.warn("backend {url} broke off its response: {error}", url=backend.url,
                     error=reason.getErrorMessage())
            self.request.unregisterProducer()
            self._abort_client()
            return
        if connection is not None and self._resend_afresh(connection, backend):
            return
        backend.failures += 1
        if self.method in IDEMPOTENT_METHODS and not self.body_sent:
            self._retry_or_fail()
        else:
            self._gateway_failure()

    def _resend_afresh(self, connection: UpstreamConnection, backend: Backend) -> bool:
        """Send the request again on a fresh connection if its reused one died before any
        response byte: most likely the backend closed it as the request went out (the
        keep-alive race; connections it had closed before are never used, see
        ``UpstreamPool.get_idle``). Only for idempotent methods (RFC 9112 9.3.1.1: the
        backend may have read it), with the body kept for it; not a backend failure."""
        if not connection.reused or connection.received_any or self.fresh_only \
                or self.method not in IDEMPOTENT_METHODS:
            return False
        kept = self.resend_chunks
        if self.body_sent and kept is None:
            return False  # the body outgrew RESEND_BODY_BYTES: it cannot go again
        self.resend_chunks = None
        self.body_chunks = kept or None
        self.body_sent = False
        self.fresh_only = True
        self.tried.remove(backend)
        self.dispatch()
        return True

    # -- timeouts ----------------------------------------------------------------------

    def _arm(self, seconds: float) -> None:
        if not seconds:
            return
        if self.timer is not None and self.timer.active():
            self.timer.reset(seconds)
        else:
            self.timer = self.proxy.clock.callLater(seconds, self._timed_out, self.progress)

    def _disarm(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def _timed_out(self, progress_when_armed: int) -> None:
        self.timer = None
        if self.status and self.progress != progress_when_armed:
            self._arm(self.proxy.config.timeouts.idle)
            return
        connection = self.connection
        self.connection = None
        backend = self.backend
        if connection is not None:
            connection.abort()
        self._leave_backend()
        if backend is not None:
            backend.failures += 1
        if self.status:
            log.warn("backend {url} went idle mid-response", url=backend.url if backend else "?")
            self.request.unregisterProducer()
            self._abort_client()
        else:
            self.respond_locally(504, "gateway_timeout", "the backend did not answer in time")

    # -- endings -------------------------------------------------------------------------

    def respond_locally(self, status: int, code: str, message: str,
                        extra_headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        """Answer with the proxy's own JSON error (or a 429), never after a response began."""
        request = self.request
        if request.parsing:
            self.proxy.clock.callLater(0, self.respond_locally, status, code, message,
                                       extra_headers)
            return
        if self.finished or request.startedWriting or request.channel is None:
            return
        if status >= 500 and status != 503 or code in ("no_healthy_backend", "proxy_overloaded"):
            self.proxy.stats.errors += 1
        self.status = status
        body = error_body(code, message)
        reason = http.RESPONSES.get(status) or OWN_REASONS[status]
        request.setResponseCode(status, reason)
        fields = [*JSON_HEADERS, *extra_headers, (b"Content-Length", b"%d" % len(body)),
                  (b"Date", http.datetimeToString())]
        self._write_head(status, reason, fields, False)
        if self.method != b"HEAD":
            self.bytes_sent = len(body)
            request.channel.transport.write(body)
        self._complete()

    def _complete(self) -> None:
        request = self.request
        if not request.body_done:
            # The body never ended: the rest of it cannot be told from a next request.
            request.channel.persistent = False
            self._resume_client()
        self._finish_exchange()
        if request.channel is not None:
            request.finish()

    def _abort_client(self) -> None:
        self._finish_exchange()
        if self.request.channel is not None:
            self.request.channel.transport.abortConnection()

    def _leave_backend(self) -> None:
        backend = self.backend
        if backend is not None:
            backend.in_flight -= 1
            self.backend = None
            self.proxy.backend_released(backend)

    def _finish_exchange(self) -> None:
        if self.finished:
            return
        self.finished = True
        # The request lets go of its exchange, so the two are freed by reference
        # counting when the response is done, not by the cyclic collector (whose
        # passes over that garbage, every few dozen requests, cost a tenth of the CPU).
        request = self.request
        request.exchange = None
        request.answered = True
        backend = self.backend
        if backend is not None:
            backend.in_flight -= 1
            self.proxy.backend_released(backend)
        self.proxy.exchange_done(self, backend, self.proxy.clock.seconds() - self.started)

    def client_lost(self) -> None:
        """The client went away: abandon the backend request (SPEC 4.1)."""
        if self.finished:
            return
        self._disarm()
        pending, self.pending = self.pending, None
        connection = self.connection
        self.connection = None
        if connection is not None:
            connection.abort()
        self.status = self.status or 499
        if pending is not None:
            self._leave_backend()  # the request never reached it
        self._finish_exchange()
        if pending is not None:
            # Only now: cancelling fails the attempt at once, which must be neither
            # a backend failure nor a reason to retry elsewhere.
            pending.cancel()


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


class PassiveHealth(Protocol):
    """What the proxy tells about connection failures: the HealthMonitor listens."""

    def record_connect_failure(self, backend: Backend, reason: str) -> None: ...

    def record_connect_success(self, backend: Backend) -> None: ...


class Proxy:
    """Everything exchanges share: backends, connections, settings, counters."""

    def __init__(self, pool: BackendPool, upstreams: UpstreamPool, config: ProxyConfig,
                 clock: IReactorTime, stats: TrafficStats, passive: PassiveHealth, *,
                 scheme: bytes = b"http") -> None:
        self.pool = pool
        self.upstreams = upstreams
        self.config = config
        self.clock = clock
        self.stats = stats
        self.scheme = scheme
        self.log_access = True
        self.access_log = AccessLog()
        self.hash_key: Callable[[Exchange], str] | None = None
        self.active = 0
        self.stopping = False
        self._idle_waiters: list[Deferred[None]] = []
        self.passive = passive
        self.admit: Callable[[Exchange], None] = Exchange.dispatch
        self.response_lines: Callable[[Exchange], bytes] = no_lines
        self.owned_fields: frozenset[bytes] = frozenset()
        self.resource_warning = ThrottledWarning(clock, RESOURCE_WARNING_SECONDS)

    def backend_released(self, backend: Backend) -> None:
        """A backend has one request fewer in flight; a draining one may be done."""
        if backend.draining and backend.in_flight == 0:
            self.pool.drained(backend)

    def wait_idle(self) -> Deferred[None]:
        """Stop keeping client connections alive; fires when no exchange is in flight."""
        self.stopping = True
        waiter: Deferred[None] = Deferred()
        if self.active == 0:
            waiter.callback(None)
        else:
            self._idle_waiters.append(waiter)
        return waiter

    def exchange_done(self, exchange: Exchange, backend: Backend | None,
                      seconds: float) -> None:
        self.active -= 1
        if self.active == 0 and self._idle_waiters:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)
        status = exchange.status
        self.stats.record(status, backend, seconds)
        if self.log_access:
            request = exchange.request
            addresses, ids = upstreams_tried(exchange.tried)
            self.access_log.log(
                exchange.client, request.method.decode("latin-1"),
                request.uri.decode("latin-1"), status, exchange.bytes_sent,
                round(seconds * 1000, 3), ids,
                exchange.request_id.decode("latin-1"), exchange.rate_limit, addresses)


def upstreams_tried(tried: list[Backend]) -> tuple[str, str]:
    """The access log's backends, as nginx's ``$upstream_addr``: every backend the request
    went to, in order, by ``host:port`` (``a:1, b:2``, the last one answered if any did),
    and their ids the same way; ``-`` when the proxy answered without one (429, 503)."""
    if not tried:
        return "-", "-"
    if len(tried) == 1:
        return tried[0].address, tried[0].id
    return ", ".join(b.address for b in tried), ",".join(b.id for b in tried)


def _expects_continue(request: http.Request) -> bool:
    """Whether twisted.web answered this request's ``Expect: 100-continue`` itself (it does
    for every HTTP/1.1 request that asks, as soon as the head is read)."""
    expect = request.requestHeaders.getRawHeaders(b"expect")
    return bool(expect) and expect[0].lower() == b"100-continue"


class ThrottledWarning:
    """A warning logged at most once per ``interval`` seconds, with how many were held back:
    a flood of one local error (EMFILE on every request) must not flood the log too."""

    def __init__(self, clock: IReactorTime, interval: float) -> None:
        self._clock = clock
        self._interval = interval
        self._next = 0.0
        self.held_back = 0

    def report(self, error: str) -> None:
        now = self._clock.seconds()
        if now < self._next:
            self.held_back += 1
            return
        log.warn("the proxy cannot open connections to backends: {error}"
                 " ({held_back} more since the last warning); backends are not blamed",
                 error=error, held_back=self.held_back)
        self.held_back = 0
        self._next = now + self._interval


def no_lines(exchange: Exchange) -> bytes:
    """The response header lines of an exchange when no limiter adds any."""
    return b""


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
    ``take_buffered`` for the rest of the proxy.
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

    def take_buffered(self) -> bytes:
        """What the client sent after the request being answered, parsed no further (an
        upgraded connection's first tunnelled bytes); the channel forgets it."""
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
        tokens = {token.strip().lower() for value in values for token in value.split(b",")}
        if version == b"HTTP/1.1" and b"close" in tokens:
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


def key_reader(spec: str) -> Callable[[Exchange], str]:
    """How to read a client key (``ip``, ``header:NAME``, ``cookie:NAME``) off an exchange.

    A missing header or cookie falls back to the client address, so every
    request has a key and a client cannot escape a limit by leaving one out.
    """
    kind, _, name = spec.partition(":")
    if kind == "header":
        header = name.encode("latin-1")

        def from_header(exchange: Exchange) -> str:
            values = exchange.request.requestHeaders.getRawHeaders(header)
            return _usable_key(values[0], exchange) if values else exchange.client

        return from_header
    if kind == "cookie":
        cookie = name.encode("latin-1")

        def from_cookie(exchange: Exchange) -> str:
            value = exchange.request.received_cookies.get(cookie)
            return _usable_key(value, exchange) if value is not None else exchange.client

        return from_cookie
    return _client_of


def _client_of(exchange: Exchange) -> str:
    return exchange.client


MAX_KEY_LENGTH = 512
"""Longest key stored as it is (the bucket store's client_id limit)."""


def _usable_key(value: bytes, exchange: Exchange) -> str:
    """A header or cookie value as a bucket key: UTF-8 text (latin-1 if it is not), the
    client address when empty, a digest when overlong, so no value escapes the limit."""
    if not value:
        return exchange.client
    if len(value) > MAX_KEY_LENGTH:
        return "sha256:" + hashlib.sha256(value).hexdigest()
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")
