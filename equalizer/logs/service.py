"""Logging output: level filter, text or JSON lines, a rotating file (SPEC sections 3 and 7).

How it plugs into twistd.
    twistd starts its log observer *after* ``makeService`` returns: ``AppLogger.start``
    takes the ``ILogObserver`` component of the ``Application`` if there is one, and only
    otherwise builds its own from ``--logfile``/``--syslog`` (``twisted/application/app.py``).
    makeService never sees the Application, but twistd hands it to the returned service's
    ``setServiceParent``; :meth:`LoggingService.install` sets the component there. So our
    observer is the only one, from the very first line (twistd replays what was logged
    before it began), and it is removed by twistd at exit as its own would be.

Where lines go (:func:`resolve_logging`).
    ``logging.file``, or standard output when it is null. twistd's flags win over the
    file: ``--logfile PATH`` replaces ``logging.file`` (still with our format, level and
    rotation), ``--logfile -`` means standard output; ``--syslog`` and ``--logger`` leave
    logging entirely to twistd. A daemon has no standard output, so without a file it
    writes ``twistd.log`` in the starting directory, as twistd itself does.

Never blocking the reactor (:class:`QueuedWriter`).
    Formatting happens in the caller's thread; the line goes to a bounded in-memory queue
    that a dedicated writer thread empties into the file. A full queue (the disk is slower
    than the log) drops the line and counts it; the writer writes a warning with the count
    once it catches up. The thread starts in ``startService`` (after twistd has forked:
    threads do not survive ``fork``); before that and after ``stopService`` lines are
    written synchronously, which is harmless while nothing is being served.

Rotation (:class:`RotatingFile`), in the writer thread, quick: one rename and one open.
    The live file keeps its configured name. Before a line is written, the file is
    rotated when the UTC day has changed since its first line, or when the line would
    take it past ``rotate.max_bytes`` (a single longer line still goes, alone, into a
    fresh file). The rotated file is named ``NAME.YYYY-MM-DD.N``: the UTC day its lines
    were written, and N = 1, 2, ... within that day (higher is newer).

Compression and retention (:func:`maintain`, :class:`LogMaintenance`).
    After every rotation, and at start-up, the reactor's thread pool (``deferToThreadPool``;
    the only use of threads outside the writer) gzips rotated files into ``NAME.YYYY-MM-DD.N.gz``
    when ``rotate.compress`` is true, and deletes rotated files whose day is more than
    ``rotate.retention_days`` days before today. Runs never overlap. Compression writes
    ``....gz.tmp`` and renames it, so an interrupted run leaves nothing half-written.

Line formats (:func:`format_text`, :func:`format_json`): times are ISO 8601 UTC with
milliseconds. Access events (namespace ``equalizer.access``) follow ``logging.access_log``,
not ``logging.level``: they are written at any level.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, date, datetime
from typing import Any, Protocol, TextIO

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
)
from twisted.python.components import Componentized
from twisted.python.reflect import safe_repr
from zope.interface import implementer

from equalizer.config.model import LoggingConfig, RotateConfig

log = Logger()

ACCESS_NAMESPACE = "equalizer.access"
BATCH_SECONDS = 0.02
"""How long the writer lets lines gather after the first one arrives."""
MAX_QUEUED_LINES = 10_000
"""Lines the writer may be behind before new ones are dropped (a few MB at most)."""
ROTATE_RETRY_SECONDS = 60.0
"""How long a failed rotation waits before the next attempt (meanwhile the file grows)."""
TWISTD_DEFAULT_LOGFILE = "twistd.log"

_LEGACY_KEYS = frozenset({"message", "time", "system", "format", "isError", "failure", "why"})
"""Keys twisted.python.log adds to events; never copied into JSON lines."""
_OWN_KEYS = ("time", "level", "namespace", "message")


class LogFileError(Exception):
    """The log file cannot be used; ``str()`` is one line naming the setting, for the operator."""


# -- formatting ---------------------------------------------------------------------------


def _iso_time(seconds: object) -> str:
    if not isinstance(seconds, int | float):
        return "-"
    try:
        stamp = datetime.fromtimestamp(seconds, UTC)
    except (OverflowError, OSError, ValueError):
        return "-"
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _level_name(event: Mapping[str, Any]) -> str:
    level = event.get("log_level")
    return getattr(level, "name", "-")


def _namespace(event: Mapping[str, Any]) -> str:
    namespace = event.get("log_namespace") or "-"
    if namespace == "log_legacy" and event.get("log_system"):
        return str(event["log_system"])
    return str(namespace)


def _traceback(event: Mapping[str, Any]) -> str | None:
    failure = event.get("log_failure")
    if failure is None:
        return None
    try:
        return failure.getTraceback().rstrip("\n")
    except BaseException as error:  # a broken failure must not break logging
        return f"(traceback unavailable: {safe_repr(error)})"


def format_text(event: Mapping[str, Any]) -> str:
    """``TIME [LEVEL] [NAMESPACE] MESSAGE`` and a newline.

    Continuation lines (tracebacks, newlines in values) start with a tab, so nothing in a
    message can pass for a line of its own.
    """
    text = formatEvent(event)
    traceback = _traceback(event)
    if traceback:
        text = f"{text}\n{traceback}"
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "\n\t")
    stamp = _iso_time(event.get("log_time"))
    return f"{stamp} [{_level_name(event)}] [{_namespace(event)}] {text}\n"


def _json_value(value: object) -> object:
    """``value`` if it encodes as strict JSON, else its repr: a field never breaks a line."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        if isinstance(value, bytes):
            return value.decode("utf-8", "backslashreplace")
        return safe_repr(value)
    return value


