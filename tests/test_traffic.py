"""Traffic management (SPEC 4.6) with an injected clock: the slow-start ramp, the
ejection arithmetic, the wait queue, backups and per-backend limits."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from twisted.internet.task import Clock

from equalizer.balancer.outlier import (
    MAX_EJECTION_MULTIPLIER,
    OutlierDetector,
    ejection_seconds,
    may_eject,
)
from equalizer.balancer.pool import BackendPool
from equalizer.balancer.queue import WaitQueue
from equalizer.balancer.slowstart import ramp_share
from equalizer.balancer.strategies import make_strategy
from equalizer.config.model import BackendConfig, OutlierConfig, QueueConfig
from equalizer.proxy.retry import RetryPolicy


def make_pool(count: int = 3, clock: Clock | None = None, **kwargs) -> BackendPool:
    configs = [BackendConfig(f"http://127.0.0.1:{9000 + i}") for i in range(count)]
    return BackendPool(configs, clock=clock or Clock(), **kwargs)


# -- slow start -------------------------------------------------------------------------

def test_ramp_is_linear_from_a_tenth_to_full() -> None:
    """The share starts at 10 %, grows linearly and is full at the end of the window."""
    assert ramp_share(0, 10) == pytest.approx(0.1)
    assert ramp_share(5, 10) == pytest.approx(0.55)
    assert ramp_share(9.999, 10) < 1.0
    assert ramp_share(10, 10) == 1.0
    assert ramp_share(50, 10) == 1.0
    assert ramp_share(3, 0) == 1.0


@pytest.mark.parametrize("strategy", ["round_robin", "weighted_round_robin",
                                      "least_connections", "random", "power_of_two"])
def test_added_backend_ramps_up(strategy: str) -> None:
    """A backend added to a pool of two gets the share of a tenth of its weight at first
    (0.1 / 2.1, about 5 %, not its third) and its full third once the window is over."""
    clock = Clock()
    pool = make_pool(2, clock, slow_start=100.0)
    pool.strategy = make_strategy(strategy)
    new = pool.add("http://127.0.0.1:9100")
    early = Counter(pool.choose() for _ in range(3000))
    assert early[new] / 3000 == pytest.approx(0.1 / 2.1, abs=0.015)
    clock.advance(100)
    late = Counter(pool.choose() for _ in range(3000))
    assert late[new] / 3000 == pytest.approx(1 / 3, abs=0.05)
    assert not pool.slow_start.ramping


def test_backends_present_at_start_take_their_full_share() -> None:
    """Slow start is for backends that come (back), not the ones configured at start-up."""
    pool = make_pool(2, Clock(), slow_start=60.0)
    assert not pool.slow_start.ramping
    picks = Counter(pool.choose() for _ in range(10))
    assert sorted(picks.values()) == [5, 5]


def test_backend_coming_back_healthy_or_from_ejection_ramps() -> None:
    """Healthy again, back from an ejection or enabled again: each starts a ramp."""
    clock = Clock()
    pool = make_pool(3, clock, slow_start=10.0)
    a, b, c = pool.backends
    pool.set_healthy(a, False, "test")
    pool.set_healthy(a, True, "test")
    pool.set_ejected(b, 100.0)
    pool.set_ejected(b, None)
    pool.set_enabled(c, False)
    pool.set_enabled(c, True)
    assert set(pool.slow_start.ramping) == {a, b, c}
    assert pool.slow_start.share(a) == pytest.approx(0.1)
    clock.advance(5)
    assert pool.slow_start.share(a) == pytest.approx(0.55)


def test_hash_strategy_does_not_ramp() -> None:
    """Hashing keeps each key on its backend: slow start leaves its picks alone."""
    pool = make_pool(2, Clock(), slow_start=60.0)
    pool.strategy = make_strategy("hash")
    new = pool.add("http://127.0.0.1:9100")
    keys = [b"k%d" % i for i in range(300)]
    assert sum(pool.choose(key) is new for key in keys) > 50


# -- outlier detection ----------------------------------------------------------------

def test_ejection_grows_linearly_up_to_ten_times() -> None:
    """base, 2 x base, ... capped at 10 x base (SPEC 4.6)."""
    assert [ejection_seconds(30, n) for n in (1, 2, 3)] == [30, 60, 90]
    assert ejection_seconds(30, 10) == 300
    assert ejection_seconds(30, 25) == 30 * MAX_EJECTION_MULTIPLIER


def test_max_ejection_percent_is_never_exceeded() -> None:
    """One more ejection is allowed only if the share ejected stays within the cap."""
    assert may_eject(0, 2, 50) and not may_eject(1, 2, 50)
    assert may_eject(0, 3, 50) and not may_eject(1, 3, 50)
    assert may_eject(1, 4, 50) and not may_eject(2, 4, 50)
    assert not may_eject(0, 1, 50) and may_eject(0, 1, 100)
    assert not may_eject(0, 10, 0)


def make_detector(pool: BackendPool, clock: Clock, **settings) -> OutlierDetector:
    return OutlierDetector(pool, OutlierConfig(**settings), clock)


def test_consecutive_5xx_eject_then_the_backend_returns_on_probation() -> None:
    """N 5xx in a row eject for base_ejection; back after it; a good answer on probation
    ends the run, so the next ejection is base_ejection again."""
    clock = Clock()
    pool = make_pool(3, clock)
    detector = make_detector(pool, clock, consecutive_5xx=3, base_ejection=10.0)
    a = pool.backends[0]
    detector.answered(a, 500)
    detector.answered(a, 200)  # the run ends
    detector.answered(a, 500)
    detector.answered(a, 500)
    assert a.ejected_until is None
    detector.answered(a, 503)
    assert a.ejected_until == 10.0 and a not in pool.available and a.ejections == 1
    clock.advance(9.9)
    assert a.ejected_until is not None
    clock.advance(0.1)
    assert a.ejected_until is None and a in pool.available
    detector.answered(a, 200)  # probation over
    for _ in range(3):
        detector.answered(a, 500)
    assert a.ejected_until == clock.seconds() + 10.0


def test_failing_on_probation_ejects_again_for_longer() -> None:
    """Back from an ejection, one bad answer ejects again, one step longer each time."""
    clock = Clock()
    pool = make_pool(3, clock)
    detector = make_detector(pool, clock, consecutive_gateway_errors=2, base_ejection=5.0)
    a = pool.backends[0]
    detector.gateway_error(a, "connection failed")
    detector.answered(a, 502)
    lengths = [a.ejected_until - clock.seconds()]
    for _ in range(3):
        clock.advance(lengths[-1])
        assert a.ejected_until is None
        detector.answered(a, 504)
        lengths.append(a.ejected_until - clock.seconds())
    assert lengths == [5.0, 10.0, 15.0, 20.0]


def test_gateway_errors_count_only_502_503_504() -> None:
    """A 500 breaks neither run of consecutive_gateway_errors... but counts as 5xx."""
    clock = Clock()
    pool = make_pool(3, clock)
    detector = make_detector(pool, clock, consecutive_gateway_errors=2)
    a = pool.backends[0]
    detector.answered(a, 502)
    detector.answered(a, 500)
    assert a.ejected_until is None
    detector.answered(a, 503)
    assert a.ejected_until is not None


def test_ejection_cap_keeps_half_the_pool() -> None:
    """With max_ejection_percent 50 only one of two backends is ever ejected at once."""
    clock = Clock()
    pool = make_pool(2, clock)
    detector = make_detector(pool, clock, consecutive_5xx=1, base_ejection=10.0)
    a, b = pool.backends
    detector.answered(a, 500)
    detector.answered(b, 500)
    assert a.ejected_until is not None and b.ejected_until is None
    clock.advance(10)
    detector.answered(b, 500)  # a is back: b may go now
    assert b.ejected_until is not None


def test_removed_backend_is_forgotten() -> None:
    """A backend that left the pool is never ejected and leaves no state behind."""
    clock = Clock()
    pool = make_pool(3, clock)
    detector = make_detector(pool, clock, consecutive_5xx=1)
    a = pool.backends[0]
    pool.remove(a)
    detector.answered(a, 500)
    assert a.ejected_until is None
    detector.answered(pool.backends[0], 500)
    assert a not in detector._runs


# -- the queue -------------------------------------------------------------------------

def test_queue_is_fifo_bounded_and_times_out() -> None:
    """Waiters are served in order; one over ``max`` is refused; the wait is bounded."""
    clock = Clock()
    queue = WaitQueue(clock, max=2, timeout=5.0)
    served: list[str] = []
    expired: list[str] = []
    slots = [0]

    def waiter(name: str):
        def try_slot():
            if not slots[0]:
                return None
            slots[0] -= 1
            return lambda: served.append(name)
        return queue.join(try_slot, lambda: expired.append(name))

    assert waiter("a") is not None and waiter("b") is not None
    assert waiter("c") is None and queue.refused == 1
    slots[0] = 1
    queue.wake()
    assert served == ["a"] and len(queue) == 1
    clock.advance(4.9)
    assert expired == []
    clock.advance(0.1)
    assert expired == ["b"] and len(queue) == 0 and queue.timed_out == 1


def test_leaving_the_queue_is_immediate() -> None:
    """A waiter that leaves is gone at once, its timer cancelled, and never served."""
    clock = Clock()
    queue = WaitQueue(clock, max=3, timeout=5.0)
    served: list[int] = []
    tickets = [queue.join(lambda i=i: (lambda: served.append(i)), lambda: None)
               for i in range(3)]
    queue.leave(tickets[0])
    assert len(queue) == 2 and not tickets[0].timer
    assert len(clock.getDelayedCalls()) == 2
    queue.wake()
    assert served == [1, 2]
    assert clock.getDelayedCalls() == []


def test_queue_off_refuses_at_once() -> None:
    """max 0 (the default) is no queue."""
    queue = WaitQueue(Clock())
    assert queue.join(lambda: None, lambda: None) is None


# -- limits and backups ------------------------------------------------------------------

def test_full_backend_is_no_candidate() -> None:
    """At max_requests a backend is skipped; with all full, the pool says so."""
    pool = BackendPool([BackendConfig("http://127.0.0.1:9000", max_requests=1),
                        BackendConfig("http://127.0.0.1:9001", max_requests=1)], clock=Clock(),
                       queue=QueueConfig(max=2))
    a, b = pool.backends
    a.in_flight = 1
    assert {pool.choose() for _ in range(4)} == {b}
    b.in_flight = 1
    assert pool.choose() is None and pool.all_full()
    assert not pool.all_full(tried=[a, b])


def test_backups_only_while_no_primary_is_available() -> None:
    """Backups are candidates only while every primary is out, and leave when one is back."""
    pool = BackendPool([BackendConfig("http://127.0.0.1:9000"),
                        BackendConfig("http://127.0.0.1:9001", backup=True)], clock=Clock())
    primary, backup = pool.backends
    assert pool.available == [primary]
    pool.set_healthy(primary, False, "test")
    assert pool.available == [backup]
    pool.set_healthy(primary, True, "test")
    assert pool.available == [primary]


def test_retry_policy_reads_retry_on() -> None:
    """The names of proxy.retry_on become the flags and statuses the proxy tests."""
    policy = RetryPolicy.from_names(["503", "timeout"])
    assert not policy.connect_failure and policy.timeout
    assert policy.statuses == frozenset({503})
    assert RetryPolicy.from_names(["connect_failure"]) == RetryPolicy()


# -- the admin API -----------------------------------------------------------------------

def admin_api(pool: BackendPool):
    from equalizer.admin.api import AdminAPI
    from equalizer.balancer.stats import TrafficStats
    from equalizer.testing import FakeStore

    clock = Clock()
    return AdminAPI(pool, TrafficStats(started=0), clock, FakeStore(clock), None).site()


def call(site, method: str, path: str, body: object = None):
    from equalizer.testing import send

    return send(site, method, path, b"" if body is None else json.dumps(body).encode())


def test_admin_adds_and_changes_max_requests_and_backup() -> None:
    """POST and PUT /backends take max_requests and backup; /stats shows them, the queue
    and the ejection state."""
    pool = make_pool(1)
    site = admin_api(pool)
    added = call(site, "POST", "/backends",
                 {"url": "http://127.0.0.1:9100", "max_requests": 4, "backup": True}).json()
    assert (added["max_requests"], added["backup"], added["ejected_until"]) == (4, True, None)
    assert pool.available == [pool.backends[0]]
    changed = call(site, "PUT", f"/backends/{added['id']}",
                   {"max_requests": 0, "backup": False}).json()
    assert (changed["max_requests"], changed["backup"]) == (0, False)
    assert len(pool.available) == 2
    stats = call(site, "GET", "/stats").json()
    assert stats["queue"]["length"] == 0
    assert {b["ejections"] for b in stats["backends"]} == {0}


@pytest.mark.parametrize(("body", "message"), [
    ({"max_requests": -1}, "max_requests: "),
    ({"max_requests": "3"}, "max_requests: "),
    ({"backup": "yes"}, "backup: must be true or false"),
])
def test_admin_refuses_bad_limits_and_changes_nothing(body: dict, message: str) -> None:
    """A bad max_requests or backup is 400 naming the field, and nothing changes."""
    pool = make_pool(1)
    site = admin_api(pool)
    backend = pool.backends[0]
    response = call(site, "PUT", f"/backends/{backend.id}", {"weight": 7, **body})
    assert response.status == 400
    assert response.json()["error"]["message"].startswith(message)
    assert (backend.weight, backend.max_requests, backend.backup) == (1, 0, False)


# -- configuration -----------------------------------------------------------------------

def test_configuration_reads_the_new_keys() -> None:
    """retry_on, slow_start, queue, max_requests, backup and outlier parse to the model."""
    from equalizer.config.loader import parse_config

    config = parse_config({
        "proxy": {"retry_on": ["connect_failure", 503, "timeout"]},
        "balancer": {"slow_start": "10s", "queue": {"max": 2, "timeout": "1s"},
                     "backends": [{"url": "http://127.0.0.1:1", "max_requests": 1,
                                   "backup": True}]},
        "health": {"outlier": {"consecutive_5xx": 3, "base_ejection": "5s"}},
    })
    assert config.proxy.retry_on == ("connect_failure", "503", "timeout")
    assert (config.balancer.slow_start, config.balancer.queue) == (10.0, QueueConfig(2, 1.0))
    assert config.balancer.backends[0] == BackendConfig("http://127.0.0.1:1", 1, 1, True)
    assert config.health.outlier == OutlierConfig(3, 0, 5.0, 50)
    assert config.health.outlier.enabled and not OutlierConfig().enabled


def test_configuration_refuses_bad_values_naming_each_key() -> None:
    """Every bad value is reported at once, with its key path."""
    from equalizer.config.loader import ConfigError, parse_config

    with pytest.raises(ConfigError) as caught:
        parse_config({
            "proxy": {"retry_on": [500]},
            "balancer": {"queue": {"max": -1, "timeout": 0},
                         "backends": [{"url": "http://127.0.0.1:1", "backup": "yes"}]},
            "health": {"outlier": {"max_ejection_percent": 101}},
        })
    keys = sorted(problem.split(":")[0] for problem in caught.value.problems)
    assert keys == ["balancer.backends[0].backup", "balancer.queue.max",
                    "balancer.queue.timeout", "health.outlier.max_ejection_percent",
                    "proxy.retry_on[0]"]


def test_health_counts_a_standing_by_backup_as_healthy() -> None:
    """A backup waiting while the primaries serve does not make /health degraded; an
    ejected backend does."""
    pool = BackendPool([BackendConfig("http://127.0.0.1:9000"),
                        BackendConfig("http://127.0.0.1:9001", backup=True)], clock=Clock())
    site = admin_api(pool)
    assert call(site, "GET", "/health").json()["status"] == "ok"
    pool.set_ejected(pool.backends[0], 100.0)
    body = call(site, "GET", "/health").json()
    assert (body["status"], body["backends"]["healthy"]) == ("degraded", 1)
