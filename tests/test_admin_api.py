"""The admin routes and their guard, through the admin Site on an in-memory connection.

Each test sends raw HTTP/1.1 to ``AdminAPI.site()`` over a StringTransport (no socket)
and reads the answer off it, so a failure names the route and the rule that broke.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.server import Site

from equalizer.admin.api import DASHBOARD_POLICY, AdminAPI
from equalizer.admin.guard import MAX_BODY_BYTES
from equalizer.balancer.pool import Backend, BackendPool
from equalizer.balancer.stats import TrafficStats
from equalizer.config.model import BackendConfig, BucketPolicy
from equalizer.readiness import Readiness
from equalizer.testing import FakeStore, Response, send

TOKEN = "s3cret"
AUTH = [("Authorization", f"Bearer {TOKEN}")]


class Admin:
    """An AdminAPI over two backends and a fake store, and what it told its collaborators."""

    def __init__(self, token: str | None = None, default: BucketPolicy | None = None) -> None:
        self.clock = Clock()
        self.pool = BackendPool([BackendConfig(url="http://127.0.0.1:9001"),
                                 BackendConfig(url="http://127.0.0.1:9002")])
        self.store = FakeStore(self.clock)
        self.forgotten: list[Backend] = []
        self.readiness = Readiness(ready=True)
        self.api = AdminAPI(self.pool, TrafficStats(started=0), self.clock, self.store, default,
                            self.forgotten.append, token, readiness=self.readiness)
        self.site = self.api.site()

    def call(self, method: str, path: str, body: Any = None, headers: Any = ()) -> Response:
        raw = body if isinstance(body, bytes) else (
            b"" if body is None else json.dumps(body).encode())
        return send(self.site, method, path, raw, headers)


@pytest.fixture
def admin() -> Admin:
    return Admin(default=BucketPolicy(capacity=10, refill_rate=2))


def connect(site: Site, transport: StringTransport) -> Any:
    """A channel of ``site`` connected to ``transport``, for answers that come later."""
    channel = site.buildProtocol(None)
    channel.makeConnection(transport)
    return channel


def error_code(response: Response) -> str:
    return response.json()["error"]["code"]


# -- observability ------------------------------------------------------------------------

def test_health_is_ok_with_every_backend_healthy(admin: Admin) -> None:
    response = admin.call("GET", "/health")
    assert (response.status, response.json()) == (
        200, {"status": "ok", "backends": {"healthy": 2, "total": 2}, "store": "ok"})


def test_health_is_degraded_with_one_backend_unhealthy_or_the_store_down(admin: Admin) -> None:
    admin.pool.set_healthy(admin.pool.backends[0], False, "test")
    assert admin.call("GET", "/health").json()["status"] == "degraded"
    admin.pool.set_healthy(admin.pool.backends[0], True, "test")
    admin.store.available = False
    body = admin.call("GET", "/health").json()
    assert (body["status"], body["store"]) == ("degraded", "unavailable")


def test_health_is_down_503_without_a_healthy_backend(admin: Admin) -> None:
    for backend in admin.pool.backends:
        admin.pool.set_healthy(backend, False, "test")
    response = admin.call("GET", "/health")
    assert (response.status, response.json()["status"]) == (503, "down")


def test_health_is_starting_503_until_ready() -> None:
    admin = Admin()
    admin.readiness.ready = False
    response = admin.call("GET", "/health")
    assert (response.status, response.json()["status"]) == (503, "starting")


def test_stats_show_every_backend_and_the_bucket_counts(admin: Admin) -> None:
    body = admin.call("GET", "/stats").json()
    assert [b["url"] for b in body["backends"]] == ["http://127.0.0.1:9001",
                                                    "http://127.0.0.1:9002"]
    assert set(body) == {"uptime_seconds", "requests", "backends", "buckets", "version",
                         "connections", "store", "limited_clients", "queue"}
    assert body["store"] == {"kind": "memory", "available": True}
    assert body["limited_clients"] == []


def test_metrics_are_prometheus_text(admin: Admin) -> None:
    response = admin.call("GET", "/metrics")
    assert response.status == 200
    assert response.headers[b"content-type"].startswith(b"text/plain")


def test_dashboard_is_a_page_allowed_to_talk_to_its_own_origin_only(admin: Admin) -> None:
    response = admin.call("GET", "/dashboard")
    assert response.headers[b"content-security-policy"] == DASHBOARD_POLICY
    assert response.headers[b"cache-control"] == b"no-store"
    assert response.body.startswith(b"<!DOCTYPE html>") or b"<html" in response.body


def test_openapi_document_is_served(admin: Admin) -> None:
    assert admin.call("GET", "/openapi.json").json()["openapi"].startswith("3.")


# -- backends -----------------------------------------------------------------------------

def test_backend_added_answers_201_with_its_location(admin: Admin) -> None:
    response = admin.call("POST", "/backends", {"url": "http://127.0.0.1:9003", "weight": 3})
    assert response.status == 201
    added = response.json()
    assert response.headers[b"location"] == f"/backends/{added['id']}".encode()
    assert (added["weight"], len(admin.pool.backends)) == (3, 3)


@pytest.mark.parametrize(("body", "message"), [
    ({}, "url: required"),
    ({"url": "ftp://x"}, "url: "),
    ({"url": "http://127.0.0.1:9003", "weight": 0}, "weight: "),
    ({"url": "http://127.0.0.1:9003", "name": "x"}, "name: unknown field"),
])
def test_backend_with_bad_fields_is_400_naming_the_field(admin: Admin, body: dict,
                                                        message: str) -> None:
    response = admin.call("POST", "/backends", body)
    assert response.status == 400
    assert response.json()["error"]["message"].startswith(message)


def test_backend_with_a_url_already_in_the_pool_is_409(admin: Admin) -> None:
    response = admin.call("POST", "/backends", {"url": "http://127.0.0.1:9001/"})
    assert (response.status, error_code(response)) == (409, "conflict")


def test_backend_changed_takes_the_new_weight_and_flag(admin: Admin) -> None:
    backend = admin.pool.backends[0]
    response = admin.call("PUT", f"/backends/{backend.id}", {"weight": 5, "enabled": False})
    assert response.status == 200
    assert (backend.weight, backend.enabled) == (5, False)
    assert backend not in admin.pool.available


def test_backend_enabled_must_be_a_boolean(admin: Admin) -> None:
    backend = admin.pool.backends[0]
    response = admin.call("PUT", f"/backends/{backend.id}", {"enabled": "no"})
    assert (response.status, backend.enabled) == (400, True)


def test_unknown_backend_is_404(admin: Admin) -> None:
    assert admin.call("GET", "/backends/nope").status == 404
    assert admin.call("GET", f"/backends/{admin.pool.backends[1].id}").status == 200


def test_backend_removed_is_drained_then_forgotten(admin: Admin) -> None:
    backend = admin.pool.backends[0]
    response = admin.call("DELETE", f"/backends/{backend.id}")
    assert response.status == 204
    assert backend not in admin.pool.backends
    assert admin.forgotten == [backend]


def test_backend_kept_by_a_reload_while_draining_is_409(admin: Admin) -> None:
    backend = admin.pool.backends[0]
    backend.in_flight = 1  # the drain waits for this request
    transport = StringTransport()
    connect(admin.site, transport).dataReceived(f"DELETE /backends/{backend.id} HTTP/1.1\r\n"
                                  "Host: admin\r\nContent-Length: 0\r\n\r\n".encode())
    assert transport.value() == b""
    admin.pool.cancel_drain(backend)
    assert b" 409 " in transport.value().split(b"\r\n")[0]
    assert admin.forgotten == []


# -- buckets ------------------------------------------------------------------------------

def test_bucket_created_with_the_default_refill_rate(admin: Admin) -> None:
    response = admin.call("POST", "/buckets", {"client_id": "a/b", "capacity": 4})
    assert response.status == 201
    assert response.headers[b"location"] == b"/buckets/a%2Fb"
    assert response.json()["refill_rate"] == 2.0
    assert response.json()["tokens"] == 4.0


def test_bucket_without_refill_rate_and_without_default_is_400() -> None:
    response = Admin().call("POST", "/buckets", {"client_id": "a", "capacity": 4})
    assert response.status == 400
    assert response.json()["error"]["message"].startswith("refill_rate: required")


@pytest.mark.parametrize(("body", "message"), [
    ({"capacity": 1}, "client_id: must be a non-empty string"),
    ({"client_id": "", "capacity": 1}, "client_id: must be a non-empty string"),
    ({"client_id": "a"}, "capacity: required"),
    ({"client_id": "a", "capacity": 1.5}, "capacity: must be an integer"),
    ({"client_id": "a", "capacity": 2, "tokens": 3}, "tokens: must be between 0 and 2"),
    ({"client_id": "a", "capacity": 2, "tokens": True}, "tokens: must be a number"),
    ({"client_id": "a", "capacity": 2, "refill_rate": -1}, "refill_rate: must be between"),
])
def test_bucket_with_bad_fields_is_400_naming_the_field(admin: Admin, body: dict,
                                                       message: str) -> None:
    response = admin.call("POST", "/buckets", body)
    assert response.status == 400
    assert response.json()["error"]["message"].startswith(message)


def test_bucket_created_twice_is_409(admin: Admin) -> None:
    admin.call("POST", "/buckets", {"client_id": "a", "capacity": 4})
    response = admin.call("POST", "/buckets", {"client_id": "a", "capacity": 4})
    assert (response.status, error_code(response)) == (409, "conflict")


def test_buckets_listed_a_page_at_a_time(admin: Admin) -> None:
    for name in "abc":
        admin.call("POST", "/buckets", {"client_id": name, "capacity": 1})
    body = admin.call("GET", "/buckets?limit=2&offset=1").json()
    assert [item["client_id"] for item in body["items"]] == ["b", "c"]
    assert (body["total"], body["limit"], body["offset"]) == (3, 2, 1)


@pytest.mark.parametrize(("query", "message"), [
    ("limit=x", "limit: must be an integer"),
    ("limit=%C2%B2", "limit: must be an integer"),
    ("limit=0", "limit: must be between 1 and 1000"),
    ("offset=" + "9" * 101, "offset: too large (101 digits)"),
])
def test_bad_page_parameters_are_400(admin: Admin, query: str, message: str) -> None:
    response = admin.call("GET", "/buckets?" + query)
    assert response.status == 400
    assert response.json()["error"]["message"].startswith(message)


def test_bucket_read_changed_and_deleted(admin: Admin) -> None:
    admin.call("POST", "/buckets", {"client_id": "a", "capacity": 4})
    assert admin.call("GET", "/buckets/a").json()["capacity"] == 4
    changed = admin.call("PUT", "/buckets/a", {"capacity": 8, "tokens": 6, "refill_rate": 1})
    assert (changed.json()["capacity"], changed.json()["tokens"]) == (8, 6.0)
    assert admin.call("DELETE", "/buckets/a").status == 204
    assert admin.call("GET", "/buckets/a").status == 404


def test_bucket_change_the_store_refuses_is_400(admin: Admin) -> None:
    admin.call("POST", "/buckets", {"client_id": "a", "capacity": 2})
    response = admin.call("PUT", "/buckets/a", {"tokens": 3})
    assert (response.status, error_code(response)) == (400, "bad_request")


@pytest.mark.parametrize("method", ["PUT", "DELETE"])
def test_missing_bucket_is_404(admin: Admin, method: str) -> None:
    response = admin.call(method, "/buckets/none", {"tokens": 1} if method == "PUT" else None)
    assert (response.status, error_code(response)) == (404, "not_found")


def test_bucket_calls_are_503_while_the_store_is_down(admin: Admin) -> None:
    admin.store.available = False
    response = admin.call("GET", "/buckets/a")
    assert (response.status, error_code(response)) == (503, "store_unavailable")


def test_bucket_calls_wait_for_readiness(admin: Admin) -> None:
    admin.readiness = Readiness()
    admin.api.readiness = admin.readiness
    transport = StringTransport()
    connect(admin.site, transport).dataReceived(
        b"GET /buckets HTTP/1.1\r\nHost: admin\r\nContent-Length: 0\r\n\r\n")
    assert transport.value() == b""
    admin.readiness.set()
    assert transport.value().startswith(b"HTTP/1.1 200 ")


# -- errors and the guard -----------------------------------------------------------------

def test_unknown_path_is_404_and_wrong_method_405_with_allow(admin: Admin) -> None:
    assert error_code(admin.call("GET", "/nowhere")) == "not_found"
    response = admin.call("DELETE", "/stats")
    assert (response.status, error_code(response)) == (405, "method_not_allowed")
    assert b"GET" in response.headers[b"allow"]


def test_token_is_needed_everywhere_but_health() -> None:
    admin = Admin(token=TOKEN)
    assert admin.call("GET", "/health").status == 200
    refused = admin.call("GET", "/stats")
    assert (refused.status, error_code(refused)) == (401, "unauthorized")
    assert refused.headers[b"www-authenticate"] == b'Bearer realm="equalizer"'
    assert admin.call("GET", "/stats", headers=[("Authorization", f"bEaReR   {TOKEN}")]
                      ).status == 200
    assert admin.call("GET", "/stats", headers=[("Authorization", "Bearer other")]
                      ).status == 401


@pytest.mark.parametrize(("origin", "status"), [
    ("http://admin", 201), ("http://admin:80", 201), ("http://evil.example", 403),
    ("null", 403), ("http://admin/path", 403), ("http://admin:x", 403),
])
def test_writes_from_another_origin_are_403(admin: Admin, origin: str, status: int) -> None:
    response = admin.call("POST", "/buckets", {"client_id": "a", "capacity": 1},
                          headers=[("Origin", origin)])
    assert response.status == status


def test_body_over_the_bound_is_413_and_closes(admin: Admin) -> None:
    response = admin.call("POST", "/buckets", b"x" * (MAX_BODY_BYTES + 1))
    assert (response.status, error_code(response)) == (413, "payload_too_large")
    assert response.headers[b"connection"] == b"close"


def test_path_not_utf8_once_decoded_is_400(admin: Admin) -> None:
    response = admin.call("GET", "/buckets/%ff")
    assert response.status == 400
    assert "is not UTF-8" in response.json()["error"]["message"]


@pytest.mark.parametrize("body", [b"{", b"[1]", b'{"a": 1, "a": 2}', b"[" * 60000])
def test_bodies_that_are_not_one_json_object_are_400(admin: Admin, body: bytes) -> None:
    response = admin.call("POST", "/buckets", body)
    assert response.status == 400
    assert response.json()["error"]["message"].startswith("body: ")
