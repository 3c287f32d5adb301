"""Line formats and sinks, event by event: what each odd event turns into."""

from __future__ import annotations

import io

from twisted.logger import LogLevel

from equalizer.logs import files
from equalizer.logs.files import ROTATE_RETRY_SECONDS, QueuedWriter, RotatingFile, StreamSink
from equalizer.logs.formats import LineObserver, format_json, format_text


def event(**fields: object) -> dict[str, object]:
    base: dict[str, object] = {"log_level": LogLevel.info, "log_namespace": "test",
                               "log_format": "hello", "log_time": 0.0}
    return base | fields


def test_time_that_is_no_timestamp_is_a_dash() -> None:
    """A missing, non-numeric or out-of-range log_time gives '-' rather than an error."""
    assert format_text(event(log_time="noon")).startswith("- [info] [test] hello")
    assert format_text(event(log_time=1e300)).startswith("- [info]")
    assert format_text(event(log_time=1.5)).startswith("1970-01-01T00:00:01.500Z [info]")


def test_legacy_event_is_named_by_its_system() -> None:
    """twisted.python.log events carry their origin in log_system, not log_namespace."""
    line = format_text(event(log_namespace="log_legacy", log_system="HTTPChannel,3,1.2.3.4"))
    assert "[HTTPChannel,3,1.2.3.4] hello" in line
    assert "[log_legacy]" in format_text(event(log_namespace="log_legacy"))


class BrokenFailure:
    def getTraceback(self) -> str:
        raise RuntimeError("no frames")


def test_broken_failure_does_not_break_the_line() -> None:
    line = format_text(event(log_failure=BrokenFailure()))
    assert "(traceback unavailable: RuntimeError('no frames'))" in line


def test_json_bytes_field_is_text_and_nan_is_a_repr() -> None:
    """Fields that strict JSON cannot carry become text: bytes decoded, NaN as its repr."""
    line = format_json(event(raw=b"caf\xc3\xa9\xff", ratio=float("nan")))
    assert '"raw": "caf\\u00e9\\\\xff"' in line
    assert '"ratio": "nan"' in line


def test_unformattable_event_still_gives_one_line() -> None:
    """A formatter that raises is reported as one error line carrying the event."""
    lines: list[str] = []

    def broken(event: object) -> str:
        raise ValueError("bad format")

    LineObserver(broken, lines.append)(event())
    [line] = lines
    assert "[error] [equalizer.logs] unformattable log event (ValueError('bad format'))" in line
    assert line.endswith("\n") and line.count("\n") == 1


def test_stream_sink_escapes_what_the_stream_cannot_encode() -> None:
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="ascii")
    sink = StreamSink(stream)
    sink.write("café\n")
    sink.close()
    assert raw.getvalue() == b"caf\\xe9\n"


# -- rotation that fails ---------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def failing(*args: object) -> None:
    raise PermissionError(13, "Permission denied")


def test_failed_rotation_keeps_writing_and_retries_later(tmp_path, monkeypatch) -> None:
    """A rename that fails is reported once; lines still go to the live file, and the
    next attempt waits ROTATE_RETRY_SECONDS."""
    clock, errors = Clock(), []
    sink = RotatingFile(str(tmp_path / "app.log"), 10, clock, on_error=errors.append)
    sink.write("first line\n")
    monkeypatch.setattr(files.os, "rename", failing)
    sink.write("second line\n")
    sink.write("third line\n")  # within the retry delay: no second attempt
    assert errors == [f"cannot rotate {sink.path!r}: Permission denied"]
    monkeypatch.undo()
    clock.now += ROTATE_RETRY_SECONDS
    sink.write("fourth\n")
    sink.close()
    assert (tmp_path / "app.log").read_text() == "fourth\n"
    assert len(list(tmp_path.glob("app.log.*.1"))) == 1


def test_rotation_that_cannot_open_a_new_file_keeps_the_old_one(tmp_path, monkeypatch) -> None:
    """If the fresh file cannot be opened, the rotated one is renamed back: lines never
    go to a file under another name."""
    clock, errors = Clock(), []
    sink = RotatingFile(str(tmp_path / "app.log"), 10, clock, on_error=errors.append)
    sink.write("first line\n")
    monkeypatch.setattr(files, "open", failing, raising=False)
    sink.write("second line\n")
    monkeypatch.undo()
    sink.close()
    assert errors == [f"cannot rotate {sink.path!r}: Permission denied"]
    assert (tmp_path / "app.log").read_text() == "first line\nsecond line\n"
    assert list(tmp_path.glob("app.log.*")) == []


def test_reopen_that_fails_keeps_the_open_file(tmp_path, monkeypatch) -> None:
    clock, errors = Clock(), []
    sink = RotatingFile(str(tmp_path / "app.log"), 1000, clock, on_error=errors.append)
    sink.request_reopen()
    monkeypatch.setattr(files, "open", failing, raising=False)
    sink.write("still here\n")
    monkeypatch.undo()
    sink.close()
    assert errors == [f"cannot reopen {sink.path!r}: Permission denied"]
    assert (tmp_path / "app.log").read_text() == "still here\n"


def test_writer_never_started_stops_at_once_and_writes_synchronously() -> None:
    stream = io.StringIO()
    writer = QueuedWriter(StreamSink(stream), lambda f, *a: f(*a))
    assert writer.stop().called
    writer.write("sync\n")
    assert stream.getvalue() == "sync\n" and writer.dropped == 0
