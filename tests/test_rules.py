"""The value rules (equalizer.config.rules): bounds, client ids, the key digest, and the
database's CHECK constraints holding the same numbers."""

from __future__ import annotations

import hashlib
import re

import pytest

from equalizer.buckets.interface import InvalidBucket, take_key
from equalizer.buckets.postgres.migrations import migrations
from equalizer.config.rules import (
    MAX_CAPACITY,
    MAX_CLIENT_ID_LENGTH,
    MAX_REFILL_RATE,
    MIN_REFILL_RATE,
    client_id_problem,
    describe,
    key_digest,
    validate_capacity,
    validate_refill_rate,
    validate_tokens,
)


def schema() -> str:
    """Every migration's SQL, in order (the later ones redefine constraints)."""
    return "\n".join(sql for _, _, sql in migrations())


def last_check(name: str) -> str:
    """The expression of the last definition of the CHECK constraint ``name``."""
    found = re.findall(rf"CONSTRAINT {name}\s+CHECK \((.*?)\)(?:,|\n|;)", schema(), re.S)
    assert found, f"no CHECK constraint {name} in the migrations"
    return " ".join(found[-1].split())


def test_client_id_check_is_the_rules_length() -> None:
    assert last_check("buckets_client_id_check") == (
        f"client_id <> '' AND length(client_id) <= {MAX_CLIENT_ID_LENGTH}")


def test_refill_rate_check_is_the_rules_bounds() -> None:
    low, high = re.fullmatch(
        r"refill_rate = 0 OR \(refill_rate >= (\S+) AND refill_rate <= (\S+)\)",
        last_check("buckets_refill_rate_check")).groups()
    assert (float(low), float(high)) == (MIN_REFILL_RATE, MAX_REFILL_RATE)


def test_capacity_check_and_column_hold_the_rules_bounds() -> None:
    """capacity > 0 in the CHECK; the upper bound is the ``integer`` column's (2^31 - 1)."""
    assert last_check("buckets_capacity_check") == "capacity > 0"
    assert re.search(r"\bcapacity\s+integer NOT NULL", schema())
    assert MAX_CAPACITY == 2**31 - 1
    assert last_check("buckets_tokens_check") == "tokens >= 0 AND tokens <= capacity"


@pytest.mark.parametrize("value", [1, MAX_CAPACITY])
def test_capacity_bounds_are_inclusive(value: int) -> None:
    assert validate_capacity(value) == value


@pytest.mark.parametrize("value", [0, MAX_CAPACITY + 1, True, 1.0, "1", None])
def test_capacity_outside_the_rules_is_refused(value: object) -> None:
    with pytest.raises(ValueError):
        validate_capacity(value)


@pytest.mark.parametrize("value", [0, 0.5, MAX_CAPACITY])
def test_tokens_bounds_are_inclusive(value: float) -> None:
    assert validate_tokens(value) == float(value)


@pytest.mark.parametrize("value", [-0.1, MAX_CAPACITY + 1, float("nan"), float("inf"), False])
def test_tokens_outside_the_rules_are_refused(value: object) -> None:
    with pytest.raises(ValueError):
        validate_tokens(value)


@pytest.mark.parametrize("value", [0, MIN_REFILL_RATE, 1, MAX_REFILL_RATE])
def test_refill_rate_bounds_are_inclusive(value: float) -> None:
    assert validate_refill_rate(value) == float(value)


@pytest.mark.parametrize("value", [MIN_REFILL_RATE / 2, MAX_REFILL_RATE * 2, -1, float("nan"),
                                   True, "1"])
def test_refill_rate_outside_the_rules_is_refused(value: object) -> None:
    with pytest.raises(ValueError):
        validate_refill_rate(value)


@pytest.mark.parametrize("client_id", ["a", "x" * MAX_CLIENT_ID_LENGTH, "é", "...", "a.b"])
def test_client_ids_a_bucket_can_have(client_id: str) -> None:
    assert client_id_problem(client_id) is None


@pytest.mark.parametrize(("client_id", "words"), [
    ("", "non-empty"),
    (None, "non-empty"),
    ("x" * (MAX_CLIENT_ID_LENGTH + 1), f"at most {MAX_CLIENT_ID_LENGTH}"),
    (".", "'.' or '..'"),
    ("..", "'.' or '..'"),
    ("a\nb", "control characters"),
    ("a\x7f", "control characters"),
    ("\ud800", "lone surrogates"),
])
def test_client_ids_no_bucket_can_have_say_why(client_id: object, words: str) -> None:
    problem = client_id_problem(client_id)
    assert problem is not None and words in problem


def test_key_digest_is_sha256_of_the_bytes() -> None:
    assert key_digest(b"abc") == "sha256:" + hashlib.sha256(b"abc").hexdigest()


def test_stores_and_proxy_digest_a_long_value_alike() -> None:
    """The store's digest of an overlong client id is the proxy's digest of its bytes."""
    text = "é" * MAX_CLIENT_ID_LENGTH + "x"
    assert take_key(text) == key_digest(text.encode("utf-8"))


def test_a_client_id_with_a_lone_surrogate_is_digested_not_refused() -> None:
    assert take_key("a\ud800") == key_digest("a\ud800".encode("utf-8", "surrogatepass"))


def test_an_empty_client_id_is_refused() -> None:
    with pytest.raises(InvalidBucket) as caught:
        take_key("")
    assert caught.value.field == "client_id"


@pytest.mark.parametrize(("value", "text"), [
    (None, "null"), (True, "a boolean (true)"), (2, "a number (2)"), ("x", "a string ('x')"),
    ([], "a list"), ({}, "a mapping"), (b"x", "a bytes (b'x')"),
])
def test_describe_names_a_value_in_yaml_words(value: object, text: str) -> None:
    assert describe(value) == text
