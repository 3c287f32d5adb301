"""Tests for equalizer.health: the HealthMonitor on a fake clock, and one real HTTP check.

The monitor tests drive time with `Clock` and answer checks by hand through a
fake `IHealthChecker` whose Deferreds the test fires, so a check can be made to
hang, fail or time out at a chosen moment.
"""

from __future__ import annotations

import errno

import pytest
from attrs import define, field
from twisted.internet.defer import Deferred, TimeoutError, succeed
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.error import ConnectBindError, ConnectionRefusedError
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web.client import URI, ResponseFailed
from zope.interface import implementer
from zope.interface.verify import verifyObject

from equalizer.balancer.checker import (
    HTTPHealthChecker,
    IHealthChecker,
    _QuietEndpoint,
    _QuietEndpoints,
    health_url,
)
from equalizer.balancer.health import HealthMonitor, describe
from equalizer.balancer.pool import Backend, BackendPool
from equalizer.config.model import BackendConfig, HealthConfig
from tests.helpers import result_of  # tests/ is on sys.path (rootdir-less "prepend" import mode)

INTERVAL = 10.0
TIMEOUT = 5.0
FAIL_TIMEOUT = 30.0


@define
class Call:
    backend: Backend
    path: str
    timeout: float
    deferred: Deferred[int] = field(init=False)
    cancelled: bool = False

    def __attrs_post_init__(self) -> None:
        self.deferred = Deferred(self._cancel)

    def _cancel(self, _: Deferred[int]) -> None:
        self.cancelled = True


@implementer(IHealthChecker)
@define
class FakeChecker:
    """A checker whose every check is a Deferred the test fires itself."""

    calls: list[Call] = field(factory=list)
    closed: int = 0
    error: Exception | None = None
    immediate: int | None = None

    def check(self, backend: Backend, path: str, timeout: float) -> Deferred[int]:
        if self.error is not None:
            raise self.error
        if self.immediate is not None:
            return succeed(self.immediate)
        call = Call(backend, path, timeout)
        self.calls.append(call)
        return call.deferred

    def close(self) -> Deferred[None]:
        self.closed += 1
        return succeed(None)

    def calls_for(self, backend: Backend) -> list[Call]:
        return [c for c in self.calls if c.backend is backend]

    def pending(self, backend: Backend) -> list[Call]:
        return [c for c in self.calls_for(backend) if not c.deferred.called]

    def answer(self, backend: Backend, result: int | Exception) -> None:
        """Fire the one pending check of ``backend`` with a status or an error."""
        (call,) = self.pending(backend)
        if isinstance(result, Exception):
            call.deferred.errback(Failure(result))
        else:
            call.deferred.callback(result)


@define
class Harness:
    pool: BackendPool
    checker: FakeChecker
    clock: Clock
    monitor: HealthMonitor

    @property
    def b1(self) -> Backend:
        return self.pool.backends[0]

    @property
    def b2(self) -> Backend:
        return self.pool.backends[1]

    def round(self, result: int | Exception, backend: Backend | None = None) -> None:
        """Answer the pending check of ``backend`` (b1), then advance to the next round."""
        self.checker.answer(backend or self.b1, result)
        self.clock.advance(self.monitor.config.interval)


def make(interval: float = INTERVAL, start: bool = True, **kwargs: object) -> Harness:
    pool = BackendPool(
        [BackendConfig("http://127.0.0.1:9001"), BackendConfig("http://127.0.0.1:9002")]
    )
    config = HealthConfig(
        path="/healthz",
        interval=interval,
        timeout=TIMEOUT,
        fail_timeout=FAIL_TIMEOUT,
        unhealthy_threshold=3,
        healthy_threshold=2,
        **kwargs,  # type: ignore[arg-type]
    )
    checker = FakeChecker()
    clock = Clock()
    monitor = HealthMonitor(pool, config, checker, clock)
    if start:
        monitor.startService()
    return Harness(pool, checker, clock, monitor)


def take_down(h: Harness) -> None:
    for _ in range(3):
        h.round(500)
    assert not h.b1.healthy


