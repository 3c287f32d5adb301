"""The bucket admin API (SPEC 6) over real HTTP, on the memory store and on real PostgreSQL.

Every test runs twice (``store_kind``): against a balancer whose buckets live
in memory, and against one whose buckets live in the session's PostgreSQL
database, starting from an empty table. The balancer's default policy is
``{capacity: 100, refill_rate: 7.5}``, so a bucket created without a refill
rate gets 7.5. Buckets meant to hold their token count still are made with
``refill_rate: 0``. Every refused request is followed by a look at the state,
because a refused request must change nothing.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import pytest
import pytest_twisted

from tests.integration.buckets_support import (
    Admin,
    bucket_path,
    store_ready,
    store_section,
)
from tests.integration.harness import equalizer_config, sleep

pytestmark = pytest.mark.usefixtures("no_logged_errors")

FIELDS = {"policy", "client_id", "capacity", "tokens", "refill_rate", "created_at", "updated_at"}
DEFAULT_REFILL = 7.5
CLIENT_IDS = ["plain", "a b/c", "zürich/ß?x=1&y#frag", "日本語 %2F 🙂", "127.0.0.1"]
DEEP_ARRAY = b"[" * 60000 + b"]" * 5000
"""Nested past the JSON parser's recursion limit, and well under the 64 KiB body limit."""
DEEP_OBJECT = b'{"a":' * 12000


async def start_admin(equalizer, backends, http, store_kind: str, dsn: str | None,
                      default: Any) -> Admin:
    backend = backends("b1")
    document = equalizer_config([backend.url], rate_limit={
        "enabled": True, "default": default, **store_section(store_kind, dsn)})
    balancer = await store_ready(await equalizer(document), dsn)
    return Admin(http, balancer.admin_url)


@pytest_twisted.async_yield_fixture()
async def admin(equalizer, backends, http, store_kind, dsn) -> AsyncIterator[Admin]:
    """The admin API of a started balancer with no buckets yet."""
    yield await start_admin(equalizer, backends, http, store_kind, dsn,
                            {"capacity": 100, "refill_rate": DEFAULT_REFILL})


def assert_bucket_shape(bucket: dict[str, Any]) -> None:
    assert set(bucket) == FIELDS
    assert isinstance(bucket["client_id"], str)
    assert isinstance(bucket["capacity"], int) and not isinstance(bucket["capacity"], bool)
    assert isinstance(bucket["tokens"], int | float)
    assert isinstance(bucket["refill_rate"], int | float)
    for stamp in ("created_at", "updated_at"):
        moment = datetime.fromisoformat(bucket[stamp].replace("Z", "+00:00"))
        assert moment.utcoffset() is not None and moment.utcoffset().total_seconds() == 0
        assert abs(moment.timestamp() - time.time()) < 60


def values(bucket: dict[str, Any]) -> tuple[Any, ...]:
    """What a refused request must leave alone: every field of the bucket."""
    return tuple(bucket[name] for name in sorted(FIELDS))


# -- POST /buckets --------------------------------------------------------------------


@pytest.mark.parametrize("client_id", CLIENT_IDS)
@pytest_twisted.ensureDeferred
async def test_create_answers_201_with_the_bucket_and_its_location(admin, client_id):
    """POST /buckets answers 201 with the bucket and a Location that percent-encodes the
    client id, and that Location serves the same bucket."""
    reply = await admin("POST", "/buckets", {"client_id": client_id, "capacity": 10,
                                             "tokens": 4, "refill_rate": 0})
    assert reply.status == 201, reply.body
    assert reply.header("Content-Type") == ["application/json"]
    bucket = reply.json
    assert_bucket_shape(bucket)
    assert (bucket["client_id"], bucket["capacity"], bucket["tokens"], bucket["refill_rate"]) \
        == (client_id, 10, 4, 0)
    assert bucket["created_at"] == bucket["updated_at"]
    location = reply.header("Location")
    assert location == [bucket_path(client_id)]
    assert location[0].isascii() and "/" not in location[0][len("/buckets/"):]
    fetched = await admin("GET", location[0])
    assert fetched.status == 200, fetched.body
    assert fetched.json == bucket
    listed = await admin.all()
    assert listed["items"] == [bucket] and listed["total"] == 1


