"""Start-up readiness (SPEC 4.5): whether the service can answer for real yet.

The service is ready once the bucket store's first connection attempt has
finished (connected and migrated, or failed) or READY_TIMEOUT has passed,
whichever comes first. Until then the proxy listener stays closed, bucket calls
to the admin API wait, and ``GET /health`` says ``starting``. After that,
``on_store_error`` covers a store that is still (or again) unreachable.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed

READY_TIMEOUT = 10.0
"""The longest start-up waits for the store's first connection attempt, in seconds."""


class Readiness:
    """A one-way switch from starting to ready, and a Deferred for each waiter.

    Every waiter gets a Deferred of its own, so a cancelled wait (an admin client
    that went away) forgets only that waiter and never disturbs the others. The
    waiters are bounded in number by the open admin connections and in time by
    READY_TIMEOUT.
    """

    def __init__(self, ready: bool = False) -> None:
        self.ready = ready
        self._waiters: list[Deferred[None]] = []

    def wait(self) -> Deferred[None]:
        """Fires once ready (at once if already)."""
        if self.ready:
            return succeed(None)
        waiter: Deferred[None] = Deferred(self._forget)
        self._waiters.append(waiter)
        return waiter

    def set(self) -> None:
        """Ready from now on: release every waiter, in arrival order."""
        if self.ready:
            return
        self.ready = True
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _forget(self, waiter: Deferred[None]) -> None:
        if waiter in self._waiters:
            self._waiters.remove(waiter)
