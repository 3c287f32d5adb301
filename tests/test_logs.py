"""Tests for equalizer.logs: formats, level filter, rotation, compression, retention, writer.

Most tests drive a :class:`FakeReactor`: a Clock whose ``callFromThread`` runs at once
and whose thread pool runs work synchronously, so the real ``deferToThreadPool`` path
of compression runs inside the test. Without ``startService`` the writer writes
synchronously, so rotation is deterministic. The writer thread itself is exercised with
a blocking sink, and once end to end under the real reactor with pytest-twisted.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import threading
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.application.service import Application
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, Logger, LogLevel
from twisted.python.failure import Failure

from equalizer.config.model import LoggingConfig, RotateConfig
from equalizer.logs.access import AccessLog
from equalizer.logs.batch import LINES_BATCH, LINES_DELAY, LineBatcher
from equalizer.logs.files import QueuedWriter
from equalizer.logs.formats import format_json, format_text
from equalizer.logs.maintenance import maintain
from equalizer.logs.service import LogFileError, LoggingService, open_logging, resolve_logging

START = datetime(2024, 5, 1, 10, 0, tzinfo=UTC).timestamp()
DAY = 24 * 60 * 60


class SyncThreadPool:
    """Runs 'threaded' work at once, reporting like twisted.python.threadpool.ThreadPool."""

    def callInThreadWithCallback(self, on_result, f, *args, **kwargs) -> None:
        try:
            result = f(*args, **kwargs)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)


class FakeReactor(Clock):
    """A Clock whose threads run synchronously in the caller's thread."""

    def __init__(self, now: float = START) -> None:
        super().__init__()
        self.advance(now)
        self.pool = SyncThreadPool()

    def callFromThread(self, f, *args, **kwargs) -> None:
        f(*args, **kwargs)

    def getThreadPool(self) -> SyncThreadPool:
        return self.pool


def file_config(path: Path, *, max_bytes: int = 10_000, retention_days: int = 90,
                compress: bool = False, **kwargs: Any) -> LoggingConfig:
    rotate = RotateConfig(max_bytes=max_bytes, retention_days=retention_days, compress=compress)
    return LoggingConfig(file=str(path), rotate=rotate, **kwargs)


def emit(service: LoggingService, clock: Clock, text: str, level: LogLevel = LogLevel.info,
         namespace: str = "tests", **fields: Any) -> None:
    """Send one event shaped like a Logger's, but stamped with ``clock``, to the observer."""
    service.observer({**fields, "log_level": level, "log_namespace": namespace,
                      "log_format": text, "log_time": clock.seconds()})


def lines_of(path: Path) -> list[str]:
    if path.name.endswith(".gz"):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return f.read().splitlines()
    return path.read_text("utf-8").splitlines()


def rotated(directory: Path) -> list[Path]:
    """Rotated files, oldest first (by day, then by their number)."""
    def key(p: Path) -> tuple[str, int]:
        parts = p.name.split(".")
        return parts[2], int(parts[3])
    return sorted((p for p in directory.iterdir() if p.name.startswith("eq.log.")), key=key)


def all_messages(directory: Path) -> list[str]:
    """Every line's message part, rotated files first, then the live file."""
    lines: list[str] = []
    for path in [*rotated(directory), directory / "eq.log"]:
        lines.extend(lines_of(path))
    return [line.split("] ", 2)[2] for line in lines]


# -- formats and levels ---------------------------------------------------------------------


def test_text_line_has_time_level_namespace_and_message() -> None:
    """A text line is ISO UTC time, level, namespace and the formatted message."""
    line = format_text({"log_time": START, "log_level": LogLevel.warn, "log_namespace": "x.y",
                        "log_format": "backend {url} down", "url": "http://a"})
    assert line == "2024-05-01T10:00:00.000Z [warn] [x.y] backend http://a down\n"


