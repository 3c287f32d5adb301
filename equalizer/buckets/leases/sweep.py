"""Releasing idle keys: expired allowances go back to the database, and keys idle for
another ``ttl`` are forgotten, so memory follows the keys active in the last few
seconds (see :mod:`equalizer.buckets.leasing`).

One ``LoopingCall`` for the whole store, every ``ttl / 2``; each sweep looks at
:data:`SWEEP_CHUNK` keys per reactor turn, so a million keys never stall the reactor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from equalizer.buckets.leases.allowances import Allowances
    from equalizer.buckets.leases.settlement import Settlements

log = Logger()

SWEEP_CHUNK = 2000
"""Keys the lease sweep looks at per reactor turn."""


class Sweep:
    """The periodic sweep of one leasing store's keys."""

    def __init__(self, allowances: Allowances, settlements: Settlements,
                 clock: IReactorTime) -> None:
        self._allowances = allowances
        self._settlements = settlements
        self._clock = clock
        self._loop: LoopingCall | None = None
        self.sweeping: list[str] | None = None
        """Keys the sweep under way has yet to look at (None: none under way)."""

    def start(self) -> None:
        if self._loop is None:
            self._loop = LoopingCall(self.tick)
            self._loop.clock = self._clock
            self._loop.start(self._allowances.ttl / 2, now=False)

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.stop()
            self._loop = None

    def tick(self) -> None:
        """Start a sweep, unless the last one is still under way."""
        if self.sweeping is not None:
            return
        self._allowances.cap_logged = False
        self.sweeping = list(self._allowances.keys)
        self.chunk()

    def chunk(self) -> None:
        """Look at the next :data:`SWEEP_CHUNK` keys; when all are seen, send what expired."""
        ids = self.sweeping
        if ids is None or self._loop is None:
            self.sweeping = None
            return
        try:
            chunk = ids[-SWEEP_CHUNK:]
            del ids[-SWEEP_CHUNK:]
            self._look(chunk, self._clock.seconds())
            if ids:
                self._clock.callLater(0, self.chunk)
                return
            self.sweeping = None
            if self._allowances.returns:
                self._settlements.return_all()
        except Exception:
            self.sweeping = None
            log.failure("sweeping leases failed")

    def _look(self, chunk: list[str], now: float) -> None:
        allowances = self._allowances
        keys = allowances.keys
        idle = allowances.ttl  # remembered a while after expiry, to lease if seen again
        for client_id in chunk:
            key = keys.get(client_id)
            if key is None:
                continue
            if key.allowance and now < key.expires:
                continue
            if key.allowance or key.back:  # nothing live to ride along with: back now
                allowances.give_back(client_id, key)
            if (
                not key.waiters
                and not key.settling
                and now >= key.until
                and now >= key.expires + idle
            ):
                del keys[client_id]
