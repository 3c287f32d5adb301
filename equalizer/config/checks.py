"""Value checks for the configuration: each converts one YAML value or says what is wrong.

A *check* is a callable that returns the converted value or raises ``ValueError``
(a problem at that key) or ``Invalid`` (problems below that key). ``record`` and
``list_of`` compose checks into a schema, so validation collects every problem
instead of stopping at the first and an operator fixes a broken file in one go.
The admin API uses the same checks, so both ports refuse the same values.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import sys
from collections.abc import Callable, Collection, Mapping
from fractions import Fraction
from typing import Any
from urllib.parse import urlsplit

import attrs
import psycopg2
from psycopg2.extensions import parse_dsn
from twisted.internet.endpoints import serverFromString
from twisted.internet.testing import MemoryReactor

from equalizer.config.model import MAX_WEIGHT, RETRY_ON_NAMES, Network
from equalizer.config.rules import describe

KeyPath = tuple[str | int, ...]
Problem = tuple[KeyPath, str]
Check = Callable[[Any], Any]  # returns the converted value, raises ValueError or Invalid


class Invalid(Exception):
    """Problems found inside a nested value, with paths relative to that value."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__(problems)
        self.problems = problems


def collect(problems: list[Problem], key: str | int, check: Check, value: object) -> Any:
    """Run ``check`` on the value at ``key``, recording its problems instead of raising."""
    try:
        return check(value)
    except ValueError as e:
        problems.append(((key,), str(e)))
    except Invalid as e:
        problems.extend(((key, *path), message) for path, message in e.problems)
    return None


def format_path(path: KeyPath) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text or "config"


# -- leaf checks ------------------------------------------------------------------------


def boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {describe(value)}")
    return value


