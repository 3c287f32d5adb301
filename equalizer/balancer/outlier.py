"""Outlier detection (SPEC 4.6, ``health.outlier``): backends that answer, but badly,
leave the pool for a while.

The proxy reports every backend answer (its status) and every gateway error (a
connection that failed, a broken response, a response timeout). Two runs are
counted per backend:

- ``consecutive_5xx``: answers with a 5xx status, and gateway errors (the client
  gets a 502 or 504 for them: Envoy counts them in the same run by default);
- ``consecutive_gateway_errors``: 502, 503 and 504 answers, and gateway errors.

Any other answer ends both runs. When a run reaches its threshold (0 = off) the
backend is ejected for ``base_ejection × n`` seconds, where ``n`` is the number of
ejections in a row, at most 10 (so ``base_ejection``, 2×, 3×, … 10×: linear, as
SPEC 4.6 and Envoy's ``base_ejection_time`` have it). It then comes back *on
probation*: its first answer decides. A good one ends the probation and the run
of ejections (``n`` starts again at 1); a bad one ejects it again at once, for one
step longer. An ejection that would leave more than ``max_ejection_percent`` of
the pool's backends ejected at once is not made (logged at debug); the run keeps
counting, and the next bad answer tries again. Ejections and returns are logged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from attrs import define
from twisted.logger import Logger

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall, IReactorTime

    from equalizer.balancer.pool import Backend, BackendPool
    from equalizer.config.model import OutlierConfig

log = Logger()

MAX_EJECTION_MULTIPLIER = 10
"""An ejection lasts at most this many times ``base_ejection``."""

GATEWAY_STATUSES = frozenset({502, 503, 504})


def ejection_seconds(base: float, in_a_row: int) -> float:
    """How long the ``in_a_row``-th ejection in a row lasts (the first is ``base``)."""
    return base * min(max(in_a_row, 1), MAX_EJECTION_MULTIPLIER)


def may_eject(ejected: int, total: int, max_percent: int) -> bool:
    """Whether one more of ``total`` backends may go, ``ejected`` being out already:
    never more than ``max_percent`` of them at once."""
    return (ejected + 1) * 100 <= max_percent * total


@define
class _Run:
    """One backend's runs of bad answers and of ejections."""

    errors: int = 0
    gateway_errors: int = 0
    in_a_row: int = 0
    probation: bool = False
    timer: IDelayedCall | None = None


class OutlierDetector:
    """Counts each backend's bad answers and ejects it from the pool (see the module)."""

    def __init__(self, pool: BackendPool, config: OutlierConfig, clock: IReactorTime) -> None:
        self._pool = pool
        self._clock = clock
        self.config = config
        self._runs: dict[Backend, _Run] = {}

    def configure(self, config: OutlierConfig) -> None:
        """New thresholds (reload), from the next answer on; ejections under way run out."""
        self.config = config

    def stop(self) -> None:
        """Cancel the return timers (the service stops)."""
        for run in self._runs.values():
            if run.timer is not None and run.timer.active():
                run.timer.cancel()
            run.timer = None

    def answered(self, backend: Backend, status: int) -> None:
        """A backend's answer came back with ``status``."""
        if status >= 500:
            self._bad(backend, status in GATEWAY_STATUSES, f"status {status}")
            return
        run = self._runs.get(backend)
        if run is not None and (run.errors or run.gateway_errors or run.probation):
            run.errors = run.gateway_errors = 0
            if run.probation:
                run.probation = False
                run.in_a_row = 0

    def gateway_error(self, backend: Backend, reason: str) -> None:
        """The proxy got no usable answer from ``backend`` (connect, broken, timeout)."""
        self._bad(backend, True, reason)

    def _bad(self, backend: Backend, gateway: bool, reason: str) -> None:
        run = self._runs.get(backend)
        if run is None:
            if len(self._runs) > 2 * len(self._pool.backends) + 8:
                self._prune()
            run = self._runs[backend] = _Run()
        run.errors += 1
        if gateway:
            run.gateway_errors += 1
        if backend.ejected_until is not None:
            return
        config = self.config
        if run.probation:
            why = f"{reason} on probation"
        elif config.consecutive_5xx and run.errors >= config.consecutive_5xx:
            why = f"{run.errors} consecutive 5xx answers or gateway errors (last: {reason})"
        elif config.consecutive_gateway_errors and \
                run.gateway_errors >= config.consecutive_gateway_errors:
            why = f"{run.gateway_errors} consecutive gateway errors (last: {reason})"
        else:
            return
        self._eject(backend, run, why)

    def _eject(self, backend: Backend, run: _Run, why: str) -> None:
        pool = self._pool
        backends = pool.backends
        if backend not in backends:
            self._runs.pop(backend, None)
            return
        ejected = sum(1 for b in backends if b.ejected_until is not None)
        if not may_eject(ejected, len(backends), self.config.max_ejection_percent):
            log.debug("backend {backend_id} not ejected ({why}): max_ejection_percent "
                      "{percent}% reached", backend_id=backend.id, why=why,
                      percent=self.config.max_ejection_percent)
            return
        run.in_a_row += 1
        run.probation = False
        run.errors = run.gateway_errors = 0
        seconds = ejection_seconds(self.config.base_ejection, run.in_a_row)
        pool.set_ejected(backend, self._clock.seconds() + seconds)
        run.timer = self._clock.callLater(seconds, self._return, backend, run)
        log.warn("backend {backend_id} ({url}) ejected for {seconds:g}s (ejection {n} in a "
                 "row): {why}", backend_id=backend.id, url=backend.url, seconds=seconds,
                 n=run.in_a_row, why=why)
        self._prune()

    def _return(self, backend: Backend, run: _Run) -> None:
        run.timer = None
        if self._runs.get(backend) is not run or backend not in self._pool.backends:
            return
        run.probation = True
        self._pool.set_ejected(backend, None)
        log.info("backend {backend_id} ({url}) is back from ejection, on probation",
                 backend_id=backend.id, url=backend.url)

    def _prune(self) -> None:
        """Forget backends that left the pool, so the table stays bounded by it."""
        present = set(self._pool.backends)
        for gone in [b for b in self._runs if b not in present]:
            run = self._runs.pop(gone)
            if run.timer is not None and run.timer.active():
                run.timer.cancel()
