"""A latency histogram kept as plain integers, read by /metrics at scrape time.

Observing is one bisect and two additions: no labels, no locks, nothing per scrape
on the request path. ``equalizer.metrics`` turns it into a Prometheus histogram.
"""

from __future__ import annotations

from bisect import bisect_left

from attrs import define, field

DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0)
"""Upper bounds, in seconds, of every duration histogram (plus +Inf): from a millisecond
to a minute, past the default response timeout (30 s)."""


@define
class DurationHistogram:
    """Counts per bucket (not cumulative) and the sum, as Prometheus needs them."""

    counts: list[int] = field(factory=lambda: [0] * (len(DURATION_BUCKETS) + 1))
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.total += seconds
