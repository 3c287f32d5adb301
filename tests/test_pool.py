"""The backend pool: state changes go through its methods, which keep the candidates current."""

from __future__ import annotations

import pytest

from equalizer.balancer.pool import Backend, BackendPool, DrainCancelled
from equalizer.config.model import BackendConfig
from tests.helpers import result_of  # tests/ is on sys.path (rootdir-less "prepend" import mode)


def make_pool(count: int = 3) -> BackendPool:
    return BackendPool([BackendConfig(f"http://127.0.0.1:{9000 + i}") for i in range(count)])


def test_backends_get_ids_in_order_and_are_found_by_id() -> None:
    """Ids are b1, b2, ... in the order backends join; an unknown id finds nothing."""
    pool = make_pool(2)
    added = pool.add("http://127.0.0.1:9100", weight=4)
    assert [b.id for b in pool.backends] == ["b1", "b2", "b3"]
    assert pool.get("b3") is added and added.weight == 4
    assert pool.get("b9") is None
    assert pool.available == pool.backends


def test_removed_backend_is_no_candidate() -> None:
    pool = make_pool(2)
    first = pool.backends[0]
    pool.remove(first)
    assert pool.available == [pool.backends[0]]
    assert first not in pool.backends


def test_set_enabled_updates_the_candidates() -> None:
    """Disabling takes a backend out of the candidates at once; enabling brings it back."""
    pool = make_pool(2)
    first = pool.backends[0]
    pool.set_enabled(first, False)
    assert not first.enabled and pool.available == [pool.backends[1]]
    pool.set_enabled(first, True)
    assert pool.available == pool.backends


def test_set_weight_changes_the_weight_the_strategy_sees() -> None:
    pool = BackendPool([BackendConfig("http://127.0.0.1:9001")], "weighted_round_robin")
    pool.set_weight(pool.backends[0], 7)
    assert pool.backends[0].weight == 7
    assert pool.choose() is pool.backends[0]


def test_set_healthy_changes_candidates_only_on_a_transition() -> None:
    pool = make_pool(2)
    first = pool.backends[0]
    pool.set_healthy(first, True, "already up")  # no transition: nothing changes
    assert pool.available == pool.backends
    pool.set_healthy(first, False, "refused")
    assert not first.healthy and pool.available == [pool.backends[1]]
    pool.set_healthy(first, True, "checks pass")
    assert pool.available == pool.backends


def test_drain_of_an_idle_backend_fires_at_once() -> None:
    pool = make_pool(2)
    first = pool.backends[0]
    assert result_of(pool.drain(first)) is None
    assert first.draining and first not in pool.available


def test_drain_waits_for_the_last_request() -> None:
    """A busy backend leaves the candidates at once; the drain fires when the proxy says
    its last request finished."""
    pool = make_pool(1)
    backend = pool.backends[0]
    backend.in_flight = 1
    drained = pool.drain(backend)
    assert not drained.called and pool.choose() is None
    pool.drained(backend)
    assert drained.called and result_of(drained) is None


def test_cancelled_drain_fails_its_waiters_and_restores_the_backend() -> None:
    pool = make_pool(1)
    backend = pool.backends[0]
    backend.in_flight = 2
    drained = pool.drain(backend)
    pool.cancel_drain(backend)
    assert not backend.draining and pool.available == [backend]
    with pytest.raises(DrainCancelled):
        result_of(drained)


def test_choose_leaves_out_backends_already_tried() -> None:
    pool = make_pool(2)
    first, second = pool.backends
    assert pool.choose(tried=[first]) is second
    assert pool.choose(tried=[first, second]) is None


def test_record_check_counts_and_keeps_the_last() -> None:
    backend = Backend.from_url("b1", "http://127.0.0.1:9001")
    backend.record_check(200, None, at=10.0, duration=0.0125)
    backend.record_check(None, "timed out after 5s", at=20.0, duration=5.0)
    assert backend.health_checks == {"ok": 1, "failed": 1}
    assert backend.last_check == {"ok": False, "status": None, "error": "timed out after 5s",
                                  "at": 20.0, "duration_ms": 5000.0}


def test_latency_percentiles() -> None:
    backend = Backend.from_url("b1", "http://127.0.0.1:9001")
    assert backend.latency_ms() == {"p50": None, "p99": None}
    backend.latencies.extend(i / 1000 for i in range(1, 101))
    assert backend.latency_ms() == {"p50": 51.0, "p99": 100.0}
