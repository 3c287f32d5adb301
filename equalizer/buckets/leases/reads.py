"""Reads that merge the leased state: ``get`` and ``list`` of a leasing store show each
row plus what this instance took out of it and did not use (its allowance, expired
or not, and tokens waiting to go back; capped at the capacity).

A read is made while no settlement for its key is in flight, and holds the key's
next one back until it is answered (a list does so for every key,
:meth:`~equalizer.buckets.leases.settlement.Settlements.apart`), so each leased token
is counted once, in the row or here: exact with one instance; other instances'
allowances count as taken.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs
from twisted.internet.defer import Deferred

from equalizer.buckets.maths import credit

if TYPE_CHECKING:
    from equalizer.buckets.interface import BucketRecord, IBucketStore
    from equalizer.buckets.leases.allowances import Allowances
    from equalizer.buckets.leases.settlement import Settlements


class Reads:
    """Bucket reads through a leasing store.

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

    def get(self, client_id: str) -> Deferred[BucketRecord | None]:
        return Deferred.fromCoroutine(self._settlements.apart(
            client_id, lambda: self._store.get(client_id).addCallback(self._with_leased)))

    def list(self, limit: int, offset: int) -> Deferred[tuple[list[BucketRecord], int]]:
        return Deferred.fromCoroutine(self._settlements.apart_all(
            lambda: self._store.list(limit, offset).addCallback(self._page)))

    def _page(self, page: tuple[list[BucketRecord], int]) -> tuple[list[BucketRecord], int]:
        records, total = page
        return [self._with_leased(record) for record in records], total

    def _with_leased(self, record: BucketRecord | None) -> BucketRecord | None:
        """Count the tokens this instance took out of the row and did not use as the
        client's. Exact with one instance; other instances' leases count as taken."""
        if record is None:
            return None
        leased = self._allowances.leased(record.client_id)
        if not leased:
            return record
        return attrs.evolve(record, tokens=credit(record.capacity, record.tokens, leased))
