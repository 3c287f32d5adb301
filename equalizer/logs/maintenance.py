"""Compression and retention of rotated log files, off the reactor thread.

Compression and retention (:func:`maintain`, :class:`LogMaintenance`).
    After every rotation, and at start-up, the reactor's thread pool (``deferToThreadPool``;
    the only use of threads outside the writer) gzips rotated files into ``NAME.YYYY-MM-DD.N.gz``
    when ``rotate.compress`` is true, and deletes rotated files whose day is more than
    ``rotate.retention_days`` days before today. Runs never overlap. Compression writes
    ``....gz.tmp`` and renames it, so an interrupted run leaves nothing half-written.
"""

from __future__ import annotations

import gzip
import os
import shutil
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from equalizer.logs.files import rotated_pattern

if TYPE_CHECKING:
    from equalizer.config.model import RotateConfig

log = Logger(namespace="equalizer.logs.service")  # the namespace these lines always had

@attrs.frozen
class MaintenanceResult:
    compressed: tuple[str, ...] = ()
    deleted: tuple[str, ...] = ()


GZIP_LEVEL = 1
"""The fastest level. The compressing thread shares the process's core with the reactor
(and its GIL): under load a 10 MiB access log rotates every few seconds, and at gzip's
and logrotate's default (6) its compression took 5% of the proxy's profile. Measured on
13 MB of access lines: 62 ms at level 1, 114 ms at level 6, for files 18% of the
original instead of 16%."""


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
    pattern = rotated_pattern(base)
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
