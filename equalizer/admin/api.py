"""The admin REST API (Klein): health, stats, metrics, buckets, backends, openapi, dashboard.

Every error is JSON of one shape, ``{"error": {"code", "message"}}``, raised as
``ApiError`` from a handler and written by one error handler. Input is checked
completely before anything is changed, so a refused request changes nothing.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from importlib.resources import files
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote_to_bytes, urlsplit

from klein import Klein
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from werkzeug.exceptions import MethodNotAllowed, NotFound

from equalizer.admin.schema import MAX_PAGE, openapi_document
from equalizer.balancer.pool import DrainCancelled
from equalizer.balancer.stats import bucket_counts
from equalizer.buckets.interface import (
    BucketExists,
    InvalidBucket,
    StoreDataError,
    StoreUnavailable,
)
from equalizer.config.loader import url_identity, validate_backend_url, validate_weight
from equalizer.config.rules import MAX_CAPACITY, MAX_REFILL_RATE, validate_refill_rate
from equalizer.proxy.exchange import HeadRefusingChannel
from equalizer.readiness import Readiness

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from equalizer.balancer.pool import Backend, BackendPool
    from equalizer.balancer.stats import TrafficStats
    from equalizer.buckets.interface import BucketRecord, IBucketStore
    from equalizer.config.loader import BucketPolicy

MAX_BODY_BYTES = 65536
"""Admin request bodies are small JSON objects; anything larger is refused unread."""

MAX_HEAD_BYTES = 16384
"""Longest admin request line, header line and whole request head; past it 414 or 431."""

MAX_QUERY_DIGITS = 100
"""Longest number a query parameter may spell; longer ones are refused unconverted."""

MAX_STORE_OFFSET = 2**63 - 1
"""The largest offset handed to a store; larger ones are past the end all the same."""

SAFE_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS"})
"""Methods that change nothing, so a cross-origin browser may send them."""

DEFAULT_PORTS = {"http": 80, "https": 443}

DASHBOARD_HTML = files("equalizer.admin").joinpath("static/dashboard.html").read_bytes()
"""GET /dashboard: one self-contained page, read once at import."""

DASHBOARD_POLICY = (b"default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                    b"connect-src 'self'; img-src 'self'; frame-ancestors 'none'")
"""The page may talk to its own origin only: no CDN, no other network."""


class ApiError(Exception):
    """A refusal with its HTTP status, machine-readable code and message for humans."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def json_response(request: IRequest, body: Any, status: int = 200) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    return json.dumps(body).encode("utf-8")


def backend_json(backend: Backend) -> dict[str, Any]:
    return {
        "id": backend.id,
        "url": backend.url,
        "healthy": backend.healthy,
        "enabled": backend.enabled,
        "draining": backend.draining,
        "weight": backend.weight,
        "in_flight": backend.in_flight,
        "requests": backend.requests,
        "failures": backend.failures,
        "latency_ms": backend.latency_ms(),
        "last_check": backend.last_check or None,
    }


def bucket_json(record: BucketRecord) -> dict[str, Any]:
    """A bucket with ``tokens`` and ``refill_rate`` always JSON floats, whatever the store holds,
    so a client never sees ``10`` from one answer and ``10.0`` from the next."""
    body = record.to_json()
    body["tokens"] = float(body["tokens"])
    body["refill_rate"] = float(body["refill_rate"])
    return body


