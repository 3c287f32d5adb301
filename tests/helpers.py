"""Small helpers shared by the unit tests."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

T = TypeVar("T")


def result_of(d: Deferred[T]) -> T:
    """The result of a Deferred that has already fired; fail loudly if it has not.

    A failure is re-raised, so ``pytest.raises`` works on it. Tests that drive a
    fake clock use this instead of a real reactor, as tahoe-lafs does.
    """
    results: list[T] = []
    failures: list[Failure] = []
    d.addCallbacks(results.append, failures.append)
    if failures:
        failures[0].raiseException()
    if not results:
        raise AssertionError(f"Deferred {d!r} has not fired yet")
    return results[0]


def taken(d: Deferred[Any]) -> list[Any]:
    """Collect what ``d`` fires with (a result, or the failure), now or later."""
    out: list[Any] = []
    d.addBoth(out.append)
    return out


class Blocked(AssertionError):
    """A step that should take microseconds ran on: it would block the reactor."""


@contextmanager
def bounded(seconds: float = 10.0) -> Iterator[None]:
    """Fail with :class:`Blocked` (rather than hang the suite) when the block runs longer
    than ``seconds``: for steps that must not spin. The bound is far above what the step
    needs, so a busy machine does not matter."""

    def expired(signum: int, frame: Any) -> None:
        raise Blocked(f"still running after {seconds} s: it would block the reactor")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