@pytest_twisted.ensureDeferred
async def test_create_defaults_tokens_to_capacity_and_refill_rate_to_the_config(admin):
    """A bucket created with only client_id and capacity is full and refills at the default
    policy's rate."""
    bucket = await admin.create("defaults", 12)
    assert (bucket["capacity"], bucket["tokens"], bucket["refill_rate"]) \
        == (12, 12, DEFAULT_REFILL)
    assert (await admin.bucket("defaults")).json["tokens"] == 12


@pytest_twisted.ensureDeferred
async def test_create_without_refill_rate_and_without_default_policy_is_refused(
        equalizer, backends, http, store_kind, dsn):
    """With ``default: null`` there is no refill rate to fall back on: leaving it out is a
    400 naming refill_rate, and nothing is created."""
    admin = await start_admin(equalizer, backends, http, store_kind, dsn, None)
    reply = await admin("POST", "/buckets", {"client_id": "x", "capacity": 3})
    assert reply.status == 400
    assert reply.error["code"] == "bad_request"
    assert reply.error["message"].startswith("refill_rate")
    assert (await admin.bucket("x")).status == 404
    assert (await admin.create("x", 3, refill_rate=1))["refill_rate"] == 1


@pytest_twisted.ensureDeferred
async def test_create_an_existing_bucket_is_a_conflict_that_changes_nothing(admin):
    """A second POST for the same client id answers 409 and leaves the first bucket as it
    was."""
    first = await admin.create("dup", 10, tokens=3, refill_rate=0)
    reply = await admin("POST", "/buckets", {"client_id": "dup", "capacity": 99, "tokens": 99,
                                             "refill_rate": 5})
    assert reply.status == 409
    assert reply.error["code"] == "conflict"
    assert "dup" in reply.error["message"]
    assert (await admin.bucket("dup")).json == first
    assert (await admin.all())["total"] == 1


def body(**fields: Any) -> dict[str, Any]:
    """A valid creation body for client ``new``, ``fields`` changed (``_LEAVE_OUT``: dropped)."""
    base = {"client_id": "new", "capacity": 10, "tokens": 5, "refill_rate": 1}
    base.update(fields)
    return {name: value for name, value in base.items() if value is not _LEAVE_OUT}


_LEAVE_OUT = object()

