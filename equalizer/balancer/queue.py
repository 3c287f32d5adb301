"""The pool queue (SPEC 4.6, ``balancer.queue: {max, timeout}``): requests that found
every candidate backend full (``max_requests``) wait here, first in first out, for a
free slot.

The queue is bounded (``max``; 0 = no queue) and so is each wait (``timeout``). A
waiter is a callable that looks for a slot: it returns what to do with it (a
callable, run once the waiter has left the queue) or None when there is none.
``wake`` offers slots to the waiters in order and stops at the first that finds
none, so a later request never overtakes an earlier one. A waiter can leave at
any time (its client went away): removal is O(1) and its timer is cancelled at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall, IReactorTime


class Ticket:
    """One request's place in the queue."""

    __slots__ = ("try_slot", "expired", "timer")

    def __init__(self, try_slot: Callable[[], Callable[[], None] | None],
                 expired: Callable[[], None]) -> None:
        self.try_slot = try_slot
        self.expired = expired
        self.timer: IDelayedCall | None = None


class WaitQueue:
    """A bounded FIFO of requests waiting for a backend slot, each for at most ``timeout``."""

    def __init__(self, clock: IReactorTime | None, max: int = 0, timeout: float = 5.0) -> None:
        self._clock = clock
        self.max = max if clock is not None else 0
        self.timeout = timeout
        self.waiting: dict[Ticket, None] = {}  # insertion-ordered: FIFO with O(1) removal
        self.queued = 0
        self.refused = 0
        self.timed_out = 0
        self.elsewhere = 0
        """Requests waiting in the queues of worker processes (the supervisor's sum)."""

    def configure(self, max: int, timeout: float) -> None:
        """New bounds (reload): requests already waiting keep their deadline."""
        self.max = max if self._clock is not None else 0
        self.timeout = timeout

    def __len__(self) -> int:
        return len(self.waiting)

    def length(self) -> int:
        """Requests waiting, here and in the workers' queues of this pool."""
        return len(self.waiting) + self.elsewhere

    def join(self, try_slot: Callable[[], Callable[[], None] | None],
             expired: Callable[[], None]) -> Ticket | None:
        """A place at the back, or None when the queue is full (or off)."""
        if len(self.waiting) >= self.max:
            self.refused += 1
            return None
        ticket = Ticket(try_slot, expired)
        ticket.timer = self._clock.callLater(self.timeout, self._expire, ticket)
        self.waiting[ticket] = None
        self.queued += 1
        return ticket

    def leave(self, ticket: Ticket) -> None:
        """Take ``ticket`` out (served, or its client left); its timer stops."""
        if self.waiting.pop(ticket, 0) is None:
            timer, ticket.timer = ticket.timer, None
            if timer is not None and timer.active():
                timer.cancel()

    def wake(self) -> None:
        """Offer free slots to the waiters in order, until one finds none."""
        waiting = self.waiting
        while waiting:
            ticket = next(iter(waiting))
            go = ticket.try_slot()
            if go is None:
                return
            self.leave(ticket)  # first: ``go`` may free a slot and wake the queue again
            go()

    def _expire(self, ticket: Ticket) -> None:
        ticket.timer = None
        if self.waiting.pop(ticket, 0) is None:
            self.timed_out += 1
            ticket.expired()

    def to_json(self) -> dict[str, int | float]:
        return {"length": self.length(), "max": self.max, "timeout": self.timeout,
                "queued": self.queued, "refused": self.refused, "timed_out": self.timed_out}
