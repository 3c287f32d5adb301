"""``GET /metrics`` families of traffic management (SPEC 4.6): the pool queue and outlier
ejections, read from the live pools at scrape time."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from equalizer.balancer.pool import BackendPool


def management_metrics(pools: list[BackendPool]) -> Iterator:
    """Queue length and outcomes (by ``pool`` when there are several); each backend's
    ejection state and ejections (max_requests and backup are among the
    backend settings of ``equalizer.metrics``)."""
    by_pool = ["pool"] if len(pools) > 1 else []
    length = GaugeMetricFamily("equalizer_queue_length",
                               "Requests waiting in the pool queue for a backend slot",
                               labels=by_pool)
    outcomes = CounterMetricFamily("equalizer_queue_requests",
                                   "Requests that found every backend full, by outcome "
                                   "(queued; refused at once, queue full; refused at the "
                                   "timeout)", labels=["outcome", *by_pool])
    for pool in pools:
        queue = pool.queue
        name = [pool.name] if by_pool else []
        length.add_metric(name, queue.length())
        for outcome, count in (("queued", queue.queued), ("refused", queue.refused),
                               ("timed_out", queue.timed_out)):
            outcomes.add_metric([outcome, *name], count)
    yield length
    yield outcomes
    labels = ["backend", "url"]
    ejected = GaugeMetricFamily("equalizer_backend_ejected",
                                "1 while outlier detection has the backend ejected",
                                labels=labels)
    ejections = CounterMetricFamily("equalizer_backend_ejections",
                                    "Times outlier detection ejected the backend",
                                    labels=labels)
    for backend in (backend for pool in pools for backend in pool.backends):
        names = [backend.id, backend.url]
        ejected.add_metric(names, 0 if backend.ejected_until is None else 1)
        ejections.add_metric(names, backend.ejections)
    yield from (ejected, ejections)