def test_text_failure_continues_on_tab_indented_lines() -> None:
    """A failure's traceback follows its message on continuation lines that start with a tab."""
    try:
        raise ValueError("boom")
    except ValueError:
        failure = Failure()
    line = format_text({"log_time": START, "log_level": LogLevel.critical,
                        "log_namespace": "x", "log_format": "it broke", "log_failure": failure})
    first, *rest = line.rstrip("\n").split("\n")
    assert first.endswith("[critical] [x] it broke")
    assert rest and all(part.startswith("\t") for part in rest)
    assert "ValueError: boom" in line


def test_text_value_with_newlines_cannot_forge_a_line() -> None:
    """Line breaks inside a message become tab-indented continuations, never new entries."""
    line = format_text({"log_time": START, "log_level": LogLevel.info, "log_namespace": "x",
                        "log_format": "id={id}", "id": "a\r\n2024 [error] fake\rb"})
    assert line == ("2024-05-01T10:00:00.000Z [info] [x] id=a\n\t2024 [error] fake\n\tb\n")


def test_json_line_parses_and_carries_named_fields() -> None:
    """A JSON line is one object with time, level, namespace, message and the event's fields."""
    line = format_json({"log_time": START, "log_level": LogLevel.info, "log_namespace": "x",
                        "log_format": "{n} items", "n": 3, "names": ["a", "b"],
                        "log_logger": object(), "isError": 0})
    assert line.endswith("\n") and line.count("\n") == 1
    assert json.loads(line) == {"time": "2024-05-01T10:00:00.000Z", "level": "info",
                                "namespace": "x", "message": "3 items", "n": 3,
                                "names": ["a", "b"]}


def test_json_never_raises_for_unserialisable_fields() -> None:
    """Fields JSON cannot encode become strings and the line stays valid strict JSON."""
    loop: list[object] = []
    loop.append(loop)
    line = format_json({"log_time": START, "log_level": LogLevel.info, "log_namespace": "x",
                        "log_format": "odd", "thing": object(), "raw": b"\xffab",
                        "nan": float("nan"), "loop": loop, "items": {1, 2}})
    record = json.loads(line, parse_constant=lambda name: pytest.fail(f"non-strict {name}"))
    assert record["message"] == "odd"
    assert record["thing"].startswith("<object object")
    assert record["raw"] == "\\xffab"
    assert record["nan"] == "nan"
    assert isinstance(record["loop"], str) and isinstance(record["items"], str)


def test_json_failure_adds_traceback() -> None:
    """A logged failure puts its traceback in a ``traceback`` field."""
    failure = Failure(KeyError("k"))
    record = json.loads(format_json({"log_time": START, "log_level": LogLevel.critical,
                                     "log_namespace": "x", "log_format": "lost",
                                     "log_failure": failure}))
    assert "KeyError" in record["traceback"]


def test_level_info_drops_debug(tmp_path: Path) -> None:
    """At level info, debug events are dropped and info and above are written."""
    reactor = FakeReactor()
    service = LoggingService(file_config(tmp_path / "eq.log"), reactor)
    emit(service, reactor, "hidden", LogLevel.debug)
    emit(service, reactor, "shown", LogLevel.info)
    emit(service, reactor, "also shown", LogLevel.error)
    service.close()
    assert all_messages(tmp_path) == ["shown", "also shown"]


def test_level_warn_drops_info_but_keeps_access_lines(tmp_path: Path) -> None:
    """At level warn, info events are dropped but access lines still appear (access_log)."""
    reactor = FakeReactor()
    service = LoggingService(file_config(tmp_path / "eq.log", level="warn"), reactor)
    emit(service, reactor, "hidden", LogLevel.info)
    emit(service, reactor, "a warning", LogLevel.warn)
    emit(service, reactor, "GET /", LogLevel.info, namespace="equalizer.access")
    service.close()
    assert all_messages(tmp_path) == ["a warning", "GET /"]


