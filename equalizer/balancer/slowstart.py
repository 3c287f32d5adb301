"""Slow start (SPEC 4.6, ``balancer.slow_start``): a backend that comes (back) into the
pool gets a share of new requests that ramps from 10 % to its full share.

The ramp is ``share(elapsed) = 0.1 + 0.9 * elapsed / window``, linear, as nginx Plus's
``slow_start`` and HAProxy's ``slowstart`` ramp a server's weight. It works with every
strategy but hash (which must keep a key on its backend): the strategy picks as
usual, and a pick of a ramping backend is kept only ``share`` of the time, counted
with a per-backend credit rather than a random draw (so the share is exact and
tests are deterministic); otherwise the strategy picks again. So a ramping backend
is treated as if its weight were ``share × weight``: with three equal backends,
one just back gets 0.1 / 2.1 ≈ 5 % of new requests, not its third. Once the
window is over the backend leaves the ramp, so a pool with nothing ramping pays
one truth test per request.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from equalizer.balancer.pool import Backend
    from equalizer.balancer.strategies import Strategy

START_SHARE = 0.1
"""The share of its weight a backend gets the moment it comes back."""

MAX_REPICKS = 16
"""Picks one request may make before it takes what it got, ramping or not."""


def ramp_share(elapsed: float, window: float) -> float:
    """The share of its full weight a backend gets ``elapsed`` seconds into the ramp."""
    if window <= 0 or elapsed >= window:
        return 1.0
    return START_SHARE + (1.0 - START_SHARE) * max(elapsed, 0.0) / window


class SlowStart:
    """The backends ramping up now: when each started and its credit of picks."""

    def __init__(self, clock: IReactorTime | None, window: float = 0.0) -> None:
        self._clock = clock
        self.window = window if clock is not None else 0.0
        self.ramping: dict[Backend, list[float]] = {}

    def configure(self, window: float) -> None:
        """A new window (reload): backends ramping now keep their start."""
        self.window = window if self._clock is not None else 0.0
        if not self.window:
            self.ramping.clear()

    def begin(self, backend: Backend) -> None:
        """``backend`` came (back) into the pool: its share starts at 10 %."""
        if self.window > 0:
            self.ramping[backend] = [self._clock.seconds(), 0.0]

    def forget(self, backend: Backend) -> None:
        self.ramping.pop(backend, None)

    def share(self, backend: Backend) -> float:
        """The share ``backend`` gets now (1.0 when it is not ramping)."""
        entry = self.ramping.get(backend)
        if entry is None:
            return 1.0
        return ramp_share(self._clock.seconds() - entry[0], self.window)

    def pick(self, chosen: Backend, candidates: list[Backend], strategy: Strategy,
             key: bytes | None) -> Backend:
        """``chosen``, or, when its share does not allow it this time, the strategy's
        next pick (a few times at most, so a pool where all ramp still answers)."""
        ramping = self.ramping
        now = self._clock.seconds()
        for _ in range(MAX_REPICKS):
            entry = ramping.get(chosen)
            if entry is None:
                return chosen
            share = ramp_share(now - entry[0], self.window)
            if share >= 1.0:
                del ramping[chosen]
                return chosen
            entry[1] += share
            if entry[1] >= 1.0:
                entry[1] -= 1.0
                return chosen
            chosen = strategy.choose(candidates, key)
        return chosen
