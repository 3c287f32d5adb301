"""How an outage is logged: once when it starts, when its reason changes, every
``repeat`` seconds while it lasts, and once when it is over; never at every retry."""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

log = Logger()

REPEAT_SECONDS = 60.0
"""How often an outage whose reason does not change is logged again."""


class OutageLog:
    """Logs the failures of one thing that is retried (a database), without a line per retry.

    Args:
        clock: for the repeat interval.
        what: names the thing in the messages (``PostgreSQL postgres@db:5432/eq``).
        repeat: seconds between two lines for the same reason.
    """

    def __init__(self, clock: IReactorTime, what: str, repeat: float = REPEAT_SECONDS) -> None:
        self._clock = clock
        self.what = what
        self._repeat = repeat
        self.reason: str | None = None
        """The reason of the outage under way, or None."""
        self._since = 0.0
        self._logged = 0.0
        self._failures = 0

    def failed(self, reason: str, *, retry: str = "") -> None:
        """One more failure for ``reason`` (one line of text); ``retry`` says what comes next."""
        now = self._clock.seconds()
        self._failures += 1
        if self.reason is None:
            self._since = now
        elif reason == self.reason and now - self._logged < self._repeat:
            return
        first = self.reason is None
        self.reason, self._logged = reason, now
        log.error("{what} unavailable{still}: {reason}{retry}", what=self.what, reason=reason,
                  still="" if first else f" for {now - self._since:.0f}s "
                                             f"({self._failures} failed attempts)",
                  retry=f"; {retry}" if retry else "")

    def recovered(self) -> None:
        """The thing works again: say so, once, if an outage was logged."""
        if self.reason is None:
            return
        log.info("{what} available again after {seconds:.1f}s ({failures} failed attempts)",
                 what=self.what, seconds=self._clock.seconds() - self._since,
                 failures=self._failures)
        self.forget()

    def forget(self) -> None:
        """The outage is over, and its end is told elsewhere: log nothing."""
        self.reason = None
        self._failures = 0
