"""What /backends and /stats show: the JSON views of the pool, the traffic counters and
the store, read when asked (nothing here runs per proxied request)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from equalizer import __version__
from equalizer.balancer.stats import bucket_counts, by_class
from equalizer.buckets.memory import MemoryStore

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from equalizer.balancer.pool import Backend, BackendPool
    from equalizer.balancer.stats import TrafficStats
    from equalizer.buckets.interface import IBucketStore
    from equalizer.config.model import RouteConfig


def backend_json(backend: Backend, pool: BackendPool) -> dict[str, Any]:
    """One backend: its place, its state (``healthy`` null until its first active check),
    its traffic by status class, failures, retries, latency and last check."""
    return {
        "id": backend.id,
        "url": backend.url,
        "pool": backend.pool,
        "healthy": pool.health_state(backend),
        "down_since": backend.down_since,
        "enabled": backend.enabled,
        "draining": backend.draining,
        "weight": backend.weight,
        "in_flight": backend.in_flight,
        "requests": backend.requests,
        "by_status": by_class(backend.by_code),
        "failures": backend.failures,
        "retries": sum(backend.retries.values()),
        "latency_ms": backend.latency_ms(),
        "last_check": backend.last_check or None,
        "max_requests": backend.max_requests,
        "backup": backend.backup,
        "ejected_until": backend.ejected_until,
        "ejections": backend.ejections,
    }


def store_json(store: IBucketStore) -> dict[str, Any]:
    """Which bucket store runs, and whether it is reachable now."""
    kind = "memory" if isinstance(store, MemoryStore) else "postgres"
    return {"kind": kind, "available": bool(store.available)}


def stats_json(pool: BackendPool, stats: TrafficStats, store: IBucketStore,
               clock: IReactorTime, pools: dict[str, BackendPool] | None = None,
               routes: tuple[RouteConfig, ...] = ()) -> dict[str, Any]:
    """GET /stats: version, uptime, traffic, every backend, the store and its buckets, and
    the clients refused most often (``TrafficStats.limited_clients``)."""
    requests = stats.to_json()
    requests["retries"] = stats.retries
    return {
        "version": __version__,
        "uptime_seconds": stats.uptime(clock),
        "connections": stats.connections,
        "requests": requests,
        "backends": [backend_json(backend, each) for each in (pools or {"": pool}).values()
                     for backend in each.backends],
        "store": store_json(store),
        "buckets": bucket_counts(store),
        "limited_clients": stats.limited_clients.top(),
        "queue": pool.queue.to_json(),
        **routing_json(pools or {}, routes),
    }


def routing_json(pools: dict[str, BackendPool], routes: tuple[RouteConfig, ...]
                 ) -> dict[str, Any]:
    """``pools`` and ``routes`` of /stats, each only when configured (SPEC 8): without
    them /stats is as it always was."""
    shown: dict[str, Any] = {}
    if len(pools) > 1:
        shown["pools"] = [
            {"name": name, "strategy": pool.strategy_name, "backends": len(pool.backends),
             "healthy": sum(1 for backend in pool.backends if backend.available)}
            for name, pool in pools.items()]
    if routes:
        shown["routes"] = [route_json(route) for route in routes]
    return shown


def route_json(route: RouteConfig) -> dict[str, Any]:
    """One route as /stats shows it: the conditions given, its pool and policy."""
    match = {name: value for name, value in (
        ("host", route.match.host), ("path_prefix", route.match.path_prefix),
        ("methods", list(route.match.methods) or None),
        ("headers", dict(route.match.headers) or None)) if value is not None}
    return {"match": match, "pool": route.pool, "rate_limit": route.rate_limit,
            "strip_prefix": route.strip_prefix}
