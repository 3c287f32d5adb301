"""The reactor equalizer runs on (equalizer.proxy.site.DirectEPollReactor): events reach
their handlers as with Twisted's epoll reactor, without the per-event log context, and
a handler's exception still closes only its own connection. Driven over a pipe (no
sockets), one ``doPoll`` at a time; the reactor is never run."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from twisted.internet.abstract import FileDescriptor
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from equalizer.proxy.site import DirectEPollReactor, install_reactor


class PipeReader(FileDescriptor):
    """The read end of a pipe, recording what each event did."""

    def __init__(self, reactor: DirectEPollReactor, fd: int, fail: bool = False,
                 fail_losing: bool = False) -> None:
        super().__init__(reactor)
        self.fd = fd
        self.fail = fail
        self.fail_losing = fail_losing
        self.read: list[bytes] = []
        self.lost: list[Failure] = []

    def fileno(self) -> int:
        return self.fd

    def doRead(self) -> None:  # noqa: N802 (Twisted's name)
        self.read.append(os.read(self.fd, 100))
        if self.fail:
            raise RuntimeError("a broken handler")

    def connectionLost(self, reason: Failure) -> None:  # noqa: N802 (Twisted's name)
        self.lost.append(reason)
        self.reactor.removeReader(self)
        if self.fail_losing:
            raise RuntimeError("a broken connectionLost")


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    read, write = os.pipe()
    yield read, write
    for fd in (read, write):
        try:
            os.close(fd)
        except OSError:
            pass


@pytest.fixture
def reactor() -> Iterator[DirectEPollReactor]:
    made = DirectEPollReactor()
    yield made
    made._poller.close()


def test_a_readable_descriptor_is_read_and_an_idle_one_is_not(reactor, pipe) -> None:
    reader = PipeReader(reactor, pipe[0])
    reactor.addReader(reader)
    reactor.doPoll(0)
    assert reader.read == []
    os.write(pipe[1], b"data")
    reactor.doPoll(0)
    assert reader.read == [b"data"] and reader.lost == []


def test_a_handler_that_raises_loses_its_connection_and_is_logged(reactor, pipe) -> None:
    """As with Twisted's reactor: the error is logged, the descriptor's connection is
    lost with it, and the poll goes on (nothing escapes ``doPoll``)."""
    reader = PipeReader(reactor, pipe[0], fail=True)
    reactor.addReader(reader)
    os.write(pipe[1], b"x")
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        reactor.doPoll(0)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert reader.read == [b"x"]
    assert len(reader.lost) == 1 and reader.lost[0].check(RuntimeError)
    assert [e["failure"].value.args for e in events if e.get("isError")] == [
        ("a broken handler",)]  # twisted.python.log.err's event, as the stock reactor's


def test_an_error_past_the_handler_is_logged_and_the_other_events_go_on(reactor) -> None:
    """An exception out of Twisted's own handling of an event (here the lost connection's
    ``connectionLost``) is logged, as ``callWithLogger`` did, and the poll's other events
    are still handled."""
    first, second = os.pipe(), os.pipe()
    try:
        broken = PipeReader(reactor, first[0], fail=True, fail_losing=True)
        healthy = PipeReader(reactor, second[0])
        for reader, (_, write) in ((broken, first), (healthy, second)):
            reactor.addReader(reader)
            os.write(write, b"y")
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        try:
            reactor.doPoll(0)
        finally:
            globalLogPublisher.removeObserver(events.append)
        assert broken.read == [b"y"] and healthy.read == [b"y"]
        failures = [e.get("log_failure") or e.get("failure") for e in events]
        assert sorted(str(f.value) for f in failures if f is not None) == [
            "a broken connectionLost", "a broken handler"]
    finally:
        for fd in (*first, *second):
            os.close(fd)


def test_an_installed_reactor_is_left_alone() -> None:
    """``twistd -r NAME`` (or an import of Twisted's default) installed one first."""
    from twisted.internet import reactor as installed

    assert install_reactor() is False
    from twisted.internet import reactor as after

    assert after is installed