def string(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {describe(value)}")
    if not value.strip():
        raise ValueError("must not be empty")
    return value


def integer(minimum: int, maximum: int | None = None) -> Check:
    """An integer check with bounds; bool is refused although Python counts it as an int."""

    def check(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {describe(value)}")
        if maximum is not None and not minimum <= value <= maximum:
            raise ValueError(f"must be between {minimum} and {maximum}, got {value}")
        if value < minimum:
            raise ValueError(f"must be at least {minimum}, got {value}")
        return value

    return check


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def at_least_zero(number: float) -> float:
    """Refuse negatives, NaN and what a float cannot hold (YAML allows ``.inf`` and huge ints)."""
    if not 0 <= number <= sys.float_info.max:
        raise ValueError(f"must be a number from 0 up, got {number}")
    return float(number)


def choice(*options: str) -> Check:
    def check(value: object) -> str:
        if string(value) not in options:
            raise ValueError(f"must be one of {', '.join(options)}; got {value!r}")
        return value

    return check


def retry_reason(value: object) -> str:
    """One ``proxy.retry_on`` entry: a failure name or one of the statuses 502, 503, 504
    (written as a number or a string)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or value not in RETRY_ON_NAMES:
        raise ValueError(f"must be one of {', '.join(RETRY_ON_NAMES)}; got {value!r}")
    return value


MAX_WORKERS = 256
"""Most worker processes (``proxy.workers``)."""


def workers(value: object) -> int:
    """``proxy.workers``: a number of processes, or ``auto`` (one per CPU)."""
    if value == "auto":
        return max(1, os.cpu_count() or 1)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
        raise ValueError(f"expected a number from 1 to {MAX_WORKERS} or 'auto', "
                         f"got {describe(value)}")
    return value


def optional(check: Check) -> Check:
    """Let null through as None (for keys whose null means "none", like logging.file)."""
    return lambda value: None if value is None else check(value)


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: object) -> float:
    """Read a duration as float seconds: a number of seconds, or ``250ms``/``5s``/``2m``/``1h``.

    Raises:
        ValueError: with a message suitable for an operator.
    """
    if isinstance(value, str):
        match = _DURATION.fullmatch(value.strip())
        if match is None:
            raise ValueError(
                f"not a duration: {value!r} (use seconds, or a number with ms, s, m or h: "
                "250ms, 5s, 2m)"
            )
        return at_least_zero(float(match[1]) * _DURATION_UNITS[match[2]])
    if not is_number(value):
        raise ValueError(f"expected a duration such as 5s, got {describe(value)}")
    return at_least_zero(value)


def positive_duration(value: object) -> float:
    """A duration where 0 would make every attempt fail at once (connect, response timeouts)."""
    seconds = parse_duration(value)
    if seconds == 0:
        raise ValueError("must be more than 0 seconds")
    return seconds


_SIZE = re.compile(r"(\d+(?:\.\d*)?)\s*(b|kb|mb|gb|kib|mib|gib)?", re.IGNORECASE)
_SIZE_UNITS = {
    None: 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9,
    "kib": 2**10, "mib": 2**20, "gib": 2**30,
}  # fmt: skip


def size(minimum: int) -> Check:
    """A byte count: a plain integer or ``512KiB``/``10MiB``/``1GB`` (KB = 1000, KiB = 1024)."""

    def check(value: object) -> int:
        if isinstance(value, str):
            match = _SIZE.fullmatch(value.strip())
            if match is None:
                raise ValueError(
                    f"not a size: {value!r} (use bytes, or a number with KiB, MiB, GiB, KB, "
                    "MB or GB: 512KiB, 10MiB)"
                )
            value = int(Fraction(match[1]) * _SIZE_UNITS[match[2] and match[2].lower()])
        return integer(minimum)(value)

    return check


_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def client_key(*kinds: str) -> Check:
    """``ip`` or ``KIND:NAME`` where NAME is an HTTP token (a header or cookie name)."""
    expected = " or ".join(["ip", *(f"{kind}:NAME" for kind in kinds)])

    def check(value: object) -> str:
        kind, _, name = string(value).partition(":")
        if value != "ip" and (kind not in kinds or not _TOKEN.fullmatch(name)):
            raise ValueError(f"expected {expected}; got {value!r}")
        return value

    return check


def status_range(value: object) -> tuple[int, int]:
    """``200``, ``"200"`` or ``"200-399"``: the statuses a health check accepts."""
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    match = re.fullmatch(r"(\d{3})(?:\s*-\s*(\d{3}))?", text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"expected a status or range like '200-399'; got {describe(value)}")
    low, high = int(match[1]), int(match[2] or match[1])
    if not 100 <= low <= high <= 599:
        raise ValueError(f"expected a range of statuses within 100-599; got {value!r}")
    return low, high


def network(value: object) -> Network:
    text = string(value)
    try:
        return ipaddress.ip_network(text)
    except ValueError as e:
        raise ValueError(f"not an IP network in CIDR notation: {e}") from None


def health_path(value: object) -> str:
    if not string(value).startswith("/"):
        raise ValueError(f"must start with '/'; got {value!r}")
    return value


_PORT_ENDPOINTS = frozenset({"tcp", "tcp6", "ssl"})
_UNESCAPED_COLON = re.compile(r"(?<!\\):")


def endpoint_fields(text: str) -> list[str]:
    """An endpoint string's type and fields, split at its unescaped colons, as written."""
    return _UNESCAPED_COLON.split(text)


def _port_of(text: str) -> tuple[str, str]:
    """The endpoint type and its port field (positional or ``port=``), as written."""
    kind, *fields = endpoint_fields(text)
    named = dict(field.split("=", 1) for field in fields if "=" in field)
    positional = [field for field in fields if "=" not in field]
    return kind, named.get("port", positional[0] if positional else "")


def endpoint(value: object) -> str:
    """Check a Twisted server endpoint string the way the proxy will read it, unbound.

    ``serverFromString`` builds an endpoint without listening; given a reactor that
    does nothing, it parses the string with the built-in and plugin endpoint types
    (an ``ssl:`` endpoint loads its key and certificate here, so a missing file is
    reported at start-up, not on first use). Ports are checked first to give a
    clearer message.
    """
    text = string(value)
    kind, port = _port_of(text)
    if kind in _PORT_ENDPOINTS and not (re.fullmatch("[0-9]{1,5}", port) and int(port) <= 65535):
        raise ValueError(f"invalid endpoint {text!r}: port must be 0-65535; got {port!r}")
    try:
        serverFromString(MemoryReactor(), text)
    except Exception as e:  # whatever the parser refuses is a mistake in the string
        raise ValueError(f"invalid endpoint {text!r}: {_reason(e)}{_endpoint_hint(text)}") \
            from None
    return text


_HOST_PORT = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:\[\]]*)):(?P<port>[0-9]{1,5})")


