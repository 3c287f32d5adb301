"""Reading admin request input: JSON bodies, their fields, and query integers.

Every value a route accepts is checked here, completely, before the route
changes anything; the bounds come from the rules the configuration uses.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from twisted.web.iweb import IRequest

from equalizer.admin.errors import bad_request
from equalizer.config.checks import validate_backend_url, validate_weight
from equalizer.config.model import MAX_BACKEND_REQUESTS, BackendConfig
from equalizer.config.rules import MAX_CAPACITY, MAX_REFILL_RATE, validate_refill_rate

if TYPE_CHECKING:
    from equalizer.config.model import BucketPolicy

MAX_QUERY_DIGITS = 100
"""Longest number a query parameter may spell; longer ones are refused unconverted."""


def read_json_object(request: IRequest) -> dict[str, Any]:
    """The request body (bounded by BoundedRequest) as a JSON object, or 400."""
    raw = request.content.read()
    try:
        body = json.loads(raw, object_pairs_hook=unique_keys)
    except DuplicateKey as error:
        raise bad_request(f"body: duplicate key {error.key[:100]!r}") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise bad_request(f"body: invalid JSON: {error}") from None
    except RecursionError:
        raise bad_request("body: invalid JSON: nested too deeply") from None
    if not isinstance(body, dict):
        raise bad_request("body: must be a JSON object")
    return body


class DuplicateKey(ValueError):
    """A JSON object names the same key twice."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object as a dict, refusing a key given twice (at any depth).

    Python's json keeps the last of them silently, other parsers the first: a body
    two readers understand differently is refused instead.
    """
    body = dict(pairs)
    if len(body) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKey(key)
            seen.add(key)
    return body


# -- the bodies of the routes ------------------------------------------------------------

def backend_create(body: dict[str, Any]) -> BackendConfig:
    """``POST /backends``: the URL (required), weight (default 1), max_requests (default 0,
    no limit) and backup (default false)."""
    check_fields(body, {"url", "weight", "max_requests", "backup"})
    if "url" not in body:
        raise bad_request("url: required")
    try:
        url = validate_backend_url(body["url"])
    except ValueError as error:
        raise bad_request(f"url: {error}") from None
    return BackendConfig(
        url, weight_field(body) if "weight" in body else 1,
        integer_field(body, "max_requests", 0, MAX_BACKEND_REQUESTS)
        if "max_requests" in body else 0,
        boolean_field(body, "backup", False))


def backend_change(body: dict[str, Any], backend: BackendConfig,
                   enabled: bool) -> tuple[BackendConfig, bool]:
    """``PUT /backends/ID``: the new weight, max_requests, backup and enabled flag, each
    defaulting to the current one."""
    check_fields(body, {"weight", "enabled", "max_requests", "backup"})
    changed = BackendConfig(
        backend.url, weight_field(body) if "weight" in body else backend.weight,
        integer_field(body, "max_requests", 0, MAX_BACKEND_REQUESTS)
        if "max_requests" in body else backend.max_requests,
        boolean_field(body, "backup", backend.backup))
    return changed, boolean_field(body, "enabled", enabled)


def boolean_field(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise bad_request(f"{name}: must be true or false")
    return value


def bucket_create(body: dict[str, Any],
                  default: BucketPolicy | None) -> tuple[str, int, float, float]:
    """``POST /buckets``: client id, capacity, tokens (default full), refill rate (default:
    the configured default policy's)."""
    check_fields(body, {"client_id", "capacity", "tokens", "refill_rate"})
    client_id = body.get("client_id")
    if not isinstance(client_id, str) or not client_id:
        raise bad_request("client_id: must be a non-empty string")
    if "capacity" not in body:
        raise bad_request("capacity: required")
    capacity = integer_field(body, "capacity", 1, MAX_CAPACITY)
    tokens = number_field(body, "tokens", 0, capacity) if "tokens" in body else capacity
    if "refill_rate" in body:
        refill_rate = refill_rate_field(body)
    elif default is not None:
        refill_rate = default.refill_rate
    else:
        raise bad_request("refill_rate: required (no default bucket policy is configured)")
    return client_id, capacity, tokens, refill_rate


def bucket_changes(body: dict[str, Any]) -> dict[str, Any]:
    """``PUT /buckets/ID``: the fields to change, as keyword arguments of the store's update."""
    check_fields(body, {"capacity", "tokens", "refill_rate"})
    changes: dict[str, Any] = {}
    if "capacity" in body:
        changes["capacity"] = integer_field(body, "capacity", 1, MAX_CAPACITY)
    if "tokens" in body:
        changes["tokens"] = number_field(body, "tokens", 0, changes.get("capacity", MAX_CAPACITY))
    if "refill_rate" in body:
        changes["refill_rate"] = refill_rate_field(body)
    return changes


# -- fields ------------------------------------------------------------------------------

def check_fields(body: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        expected = ", ".join(sorted(allowed))
        raise bad_request(f"{unknown[0]}: unknown field; expected one of {expected}")


def weight_field(body: dict[str, Any]) -> int:
    try:
        return validate_weight(body["weight"])
    except ValueError as error:
        raise bad_request(f"weight: {error}") from None


def integer_field(body: dict[str, Any], name: str, minimum: int,
                  maximum: int | None = None) -> int:
    value = body[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"{name}: must be an integer")
    if value < minimum or (maximum is not None and value > maximum):
        raise bad_request(f"{name}: must be {describe_range(minimum, maximum)}, got {value}")
    return value


def number_field(body: dict[str, Any], name: str, minimum: float,
                 maximum: float | None = None) -> float:
    value = body[name]
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value \
            or value in (float("inf"), float("-inf")):
        raise bad_request(f"{name}: must be a number")
    if value < minimum or (maximum is not None and value > maximum):
        raise bad_request(f"{name}: must be {describe_range(minimum, maximum)}, got {value}")
    return float(value)


def refill_rate_field(body: dict[str, Any]) -> float:
    """``refill_rate`` within the bounds every store can compute with (equalizer.config)."""
    value = number_field(body, "refill_rate", 0, MAX_REFILL_RATE)
    try:
        return validate_refill_rate(value)
    except ValueError as error:
        raise bad_request(f"refill_rate: {error}") from None


def describe_range(minimum: float, maximum: float | None) -> str:
    return f"at least {minimum}" if maximum is None else f"between {minimum} and {maximum}"


def query_integer(request: IRequest, name: str, default: int, minimum: int,
                  maximum: int | None) -> int:
    values = request.args.get(name.encode())
    if not values:
        return default
    raw = values[0].decode("utf-8", "replace")
    # ASCII digits only: str.isdigit() also accepts "²" (which int() refuses) and "٣".
    if not (raw.isascii() and raw.isdigit()):
        raise bad_request(f"{name}: must be an integer, got {raw[:40]!r}")
    digits = raw.lstrip("0") or "0"
    if len(digits) > MAX_QUERY_DIGITS:  # int() refuses past 4300 digits
        raise bad_request(f"{name}: too large ({len(digits)} digits)")
    value = int(digits)
    if value < minimum or (maximum is not None and value > maximum):
        raise bad_request(f"{name}: must be {describe_range(minimum, maximum)}, got {value}")
    return value
