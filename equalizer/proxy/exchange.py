"""One client request through the proxy: its head read once, the backend chosen (again
on a retry), the proxy's own answers, and the accounting when it is over.

The client connection (``equalizer.proxy.front``) starts an exchange as soon as the
request head is parsed (or, pipelined, when the requests ahead are answered) and feeds
it the body as it arrives, through the ``ClientRequest`` it talks to. Each try on a backend
is an ``Attempt`` (``equalizer.proxy.attempt``); an upgrade becomes a ``Tunnel``.
"""

from __future__ import annotations

from collections.abc import Callable
from random import getrandbits
from typing import TYPE_CHECKING, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError
from twisted.internet.error import TimeoutError as ConnectTimeout
from twisted.logger import Logger
from twisted.web.http import RESPONSES, datetimeToString

from equalizer.logs.service import AccessLog
from equalizer.proxy.admission import ADMIT_ALL, Admission
from equalizer.proxy.attempt import Attempt
from equalizer.proxy.deadlines import Deadlines
from equalizer.proxy.headers import client_address, forwarded_lines, split_request_headers
from equalizer.proxy.queueing import RETRY_AFTER, wait_for_slot
from equalizer.proxy.request_head import NOT_A_PATH, host_problem, split_absolute_target
from equalizer.proxy.response import JSON_HEADERS, OWN_REASONS, error_body, write_head
from equalizer.proxy.retry import RetryPolicy
from equalizer.proxy.upstream import UpstreamError
from equalizer.routing.pools import PoolUnit
from equalizer.routing.table import route_exchange

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime
    from twisted.python.failure import Failure

    from equalizer.balancer.outlier import OutlierDetector
    from equalizer.balancer.pool import Backend, BackendPool
    from equalizer.balancer.queue import Ticket
    from equalizer.balancer.stats import TrafficStats
    from equalizer.config.model import ProxyConfig
    from equalizer.proxy.client import ClientRequest
    from equalizer.proxy.upstream import UpstreamPool
    from equalizer.routing.table import Route, RouteTable

log = Logger()

RESOURCE_WARNING_SECONDS = 10.0
"""At most one warning this often while the proxy cannot open sockets (EMFILE)."""