# -- the seam ----------------------------------------------------------------


def test_checkers_provide_the_interface() -> None:
    """Both the fake and the real checker provide IHealthChecker."""
    assert verifyObject(IHealthChecker, FakeChecker())
    assert verifyObject(IHealthChecker, HTTPHealthChecker(MemoryReactorClock()))


def test_health_url_joins_prefix_and_path() -> None:
    """A check asks for the health path under the backend URL's own path prefix."""
    backend = Backend.from_url("b1", "http://example.com:8000/api/")
    assert health_url(backend, "/healthz") == "http://example.com:8000/api/healthz"
    assert health_url(backend, "ping") == "http://example.com:8000/api/ping"
    v6 = Backend.from_url("b2", "http://[::1]/")
    assert health_url(v6, "/") == "http://[::1]:80/"


# -- timing ------------------------------------------------------------------


def test_start_checks_every_backend_with_the_configured_path_and_timeout() -> None:
    """Starting the monitor runs a first round at once, one check per backend."""
    h = make()
    assert [(c.backend, c.path, c.timeout) for c in h.checker.calls] == [
        (h.b1, "/healthz", TIMEOUT),
        (h.b2, "/healthz", TIMEOUT),
    ]


def test_next_round_comes_after_exactly_one_interval() -> None:
    """Just before the interval no new check starts; at the interval one does."""
    h = make()
    h.checker.answer(h.b1, 200)
    h.checker.answer(h.b2, 200)
    h.clock.advance(INTERVAL - 0.001)
    assert len(h.checker.calls) == 2
    h.clock.advance(0.001)
    assert len(h.checker.calls) == 4


def test_interval_zero_runs_no_checks() -> None:
    """With interval 0 the monitor schedules nothing and checks nothing."""
    h = make(interval=0)
    h.clock.advance(1000)
    assert h.checker.calls == []
    assert h.clock.getDelayedCalls() == []


# -- thresholds ----------------------------------------------------------------


def test_down_after_exactly_unhealthy_threshold_failures() -> None:
    """Two failed checks leave a backend in; the third takes it out."""
    h = make()
    h.round(500)
    h.round(500)
    assert h.b1.healthy
    h.round(500)
    assert not h.b1.healthy
    assert h.b1 not in h.pool.available
    assert h.b2 in h.pool.available


def test_up_after_exactly_healthy_threshold_successes() -> None:
    """One passing check leaves a down backend out; the second brings it back."""
    h = make()
    take_down(h)
    h.round(200)
    assert not h.b1.healthy
    h.round(200)
    assert h.b1.healthy
    assert h.b1 in h.pool.available


def test_a_success_resets_the_failure_count() -> None:
    """Failures must be consecutive: a success in between starts the count again."""
    h = make()
    for result in (500, 500, 200, 500, 500):
        h.round(result)
    assert h.b1.healthy
    h.round(500)
    assert not h.b1.healthy


def test_a_failure_resets_the_success_count() -> None:
    """Successes must be consecutive too."""
    h = make()
    take_down(h)
    for result in (200, 500, 200):
        h.round(result)
    assert not h.b1.healthy
    h.round(200)
    assert h.b1.healthy


@pytest.mark.parametrize(
    ("status", "ok"),
    [(199, False), (200, True), (302, True), (399, True), (404, False), (500, False)],
)
def test_status_outside_expected_status_is_a_failure(status: int, ok: bool) -> None:
    """A status counts as a success only inside expected_status, bounds included."""
    h = make()
    h.checker.answer(h.b1, status)
    assert h.b1.last_check["ok"] is ok
    assert h.b1.last_check["status"] == status
    if not ok:
        assert h.b1.last_check["error"] == f"status {status} outside 200-399"


def test_custom_expected_status() -> None:
    """expected_status comes from the config: with 200-299 a redirect is a failure."""
    h = make(expected_status=(200, 299))
    h.checker.answer(h.b1, 302)
    assert h.b1.last_check["ok"] is False


