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

The line formats are in :mod:`equalizer.logs.formats`, the file, its rotation and the
writer thread in :mod:`equalizer.logs.files`, compression and retention in
:mod:`equalizer.logs.maintenance`, the access log in :mod:`equalizer.logs.access`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any, TextIO

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import FilteringLogObserver, ILogObserver, Logger, LogLevel
from twisted.python.components import Componentized

from equalizer.config.model import LoggingConfig
from equalizer.logs.access import AccessLog  # noqa: F401 -- re-exported: callers import it here
from equalizer.logs.batch import LineBatcher
from equalizer.logs.files import MAX_QUEUED_LINES, QueuedWriter, RotatingFile, Sink, StreamSink
from equalizer.logs.formats import ACCESS_NAMESPACE, FORMATS, LineObserver, level_filter
from equalizer.logs.maintenance import LogMaintenance

log = Logger()

TWISTD_DEFAULT_LOGFILE = "twistd.log"


class LogFileError(Exception):
    """The log file cannot be used; ``str()`` is one line naming the setting, for the operator."""



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
        self.access_lines = LineBatcher(reactor, self.writer.write)
        """The access log's lines, in batches: a line each to the writer costs the proxy."""
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
        self.access_lines.close()
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
