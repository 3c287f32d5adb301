"""Balancing strategies (SPEC 4.2), alone and behind the BackendPool's filtering."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections import Counter

import pytest

from equalizer.balancer.pool import Backend, BackendPool
from equalizer.balancer.strategies import (
    STRATEGIES,
    LeastConnections,
    PowerOfTwo,
    Random,
    RendezvousHash,
    RoundRobin,
    WeightedRoundRobin,
    make_strategy,
)
from equalizer.config.model import STRATEGY_NAMES, BackendConfig


def backends(*weights: int) -> list[Backend]:
    """Backends b1, b2, ... on ports 9001, 9002, ... with the given weights."""
    return [
        Backend.from_url(f"b{i}", f"http://127.0.0.1:{9000 + i}", weight)
        for i, weight in enumerate(weights, start=1)
    ]


def picks(strategy, candidates: list[Backend], n: int, key: bytes | None = None) -> list[str]:
    """The ids of ``n`` successive choices."""
    return [strategy.choose(candidates, key).id for _ in range(n)]


def keys(n: int) -> list[bytes]:
    """``n`` distinct hash keys shaped like client addresses."""
    return [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}".encode() for i in range(n)]


class RecordingList(list):
    """A candidate list that records which positions a strategy looked at."""

    def __init__(self, items: list[Backend]) -> None:
        super().__init__(items)
        self.seen: list[int] = []

    def __getitem__(self, index):
        self.seen.append(index)
        return super().__getitem__(index)


# round_robin


def test_round_robin_sequence() -> None:
    """Round robin gives each candidate in list order, then starts again."""
    assert picks(RoundRobin(), backends(1, 1, 1), 7) == ["b1", "b2", "b3", "b1", "b2", "b3", "b1"]


def test_round_robin_k_each() -> None:
    """N backends and kN sequential requests give exactly k requests each."""
    counts = Counter(picks(RoundRobin(), backends(1, 1, 1, 1), 4 * 25))
    assert counts == {"b1": 25, "b2": 25, "b3": 25, "b4": 25}


def test_round_robin_ignores_weights() -> None:
    """Plain round robin shares requests evenly whatever the weights."""
    counts = Counter(picks(RoundRobin(), backends(5, 1), 10))
    assert counts == {"b1": 5, "b2": 5}


def test_round_robin_copes_with_shrinking_candidates() -> None:
    """When the candidate list gets shorter, round robin keeps going within it."""
    strategy = RoundRobin()
    pool = backends(1, 1, 1)
    assert picks(strategy, pool, 3) == ["b1", "b2", "b3"]
    assert picks(strategy, pool[:2], 4) == ["b2", "b1", "b2", "b1"]


# weighted_round_robin


def test_weighted_round_robin_nginx_sequence() -> None:
    """Weights a=5, b=1, c=1 give nginx's documented smooth sequence a a b a c a a."""
    strategy = WeightedRoundRobin()
    a, b, c = candidates = backends(5, 1, 1)
    expected = [a, a, b, a, c, a, a]
    assert [strategy.choose(candidates, None) for _ in range(7)] == expected
    assert [strategy.choose(candidates, None) for _ in range(7)] == expected


def test_weighted_round_robin_counts_follow_weights_every_cycle() -> None:
    """Every cycle of sum(weights) picks gives each backend exactly its weight."""
    strategy = WeightedRoundRobin()
    candidates = backends(3, 2, 1, 4)
    for _ in range(20):
        counts = Counter(picks(strategy, candidates, 10))
        assert counts == {"b1": 3, "b2": 2, "b3": 1, "b4": 4}


def test_weighted_round_robin_is_smooth() -> None:
    """A heavy backend's picks are spread out: a light one is never starved for a cycle."""
    strategy = WeightedRoundRobin()
    sequence = picks(strategy, backends(8, 1, 1), 10)
    assert "b1b1b1b1b1" not in "".join(sequence[:9])
    assert sequence.count("b2") == sequence.count("b3") == 1


def test_weighted_round_robin_equal_weights_is_round_robin() -> None:
    """With equal weights the smooth sequence is plain round robin."""
    assert picks(WeightedRoundRobin(), backends(2, 2, 2), 6) == ["b1", "b2", "b3"] * 2


