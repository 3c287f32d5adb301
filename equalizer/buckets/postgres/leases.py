"""The database side of token leasing: the few statements it needs, and no others.

:class:`~equalizer.buckets.leasing.LeasingStore` reaches the database only through
a :class:`LeaseDatabase`, which a PostgresStore hands out for its own connections
(:meth:`~equalizer.buckets.postgres.store.PostgresStore.leases`).
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred

from equalizer.buckets.postgres.connection import Database, Rows
from equalizer.buckets.postgres.sql import SETTLE

Settlement = tuple[str, int, int, int, int | None, float | None]
"""One key of a settlement: client id, requests waiting, lease wanted beyond them,
tokens given back, default capacity (None: no default), default refill rate."""


class LeaseDatabase:
    """Settlements of leased tokens, on one :class:`Database`."""

    def __init__(self, database: Database) -> None:
        self._database = database

    @property
    def available(self) -> bool:
        return self._database.available

    def settle(self, batch: list[Settlement]) -> Deferred[Rows]:
        """One settlement for every key in ``batch`` (``equalizer_settle``, migrations
        0002, 0008 and 0009): per key found or created, ``(client id, granted, tokens left,
        capacity, refill rate)``. Fails as any query of the database does."""
        params: Any = (json.dumps(batch, ensure_ascii=False),)
        return self._database.query(SETTLE, params)