INVALID_CREATIONS = [
    pytest.param({"raw": b"{"}, "body", id="invalid-json"),
    pytest.param({"raw": b""}, "body", id="empty-body"),
    pytest.param({"raw": b'{"client_id": "new", "capacity": 5,}'}, "body", id="trailing-comma"),
    pytest.param({"raw": b"\xff\xfe{}"}, "body", id="not-utf8"),
    pytest.param({"raw": DEEP_ARRAY}, "body", id="deeply-nested-array"),
    pytest.param({"raw": DEEP_OBJECT}, "body", id="deeply-nested-object"),
    pytest.param({"json": []}, "body", id="array-body"),
    pytest.param({"json": "new"}, "body", id="string-body"),
    pytest.param({"json": 10}, "body", id="number-body"),
    pytest.param({"json": None}, "body", id="null-body"),
    pytest.param({"json": body(burst=5)}, "burst", id="unknown-field"),
    pytest.param({"json": body(created_at="2024-01-01T00:00:00Z")}, "created_at",
                 id="read-only-field"),
    pytest.param({"json": body(client_id=_LEAVE_OUT)}, "client_id", id="missing-client_id"),
    pytest.param({"json": body(client_id="")}, "client_id", id="empty-client_id"),
    pytest.param({"json": body(client_id=7)}, "client_id", id="number-client_id"),
    pytest.param({"json": body(client_id=None)}, "client_id", id="null-client_id"),
    pytest.param({"json": body(client_id=["new"])}, "client_id", id="list-client_id"),
    pytest.param({"json": body(client_id="x" * 513)}, "client_id", id="long-client_id"),
    pytest.param({"json": body(client_id="a\x00b")}, "client_id", id="nul-client_id"),
    pytest.param({"json": body(capacity=_LEAVE_OUT, tokens=_LEAVE_OUT)}, "capacity",
                 id="missing-capacity"),
    pytest.param({"json": body(capacity=0, tokens=0)}, "capacity", id="capacity-0"),
    pytest.param({"json": body(capacity=-3, tokens=0)}, "capacity", id="negative-capacity"),
    pytest.param({"json": body(capacity=True, tokens=1)}, "capacity", id="boolean-capacity"),
    pytest.param({"json": body(capacity="10")}, "capacity", id="string-capacity"),
    pytest.param({"json": body(capacity=10.5)}, "capacity", id="fractional-capacity"),
    pytest.param({"json": body(capacity=None)}, "capacity", id="null-capacity"),
    pytest.param({"json": body(capacity=2**31)}, "capacity", id="huge-capacity"),
    pytest.param({"json": body(tokens=-1)}, "tokens", id="negative-tokens"),
    pytest.param({"json": body(tokens=10.5)}, "tokens", id="tokens-over-capacity"),
    pytest.param({"json": body(tokens=True)}, "tokens", id="boolean-tokens"),
    pytest.param({"json": body(tokens="5")}, "tokens", id="string-tokens"),
    pytest.param({"json": body(tokens=None)}, "tokens", id="null-tokens"),
    pytest.param({"json": body(refill_rate=-0.5)}, "refill_rate", id="negative-refill_rate"),
    pytest.param({"json": body(refill_rate=False)}, "refill_rate", id="boolean-refill_rate"),
    pytest.param({"json": body(refill_rate="1/s")}, "refill_rate", id="string-refill_rate"),
    pytest.param({"json": body(refill_rate=None)}, "refill_rate", id="null-refill_rate"),
    pytest.param({"raw": b'{"client_id": "new", "capacity": 5, "refill_rate": NaN}'},
                 "refill_rate", id="nan-refill_rate"),
    pytest.param({"raw": b'{"client_id": "new", "capacity": 5, "tokens": Infinity}'},
                 "tokens", id="infinite-tokens"),
]


@pytest.mark.parametrize(("request_body", "field"), INVALID_CREATIONS)
@pytest_twisted.ensureDeferred
async def test_invalid_creation_is_a_400_naming_the_field_and_changes_nothing(
        admin, request_body, field):
    """An invalid POST /buckets answers 400 ``bad_request`` whose message names the field,
    and no bucket appears or changes."""
    seed = await admin.create("seed", 10, tokens=2, refill_rate=0)
    if "raw" in request_body:
        reply = await admin("POST", "/buckets", raw=request_body["raw"])
    else:
        reply = await admin("POST", "/buckets", request_body["json"])
    assert reply.status == 400, reply.body
    assert reply.header("Content-Type") == ["application/json"]
    assert reply.error["code"] == "bad_request"
    assert reply.error["message"].startswith(f"{field}:"), reply.error["message"]
    listed = await admin.all()
    assert listed["total"] == 1
    assert [values(item) for item in listed["items"]] == [values(seed)]
    assert (await admin.bucket("new")).status == 404


@pytest_twisted.ensureDeferred
async def test_deeply_nested_json_is_a_400_saying_invalid_json(admin):
    """A body nested too deeply for the parser is refused like any invalid JSON."""
    reply = await admin("POST", "/buckets", raw=DEEP_ARRAY)
    assert (reply.status, reply.header("Content-Type")) == (400, ["application/json"])
    assert reply.error == {"code": "bad_request",
                           "message": "body: invalid JSON: nested too deeply"}