def test_weighted_round_robin_copes_with_changing_candidates() -> None:
    """Backends leaving and returning between calls keep the long-run counts on weight."""
    strategy = WeightedRoundRobin()
    a, b, c = everything = backends(2, 1, 1)
    picks(strategy, everything, 3)
    assert Counter(picks(strategy, [a, b], 300)) == pytest.approx({"b1": 200, "b2": 100}, abs=2)
    assert Counter(picks(strategy, [c, a], 300)) == pytest.approx({"b1": 200, "b3": 100}, abs=2)
    counts = Counter(picks(strategy, everything, 400))
    assert counts == pytest.approx({"b1": 200, "b2": 100, "b3": 100}, abs=2)


def test_weighted_round_robin_new_backend_joins() -> None:
    """A backend never seen before joins the rotation at its weight."""
    strategy = WeightedRoundRobin()
    a, b, c = backends(1, 1, 2)
    picks(strategy, [a, b], 5)
    counts = Counter(picks(strategy, [a, b, c], 400))
    assert counts == pytest.approx({"b1": 100, "b2": 100, "b3": 200}, abs=2)


def test_weighted_round_robin_weight_change_takes_effect() -> None:
    """Changing a backend's weight changes its share from the next picks on."""
    strategy = WeightedRoundRobin()
    candidates = backends(1, 1)
    picks(strategy, candidates, 4)
    candidates[0].weight = 3
    assert Counter(picks(strategy, candidates, 400)) == pytest.approx({"b1": 300, "b2": 100}, abs=2)


def test_weighted_round_robin_forgets_removed_backends() -> None:
    """State for backends that stopped being candidates does not grow without bound."""
    strategy = WeightedRoundRobin()
    steady = backends(1, 1)
    for _ in range(100):
        strategy.choose([*steady, *backends(1)], None)
    assert len(strategy._current) <= 2 * 3 + 8


# least_connections


def test_least_connections_picks_fewest_in_flight() -> None:
    """The candidate with the fewest requests in flight wins."""
    candidates = backends(1, 1, 1, 1)
    for backend, in_flight in zip(candidates, [4, 2, 1, 3], strict=True):
        backend.in_flight = in_flight
    strategy = LeastConnections()
    assert picks(strategy, candidates, 5) == ["b3"] * 5


def test_least_connections_ties_rotate_round_robin() -> None:
    """With everything idle, least connections is plain round robin."""
    expected = ["b1", "b2", "b3"] * 2 + ["b1"]
    assert picks(LeastConnections(), backends(1, 1, 1), 7) == expected


def test_least_connections_ties_rotate_among_tied_only() -> None:
    """Backends tied on the fewest take turns; busier ones are skipped."""
    candidates = backends(1, 1, 1, 1)
    candidates[0].in_flight = 2
    candidates[1].in_flight = 1
    candidates[2].in_flight = 1
    candidates[3].in_flight = 2
    assert picks(LeastConnections(), candidates, 6) == ["b2", "b3"] * 3


def test_least_connections_follows_load() -> None:
    """Counting each pick as in flight spreads requests evenly, lowest first."""
    candidates = backends(1, 1, 1)
    candidates[0].in_flight = 2
    strategy = LeastConnections()
    chosen = []
    for _ in range(7):
        backend = strategy.choose(candidates, None)
        backend.in_flight += 1
        chosen.append(backend.id)
    assert chosen == ["b2", "b3", "b2", "b3", "b1", "b2", "b3"]
    assert [b.in_flight for b in candidates] == [3, 3, 3]


# random


def test_random_covers_all_candidates_evenly() -> None:
    """Random picks every candidate, each roughly equally often."""
    counts = Counter(picks(Random(random.Random(1)), backends(1, 1, 1, 1), 4000))
    assert set(counts) == {"b1", "b2", "b3", "b4"}
    assert all(abs(n - 1000) < 150 for n in counts.values())


def test_random_is_deterministic_with_a_seeded_rng() -> None:
    """The same seed gives the same sequence of choices."""
    candidates = backends(1, 1, 1)
    first = picks(make_strategy("random", random.Random(7)), candidates, 50)
    second = picks(make_strategy("random", random.Random(7)), candidates, 50)
    assert first == second


# power_of_two


