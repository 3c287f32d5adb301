"""Traffic counters the proxy keeps and the admin API reports."""

from __future__ import annotations

from attrs import define, field

STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


@define
class TrafficStats:
    """Totals over the life of the process; per-backend figures live on each Backend."""

    started: float
    total: int = 0
    by_status: dict[str, int] = field(factory=lambda: dict.fromkeys(STATUS_CLASSES, 0))
    rate_limited: int = 0
    errors: int = 0

    def record(self, status: int) -> None:
        """Count one answered request by its status class."""
        self.total += 1
        self.by_status[STATUS_CLASSES[min(status // 100, 5) - 1]] += 1

    def to_json(self) -> dict:
        return {
            "total": self.total,
            "by_status": dict(self.by_status),
            "rate_limited": self.rate_limited,
            "errors": self.errors,
        }
