"""Count the PostgreSQL limiter's settlements for a load shape, on simulated time.

The leasing store (``equalizer.buckets.leasing``) decides how often each client key
goes to the database; the bench's runs show it only through a noisy machine. This runs
the store itself on a ``MemoryReactorClock`` against the tests' fake lease database
(the settle function's arithmetic in memory), sends ``--rate`` requests a second over
``--keys`` client keys (in turn, as the bench's wrk script does, or ``--random``), and
prints per second of the measured span: statements, rows (settled keys), requests that
waited for a statement, and rows per request. No sockets, no timing: the same command
gives the same figures.

Usage:

    python bench/leases.py [--keys 10000] [--rate 11000] [--random]
                           [--seconds 40] [--warmup 20]
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from twisted.internet.testing import MemoryReactorClock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from run import BIG_BUCKET, CONSTANT_CLIENT  # noqa: E402

from equalizer.buckets.leasing import LeasingStore  # noqa: E402
from equalizer.config.model import BucketPolicy  # noqa: E402
from equalizer.testing import FakeLeaseDatabase  # noqa: E402

TICK = 0.001
"""Seconds of simulated time between rounds of requests."""


def simulate(keys: int, rate: float, seconds: float, warmup: float,
             at_random: bool) -> dict[str, float]:
    """Figures per second of the span after ``warmup``."""
    clock = MemoryReactorClock()
    store = LeasingStore(FakeLeaseDatabase(clock), clock)
    store.start()
    policy = BucketPolicy(**BIG_BUCKET)  # the bench's bucket: never refuses
    choose = random.Random(1).randrange
    due, sent, before = 0.0, 0, None
    while clock.seconds() < seconds:
        due += rate * TICK
        while due >= 1:
            due -= 1
            key = choose(keys) if at_random else sent % keys
            store.take_now(f"{CONSTANT_CLIENT}-{key + 1}", policy)
            sent += 1
        clock.advance(TICK)
        if before is None and clock.seconds() >= warmup:
            before = (sent, store.statements, store.settled_keys, store.waits)
    if before is None:
        raise SystemExit("--seconds must be longer than --warmup")
    span = clock.seconds() - warmup
    requests, statements, rows, waits = (
        now - then for now, then in
        zip((sent, store.statements, store.settled_keys, store.waits), before, strict=True))
    return {"statements/s": statements / span, "rows/s": rows / span,
            "waits/s": waits / span, "rows per request": rows / requests}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=11_000.0, help="requests a second")
    parser.add_argument("--random", action="store_true",
                        help="each request's key at random (default: in turn)")
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--warmup", type=float, default=20.0)
    args = parser.parse_args()
    figures = simulate(args.keys, args.rate, args.seconds, args.warmup, args.random)
    order = "at random" if args.random else "in turn"
    print(f"{args.keys:,} keys {order} at {args.rate:,.0f} requests/s: " + ", ".join(
        f"{name} {value:,.3f}" if value < 1 else f"{name} {value:,.0f}"
        for name, value in figures.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
