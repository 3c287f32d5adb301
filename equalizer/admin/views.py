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


def backend_json(backend: Backend, pool: BackendPool) -> dict[str, Any]:
    """One backend: its place, its state (``healthy`` null until its first active check),
    its traffic by status class, failures, retries, latency and last check."""
    return {
        "id": backend.id,
        "url": backend.url,
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
               clock: IReactorTime) -> dict[str, Any]:
    """GET /stats: version, uptime, traffic, every backend, the store and its buckets, and
    the clients refused most often (``TrafficStats.limited_clients``)."""
    requests = stats.to_json()
    requests["retries"] = stats.retries
    return {
        "version": __version__,
        "uptime_seconds": stats.uptime(clock),
        "connections": stats.connections,
        "requests": requests,
        "backends": [backend_json(backend, pool) for backend in pool.backends],
        "store": store_json(store),
        "buckets": bucket_counts(store),
        "limited_clients": stats.limited_clients.top(),
        "queue": pool.queue.to_json(),
    }