def test_timeout_is_a_failure() -> None:
    """A check that times out counts towards unhealthy_threshold and says so."""
    h = make()
    for _ in range(3):
        h.round(TimeoutError())
    assert not h.b1.healthy
    assert h.b1.last_check["error"] == "timed out after 5s"
    assert h.b1.last_check["status"] is None


def test_connection_error_is_a_failure() -> None:
    """A refused connection counts as a failed check, with a readable error."""
    h = make()
    h.checker.answer(h.b1, ConnectionRefusedError())
    assert h.b1.last_check["ok"] is False
    assert h.b1.last_check["error"] == "connection refused"


def test_proxy_out_of_descriptors_is_not_a_failed_check() -> None:
    """A check that could not even create its socket (EMFILE: the proxy's own shortage) counts
    neither as a failure nor as a success, however often it happens."""
    h = make()
    h.round(200)
    before = dict(h.b1.last_check)
    for _ in range(5):
        h.round(ConnectBindError(errno.EMFILE, "Too many open files"))
    assert h.b1.healthy and h.b1.health_checks == {"ok": 1, "failed": 0}
    assert h.b1.last_check == before
    for _ in range(3):
        h.round(500)
    assert not h.b1.healthy  # real failures still count


def test_describe_unwraps_reasons() -> None:
    """An error wrapping other failures (ResponseFailed) is described by its first reason."""

    class Wrapper(Exception):
        def __init__(self, reasons: list[Failure]) -> None:
            super().__init__(reasons)
            self.reasons = reasons

    assert describe(Failure(Wrapper([Failure(ValueError("boom"))]))) == "ValueError: boom"


def test_last_check_records_result_time_and_duration() -> None:
    """Every check leaves ok, status, error, completion time and duration on the backend."""
    h = make()
    h.clock.advance(0.25)
    h.checker.answer(h.b1, 200)
    assert h.b1.last_check == {
        "ok": True,
        "status": 200,
        "error": None,
        "at": 0.25,
        "duration_ms": 250.0,
    }


# -- no overlap, robustness ----------------------------------------------------


def test_a_hung_check_makes_later_rounds_skip_that_backend() -> None:
    """While a backend's check is in flight, rounds start none for it but go on for others."""
    h = make()
    h.checker.answer(h.b2, 200)
    for _ in range(3):
        h.clock.advance(INTERVAL)
        h.checker.answer(h.b2, 200)
    assert len(h.checker.calls_for(h.b1)) == 1
    assert len(h.checker.calls_for(h.b2)) == 4
    h.checker.answer(h.b1, 200)
    h.clock.advance(INTERVAL)
    assert len(h.checker.calls_for(h.b1)) == 2


def test_a_check_that_fires_at_once_does_not_block_the_backend() -> None:
    """A checker that answers synchronously leaves no check marked in flight."""
    h = make(start=False)
    h.checker.immediate = 200
    h.monitor.startService()
    assert h.b1.last_check["ok"] is True
    h.checker.immediate = None
    h.clock.advance(INTERVAL)
    assert len(h.checker.calls_for(h.b1)) == 1


def test_an_exception_from_the_checker_does_not_kill_the_loop() -> None:
    """A checker that raises counts as a failed check, and later rounds still run."""
    h = make(start=False)
    h.checker.error = RuntimeError("checker bug")
    h.monitor.startService()
    assert h.b1.last_check["ok"] is False
    assert h.b1.last_check["error"] == "RuntimeError: checker bug"
    h.clock.advance(INTERVAL)
    h.clock.advance(INTERVAL)
    assert not h.b1.healthy
    h.checker.error = None
    h.clock.advance(INTERVAL)
    assert len(h.checker.calls_for(h.b1)) == 1


def test_an_exception_while_recording_does_not_kill_the_loop() -> None:
    """An error in the monitor's own handling of a result is logged, and rounds go on."""
    h = make()

    def broken(backend: Backend, healthy: bool, reason: str) -> None:
        raise RuntimeError("pool bug")

    h.pool.set_healthy = broken  # type: ignore[method-assign]
    for _ in range(3):
        h.round(500)
    h.checker.answer(h.b1, 500)
    h.clock.advance(INTERVAL)
    assert len(h.checker.pending(h.b1)) == 1