def test_reconfigure_changes_level_and_format_live(tmp_path: Path) -> None:
    """reconfigure applies a new level and format at once and says when a restart is needed."""
    reactor = FakeReactor()
    config = file_config(tmp_path / "eq.log")
    service = LoggingService(config, reactor)
    assert service.reconfigure(attrs.evolve(config, level="debug", format="json")) is False
    emit(service, reactor, "now visible", LogLevel.debug)
    assert service.reconfigure(attrs.evolve(config, file=str(tmp_path / "other.log"))) is True
    service.close()
    assert json.loads(lines_of(tmp_path / "eq.log")[0])["message"] == "now visible"


def test_reconfigure_compares_files_with_the_yaml_not_the_flag(tmp_path: Path) -> None:
    """When --logfile chose the file, reloading an unchanged YAML needs no restart."""
    config = LoggingConfig()
    options = {"logfile": str(tmp_path / "eq.log"), "nodaemon": True}
    service = open_logging(config, FakeReactor(), options)
    assert service is not None and service.config.file == str(tmp_path / "eq.log")
    assert service.reconfigure(attrs.evolve(config, level="error")) is False
    assert service.config.file == str(tmp_path / "eq.log")
    service.close()


def test_access_event_line_carries_request_fields(tmp_path: Path) -> None:
    """An access event as proxy.py emits it gives a JSON line with every request field."""
    reactor = FakeReactor()
    service = LoggingService(file_config(tmp_path / "eq.log", format="json"), reactor)
    access = Logger(namespace="equalizer.access", observer=service.observer)
    access.info(
        '{client} "{method} {path}" {status} {bytes} {duration_ms}ms'
        " backend={backend} request_id={request_id} rate_limit={rate_limit}",
        client="10.0.0.7", method="GET", path="/items?x=1", status=200, bytes=512,
        duration_ms=12.5, backend="b1", request_id="req-42", rate_limit="allowed",
    )
    service.close()
    [line] = lines_of(tmp_path / "eq.log")
    record = json.loads(line)
    assert record["namespace"] == "equalizer.access" and record["level"] == "info"
    assert {key: record[key] for key in ("client", "method", "path", "status", "bytes",
                                         "duration_ms", "backend", "request_id", "rate_limit")} == {
        "client": "10.0.0.7", "method": "GET", "path": "/items?x=1", "status": 200,
        "bytes": 512, "duration_ms": 12.5, "backend": "b1", "request_id": "req-42",
        "rate_limit": "allowed"}
    assert record["message"] == ('10.0.0.7 "GET /items?x=1" 200 512 12.5ms backend=b1'
                                 " request_id=req-42 rate_limit=allowed")


ACCESS_FIELDS = dict(client="10.0.0.7", method="POST", path="/a", status=502, size=0,
                     duration_ms=3.25, backend="b1,b2", request_id="r1",
                     rate_limit="allowed", upstream_addr="127.0.0.1:9001, [::1]:9002")


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_access_line_names_every_upstream_address(tmp_path: Path, fmt: str) -> None:
    """An access line names every backend tried by host:port, in order and as nginx's
    $upstream_addr prints them, then their ids; the fast path writes exactly what the
    twisted.logger path would."""
    reactor = FakeReactor()
    service = LoggingService(file_config(tmp_path / "eq.log", format=fmt), reactor)
    fast = AccessLog()
    fast.attach(service)
    fast.log(**ACCESS_FIELDS)
    reactor.advance(LINES_DELAY)
    slow = AccessLog()
    slow._logger = Logger(namespace="equalizer.access", observer=service.observer)
    slow.log(**ACCESS_FIELDS)
    service.close()
    fast_line, slow_line = lines_of(tmp_path / "eq.log")
    if fmt == "text":
        assert fast_line.split(" ", 1)[1] == slow_line.split(" ", 1)[1]
        assert fast_line.endswith(' 3.25ms upstream_addr="127.0.0.1:9001, [::1]:9002"'
                                  " backend=b1,b2 request_id=r1 rate_limit=allowed")
    else:
        fast_record, slow_record = json.loads(fast_line), json.loads(slow_line)
        del fast_record["time"], slow_record["time"]
        assert fast_record == slow_record
        assert fast_record["upstream_addr"] == "127.0.0.1:9001, [::1]:9002"
        assert fast_record["backend"] == "b1,b2"