def _endpoint_hint(text: str) -> str:
    """A suggestion for a port or ``address:port`` written where an endpoint string goes
    (nginx's ``listen 8080`` habit): ``8080`` -> ``tcp:8080``, ``127.0.0.1:8080`` ->
    ``tcp:8080:interface=127.0.0.1``; empty when it looks like neither."""
    if re.fullmatch("[0-9]{1,5}", text):
        return f" (did you mean 'tcp:{text}'?)"
    match = _HOST_PORT.fullmatch(text)
    if match is None:
        return ""
    host, port = match["v6"] or match["host"], match["port"]
    if host == "localhost":
        host = "127.0.0.1"
    if not host or host == "*":
        return f" (did you mean 'tcp:{port}'?)"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return ""
    interface = str(address).replace(":", "\\:")
    kind = "tcp6" if address.version == 6 else "tcp"
    return f" (did you mean '{kind}:{port}:interface={interface}'?)"


def _reason(error: Exception) -> str:
    """Turn an endpoint parser's exception into a readable clause."""
    if isinstance(error, OSError) and error.filename:
        return f"cannot read {error.filename!r}: {error.strerror}"
    if isinstance(error, TypeError):  # e.g. "_parseTCP() got an unexpected keyword argument"
        return re.sub(r"^\w+\(\) ", "", str(error)) + r" (escape ':' in values as '\:')"
    return str(error)


# Where a DSN keeps its password: a URI's user info or query, or a key=value pair.
_URI = re.compile(r"\s*postgres(?:ql)?://")
_URI_PASSWORDS = (re.compile(r"^(\s*postgres(?:ql)?://[^:@/?#]*:)([^@/?#]*)(?=@)"),
                  re.compile(r"([?&]password=)([^&]*)"))
_KEYWORD_PASSWORD = (re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'?|[^\s']*)"),)


def _without_password(dsn: str) -> str:
    """The DSN with every password in it replaced by ``***``, to be quoted in messages."""
    for pattern in _URI_PASSWORDS if _URI.match(dsn) else _KEYWORD_PASSWORD:
        dsn = pattern.sub(r"\1***", dsn)
    return dsn


def validate_database_url(value: object) -> str:
    """A libpq DSN (``key=value ...``) or ``postgresql://`` URI, checked by libpq's own
    parser without connecting; messages never show the password."""
    text = string(value)
    try:
        options = parse_dsn(text)
    except psycopg2.ProgrammingError:
        try:
            parse_dsn(_without_password(text))
        except psycopg2.ProgrammingError as e:
            reason = str(e).strip().removeprefix("invalid dsn: ")
            raise ValueError(f"not a valid PostgreSQL DSN or URL: {reason}") from None
        raise ValueError("not a valid PostgreSQL DSN or URL: the password cannot be "
                         "read (not shown)") from None
    for port in options.get("port", "").split(","):
        if port and not (port.isdigit() and 1 <= int(port) <= 65535):
            raise ValueError(f"not a valid PostgreSQL DSN or URL: invalid port {port!r}")
    return text


_DEFAULT_PORTS = {"http": 80, "https": 443}
_SCHEMELESS = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]*\.[A-Za-z0-9.-]*|localhost"
                         r"|[A-Za-z0-9.-]+(?=:[0-9]))(?::[0-9]{1,5})?(?:/\S*)?")


def _scheme_hint(text: str) -> str:
    """`` (did you mean 'http://HOST:PORT'?)`` for ``HOST:PORT`` written without its scheme
    (a dotted name, an address, ``localhost`` or a ``name:port``); else empty."""
    if "://" in text or not _SCHEMELESS.fullmatch(text):
        return ""
    try:
        validate_backend_url(f"http://{text}")
    except ValueError:
        return ""
    return f" (did you mean 'http://{text}'?)"


