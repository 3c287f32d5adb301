"""Configuration: YAML in, frozen typed objects out, validated before anything starts.

Field names mirror the YAML keys of SPEC section 3. Durations are float seconds.

Validation collects every problem instead of stopping at the first, so an operator
fixes a broken file in one go. Each section is described by a small schema table
mapping a key to a *check*: a callable that returns the converted value or raises
``ValueError`` (a problem at that key) or ``_Invalid`` (problems below that key).
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import sys
from collections.abc import Callable, Collection, Iterable, Mapping
from fractions import Fraction
from typing import Any
from urllib.parse import urlsplit

import attrs
import psycopg2
import yaml
from attrs import field, frozen
from psycopg2.extensions import parse_dsn
from twisted.internet.endpoints import _parse, _parseServer

from equalizer.balancer.strategies import STRATEGIES
from equalizer.config.rules import describe as _describe
from equalizer.config.rules import (
    validate_capacity,
    validate_refill_rate,
)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@frozen
class Timeouts:
    connect: float = 5.0
    response: float = 30.0
    idle: float = 60.0
    shutdown: float = 30.0


@frozen
class ProxyConfig:
    listen: str = "tcp:8080"
    preserve_host: bool = True
    timeouts: Timeouts = Timeouts()
    retries: int = 2
    trusted_proxies: tuple[Network, ...] = ()
    max_header_bytes: int = 16384


@frozen
class AdminConfig:
    listen: str = "tcp:8081:interface=127.0.0.1"
    token: str | None = None


@frozen
class BackendConfig:
    url: str
    weight: int = 1


@frozen
class BalancerConfig:
    strategy: str = "round_robin"
    hash_key: str = "ip"
    backends: tuple[BackendConfig, ...] = (BackendConfig("http://127.0.0.1:9001"),)


@frozen
class HealthConfig:
    path: str = "/"
    interval: float = 30.0
    timeout: float = 5.0
    fail_timeout: float = 10.0
    unhealthy_threshold: int = 3
    healthy_threshold: int = 2
    expected_status: tuple[int, int] = (200, 399)


@frozen
class BucketPolicy:
    capacity: int
    refill_rate: float


DEFAULT_MAX_BUCKETS = 1_000_000
"""Most buckets a process holds for clients (``rate_limit.max_buckets``), by default."""

MAX_MAX_BUCKETS = 1_000_000_000
"""Largest ``rate_limit.max_buckets`` accepted: past that the cap would bound nothing."""




@frozen
class RateLimitConfig:
    enabled: bool = True
    key: str = "ip"
    default: BucketPolicy | None = BucketPolicy(100, 10.0)
    store: str = "memory"
    database_url: str | None = None
    on_store_error: str = "allow"
    headers: str = "both"
    max_buckets: int = DEFAULT_MAX_BUCKETS


@frozen
class RotateConfig:
    max_bytes: int = 10 * 1024 * 1024
    retention_days: int = 90
    compress: bool = True


@frozen
class LoggingConfig:
    level: str = "info"
    format: str = "text"
    file: str | None = None
    rotate: RotateConfig = RotateConfig()
    access_log: bool = True


@frozen
class Config:
    proxy: ProxyConfig = field(factory=ProxyConfig)
    admin: AdminConfig = field(factory=AdminConfig)
    balancer: BalancerConfig = field(factory=BalancerConfig)
    health: HealthConfig = field(factory=HealthConfig)
    rate_limit: RateLimitConfig = field(factory=RateLimitConfig)
    logging: LoggingConfig = field(factory=LoggingConfig)


DEFAULT_CONFIG_PATH = "config/equalizer.yml"
ENV_DATABASE_URL = "EQUALIZER_DATABASE_URL"
ENV_ADMIN_TOKEN = "EQUALIZER_ADMIN_TOKEN"
MAX_WEIGHT = 1000


class ConfigError(Exception):
    """An unusable configuration; ``problems`` holds one ``key.path: message`` line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


_KeyPath = tuple[str | int, ...]
_Problem = tuple[_KeyPath, str]
_Check = Callable[[Any], Any]  # returns the converted value, raises ValueError or _Invalid