def assert_floats(bucket: dict[str, Any]) -> None:
    assert type(bucket["tokens"]) is float and type(bucket["refill_rate"]) is float, bucket


@pytest_twisted.ensureDeferred
async def test_tokens_and_refill_rate_are_always_json_floats(admin):
    """Every bucket answer (create, get, update, list) writes tokens and refill_rate as JSON
    floats (``10.0``), even when given as whole numbers or clamped to the capacity."""
    created = await admin("POST", "/buckets", {"client_id": "whole", "capacity": 10,
                                               "refill_rate": 1})
    assert b'"tokens": 10.0' in created.body and b'"refill_rate": 1.0' in created.body
    await sleep(0.01)  # a full bucket refilled past its capacity is clamped to it
    got = await admin.bucket("whole")
    assert b'"tokens": 10.0' in got.body, got.body
    updated = await admin("PUT", bucket_path("whole"), {"tokens": 3, "refill_rate": 2})
    listed = await admin.all()
    for bucket in (created.json, got.json, updated.json, *listed["items"]):
        assert_floats(bucket)
    assert updated.json["refill_rate"] == 2.0
    assert updated.json["tokens"] == pytest.approx(3, abs=0.1)


# -- GET /buckets/{client_id} -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_get_answers_the_bucket_with_tokens_as_of_now(admin):
    """GET /buckets/{id} reports the tokens refilled up to the moment of the request, without
    changing the bucket's stored state."""
    created_at = time.monotonic()
    bucket = await admin.create("refilling", 100, tokens=0, refill_rate=20)
    await sleep(0.3)
    first = (await admin.bucket("refilling")).json
    elapsed = time.monotonic() - created_at
    assert 20 * 0.3 * 0.9 <= first["tokens"] <= 20 * elapsed + 0.5, (first, elapsed)
    assert (first["capacity"], first["refill_rate"], first["created_at"], first["updated_at"]) \
        == (100, 20, bucket["created_at"], bucket["updated_at"])
    await sleep(0.1)
    second = (await admin.bucket("refilling")).json
    assert second["tokens"] > first["tokens"]
    assert second["updated_at"] == bucket["updated_at"]


@pytest_twisted.ensureDeferred
async def test_get_never_goes_above_capacity(admin):
    """A bucket that refills fast is reported at its capacity, never above it."""
    await admin.create("full", 5, tokens=4, refill_rate=1000)
    await sleep(0.05)
    assert (await admin.bucket("full")).json["tokens"] == 5


@pytest.mark.parametrize("client_id", ["missing", "a b/c", "ünï"])
@pytest_twisted.ensureDeferred
async def test_an_unknown_bucket_is_404_for_get_put_and_delete(admin, client_id):
    """GET, PUT and DELETE of a client id without a bucket answer 404 ``not_found``, and PUT
    creates nothing."""
    await admin.create("other", 3)
    for method, payload in (("GET", None), ("PUT", {"tokens": 1}), ("DELETE", None)):
        if payload is None:
            reply = await admin(method, bucket_path(client_id))
        else:
            reply = await admin(method, bucket_path(client_id), payload)
        assert reply.status == 404, (method, reply.body)
        assert reply.error["code"] == "not_found"
    assert (await admin.all())["total"] == 1


# -- PUT /buckets/{client_id} -------------------------------------------------------------


