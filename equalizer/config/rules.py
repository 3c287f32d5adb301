"""The value rules of buckets and client ids, defined once.

Configuration (``rate_limit.default``), the admin API's validation, its OpenAPI
document and both bucket stores read their bounds here, so a value one of them
accepts is one every other can hold. The database's CHECK constraints (the
migrations under ``equalizer/buckets/postgres/schema``) cannot import Python: a
unit test holds their numbers to these.

Bounds are what every store can compute with: a refill ``tokens + rate * elapsed``
stays a finite float that neither overflows nor underflows, in SQL and in Python.
"""

from __future__ import annotations

import hashlib
import re

MAX_CAPACITY = 2**31 - 1
"""Largest bucket capacity (and token count): the PostgreSQL ``integer`` column."""

MIN_REFILL_RATE = 1e-6
"""Slowest refill other than 0: a token in 11.6 days. Slower rates are 0 in practice,
and below about 5e-318 tokens/s a refill over a microsecond underflows in SQL."""

MAX_REFILL_RATE = 1e9
"""Fastest refill: rate times the longest span PostgreSQL times can hold (9.3e12 s)
stays far from overflow, and it refills any bucket within about 2 s."""

MAX_CLIENT_ID_LENGTH = 512
"""Longest client id, in characters, a store accepts (an index entry must stay small)."""

DIGEST_PREFIX = "sha256:"
"""What begins the key of a value no bucket can have as it is (:func:`key_digest`)."""


def _number(value: object) -> int | float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a number, got {describe(value)}")
    return value


def describe(value: object) -> str:
    """Name a YAML (or JSON) value's type for an error message, in YAML's words."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int | float):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__} ({value!r})"


def validate_capacity(value: object) -> int:
    """A bucket capacity: an integer from 1 to MAX_CAPACITY (what every store can hold)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {describe(value)}")
    if not 1 <= value <= MAX_CAPACITY:
        raise ValueError(f"must be between 1 and {MAX_CAPACITY}, got {value}")
    return value


def validate_tokens(value: object) -> float:
    """A token count from 0 to MAX_CAPACITY (the bucket's own capacity is checked apart)."""
    if not 0 <= _number(value) <= MAX_CAPACITY:  # NaN, infinities and huge integers fail too
        raise ValueError(f"must be between 0 and {MAX_CAPACITY}, got {value!r}")
    return float(value)


def validate_refill_rate(value: object) -> float:
    """A refill rate, 0 (never refills) or MIN_REFILL_RATE..MAX_REFILL_RATE tokens a second,
    so that every refill, in SQL and in Python, stays a finite float that does not underflow."""
    if not (_number(value) == 0 or MIN_REFILL_RATE <= value <= MAX_REFILL_RATE):
        raise ValueError(f"must be 0 or from {MIN_REFILL_RATE:.6f} to {MAX_REFILL_RATE:.0f} "
                         f"tokens a second, got {value!r}")
    return float(value)


_CONTROL = re.compile("[\x00-\x1f\x7f]")


def client_id_problem(client_id: object) -> str | None:
    """Why no bucket can have this client id, or None.

    Control characters could not travel in a URL path the admin API routes (LF,
    for one), nor '.' and '..' (URL paths resolve them away), and text that is
    not UTF-8 (lone surrogates) PostgreSQL cannot hold.
    """
    if not isinstance(client_id, str) or not client_id:
        return "must be a non-empty string"
    if len(client_id) > MAX_CLIENT_ID_LENGTH:
        return f"must be at most {MAX_CLIENT_ID_LENGTH} characters"
    if client_id in (".", ".."):
        return "must not be '.' or '..' (no URL path can name it)"
    if _CONTROL.search(client_id):
        return "must not contain control characters (such as NUL, TAB, CR, LF or DEL)"
    if not client_id.isascii():
        try:
            client_id.encode("utf-8")
        except UnicodeEncodeError:
            return "must be valid Unicode text (no lone surrogates)"
    return None


def key_digest(value: bytes) -> str:
    """The bucket key of a value no bucket can have as it is (too long, not text):
    ``sha256:`` and the hex digest of its bytes, so it is limited like any other.

    The one digest scheme: the proxy applies it to an overlong header or cookie's
    bytes, the stores to the UTF-8 bytes of a client id they cannot hold; for the
    same value both give the same key.
    """
    return DIGEST_PREFIX + hashlib.sha256(value).hexdigest()
