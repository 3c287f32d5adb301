"""The admin bearer token, checked over real sockets for every operation in the OpenAPI document.

The operations come from ``equalizer.openapi``, so a new endpoint is covered as
soon as it is documented (and ``test_admin_openapi`` makes sure it is).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_twisted
import treq
from treq.client import HTTPClient

from equalizer.admin.schema import openapi_document
from tests.integration.harness import (
    RunningEqualizer,
    equalizer_config,
    free_port,
    http_client,
    start_equalizer,
    within,
)

TOKEN = "s3cret-token"
HTTP_METHODS = {"get", "put", "post", "delete", "patch"}

PATH_VALUES = {"backend_id": "b1", "client_id": "auth-client"}
"""Path parameters: an existing backend, a bucket the module creates first."""

BODIES: dict[str, dict[str, Any]] = {
    "createBucket": {"client_id": "auth-new", "capacity": 5, "refill_rate": 1},
    "updateBucket": {"tokens": 1},
    "addBackend": {"url": "http://127.0.0.1:9/"},
    "changeBackend": {"weight": 2},
}
"""A valid body per operation that takes one, so only the token decides the answer."""


def operations() -> list[tuple[str, str, dict[str, Any]]]:
    """(METHOD, path, operation) for every operation of the document."""
    return [(method.upper(), path, operation)
            for path, item in openapi_document()["paths"].items()
            for method, operation in item.items() if method in HTTP_METHODS]


GUARDED = [pytest.param(method, path, operation, id=f"{method} {path}")
           for method, path, operation in operations()
           if (method, path) not in {("GET", "/health"), ("GET", "/dashboard")}]
WRITES = [param for param in GUARDED if param.values[0] in {"POST", "PUT", "DELETE"}]


class Admin:
    """A client for one running balancer's admin API."""

    def __init__(self, balancer: RunningEqualizer, client: HTTPClient) -> None:
        self.balancer = balancer
        self.client = client

    async def call(self, method: str, path: str, authorization: str | None,
                   body: dict[str, Any] | None = None,
                   origin: str | None = None) -> tuple[int, Any, Any]:
        """Send one request; return (status, headers, body decoded as JSON when it is)."""
        url = self.balancer.admin_url + path.format(**PATH_VALUES)
        headers = {"Accept": "application/json"}
        if authorization is not None:
            headers["Authorization"] = authorization
        if origin is not None:
            headers["Origin"] = origin
        data = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            data = json.dumps(body).encode()
        response = await within(self.client.request(method, url, headers=headers, data=data))
        raw = await within(treq.content(response))
        content_type = response.headers.getRawHeaders(b"content-type", [b""])[0]
        body = json.loads(raw) if content_type.startswith(b"application/json") and raw else raw
        return response.code, response.headers, body


