"""The admin endpoints of pools and backends (SPEC 6 and 8): ``GET /pools`` and
``/backends``. Backend ids are unique across pools, so ``/backends/{id}`` needs no pool;
``POST /backends`` takes ``"pool"`` (default ``default``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from klein import Klein
from twisted.web.iweb import IRequest

from equalizer.admin.bodies import backend_change, backend_create, read_json_object
from equalizer.admin.errors import bad_request, conflict, json_response, not_found
from equalizer.admin.views import backend_json
from equalizer.balancer.pool import DrainCancelled
from equalizer.config.checks import url_identity
from equalizer.config.model import BackendConfig

if TYPE_CHECKING:
    from equalizer.balancer.pool import Backend, BackendPool


def pool_json(name: str, pool: BackendPool) -> dict[str, Any]:
    """One pool: its name, strategy, queue and backends."""
    return {"name": name, "strategy": pool.strategy_name, "queue": pool.queue.to_json(),
            "backends": [backend_json(backend, pool) for backend in pool.backends]}


class PoolEndpoints:
    """``/pools`` and ``/backends`` over every pool ``_pools()`` names."""

    app = Klein()
    _pools: Callable[[], dict[str, BackendPool]]
    _forget_backend: Callable[[Backend], None]

    @app.route("/pools", methods=["GET"])
    def list_pools(self, request: IRequest) -> bytes:
        items = [pool_json(name, pool) for name, pool in self._pools().items()]
        return json_response(request, {"items": items, "total": len(items)})

    @app.route("/backends", methods=["GET"])
    def list_backends(self, request: IRequest) -> bytes:
        items = [backend_json(backend, pool) for pool in self._pools().values()
                 for backend in pool.backends]
        return json_response(request, {"items": items, "total": len(items)})

    @app.route("/backends", methods=["POST"])
    def add_backend(self, request: IRequest) -> bytes:
        body = read_json_object(request)
        name = body.pop("pool", "default")
        pools = self._pools()
        if not isinstance(name, str):
            raise bad_request("pool: must be a string")
        if name not in pools:  # like a bucket under an unknown policy: nothing to add to
            raise not_found(f"pool: unknown pool {name!r}; pools: {', '.join(pools)}")
        pool = pools[name]
        wanted = backend_create(body)
        url = wanted.url
        identity = url_identity(url)
        if any(url_identity(backend.url) == identity for backend in pool.backends):
            raise conflict(f"a backend with url {url!r} exists")
        backend = pool.add(url, wanted.weight, max_requests=wanted.max_requests,
                           backup=wanted.backup)
        request.setHeader(b"Location", f"/backends/{backend.id}".encode())
        return json_response(request, backend_json(backend, pool), 201)

    @app.route("/backends/<string:backend_id>", methods=["GET"])
    def get_backend(self, request: IRequest, backend_id: str) -> bytes:
        return json_response(request, backend_json(*self._backend(backend_id)))

    @app.route("/backends/<string:backend_id>", methods=["PUT"])
    def change_backend(self, request: IRequest, backend_id: str) -> bytes:
        backend, pool = self._backend(backend_id)
        current = BackendConfig(backend.url, backend.weight, backend.max_requests, backend.backup)
        wanted, enabled = backend_change(read_json_object(request), current, backend.enabled)
        pool.set_weight(backend, wanted.weight)
        pool.set_limits(backend, wanted.max_requests, wanted.backup)
        pool.set_enabled(backend, enabled)
        return json_response(request, backend_json(backend, pool))

    @app.route("/backends/<string:backend_id>", methods=["DELETE"])
    async def remove_backend(self, request: IRequest, backend_id: str) -> bytes:
        """Drain, then remove: no new requests, the ones in flight finish first."""
        backend, pool = self._backend(backend_id)
        try:
            await pool.drain(backend)
        except DrainCancelled:
            raise conflict(f"a configuration reload kept backend {backend_id!r}") from None
        if backend in pool.backends:
            pool.remove(backend)
            self._forget_backend(backend)
        request.setResponseCode(204)
        return b""

    def _backend(self, backend_id: str) -> tuple[Backend, BackendPool]:
        for pool in self._pools().values():
            backend = pool.get(backend_id)
            if backend is not None:
                return backend, pool
        raise not_found(f"no backend with id {backend_id!r}")
