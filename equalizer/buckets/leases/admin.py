"""The admin calls through a leasing store, in order with its settlements.

Reads (``get``, ``list``) show each row plus what this instance took out of it and
did not use (its allowance, expired or not, and tokens waiting to go back; capped
at the capacity). A read is made while no settlement for its key is in flight,
and holds the key's next one back until it is answered (a list does so for every
key, :meth:`~equalizer.buckets.leases.settlement.Settlements.apart`), so each
leased token is counted once, in the row or here: exact with one instance; other
instances' allowances count as taken.

Writes (``create``, ``update``, ``delete``) win over every lease and settlement in
flight when they are made. The key's allowance, tokens waiting to go back and
remembered decision are dropped at once (without giving anything back: the new
settings win), so takes stop using them. The write goes to the database only once
no settlement carrying the key is in flight, and the key's next settlements wait
for it: a settlement sent before the write, giving tokens back or leasing them,
cannot land on the row after it. What such a settlement granted still answers its
requests but leaves no allowance (the key's epoch moved); the key's state is
dropped again when the write is answered, whatever its outcome.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

import attrs
from twisted.internet.defer import Deferred

from equalizer.buckets.interface import bucket_key
from equalizer.buckets.maths import credit
from equalizer.config.model import DEFAULT_POLICY

if TYPE_CHECKING:
    from equalizer.buckets.interface import BucketRecord, IBucketStore
    from equalizer.buckets.leases.allowances import Allowances
    from equalizer.buckets.leases.settlement import Settlements

T = TypeVar("T")


class AdminCalls:
    """Bucket reads and writes through a leasing store.

    Args:
        store: where the rows are (the wrapped store).
        allowances: what this instance holds of them.
        settlements: which are in flight.
    """

    def __init__(self, store: IBucketStore, allowances: Allowances,
                 settlements: Settlements) -> None:
        self._store = store
        self._allowances = allowances
        self._settlements = settlements

    # reads ---------------------------------------------------------------------------------

    def get(self, client_id: str, policy: str = DEFAULT_POLICY
            ) -> Deferred[BucketRecord | None]:
        return Deferred.fromCoroutine(self._settlements.apart(
            bucket_key(policy, client_id),
            lambda: self._store.get(client_id, policy).addCallback(self._with_leased)))

    def list(self, limit: int, offset: int,
             policy: str = DEFAULT_POLICY) -> Deferred[tuple[list[BucketRecord], int]]:
        return Deferred.fromCoroutine(self._settlements.apart_all(
            lambda: self._store.list(limit, offset, policy).addCallback(self._page)))

    def _page(self, page: tuple[list[BucketRecord], int]) -> tuple[list[BucketRecord], int]:
        records, total = page
        return [self._with_leased(record) for record in records], total

    def _with_leased(self, record: BucketRecord | None) -> BucketRecord | None:
        """Count the tokens this instance took out of the row and did not use as the
        client's. Exact with one instance; other instances' leases count as taken."""
        if record is None:
            return None
        leased = self._allowances.leased(bucket_key(record.policy, record.client_id))
        if not leased:
            return record
        return attrs.evolve(record, tokens=credit(record.capacity, record.tokens, leased))

    # writes --------------------------------------------------------------------------------

    def create(self, client_id: str, capacity: int, tokens: float,
               refill_rate: float, policy: str = DEFAULT_POLICY) -> Deferred[BucketRecord]:
        return self._change(bucket_key(policy, client_id), lambda: self._store.create(
            client_id, capacity, tokens, refill_rate, policy))

    def update(self, client_id: str, capacity: int | None, tokens: float | None,
               refill_rate: float | None,
               policy: str = DEFAULT_POLICY) -> Deferred[BucketRecord | None]:
        return self._change(bucket_key(policy, client_id), lambda: self._store.update(
            client_id, capacity, tokens, refill_rate, policy))

    def delete(self, client_id: str, policy: str = DEFAULT_POLICY) -> Deferred[bool]:
        return self._change(bucket_key(policy, client_id),
                            lambda: self._store.delete(client_id, policy))

    def _change(self, client_id: str, write: Callable[[], Awaitable[T]]) -> Deferred[T]:
        self._allowances.drop(client_id)
        return Deferred.fromCoroutine(self._write(client_id, write))

    async def _write(self, client_id: str, write: Callable[[], Awaitable[T]]) -> T:
        try:
            return await self._settlements.apart(client_id, lambda: self._dropped(
                client_id, write))
        finally:
            self._allowances.drop(client_id)

    async def _dropped(self, client_id: str, write: Callable[[], Awaitable[T]]) -> T:
        self._allowances.drop(client_id)  # what a settlement that just landed left
        return await write()