def test_power_of_two_never_picks_the_busier_of_its_two() -> None:
    """Of the two distinct candidates it looks at, the one with fewer in flight wins."""
    strategy = PowerOfTwo(random.Random(3))
    pool = backends(1, 1, 1, 1, 1)
    for backend, in_flight in zip(pool, [3, 0, 4, 1, 2], strict=True):
        backend.in_flight = in_flight
    chosen_ids = Counter()
    for _ in range(2000):
        candidates = RecordingList(pool)
        chosen = strategy.choose(candidates, None)
        looked_at = {pool[i] for i in candidates.seen}
        assert len(looked_at) == 2
        assert chosen in looked_at
        assert chosen.in_flight == min(b.in_flight for b in looked_at)
        chosen_ids[chosen.id] += 1
    assert "b3" not in chosen_ids
    assert set(chosen_ids) == {"b1", "b2", "b4", "b5"}
    # The idlest wins whenever it is drawn: 4 of the 10 pairs.
    assert abs(chosen_ids["b2"] - 800) < 100


def test_power_of_two_ties_may_go_either_way() -> None:
    """With equal load both candidates get picked."""
    counts = Counter(picks(PowerOfTwo(random.Random(5)), backends(1, 1), 200))
    assert set(counts) == {"b1", "b2"}


def test_power_of_two_single_candidate() -> None:
    """With one candidate, power of two returns it."""
    candidates = backends(1)
    candidates[0].in_flight = 9
    assert picks(PowerOfTwo(random.Random(0)), candidates, 3) == ["b1"] * 3


# hash


def test_hash_same_key_same_backend() -> None:
    """A key maps to the same backend every time and in a fresh strategy."""
    candidates = backends(1, 1, 1, 1)
    strategy = RendezvousHash()
    for key in keys(200):
        first = strategy.choose(candidates, key)
        assert strategy.choose(candidates, key) is first
        assert RendezvousHash().choose(candidates, key) is first


def test_hash_ignores_candidate_order() -> None:
    """The choice depends on the backends, not on their order in the list."""
    candidates = backends(1, 1, 1, 1)
    strategy = RendezvousHash()
    for key in keys(500):
        assert strategy.choose(candidates, key) is strategy.choose(candidates[::-1], key)


def test_hash_depends_on_url_not_object() -> None:
    """Backends rebuilt from the same URLs (a restart) get the same keys."""
    before, after = backends(1, 1, 1), backends(1, 1, 1)
    strategy = RendezvousHash()
    for key in keys(300):
        assert strategy.choose(before, key).url == strategy.choose(after, key).url


def test_hash_is_stable_across_processes() -> None:
    """Another interpreter, with a different hash seed, maps keys identically."""
    script = (
        "from equalizer.balancer.pool import Backend\n"
        "from equalizer.balancer.strategies import RendezvousHash\n"
        "bs = [Backend.from_url(f'b{i}', f'http://127.0.0.1:{9000 + i}') for i in (1, 2, 3, 4)]\n"
        "s = RendezvousHash()\n"
        "print(''.join(s.choose(bs, f'key-{i}'.encode()).id[1] for i in range(300)))\n"
    )
    candidates = backends(1, 1, 1, 1)
    strategy = RendezvousHash()
    here = "".join(strategy.choose(candidates, f"key-{i}".encode()).id[1] for i in range(300))
    for seed in ("1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        there = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
        ).stdout.strip()
        assert there == here


def test_hash_distribution_is_even() -> None:
    """10,000 keys over 4 equal backends land within 20% of 2,500 on each."""
    candidates = backends(1, 1, 1, 1)
    strategy = RendezvousHash()
    counts = Counter(strategy.choose(candidates, key).id for key in keys(10_000))
    assert set(counts) == {"b1", "b2", "b3", "b4"}
    for n in counts.values():
        assert 2000 <= n <= 3000


def test_hash_removing_a_backend_moves_only_its_keys() -> None:
    """Taking 1 of 4 backends out moves exactly the keys it had, and no others."""
    candidates = backends(1, 1, 1, 1)
    strategy = RendezvousHash()
    all_keys = keys(10_000)
    before = {key: strategy.choose(candidates, key) for key in all_keys}
    removed = candidates[2]
    remaining = [b for b in candidates if b is not removed]
    after = {key: strategy.choose(remaining, key) for key in all_keys}
    moved_elsewhere = [
        k for k in all_keys if before[k] is not removed and after[k] is not before[k]
    ]
    assert moved_elsewhere == []
    orphans = [k for k in all_keys if before[k] is removed]
    assert len(orphans) > 2000
    # The orphans spread over the three that are left.
    spread = Counter(after[k].id for k in orphans)
    assert set(spread) == {"b1", "b2", "b4"}
    assert all(n > len(orphans) / 3 * 0.8 for n in spread.values())