def test_an_exception_in_a_round_does_not_kill_the_loop() -> None:
    """A round that blows up (here: reading the pool) is logged, and the next round runs."""
    h = make()
    h.checker.answer(h.b1, 200)
    h.checker.answer(h.b2, 200)
    backends = h.pool.backends

    class Exploding(list):
        def __iter__(self):  # type: ignore[no-untyped-def]
            raise RuntimeError("pool bug")

    h.pool.backends = Exploding(backends)
    h.clock.advance(INTERVAL)
    assert len(h.checker.calls) == 2
    h.pool.backends = backends
    h.clock.advance(INTERVAL)
    assert len(h.checker.calls) == 4


# -- stop, reconfigure, changing pool ----------------------------------------


def test_stop_cancels_checks_in_flight_and_the_loop() -> None:
    """stopService cancels pending checks, stops the rounds, closes the checker and fires."""
    h = make()
    h.checker.answer(h.b2, 200)
    call = h.checker.pending(h.b1)[0]
    stopped = h.monitor.stopService()
    assert result_of(stopped) is None
    assert call.cancelled
    assert h.checker.closed == 1
    assert h.clock.getDelayedCalls() == []
    assert h.b1.last_check == {}
    h.clock.advance(INTERVAL * 5)
    assert len(h.checker.calls) == 2


def test_restart_after_stop_checks_again() -> None:
    """A stopped monitor can be started again and resumes its rounds."""
    h = make()
    h.monitor.stopService()
    h.monitor.startService()
    assert len(h.checker.pending(h.b1)) == 1


def test_reconfigure_changes_the_interval() -> None:
    """After reconfigure the rounds follow the new interval, counted from the change."""
    h = make()
    h.checker.answer(h.b1, 200)
    h.checker.answer(h.b2, 200)
    h.clock.advance(3)
    h.monitor.reconfigure(HealthConfig(path="/other", interval=2.0, timeout=1.0))
    h.clock.advance(1.999)
    assert len(h.checker.calls) == 2
    h.clock.advance(0.001)
    assert len(h.checker.calls) == 4
    assert h.checker.calls[-1].path == "/other"
    assert h.checker.calls[-1].timeout == 1.0
    assert len(h.clock.getDelayedCalls()) == 1


def test_reconfigure_with_the_same_interval_keeps_the_schedule() -> None:
    """A reload that leaves interval alone neither restarts nor shifts the rounds."""
    h = make()
    h.checker.answer(h.b1, 200)
    h.checker.answer(h.b2, 200)
    h.clock.advance(7)
    h.monitor.reconfigure(HealthConfig(interval=INTERVAL, unhealthy_threshold=1))
    h.clock.advance(3)
    assert len(h.checker.calls) == 4
    h.checker.answer(h.b1, 500)
    assert not h.b1.healthy


def test_reconfigure_to_zero_stops_checks_and_starts_fail_timeout() -> None:
    """Switching checks off stops the rounds and puts a down backend on the fail_timeout path."""
    h = make()
    take_down(h)
    h.monitor.reconfigure(HealthConfig(interval=0, fail_timeout=FAIL_TIMEOUT))
    calls = len(h.checker.calls)
    h.clock.advance(FAIL_TIMEOUT)
    assert h.b1.healthy
    assert len(h.checker.calls) == calls


def test_backends_added_at_runtime_are_checked() -> None:
    """A backend added to the pool joins the next round; a removed one leaves it."""
    h = make()
    h.checker.answer(h.b1, 200)
    b3 = h.pool.add("http://127.0.0.1:9003")
    h.clock.advance(INTERVAL)
    assert len(h.checker.calls_for(b3)) == 1
    h.pool.remove(h.b2)
    removed = h.checker.calls_for(h.checker.calls[1].backend)[0]
    h.clock.advance(INTERVAL)
    assert removed.cancelled
    assert len(h.checker.calls_for(removed.backend)) == 1