class AdminAPI:
    """The admin endpoints over the live pool, counters and store."""

    app = Klein()

    def __init__(self, pool: BackendPool, stats: TrafficStats, clock: IReactorTime,
                 store: IBucketStore, default_policy: BucketPolicy | None,
                 forget_backend: Callable[[Backend], None] = lambda backend: None,
                 token: str | None = None) -> None:
        self.token = token
        self.metrics_registry = CollectorRegistry(auto_describe=False)
        self._pool = pool
        self._forget_backend = forget_backend
        self._stats = stats
        self._clock = clock
        self._store = store
        self.default_policy = default_policy
        self.readiness = Readiness(ready=True)

    def site(self) -> Site:
        """The admin site: bearer-token guard, bounded bodies, then the Klein routes."""
        site = _QuietSite(_Guard(self, self.app.resource()))
        site.requestFactory = BoundedRequest
        site.noisy = False
        return site

    def allows(self, request: IRequest) -> bool:
        """Everything but GET and HEAD /health needs the bearer token, when one is set.

        The scheme is case-insensitive and may be followed by several spaces (RFC 7235
        section 2.1); the token is compared exactly, in constant time.
        """
        if self.token is None or (request.method in (b"GET", b"HEAD")
                                  and request.path == b"/health"):
            return True
        scheme, _, presented = (request.getHeader(b"authorization") or b"").partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(
            presented.lstrip(b" "), self.token.encode("utf-8"))

    @app.handle_errors(ApiError)
    def _api_error(self, request: IRequest, failure: Any) -> bytes:
        return error_response(request, failure.value)

    @app.handle_errors(NotFound)
    def _not_found(self, request: IRequest, failure: Any) -> bytes:
        return error_response(request, ApiError(404, "not_found", "no such endpoint"))

    @app.handle_errors(MethodNotAllowed)
    def _method_not_allowed(self, request: IRequest, failure: Any) -> bytes:
        allowed = ", ".join(failure.value.valid_methods or ())
        request.setHeader(b"Allow", allowed.encode("ascii"))
        return error_response(request, ApiError(405, "method_not_allowed",
                                                f"allowed methods: {allowed}"))

    @app.route("/health", methods=["GET"])
    def health(self, request: IRequest) -> bytes:
        """What the proxy can serve now: starting (503) until start-up is over (SPEC 4.5),
        then down (503) when no backend can take traffic.

        ``healthy`` counts the pool's candidates (healthy, enabled, not draining), the
        very list the strategies choose from. Degraded: a backend meant to serve (enabled,
        not draining) is unhealthy, or the store is unreachable.
        """
        backends = self._pool.backends
        healthy = len(self._pool.available)
        meant_to_serve = sum(1 for backend in backends
                             if backend.enabled and not backend.draining)
        store = "ok" if self._store.available else "unavailable"
        if not self.readiness.ready:
            status = "starting"
        elif healthy == 0:
            status = "down"
        elif healthy < meant_to_serve or store != "ok":
            status = "degraded"
        else:
            status = "ok"
        body = {"status": status, "backends": {"healthy": healthy, "total": len(backends)},
                "store": store}
        return json_response(request, body, 503 if status in ("down", "starting") else 200)

    @app.route("/metrics", methods=["GET"])
    def metrics(self, request: IRequest) -> bytes:
        """Prometheus text exposition of the same figures as /stats."""
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self.metrics_registry)

    @app.route("/openapi.json", methods=["GET"])
    def openapi(self, request: IRequest) -> bytes:
        """The OpenAPI 3 description of this API (equalizer.openapi)."""
        return json_response(request, openapi_document())

    @app.route("/dashboard", methods=["GET"])
    def dashboard(self, request: IRequest) -> bytes:
        """A live HTML view of /stats; its script polls /stats with the pasted token."""
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Content-Security-Policy", DASHBOARD_POLICY)
        request.setHeader(b"Cache-Control", b"no-store")
        return DASHBOARD_HTML

    @app.route("/stats", methods=["GET"])
    def stats(self, request: IRequest) -> bytes:
        body = {
            "uptime_seconds": self._stats.uptime(self._clock),
            "requests": self._stats.to_json(),
            "backends": [backend_json(backend) for backend in self._pool.backends],
            "buckets": bucket_counts(self._store),
        }
        return json_response(request, body)

    # -- backends ----------------------------------------------------------------------

    @app.route("/backends", methods=["GET"])
    def list_backends(self, request: IRequest) -> bytes:
        items = [backend_json(backend) for backend in self._pool.backends]
        return json_response(request, {"items": items, "total": len(items)})

    @app.route("/backends", methods=["POST"])
    def add_backend(self, request: IRequest) -> bytes:
        body = read_json_object(request)
        check_fields(body, {"url", "weight"})
        if "url" not in body:
            raise bad_request("url: required")
        try:
            url = validate_backend_url(body["url"])
        except ValueError as error:
            raise bad_request(f"url: {error}") from None
        weight = checked_weight(body) if "weight" in body else 1
        identity = url_identity(url)
        if any(url_identity(backend.url) == identity for backend in self._pool.backends):
            raise ApiError(409, "conflict", f"a backend with url {url!r} exists")
        backend = self._pool.add(url, weight)
        request.setHeader(b"Location", f"/backends/{backend.id}".encode())
        return json_response(request, backend_json(backend), 201)

    @app.route("/backends/<string:backend_id>", methods=["GET"])
    def get_backend(self, request: IRequest, backend_id: str) -> bytes:
        return json_response(request, backend_json(self._backend(backend_id)))

    @app.route("/backends/<string:backend_id>", methods=["PUT"])
    def change_backend(self, request: IRequest, backend_id: str) -> bytes:
        backend = self._backend(backend_id)
        body = read_json_object(request)
        check_fields(body, {"weight", "enabled"})
        weight = checked_weight(body) if "weight" in body else backend.weight
        enabled = body.get("enabled", backend.enabled)
        if not isinstance(enabled, bool):
            raise bad_request("enabled: must be true or false")
        backend.weight = weight
        backend.enabled = enabled
        self._pool.changed()
        return json_response(request, backend_json(backend))

    @app.route("/backends/<string:backend_id>", methods=["DELETE"])
    async def remove_backend(self, request: IRequest, backend_id: str) -> bytes:
        """Drain, then remove: no new requests, the ones in flight finish first."""
        backend = self._backend(backend_id)
        try:
            await self._pool.drain(backend)
        except DrainCancelled:
            raise ApiError(409, "conflict",
                           f"a configuration reload kept backend {backend_id!r}") from None
        if backend in self._pool.backends:
            self._pool.remove(backend)
            self._forget_backend(backend)
        request.setResponseCode(204)
        return b""

    def _backend(self, backend_id: str) -> Backend:
        backend = self._pool.get(backend_id)
        if backend is None:
            raise ApiError(404, "not_found", f"no backend with id {backend_id!r}")
        return backend

    # -- buckets -----------------------------------------------------------------------

    # A data error is not an outage, but the client can do nothing about it either:
    # answered, as before, as the store being unable to serve the call (503).
    @app.handle_errors(StoreUnavailable, StoreDataError)
    def _store_unavailable(self, request: IRequest, failure: Any) -> bytes:
        return json_response(request, {"error": {
            "code": "store_unavailable", "message": "the bucket store is unreachable"}}, 503)

    @app.route("/buckets", methods=["POST"])
    async def create_bucket(self, request: IRequest) -> bytes:
        body = read_json_object(request)
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
        elif self.default_policy is not None:
            refill_rate = self.default_policy.refill_rate
        else:
            raise bad_request("refill_rate: required (no default bucket policy is configured)")
        await self.readiness.wait()
        try:
            record = await self._store.create(client_id, capacity, tokens, refill_rate)
        except BucketExists:
            raise ApiError(409, "conflict", f"bucket {client_id!r} already exists") from None
        except InvalidBucket as error:
            raise bad_request(str(error)) from None
        request.setHeader(b"Location", bucket_location(client_id))
        return json_response(request, bucket_json(record), 201)

    @app.route("/buckets", methods=["GET"])
    async def list_buckets(self, request: IRequest) -> bytes:
        limit = query_integer(request, "limit", 50, 1, MAX_PAGE)
        offset = query_integer(request, "offset", 0, 0, None)
        await self.readiness.wait()
        # Past the largest OFFSET PostgreSQL takes (bigint) every page is empty anyway.
        records, total = await self._store.list(limit, min(offset, MAX_STORE_OFFSET))
        return json_response(request, {"items": [bucket_json(r) for r in records], "total": total,
                                       "limit": limit, "offset": offset})

    @app.route("/buckets/<path:client_id>", methods=["GET"])
    async def get_bucket(self, request: IRequest, client_id: str) -> bytes:
        await self.readiness.wait()
        record = await self._store.get(client_id)
        if record is None:
            raise no_bucket(client_id)
        return json_response(request, bucket_json(record))

    @app.route("/buckets/<path:client_id>", methods=["PUT"])
    async def update_bucket(self, request: IRequest, client_id: str) -> bytes:
        body = read_json_object(request)
        check_fields(body, {"capacity", "tokens", "refill_rate"})
        changes: dict[str, Any] = {}
        if "capacity" in body:
            changes["capacity"] = integer_field(body, "capacity", 1, MAX_CAPACITY)
        if "tokens" in body:
            changes["tokens"] = number_field(body, "tokens", 0,
                                             changes.get("capacity", MAX_CAPACITY))
        if "refill_rate" in body:
            changes["refill_rate"] = refill_rate_field(body)
        await self.readiness.wait()
        try:
            record = await self._store.update(client_id, **changes)
        except ValueError as error:
            raise bad_request(str(error)) from None
        if record is None:
            raise no_bucket(client_id)
        return json_response(request, bucket_json(record))

    @app.route("/buckets/<path:client_id>", methods=["DELETE"])
    async def delete_bucket(self, request: IRequest, client_id: str) -> bytes:
        await self.readiness.wait()
        if not await self._store.delete(client_id):
            raise no_bucket(client_id)
        request.setResponseCode(204)
        return b""


