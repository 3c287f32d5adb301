"""The admin REST API (Klein): health, stats, metrics, buckets, backends, openapi, dashboard.

The routes here are thin: the guard (``guard``) has refused what may not reach
them, ``bodies`` checks their input completely before anything is changed (so a
refused request changes nothing), and every refusal is an ``ApiError`` written in
the one JSON shape of ``errors``.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.resources import files
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from twisted.web.iweb import IRequest
from twisted.web.server import Site
from werkzeug.exceptions import MethodNotAllowed, NotFound

from equalizer.admin.bodies import (
    bucket_changes,
    bucket_create,
    query_integer,
    read_json_object,
)
from equalizer.admin.errors import (
    NO_ENDPOINT,
    STORE_UNAVAILABLE,
    ApiError,
    bad_request,
    conflict,
    error_response,
    json_response,
    method_not_allowed,
    not_found,
)
from equalizer.admin.guard import admin_site
from equalizer.admin.pools import PoolEndpoints
from equalizer.admin.schema import MAX_PAGE, openapi_document
from equalizer.admin.views import stats_json
from equalizer.buckets.interface import (
    BucketExists,
    InvalidBucket,
    StoreDataError,
    StoreUnavailable,
)
from equalizer.config.model import DEFAULT_POLICY
from equalizer.readiness import Readiness

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from equalizer.balancer.pool import Backend, BackendPool
    from equalizer.balancer.stats import TrafficStats
    from equalizer.buckets.interface import BucketRecord, IBucketStore
    from equalizer.config.model import BucketPolicy, PolicyConfig, RouteConfig

T = TypeVar("T")

MAX_STORE_OFFSET = 2**63 - 1
"""The largest offset handed to a store; larger ones are past the end all the same."""

DASHBOARD_HTML = files("equalizer.admin").joinpath("static/dashboard.html").read_bytes()
"""GET /dashboard: one self-contained page, read once at import."""

DASHBOARD_POLICY = (b"default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                    b"connect-src 'self'; img-src 'self'; frame-ancestors 'none'")
"""The page may talk to its own origin only: no CDN, no other network."""


def bucket_json(record: BucketRecord) -> dict[str, Any]:
    """A bucket with ``tokens`` and ``refill_rate`` always JSON floats, whatever the store holds,
    so a client never sees ``10`` from one answer and ``10.0`` from the next."""
    body = record.to_json()
    body["tokens"] = float(body["tokens"])
    body["refill_rate"] = float(body["refill_rate"])
    return body


class AdminAPI(PoolEndpoints):
    """The admin endpoints over the live pool, counters and store.

    ``readiness`` holds bucket calls back while the store's first connection attempt
    runs (SPEC 4.5); ``metrics`` is the registry ``GET /metrics`` exposes.
    """

    app = PoolEndpoints.app

    def __init__(self, pool: BackendPool, stats: TrafficStats, clock: IReactorTime,
                 store: IBucketStore, default_policy: BucketPolicy | None,
                 forget_backend: Callable[[Backend], None] = lambda backend: None,
                 token: str | None = None, *, readiness: Readiness | None = None,
                 metrics: CollectorRegistry | None = None,
                 pools: Callable[[], dict[str, BackendPool]] | None = None) -> None:
        self.token = token
        self.metrics_registry = metrics or CollectorRegistry(auto_describe=False)
        self._pool = pool
        self._pools = pools or (lambda: {"default": pool})
        self._forget_backend = forget_backend
        self._stats = stats
        self._clock = clock
        self._store = store
        self.default_policy = default_policy
        self.routes: tuple[RouteConfig, ...] = ()
        """The routes /stats shows (the service sets them, SPEC 8)."""
        self.policies: dict[str, PolicyConfig] = {}
        """Every rate-limit policy but ``default`` is looked up here (SPEC 8)."""
        self.readiness = readiness or Readiness(ready=True)
        self.workers = None
        """The worker processes' supervisor, when there are several (SPEC 9): /stats
        lists them (its ``json()``)."""

    def site(self) -> Site:
        """The admin site: bearer-token guard, bounded bodies, then the Klein routes."""
        return admin_site(self.app.resource(), self.token)

    @app.handle_errors(ApiError)
    def _api_error(self, request: IRequest, failure: Any) -> bytes:
        return error_response(request, failure.value)

    @app.handle_errors(NotFound)
    def _not_found(self, request: IRequest, failure: Any) -> bytes:
        return error_response(request, NO_ENDPOINT)

    @app.handle_errors(MethodNotAllowed)
    def _method_not_allowed(self, request: IRequest, failure: Any) -> bytes:
        return error_response(request, method_not_allowed(request, failure.value.valid_methods))

    # A data error is not an outage, but the client can do nothing about it either:
    # answered, as before, as the store being unable to serve the call (503).
    @app.handle_errors(StoreUnavailable, StoreDataError)
    def _store_unavailable(self, request: IRequest, failure: Any) -> bytes:
        return error_response(request, STORE_UNAVAILABLE)

    @app.route("/health", methods=["GET"])
    def health(self, request: IRequest) -> bytes:
        """What the proxy can serve now: starting (503) until start-up is over (SPEC 4.5),
        then down (503) when no backend can take traffic.

        ``healthy`` counts the backends that could take traffic (healthy, enabled, not
        draining, not ejected), backups included: a backup stands by while the primaries
        serve, and takes over when none can. Degraded: a backend meant to serve (enabled,
        not draining) cannot, or the store is unreachable.
        """
        backends = [backend for pool in self._pools().values() for backend in pool.backends]
        healthy = sum(1 for backend in backends if backend.available)
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
        body = stats_json(self._pool, self._stats, self._store, self._clock, self._pools(),
                          self.routes)
        if self.workers is not None:  # SPEC 9: one entry per worker process
            body["workers"] = self.workers.json()
        return json_response(request, body)

    # -- buckets -----------------------------------------------------------------------

    @app.route("/buckets", methods=["POST"])
    async def create_bucket(self, request: IRequest) -> bytes:
        body = read_json_object(request)
        policy, default = self._policy(body.pop("policy", DEFAULT_POLICY))
        client_id, capacity, tokens, refill_rate = bucket_create(body, default)
        await self.readiness.wait()
        try:
            record = await under(policy, self._store.create, client_id, capacity, tokens,
                                 refill_rate)
        except BucketExists:
            raise conflict(f"bucket {client_id!r} already exists") from None
        except InvalidBucket as error:
            raise bad_request(str(error)) from None
        request.setHeader(b"Location", bucket_location(client_id, policy))
        return json_response(request, bucket_json(record), 201)

    @app.route("/buckets", methods=["GET"])
    async def list_buckets(self, request: IRequest) -> bytes:
        limit = query_integer(request, "limit", 50, 1, MAX_PAGE)
        offset = query_integer(request, "offset", 0, 0, None)
        policy = self._query_policy(request)
        await self.readiness.wait()
        # Past the largest OFFSET PostgreSQL takes (bigint) every page is empty anyway.
        records, total = await under(policy, self._store.list, limit,
                                     min(offset, MAX_STORE_OFFSET))
        return json_response(request, {"items": [bucket_json(r) for r in records], "total": total,
                                       "limit": limit, "offset": offset})

    @app.route("/buckets/<path:client_id>", methods=["GET"])
    async def get_bucket(self, request: IRequest, client_id: str) -> bytes:
        policy = self._query_policy(request)
        await self.readiness.wait()
        record = await under(policy, self._store.get, client_id)
        if record is None:
            raise no_bucket(client_id)
        return json_response(request, bucket_json(record))

    @app.route("/buckets/<path:client_id>", methods=["PUT"])
    async def update_bucket(self, request: IRequest, client_id: str) -> bytes:
        changes = bucket_changes(read_json_object(request))
        policy = self._query_policy(request)
        await self.readiness.wait()
        try:
            record = await under(policy, self._store.update, client_id, **changes)
        except ValueError as error:
            raise bad_request(str(error)) from None
        if record is None:
            raise no_bucket(client_id)
        return json_response(request, bucket_json(record))

    @app.route("/buckets/<path:client_id>", methods=["DELETE"])
    async def delete_bucket(self, request: IRequest, client_id: str) -> bytes:
        policy = self._query_policy(request)
        await self.readiness.wait()
        if not await under(policy, self._store.delete, client_id):
            raise no_bucket(client_id)
        request.setResponseCode(204)
        return b""


    def _policy(self, name: object) -> tuple[str, BucketPolicy | None]:
        """A policy the configuration names (SPEC 8) and its default bucket, or 404: no
        bucket can be under a policy that does not exist (400 for a name not a string)."""
        if name == DEFAULT_POLICY:
            return DEFAULT_POLICY, self.default_policy
        if not isinstance(name, str):
            raise bad_request("policy: must be a string")
        if name not in self.policies:
            known = ", ".join(self.policies) or DEFAULT_POLICY
            raise not_found(f"policy: unknown policy {name!r}; policies: {known}")
        return name, self.policies[name].default

    def _query_policy(self, request: IRequest) -> str:
        values = request.args.get(b"policy")
        return self._policy(values[0].decode("utf-8", "replace") if values
                            else DEFAULT_POLICY)[0]

def under(policy: str, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """A store call for a bucket of ``policy``: without the argument for ``default``, so
    every call of SPEC section 6 reaches the store exactly as before."""
    if policy != DEFAULT_POLICY:
        kwargs["policy"] = policy
    return call(*args, **kwargs)


def bucket_location(client_id: str, policy: str = DEFAULT_POLICY) -> bytes:
    location = b"/buckets/" + quote(client_id, safe="").encode("ascii")
    if policy != DEFAULT_POLICY:
        location += b"?policy=" + quote(policy, safe="").encode("ascii")
    return location


def no_bucket(client_id: str) -> ApiError:
    return not_found(f"no bucket for client {client_id!r}")
