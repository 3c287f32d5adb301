"""Tests for equalizer.proxy.deadlines: timeouts that reuse their pending DelayedCall once
called off, driven by a Clock."""

from __future__ import annotations

from twisted.internet.task import Clock

from equalizer.proxy.deadlines import MAX_SPARE, Deadlines


def test_a_deadline_goes_off_once_with_its_arguments() -> None:
    clock = Clock()
    went_off = []
    Deadlines(clock).arm(5, went_off.append, "late")
    clock.advance(4.9)
    assert went_off == []
    clock.advance(0.1)
    clock.advance(60)
    assert went_off == ["late"]


def test_a_called_off_deadline_never_goes_off() -> None:
    clock = Clock()
    went_off = []
    deadline = Deadlines(clock).arm(5, went_off.append, "late")
    deadline.call_off()
    deadline.call_off()  # twice is harmless
    clock.advance(60)
    assert went_off == []


def test_the_next_deadline_reuses_the_called_off_ones_pending_call() -> None:
    """No new DelayedCall for the next request: the idle one is reset, to a later time
    or a sooner one, and goes off then."""
    clock = Clock()
    deadlines = Deadlines(clock)
    went_off = []
    deadlines.arm(30, went_off.append, "first").call_off()
    clock.advance(1)
    deadlines.arm(60, went_off.append, "second").call_off()
    deadlines.arm(5, went_off.append, "third")
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(4.9)
    assert went_off == []
    clock.advance(0.1)
    assert went_off == ["third"]


def test_a_spare_whose_time_came_is_not_reused() -> None:
    clock = Clock()
    deadlines = Deadlines(clock)
    went_off = []
    deadlines.arm(5, went_off.append, "called off").call_off()
    clock.advance(5)  # the idle spare's call runs: nothing was waiting on it
    deadlines.arm(5, went_off.append, "fresh")
    clock.advance(5)
    assert went_off == ["fresh"]


def test_spares_are_bounded() -> None:
    """Past MAX_SPARE idle deadlines, one called off is cancelled, not kept pending."""
    clock = Clock()
    deadlines = Deadlines(clock)
    armed = [deadlines.arm(5, print) for _ in range(MAX_SPARE + 3)]
    for deadline in armed:
        deadline.call_off()
    assert len(clock.getDelayedCalls()) == MAX_SPARE
