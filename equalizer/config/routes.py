"""``pools``, ``routes`` and ``rate_limit.policies`` (SPEC 8): checked after the rest of
the file, because a pool's ``health`` is laid over the top-level one and a route may
name only pools and policies that exist. Problems carry their key path, as elsewhere.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import attrs

from equalizer.config import checks
from equalizer.config.model import (
    DEFAULT_POLICY,
    BalancerConfig,
    Config,
    HeaderRewrite,
    MatchConfig,
    PolicyConfig,
    PoolConfig,
    RouteConfig,
)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_HOST = re.compile(r"(\*\.)?[a-z0-9]([a-z0-9.-]*[a-z0-9])?")
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")
_METHOD = re.compile(r"[A-Z]+")

MANAGED_FIELDS = frozenset({"host", "content-length", "transfer-encoding", "connection",
                            "upgrade", "te", "trailer", "keep-alive", "proxy-connection"})
"""Fields the proxy frames messages with: a route may neither set nor remove them."""


def name(value: object) -> str:
    """A pool or policy name: letters, digits, ``_``, ``.``, ``-`` (it appears in
    RateLimit fields and metric labels)."""
    text = checks.string(value)
    if not _NAME.fullmatch(text):
        raise ValueError(f"expected a name of letters, digits, '_', '.', '-'; got {value!r}")
    return text


def host_pattern(value: object) -> str:
    """``api.example.com`` or ``*.example.com``, lower-cased; no port."""
    text = checks.string(value).lower()
    if not _HOST.fullmatch(text):
        raise ValueError(f"expected a host name or '*.suffix' (no port); got {value!r}")
    return text


def path_prefix(value: object) -> str:
    text = checks.string(value)
    if not text.startswith("/") or not _FIELD_VALUE.fullmatch(text) or " " in text:
        raise ValueError(f"must start with '/' and hold no spaces; got {value!r}")
    return text


def method(value: object) -> str:
    text = checks.string(value)
    if not _METHOD.fullmatch(text):
        raise ValueError(f"expected an upper-case method such as GET; got {value!r}")
    return text


def field_name(value: object) -> str:
    text = checks.string(value)
    if not checks._TOKEN.fullmatch(text):
        raise ValueError(f"not a header field name: {value!r}")
    if text.lower() in MANAGED_FIELDS:
        raise ValueError(f"{text} is managed by the proxy; a route cannot change it")
    return text


def field_value(value: object) -> str:
    text = str(value) if isinstance(value, int | float) and not isinstance(value, bool) \
        else checks.string(value)
    if not _FIELD_VALUE.fullmatch(text):
        raise ValueError(f"a header value holds no control characters; got {value!r}")
    return text


def fields(value: object) -> tuple[tuple[str, str], ...]:
    """A mapping of header field names to values."""
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping of header names to values, "
                         f"got {checks.describe(value)}")
    problems: list[checks.Problem] = []
    pairs = tuple((checks.collect(problems, str(key), field_name, key),
                   checks.collect(problems, str(key), field_value, item))
                  for key, item in value.items())
    if problems:
        raise checks.Invalid(problems)
    return pairs


_rewrite = checks.record(HeaderRewrite(), {"set": fields, "remove": checks.list_of(field_name)})

_match = checks.record(MatchConfig(), {
    "host": host_pattern,
    "path_prefix": path_prefix,
    "methods": checks.list_of(method),
    "headers": fields,
})

_route = checks.record(RouteConfig(), {
    "match": _match,
    "pool": name,
    "strip_prefix": checks.boolean,
    "rate_limit": checks.optional(name),
    "request_headers": _rewrite,
    "response_headers": _rewrite,
})


def named(check: checks.Check) -> checks.Check:
    """A mapping of names (see :func:`name`) to values ``check`` accepts, as pairs;
    ``default`` is taken (it is the top-level section)."""

    def check_all(value: object) -> tuple[tuple[str, Any], ...]:
        if value is None:
            return ()
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping of names, got {checks.describe(value)}")
        problems: list[checks.Problem] = []
        pairs = []
        for key, item in value.items():
            text = str(key)
            if text == DEFAULT_POLICY:
                problems.append(((text,), "'default' is the top-level section's name"))
                continue
            checks.collect(problems, text, name, key)
            pairs.append((text, checks.collect(problems, text, check, item)))
        if problems:
            raise checks.Invalid(problems)
        return tuple(pairs)

    return check_all


def pool_check(balancer_keys: Mapping[str, checks.Check],
               health_check: checks.Check) -> checks.Check:
    """One pool: the keys of ``balancer`` (backends required) and ``health``, whose keys
    are laid over the top-level ``health`` by ``health_check``."""
    balancer = checks.record(BalancerConfig(backends=()), balancer_keys, required=("backends",))

    def check(value: object) -> tuple[BalancerConfig, Any]:
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping, got {checks.describe(value)}")
        problems: list[checks.Problem] = []
        rest = {key: item for key, item in value.items() if key != "health"}
        config = checks.collect(problems, "", balancer, rest)
        health = checks.collect(problems, "health", health_check, value.get("health"))
        problems = [(path[1:] if path[:1] == ("",) else path, message)
                    for path, message in problems]
        if problems:
            raise checks.Invalid(problems)
        return config, health

    return check


def parse_routing(config: Config, raw: Mapping[str, object],
                  balancer_keys: Mapping[str, checks.Check],
                  health_keys: Mapping[str, checks.Check]) -> Config:
    """``config`` with the pools, routes and policies of the ``raw`` sections
    (``pools``, ``routes``, ``policies``: the YAML values, absent when None).

    Raises:
        checks.Invalid: every problem, by key path from the top of the file.
    """
    problems: list[checks.Problem] = []
    health = checks.record(config.health, health_keys)
    pools = checks.collect(problems, "pools",
                           named(pool_check(balancer_keys, health)), raw.get("pools")) or ()
    policies = checks.collect(problems, "policies", named(_policy(config)),
                              raw.get("policies")) or ()
    problems = [(("rate_limit", *path), message) if path[0] == "policies" else (path, message)
                for path, message in problems]
    routes = checks.collect(problems, "routes", _routes, raw.get("routes")) or ()
    known_pools = {"default", *(pool_name for pool_name, _ in pools)}
    known_policies = {DEFAULT_POLICY, *(policy_name for policy_name, _ in policies)}
    for index, route in enumerate(routes):
        if route is None:
            continue
        if route.pool not in known_pools:
            problems.append((("routes", index, "pool"), f"unknown pool {route.pool!r}; "
                             f"pools: {', '.join(sorted(known_pools))}"))
        if route.rate_limit is not None and route.rate_limit not in known_policies:
            problems.append((("routes", index, "rate_limit"),
                             f"unknown policy {route.rate_limit!r}; "
                             f"policies: {', '.join(sorted(known_policies))}"))
        if route.strip_prefix and route.match.path_prefix is None:
            problems.append((("routes", index, "strip_prefix"), "needs match.path_prefix"))
    if not config.balancer.backends and not routes:
        problems.append((("balancer", "backends"), "at least one backend is required"))
    if problems:
        raise checks.Invalid(problems)
    return attrs.evolve(
        config,
        pools=tuple(PoolConfig(pool_name, *pool) for pool_name, pool in pools),
        routes=routes,
        rate_limit=attrs.evolve(config.rate_limit, policies=policies))


def _policy(config: Config) -> checks.Check:
    from equalizer.config.rules import validate_capacity, validate_refill_rate
    return checks.record(PolicyConfig(config.rate_limit.key, config.rate_limit.default), {
        "key": checks.client_key("header"),
        "default": checks.optional(checks.record(config.rate_limit.default or
                                                 PolicyConfig().default, {
            "capacity": validate_capacity,
            "refill_rate": validate_refill_rate,
        })),
    })


def _routes(value: object) -> tuple[RouteConfig, ...]:
    if value is None:
        return ()
    return checks.list_of(_route)(value)
