"""Balancing strategies: each picks one backend from the candidates it is given.

A strategy never sees unavailable backends: the pool filters them out first, so
"never pick a disabled, draining or unhealthy backend" holds for all of them by
construction.

The pool calls ``choose`` on every request, so strategies do the least work they can:
one pass over the candidates, no lists built per call. The candidate list may
differ from one call to the next (a backend goes down, a retry leaves out the
backends already tried), so no strategy relies on positions staying the same.
"""

from __future__ import annotations

import random as _random
from collections.abc import Callable
from hashlib import blake2b
from math import log
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from equalizer.balancer.pool import Backend


class Strategy(Protocol):
    """Chooses one of a non-empty list of candidates; ``key`` feeds hashing strategies."""

    def choose(self, candidates: list[Backend], key: bytes | None) -> Backend: ...


class RoundRobin:
    """Each candidate in turn: N backends and kN sequential requests give k each."""

    def __init__(self) -> None:
        self._next = 0

    def choose(self, candidates: list[Backend], key: bytes | None) -> Backend:
        index = self._next % len(candidates)
        self._next = index + 1
        return candidates[index]


def _stale(state: dict, candidates: list[Backend]) -> bool:
    """Whether a per-backend table has grown well past the candidates, so is worth pruning.

    The slack keeps a pool with a few backends down from rebuilding its table on
    every call; pruning only forgets backends that are not candidates right now.
    """
    return len(state) > 2 * len(candidates) + 8


class WeightedRoundRobin:
    """Smooth weighted round robin, exactly as nginx does it.

    Each backend has a current weight, starting at 0. For each pick, every
    candidate's current weight grows by its weight; the candidate with the largest
    current weight wins (the first in the list on a tie), and the sum of the
    candidates' weights is taken off the winner. Over every cycle of sum(weights)
    picks each backend is chosen ``weight`` times, spread out rather than in runs:
    weights a=5, b=1, c=1 give a a b a c a a.

    The current weight belongs to the backend object, not to a position, so the
    candidate set can change between calls. A backend missing from a call keeps
    its current weight unchanged, as nginx leaves a skipped peer alone, and a new
    one starts at 0. Entries for backends that are no longer candidates are
    dropped once they far outnumber the candidates (see ``_stale``), so removed
    backends do not pile up; one that returns after that starts again at 0.
    Weights are read on each call, so a changed weight takes effect at once.
    """

    def __init__(self) -> None:
        self._current: dict[Backend, int] = {}

    def choose(self, candidates: list[Backend], key: bytes | None) -> Backend:
        current = self._current
        if _stale(current, candidates):
            self._current = current = {b: current.get(b, 0) for b in candidates}
        total = 0
        best = candidates[0]
        best_weight: int | None = None
        for backend in candidates:
            weight = backend.weight
            total += weight
            weight += current.get(backend, 0)
            current[backend] = weight
            if best_weight is None or weight > best_weight:
                best = backend
                best_weight = weight
        current[best] -= total
        return best


class LeastConnections:
    """The candidate with the fewest requests in flight; ties in round-robin order.

    The scan starts one past the previous winner's position and keeps the first
    candidate with the fewest in flight, so backends that are tied take turns, and
    with nothing in flight this is plain round robin.
    """

    def __init__(self) -> None:
        self._next = 0

    def choose(self, candidates: list[Backend], key: bytes | None) -> Backend:
        count = len(candidates)
        start = self._next % count
        best_index = start
        fewest = candidates[start].in_flight
        if fewest > 0:
            for offset in range(1, count):
                index = start + offset
                if index >= count:
                    index -= count
                in_flight = candidates[index].in_flight
                if in_flight < fewest:
                    best_index = index
                    fewest = in_flight
                    if in_flight <= 0:
                        break
        self._next = best_index + 1
        return candidates[best_index]


class Random:
    """A uniformly random candidate."""

    def __init__(self, rng: _random.Random | None = None) -> None:
        self._rng = rng if rng is not None else _random.Random()

    def choose(self, candidates: list[Backend], key: bytes | None) -> Backend:
        return candidates[self._rng.randrange(len(candidates))]


class PowerOfTwo:
    """Two distinct random candidates; the one with fewer in flight wins.

    Picking the better of two random choices keeps load almost as even as least
    connections, without every request herding onto the same momentarily idle
    backend. On a tie the first one drawn wins; with one candidate, that one.
    """

    def __init__(self, rng: _random.Random | None = None) -> None:
        self._rng = rng if rng is not None else _random.Random()

    def choose(self, candidates: list[Backend], key: bytes | None) -> Backend:
        count = len(candidates)
        if count == 1:
            return candidates[0]
        randrange = self._rng.randrange
        first = randrange(count)
        second = randrange(count - 1)
        if second >= first:
            second += 1
        a = candidates[first]
        b = candidates[second]
        return b if b.in_flight < a.in_flight else a


_SCORE_SCALE = 2.0**-52


class RendezvousHash:
    """Weighted rendezvous (highest random weight) hashing of the request key.

    Every candidate gets a score from a hash of the key and the backend's URL, and
    the highest score wins. A key's scores do not depend on which other backends
    exist, so taking a backend out moves only the keys it had, and the same key
    keeps its backend across calls and across processes. On a retry the key goes
    to its next-best backend.

    The hash is BLAKE2b with 8-byte digests, salted per backend with a digest of
    its URL (the salt costs nothing per call, unlike joining key and URL). The top
    52 bits make a uniform u in (0, 1), and the score is ``weight / -ln(u)``
    (Schindelhauer and Schomaker's weighted form), so each backend gets a share of
    keys proportional to its weight; with equal weights it is plain rendezvous
    hashing. A request without a key falls back to round robin.
    Slow start does not apply (``ramps``): it would move keys off their backend.
    """

    ramps = False

    def __init__(self) -> None:
        self._salts: dict[str, bytes] = {}
        self._fallback = RoundRobin()

    def choose(self, candidates: list[Backend], key: bytes | None) -> Backend:
        if key is None:
            return self._fallback.choose(candidates, key)
        salts = self._salts
        if _stale(salts, candidates):
            salts.clear()
        best = candidates[0]
        best_score = -1.0
        for backend in candidates:
            url = backend.url
            salt = salts.get(url)
            if salt is None:
                salt = salts[url] = blake2b(url.encode("utf-8"), digest_size=16).digest()
            digest = blake2b(key, digest_size=8, salt=salt).digest()
            u = ((int.from_bytes(digest, "big") >> 12) + 0.5) * _SCORE_SCALE
            score = backend.weight / -log(u)
            if score > best_score:
                best = backend
                best_score = score
        return best


STRATEGIES: dict[str, Callable[[_random.Random | None], Strategy]] = {
    "round_robin": lambda rng: RoundRobin(),
    "weighted_round_robin": lambda rng: WeightedRoundRobin(),
    "least_connections": lambda rng: LeastConnections(),
    "random": Random,
    "power_of_two": PowerOfTwo,
    "hash": lambda rng: RendezvousHash(),
}
"""Strategy names (the YAML ``balancer.strategy`` values) and how to build each one."""


def make_strategy(name: str, rng: _random.Random | None = None) -> Strategy:
    """A fresh strategy object for a validated strategy name.

    Args:
        rng: the source of randomness for ``random`` and ``power_of_two``; tests
            pass a seeded one. Other strategies ignore it.
    """
    return STRATEGIES[name](rng)
