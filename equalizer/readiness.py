"""Start-up readiness (SPEC 4.5): whether the service can answer for real yet.

The service is ready once the bucket store's first connection attempt has
finished (connected and migrated, or failed) or READY_TIMEOUT has passed,
whichever comes first. Until then the proxy listener stays closed, bucket calls
to the admin API wait, and ``GET /health`` says ``starting``. After that,
``on_store_error`` covers a store that is still (or again) unreachable.

``BucketService`` is what sets it: it starts the bucket store, retries a database
that is down at start-up, and stops the store last.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from equalizer.buckets.outage import OutageLog

if TYPE_CHECKING:
    from equalizer.buckets.interface import IBucketStore

log = Logger()

READY_TIMEOUT = 10.0
"""The longest start-up waits for the store's first connection attempt, in seconds."""

STORE_RETRY_SECONDS = 2.0
"""How often start-up tries again to reach a database that was down."""


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


class BucketService(Service):
    """Starts the bucket store and stops it last; a database down at start-up is retried.

    ``readiness`` is set once the store's first connection attempt has finished
    (connected and migrated, or failed) or READY_TIMEOUT has passed (SPEC 4.5);
    a store that needs no connection (memory) is ready from the start. Once ready,
    while the store is down, ``on_store_error`` decides for proxied requests and the
    bucket API answers 503, exactly as when the database goes away later.
    """

    def __init__(self, store: IBucketStore, clock, *, needs_connection: bool = True,
                 ready_timeout: float = READY_TIMEOUT) -> None:
        self.store = store
        self._clock = clock
        self._retry = None
        self._ready_timer = None
        self._ready_timeout = ready_timeout
        self._late = False  # serving without the store: say when it comes
        self._outage = OutageLog(clock, "bucket store")
        self.readiness = Readiness(ready=not needs_connection)

    def startService(self) -> None:
        super().startService()
        if not self.readiness.ready:
            self._ready_timer = self._clock.callLater(self._ready_timeout, self._time_up)
        self._start()

    def _start(self) -> None:
        self._retry = None
        self.store.start().addCallbacks(self._connected, self._failed)

    def _connected(self, result: object = None) -> None:
        if self._late:
            self._outage.forget()
            log.info("bucket store available")
        self._attempted()

    def _attempted(self, result: object = None) -> None:
        self._cancel_ready_timer()
        self.readiness.set()

    def _time_up(self) -> None:
        """The first attempt is taking too long (a database that accepts and never answers):
        serve anyway, under ``on_store_error``, and let the attempt go on."""
        self._ready_timer = None
        self._late = True
        log.warn("bucket store: no answer to its first connection attempt after {seconds}s; "
                 "serving now, on_store_error applies until it connects",
                 seconds=self._ready_timeout)
        self.readiness.set()

    def _cancel_ready_timer(self) -> None:
        if self._ready_timer is not None and self._ready_timer.active():
            self._ready_timer.cancel()
        self._ready_timer = None

    def _failed(self, failure) -> None:
        self._late = True
        self._attempted()
        if not self.running:
            return
        self._outage.failed(failure.getErrorMessage(),
                            retry=f"retrying every {STORE_RETRY_SECONDS:g}s")
        self._retry = self._clock.callLater(STORE_RETRY_SECONDS, self._start)

    def stopService(self):
        super().stopService()
        self._cancel_ready_timer()
        self.readiness.set()  # bucket calls still waiting get their answer (503) now
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        return self.store.stop()
