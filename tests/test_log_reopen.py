"""SIGUSR1 reopens the log file (equalizer.logs): what ``logrotate ... postrotate kill -USR1``
relies on. Driven without threads: before ``startService`` the writer writes synchronously.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, globalLogPublisher

from equalizer.config.model import LoggingConfig
from equalizer.logs.files import RotatingFile
from equalizer.logs.service import LoggingService
from equalizer.service import EqualizerService
from tests.helpers import result_of
from tests.test_logs import FakeReactor, emit, file_config, lines_of
from tests.test_readiness import config as readiness_config


def test_reopen_after_a_move_writes_a_new_file(tmp_path: Path) -> None:
    """Lines after a reopen go to a new file of the configured name; the moved file keeps
    the lines written before it was moved and gets no more."""
    reactor = FakeReactor()
    path = tmp_path / "eq.log"
    service = LoggingService(file_config(path), reactor)
    emit(service, reactor, "before")
    path.rename(tmp_path / "eq.log.1")
    emit(service, reactor, "while moved")  # still the open file, now named eq.log.1
    service.reopen()
    emit(service, reactor, "after")
    service.close()
    assert [line.split("] ", 2)[2] for line in lines_of(tmp_path / "eq.log.1")] == [
        "before", "while moved"]
    assert [line.split("] ", 2)[2] for line in lines_of(path)] == ["after"]


def test_reopen_without_a_move_appends_to_the_same_file(tmp_path: Path) -> None:
    """A reopen when nothing moved the file keeps appending to it: no line is lost or doubled."""
    reactor = FakeReactor()
    path = tmp_path / "eq.log"
    service = LoggingService(file_config(path), reactor)
    emit(service, reactor, "one")
    service.reopen()
    emit(service, reactor, "two")
    service.close()
    assert [line.split("] ", 2)[2] for line in lines_of(path)] == ["one", "two"]


def test_reopen_that_fails_keeps_writing_the_open_file(tmp_path: Path) -> None:
    """When the path cannot be opened again, the error is reported and lines keep going to
    the file already open, instead of being lost."""
    errors: list[str] = []
    path = tmp_path / "eq.log"
    sink = RotatingFile(str(path), 10_000, lambda: 0.0, on_error=errors.append)
    sink.write("first\n")
    path.rename(tmp_path / "moved.log")
    path.mkdir()  # the name is taken by a directory: open() fails
    sink.request_reopen()
    sink.write("second\n")
    sink.close()
    assert (tmp_path / "moved.log").read_text() == "first\nsecond\n"
    assert len(errors) == 1 and errors[0].startswith(f"cannot reopen {str(path)!r}: ")


def test_reopen_is_logged_and_harmless_without_a_file() -> None:
    """On standard output there is nothing to reopen: SIGUSR1 is logged and changes nothing."""
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        LoggingService(LoggingConfig(), FakeReactor()).reopen()
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert [(event["log_level"], event["log_format"]) for event in events] == [
        (LogLevel.info, "SIGUSR1: logging to standard output; nothing to reopen")]


class ThreadlessReactor(MemoryReactorClock):
    """A MemoryReactorClock whose callFromThread runs the call at once."""

    def callFromThread(self, f, *args, **kwargs) -> None:
        f(*args, **kwargs)


def test_sigusr1_reopens_and_the_previous_handler_comes_back(tmp_path: Path) -> None:
    """A started service answers a real SIGUSR1 by reopening its log file (the process
    lives on), and stopping it puts back the handler that was there before."""
    reactor = ThreadlessReactor()
    path = tmp_path / "eq.log"
    logging_service = LoggingService(file_config(path), reactor)
    service = EqualizerService(readiness_config(), reactor, reread=readiness_config)
    service.logging_service = logging_service  # not a child: its writer stays synchronous
    before = signal.getsignal(signal.SIGUSR1)
    previous: list[int] = []
    signal.signal(signal.SIGUSR1, lambda signum, frame: previous.append(signum))
    try:
        service.privilegedStartService()
        service.startService()
        path.rename(tmp_path / "eq.log.1")
        os.kill(os.getpid(), signal.SIGUSR1)  # handled in this thread before kill returns
        emit(logging_service, reactor, "after the signal")
        assert "after the signal" in path.read_text()
        assert "after the signal" not in (tmp_path / "eq.log.1").read_text()
        result_of(service.stopService())
        os.kill(os.getpid(), signal.SIGUSR1)
        assert previous == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, before)
        logging_service.close()