def error_response(request: IRequest, error: ApiError) -> bytes:
    return json_response(request, {"error": {"code": error.code, "message": error.message}},
                         error.status)


class AdminChannel(HeadRefusingChannel):
    """The admin port's HTTP/1.1 channel: an oversized or malformed request head gets
    414, 431 or 400 in the API's JSON error shape, as on the proxy port, within a fixed
    ``MAX_HEAD_BYTES``."""

    MAX_LENGTH = MAX_HEAD_BYTES
    totalHeadersSize = MAX_HEAD_BYTES


class _QuietSite(Site):
    """Admin calls are not proxied traffic: they stay out of the access log.

    HTTP/1.1 only, on ``AdminChannel`` (not twisted.web's HTTP/2-capable wrapper)."""

    protocol = AdminChannel

    def log(self, request: Request) -> None:
        pass


class BoundedRequest(Request):
    """An admin request whose body is dropped, not stored, past MAX_BODY_BYTES.

    twisted.web reads the whole body before routing; this keeps that read
    bounded in memory, and the guard answers 413 for such a request.
    """

    too_large = False
    _received = 0

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > MAX_BODY_BYTES:
            self.too_large = True
            length = 0
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        self._received += len(data)
        if self._received > MAX_BODY_BYTES:
            self.too_large = True
        if not self.too_large:
            super().handleContentChunk(data)