def test_access_line_without_backend_is_dash(tmp_path: Path) -> None:
    """A request answered by the proxy itself (a 429) logs ``-`` for address and id."""
    reactor = FakeReactor()
    service = LoggingService(file_config(tmp_path / "eq.log"), reactor)
    access = AccessLog()
    access.attach(service)
    access.log("10.0.0.7", "GET", "/", 429, 80, 0.5, "-", "r2", "limited", "-")
    reactor.advance(LINES_DELAY)
    service.close()
    [line] = lines_of(tmp_path / "eq.log")
    assert line.endswith(' 429 80 0.5ms upstream_addr="-" backend=- request_id=r2'
                         " rate_limit=limited")


def test_stdout_without_file() -> None:
    """With no file, lines go to the stream given as standard output."""
    reactor = FakeReactor()
    stream = io.StringIO()
    service = LoggingService(LoggingConfig(), reactor, stdout=stream)
    emit(service, reactor, "hello {who}", who="you")
    assert stream.getvalue() == "2024-05-01T10:00:00.000Z [info] [tests] hello you\n"


# -- rotation -------------------------------------------------------------------------------


def test_size_cap_rotates_into_numbered_files(tmp_path: Path) -> None:
    """Past max_bytes a file is renamed NAME.DAY.N and a new one started; nothing is lost."""
    reactor = FakeReactor()
    service = LoggingService(file_config(tmp_path / "eq.log", max_bytes=200), reactor)
    messages = [f"line {i:02d} " + "x" * 40 for i in range(20)]
    for message in messages:
        emit(service, reactor, message)
    service.close()
    names = [p.name for p in rotated(tmp_path)]
    assert len(names) >= 5
    assert names[:3] == ["eq.log.2024-05-01.1", "eq.log.2024-05-01.2", "eq.log.2024-05-01.3"]
    assert all(p.stat().st_size <= 200 for p in [*rotated(tmp_path), tmp_path / "eq.log"])
    assert all_messages(tmp_path) == messages


def test_line_longer_than_cap_goes_alone_into_a_fresh_file(tmp_path: Path) -> None:
    """A line bigger than max_bytes is never split: it fills a new file on its own."""
    reactor = FakeReactor()
    service = LoggingService(file_config(tmp_path / "eq.log", max_bytes=50), reactor)
    emit(service, reactor, "short")
    emit(service, reactor, "y" * 100)
    service.close()
    assert [lines_of(p)[0].endswith("short") for p in rotated(tmp_path)] == [True]
    assert lines_of(tmp_path / "eq.log")[0].endswith("y" * 100)


def test_day_change_starts_a_new_file(tmp_path: Path) -> None:
    """The first line of a new UTC day rotates the previous day's file out under that day."""
    reactor = FakeReactor()
    service = LoggingService(file_config(tmp_path / "eq.log"), reactor)
    emit(service, reactor, "day one")
    reactor.advance(DAY)
    emit(service, reactor, "day two")
    service.close()
    assert [p.name for p in rotated(tmp_path)] == ["eq.log.2024-05-01.1"]
    assert lines_of(tmp_path / "eq.log.2024-05-01.1")[0].endswith("day one")
    assert lines_of(tmp_path / "eq.log")[0].startswith("2024-05-02T10:00:00.000Z")


