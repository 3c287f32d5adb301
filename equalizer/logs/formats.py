"""Log line formats: one event in, one line out, text or JSON (SPEC section 7).

Times are ISO 8601 UTC with milliseconds. Access events (namespace ``equalizer.access``)
follow ``logging.access_log``, not ``logging.level``: they are written at any level.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from twisted.logger import (
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
)
from twisted.python.reflect import safe_repr
from zope.interface import implementer

if TYPE_CHECKING:
    from equalizer.config.model import LoggingConfig

ACCESS_NAMESPACE = "equalizer.access"

_LEGACY_KEYS = frozenset({"message", "time", "system", "format", "isError", "failure", "why"})
"""Keys twisted.python.log adds to events; never copied into JSON lines."""
_OWN_KEYS = ("time", "level", "namespace", "message")


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
