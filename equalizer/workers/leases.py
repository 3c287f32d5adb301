"""One limit across workers: workers lease tokens from the supervisor's store.

Each worker's bucket store is a :class:`~equalizer.buckets.leasing.LeasingStore`, the
same one that leases from PostgreSQL, over a :class:`RemoteStore` whose settlements
go to the supervisor over the control channel (:class:`~equalizer.workers.commands.Settle`).
The supervisor settles them on its own store: with ``store: postgres`` on the
database (``equalizer_settle``), so a worker is one more leasing instance; with
``store: memory`` on the in-memory buckets by :func:`settle_in_memory`, the same
rule as the SQL function. So the bound of the leasing design holds per worker: over
any window all workers together admit at most one bucket's worth plus, per worker,
the allowance it held when the window began (at most ``min(1024, max(1, C // 10))``
tokens, and at most ``R * 10 s``).
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, succeed

from equalizer.buckets.maths import Bucket, credit, refill
from equalizer.histogram import DurationHistogram

if TYPE_CHECKING:
    from collections.abc import Callable

    from equalizer.buckets.memory import MemoryStore
    from equalizer.buckets.postgres.leases import Settlement


def settle_in_memory(store: MemoryStore, batch: list[Settlement],
                     now: float) -> list[tuple[Any, ...]]:
    """``equalizer_settle`` (schema 0006) on a MemoryStore's buckets: per key, refill,
    take back what is given back, grant ``min(floor(T), waiting + min(extra,
    max(1, C // 10)))``; a key without a bucket is made from its default (full) when
    requests wait for it or a lease is asked for, or else answers no row (not limited)."""
    rows: list[tuple[Any, ...]] = []
    buckets = store.buckets
    for client_id, waiting, extra, back, default_capacity, default_rate in batch:
        entry = buckets.get(client_id)
        if entry is None:
            if default_capacity is None or not (waiting or extra):
                continue
            bucket = Bucket(default_capacity, float(default_capacity), default_rate, now)
            created = updated = now
        else:
            stored, created = entry
            bucket = refill(stored, now)
            updated = max(now, stored.updated)
        capacity = bucket.capacity
        tokens = credit(capacity, bucket.tokens, back)
        granted = min(math.floor(tokens), waiting + min(extra, max(1, capacity // 10)))
        tokens -= granted
        buckets[client_id] = (Bucket(capacity, tokens, bucket.refill_rate, updated), created)
        rows.append((client_id, granted, tokens, capacity, bucket.refill_rate))
    return rows


class RemoteLeases:
    """What a LeasingStore needs of its database (``LeaseDatabase``), over the channel."""

    def __init__(self, send: Callable[[list[Settlement]], Deferred[str]]) -> None:
        self._send = send
        self.available = True

    def settle(self, batch: list[Settlement]) -> Deferred[list[tuple[Any, ...]]]:
        return self._send(batch).addCallback(
            lambda rows: [tuple(row) for row in json.loads(rows)])


class RemoteStore:
    """The part of a PostgresStore a LeasingStore wraps, standing for the supervisor's
    store: ``start`` fires once the supervisor has sent the backends (ready to serve)."""

    bucket_count = None
    swept = 0

    def __init__(self, send: Callable[[list[Settlement]], Deferred[str]],
                 started: Deferred[None]) -> None:
        self._leases = RemoteLeases(send)
        self._started = started
        self.query_durations = DurationHistogram()

    @property
    def available(self) -> bool:
        return self._leases.available

    def leases(self) -> RemoteLeases:
        return self._leases

    def configure(self, config: object) -> None:
        """Nothing: the supervisor's store has the settings."""

    def start(self) -> Deferred[None]:
        return self._started

    def stop(self) -> Deferred[None]:
        self._leases.available = False
        return succeed(None)


def encode_rows(rows: list[tuple[Any, ...]]) -> str:
    return json.dumps([list(row) for row in rows], ensure_ascii=False, default=float)
