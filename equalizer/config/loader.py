"""Configuration loading: YAML in, frozen ``model`` objects out, validated before anything starts.

The schema below maps each YAML key to a check from ``checks``; every problem is
reported at once with its key path (and, for YAML errors, its line). Command-line
flags and environment variables are laid over the file here too.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
import yaml

from equalizer.config import checks
from equalizer.config.checks import (
    parse_duration,
    validate_backend_url,
    validate_database_url,
    validate_weight,
)
from equalizer.config.model import (
    MAX_BACKEND_REQUESTS,
    MAX_MAX_BUCKETS,
    MAX_QUEUE,
    STRATEGY_NAMES,
    AdminConfig,
    BackendConfig,
    BalancerConfig,
    Config,
    HealthConfig,
    LoggingConfig,
    OutlierConfig,
    ProxyConfig,
    QueueConfig,
    RateLimitConfig,
    RotateConfig,
    Timeouts,
)
from equalizer.config.routes import parse_routing
from equalizer.config.rules import describe, validate_capacity, validate_refill_rate

DEFAULT_CONFIG_PATH = "config/equalizer.yml"
ENV_DATABASE_URL = "EQUALIZER_DATABASE_URL"
ENV_ADMIN_TOKEN = "EQUALIZER_ADMIN_TOKEN"


class ConfigError(Exception):
    """An unusable configuration; ``problems`` holds one ``key.path: message`` line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


_backend = checks.record(
    BackendConfig(url=""),
    {"url": validate_backend_url, "weight": validate_weight,
     "max_requests": checks.integer(0, MAX_BACKEND_REQUESTS), "backup": checks.boolean},
    required=("url",),
)


def _backends(value: object) -> tuple[BackendConfig, ...]:
    """A non-empty list of backends, no server listed twice."""
    if not isinstance(value, list):
        raise ValueError(f"expected a list, got {describe(value)}")
    if not value:
        raise ValueError("at least one backend is required")
    return _backend_list(value)


def _default_backends(value: object) -> tuple[BackendConfig, ...]:
    """``balancer.backends``: may be empty when routes send every request elsewhere
    (the cross-check is :func:`~equalizer.config.routes.parse_routing`'s)."""
    if value == []:
        return ()
    return _backends(value)


def _backend_list(value: list) -> tuple[BackendConfig, ...]:
    problems: list[checks.Problem] = []
    backends = [checks.collect(problems, i, _backend, item) for i, item in enumerate(value)]
    urls = [backend and backend.url for backend in backends]
    problems += [
        ((index, "url"), f"duplicate backend URL {urls[index]!r} (same as [{first}])")
        for index, first in checks.duplicates(urls)
    ]
    if problems:
        raise checks.Invalid(sorted(problems, key=lambda problem: problem[0]))
    return tuple(backends)


_BALANCER_KEYS: dict[str, checks.Check] = {
    "strategy": checks.choice(*STRATEGY_NAMES),
    "hash_key": checks.client_key("header", "cookie"),
    "backends": _backends,
    "slow_start": parse_duration,
    "queue": checks.record(QueueConfig(), {
        "max": checks.integer(0, MAX_QUEUE),
        "timeout": checks.positive_duration,
    }),
}
"""The keys of ``balancer``, and of each pool (SPEC 8)."""

_HEALTH_KEYS: dict[str, checks.Check] = {
    "path": checks.health_path,
    "interval": parse_duration,
    "timeout": checks.positive_duration,
    "fail_timeout": parse_duration,
    "unhealthy_threshold": checks.integer(1),
    "healthy_threshold": checks.integer(1),
    "expected_status": checks.status_range,
    "outlier": checks.record(OutlierConfig(), {
        "consecutive_5xx": checks.integer(0),
        "consecutive_gateway_errors": checks.integer(0),
        "base_ejection": checks.positive_duration,
        "max_ejection_percent": checks.integer(0, 100),
    }),
}
"""The keys of ``health``, and of each pool's ``health``."""

_SCHEMA = checks.record(Config(), {
    "proxy": checks.record(ProxyConfig(), {
        "listen": checks.endpoint,
        "preserve_host": checks.boolean,
        "timeouts": checks.record(Timeouts(), {
            "connect": checks.positive_duration,
            "response": checks.positive_duration,
            "idle": parse_duration,
            "shutdown": parse_duration,
        }),
        "retries": checks.integer(0),
        "trusted_proxies": checks.list_of(checks.network),
        "max_header_bytes": checks.size(1024),
        "retry_on": checks.list_of(checks.retry_reason),
        "workers": checks.workers,
    }),
    "admin": checks.record(AdminConfig(), {
        "listen": checks.endpoint,
        "token": checks.optional(checks.string),
    }),
    "balancer": checks.record(BalancerConfig(), {**_BALANCER_KEYS,
                                                 "backends": _default_backends}),
    "health": checks.record(HealthConfig(), _HEALTH_KEYS),
    "rate_limit": checks.record(RateLimitConfig(), {
        "enabled": checks.boolean,
        "key": checks.client_key("header"),
        "default": checks.optional(checks.record(RateLimitConfig().default, {
            "capacity": validate_capacity,
            "refill_rate": validate_refill_rate,
        })),
        "store": checks.choice("memory", "postgres"),
        "database_url": checks.optional(validate_database_url),
        "on_store_error": checks.choice("allow", "deny"),
        "headers": checks.choice("both", "draft", "legacy", "none"),
        "max_buckets": checks.integer(1, MAX_MAX_BUCKETS),
    }),
    "logging": checks.record(LoggingConfig(), {
        "level": checks.choice("debug", "info", "warn", "error"),
        "format": checks.choice("text", "json"),
        "file": checks.optional(checks.string),
        "rotate": checks.record(RotateConfig(), {
            "max_bytes": checks.size(1),
            "retention_days": checks.integer(1),
            "compress": checks.boolean,
        }),
        "access_log": checks.boolean,
    }),
})  # fmt: skip