class _Invalid(Exception):
    """Problems found inside a nested value, with paths relative to that value."""

    def __init__(self, problems: list[_Problem]) -> None:
        super().__init__(problems)
        self.problems = problems


def _collect(problems: list[_Problem], key: str | int, check: _Check, value: object) -> Any:
    """Run ``check`` on the value at ``key``, recording its problems instead of raising."""
    try:
        return check(value)
    except ValueError as e:
        problems.append(((key,), str(e)))
    except _Invalid as e:
        problems.extend(((key, *path), message) for path, message in e.problems)
    return None


def _format_path(path: _KeyPath) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text or "config"


# -- leaf checks ------------------------------------------------------------------------


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_describe(value)}")
    return value


def _string(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_describe(value)}")
    if not value.strip():
        raise ValueError("must not be empty")
    return value


def _integer(minimum: int, maximum: int | None = None) -> _Check:
    """An integer check with bounds; bool is refused although Python counts it as an int."""

    def check(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {_describe(value)}")
        if maximum is not None and not minimum <= value <= maximum:
            raise ValueError(f"must be between {minimum} and {maximum}, got {value}")
        if value < minimum:
            raise ValueError(f"must be at least {minimum}, got {value}")
        return value

    return check


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _at_least_zero(number: float) -> float:
    """Refuse negatives, NaN and what a float cannot hold (YAML allows ``.inf`` and huge ints)."""
    if not 0 <= number <= sys.float_info.max:
        raise ValueError(f"must be a number from 0 up, got {number}")
    return float(number)


def _choice(*options: str) -> _Check:
    def check(value: object) -> str:
        if _string(value) not in options:
            raise ValueError(f"must be one of {', '.join(options)}; got {value!r}")
        return value

    return check


def _optional(check: _Check) -> _Check:
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
        return _at_least_zero(float(match[1]) * _DURATION_UNITS[match[2]])
    if not _is_number(value):
        raise ValueError(f"expected a duration such as 5s, got {_describe(value)}")
    return _at_least_zero(value)


def _positive_duration(value: object) -> float:
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


def _size(minimum: int) -> _Check:
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
        return _integer(minimum)(value)

    return check


_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _client_key(*kinds: str) -> _Check:
    """``ip`` or ``KIND:NAME`` where NAME is an HTTP token (a header or cookie name)."""
    expected = " or ".join(["ip", *(f"{kind}:NAME" for kind in kinds)])

    def check(value: object) -> str:
        kind, _, name = _string(value).partition(":")
        if value != "ip" and (kind not in kinds or not _TOKEN.fullmatch(name)):
            raise ValueError(f"expected {expected}; got {value!r}")
        return value

    return check


def _status_range(value: object) -> tuple[int, int]:
    """``200``, ``"200"`` or ``"200-399"``: the statuses a health check accepts."""
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    match = re.fullmatch(r"(\d{3})(?:\s*-\s*(\d{3}))?", text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"expected a status or range like '200-399'; got {_describe(value)}")
    low, high = int(match[1]), int(match[2] or match[1])
    if not 100 <= low <= high <= 599:
        raise ValueError(f"expected a range of statuses within 100-599; got {value!r}")
    return low, high


def _network(value: object) -> Network:
    text = _string(value)
    try:
        return ipaddress.ip_network(text)
    except ValueError as e:
        raise ValueError(f"not an IP network in CIDR notation: {e}") from None


def _health_path(value: object) -> str:
    if not _string(value).startswith("/"):
        raise ValueError(f"must start with '/'; got {value!r}")
    return value


_PORT_ENDPOINTS = frozenset({"tcp", "tcp6", "ssl"})


def _endpoint(value: object) -> str:
    """Check a Twisted server endpoint string the way ``serverFromString`` reads it, unbound.

    ``_parseServer`` is private Twisted API, but it is exactly the parser
    ``serverFromString`` uses: it knows the built-in and plugin endpoint types and
    converts the built-in arguments (an ``ssl:`` endpoint loads its key and
    certificate here, so a missing file is reported at start-up, not on first use).
    Nothing is bound. Ports are checked first to give a clearer message.
    """
    text = _string(value)
    args, kwargs = _parse(text)
    if args[0] in _PORT_ENDPOINTS:
        port = kwargs.get("port", args[1] if len(args) > 1 else "")
        if not (re.fullmatch("[0-9]{1,5}", port) and int(port) <= 65535):
            raise ValueError(f"invalid endpoint {text!r}: port must be 0-65535; got {port!r}")
    try:
        _parseServer(text, None)
    except Exception as e:  # whatever the parser refuses is a mistake in the string
        raise ValueError(f"invalid endpoint {text!r}: {_reason(e)}") from None
    return text


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
    text = _string(value)
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


def validate_backend_url(value: object) -> str:
    """Accept an absolute http(s) URL with a host and a valid port; return it unchanged.

    Request paths are joined under the URL's own path, so a query or fragment
    has no meaning there and is refused.

    Raises:
        ValueError: with a message suitable for an operator or an API client.
    """
    text = _string(value)
    not_http = ValueError(f"not an http(s) URL: {text!r}")
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
    return _integer(1, MAX_WEIGHT)(value)


def url_identity(url: str) -> tuple[str, str, int, str]:
    """What makes two backend URLs the same server: case, default port and trailing / aside."""
    parts = urlsplit(url)
    port = parts.port or _DEFAULT_PORTS[parts.scheme]
    return parts.scheme, parts.hostname or "", port, parts.path.rstrip("/")


def _duplicates(urls: list[str | None]) -> list[tuple[int, int]]:
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


def _record(template: Any, schema: Mapping[str, _Check], required: tuple[str, ...] = ()) -> _Check:
    """Check a mapping key by key against ``schema``; missing keys keep ``template``'s values.

    An empty section (YAML null) means all defaults, unless some key is required.
    """

    def check(value: object) -> Any:
        if value is None and not required:
            return template
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping, got {_describe(value)}")
        problems: list[_Problem] = []
        values = {}
        for key, item in value.items():
            name = str(key)
            if name in schema:
                values[name] = _collect(problems, name, schema[name], item)
            else:
                problems.append(((name,), _unknown_key(name, schema)))
        problems += [((name,), "required") for name in required if name not in value]
        if problems:
            raise _Invalid(problems)
        return attrs.evolve(template, **values)

    return check


def _list_of(check_item: _Check) -> _Check:
    def check(value: object) -> tuple[Any, ...]:
        if not isinstance(value, list):
            raise ValueError(f"expected a list, got {_describe(value)}")
        problems: list[_Problem] = []
        items = tuple(_collect(problems, i, check_item, item) for i, item in enumerate(value))
        if problems:
            raise _Invalid(problems)
        return items

    return check


_backend = _record(
    BackendConfig(url=""),
    {"url": validate_backend_url, "weight": validate_weight},
    required=("url",),
)


def _backends(value: object) -> tuple[BackendConfig, ...]:
    """A non-empty list of backends, no server listed twice."""
    if not isinstance(value, list):
        raise ValueError(f"expected a list, got {_describe(value)}")
    if not value:
        raise ValueError("at least one backend is required")
    problems: list[_Problem] = []
    backends = [_collect(problems, i, _backend, item) for i, item in enumerate(value)]
    urls = [backend and backend.url for backend in backends]
    problems += [
        ((index, "url"), f"duplicate backend URL {urls[index]!r} (same as [{first}])")
        for index, first in _duplicates(urls)
    ]
    if problems:
        raise _Invalid(sorted(problems, key=lambda problem: problem[0]))
    return tuple(backends)
    return backends


_SCHEMA = _record(Config(), {
    "proxy": _record(ProxyConfig(), {
        "listen": _endpoint,
        "preserve_host": _boolean,
        "timeouts": _record(Timeouts(), {
            "connect": _positive_duration,
            "response": _positive_duration,
            "idle": parse_duration,
            "shutdown": parse_duration,
        }),
        "retries": _integer(0),
        "trusted_proxies": _list_of(_network),
        "max_header_bytes": _size(1024),
    }),
    "admin": _record(AdminConfig(), {
        "listen": _endpoint,
        "token": _optional(_string),
    }),
    "balancer": _record(BalancerConfig(), {
        "strategy": _choice(*STRATEGIES),  # the registry in strategies.py
        "hash_key": _client_key("header", "cookie"),
        "backends": _backends,
    }),
    "health": _record(HealthConfig(), {
        "path": _health_path,
        "interval": parse_duration,
        "timeout": _positive_duration,
        "fail_timeout": parse_duration,
        "unhealthy_threshold": _integer(1),
        "healthy_threshold": _integer(1),
        "expected_status": _status_range,
    }),
    "rate_limit": _record(RateLimitConfig(), {
        "enabled": _boolean,
        "key": _client_key("header"),
        "default": _optional(_record(RateLimitConfig().default, {
            "capacity": validate_capacity,
            "refill_rate": validate_refill_rate,
        })),
        "store": _choice("memory", "postgres"),
        "database_url": _optional(validate_database_url),
        "on_store_error": _choice("allow", "deny"),
        "headers": _choice("both", "draft", "legacy", "none"),
        "max_buckets": _integer(1, MAX_MAX_BUCKETS),
    }),
    "logging": _record(LoggingConfig(), {
        "level": _choice("debug", "info", "warn", "error"),
        "format": _choice("text", "json"),
        "file": _optional(_string),
        "rotate": _record(RotateConfig(), {
            "max_bytes": _size(1),
            "retention_days": _integer(1),
            "compress": _boolean,
        }),
        "access_log": _boolean,
    }),
})  # fmt: skip


# -- public entry points ----------------------------------------------------------------


def parse_config(data: object) -> Config:
    """Turn a parsed YAML document into a Config; an empty document means all defaults.

    Raises:
        ConfigError: listing every problem found, not just the first.
    """
    try:
        return _SCHEMA(data)
    except ValueError as e:
        problems: list[_Problem] = [((), str(e))]
    except _Invalid as e:
        problems = e.problems
    raise ConfigError([f"{_format_path(path)}: {message}" for path, message in problems])


class _DuplicateKey(yaml.MarkedYAMLError):
    """A key written twice in one mapping, at ``path`` (its second occurrence)."""

    def __init__(self, path: _KeyPath, mark: yaml.Mark) -> None:
        super().__init__(problem="duplicate key", problem_mark=mark)
        self.path = path


class _StrictLoader(yaml.SafeLoader):
    """A SafeLoader that refuses duplicate keys, which PyYAML would silently let win,
    naming the key path of the second one."""

    def construct_document(self, node: yaml.Node) -> Any:
        self._paths = _node_paths(node)
        return super().construct_document(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                key = self.construct_object(key_node)
                if key in seen:
                    path = (*self._paths.get(id(node), ()), str(key))
                    raise _DuplicateKey(path, key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


def _node_paths(root: yaml.Node) -> dict[int, _KeyPath]:
    """The key path of every collection node in a document, by ``id`` (first path seen,
    for a node an alias reaches twice)."""
    paths: dict[int, _KeyPath] = {}
    pending: list[tuple[yaml.Node, _KeyPath]] = [(root, ())]
    while pending:
        node, path = pending.pop()
        if id(node) in paths or isinstance(node, yaml.ScalarNode):
            continue
        paths[id(node)] = path
        if isinstance(node, yaml.MappingNode):
            pending += [(value, (*path, str(key.value))) for key, value in node.value
                        if isinstance(key, yaml.ScalarNode)]
        else:
            pending += [(item, (*path, index)) for index, item in enumerate(node.value)]
    return paths


def _read_yaml(path: str) -> object:
    """Read and parse a YAML file, turning every failure into a one-line ConfigError."""
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.load(f, Loader=_StrictLoader)  # noqa: S506 -- a SafeLoader subclass
    except OSError as e:
        raise ConfigError([f"config: cannot read {path!r}: {e.strerror}"]) from None
    except UnicodeDecodeError as e:
        raise ConfigError([f"config: cannot read {path!r}: not UTF-8 text ({e.reason})"]) from None
    except _DuplicateKey as e:
        raise ConfigError([f"{_format_path(e.path)}: duplicate key in {path!r}{_where(e)}"]) \
            from None
    except yaml.MarkedYAMLError as e:
        problem = " ".join(str(e.problem).split())
        raise ConfigError([f"config: YAML syntax error in {path!r}{_where(e)}: {problem}"]) \
            from None
    except yaml.YAMLError as e:
        raise ConfigError([f"config: YAML error in {path!r}: {' '.join(str(e).split())}"]) from None


def _where(error: yaml.MarkedYAMLError) -> str:
    mark = error.problem_mark
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""


def load_config(path: str | None = None) -> Config:
    """Load and validate the configuration file.

    Args:
        path: the file to read; None reads ``config/equalizer.yml`` when it exists
            in the current directory and otherwise uses the built-in defaults.

    Raises:
        ConfigError: the file cannot be read or parsed, or is not a valid configuration.
    """
    if path is None:
        if not os.path.exists(DEFAULT_CONFIG_PATH):
            return Config()
        path = DEFAULT_CONFIG_PATH
    return parse_config(_read_yaml(path))


def _check_flag(problems: list[str], flag: str, check: _Check, value: object) -> Any:
    try:
        return check(value)
    except ValueError as e:
        problems.append(f"{flag}: {e}")
        return None


def _flag_backends(problems: list[str], urls: list[str]) -> tuple[BackendConfig, ...]:
    """Backends given with ``--backend``: each a valid URL, none twice, all of weight 1."""
    valid = [_check_flag(problems, "--backend", validate_backend_url, url) for url in urls]
    problems += [f"--backend: duplicate backend URL {urls[i]!r}" for i, _ in _duplicates(valid)]
    return tuple(BackendConfig(url) for url in urls)


def apply_overrides(
    config: Config,
    *,
    listen: str | None = None,
    admin: str | None = None,
    backends: Iterable[str] = (),
    database_url: str | None = None,
    env: Mapping[str, str],
) -> Config:
    """Lay command-line flags and environment variables over a file's configuration.

    Precedence is flag > environment > file > default. A non-empty ``backends``
    replaces the configured list. Empty environment variables count as unset.
    Cross-checks that depend on the overrides (postgres needs a database URL)
    run here, so call this after every load, SIGHUP reloads included.

    Raises:
        ConfigError: naming the flag (``--listen: ...``) or key path of each problem.
    """
    problems: list[str] = []
    proxy, admin_config, balancer = config.proxy, config.admin, config.balancer
    if listen is not None:
        proxy = attrs.evolve(proxy, listen=_check_flag(problems, "--listen", _endpoint, listen))
    if admin is not None:
        admin_config = attrs.evolve(
            admin_config, listen=_check_flag(problems, "--admin", _endpoint, admin)
        )
    admin_config = attrs.evolve(admin_config, token=env.get(ENV_ADMIN_TOKEN) or admin_config.token)
    urls = list(backends)
    if urls:
        balancer = attrs.evolve(balancer, backends=_flag_backends(problems, urls))
    if database_url is not None:
        database_url = _check_flag(problems, "--database-url", validate_database_url, database_url)
    elif env.get(ENV_DATABASE_URL):
        database_url = _check_flag(problems, ENV_DATABASE_URL, validate_database_url,
                                   env[ENV_DATABASE_URL])
    rate_limit = attrs.evolve(
        config.rate_limit, database_url=database_url or config.rate_limit.database_url)
    if rate_limit.store == "postgres" and rate_limit.database_url is None:
        problems.append(
            "rate_limit.database_url: required when rate_limit.store is postgres "
            f"(or set {ENV_DATABASE_URL})"
        )
    if problems:
        raise ConfigError(problems)
    return attrs.evolve(
        config, proxy=proxy, admin=admin_config, balancer=balancer, rate_limit=rate_limit
    )