def test_file_left_from_an_earlier_day_is_rotated_first(tmp_path: Path) -> None:
    """A non-empty file last written on an earlier day is rotated under that day at start."""
    path = tmp_path / "eq.log"
    path.write_text("old line\n")
    old = START - 3 * DAY
    os.utime(path, (old, old))
    reactor = FakeReactor()
    service = LoggingService(file_config(path), reactor)
    emit(service, reactor, "new line")
    service.close()
    assert lines_of(tmp_path / "eq.log.2024-04-28.1") == ["old line"]
    assert lines_of(path) == ["2024-05-01T10:00:00.000Z [info] [tests] new line"]


def test_rotated_files_are_gzip_compressed(tmp_path: Path) -> None:
    """With compress on, every rotated file becomes a valid gzip holding its lines."""
    reactor = FakeReactor()
    config = file_config(tmp_path / "eq.log", max_bytes=200, compress=True)
    service = LoggingService(config, reactor)
    messages = [f"entry {i:02d} " + "z" * 40 for i in range(12)]
    for message in messages:
        emit(service, reactor, message)
    service.close()
    files = rotated(tmp_path)
    assert files and all(p.name.endswith(".gz") for p in files)
    for p in files:
        with gzip.open(p, "rb") as f:
            assert f.read()  # decompresses without error
    assert all_messages(tmp_path) == messages


def test_maintain_applies_retention_and_compression(tmp_path: Path) -> None:
    """maintain deletes files past retention, gzips the others and leaves the live file alone."""
    for name in ["eq.log", "eq.log.2024-04-20.1.gz", "eq.log.2024-04-28.1",
                 "eq.log.2024-04-29.1", "eq.log.2024-04-30.2.gz.tmp", "eq.log.2024-04-30.2",
                 "other.log.2024-01-01.1"]:
        (tmp_path / name).write_text(f"{name}\n")
    result = maintain(str(tmp_path / "eq.log"), date(2024, 5, 1), retention_days=2,
                      compress=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "eq.log", "eq.log.2024-04-29.1.gz", "eq.log.2024-04-30.2.gz", "other.log.2024-01-01.1"]
    assert lines_of(tmp_path / "eq.log.2024-04-30.2.gz") == ["eq.log.2024-04-30.2"]
    assert len(result.deleted) == 2 and len(result.compressed) == 2


def test_retention_runs_after_rotation(tmp_path: Path) -> None:
    """A rotation triggers retention: files from long ago disappear, recent ones stay."""
    (tmp_path / "eq.log.2024-01-01.1.gz").write_bytes(gzip.compress(b"ancient\n"))
    (tmp_path / "eq.log.2024-04-30.1").write_text("yesterday\n")
    reactor = FakeReactor()
    service = LoggingService(file_config(tmp_path / "eq.log", max_bytes=60, retention_days=7),
                             reactor)
    emit(service, reactor, "a" * 30)
    emit(service, reactor, "b" * 30)
    service.close()
    assert [p.name for p in rotated(tmp_path)] == ["eq.log.2024-04-30.1", "eq.log.2024-05-01.1"]


# -- start-up errors, twistd integration -----------------------------------------------------


def test_missing_directory_gives_a_clear_error(tmp_path: Path) -> None:
    """A log file in a missing directory fails at construction with one clear line."""
    path = tmp_path / "missing" / "eq.log"
    with pytest.raises(LogFileError) as caught:
        LoggingService(file_config(path), FakeReactor())
    assert str(caught.value) == (
        f"logging.file: cannot open '{path}': No such file or directory")


def test_unopenable_path_names_the_flag_it_came_from(tmp_path: Path) -> None:
    """A --logfile that is a directory is reported against --logfile."""
    options = {"logfile": str(tmp_path), "nodaemon": True}
    with pytest.raises(LogFileError, match=r"^--logfile: cannot open '.*': Is a directory$"):
        open_logging(LoggingConfig(), FakeReactor(), options)


