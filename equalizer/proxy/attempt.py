"""One try of a client request on one backend: connect (or reuse), send the head and
body, relay the response, and decide what a failure means.

An exchange makes a new ``Attempt`` for every backend it tries, so what belongs to
one try (its connection, its timer, the body kept for a resend) is never left over
from the last one. What the failure means for the whole request (retry elsewhere,
502, 504) is the exchange's call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.error import TimeoutError as ConnectTimeout
from twisted.logger import Logger
from twisted.web import http

from equalizer.balancer.failures import is_local_resource_error
from equalizer.proxy.backpressure import UploadThrottle
from equalizer.proxy.framing import UpstreamError
from equalizer.proxy.queueing import out_of_resources
from equalizer.proxy.response import relay_informational, write_head
from equalizer.proxy.retry import (
    IDEMPOTENT_METHODS,
    after_connect_failure,
    may_retry,
    resend_afresh,
    retry_after_timeout,
)
from equalizer.proxy.tunnel import Tunnel

if TYPE_CHECKING:
    from twisted.python.failure import Failure

    from equalizer.balancer.pool import Backend
    from equalizer.proxy.deadlines import Deadline
    from equalizer.proxy.exchange import Exchange
    from equalizer.proxy.upstream import UpstreamConnection

log = Logger()

RESEND_BODY_BYTES = 64 * 1024
"""Request body bytes kept, per request sent on a reused backend connection, until the
first response byte, so that an idempotent request can go again on a fresh connection
if the backend had closed the reused one; a longer body is not kept (nor resent)."""


def failure_reason(reason: Failure, connecting: bool) -> str:
    """The ``FAILURE_REASONS`` name of a failed connect (counted in ``backend.failures`` by
    the health monitor, with the passive check), or of a response that failed before it
    began."""
    if connecting:
        return "connect_timeout" if reason.check(ConnectTimeout) else "connect"
    return "invalid_response" if reason.check(UpstreamError) else "closed"


class Attempt:
    """One try on one backend: the request, and the response (an upstream ResponseHandler)."""

    __slots__ = ("exchange", "backend", "connection", "pending", "body_sent", "throttle",
                 "timer", "progress", "resend_chunks", "resend_bytes")

    def __init__(self, exchange: Exchange, backend: Backend) -> None:
        self.exchange = exchange
        self.backend: Backend | None = backend
        self.connection: UpstreamConnection | None = None
        self.pending = None
        self.body_sent = False
        self.throttle: UploadThrottle | None = None
        self.timer: Deadline | None = None
        self.progress = 0
        self.resend_chunks: list[bytes] | None = None
        self.resend_bytes = 0

    # -- connecting --------------------------------------------------------------------

    def start(self, idle: UpstreamConnection | None) -> None:
        """Send on ``idle``, a kept-alive connection, or on a new one."""
        if idle is not None:
            self._send(idle)
            return
        exchange = self.exchange
        if exchange.body_follows and not exchange.body_ended:
            exchange.pause_client()
        self.pending = exchange.proxy.upstreams.connect(self.backend)
        self.pending.addCallbacks(self._connected, self._connect_failed)

    def _connected(self, connection: UpstreamConnection) -> None:
        self.pending = None
        proxy = self.exchange.proxy
        self.exchange.unit.passive.record_connect_success(connection.backend)
        if self.exchange.finished:
            proxy.upstreams.release(connection)
            return
        self._send(connection)

    def _connect_failed(self, reason: Failure) -> None:
        self.pending = None
        exchange = self.exchange
        if exchange.finished:
            return  # cancelled by client_lost, which has left the backend already
        backend = self.backend
        self.leave_backend()
        if is_local_resource_error(reason):
            out_of_resources(exchange, backend, reason)
            return
        exchange.last_failure = reason
        kind = failure_reason(reason, connecting=True)
        exchange.unit.passive.record_connect_failure(backend, reason.getErrorMessage(), kind)
        log.debug("connect to {url} failed: {error}", url=backend.url,
                  error=reason.getErrorMessage())
        after_connect_failure(exchange, backend, kind)

    # -- the request ---------------------------------------------------------------------

    def _send(self, connection: UpstreamConnection) -> None:
        self.connection = connection
        exchange = self.exchange
        connection.send_head(exchange.head_for(connection.backend), self,
                             head_request=exchange.head_request,
                             chunked_body=exchange.chunked_body,
                             body_follows=exchange.body_follows)
        if not exchange.body_follows:
            self._arm(exchange.proxy.config.timeouts.response)
            return
        if connection.reused and exchange.method in IDEMPOTENT_METHODS:
            self.resend_chunks, self.resend_bytes = [], 0
        self.throttle = UploadThrottle(exchange.request.transport)
        connection.transport.registerProducer(self.throttle, True)
        buffered, exchange.body_chunks = exchange.body_chunks, None
        for chunk in buffered or ():
            self.send_body(chunk)
        exchange.resume_client()
        if exchange.body_ended:
            self.end_body()

    def send_body(self, data: bytes) -> None:
        self.body_sent = True
        self.connection.send_body(data)
        kept = self.resend_chunks
        if kept is not None:
            # Kept until the response begins, up to RESEND_BODY_BYTES; past it the
            # request can no longer be sent again.
            self.resend_bytes += len(data)
            if self.resend_bytes > RESEND_BODY_BYTES:
                self.resend_chunks = None
            else:
                kept.append(data)

    def end_body(self) -> None:
        connection = self.connection
        connection.end_body()
        if self.throttle is not None:
            connection.transport.unregisterProducer()
            self.throttle = None
        if self.exchange.status == 0:
            self._arm(self.exchange.proxy.config.timeouts.response)

    # -- the response (ResponseHandler) ----------------------------------------------------

    def response_informational(self, status: int, reason: bytes,
                               headers: list[tuple[bytes, bytes]]) -> None:
        self.resend_chunks = None
        relay_informational(self.exchange, status, reason, headers)

    def response_head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]],
                      chunked: bool, codings: bytes) -> None:
        exchange = self.exchange
        proxy = exchange.proxy
        if exchange.unit.outlier is not None:
            exchange.unit.outlier.answered(self.backend, status)
        if status in proxy.retry_statuses and may_retry(self):
            self._retry_elsewhere(self.backend, "status")
            return
        exchange.status = status
        self.resend_chunks = None
        if status == 101:
            self._disarm()
            self.connection.handler = Tunnel(self, reason, headers)
            return
        request = exchange.request
        if codings and request.version != b"HTTP/1.1" and not exchange.head_request \
                and status not in http.NO_BODY_CODES:
            self._refuse_codings()
            return
        self._arm(proxy.config.timeouts.idle)
        write_head(exchange, status, reason, headers, chunked, codings,
                   hold=self.connection.body_in_hand)
        request.register_producer(self.connection)

    def _refuse_codings(self) -> None:
        """502 for a body in a transfer coding (``gzip``) an HTTP/1.0 client cannot be sent:
        RFC 9112 6.1 forbids Transfer-Encoding towards it, and passing the bytes as the
        content would corrupt it. The backend did nothing wrong: not counted against it."""
        self.abandon()
        self.leave_backend()
        self.exchange.respond_locally(502, "bad_gateway", "the backend's response uses a "
                                      "transfer coding that cannot be sent to an HTTP/1.0 client")

    def response_body(self, data: bytes) -> None:
        self.progress += 1
        exchange = self.exchange
        exchange.bytes_sent += len(data)
        exchange.request.write(data)

    def response_done(self) -> None:
        self._disarm()
        self.connection = None
        exchange = self.exchange
        exchange.request.unregister_producer()
        exchange.complete()

    def response_failed(self, reason: Failure, response_started: bool) -> None:
        self._disarm()
        connection, self.connection = self.connection, None
        backend = self.backend
        self.leave_backend()
        exchange = self.exchange
        if exchange.finished:
            return
        exchange.last_failure = reason
        if response_started:
            backend.fail("cut_off")
            log.warn("backend {url} broke off its response: {error}", url=backend.url,
                     error=reason.getErrorMessage())
            exchange.request.unregister_producer()
            exchange.abort_client()
            return
        if connection is not None and resend_afresh(self, connection, backend):
            return
        kind = failure_reason(reason, connecting=False)
        backend.fail(kind)
        if exchange.unit.outlier is not None:
            exchange.unit.outlier.gateway_error(backend, "broken response")
        if exchange.method in IDEMPOTENT_METHODS and not self.body_sent:
            exchange.retry_or_fail(backend, kind)
        else:
            exchange.gateway_failure()

    def _retry_elsewhere(self, backend: Backend, reason: str) -> None:
        """Drop ``backend``'s answer (its connection closes) and try another backend;
        ``reason`` is one of ``RETRY_REASONS``."""
        log.debug("retrying on another backend after {reason}", reason=reason)
        self.abandon()
        self.leave_backend()
        self.exchange.retry_or_fail(backend, reason)

    # -- leaving -------------------------------------------------------------------------

    def leave_backend(self) -> None:
        backend = self.backend
        if backend is not None:
            backend.in_flight -= 1
            self.backend = None
            self.exchange.proxy.backend_released(backend, self.exchange.unit.pool)

    def abandon(self):
        """Drop the connection (or the connect under way, returned for the exchange to
        cancel once it is finished: cancelling fails the connect at once)."""
        self._disarm()
        pending, self.pending = self.pending, None
        connection, self.connection = self.connection, None
        if connection is not None:
            connection.abort()
        if pending is not None:
            self.leave_backend()  # the request never reached it
        return pending

    # -- timeouts ------------------------------------------------------------------------

    def _arm(self, seconds: float) -> None:
        if not seconds:
            return
        self._disarm()
        self.timer = self.exchange.proxy.deadlines.arm(seconds, self._timed_out, self.progress)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.call_off()
            self.timer = None

    def _timed_out(self, progress_when_armed: int) -> None:
        self.timer = None
        exchange = self.exchange
        if exchange.status and self.progress != progress_when_armed:
            self._arm(exchange.proxy.config.timeouts.idle)
            return
        backend = self.backend
        if backend is not None:
            backend.fail("idle_timeout" if exchange.status else "response_timeout")
        if not exchange.status and backend is not None and retry_after_timeout(self, backend):
            self._retry_elsewhere(backend, "response_timeout")
            return
        connection, self.connection = self.connection, None
        if connection is not None:
            connection.abort()
        self.leave_backend()
        if exchange.status:
            log.warn("backend {url} went idle mid-response", url=backend.url if backend else "?")
            exchange.request.unregister_producer()
            exchange.abort_client()
        else:
            exchange.respond_locally(504, "gateway_timeout", "the backend did not answer in time")
