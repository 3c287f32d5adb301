"""Pools (SPEC 8): one named pool as the proxy sees it, and the pools besides
``default`` kept in step with the configuration (start-up and SIGHUP reload).

Each pool has its own backends, strategy, slow start, queue, health monitor and
outlier detection; backend ids are unique across pools (one counter), so the
admin API can find a backend by id alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred

from equalizer.balancer.checker import HTTPHealthChecker
from equalizer.balancer.health import HealthMonitor
from equalizer.balancer.outlier import OutlierDetector
from equalizer.balancer.pool import BackendPool, DrainCancelled
from equalizer.proxy.keys import key_reader

if TYPE_CHECKING:
    from equalizer.balancer.pool import Backend
    from equalizer.config.model import BackendConfig, BalancerConfig, PoolConfig


class PoolUnit:
    """What an exchange needs of the pool its route sends it to."""

    __slots__ = ("name", "pool", "passive", "outlier", "hash_key")

    def __init__(self, name: str, pool: BackendPool, passive: Any, *,
                 outlier: OutlierDetector | None = None,
                 hash_key: Callable[[Any], str] | None = None) -> None:
        self.name = name
        self.pool = pool
        self.passive = passive
        """Hears of connection failures and successes (the pool's HealthMonitor)."""
        self.outlier = outlier
        """Outlier detection, None when the pool's ``health.outlier`` is off."""
        self.hash_key = hash_key
        """The client key ``hash`` balancing uses, None for other strategies."""


def hash_key_of(balancer: BalancerConfig) -> Callable[[Any], str] | None:
    """The client key a pool's ``hash`` strategy reads, None for other strategies."""
    return key_reader(balancer.hash_key) if balancer.strategy == "hash" else None


class NamedPools(MultiService):
    """The pools of ``pools:``, each with its health monitor (a child service)."""

    def __init__(self, reactor: Any, ids: Iterator[int],
                 forget_backend: Callable[[Backend], None],
                 reload_backends: Callable[[BackendPool, tuple[BackendConfig, ...],
                                            Callable[[Backend], None]], None] | None) -> None:
        """``reload_backends(pool, backends, remove)`` makes a pool's backends the file's
        on reload, as it does for ``default``; None: pools open empty and their backends
        are set from elsewhere (a worker process takes the supervisor's)."""
        super().__init__()
        self._reload_backends = reload_backends
        self._reactor = reactor
        self._ids = ids
        self._forget = forget_backend
        self.units: dict[str, PoolUnit] = {}
        self._detectors: dict[str, OutlierDetector] = {}


    def apply(self, pools: tuple[PoolConfig, ...]) -> None:
        """Make the running pools those of ``pools``: new ones start, kept ones take
        their settings and backends (as ``default`` does), missing ones stop and their
        backends leave once the requests in flight on them are over."""
        wanted = {pool.name: pool for pool in pools}
        for name in list(self.units):
            if name not in wanted:
                self._close(name)
        for name, config in wanted.items():
            if name in self.units:
                self._update(self.units[name], config)
            else:
                self._open(config)

    def _open(self, config: PoolConfig) -> None:
        balancer = config.balancer
        backends = balancer.backends if self._reload_backends is not None else ()
        pool = BackendPool(backends, balancer.strategy, clock=self._reactor,
                           slow_start=balancer.slow_start, queue=balancer.queue,
                           name=config.name, ids=self._ids)
        monitor = HealthMonitor(pool, config.health, HTTPHealthChecker(self._reactor),
                                self._reactor)
        monitor.setName(f"health:{config.name}")
        monitor.setServiceParent(self)
        detector = self._detectors[config.name] = OutlierDetector(
            pool, config.health.outlier, self._reactor)
        self.units[config.name] = PoolUnit(
            config.name, pool, monitor, hash_key=hash_key_of(balancer),
            outlier=detector if config.health.outlier.enabled else None)

    def _update(self, unit: PoolUnit, config: PoolConfig) -> None:
        balancer = config.balancer
        pool = unit.pool
        if self._reload_backends is not None:
            self._reload_backends(pool, balancer.backends,
                                  lambda backend: self._remove(pool, backend))
        if balancer.strategy != pool.strategy_name:
            pool.use_strategy(balancer.strategy)
        pool.configure(slow_start=balancer.slow_start, queue=balancer.queue)
        detector = self._detectors[config.name]
        detector.configure(config.health.outlier)
        unit.outlier = detector if config.health.outlier.enabled else None
        unit.hash_key = hash_key_of(balancer)
        unit.passive.reconfigure(config.health)

    def _remove(self, pool: BackendPool, backend: Backend) -> None:
        if backend in pool.backends:
            pool.remove(backend)
            self._forget(backend)

    def _close(self, name: str) -> None:
        unit = self.units.pop(name)
        self._detectors.pop(name).stop()
        monitor = unit.passive
        monitor.disownServiceParent()
        for backend in list(unit.pool.backends):
            unit.pool.drain(backend).addCallbacks(
                lambda _, b=backend, p=unit.pool: self._remove(p, b),
                lambda failure: failure.trap(DrainCancelled))

    def stopService(self) -> Deferred[None]:
        for detector in self._detectors.values():
            detector.stop()
        return super().stopService()