def parse_config(data: object) -> Config:
    """Turn a parsed YAML document into a Config; an empty document means all defaults.

    Raises:
        ConfigError: listing every problem found, not just the first.
    """
    raw: dict[str, object] = {}
    if isinstance(data, dict):
        data = dict(data)
        raw = {"pools": data.pop("pools", None), "routes": data.pop("routes", None)}
        rate_limit = data.get("rate_limit")
        if isinstance(rate_limit, dict) and "policies" in rate_limit:
            data["rate_limit"] = {k: v for k, v in rate_limit.items() if k != "policies"}
            raw["policies"] = rate_limit["policies"]
    try:
        config = _SCHEMA(data)
    except ValueError as e:
        problems: list[checks.Problem] = [((), str(e))]
    except checks.Invalid as e:
        problems = e.problems
    else:
        try:
            return parse_routing(config, raw, _BALANCER_KEYS, _HEALTH_KEYS)
        except checks.Invalid as e:
            problems = e.problems
    raise ConfigError([f"{checks.format_path(path)}: {message}" for path, message in problems])


class _DuplicateKey(yaml.MarkedYAMLError):
    """A key written twice in one mapping, at ``path`` (its second occurrence)."""

    def __init__(self, path: checks.KeyPath, mark: yaml.Mark) -> None:
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


def _node_paths(root: yaml.Node) -> dict[int, checks.KeyPath]:
    """The key path of every collection node in a document, by ``id`` (first path seen,
    for a node an alias reaches twice)."""
    paths: dict[int, checks.KeyPath] = {}
    pending: list[tuple[yaml.Node, checks.KeyPath]] = [(root, ())]
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
    text = ""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 -- a SafeLoader subclass
    except OSError as e:
        raise ConfigError([f"config: cannot read {path!r}: {e.strerror}"]) from None
    except UnicodeDecodeError as e:
        raise ConfigError([f"config: cannot read {path!r}: not UTF-8 text ({e.reason})"]) from None
    except _DuplicateKey as e:
        raise ConfigError([f"{checks.format_path(e.path)}: duplicate key in {path!r}{_where(e)}"]) \
            from None
    except yaml.MarkedYAMLError as e:
        problem = " ".join(str(e.problem).split())
        raise ConfigError([f"config: YAML syntax error in {path!r}{_where(e)}: {problem}"
                           f"{_excerpt(text, e.problem_mark)}"]) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"config: YAML error in {path!r}: {' '.join(str(e).split())}"]) from None


def _excerpt(text: str, mark: yaml.Mark | None) -> str:
    """The file's lines at ``mark`` (the one before it too, where the cause often is) and a
    caret under its column, each line on a line of its own after the message."""
    lines = text.splitlines()
    if mark is None or not lines:
        return ""
    number = min(mark.line, len(lines) - 1)
    column = mark.column if number == mark.line else len(lines[number])
    width = len(str(number + 1))
    shown = [f"  {n + 1:>{width}} | {lines[n]}" for n in range(max(0, number - 1), number + 1)]
    return "\n" + "\n".join([*shown, f"  {'':>{width}} | {' ' * column}^"])


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
    path = config_path(path)
    return Config() if path is None else parse_config(_read_yaml(path))


def config_path(path: str | None) -> str | None:
    """The file ``load_config(path)`` reads: ``path``, else ``config/equalizer.yml`` when
    it exists in the current directory, else None (the built-in defaults)."""
    if path is None and os.path.exists(DEFAULT_CONFIG_PATH):
        return DEFAULT_CONFIG_PATH
    return path


def _check_flag(problems: list[str], flag: str, check: checks.Check, value: object) -> Any:
    try:
        return check(value)
    except ValueError as e:
        problems.append(f"{flag}: {e}")
        return None


def _flag_backends(problems: list[str], urls: list[str]) -> tuple[BackendConfig, ...]:
    """Backends given with ``--backend``: each a valid URL, none twice, all of weight 1."""
    valid = [_check_flag(problems, "--backend", validate_backend_url, url) for url in urls]
    problems += [
        f"--backend: duplicate backend URL {urls[i]!r}" for i, _ in checks.duplicates(valid)
    ]
    return tuple(BackendConfig(url) for url in urls)


def apply_overrides(
    config: Config,
    *,
    listen: str | None = None,
    admin: str | None = None,
    backends: Iterable[str] = (),
    database_url: str | None = None,
    env: Mapping[str, str],
    workers: str | None = None,
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
        proxy = attrs.evolve(
            proxy, listen=_check_flag(problems, "--listen", checks.endpoint, listen)
        )
    if admin is not None:
        admin_config = attrs.evolve(
            admin_config, listen=_check_flag(problems, "--admin", checks.endpoint, admin)
        )
    admin_config = attrs.evolve(admin_config, token=env.get(ENV_ADMIN_TOKEN) or admin_config.token)
    if workers is not None:
        count = _check_flag(problems, "--workers", checks.workers,
                            int(workers) if workers.isdigit() else workers)
        proxy = attrs.evolve(proxy, workers=count or proxy.workers)
    if proxy.workers > 1 and proxy.listen.startswith("ssl:"):
        problems.append("proxy.workers: more than one worker needs a tcp: or unix: "
                        "proxy.listen (terminate TLS in front, or run one worker)")
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