def validate_backend_url(value: object) -> str:
    """Accept an absolute http(s) URL with a host and a valid port; return it unchanged.

    Request paths are joined under the URL's own path, so a query or fragment
    has no meaning there and is refused.

    Raises:
        ValueError: with a message suitable for an operator or an API client.
    """
    text = string(value)
    not_http = ValueError(f"not an http(s) URL: {text!r}{_scheme_hint(text)}")
    try:
        parts = urlsplit(text)
    except ValueError:  # an unclosed IPv6 bracket, for one
        raise not_http from None
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname or re.search(r"\s", text):
        raise not_http
    if not (text.isascii() and text.isprintable()):
        raise ValueError(f"a backend URL must be printable ASCII (punycode for international "
                         f"host names, percent-encoding in paths): {text!r}")
    try:
        port = parts.port  # the property parses the port and raises when it is out of range
    except ValueError:
        port = 0
    if port == 0:
        raise ValueError(f"invalid port in URL: {text!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"a backend URL cannot have a query or fragment: {text!r}")
    return text


def validate_weight(value: object) -> int:
    """Accept a backend weight, an integer from 1 to MAX_WEIGHT."""
    return integer(1, MAX_WEIGHT)(value)


def url_identity(url: str) -> tuple[str, str, int, str]:
    """What makes two backend URLs the same server: case, default port and trailing / aside."""
    parts = urlsplit(url)
    port = parts.port or _DEFAULT_PORTS[parts.scheme]
    return parts.scheme, parts.hostname or "", port, parts.path.rstrip("/")


def duplicates(urls: list[str | None]) -> list[tuple[int, int]]:
    """Pairs (index, index of its first occurrence) of URLs naming a server already listed.

    None stands for an entry that was invalid, already reported, and is skipped.
    """
    first: dict[tuple[str, str, int, str], int] = {}
    pairs = []
    for index, url in enumerate(urls):
        if url is None:
            continue
        identity = url_identity(url)
        if identity in first:
            pairs.append((index, first[identity]))
        first.setdefault(identity, index)
    return pairs


# -- composite checks -------------------------------------------------------------------


def _unknown_key(key: str, known: Collection[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    if close:
        return f"unknown key; did you mean {close[0]!r}?"
    return f"unknown key; expected one of: {', '.join(known)}"


def record(template: Any, schema: Mapping[str, Check], required: tuple[str, ...] = ()) -> Check:
    """Check a mapping key by key against ``schema``; missing keys keep ``template``'s values.

    An empty section (YAML null) means all defaults, unless some key is required.
    """

    def check(value: object) -> Any:
        if value is None and not required:
            return template
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping, got {describe(value)}")
        problems: list[Problem] = []
        values = {}
        for key, item in value.items():
            name = str(key)
            if name in schema:
                values[name] = collect(problems, name, schema[name], item)
            else:
                problems.append(((name,), _unknown_key(name, schema)))
        problems += [((name,), "required") for name in required if name not in value]
        if problems:
            raise Invalid(problems)
        return attrs.evolve(template, **values)

    return check


def list_of(check_item: Check) -> Check:
    def check(value: object) -> tuple[Any, ...]:
        if not isinstance(value, list):
            raise ValueError(f"expected a list, got {describe(value)}")
        problems: list[Problem] = []
        items = tuple(collect(problems, i, check_item, item) for i, item in enumerate(value))
        if problems:
            raise Invalid(problems)
        return items

    return check


def database_target(dsn: str) -> str:
    """Where a DSN points, for messages: ``user@host:port/dbname`` without the password.

    Parts the DSN leaves out show libpq's defaults (port 5432, the local socket); several
    hosts (``host=a,b``) are shown as written.
    """
    try:
        options = parse_dsn(dsn)
    except psycopg2.ProgrammingError:
        return "(a DSN that cannot be parsed)"
    host = options.get("host") or options.get("hostaddr") or "local socket"
    if ":" in host and "," not in host:
        host = f"[{host}]"
    user = options.get("user")
    where = f"{host}:{options.get('port') or 5432}"
    dbname = options.get("dbname") or user
    return f"{user + '@' if user else ''}{where}{'/' + dbname if dbname else ''}"


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines, tabs) as one space."""
    return " ".join(text.split())