@pytest.mark.parametrize(("change", "expected"), [
    pytest.param({"capacity": 20}, (20, 4, 0), id="capacity-raised"),
    pytest.param({"capacity": 2}, (2, 2, 0), id="capacity-lowered-clamps-tokens"),
    pytest.param({"capacity": 4}, (4, 4, 0), id="capacity-down-to-tokens"),
    pytest.param({"tokens": 9.5}, (10, 9.5, 0), id="tokens"),
    pytest.param({"tokens": 0}, (10, 0, 0), id="tokens-zero"),
    pytest.param({"tokens": 10}, (10, 10, 0), id="tokens-to-capacity"),
    pytest.param({"refill_rate": 0.25}, (10, 4, 0.25), id="refill_rate"),
    pytest.param({"capacity": 50, "tokens": 30, "refill_rate": 0}, (50, 30, 0), id="all"),
    pytest.param({"capacity": 3, "tokens": 1}, (3, 1, 0), id="capacity-and-tokens"),
    pytest.param({}, (10, 4, 0), id="nothing"),
])
@pytest.mark.parametrize("client_id", ["edit", "a b/c"])
@pytest_twisted.ensureDeferred
async def test_update_changes_only_the_given_fields(admin, client_id, change, expected):
    """PUT /buckets/{id} changes the fields it names, leaves the others, and lowering the
    capacity below the tokens clamps them to it."""
    bucket = await admin.create(client_id, 10, tokens=4, refill_rate=0)
    reply = await admin("PUT", bucket_path(client_id), change)
    assert reply.status == 200, reply.body
    updated = reply.json
    assert_bucket_shape(updated)
    assert updated["client_id"] == client_id
    assert (updated["capacity"], pytest.approx(updated["tokens"], abs=1e-3),
            updated["refill_rate"]) == expected
    assert updated["created_at"] == bucket["created_at"]
    assert updated["updated_at"] >= bucket["updated_at"]
    fetched = (await admin.bucket(client_id)).json
    assert (fetched["capacity"], pytest.approx(fetched["tokens"], abs=1e-2),
            fetched["refill_rate"]) == expected


@pytest_twisted.ensureDeferred
async def test_update_settles_the_refill_under_the_old_rate(admin):
    """Changing the refill rate first credits the time elapsed at the old rate, then
    refills at the new one."""
    await admin.create("settle", 100, tokens=0, refill_rate=50)
    await sleep(0.2)
    updated = (await admin("PUT", bucket_path("settle"), {"refill_rate": 0})).json
    assert 50 * 0.2 * 0.9 <= updated["tokens"] <= 100
    await sleep(0.1)
    assert (await admin.bucket("settle")).json["tokens"] == pytest.approx(updated["tokens"])


INVALID_UPDATES = [
    pytest.param({"raw": b"{"}, "body", id="invalid-json"),
    pytest.param({"raw": b""}, "body", id="empty-body"),
    pytest.param({"raw": DEEP_ARRAY}, "body", id="deeply-nested-array"),
    pytest.param({"json": [1]}, "body", id="array-body"),
    pytest.param({"json": None}, "body", id="null-body"),
    pytest.param({"json": {"client_id": "other"}}, "client_id", id="client_id-not-changeable"),
    pytest.param({"json": {"capacity": 5, "burst": 1}}, "burst", id="unknown-field"),
    pytest.param({"json": {"capacity": 0}}, "capacity", id="capacity-0"),
    pytest.param({"json": {"capacity": True}}, "capacity", id="boolean-capacity"),
    pytest.param({"json": {"capacity": 7.5}}, "capacity", id="fractional-capacity"),
    pytest.param({"json": {"capacity": "7"}}, "capacity", id="string-capacity"),
    pytest.param({"json": {"capacity": None}}, "capacity", id="null-capacity"),
    pytest.param({"json": {"tokens": -0.5}}, "tokens", id="negative-tokens"),
    pytest.param({"json": {"tokens": 11}}, "tokens", id="tokens-over-stored-capacity"),
    pytest.param({"json": {"capacity": 5, "tokens": 6}}, "tokens", id="tokens-over-new-capacity"),
    pytest.param({"json": {"tokens": True}}, "tokens", id="boolean-tokens"),
    pytest.param({"json": {"tokens": "3"}}, "tokens", id="string-tokens"),
    pytest.param({"json": {"refill_rate": -1}}, "refill_rate", id="negative-refill_rate"),
    pytest.param({"json": {"refill_rate": True}}, "refill_rate", id="boolean-refill_rate"),
    pytest.param({"json": {"refill_rate": {}}}, "refill_rate", id="object-refill_rate"),
    pytest.param({"json": {"capacity": 20, "refill_rate": -1}}, "refill_rate",
                 id="valid-capacity-with-invalid-refill_rate"),
]