def test_resolve_logging_follows_twistd_flags(tmp_path: Path) -> None:
    """twistd's --logfile overrides logging.file, --syslog/--logger keep twistd's logging."""
    config = LoggingConfig(file="eq.log")
    assert resolve_logging(config, None) == (config, "logging.file")
    assert resolve_logging(config, {"nodaemon": True}) == (config, "logging.file")
    assert resolve_logging(config, {"logfile": "x.log"}) == (
        attrs.evolve(config, file="x.log"), "--logfile")
    assert resolve_logging(config, {"logfile": "-", "nodaemon": True}) == (
        attrs.evolve(config, file=None), "--logfile")
    assert resolve_logging(config, {"syslog": True}) is None
    assert resolve_logging(config, {"logger": "my.factory"}) is None
    stdout_config = LoggingConfig()
    assert resolve_logging(stdout_config, {"nodaemon": False}) == (
        attrs.evolve(stdout_config, file="twistd.log"), "logging.file")
    with pytest.raises(LogFileError, match="daemon cannot log to standard output"):
        resolve_logging(config, {"logfile": "-", "nodaemon": False})


def test_install_sets_the_application_log_observer(tmp_path: Path) -> None:
    """install makes the observer the Application's ILogObserver, which twistd's AppLogger uses."""
    service = LoggingService(file_config(tmp_path / "eq.log"), FakeReactor())
    application = Application("equalizer")
    service.install(application)
    assert application.getComponent(ILogObserver) is service.observer
    service.close()


# -- the writer thread ----------------------------------------------------------------------