def format_json(event: Mapping[str, Any]) -> str:
    """One JSON object (ASCII, so any byte-safe) and a newline: time, level, namespace,
    message, then the named fields.

    Fields named ``log_*`` (Twisted's own) and those twisted.python.log adds are left
    out; a field named like one of ours is overridden by ours. A failure adds ``traceback``.
    """
    record: dict[str, object] = {
        "time": _iso_time(event.get("log_time")),
        "level": _level_name(event),
        "namespace": _namespace(event),
        "message": formatEvent(event),
    }
    for key, value in event.items():
        if not isinstance(key, str) or key.startswith("log_") or key in _LEGACY_KEYS:
            continue
        if key not in record:
            record[key] = _json_value(value)
    traceback = _traceback(event)
    if traceback is not None:
        record["traceback"] = traceback
    return json.dumps(record) + "\n"


FORMATS: dict[str, Callable[[Mapping[str, Any]], str]] = {"text": format_text, "json": format_json}


def _unformattable(event: Mapping[str, Any], error: BaseException) -> str:
    return (
        f"{_iso_time(event.get('log_time'))} [error] [equalizer.logs] unformattable log event"
        f" ({safe_repr(error)}): {safe_repr(event)}\n"
    )


@implementer(ILogObserver)
class LineObserver:
    """Formats each event into one line and hands it on; never raises."""

    def __init__(self, format_line: Callable[[Mapping[str, Any]], str],
                 write: Callable[[str], None]) -> None:
        self.format_line = format_line
        self._write = write

    def __call__(self, event: Mapping[str, Any]) -> None:
        try:
            line = self.format_line(event)
        except Exception as error:
            line = _unformattable(event, error)
        self._write(line)


def level_filter(config: LoggingConfig) -> LogLevelFilterPredicate:
    """Drop events below ``logging.level``; access events pass whenever ``access_log`` is on."""
    predicate = LogLevelFilterPredicate(LogLevel.levelWithName(config.level))
    if config.access_log:
        predicate.setLogLevelForNamespace(ACCESS_NAMESPACE, LogLevel.info)
    return predicate


def log_observer(config: LoggingConfig, write: Callable[[str], None],
                 predicate: LogLevelFilterPredicate | None = None) -> ILogObserver:
    """An observer that filters by level, formats per ``logging.format`` and calls ``write``."""
    if predicate is None:
        predicate = level_filter(config)
    return FilteringLogObserver(LineObserver(FORMATS[config.format], write), [predicate])


# -- sinks ----------------------------------------------------------------------------------