@pytest.mark.parametrize(("request_body", "field"), INVALID_UPDATES)
@pytest_twisted.ensureDeferred
async def test_invalid_update_is_a_400_naming_the_field_and_changes_nothing(
        admin, request_body, field):
    """An invalid PUT /buckets/{id} answers 400 ``bad_request`` whose message names the field,
    and the bucket keeps every value, timestamps included."""
    bucket = await admin.create("kept", 10, tokens=4, refill_rate=0)
    path = bucket_path("kept")
    if "raw" in request_body:
        reply = await admin("PUT", path, raw=request_body["raw"])
    else:
        reply = await admin("PUT", path, request_body["json"])
    assert reply.status == 400, reply.body
    assert reply.error["code"] == "bad_request"
    assert reply.error["message"].startswith(f"{field}:"), reply.error["message"]
    assert values((await admin.bucket("kept")).json) == values(bucket)
    assert (await admin.all())["total"] == 1


# -- DELETE /buckets/{client_id} ------------------------------------------------------------


@pytest.mark.parametrize("client_id", CLIENT_IDS)
@pytest_twisted.ensureDeferred
async def test_delete_answers_204_then_404(admin, client_id):
    """DELETE removes the bucket (204, empty body), a second DELETE is 404, and the client id
    can be created afresh."""
    await admin.create(client_id, 5, tokens=1, refill_rate=0)
    await admin.create("neighbour", 5)
    reply = await admin("DELETE", bucket_path(client_id))
    assert reply.status == 204
    assert reply.body == b""
    assert (await admin.bucket(client_id)).status == 404
    again = await admin("DELETE", bucket_path(client_id))
    assert again.status == 404
    assert again.error["code"] == "not_found"
    listed = await admin.all()
    assert [item["client_id"] for item in listed["items"]] == ["neighbour"]
    assert (await admin.create(client_id, 7))["tokens"] == 7


# -- GET /buckets -------------------------------------------------------------------------

# Code-point order: upper case before lower case, ASCII before the rest.
ORDERED_IDS = ["10.0.0.2", "9.9.9.9", "A", "Z", "a", "a b/c", "b", "zz", "ä", "日本"]


@pytest_twisted.async_yield_fixture()
async def listed(admin) -> AsyncIterator[Admin]:
    """The admin API with the ORDERED_IDS buckets created in a scrambled order."""
    for index in (4, 9, 0, 7, 2, 5, 8, 1, 6, 3):
        await admin.create(ORDERED_IDS[index], index + 1, refill_rate=0)
    yield admin


@pytest_twisted.ensureDeferred
async def test_list_is_ordered_by_client_id_with_the_total(listed):
    """GET /buckets lists every bucket in client-id (code point) order with the total and the
    default page (limit 50, offset 0)."""
    reply = await listed("GET", "/buckets")
    assert reply.status == 200
    page = reply.json
    assert set(page) == {"items", "total", "limit", "offset"}
    assert (page["total"], page["limit"], page["offset"]) == (len(ORDERED_IDS), 50, 0)
    assert [item["client_id"] for item in page["items"]] == ORDERED_IDS
    for item in page["items"]:
        assert_bucket_shape(item)
        assert item["capacity"] == item["tokens"]