class _Guard(Resource):
    """Checks the origin, the bearer token, the body size and the path before any route runs."""

    isLeaf = True

    def __init__(self, api: AdminAPI, inner: Resource) -> None:
        super().__init__()
        self._api = api
        self._inner = inner

    def render(self, request: BoundedRequest) -> bytes | int:
        if request.method not in SAFE_METHODS and not same_origin(request):
            return error_response(request, ApiError(
                403, "forbidden_origin",
                "a browser page of another origin may not change this API (Origin header)"))
        if not self._api.allows(request):
            request.setHeader(b"WWW-Authenticate", b'Bearer realm="equalizer"')
            return error_response(request, ApiError(
                401, "unauthorized", "a valid 'Authorization: Bearer TOKEN' header is required"))
        if request.too_large:
            request.setHeader(b"Connection", b"close")
            return error_response(request, ApiError(
                413, "payload_too_large", f"request body over {MAX_BODY_BYTES} bytes"))
        if not decodable_url(request):
            shown = request.path.decode("ascii", "backslashreplace")
            return error_response(request, bad_request(
                f"path: {shown[:200]!r} is not UTF-8 once percent-decoded"))
        if has_dot_segment(request.path):
            return error_response(request, bad_request(
                "path: dot segments ('.' or '..', also percent-encoded) are not allowed"))
        return self._inner.render(request)


def decodable_url(request: Request) -> bool:
    """Whether Klein can decode the path and host as UTF-8 (else it logs a critical error)."""
    try:
        b"/".join(request.postpath).decode("utf-8")
        request.getRequestHostname().decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def has_dot_segment(path: bytes) -> bool:
    """Whether a segment of ``path`` is ``.`` or ``..``, percent-encoded or not.

    RFC 3986 5.2.4 would resolve them away (``/buckets/../stats`` is ``/stats``);
    routing would instead read them as part of an id (a bucket named ``../stats``).
    Neither is what the client meant to ask for, so such paths are refused.
    """
    return any(segment and unquote_to_bytes(segment) in (b".", b"..")
               for segment in path.split(b"/") if b"." in segment or b"%" in segment)


def same_origin(request: IRequest) -> bool:
    """No Origin header (not a browser, or same-origin), or every one names this API's own.

    Browsers send Origin on cross-origin requests; a page elsewhere must not change
    buckets or backends of an API that has no token by default (cross-site request
    forgery). The request's own origin is its scheme and its Host header.
    """
    origins = request.requestHeaders.getRawHeaders(b"origin")
    if not origins:
        return True
    host = request.getHeader(b"host")
    if host is None:
        return False
    scheme = "https" if request.isSecure() else "http"
    own = origin_tuple(f"{scheme}://{host.decode('latin-1')}")
    return own is not None and all(
        origin_tuple(origin.decode("latin-1")) == own for origin in origins)


def origin_tuple(text: str) -> tuple[str, str, int] | None:
    """``scheme://host[:port]`` as (scheme, host, port) to compare; None for anything else
    (``null``, a path, a bad port)."""
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname or parts.username is not None \
            or parts.path or parts.query or parts.fragment:
        return None
    return scheme, parts.hostname, port or DEFAULT_PORTS[scheme]


def bad_request(message: str) -> ApiError:
    return ApiError(400, "bad_request", message)


def no_bucket(client_id: str) -> ApiError:
    return ApiError(404, "not_found", f"no bucket for client {client_id!r}")


def checked_weight(body: dict[str, Any]) -> int:
    try:
        return validate_weight(body["weight"])
    except ValueError as error:
        raise bad_request(f"weight: {error}") from None


def bucket_location(client_id: str) -> bytes:
    return b"/buckets/" + quote(client_id, safe="").encode("ascii")


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


def check_fields(body: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        expected = ", ".join(sorted(allowed))
        raise bad_request(f"{unknown[0]}: unknown field; expected one of {expected}")


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
