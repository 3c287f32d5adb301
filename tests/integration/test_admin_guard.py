"""What the admin API's guard refuses before any route runs, over raw HTTP on loopback.

Cross-origin browser writes (the Origin check against cross-site request
forgery) and paths that are not UTF-8 once percent-decoded: both are answered
with the JSON error shape, and neither logs an error.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import attrs
import pytest
import pytest_twisted
import treq

from tests.integration.buckets_support import Reply, bucket_path, call
from tests.integration.harness import (
    RawResponse,
    equalizer_config,
    parse_response,
    raw_request,
    within,
)

pytestmark = pytest.mark.usefixtures("no_logged_errors")


@attrs.define
class Admin:
    """One balancer's admin port, spoken to in raw bytes or through treq."""

    http: object
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def raw(self, method: str, path: str, headers: dict[str, str] | None = None,
                  body: bytes = b"") -> RawResponse:
        """Send exactly this request (Host as given, else the admin address) and parse the
        answer."""
        sent = {"Host": f"127.0.0.1:{self.port}", **(headers or {}),
                "Content-Length": str(len(body)), "Connection": "close"}
        head = "".join(f"{name}: {value}\r\n" for name, value in sent.items())
        data = f"{method} {path} HTTP/1.1\r\n{head}\r\n".encode("latin-1") + body
        return parse_response(await raw_request(self.port, data))

    async def call(self, method: str, path: str, body: object = None) -> Reply:
        return await call(self.http, method, self.url + path, *(() if body is None else (body,)))


@pytest_twisted.async_yield_fixture()
async def admin(http, backends, equalizer) -> AsyncIterator[Admin]:
    """A balancer without a token (the default) and a memory store with a default policy."""
    balancer = await equalizer(equalizer_config(
        [backends("b1").url],
        rate_limit={"enabled": True, "store": "memory",
                    "default": {"capacity": 10, "refill_rate": 1}}))
    yield Admin(http, balancer.admin_port)


def error_of(response: RawResponse) -> dict[str, str]:
    """The ``{"code", "message"}`` of a JSON error answer."""
    assert response.header(b"content-type") == [b"application/json"], response
    body = json.loads(response.body)
    assert set(body) == {"error"}
    return body["error"]


def create_body(client_id: str) -> bytes:
    return json.dumps({"client_id": client_id, "capacity": 5}).encode()


# -- paths that are not UTF-8 ----------------------------------------------------------------


@pytest.mark.parametrize("path", ["/buckets/%FF", "/buckets/%ED%A0%80", "/backends/%FF",
                                  "/buckets/ok/%C3"])
@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
@pytest_twisted.ensureDeferred
async def test_non_utf8_path_is_a_json_400_naming_the_path(admin, method, path):
    """A percent-encoding that is not UTF-8 is 400 bad_request naming the path, not Klein's
    HTML answer and its logged traceback."""
    response = await admin.raw(method, path, body=b'{"tokens": 1}' if method == "PUT" else b"")
    assert response.status == 400
    error = error_of(response)
    assert error["code"] == "bad_request"
    assert path in error["message"] and "UTF-8" in error["message"]


@pytest_twisted.ensureDeferred
async def test_non_utf8_host_is_a_json_400(admin):
    """A Host header that is not UTF-8 is refused the same way, before Klein decodes it."""
    response = await admin.raw("GET", "/stats", {"Host": "\xff\xfe"})
    assert (response.status, error_of(response)["code"]) == (400, "bad_request")


# -- the Origin check ------------------------------------------------------------------------

CROSS_ORIGINS = [
    pytest.param(None, "http://evil.example", id="other-site"),
    pytest.param(None, "http://127.0.0.1:1", id="other-port"),
    pytest.param(None, "https://127.0.0.1:{port}", id="other-scheme"),
    pytest.param(None, "http://localhost:{port}", id="other-name"),
    pytest.param(None, "null", id="opaque-origin"),
    pytest.param(None, "http://127.0.0.1:{port}/page", id="not-an-origin"),
    pytest.param("evil.example", "http://evil.example:80:1", id="bad-port"),
]

