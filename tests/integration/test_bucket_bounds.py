"""Bucket values at and past their bounds, over real HTTP, on the memory store and PostgreSQL.

Client ids must be text a URL path can carry and PostgreSQL can store (no control
characters, valid UTF-8); numbers must stay computable in every refill (SPEC 6:
out-of-range values are 400 and change nothing). Rate-limit keys the proxy reads
from headers are not checked by anyone, so the store keys those it cannot hold by
their digest: they are limited like any other.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator

import pytest
import pytest_twisted

from equalizer.config.rules import MAX_CAPACITY, MAX_REFILL_RATE
from tests.integration.buckets_support import Admin, bucket_path, store_ready, store_section
from tests.integration.harness import equalizer_config, raw_request, sleep, status_of

pytestmark = pytest.mark.usefixtures("no_logged_errors")


@pytest_twisted.async_yield_fixture()
async def limited(equalizer, backends, store_kind, dsn) -> AsyncIterator:
    """A balancer keyed on ``X-Client`` whose clients get 2 tokens that never come back."""
    document = equalizer_config([backends("b1").url], rate_limit={
        "enabled": True, "key": "header:X-Client", "default": {"capacity": 2, "refill_rate": 0},
        **store_section(store_kind, dsn)})
    yield await store_ready(await equalizer(document), dsn)


@pytest.mark.parametrize("client_id", ["\ud800", "lone\udc80", "line\nfeed", "cr\rlf",
                                       "tab\there", "nul\x00", "del\x7f"])
@pytest_twisted.ensureDeferred
async def test_unusable_client_id_is_400_and_creates_nothing(limited, http, client_id):
    """POST /buckets with a client id that is not UTF-8 text or holds a control character is
    400 naming client_id, and no bucket appears."""
    admin = Admin(http, limited.admin_url)
    reply = await admin("POST", "/buckets", {"client_id": client_id, "capacity": 3})
    assert reply.status == 400, reply.body
    assert reply.error["code"] == "bad_request"
    assert reply.error["message"].startswith("client_id: ")
    assert (await admin.all())["total"] == 0


@pytest.mark.parametrize(("fields", "field"), [
    ({"refill_rate": 1e308}, "refill_rate"),
    ({"refill_rate": 5e-324}, "refill_rate"),
    ({"refill_rate": 1e-7}, "refill_rate"),
])
@pytest_twisted.ensureDeferred
async def test_values_that_cannot_be_computed_are_400(limited, http, fields, field):
    """A refill rate whose refill would overflow or underflow is 400 naming it, and nothing is
    created (it used to make the bucket unreadable on PostgreSQL)."""
    admin = Admin(http, limited.admin_url)
    reply = await admin("POST", "/buckets", {"client_id": "huge", "capacity": 10, "tokens": 0,
                                             **fields})
    assert reply.status == 400, reply.body
    assert reply.error["message"].startswith(f"{field}: ")
    assert (await admin.bucket("huge")).status == 404


@pytest.mark.parametrize(("method", "path", "text"), [
    ("POST", "/buckets", '{"client_id": "big", "capacity": 5, "refill_rate": 1%s}'),
    ("PUT", "/buckets/big", '{"refill_rate": 1%s}'),
    ("PUT", "/buckets/big", '{"tokens": 1%s}'),
])
@pytest_twisted.ensureDeferred
async def test_integers_too_large_for_a_float_are_400(limited, http, method, path, text):
    """A JSON integer with hundreds of digits (no float can hold it) is 400 naming the field,
    never a 500, and the bucket stays as it was."""
    admin = Admin(http, limited.admin_url)
    if method == "PUT":
        await admin.create("big", 5, refill_rate=1)
    reply = await admin(method, path, raw=(text % ("0" * 400)).encode())
    assert reply.status == 400, reply.body
    assert reply.error["message"].split(":")[0] in ("refill_rate", "tokens")
    if method == "PUT":
        assert (await admin.bucket("big")).json["refill_rate"] == 1.0


@pytest_twisted.ensureDeferred
async def test_largest_bucket_stays_readable(limited, http):
    """The largest capacity with the fastest refill is created, refilled and read back."""
    admin = Admin(http, limited.admin_url)
    await admin.create("fast", MAX_CAPACITY, tokens=0, refill_rate=MAX_REFILL_RATE)
    await sleep(0.5)
    reply = await admin.bucket("fast")
    assert reply.status == 200, reply.body
    assert reply.json["tokens"] > 0


@pytest.mark.parametrize("value", [b"a\tb", b"caf\xe9\x01", b"del\x7f"])
@pytest_twisted.ensureDeferred
async def test_header_key_with_control_characters_is_limited_under_its_digest(
        limited, http, value):
    """A key header carrying a TAB or another control character (latin-1 included) is
    limited like any other, under the bucket ``sha256:<hex>`` of its text, with no error."""
    request = (b"GET / HTTP/1.1\r\nHost: x\r\nX-Client: " + value +
               b"\r\nConnection: close\r\n\r\n")
    statuses = [status_of(await raw_request(limited.proxy_port, request)) for _ in range(3)]
    assert statuses == [200, 200, 429]
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        text = value.decode("latin-1")
    key = "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()
    reply = await Admin(http, limited.admin_url)("GET", bucket_path(key))
    assert reply.status == 200, reply.body
    assert reply.json["capacity"] == 2
    assert limited.service.limiter.decisions["store_error"] == 0


@pytest.mark.parametrize("client_id", ["nul\x00", "line\nfeed", "x" * 513])
@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
@pytest_twisted.ensureDeferred
async def test_a_path_no_bucket_can_have_is_404(limited, http, method, client_id):
    """A bucket path naming a client id no store can hold is a plain 404 on either store: the
    store answers that no bucket has it, without a statement PostgreSQL would refuse."""
    admin = Admin(http, limited.admin_url)
    body = ({"capacity": 1},) if method == "PUT" else ()
    reply = await admin(method, bucket_path(client_id), *body)
    assert reply.status == 404, reply.body
    assert reply.error["code"] == "not_found"