class Sink(Protocol):
    """Where the writer puts lines. Only one thread uses a sink at a time."""

    def write(self, line: str) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class StreamSink:
    """A text stream (standard output), captured when built: twistd later replaces sys.stdout."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, line: str) -> None:
        try:
            self._stream.write(line)
        except UnicodeEncodeError:
            encoding = getattr(self._stream, "encoding", None) or "utf-8"
            self._stream.write(line.encode(encoding, "backslashreplace").decode(encoding))

    def flush(self) -> None:
        self._stream.flush()

    def close(self) -> None:
        self.flush()


def _day(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d")


def _rotated_pattern(base: str) -> re.Pattern[str]:
    return re.compile(
        re.escape(base) + r"\.(?P<day>\d{4}-\d{2}-\d{2})\.(?P<n>\d+)(?P<suffix>\.gz|\.gz\.tmp)?"
    )


class RotatingFile:
    """A log file that rotates by UTC day and by size; see the module docstring for names.

    ``now`` gives the time (the reactor's ``seconds``); ``on_rotate()`` is called after
    each rotation and ``on_error(message)`` when a rotation fails, both from the writing
    thread. Opening happens in the constructor, so a bad path fails at start-up.
    """

    def __init__(self, path: str, max_bytes: int, now: Callable[[], float], *,
                 on_rotate: Callable[[], None] = lambda: None,
                 on_error: Callable[[str], None] = lambda message: None) -> None:
        self.path = os.path.abspath(path)  # twistd changes directory after opening
        self.directory, self.base = os.path.split(self.path)
        self._pattern = _rotated_pattern(self.base)
        self._max_bytes = max_bytes
        self._now = now
        self._on_rotate = on_rotate
        self._on_error = on_error
        self._retry_at = 0.0
        self._reopen_wanted = False
        self._day_number = -1
        self._today = ""
        self._file = open(self.path, "ab")
        status = os.fstat(self._file.fileno())
        self._size = status.st_size
        self._day = _day(status.st_mtime) if self._size else _day(now())

    def write(self, line: str) -> None:
        if self._file is None or self._reopen_wanted:
            self._reopen()
        data = line.encode("utf-8", "backslashreplace")
        now = self._now()
        day_number = int(now // 86400)
        if day_number != self._day_number:
            self._day_number = day_number
            self._today = _day(now)
        today = self._today
        if self._size == 0:
            self._day = today
        elif ((today != self._day or self._size + len(data) > self._max_bytes)
              and now >= self._retry_at):
            self._rotate(now, today)
        self._file.write(data)
        self._size += len(data)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def request_reopen(self) -> None:
        """Open the path again before the next line (SIGUSR1, from any thread): once
        logrotate has moved the file away, lines go to a new file of the same name."""
        self._reopen_wanted = True

    def _reopen(self) -> None:
        """Open the path again: after close(), or on request. A file that cannot be opened
        leaves the old one in use (reported through ``on_error``)."""
        self._reopen_wanted = False
        try:
            new = open(self.path, "ab")
        except OSError as error:
            if self._file is None:
                raise
            self._on_error(f"cannot reopen {self.path!r}: {error.strerror or error}")
            return
        status = os.fstat(new.fileno())
        if self._file is not None:
            before = os.fstat(self._file.fileno())
            same = (before.st_dev, before.st_ino) == (status.st_dev, status.st_ino)
            self._file.close()
            if not same and status.st_size:
                self._day = _day(status.st_mtime)  # another file: its lines' day
        self._file = new
        self._size = status.st_size

    def rotated_name(self, day: str) -> str:
        """The next free ``NAME.DAY.N`` for ``day`` (compressed or not, N is never reused)."""
        highest = 0
        for name in os.listdir(self.directory):
            match = self._pattern.fullmatch(name)
            if match and match["day"] == day:
                highest = max(highest, int(match["n"]))
        return os.path.join(self.directory, f"{self.base}.{day}.{highest + 1}")

    def _rotate(self, now: float, today: str) -> None:
        old = self._file
        try:
            old.flush()
            target = self.rotated_name(self._day)
            os.rename(self.path, target)
        except OSError as error:
            self._failed(now, error)
            return
        try:
            new = open(self.path, "ab")
        except OSError as error:
            try:
                os.rename(target, self.path)  # keep one live file under the configured name
            except OSError:
                pass
            self._failed(now, error)
            return
        old.close()
        self._file, self._size, self._day = new, 0, today
        self._on_rotate()

    def _failed(self, now: float, error: OSError) -> None:
        self._retry_at = now + ROTATE_RETRY_SECONDS
        self._on_error(f"cannot rotate {self.path!r}: {error.strerror or error}")


# -- the writer thread ----------------------------------------------------------------------


def _default_drop_notice(count: int) -> str:
    return f"[warn] [equalizer.logs] log output too slow: dropped {count} lines\n"


class QueuedWriter:
    """Hands lines to a sink from a dedicated thread, so a slow disk never blocks the caller.

    ``write`` may be called from any thread. While the thread runs, it appends to a queue of
    at most ``max_queued`` lines and returns at once; a line that does not fit is dropped
    and counted, and the thread writes ``drop_notice(count)`` after the next lines it
    manages to write. Lines that fail to write (disk full) count as dropped too. Before
    :meth:`start` and after :meth:`stop` it writes synchronously. ``call_from_thread``
    (the reactor's ``callFromThread``) delivers the end of :meth:`stop` to the reactor.
    """

    def __init__(self, sink: Sink, call_from_thread: Callable[..., object], *,
                 max_queued: int = MAX_QUEUED_LINES,
                 drop_notice: Callable[[int], str] = _default_drop_notice) -> None:
        self.sink = sink
        self._call_from_thread = call_from_thread
        self._max_queued = max_queued
        self._drop_notice = drop_notice
        self._lock = threading.Condition(threading.RLock())
        self._pending: deque[str] = deque()
        self._dropped = 0
        self._state = "sync"  # sync | threaded | stopping
        self._stop_waiters: list[Deferred[None]] = []

    @property
    def dropped(self) -> int:
        """Lines dropped and not yet reported in the output."""
        with self._lock:
            return self._dropped

    def write(self, line: str) -> None:
        with self._lock:
            if self._state == "sync":
                dropped, self._dropped = self._dropped, 0
                self._write_batch([line], dropped)
            elif len(self._pending) >= self._max_queued:
                self._dropped += 1
            else:
                if not self._pending:
                    self._lock.notify()
                self._pending.append(line)

    def start(self) -> None:
        with self._lock:
            if self._state != "sync":
                return
            self._state = "threaded"
        threading.Thread(target=self._run, name="equalizer-log-writer", daemon=True).start()

    def stop(self) -> Deferred[None]:
        """Write what is queued, end the thread; fires (in the reactor thread) when done."""
        with self._lock:
            if self._state == "sync":
                return succeed(None)
            self._state = "stopping"
            self._lock.notify()
            waiter: Deferred[None] = Deferred()
            self._stop_waiters.append(waiter)
            return waiter

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._pending and self._state == "threaded":
                    self._lock.wait()
                lingering = self._state == "threaded"
            if lingering:
                # Let a batch gather: one wake-up and one write for many lines, so the
                # writer takes the GIL from the proxy tens of times a second, not per line.
                time.sleep(BATCH_SECONDS)
            with self._lock:
                if not self._pending and self._state == "stopping":
                    self._state = "sync"  # from now on write() writes itself, in order
                    waiters, self._stop_waiters = self._stop_waiters, []
                    break
                batch = list(self._pending)
                self._pending.clear()
                dropped, self._dropped = self._dropped, 0
            self._write_batch(batch, dropped)
        for waiter in waiters:
            self._call_from_thread(waiter.callback, None)

    def _write_batch(self, lines: Iterable[str], dropped: int) -> None:
        failed = 0
        for line in lines:
            try:
                self.sink.write(line)
            except Exception:
                failed += 1
        if dropped:
            try:
                self.sink.write(self._drop_notice(dropped))
            except Exception:
                failed += dropped  # keep the count for the next notice
        try:
            self.sink.flush()
        except Exception:
            pass
        if failed:
            with self._lock:
                self._dropped += failed


# -- compression and retention --------------------------------------------------------------


@attrs.frozen
class MaintenanceResult:
    compressed: tuple[str, ...] = ()
    deleted: tuple[str, ...] = ()


GZIP_LEVEL = 6
"""gzip's and logrotate's default: about half the CPU of level 9 on access logs, a few
percent bigger files. The compressing thread shares the process's core with the
reactor (and its GIL), so it is worth keeping short."""


def gzip_file(path: str) -> str:
    """Compress ``path`` to ``path.gz`` (via a temporary name), keep its mtime, remove it."""
    target = path + ".gz"
    temporary = target + ".tmp"
    status = os.stat(path)
    with open(path, "rb") as source, open(temporary, "wb") as raw, gzip.GzipFile(
        filename=os.path.basename(path), mode="wb", fileobj=raw, mtime=int(status.st_mtime),
        compresslevel=GZIP_LEVEL,
    ) as compressed:
        shutil.copyfileobj(source, compressed, 1024 * 1024)
    os.utime(temporary, (status.st_atime, status.st_mtime))
    os.replace(temporary, target)
    os.remove(path)
    return target


def maintain(path: str, today: date, retention_days: int, compress: bool) -> MaintenanceResult:
    """Delete rotated files of ``path`` older than the retention, then gzip the rest.

    Blocking file work: run it in a thread. A rotated file of day D is deleted when
    ``today - D > retention_days``. Leftover ``.gz.tmp`` files of an interrupted run are
    removed (their source is still there). The live file is never touched.
    """
    directory, base = os.path.split(os.path.abspath(path))
    pattern = _rotated_pattern(base)
    compressed: list[str] = []
    deleted: list[str] = []
    for name in sorted(os.listdir(directory)):
        match = pattern.fullmatch(name)
        if match is None:
            continue
        full = os.path.join(directory, name)
        try:
            day = date.fromisoformat(match["day"])
        except ValueError:
            continue
        try:
            if match["suffix"] == ".gz.tmp":
                os.remove(full)
            elif (today - day).days > retention_days:
                os.remove(full)
                deleted.append(full)
            elif compress and match["suffix"] is None:
                gzip_file(full)
                compressed.append(full)
        except FileNotFoundError:
            continue
    return MaintenanceResult(tuple(compressed), tuple(deleted))


class LogMaintenance:
    """Runs :func:`maintain` in the reactor's thread pool, one run at a time.

    A request while a run is going on schedules exactly one more run after it.
    Call :meth:`request` from the reactor thread.
    """

    def __init__(self, path: str, rotate: RotateConfig, reactor: Any) -> None:
        self._path = path
        self._rotate = rotate
        self._reactor = reactor
        self._busy = False
        self._again = False
        self._idle_waiters: list[Deferred[None]] = []

    def request(self) -> None:
        if self._busy:
            self._again = True
            return
        self._busy = True
        today = datetime.fromtimestamp(self._reactor.seconds(), UTC).date()
        d = deferToThreadPool(
            self._reactor, self._reactor.getThreadPool(), maintain,
            self._path, today, self._rotate.retention_days, self._rotate.compress,
        )
        d.addCallbacks(self._report, self._failed)
        d.addBoth(self._done)

    def idle(self) -> Deferred[None]:
        """Fires when no run is going on or scheduled."""
        if not self._busy:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._idle_waiters.append(waiter)
        return waiter

    def _report(self, result: MaintenanceResult) -> None:
        if result.compressed or result.deleted:
            log.debug("log maintenance: compressed {compressed}, deleted {deleted}",
                      compressed=list(result.compressed), deleted=list(result.deleted))

    def _failed(self, failure: Any) -> None:
        log.failure("log maintenance (compression/retention) failed", failure)

    def _done(self, _: object) -> None:
        self._busy = False
        if self._again:
            self._again = False
            self.request()
            return
        waiters, self._idle_waiters = self._idle_waiters, []
        for waiter in waiters:
            waiter.callback(None)


# -- the service ----------------------------------------------------------------------------


def resolve_logging(config: LoggingConfig,
                    twistd_options: Mapping[str, Any] | None) -> tuple[LoggingConfig, str] | None:
    """The logging settings after twistd's flags, and the setting that named the file.

    ``twistd_options`` is twistd's ``ServerOptions`` (``options.parent`` in makeService),
    None when there is no twistd. None as the answer means: leave logging to twistd
    (``--syslog``, ``--logger``). Raises LogFileError for ``--logfile -`` in a daemon.
    """
    if twistd_options is None:
        return config, "logging.file"
    if twistd_options.get("logger") or twistd_options.get("syslog"):
        return None
    daemon = not (twistd_options.get("nodaemon", True) or twistd_options.get("debug"))
    logfile = twistd_options.get("logfile")
    if logfile == "-":
        if daemon:
            raise LogFileError("--logfile: a daemon cannot log to standard output")
        return attrs.evolve(config, file=None), "--logfile"
    if logfile:
        return attrs.evolve(config, file=logfile), "--logfile"
    if config.file is None and daemon:
        return attrs.evolve(config, file=TWISTD_DEFAULT_LOGFILE), "logging.file"
    return config, "logging.file"


class LoggingService(Service):
    """Owns the log output: the observer twistd installs, the writer thread, maintenance.

    Building it opens the file, so a bad ``logging.file`` fails before twistd starts
    (:class:`LogFileError`). ``reactor`` provides ``seconds``, ``callFromThread`` and
    ``getThreadPool``. ``stdout`` is where lines go without a file (default: the
    ``sys.stdout`` of construction time). ``configured`` is the YAML's own section when
    twistd's flags changed ``config`` (see :func:`resolve_logging`); :meth:`reconfigure`
    compares new files with it.
    """

    name = "logging"

    def __init__(self, config: LoggingConfig, reactor: Any, *, stdout: TextIO | None = None,
                 source: str = "logging.file", max_queued: int = MAX_QUEUED_LINES,
                 configured: LoggingConfig | None = None) -> None:
        self.config = config
        self._configured = configured if configured is not None else config
        self._reactor = reactor
        self.maintenance: LogMaintenance | None = None
        if config.file is None:
            sink: Sink = StreamSink(stdout if stdout is not None else sys.stdout)
        else:
            sink = self._open_file(config, source)
        self.writer = QueuedWriter(sink, reactor.callFromThread, max_queued=max_queued,
                                   drop_notice=self._drop_notice)
        self._predicate = level_filter(config)
        self._lines = LineObserver(FORMATS[config.format], self.writer.write)
        self.observer: ILogObserver = FilteringLogObserver(self._lines, [self._predicate])

    def _open_file(self, config: LoggingConfig, source: str) -> RotatingFile:
        path = os.path.abspath(config.file)
        try:
            sink = RotatingFile(path, config.rotate.max_bytes, self._reactor.seconds,
                                on_rotate=self._rotated, on_error=self._rotate_failed)
        except OSError as error:
            raise LogFileError(
                f"{source}: cannot open {config.file!r}: {error.strerror or error}"
            ) from None
        if not os.access(sink.directory, os.W_OK | os.X_OK):
            sink.close()
            raise LogFileError(
                f"{source}: directory {sink.directory!r} is not writable (needed to rotate)"
            )
        self.maintenance = LogMaintenance(path, config.rotate, self._reactor)
        return sink

    def install(self, application: object) -> None:
        """Make twistd log through :attr:`observer`: set it as the Application's ILogObserver."""
        if isinstance(application, Componentized):
            application.setComponent(ILogObserver, self.observer)

    def reconfigure(self, config: LoggingConfig) -> bool:
        """Apply level, format and access_log at once (SIGHUP); True if a restart is
        needed for the rest (file, rotate)."""
        self._predicate.defaultLogLevel = LogLevel.levelWithName(config.level)
        self._predicate.clearLogLevels()
        if config.access_log:
            self._predicate.setLogLevelForNamespace(ACCESS_NAMESPACE, LogLevel.info)
        self._lines.format_line = FORMATS[config.format]
        old = self._configured
        self._configured = config
        self.config = attrs.evolve(config, file=self.config.file, rotate=self.config.rotate)
        return (config.file, config.rotate) != (old.file, old.rotate)

    def startService(self) -> None:
        super().startService()
        self.writer.start()
        if self.maintenance is not None:
            self.maintenance.request()

    def stopService(self) -> Deferred[None]:
        """Fires once queued lines are written and no compression is running."""
        super().stopService()
        d = self.writer.stop()
        if self.maintenance is not None:
            maintenance = self.maintenance
            d.addCallback(lambda _: maintenance.idle())
        return d

    def close(self) -> None:
        """Close the file (a later line reopens it); for use after stopService."""
        self.writer.sink.close()

    def reopen(self) -> None:
        """SIGUSR1: the file is opened again under its name before the next line, which
        says so; without a file (standard output) there is nothing to reopen."""
        sink = self.writer.sink
        if isinstance(sink, RotatingFile):
            sink.request_reopen()
            log.info("SIGUSR1: reopening log file {path}", path=sink.path)
        else:
            log.info("SIGUSR1: logging to standard output; nothing to reopen")

    def _rotated(self) -> None:
        if self.maintenance is not None:
            self._reactor.callFromThread(self.maintenance.request)

    def _rotate_failed(self, message: str) -> None:
        self._reactor.callFromThread(log.error, "log rotation failed: {error}", error=message)

    def _drop_notice(self, count: int) -> str:
        event = {
            "log_level": LogLevel.warn,
            "log_namespace": "equalizer.logs",
            "log_format": "log output too slow: dropped {dropped} lines",
            "log_time": self._reactor.seconds(),
            "dropped": count,
        }
        return self._lines.format_line(event)


ACCESS_FORMAT = (
    '{client} "{method} {path}" {status} {bytes} {duration_ms}ms'
    ' upstream_addr="{upstream_addr}" backend={backend} request_id={request_id}'
    " rate_limit={rate_limit}"
)
_ACCESS_TEXT = (
    '%s [info] [equalizer.access] %s "%s %s" %d %d %sms'
    ' upstream_addr="%s" backend=%s request_id=%s rate_limit=%s\n'
)


class AccessLog:
    """One line per proxied request: the fields of SPEC 7, in the log's own layout.

    Through twisted.logger an access line costs ~40 µs (event dict, publisher,
    level filter, ``string.Formatter``, ISO time), more than proxying the request.
    So when our LoggingService writes the log, the line is formatted here with
    ``%`` and a timestamp cached per second, in exactly the layout ``format_text``
    and ``format_json`` give, and queued to the same writer. Without it (twistd's
    own logging, tests) each line is a plain twisted.logger event.
    """

    def __init__(self) -> None:
        self._logger = Logger(namespace=ACCESS_NAMESPACE)
        self._service: LoggingService | None = None
        self._second = -1
        self._stamp = ""

    def attach(self, service: LoggingService | None) -> None:
        self._service = service

    def log(self, client: str, method: str, path: str, status: int, size: int,
            duration_ms: float, backend: str, request_id: str, rate_limit: str,
            upstream_addr: str = "-") -> None:
        """``upstream_addr``: the ``host:port`` of every backend tried, as nginx's
        ``$upstream_addr`` (``a:1, b:2``; ``-`` for none); ``backend``: their ids."""
        service = self._service
        if service is None:
            self._logger.info(ACCESS_FORMAT, client=client, method=method, path=path,
                              status=status, bytes=size, duration_ms=duration_ms,
                              upstream_addr=upstream_addr, backend=backend,
                              request_id=request_id, rate_limit=rate_limit)
            return
        now = time.time()
        if service.config.format == "json":
            line = json.dumps({
                "time": self._timestamp(now), "level": "info", "namespace": ACCESS_NAMESPACE,
                "message": ACCESS_FORMAT.format(
                    client=client, method=method, path=path, status=status, bytes=size,
                    duration_ms=duration_ms, upstream_addr=upstream_addr, backend=backend,
                    request_id=request_id, rate_limit=rate_limit),
                "client": client, "method": method, "path": path, "status": status,
                "bytes": size, "duration_ms": duration_ms, "upstream_addr": upstream_addr,
                "backend": backend, "request_id": request_id, "rate_limit": rate_limit,
            }) + "\n"
        else:
            line = _ACCESS_TEXT % (self._timestamp(now), client, method, path, status, size,
                                   duration_ms, upstream_addr, backend, request_id, rate_limit)
        service.writer.write(line)

    def _timestamp(self, now: float) -> str:
        """``_iso_time`` with the date part computed once a second."""
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        return f"{self._stamp}.{int((now - second) * 1000):03d}Z"


def open_logging(config: LoggingConfig, reactor: Any,
                 twistd_options: Mapping[str, Any] | None = None) -> LoggingService | None:
    """The LoggingService for ``config`` and twistd's flags, or None to leave it to twistd.

    Call from makeService; raises LogFileError (print it, exit 1) if the file is unusable.
    """
    resolved = resolve_logging(config, twistd_options)
    if resolved is None:
        return None
    effective, source = resolved
    return LoggingService(effective, reactor, source=source, configured=config)
