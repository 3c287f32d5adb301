"""Timeouts that are nearly always called off before they go off, made cheap.

Every proxied request arms a response timeout and calls it off a few milliseconds
later, when the response ends. With ``callLater`` and ``cancel`` that costs a new
``DelayedCall``, a push onto the reactor's heap (Python comparisons) and, every so
often, a rebuild of the heap to drop the cancelled calls. A ``DelayedCall`` still
pending can instead be ``reset`` to a later time for two attribute writes. So a
called-off deadline keeps its ``DelayedCall`` pending, idle, for the next request.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

    from twisted.internet.interfaces import IDelayedCall, IReactorTime

MAX_SPARE = 1024
"""Idle deadlines kept for reuse; past that a called-off one is cancelled outright."""


class Deadline:
    """One armed timeout: the callback runs once when it goes off, unless called off.

    The holder drops its reference once it calls it off (or it went off): the object
    then serves somebody else's timeout.
    """

    __slots__ = ("_owner", "_call", "_callback", "_args")

    def __init__(self, owner: Deadlines, seconds: float, callback: Callable[..., Any],
                 args: tuple) -> None:
        self._owner = owner
        self._callback: Callable[..., Any] | None = callback
        self._args = args
        self._call: IDelayedCall = owner.clock.callLater(seconds, self._went_off)

    def _went_off(self) -> None:
        callback, self._callback = self._callback, None
        if callback is not None:  # else an idle spare's time came: nothing was waiting
            callback(*self._args)

    def call_off(self) -> None:
        """The awaited thing happened in time: the callback will not run."""
        if self._callback is None:
            return
        self._callback = None
        self._args = ()
        if not self._owner.keep(self):
            self._call.cancel()

    def rearm(self, seconds: float, callback: Callable[..., Any], args: tuple) -> bool:
        """Arm again, ``seconds`` from now; False if its call already ran (then it cannot)."""
        call = self._call
        if not call.active():
            return False
        call.reset(seconds)
        self._callback = callback
        self._args = args
        return True


class Deadlines:
    """Where deadlines come from: a reused idle one when there is one, else a new one."""

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self._spare: list[Deadline] = []

    def arm(self, seconds: float, callback: Callable[..., Any], *args: Any) -> Deadline:
        """A deadline that calls ``callback(*args)`` in ``seconds`` unless called off."""
        spare = self._spare
        while spare:
            deadline = spare.pop()
            if deadline.rearm(seconds, callback, args):
                return deadline
        return Deadline(self, seconds, callback, args)

    def keep(self, deadline: Deadline) -> bool:
        """Keep a called-off deadline for the next ``arm``; False when enough are kept."""
        if len(self._spare) >= MAX_SPARE:
            return False
        self._spare.append(deadline)
        return True
