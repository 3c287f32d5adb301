"""One named pool as the proxy sees it: its backends, the health monitor that hears of
connection failures, outlier detection (when on) and the client key ``hash`` uses."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from equalizer.balancer.outlier import OutlierDetector
    from equalizer.balancer.pool import BackendPool


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