class BlockingSink:
    """A sink whose first write blocks until released: a disk that has stalled."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.entered = threading.Event()
        self.release = threading.Event()

    def write(self, line: str) -> None:
        self.entered.set()
        if not self.release.wait(10):
            raise TimeoutError("never released")
        self.lines.append(line)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


@contextlib.contextmanager
def stuck_writer(**limits: int) -> Iterator[tuple[QueuedWriter, BlockingSink]]:
    """A started writer whose sink is stuck writing ``first``; on leaving, the sink is
    released and the writer stopped (its thread has written everything)."""
    sink = BlockingSink()
    writer = QueuedWriter(sink, lambda f, *a: f(*a), drop_notice=lambda n: f"dropped {n}\n",
                          **limits)
    stopped = threading.Event()
    writer.start()
    try:
        writer.write("first\n")
        assert sink.entered.wait(5)
        yield writer, sink
    finally:
        sink.release.set()
        writer.stop().addCallback(lambda _: stopped.set())
    assert stopped.wait(5)


def test_slow_disk_does_not_block_emit() -> None:
    """While the sink is stuck, write returns at once, overflow is dropped and reported later."""
    with stuck_writer(max_queued=10) as (writer, sink):
        began = time.monotonic()
        for i in range(100):
            writer.write(f"line {i}\n")
        assert time.monotonic() - began < 0.5
        assert writer.dropped == 90
    assert sink.lines == ["first\n", *(f"line {i}\n" for i in range(10)), "dropped 90\n"]
    writer.write("after stop\n")  # synchronous again
    assert sink.lines[-1] == "after stop\n"


def test_failed_writes_are_counted_and_reported() -> None:
    """Lines the sink refuses (disk full) are counted and reported once writes succeed again."""

    class FlakySink(BlockingSink):
        def __init__(self) -> None:
            super().__init__()
            self.broken = True

        def write(self, line: str) -> None:
            if self.broken:
                raise OSError(28, "No space left on device")
            self.lines.append(line)

    sink = FlakySink()
    writer = QueuedWriter(sink, lambda f, *a: f(*a), drop_notice=lambda n: f"dropped {n}\n")
    writer.write("lost 1\n")
    writer.write("lost 2\n")
    sink.broken = False
    writer.write("kept\n")
    assert sink.lines == ["kept\n", "dropped 2\n"]


@pytest_twisted.ensureDeferred
async def test_real_threads_write_rotate_and_compress(tmp_path: Path) -> None:
    """Under the real reactor the writer thread writes and rotates and the pool compresses."""
    from twisted.internet import reactor

    config = file_config(tmp_path / "eq.log", max_bytes=300, compress=True)
    service = LoggingService(config, reactor)
    service.startService()
    messages = [f"threaded {i:03d} " + "t" * 30 for i in range(40)]
    for message in messages:
        emit(service, reactor, message)
    await service.stopService()
    service.close()
    files = rotated(tmp_path)
    assert len(files) >= 5 and all(p.name.endswith(".gz") for p in files)
    assert all_messages(tmp_path) == messages


def test_access_lines_go_to_the_writer_in_batches(tmp_path: Path) -> None:
    """Access lines wait in the reactor thread and reach the file together, LINES_DELAY
    after the first: one hand-over to the writer per batch, not one per request."""
    reactor = FakeReactor()
    service = LoggingService(file_config(tmp_path / "eq.log", max_bytes=1_000_000), reactor)
    access = AccessLog()
    access.attach(service)
    for request_id in ("r1", "r2", "r3"):
        access.log("10.0.0.7", "GET", "/", 200, 80, 0.5, "b1", request_id, "allowed")
    assert lines_of(tmp_path / "eq.log") == []
    reactor.advance(LINES_DELAY)
    assert [line.split(" request_id=")[1] for line in lines_of(tmp_path / "eq.log")] == [
        "r1 rate_limit=allowed", "r2 rate_limit=allowed", "r3 rate_limit=allowed"]
    service.close()


def test_stopping_the_service_writes_waiting_access_lines(tmp_path: Path) -> None:
    """Stopping writes the batch that waits, and any later line goes at once: no line waits
    for a timer the stopping reactor would not run."""
    reactor = FakeReactor()
    service = LoggingService(file_config(tmp_path / "eq.log", max_bytes=1_000_000), reactor)
    service.startService()
    access = AccessLog()
    access.attach(service)
    access.log("10.0.0.7", "GET", "/", 200, 80, 0.5, "b1", "before", "allowed")
    stopped = threading.Event()
    service.stopService().addCallback(lambda _: stopped.set())
    assert stopped.wait(10)  # the writer thread has written what was queued and ended
    access.log("10.0.0.7", "GET", "/", 200, 80, 0.5, "b1", "after", "allowed")
    service.close()
    assert [line.split(" request_id=")[1] for line in lines_of(tmp_path / "eq.log")] == [
        "before rate_limit=allowed", "after rate_limit=allowed"]
    assert not reactor.getDelayedCalls()


def test_line_batcher_hands_on_a_full_batch_at_once() -> None:
    """LINES_BATCH characters waiting go at once, without waiting for the delay; flush
    returns what delivery returned."""
    clock = Clock()
    delivered: list[str] = []
    batcher = LineBatcher(clock, lambda text: delivered.append(text) or len(delivered))
    line = "x" * 99 + "\n"
    for _ in range(LINES_BATCH // len(line)):
        batcher.write(line)
    assert delivered == []
    batcher.write(line)
    assert delivered == [line * (LINES_BATCH // len(line) + 1)]
    assert not clock.getDelayedCalls()
    batcher.write("last\n")
    assert batcher.flush() == 2 and delivered[1] == "last\n"
    assert batcher.flush() is None


def test_a_slow_disk_bounds_queued_batches_by_characters() -> None:
    """Batches of lines (access lines, a worker's) are bounded by characters as well as by
    count, and what is dropped is counted in lines."""
    line = "x" * 29 + "\n"  # 30 characters
    with stuck_writer(max_queued=10, max_chars=100) as (writer, sink):
        for _ in range(3):
            writer.write(line)
        writer.write(line * 3)  # 90 more would pass 100: its three lines are dropped
        assert writer.dropped == 3
    assert sink.lines == ["first\n", line, line, line, "dropped 3\n"]
