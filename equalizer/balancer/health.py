"""Backend health: active HTTP checks on a timer, and passive failure counting.

The check itself is a seam (`IHealthChecker`, checker.py) so the monitor's logic is
tested with a clock and a fake; `HTTPHealthChecker` is the real one, over treq.
"""

from __future__ import annotations

import os
from typing import Any

from attrs import define
from twisted.application.service import Service
from twisted.internet import error as net_errors
from twisted.internet.defer import Deferred, TimeoutError, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseNeverReceived

from equalizer.balancer.checker import IHealthChecker
from equalizer.balancer.failures import is_local_resource_error
from equalizer.balancer.pool import Backend, BackendPool
from equalizer.config.model import HealthConfig

log = Logger()


@define
class _State:
    """What the monitor knows of one backend beyond the Backend's own fields."""

    in_flight: Deferred[Any] | None = None
    active_failures: int = 0
    active_successes: int = 0
    passive_failures: int = 0
    probation: bool = False
    release: IDelayedCall | None = None

    def cancel_release(self) -> None:
        if self.release is not None:
            if self.release.active():
                self.release.cancel()
            self.release = None

    def cancel(self) -> None:
        """Stop the probation timer and abandon the check in flight (the backend left,
        or the monitor stops)."""
        self.cancel_release()
        in_flight, self.in_flight = self.in_flight, None
        if in_flight is not None:
            in_flight.cancel()


READABLE_ERRORS = (
    (net_errors.ConnectionRefusedError, "connection refused"),
    (net_errors.DNSLookupError, "host name not found"),
    (net_errors.NoRouteError, "no route to host"),
    (net_errors.TCPTimedOutError, "connect timed out"),
    (net_errors.TimeoutError, "connect timed out"),
    (net_errors.ConnectionDone, "connection closed before a response"),
    (net_errors.ConnectionLost, "connection lost before a response"),
    (ResponseNeverReceived, "connection closed before a response"),
)
"""How a check's network failures read on the dashboard and in /backends: short words,
not the exception's class and repr (other errors keep ``Name: message``)."""


def describe(failure: Failure) -> str:
    """One short line for a failed check: the innermost reason, in words where the error
    is a known network one, else ``Name: message``."""
    reasons = getattr(failure.value, "reasons", None)
    if reasons and isinstance(reasons[0], Failure):
        return describe(reasons[0])
    if failure.check(TimeoutError):
        return "timed out"
    for kind, words in READABLE_ERRORS:
        if failure.check(kind):
            return words
    if failure.check(net_errors.ConnectError) and getattr(failure.value, "osError", None):
        return f"cannot connect: {os.strerror(failure.value.osError).lower()}"
    if failure.type is not None and failure.type.__module__.startswith("OpenSSL"):
        return "TLS handshake failed"
    message = failure.getErrorMessage()
    name = failure.type.__name__ if failure.type is not None else "error"
    return f"{name}: {message}" if message and message != name else name


def check_outcome(config: HealthConfig, result: int | Failure) -> tuple[int | None, str | None]:
    """The status a check got (None without one) and why it failed (None if it passed)."""
    if isinstance(result, Failure):
        if result.check(TimeoutError):
            return None, f"timed out after {config.timeout:g}s"
        return None, describe(result)
    status = int(result)
    low, high = config.expected_status
    if not low <= status <= high:
        return status, f"status {status} outside {low}-{high}"
    return status, None


