"""Where formatted lines go: a rotating file or a stream, behind a writer thread.

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
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Protocol, TextIO

from twisted.internet.defer import Deferred, succeed

BATCH_SECONDS = 0.02
"""How long the writer lets lines gather after the first one arrives."""
MAX_QUEUED_LINES = 10_000
"""Writes (a line, or a batch of lines) the writer may be behind before new ones are
dropped."""
MAX_QUEUED_CHARS = 4 * 1024 * 1024
"""... and characters: a batch of access lines (or a worker's) is some 32 KiB."""
ROTATE_RETRY_SECONDS = 60.0
"""How long a failed rotation waits before the next attempt (meanwhile the file grows)."""


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


def rotated_pattern(base: str) -> re.Pattern[str]:
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
        self._pattern = rotated_pattern(self.base)
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


def _default_drop_notice(count: int) -> str:
    return f"[warn] [equalizer.logs] log output too slow: dropped {count} lines\n"


def _line_count(text: str) -> int:
    """Lines in what one write carries (a line, or a batch of them)."""
    return text.count("\n") or 1


class QueuedWriter:
    """Hands lines to a sink from a dedicated thread, so a slow disk never blocks the caller.

    ``write`` may be called from any thread, with a line or several. While the thread runs,
    it appends to a queue of at most ``max_queued`` writes and ``max_chars`` characters and
    returns at once; lines that do not fit are dropped and counted, and the thread writes
    ``drop_notice(count)`` after the next lines it manages to write. Lines that fail to
    write (disk full) count as dropped too. Before
    :meth:`start` and after :meth:`stop` it writes synchronously. ``call_from_thread``
    (the reactor's ``callFromThread``) delivers the end of :meth:`stop` to the reactor.
    """

    def __init__(self, sink: Sink, call_from_thread: Callable[..., object], *,
                 max_queued: int = MAX_QUEUED_LINES, max_chars: int = MAX_QUEUED_CHARS,
                 drop_notice: Callable[[int], str] = _default_drop_notice) -> None:
        self.sink = sink
        self._call_from_thread = call_from_thread
        self._max_queued = max_queued
        self._max_chars = max_chars
        self._queued_chars = 0
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
            elif (len(self._pending) >= self._max_queued
                  or self._queued_chars + len(line) > self._max_chars):
                self._dropped += _line_count(line)
            else:
                if not self._pending:
                    self._lock.notify()
                self._pending.append(line)
                self._queued_chars += len(line)

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
                self._queued_chars = 0
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
                failed += _line_count(line)
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
