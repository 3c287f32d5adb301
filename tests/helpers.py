"""Small helpers shared by the unit tests."""

from __future__ import annotations

from typing import TypeVar

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