class HealthMonitor(Service):
    """Takes backends out of the pool when they fail and puts them back when they recover.

    Active checks: one LoopingCall, every ``interval`` seconds (the first round
    at start-up), starts a check of every backend in the pool at that moment,
    enabled or not, except a backend whose previous check has not finished yet:
    never more than one check per backend in flight, and a hung check makes
    later rounds skip that backend until it ends (the checker's ``timeout``
    bounds it). A check fails on a connection error, a timeout or a status
    outside ``expected_status``. ``unhealthy_threshold`` consecutive failures
    take a healthy backend out; ``healthy_threshold`` consecutive successes bring
    an unhealthy one back, whichever way it went out. Every check ends in
    ``backend.last_check``. ``interval: 0`` turns active checks off.

    Passive checks: the proxy reports each connection attempt with
    `record_connect_failure` / `record_connect_success`. The passive counter is
    separate from the active one (and mirrored in ``backend.consecutive_failures``):
    only a successful proxied connection resets it, so a backend that answers
    ``/health`` but refuses real traffic still goes out, and an interleaved check
    cannot hide a run of refused connections. ``unhealthy_threshold``
    consecutive connection failures take a backend out at once; each also counts
    in ``backend.failures``. With active checks on, they alone bring it back.
    With them off, the backend comes back *on probation* after ``fail_timeout``
    seconds, as nginx's ``max_fails``/``fail_timeout`` do: it is a candidate
    again, and the first proxied connection decides: success ends the
    probation, a failure takes it out again at once (one failure is enough) for
    another ``fail_timeout``.

    `reconfigure` swaps the settings at run time (SIGHUP): thresholds apply from
    the next result on; a new interval restarts the loop, whose next round comes
    one new interval later. Switching checks off puts every backend that is out
    on the ``fail_timeout`` path; switching them on leaves recovery to them.

    Every transition goes through `BackendPool.set_healthy`, which logs it.
    """

    def __init__(
        self,
        pool: BackendPool,
        config: HealthConfig,
        checker: IHealthChecker,
        clock: IReactorTime,
    ) -> None:
        self._pool = pool
        self._config = config
        self._checker = checker
        self._clock = clock
        self._loop: LoopingCall | None = None
        self._states: dict[Backend, _State] = {}

    @property
    def config(self) -> HealthConfig:
        return self._config

    # -- service life ------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._apply(now=True)

    def stopService(self) -> Deferred[None]:
        """Stop the loop, cancel checks in flight and probation timers, close the checker."""
        super().stopService()
        self._stop_loop()
        for state in self._states.values():
            state.cancel()
        closed = maybeDeferred(self._checker.close)
        closed.addErrback(lambda f: log.failure("closing the health checker failed", f))
        return closed.addCallback(lambda _: None)

    def reconfigure(self, config: HealthConfig) -> None:
        """Use new health settings from now on (see the class docstring)."""
        old, self._config = self._config, config
        if not self.running or old.interval == config.interval:
            return
        self._stop_loop()
        self._apply(now=False)

    def _apply(self, now: bool) -> None:
        interval = self._config.interval
        self._pool.active_checks = interval > 0
        if interval > 0:
            for state in self._states.values():
                state.cancel_release()
                state.probation = False
            loop = LoopingCall(self._tick)
            loop.clock = self._clock
            self._loop = loop
            loop.start(interval, now=now).addErrback(
                lambda f: log.failure("health check loop stopped", f)
            )
        else:
            for backend in self._pool.backends:
                if not backend.healthy:
                    state = self._state(backend)
                    if state.release is None:
                        self._schedule_release(backend, state)

    def _stop_loop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()

    # -- active checks -----------------------------------------------------

    def _state(self, backend: Backend) -> _State:
        state = self._states.get(backend)
        if state is None:
            state = self._states[backend] = _State()
        return state

    def _forget(self, backend: Backend) -> None:
        state = self._states.pop(backend, None)
        if state is not None:
            state.cancel()

    def _tick(self) -> None:
        """One round; never raises, since a LoopingCall dies on its first error."""
        try:
            backends = list(self._pool.backends)
            present = set(backends)
            for gone in [b for b in self._states if b not in present]:
                self._forget(gone)
            for backend in backends:
                state = self._state(backend)
                if state.in_flight is not None:
                    log.debug(
                        "health check of {backend_id} still running; skipped", backend_id=backend.id
                    )
                    continue
                self._start_check(backend, state)
        except Exception:
            log.failure("health check round failed")

    def _start_check(self, backend: Backend, state: _State) -> None:
        config = self._config
        started = self._clock.seconds()
        d = maybeDeferred(self._checker.check, backend, config.path, config.timeout)
        state.in_flight = d
        d.addBoth(self._check_done, backend, d, started)

    def _check_done(
        self, result: int | Failure, backend: Backend, d: Deferred[Any], started: float
    ) -> None:
        state = self._states.get(backend)
        if state is None or state.in_flight is not d:
            return None  # cancelled by stop, or the backend left the pool
        state.in_flight = None
        try:
            self._record_check(backend, state, result, started)
        except Exception:
            log.failure("recording a health check of {backend_id} failed", backend_id=backend.id)
        return None

    def _record_check(
        self, backend: Backend, state: _State, result: int | Failure, started: float
    ) -> None:
        config = self._config
        if isinstance(result, Failure) and is_local_resource_error(result):
            # The proxy could not create a socket: says nothing about the backend.
            log.debug("health check of {backend_id} not made: {error}",
                      backend_id=backend.id, error=describe(result))
            return
        now = self._clock.seconds()
        status, error = check_outcome(config, result)
        backend.record_check(status, error, now, now - started)
        if error is None:
            state.active_failures = 0
            state.active_successes += 1
            if not backend.healthy and state.active_successes >= config.healthy_threshold:
                self._bring_back(
                    backend, state, f"{state.active_successes} consecutive health checks passed"
                )
        else:
            state.active_successes = 0
            state.active_failures += 1
            if backend.healthy and state.active_failures >= config.unhealthy_threshold:
                self._take_out(
                    backend,
                    state,
                    f"{state.active_failures} consecutive health checks failed (last: {error})",
                )

    # -- passive checks ----------------------------------------------------

    def record_connect_failure(self, backend: Backend, reason: str, kind: str = "connect") -> None:
        """The proxy could not connect: ``kind`` connect (refused, reset) or connect_timeout."""
        backend.fail(kind)
        if backend not in self._pool.backends:
            self._forget(backend)
            return
        state = self._state(backend)
        state.passive_failures += 1
        backend.consecutive_failures = state.passive_failures
        if not backend.healthy:
            return
        if state.probation:
            self._take_out(backend, state, f"connection failed while on probation: {reason}")
        elif state.passive_failures >= self._config.unhealthy_threshold:
            self._take_out(
                backend,
                state,
                f"{state.passive_failures} consecutive connection failures (last: {reason})",
            )

    def record_connect_success(self, backend: Backend) -> None:
        """The proxy connected to ``backend``: resets the passive count, ends a probation."""
        backend.consecutive_failures = 0
        state = self._states.get(backend)
        if state is not None and (state.passive_failures or state.probation):
            state.passive_failures = 0
            state.probation = False

    # -- transitions -------------------------------------------------------

    def _take_out(self, backend: Backend, state: _State, reason: str) -> None:
        state.probation = False
        state.active_successes = 0
        self._pool.set_healthy(backend, False, reason, self._clock.seconds())
        if self.running and self._config.interval <= 0:
            state.cancel_release()
            self._schedule_release(backend, state)

    def _bring_back(self, backend: Backend, state: _State, reason: str) -> None:
        state.cancel_release()
        state.active_failures = 0
        state.passive_failures = 0
        backend.consecutive_failures = 0
        self._pool.set_healthy(backend, True, reason, self._clock.seconds())

    def _schedule_release(self, backend: Backend, state: _State) -> None:
        state.release = self._clock.callLater(
            self._config.fail_timeout, self._release, backend, state
        )

    def _release(self, backend: Backend, state: _State) -> None:
        """``fail_timeout`` is over: the backend is a candidate again, on probation."""
        state.release = None
        if self._states.get(backend) is not state or backend not in self._pool.backends:
            return
        if backend.healthy:
            return
        state.probation = True
        state.passive_failures = 0
        state.active_failures = 0
        backend.consecutive_failures = 0
        out_for = f"on probation after {self._config.fail_timeout:g}s out"
        self._pool.set_healthy(backend, True, out_for, self._clock.seconds())
