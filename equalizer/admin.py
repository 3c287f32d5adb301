"""The admin REST API (Klein): health, stats and, in later parts, buckets and backends.

Every error is JSON of one shape, ``{"error": {"code", "message"}}``, raised as
``ApiError`` from a handler and written by one error handler.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from klein import Klein
from twisted.web.iweb import IRequest

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime
    from twisted.web.resource import IResource

    from equalizer.pool import Backend, BackendPool
    from equalizer.stats import TrafficStats


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


class AdminAPI:
    """The admin endpoints over the live pool, counters and store."""

    app = Klein()

    def __init__(self, pool: BackendPool, stats: TrafficStats, clock: IReactorTime,
                 store_available: Any = lambda: True) -> None:
        self._pool = pool
        self._stats = stats
        self._clock = clock
        self._store_available = store_available

    def resource(self) -> IResource:
        return self.app.resource()

    @app.handle_errors(ApiError)
    def _api_error(self, request: IRequest, failure: Any) -> bytes:
        error = failure.value
        return json_response(request, {"error": {"code": error.code, "message": error.message}},
                             error.status)

    @app.route("/health", methods=["GET"])
    def health(self, request: IRequest) -> bytes:
        """ok when every backend is healthy, degraded when some are, down (503) when none."""
        backends = self._pool.backends
        healthy = sum(1 for backend in backends if backend.healthy and backend.enabled)
        store = "ok" if self._store_available() else "unavailable"
        if healthy == 0:
            status = "down"
        elif healthy == len(backends) and store == "ok":
            status = "ok"
        else:
            status = "degraded"
        body = {"status": status, "backends": {"healthy": healthy, "total": len(backends)},
                "store": store}
        return json_response(request, body, 503 if status == "down" else 200)

    @app.route("/stats", methods=["GET"])
    def stats(self, request: IRequest) -> bytes:
        body = {
            "uptime_seconds": round(self._clock.seconds() - self._stats.started, 3),
            "requests": self._stats.to_json(),
            "backends": [backend_json(backend) for backend in self._pool.backends],
        }
        return json_response(request, body)
