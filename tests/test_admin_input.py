"""Admin input that two readers could understand differently is refused: JSON objects with a
key given twice, and paths with dot segments (issue 13, section 3).

Requests go through the whole admin site (guard included) over an in-memory connection.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from equalizer.admin.api import AdminAPI
from equalizer.admin.guard import has_dot_segment
from equalizer.balancer.pool import BackendPool
from equalizer.balancer.stats import TrafficStats
from equalizer.buckets.interface import take_key
from equalizer.buckets.memory import MemoryStore
from equalizer.config.model import BackendConfig
from tests.helpers import result_of


@pytest.fixture()
def api() -> AdminAPI:
    """The admin API over a pool of one backend (b1) and a memory store holding bucket
    ``../stats`` (an id a client key can be)."""
    clock = Clock()
    store = MemoryStore(clock)
    result_of(store.create("../stats", 5, 5, 1))
    pool = BackendPool([BackendConfig("http://127.0.0.1:9")])
    return AdminAPI(pool, TrafficStats(started=0), clock, store, None)


def request(api: AdminAPI, method: str, path: str, body: bytes = b"") -> tuple[int, Any]:
    """One raw request through the admin site: (status, decoded JSON body or None)."""
    channel = api.site().buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(f"{method} {path} HTTP/1.1\r\nHost: admin\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    head, _, rest = transport.value().partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head.lower():
        size, _, rest = rest.partition(b"\r\n")
        rest = rest[:int(size, 16)]
    return int(head.split(b" ", 2)[1]), json.loads(rest) if rest else None


# -- duplicate keys --------------------------------------------------------------------------


def test_duplicate_key_is_refused_naming_it(api: AdminAPI) -> None:
    """{"client_id":"a","client_id":"b"} is 400 naming client_id, and creates nothing."""
    status, body = request(api, "POST", "/buckets",
                           b'{"client_id": "a", "client_id": "b", "capacity": 1, '
                           b'"refill_rate": 1}')
    assert status == 400
    assert body["error"] == {"code": "bad_request", "message": "body: duplicate key 'client_id'"}
    assert request(api, "GET", "/buckets/a")[0] == 404
    assert request(api, "GET", "/buckets/b")[0] == 404


@pytest.mark.parametrize("method, path, raw", [
    ("PUT", "/buckets/..%2Fstats", b'{"tokens": 1, "tokens": 2}'),
    ("POST", "/backends", b'{"url": "http://127.0.0.1:1", "weight": 2, "weight": 3}'),
    ("PUT", "/backends/b1", b'{"enabled": true, "enabled": false}'),
])
def test_duplicate_key_is_refused_on_every_body(api: AdminAPI, method: str, path: str,
                                                raw: bytes) -> None:
    """Every endpoint that reads a body refuses a key given twice with 400."""
    status, body = request(api, method, path, raw)
    assert status == 400
    assert body["error"]["message"].startswith("body: duplicate key ")


def test_duplicate_key_is_refused_at_any_depth(api: AdminAPI) -> None:
    """A key given twice inside a nested object is refused too, before field checks run."""
    status, body = request(api, "POST", "/buckets",
                           b'{"client_id": "n", "capacity": 1, "x": [{"k": 1, "k": 2}]}')
    assert status == 400
    assert body["error"]["message"] == "body: duplicate key 'k'"


def test_keys_differing_only_by_escapes_are_the_same_key(api: AdminAPI) -> None:
    """A key spelt once plainly and once with a JSON escape is the same key, so it is refused."""
    status, body = request(api, "PUT", "/buckets/..%2Fstats",
                           b'{"tokens": 1, "\\u0074okens": 2}')
    assert status == 400
    assert body["error"]["message"] == "body: duplicate key 'tokens'"


# -- dot segments -------------------------------------------------------------------------------


DOT_PATHS = ["/buckets/../stats", "/buckets/%2e%2e/stats", "/buckets/%2E%2e/stats",
             "/buckets/.", "/buckets/%2E", "/buckets/..", "/buckets/a/./b", "/buckets/a/%2e/b",
             "/backends/..", "/backends/%2e%2e", "/backends/.", "/backends/%2E",
             "/backends/b1/..", "/./health"]


@pytest.mark.parametrize("path", DOT_PATHS)
@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_dot_segment_in_a_path_is_400(api: AdminAPI, method: str, path: str) -> None:
    """A path with a '.' or '..' segment, percent-encoded or not, is 400 and never reaches
    a bucket or a backend (nothing is changed or removed)."""
    status, body = request(api, method, path, b'{"tokens": 0}' if method == "PUT" else b"")
    assert status == 400
    assert body["error"]["message"].startswith("path: dot segments")
    assert result_of(api._store.get("../stats")).tokens == 5
    assert len(api._pool.backends) == 1


def test_bucket_named_with_an_encoded_slash_is_still_addressable(api: AdminAPI) -> None:
    """An id holding '/' travels as one percent-encoded segment (its Location form), which is
    no dot segment: bucket ``../stats`` is read at /buckets/..%2Fstats."""
    status, body = request(api, "GET", "/buckets/..%2Fstats")
    assert status == 200 and body["client_id"] == "../stats"


@pytest.mark.parametrize("client_id", [".", ".."])
def test_dot_client_ids_cannot_be_created(api: AdminAPI, client_id: str) -> None:
    """Client ids '.' and '..' are refused with 400: no URL path could name their bucket."""
    status, body = request(api, "POST", "/buckets", json.dumps(
        {"client_id": client_id, "capacity": 1, "refill_rate": 1}).encode())
    assert status == 400
    assert body["error"]["message"].startswith("client_id: must not be '.' or '..'")


@pytest.mark.parametrize("client_id", [".", ".."])
def test_dot_client_keys_are_limited_under_their_digest(client_id: str) -> None:
    """A client key '.' or '..' (X-API-Key: ..) is limited like any other, under its SHA-256."""
    assert take_key(client_id).startswith("sha256:")


def test_dot_segment_detection() -> None:
    """Only whole segments count: '.a', 'a..b', '...' and '%2e%2e%2f' are ordinary names."""
    assert has_dot_segment(b"/a/../b") and has_dot_segment(b"/a/%2E") and has_dot_segment(b"/..")
    for path in (b"/.a", b"/a..b", b"/...", b"/%2e%2e%2fx", b"/buckets/", b"/", b""):
        assert not has_dot_segment(path), path