# -- passive checks ----------------------------------------------------------


def test_passive_failures_take_a_backend_out_at_once() -> None:
    """unhealthy_threshold connection failures in a row take a backend out, no round needed."""
    h = make()
    h.monitor.record_connect_failure(h.b1, "refused")
    h.monitor.record_connect_failure(h.b1, "refused")
    assert h.b1.healthy
    h.monitor.record_connect_failure(h.b1, "refused")
    assert not h.b1.healthy
    assert h.b1.failures == 3
    assert h.b1.consecutive_failures == 3


def test_a_connection_success_resets_the_passive_count() -> None:
    """Passive failures must be consecutive: a successful connection starts the count again."""
    h = make()
    h.monitor.record_connect_failure(h.b1, "refused")
    h.monitor.record_connect_failure(h.b1, "refused")
    h.monitor.record_connect_success(h.b1)
    assert h.b1.consecutive_failures == 0
    h.monitor.record_connect_failure(h.b1, "refused")
    h.monitor.record_connect_failure(h.b1, "refused")
    assert h.b1.healthy
    assert h.b1.failures == 4


def test_passive_and_active_counts_are_separate() -> None:
    """Passing checks do not reset the passive count, and failed checks do not add to it."""
    h = make()
    h.monitor.record_connect_failure(h.b1, "refused")
    h.monitor.record_connect_failure(h.b1, "refused")
    h.round(200)
    h.round(500)
    assert h.b1.healthy
    h.monitor.record_connect_failure(h.b1, "refused")
    assert not h.b1.healthy


def test_active_checks_bring_back_a_passively_ejected_backend() -> None:
    """With checks on, a backend taken out by traffic needs healthy_threshold passes, no timer."""
    h = make()
    h.checker.answer(h.b1, 200)
    for _ in range(3):
        h.monitor.record_connect_failure(h.b1, "refused")
    h.clock.advance(INTERVAL)
    h.clock.advance(FAIL_TIMEOUT)
    assert not h.b1.healthy
    h.round(200)
    h.checker.answer(h.b1, 200)
    assert h.b1.healthy


def test_probation_after_fail_timeout_when_checks_are_off() -> None:
    """With checks off a backend returns after fail_timeout; one failure sends it out again."""
    h = make(interval=0)
    for _ in range(3):
        h.monitor.record_connect_failure(h.b1, "refused")
    assert not h.b1.healthy
    h.clock.advance(FAIL_TIMEOUT - 0.001)
    assert not h.b1.healthy
    h.clock.advance(0.001)
    assert h.b1.healthy
    h.monitor.record_connect_failure(h.b1, "refused again")
    assert not h.b1.healthy
    h.clock.advance(FAIL_TIMEOUT)
    assert h.b1.healthy


def test_a_success_on_probation_ends_it() -> None:
    """After one good connection on probation it takes unhealthy_threshold failures again."""
    h = make(interval=0)
    for _ in range(3):
        h.monitor.record_connect_failure(h.b1, "refused")
    h.clock.advance(FAIL_TIMEOUT)
    h.monitor.record_connect_success(h.b1)
    h.monitor.record_connect_failure(h.b1, "refused")
    h.monitor.record_connect_failure(h.b1, "refused")
    assert h.b1.healthy
    h.monitor.record_connect_failure(h.b1, "refused")
    assert not h.b1.healthy


def test_failures_while_down_do_not_extend_fail_timeout() -> None:
    """Connection failures reported while a backend is already out do not restart its timer."""
    h = make(interval=0)
    for _ in range(3):
        h.monitor.record_connect_failure(h.b1, "refused")
    h.clock.advance(FAIL_TIMEOUT / 2)
    h.monitor.record_connect_failure(h.b1, "late answer from an old request")
    h.clock.advance(FAIL_TIMEOUT / 2)
    assert h.b1.healthy
    assert h.b1.failures == 4


