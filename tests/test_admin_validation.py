"""Admin API input that once crashed a handler or reached the store is refused up front.

Each case here was found by fuzzing the API from its OpenAPI document
(tests/integration/test_admin_fuzz.py); the answers are the documented ones.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet.task import Clock

from equalizer.admin.api import AdminAPI
from equalizer.admin.schema import MAX_CAPACITY
from equalizer.balancer.pool import BackendPool
from equalizer.balancer.stats import TrafficStats
from equalizer.buckets.memory import MemoryStore
from equalizer.config.rules import MAX_CLIENT_ID_LENGTH
from tests.helpers import result_of

UNSTORABLE = ["nul\x00inside", "x" * (MAX_CLIENT_ID_LENGTH + 1)]


@pytest.fixture
def stub() -> StubTreq:
    """The admin routes over an empty pool and a memory store, without the token guard."""
    clock = Clock()
    api = AdminAPI(BackendPool([]), TrafficStats(started=0), clock, MemoryStore(clock), None)
    return StubTreq(api.app.resource())


def call(stub: StubTreq, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    response = result_of(stub.request(method, "http://admin" + path, data=data))
    raw = result_of(response.content())
    return response.code, json.loads(raw) if raw else None


@pytest.mark.parametrize("client_id", UNSTORABLE, ids=["nul", "too-long"])
def test_create_bucket_with_unstorable_client_id_is_400(stub: StubTreq, client_id: str) -> None:
    """A client_id no store can hold is a 400 naming client_id, not a server error."""
    status, body = call(stub, "POST", "/buckets",
                        {"client_id": client_id, "capacity": 1, "refill_rate": 1})
    assert status == 400
    assert body["error"]["message"].startswith("client_id: ")


@pytest.mark.parametrize("client_id", UNSTORABLE, ids=["nul", "too-long"])
@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_unstorable_client_id_in_path_is_404(stub: StubTreq, method: str, client_id: str) -> None:
    """A bucket path naming a client_id no store can hold is 404: there is no such bucket."""
    path = "/buckets/" + client_id.replace("\x00", "%00")
    status, body = call(stub, method, path, {"tokens": 1} if method == "PUT" else None)
    assert status == 404
    assert body["error"]["code"] == "not_found"


def test_capacity_above_what_a_store_holds_is_400(stub: StubTreq) -> None:
    """A capacity above MAX_CAPACITY (PostgreSQL integer) is 400 on create and update."""
    status, body = call(stub, "POST", "/buckets",
                        {"client_id": "c", "capacity": MAX_CAPACITY + 1, "refill_rate": 1})
    assert status == 400 and body["error"]["message"].startswith("capacity: ")
    assert call(stub, "POST", "/buckets",
                {"client_id": "c", "capacity": MAX_CAPACITY, "refill_rate": 1})[0] == 201
    status, body = call(stub, "PUT", "/buckets/c", {"capacity": MAX_CAPACITY + 1})
    assert status == 400 and body["error"]["message"].startswith("capacity: ")


@pytest.mark.parametrize("url", ["http://\u0107d\u00ce", "http://host/caf\u00e9", "http://a\x7f"])
def test_backend_url_must_be_printable_ascii(stub: StubTreq, url: str) -> None:
    """A backend URL with non-ASCII or control characters is 400 naming url, not a crash."""
    status, body = call(stub, "POST", "/backends", {"url": url})
    assert status == 400
    assert body["error"]["message"].startswith("url: ")
    assert call(stub, "GET", "/backends")[1]["total"] == 0