class Exchange:
    """One client request on its way to a backend and its response on the way back.

    Lifecycle: ``start`` → admission → ``dispatch`` (choose a backend, one ``Attempt``
    on it) → the attempt relays the response → ``complete``. A connection failure
    before anything was sent retries on another backend; so does any failure before
    the response began, for idempotent requests whose body has not started going out.
    """

    __slots__ = (
        "proxy", "request", "client", "method", "request_id", "started", "tried", "attempt",
        "body_chunks", "body_ended", "fresh_only", "bytes_sent", "status", "finished",
        "headers_block", "host", "chunked_body", "body_follows", "head_request",
        "rate_limit", "limit_lines", "last_failure", "problem", "ticket", "bytes_received",
        "unit", "route", "target", "policy",
    )

    def __init__(self, proxy: Proxy, request: ClientRequest) -> None:
        self.proxy = proxy
        proxy.active += 1
        self.request = request
        self.method = request.method
        self.started = proxy.clock.seconds()
        self.tried: list[Backend] = []
        self.attempt: Attempt | None = None
        self.body_chunks: list[bytes] | None = None
        self.body_ended = request.body_done
        self.fresh_only = False
        self.bytes_sent = 0
        self.bytes_received = 0
        self.status = 0
        self.finished = False
        self.rate_limit = "off"
        self.limit_lines = b""  # the admission's header lines for the response
        self.last_failure: Failure | None = None
        self.ticket: Ticket | None = None
        length = request.body_length
        self.chunked_body = length is None
        self.body_follows = length != 0
        self.head_request = self.method == b"HEAD"
        self.unit: PoolUnit | None = proxy.default_unit
        self.route: Route | None = None
        self.policy = None
        self._read_request_head()

    # -- request head --------------------------------------------------------------

    def _read_request_head(self) -> None:
        """Copy the end-to-end headers once; the Host and request line differ per backend."""
        request = self.request
        proxy = self.proxy
        lines, hosts, forwarded_for, request_id = split_request_headers(request)
        peer = request.peer_host
        self.client = client_address(peer, forwarded_for, proxy.config.trusted_proxies)
        # For correlation, not secrecy: no system call per request, as os.urandom made.
        self.request_id = request_id or b"%032x" % getrandbits(128)
        lines.append(forwarded_lines(peer, forwarded_for, proxy.scheme, self.request_id))
        self.problem, host = refusal(request, hosts)
        self.target = request.target
        if proxy.router is not None and self.problem is None:
            lines = route_exchange(self, host, lines)
        if host is not None:
            lines.append(b"X-Forwarded-Host: %s\r\n" % host)
        if self.chunked_body:
            lines.append(b"Transfer-Encoding: chunked\r\n")
        elif self.body_follows or b"content-length" in request.requestHeaders.index:
            lines.append(b"Content-Length: %d\r\n" % request.body_length)
        lines.append(b"\r\n")
        self.host = host
        self.headers_block = b"".join(lines)

    def head_for(self, backend: Backend) -> bytes:
        host = self.host if self.proxy.config.preserve_host and self.host else backend.host_header
        return b"%s %s%s HTTP/1.1\r\nHost: %s\r\n%s" % (
            self.method, backend.prefix, self.target, host, self.headers_block)

    # -- choosing a backend ----------------------------------------------------------

    def start(self, early_body: list[bytes] | None = None) -> None:
        """Admission, then a backend; ``early_body`` is what the client sent of the body
        while the request waited behind others on its connection."""
        if early_body:
            self.body_chunks = early_body
            self.bytes_received = sum(map(len, early_body))
        problem = self.problem
        if problem is None:
            if self.unit is None:
                self.respond_locally(404, "no_route", "no route matches this request")
                return
            self.proxy.admit(self)
        else:
            self.request.no_keep_alive()
            self.respond_locally(400, "bad_request", problem)

    def dispatch(self) -> None:
        """Send the request to a backend not tried yet, or answer for the backends."""
        if self.finished:
            return
        backend = self.choose()
        if backend is None:
            if self.unit.pool.all_full(self.tried):
                wait_for_slot(self)
            elif self.tried:
                self.gateway_failure()
            else:
                self.respond_locally(503, "no_healthy_backend", "no healthy backend is available",
                                     RETRY_AFTER)
            return
        self.send_to(backend)

    def choose(self) -> Backend | None:
        """A candidate not tried yet (nor full), by the pool's strategy."""
        unit = self.unit
        hash_key = unit.hash_key
        return unit.pool.choose(
            hash_key(self).encode("utf-8", "surrogateescape") if hash_key else None, self.tried)

    def send_to(self, backend: Backend) -> None:
        self.tried.append(backend)
        backend.in_flight += 1
        attempt = self.attempt = Attempt(self, backend)
        attempt.start(None if self.fresh_only else self.proxy.upstreams.get_idle(backend))

    def retry_or_fail(self, backend: Backend, reason: str) -> None:
        """Another backend after ``backend`` failed (``RETRY_REASONS``), or the gateway error."""
        if len(self.tried) <= self.proxy.config.retries:
            self.proxy.stats.retries += 1
            backend.retries[reason] = backend.retries.get(reason, 0) + 1
            self.dispatch()
        else:
            self.gateway_failure()

    def resend_afresh(self, backend: Backend, body: list[bytes] | None) -> None:
        """The same backend again, on a new connection, with the body kept for it: its
        reused connection was closed under the request (see ``Attempt``)."""
        self.body_chunks = body or None
        self.fresh_only = True
        self.tried.remove(backend)
        self.dispatch()

    def gateway_failure(self) -> None:
        """502 or 504 for the last attempt's failure, in words that tell an operator which."""
        self.respond_locally(*gateway_answer(self.last_failure))

    # -- request body --------------------------------------------------------------

    def body_chunk(self, data: bytes) -> None:
        self.bytes_received += len(data)
        if self.finished:
            return
        attempt = self.attempt
        if attempt is not None and attempt.connection is not None:
            attempt.send_body(data)
            throttle = attempt.throttle
            if throttle is not None and throttle.paused:
                self.pause_client()
            return
        if self.body_chunks is None:
            self.body_chunks = []
        self.body_chunks.append(data)
        self.pause_client()

    def body_end(self) -> None:
        self.body_ended = True
        attempt = self.attempt
        if attempt is not None and attempt.connection is not None and not self.finished:
            attempt.end_body()

    def pause_client(self) -> None:
        transport = self.request.transport
        if transport is not None:
            transport.pauseProducing()

    def resume_client(self) -> None:
        transport = self.request.transport
        if transport is not None:
            transport.resumeProducing()

    # -- endings -------------------------------------------------------------------------

    def respond_locally(self, status: int, code: str, message: str,
                        extra_headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        """Answer with the proxy's own JSON error (or a 429), never after a response began."""
        request = self.request
        if self.finished or request.head_sent or request.transport is None:
            return
        if status >= 500 and status != 503 or code in ("no_healthy_backend", "proxy_overloaded"):
            self.proxy.stats.errors += 1
        self.status = status
        body = error_body(code, message)
        reason = RESPONSES.get(status) or OWN_REASONS[status]
        fields = [*JSON_HEADERS, *extra_headers, (b"Content-Length", b"%d" % len(body)),
                  (b"Date", datetimeToString())]
        write_head(self, status, reason, fields, False, hold=True)
        if self.method != b"HEAD":
            self.bytes_sent = len(body)
            request.write(body)
        self.complete()

    def complete(self) -> None:
        request = self.request
        self.finish()
        if request.transport is not None:
            request.finish()

    def abort_client(self) -> None:
        self.finish()
        transport = self.request.transport
        if transport is not None:
            transport.abortConnection()

    def finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        # The request lets go of its exchange and the exchange of its attempt, so all
        # are freed by reference counting when the response is done, not by the cyclic
        # collector (whose passes over that garbage, every few dozen requests, cost a
        # tenth of the CPU).
        request = self.request
        request.exchange = None
        request.answered = True
        attempt = self.attempt
        self.attempt = None
        backend = None
        if attempt is not None:
            backend = attempt.backend
            attempt.leave_backend()
        self.proxy.exchange_done(self, backend, self.proxy.clock.seconds() - self.started)

    def client_lost(self) -> None:
        """The client went away: abandon the backend request (SPEC 4.1)."""
        if self.finished:
            return
        ticket = self.ticket
        if ticket is not None:
            self.ticket = None
            self.unit.pool.queue.leave(ticket)  # gone from the queue at once
        attempt = self.attempt
        pending = attempt.abandon() if attempt is not None else None
        self.status = self.status or 499
        self.finish()
        if pending is not None:
            # Only now: cancelling fails the attempt at once, which must be neither
            # a backend failure nor a reason to retry elsewhere.
            pending.cancel()


def refusal(request: ClientRequest, hosts: list[bytes] | None
            ) -> tuple[str | None, bytes | None]:
    """What makes the request one a reverse proxy must refuse (RFC 9112 3.2), if anything,
    and the host it is for.

    An absolute-form target (RFC 9112 3.2.2) becomes the origin-form the backend
    gets, and its authority the host (3.2.3: the Host header is then ignored, though
    it must still be there, once, and valid). Asterisk-form and CONNECT's
    authority-form are refused: this is not a forward proxy.
    """
    host = hosts[0] if hosts else None
    if request.method == b"CONNECT":
        return NOT_A_PATH, host
    if hosts and len(hosts) > 1:
        return "a request carries one Host header only", host
    if host is None:
        if request.version == b"HTTP/1.1":
            return "an HTTP/1.1 request must carry a Host header", host
    else:
        problem = host_problem(host)
        if problem is not None:
            return problem, host
    target = request.target
    if target[:1] != b"/":
        split = split_absolute_target(target)
        if isinstance(split, str):
            return split, host
        host, target = split
        request.target = target
        request.path = target.split(b"?", 1)[0]
        request.requestHeaders.setRawHeaders(b"host", [host])
    return None, host


def gateway_answer(failure: Failure | None) -> tuple[int, str, str]:
    """The status, code and message of the 502 or 504 for an attempt's failure."""
    if failure is not None and failure.check(ConnectTimeout):
        return 504, "gateway_timeout", "the backend did not accept the connection in time"
    if failure is None or failure.check(ConnectError):
        return 502, "bad_gateway", "no backend could be reached"
    if failure.check(UpstreamError):
        return 502, "bad_gateway", "the backend's response was not valid HTTP"
    return 502, "bad_gateway", "the backend failed before answering"


class PassiveHealth(Protocol):
    """What the proxy tells about connection failures: the HealthMonitor listens."""

    def record_connect_failure(self, backend: Backend, reason: str,
                               kind: str = "connect") -> None: ...

    def record_connect_success(self, backend: Backend) -> None: ...


class Proxy:
    """Everything exchanges share: backends, connections, settings, admission, counters."""

    def __init__(self, pool: BackendPool, upstreams: UpstreamPool, config: ProxyConfig,
                 clock: IReactorTime, stats: TrafficStats, passive: PassiveHealth, *,
                 scheme: bytes = b"http", admission: Admission = ADMIT_ALL) -> None:
        self.pool = pool
        self.default_unit = PoolUnit("default", pool, passive)
        self.router: RouteTable | None = None
        self.upstreams = upstreams
        self.clock = clock
        self.deadlines = Deadlines(clock)
        self.stats = stats
        self.scheme = scheme
        self.access_log = AccessLog()
        self.active = 0
        self.stopping = False
        self._idle_waiters: list[Deferred[None]] = []
        self.passive = passive
        self.resource_warning = ThrottledWarning(clock, RESOURCE_WARNING_SECONDS)
        self.configure(config, admission)

    def configure(self, config: ProxyConfig, admission: Admission = ADMIT_ALL, *,
                  hash_key: Callable[[Exchange], str] | None = None,
                  log_access: bool = True, outlier: OutlierDetector | None = None) -> None:
        """Take new settings (start-up and SIGHUP reload): the admission every request
        goes through (once), the client key ``hash`` balancing uses, if it does, and
        outlier detection, when on."""
        self.config = config
        self.hash_key = self.default_unit.hash_key = hash_key
        self.log_access = log_access
        self.outlier = self.default_unit.outlier = outlier
        self.retry = RetryPolicy.from_names(config.retry_on)
        self.retry_statuses = self.retry.statuses
        # Bound once here, called once per request.
        self.admit = admission.admit
        self.owned_fields: frozenset[bytes] = admission.owned_fields

    def route_with(self, router: RouteTable | None) -> None:
        """Take a new route table (start-up and reload), None without routes; exchanges
        under way keep the route they had."""
        self.router = router

    def backend_released(self, backend: Backend, pool: BackendPool | None = None) -> None:
        """A backend has one request fewer in flight; a draining one may be done, and a
        request waiting in its pool's queue may take the slot."""
        pool = pool or self.pool
        if backend.draining and backend.in_flight == 0:
            pool.drained(backend)
        queue = pool.queue
        if queue.waiting:
            queue.wake()

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
        self.stats.record(status, backend, seconds, exchange.bytes_received,
                          exchange.bytes_sent)
        if self.log_access:
            request = exchange.request
            addresses, ids = upstreams_tried(exchange.tried)
            self.access_log.log(
                exchange.client, request.method.decode("latin-1"),
                request.target.decode("latin-1"), status, exchange.bytes_sent,
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