def test_hash_adding_a_backend_moves_keys_only_to_it() -> None:
    """A new backend takes keys only for itself; no key moves between old backends."""
    old = backends(1, 1, 1, 1)
    new = Backend.from_url("b5", "http://127.0.0.1:9005")
    strategy = RendezvousHash()
    for key in keys(5000):
        before = strategy.choose(old, key)
        after = strategy.choose([*old, new], key)
        assert after is before or after is new


def test_hash_retry_goes_to_next_best() -> None:
    """Leaving out the first choice (a retry) gives the key the same second choice each time."""
    candidates = backends(1, 1, 1, 1)
    strategy = RendezvousHash()
    for key in keys(200):
        first = strategy.choose(candidates, key)
        rest = [b for b in candidates if b is not first]
        second = strategy.choose(rest, key)
        assert second is not first
        assert strategy.choose(rest[::-1], key) is second


def test_hash_follows_weights() -> None:
    """Weighted rendezvous gives a backend a share of keys in proportion to its weight."""
    candidates = backends(3, 1)
    strategy = RendezvousHash()
    counts = Counter(strategy.choose(candidates, key).id for key in keys(10_000))
    assert abs(counts["b1"] - 7500) < 300


def test_hash_without_key_is_round_robin() -> None:
    """A request with no key falls back to round robin."""
    assert picks(RendezvousHash(), backends(1, 1, 1), 4) == ["b1", "b2", "b3", "b1"]


# make_strategy and the pool


def test_make_strategy_builds_every_strategy() -> None:
    """Every strategy name in SPEC 3 builds a strategy that picks a candidate."""
    names = {
        "round_robin",
        "weighted_round_robin",
        "least_connections",
        "random",
        "power_of_two",
        "hash",
    }
    assert set(STRATEGIES) == names
    candidates = backends(1, 2)
    for name in names:
        strategy = make_strategy(name, random.Random(0))
        assert strategy.choose(candidates, b"k") in candidates
        assert strategy.choose(candidates, None) in candidates


def test_make_strategy_gives_fresh_state() -> None:
    """Two strategies from make_strategy do not share a rotation."""
    candidates = backends(1, 1)
    first = make_strategy("round_robin")
    first.choose(candidates, None)
    assert make_strategy("round_robin").choose(candidates, None) is candidates[0]


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_pool_never_returns_an_unavailable_backend(name: str) -> None:
    """Whatever the strategy, the pool never chooses a disabled, draining or unhealthy backend."""
    pool = BackendPool(
        [BackendConfig(f"http://127.0.0.1:{9000 + i}", weight=i) for i in range(1, 7)], name
    )
    pool.strategy = make_strategy(name, random.Random(11))
    b1, b2, b3, b4, b5, b6 = pool.backends
    pool.set_enabled(b1, False)
    pool.drain(b3)
    pool.set_healthy(b5, False, "test")
    b4.in_flight = 0
    b2.in_flight = 5
    b6.in_flight = 9
    usable = {b2, b4, b6}
    chosen = set()
    for i in range(600):
        backend = pool.choose(str(i).encode() if i % 2 else None)
        assert backend in usable
        chosen.add(backend)
    assert chosen <= usable
    # With a backend already tried, the pool still stays within the usable ones.
    for i in range(100):
        assert pool.choose(str(i).encode(), tried=[b4]) in {b2, b6}
    # Bringing them back makes them candidates again.
    pool.set_enabled(b1, True)
    pool.cancel_drain(b3)
    pool.set_healthy(b5, True, "test")
    b2.in_flight = b6.in_flight = 0
    seen = {pool.choose(str(i).encode() if i % 2 else None) for i in range(600)}
    assert seen == set(pool.backends)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_pool_with_nothing_available_returns_none(name: str) -> None:
    """When every backend is unavailable the pool returns None without asking the strategy."""
    pool = BackendPool([BackendConfig("http://127.0.0.1:9001")], name)
    pool.set_healthy(pool.backends[0], False, "test")
    assert pool.choose(b"k") is None
    assert pool.choose(None) is None


def test_config_names_every_strategy() -> None:
    """The names config accepts for balancer.strategy are exactly the registry's, so a
    strategy added here is also accepted in YAML (config sits below the balancer)."""
    assert sorted(STRATEGY_NAMES) == sorted(STRATEGIES)