@pytest.mark.parametrize(("query", "first", "count", "limit", "offset"), [
    pytest.param("limit=1", 0, 1, 1, 0, id="limit-1"),
    pytest.param("limit=1&offset=3", 3, 1, 1, 3, id="limit-1-offset-3"),
    pytest.param("limit=3&offset=8", 8, 2, 3, 8, id="last-partial-page"),
    pytest.param("offset=9", 9, 1, 50, 9, id="last-item"),
    pytest.param("offset=10", None, 0, 50, 10, id="offset-at-the-end"),
    pytest.param("offset=1000000&limit=5", None, 0, 5, 1000000, id="offset-past-the-end"),
    pytest.param("limit=1000", 0, 10, 1000, 0, id="limit-1000"),
    pytest.param("limit=0010&offset=00", 0, 10, 10, 0, id="leading-zeros"),
    pytest.param("offset=99999999999999999999", None, 0, 50, 99999999999999999999,
                 id="offset-beyond-bigint"),
])
@pytest_twisted.ensureDeferred
async def test_list_pages(listed, query, first, count, limit, offset):
    """Pages of GET /buckets hold the right slice, echo limit and offset, and always report
    the full total, even past the end."""
    reply = await listed("GET", f"/buckets?{query}")
    assert reply.status == 200, reply.body
    page = reply.json
    assert (page["total"], page["limit"], page["offset"]) == (len(ORDERED_IDS), limit, offset)
    expected = [] if first is None else ORDERED_IDS[first:first + count]
    assert [item["client_id"] for item in page["items"]] == expected


@pytest_twisted.ensureDeferred
async def test_list_pages_walk_every_bucket_once(listed):
    """Walking GET /buckets with limit=3 visits every bucket once, in order."""
    seen: list[str] = []
    offset = 0
    while True:
        page = (await listed("GET", f"/buckets?limit=3&offset={offset}")).json
        if not page["items"]:
            break
        seen += [item["client_id"] for item in page["items"]]
        offset += 3
    assert seen == ORDERED_IDS


@pytest.mark.parametrize(("query", "field"), [
    pytest.param("limit=0", "limit", id="limit-0"),
    pytest.param("limit=1001", "limit", id="limit-1001"),
    pytest.param("limit=-1", "limit", id="negative-limit"),
    pytest.param("limit=1.5", "limit", id="fractional-limit"),
    pytest.param("limit=ten", "limit", id="word-limit"),
    pytest.param("limit=", "limit", id="empty-limit"),
    pytest.param("limit=%201", "limit", id="space-limit"),
    pytest.param("limit=%D9%A3", "limit", id="arabic-digit-limit"),
    pytest.param("limit=%C2%B2", "limit", id="superscript-limit"),
    pytest.param("limit=" + "9" * 5000, "limit", id="5000-digit-limit"),
    pytest.param("offset=" + "9" * 5000, "offset", id="5000-digit-offset"),
    pytest.param("offset=-1", "offset", id="negative-offset"),
    pytest.param("offset=1.0", "offset", id="fractional-offset"),
    pytest.param("offset=abc", "offset", id="word-offset"),
    pytest.param("offset=", "offset", id="empty-offset"),
    pytest.param("limit=10&offset=-5", "offset", id="valid-limit-negative-offset"),
])
@pytest_twisted.ensureDeferred
async def test_list_refuses_out_of_range_paging(listed, query, field):
    """GET /buckets with a limit outside 1..1000 or an offset that is not a non-negative
    integer answers 400 naming the parameter, and the buckets stay as they were."""
    reply = await listed("GET", f"/buckets?{query}")
    assert reply.status == 400, reply.body
    assert reply.error["code"] == "bad_request"
    assert reply.error["message"].startswith(f"{field}:"), reply.error["message"]
    page = await listed.all()
    assert [item["client_id"] for item in page["items"]] == ORDERED_IDS


@pytest_twisted.ensureDeferred
async def test_list_of_no_buckets_is_empty(admin):
    """GET /buckets with no bucket at all answers an empty page and a zero total."""
    page = (await admin("GET", "/buckets")).json
    assert page == {"items": [], "total": 0, "limit": 50, "offset": 0}