@pytest_twisted.async_yield_fixture(scope="module")
async def admin() -> AsyncIterator[Admin]:
    """A balancer with a token (backends nowhere, checks off) and one bucket, for the module."""
    balancer = await start_equalizer(equalizer_config(
        [f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"],
        admin={"token": TOKEN},
        rate_limit={"enabled": True, "store": "memory",
                    "default": {"capacity": 10, "refill_rate": 1}},
    ))
    client, pool = http_client()
    api = Admin(balancer, client)
    seed = {"client_id": PATH_VALUES["client_id"], "capacity": 5, "refill_rate": 1}
    status, _, _ = await api.call("POST", "/buckets", f"Bearer {TOKEN}", seed)
    assert status == 201
    try:
        yield api
    finally:
        await within(pool.closeCachedConnections())
        await balancer.stop()


def body_for(operation: dict[str, Any]) -> dict[str, Any] | None:
    """A valid body when the operation takes one (``{}`` for one not listed in BODIES)."""
    return BODIES.get(operation["operationId"], {}) if "requestBody" in operation else None


def documented_statuses(operation: dict[str, Any]) -> set[int]:
    return {int(status) for status in operation["responses"]}


def assert_unauthorized(status: int, headers: Any, body: Any) -> None:
    assert status == 401
    assert headers.getRawHeaders(b"www-authenticate") == [b'Bearer realm="equalizer"']
    assert isinstance(body, dict) and set(body) == {"error"}
    assert body["error"]["code"] == "unauthorized"
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


@pytest.mark.parametrize(("method", "path", "operation"), GUARDED)
@pytest_twisted.ensureDeferred
async def test_operation_needs_the_token(admin: Admin, method: str, path: str,
                                         operation: dict[str, Any]) -> None:
    """Without the header or with a wrong token it is 401 in the JSON error shape; with the
    right token it is not 401."""
    body = body_for(operation)
    for refused in (None, "Bearer wrong-token", TOKEN, f"Basic {TOKEN}", f"Bearer {TOKEN}x"):
        assert_unauthorized(*await admin.call(method, path, refused, body))
    status, _, _ = await admin.call(method, path, f"Bearer {TOKEN}", body)
    assert status != 401
    assert status in documented_statuses(operation)


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token", f"Bearer {TOKEN}"])
@pytest_twisted.ensureDeferred
async def test_health_stays_open(admin: Admin, authorization: str | None) -> None:
    """GET /health answers with its JSON body whatever the Authorization header says."""
    status, _, body = await admin.call("GET", "/health", authorization)
    assert status in (200, 503)
    assert set(body) == {"status", "backends", "store"}


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token"])
@pytest_twisted.ensureDeferred
async def test_head_health_stays_open(admin: Admin, authorization: str | None) -> None:
    """HEAD /health is as open as GET /health: the same status, no 401."""
    status, _, body = await admin.call("HEAD", "/health", authorization)
    assert status == (await admin.call("GET", "/health", None))[0]
    assert body == b""


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token"])
@pytest_twisted.ensureDeferred
async def test_dashboard_page_is_open_but_not_its_data(admin: Admin,
                                                       authorization: str | None) -> None:
    """The dashboard's HTML (no data in it) opens without the token; the figures it shows
    and the changes its buttons make still need it."""
    status, headers, body = await admin.call("GET", "/dashboard", authorization)
    assert status == 200 and b"<html" in body
    assert headers.getRawHeaders(b"content-type") == [b"text/html; charset=utf-8"]
    assert (await admin.call("HEAD", "/dashboard", authorization))[0] == 200
    for method, path in (("GET", "/stats"), ("GET", "/metrics"), ("GET", "/backends")):
        assert_unauthorized(*await admin.call(method, path, authorization))
    assert_unauthorized(*await admin.call("PUT", "/backends/b1", authorization,
                                          {"enabled": False}))
    assert_unauthorized(*await admin.call("POST", "/dashboard", authorization))


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "bEaReR"])
@pytest_twisted.ensureDeferred
async def test_bearer_scheme_is_case_insensitive(admin: Admin, scheme: str) -> None:
    """The auth scheme matches in any case, before one or more spaces (RFC 7235); the token
    itself must still match exactly."""
    assert (await admin.call("GET", "/stats", f"{scheme} {TOKEN}"))[0] == 200
    assert (await admin.call("GET", "/stats", f"{scheme}   {TOKEN}"))[0] == 200
    assert_unauthorized(*await admin.call("GET", "/stats", f"{scheme} {TOKEN.upper()}"))
    assert_unauthorized(*await admin.call("GET", "/stats", f"{scheme}{TOKEN}"))


@pytest.mark.parametrize(("method", "path", "operation"), WRITES)
@pytest_twisted.ensureDeferred
async def test_cross_origin_write_is_a_documented_403(admin: Admin, method: str, path: str,
                                                      operation: dict[str, Any]) -> None:
    """Every writing operation refuses another origin with 403 forbidden_origin, the token
    notwithstanding, as its document says."""
    status, _, body = await admin.call(method, path, f"Bearer {TOKEN}", body_for(operation),
                                       origin="http://evil.example")
    assert (status, body["error"]["code"]) == (403, "forbidden_origin")
    assert status in documented_statuses(operation)


@pytest_twisted.ensureDeferred
async def test_refused_write_changes_nothing(admin: Admin) -> None:
    """A POST /buckets refused for its token creates no bucket."""
    body = {"client_id": "never-created", "capacity": 1, "refill_rate": 1}
    status, _, _ = await admin.call("POST", "/buckets", "Bearer nope", body)
    assert status == 401
    status, _, _ = await admin.call("GET", "/buckets/never-created", f"Bearer {TOKEN}")
    assert status == 404