SAME_ORIGINS = [
    pytest.param(None, None, id="no-origin"),
    pytest.param(None, "http://127.0.0.1:{port}", id="same-origin"),
    pytest.param("LocalHost:{port}", "http://localhost:{port}", id="host-case"),
    pytest.param("localhost", "http://localhost:80", id="default-port"),
    pytest.param("[::1]:{port}", "HTTP://[::1]:{port}", id="ipv6-and-scheme-case"),
]


def headers_for(admin: Admin, host: str | None, origin: str | None) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if host is not None:
        headers["Host"] = host.format(port=admin.port)
    if origin is not None:
        headers["Origin"] = origin.format(port=admin.port)
    return headers


@pytest.mark.parametrize(("host", "origin"), CROSS_ORIGINS)
@pytest_twisted.ensureDeferred
async def test_cross_origin_write_is_403_and_changes_nothing(admin, host, origin):
    """A POST whose Origin is not the request's own scheme and Host is 403 forbidden_origin,
    and no bucket is created."""
    response = await admin.raw("POST", "/buckets", headers_for(admin, host, origin),
                               create_body("csrf"))
    assert response.status == 403
    assert error_of(response)["code"] == "forbidden_origin"
    assert (await admin.call("GET", "/buckets/csrf")).status == 404


@pytest.mark.parametrize(("host", "origin"), SAME_ORIGINS)
@pytest_twisted.ensureDeferred
async def test_same_origin_or_no_origin_write_is_served(admin, host, origin):
    """A POST without Origin, or from the API's own origin (scheme and host compared without
    case, the default port implied), is served."""
    response = await admin.raw("POST", "/buckets", headers_for(admin, host, origin),
                               create_body("mine"))
    assert response.status == 201, response
    assert (await admin.call("GET", "/buckets/mine")).status == 200


@pytest.mark.parametrize("method", ["PUT", "DELETE"])
@pytest_twisted.ensureDeferred
async def test_cross_origin_change_and_delete_are_refused(admin, method):
    """PUT and DELETE from another origin are 403 too, and the bucket stays as it was."""
    before = (await admin.call("POST", "/buckets", {"client_id": "kept", "capacity": 5})).json
    response = await admin.raw(method, bucket_path("kept"), {"Origin": "http://evil.example"},
                               b'{"tokens": 0}' if method == "PUT" else b"")
    assert (response.status, error_of(response)["code"]) == (403, "forbidden_origin")
    after = (await admin.call("GET", bucket_path("kept"))).json
    assert (after["capacity"], after["updated_at"]) == (before["capacity"], before["updated_at"])


@pytest_twisted.ensureDeferred
async def test_one_foreign_origin_among_several_is_refused(admin):
    """Origin sent twice is refused unless both name the API's own origin."""
    own = f"Origin: http://127.0.0.1:{admin.port}"
    data = (f"POST /buckets HTTP/1.1\r\nHost: 127.0.0.1:{admin.port}\r\n{own}\r\n"
            "Origin: http://evil.example\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    response = parse_response(await raw_request(admin.port, data.encode()))
    assert (response.status, error_of(response)["code"]) == (403, "forbidden_origin")


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS"])
@pytest_twisted.ensureDeferred
async def test_cross_origin_reads_are_not_refused(admin, method):
    """GET, HEAD and OPTIONS change nothing, so another origin is not refused for them."""
    response = await admin.raw(method, "/buckets", {"Origin": "http://evil.example"})
    assert response.status != 403


@pytest_twisted.ensureDeferred
async def test_write_without_content_type_still_works(admin):
    """``curl -d '{...}'`` (no Content-Type, no Origin) keeps creating buckets."""
    response = await within(admin.http.post(admin.url + "/buckets",
                                            data=create_body("curl")))
    await within(treq.content(response))
    assert response.code == 201
    assert (await admin.call("GET", "/buckets/curl")).status == 200