def test_stop_cancels_the_probation_timer() -> None:
    """A stopped monitor leaves no fail_timeout timer behind."""
    h = make(interval=0)
    for _ in range(3):
        h.monitor.record_connect_failure(h.b1, "refused")
    result_of(h.monitor.stopService())
    assert h.clock.getDelayedCalls() == []


def test_failures_for_a_removed_backend_are_only_counted() -> None:
    """A failure reported for a backend no longer in the pool changes nothing but its count."""
    h = make(interval=0)
    gone = h.b2
    h.pool.remove(gone)
    for _ in range(3):
        h.monitor.record_connect_failure(gone, "refused")
    assert gone.failures == 3
    assert gone.healthy
    assert h.clock.getDelayedCalls() == []


# -- the real checker ----------------------------------------------------------


# -- the real checker's connections ------------------------------------------------


@implementer(IStreamClientEndpoint)
class RecordingEndpoint:
    """An endpoint that keeps the factory it is asked to connect with."""

    def __init__(self) -> None:
        self.factories: list[IProtocolFactory] = []

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        self.factories.append(factory)
        return Deferred()


def test_checker_connections_do_not_log_factory_start_and_stop() -> None:
    """The pool's factory reaches the endpoint wrapped in a quiet one that builds the
    same protocols, so no "Starting factory" line is logged per check."""
    inner = RecordingEndpoint()
    pool_factory = Factory.forProtocol(Protocol)
    _QuietEndpoint(inner).connect(pool_factory)
    [quiet] = inner.factories
    assert quiet.noisy is False
    assert isinstance(quiet.buildProtocol(None), Protocol)


@pytest.mark.parametrize(("url", "tls"), [(b"http://127.0.0.1:81/", False),
                                          (b"https://example.com/", True)])
def test_checker_endpoints_are_tcp_or_tls(url: bytes, tls: bool) -> None:
    """http is plain TCP to the URL's host and port, https wraps it in TLS."""
    endpoint = _QuietEndpoints(MemoryReactorClock()).endpointForURI(URI.fromBytes(url))
    assert isinstance(endpoint, _QuietEndpoint)
    assert verifyObject(IStreamClientEndpoint, endpoint)
    assert isinstance(endpoint._endpoint, HostnameEndpoint) is not tls


def connect_check(
    url: str = "http://127.0.0.1:9001/api",
) -> tuple[Deferred[int], StringTransport, object]:
    """Start a real check on a MemoryReactorClock and connect it to a StringTransport."""
    reactor = MemoryReactorClock()
    checker = HTTPHealthChecker(reactor)
    d = checker.check(Backend.from_url("b1", url), "/healthz", TIMEOUT)
    [(host, port, factory, _, _)] = reactor.tcpClients
    assert (host, port) == ("127.0.0.1", 9001)
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return d, transport, protocol


def test_real_check_asks_for_the_health_path_and_returns_the_status() -> None:
    """One GET of prefix + path with our User-Agent; the body is read and thrown away."""
    d, transport, protocol = connect_check()
    request = transport.value()
    assert request.startswith(b"GET /api/healthz HTTP/1.1\r\n")
    assert b"User-Agent: equalizer-health-check\r\n" in request
    protocol.dataReceived(b"HTTP/1.1 503 Unavailable\r\nContent-Length: 4\r\n\r\nbusy")
    assert result_of(d) == 503


def test_real_check_fails_when_the_body_is_cut_off() -> None:
    d, transport, protocol = connect_check()
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort")
    protocol.connectionLost(Failure(ConnectionRefusedError()))
    with pytest.raises(ResponseFailed):
        result_of(d)


def test_real_check_times_out_and_drops_the_connection() -> None:
    """A backend that never answers fails the check after the timeout; the trickling
    response's connection is abandoned."""
    reactor = MemoryReactorClock()
    checker = HTTPHealthChecker(reactor)
    d = checker.check(Backend.from_url("b1", "http://127.0.0.1:9001"), "/", TIMEOUT)
    reactor.advance(TIMEOUT)
    with pytest.raises(Exception):  # noqa: B017 -- the kind depends on the phase cut short
        result_of(d)
    assert result_of(checker.close()) is None
