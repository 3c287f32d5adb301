"""Buckets in PostgreSQL, shared by every instance on the database (SPEC section 5).

:class:`PostgresStore` keeps them in the ``buckets`` table, through a
:class:`~equalizer.buckets.postgres.connection.Database` (pool, timeouts,
reconnection; migrations at start). Decisions that make it correct across instances:

One statement per token.
    A take is a single ``INSERT ... ON CONFLICT (client_id) DO UPDATE ... RETURNING``
    (an ``UPDATE ... RETURNING`` when there is no default policy): it creates the
    bucket on first sight, refills and takes under the row lock (from the database
    clock, :mod:`~equalizer.buckets.postgres.sql`), and returns the outcome. No
    read-then-write across statements, so N instances admit exactly what one
    would: there is no slack. A take that waited on the row lock refills up to
    when it arrived, not when it got the lock: a few milliseconds of refill are
    forgone under contention, never granted twice. Each session prepares the two
    take statements once (``prepare=False`` sends them in full, for poolers in
    transaction mode). ``create``, ``update``, ``delete``, ``get`` and ``list``
    are single statements too. Takes commit with ``synchronous_commit = off``
    (set per session): should the database server crash, the last fraction of a
    second of token deductions may be lost (clients get those tokens back).
    Bucket definitions written through the admin API are committed durably.

Full default rows are swept.
    A row made from the default policy (``from_default``, migration 0004) that
    has refilled to its capacity holds no information; once also unchanged for
    :data:`SWEEP_IDLE` seconds (its client no longer active) it is deleted by a sweep
    every :func:`~equalizer.buckets.interface.sweep_interval` seconds, or every
    :data:`SWEEP_IDLE` seconds if that is longer (:meth:`PostgresStore.sweep`):
    batches of :data:`SWEEP_BATCH` rows in client id order over a partial index,
    each its own statement and transaction, locking with ``SKIP LOCKED`` and only
    when it gets a transaction-level advisory try-lock, so it never waits on a take
    and one instance sweeps at a time. Rows made or changed through the admin API are never swept.
"""

from __future__ import annotations

from typing import Any

import psycopg2
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from equalizer.buckets.interface import (
    MAX_SWEEP_INTERVAL,
    BucketExists,
    BucketRecord,
    IBucketStore,
    InvalidBucket,
    StoreDataError,
    StoreUnavailable,
    client_id_error,
    new_bucket_problem,
    sweep_interval,
    take_elsewhere,
    tokens_above_capacity,
    validate_fields,
)
from equalizer.buckets.maths import Decision, decide
from equalizer.buckets.postgres import sql
from equalizer.buckets.postgres.connection import Database, Rows
from equalizer.buckets.postgres.leases import LeaseDatabase
from equalizer.buckets.postgres.migrations import migrations
from equalizer.config.model import DEFAULT_POLICY, BucketPolicy, RateLimitConfig
from equalizer.histogram import DurationHistogram

log = Logger()

SWEEP_BATCH = 1000
"""Default rows one sweep statement looks at (deleting the full ones among them)."""

SWEEP_MAX_BATCHES = 100
"""Sweep statements per run at most; the next run goes on from where this one stopped."""

SWEEP_IDLE = 10.0
"""Seconds a full default row must have been unchanged to be swept. The leasing store
settles an active key's row at least every ``max_age`` (10 s), and with a bucket that
refills within a second the row is full again at each settlement: swept as soon as full,
it was deleted and inserted again at every lease (measured with 10,000 keys in turn:
10,000 dead rows a second, autovacuum behind, statements slower from one run to the
next)."""


@implementer(IBucketStore)
class PostgresStore:
    """Buckets in PostgreSQL, shared by every instance on the database (module docstring).

    Args:
        dsn: a libpq connection string or ``postgresql://`` URL.
        reactor: for sockets and timers (IReactorFDSet and IReactorTime).
        pool_size: connections held open; also the most queries in flight at once.
        query_timeout: seconds a query may take before the store gives up on the
            connection and reconnects.
        connect_timeout: seconds to connect a pool and set its sessions up.
        migrate_timeout: seconds the start-up migration may take (it may wait for
            another instance's).
        prepare: prepare the take statements once per session (server-side
            ``PREPARE``), which makes a take about twice as cheap for the server.
            Turn it off behind a pooler in transaction mode (PgBouncer), where a
            session's prepared statements are not there for its next transaction.
        min_backoff, max_backoff: reconnect delays, doubling from one to the other.
    """

    over_cap = 0  # no cap of its own: the table is bounded by the sweep

    def __init__(
        self,
        dsn: str,
        reactor: Any,
        pool_size: int = 8,
        query_timeout: float = 5.0,
        connect_timeout: float = 5.0,
        migrate_timeout: float = 60.0,
        prepare: bool = True,
        min_backoff: float = 0.5,
        max_backoff: float = 2.0,
        sweep_idle: float = SWEEP_IDLE,
    ) -> None:
        self._reactor = reactor
        self._sweep_idle = sweep_idle
        if prepare:
            setup = f"{sql.SESSION_SETUP}; {sql.PREPARE}"
            self._take_or_create = ("EXECUTE equalizer_take_or_create"
                                    "(%(p1)s, %(p2)s, %(p3)s, %(p4)s)")
            self._take_existing = "EXECUTE equalizer_take_existing(%(p1)s, %(p2)s)"
        else:
            setup = sql.SESSION_SETUP
            self._take_or_create = sql.inline(sql.TAKE_OR_CREATE)
            self._take_existing = sql.inline(sql.TAKE_EXISTING)
        self._database = Database(
            dsn, reactor, setup, pool_size=pool_size, query_timeout=query_timeout,
            connect_timeout=connect_timeout, migrate_timeout=migrate_timeout,
            min_backoff=min_backoff, max_backoff=max_backoff)
        self._query = self._database.query
        self.interval = MAX_SWEEP_INTERVAL
        self.bucket_count: int | None = None
        """Rows in the table (every instance's) as of the last sweep; None before it."""
        self.swept = 0
        """Full default rows this instance's sweeps deleted."""
        self._sweep_after = ("", "")  # the last (policy, client id) the sweep looked at
        self._sweep_call: IDelayedCall | None = None

    @property
    def available(self) -> bool:
        """False while the database is unreachable (for /health)."""
        return self._database.available

    @property
    def query_durations(self) -> DurationHistogram:
        """How long statements took, answered or failed (``/metrics``)."""
        return self._database.query_durations

    def query(self, sql: str, params: Any) -> Deferred[Rows]:
        """Run one statement on the store's database: its rows, or StoreUnavailable.

        Bounded by the query timeout; connection failures reconnect, as for takes.
        """
        return self._query(sql, params)

    def leases(self) -> LeaseDatabase:
        """The few operations token leasing needs, on this store's database."""
        return LeaseDatabase(self._database)

    # life cycle ----------------------------------------------------------------------

    def start(self) -> Deferred[None]:
        """Migrate the schema, connect the pool and serve.

        Fails with StoreUnavailable when the database cannot be reached; the store
        then stays stopped, and ``start`` may be called again.
        """
        return Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        if self._database.running:
            return
        await self._database.start(migrations())
        self._schedule_sweep(self.interval)

    def stop(self) -> Deferred[None]:
        """Close every connection, cancel the reconnect loop and the sweep."""
        self._database.stop()
        if self._sweep_call is not None and self._sweep_call.active():
            self._sweep_call.cancel()
        self._sweep_call = None
        return succeed(None)

    # the sweep ---------------------------------------------------------------------------

    def configure(self, config: RateLimitConfig) -> None:
        """Sweep every :func:`sweep_interval` of the default policy (start-up and reload),
        but at most once per ``sweep_idle``: a row goes only once unchanged that long, so
        sweeping every second looked at each row ten times for each time it could go (with
        10,000 keys in turn and a bucket that refills within a second, 10,000 rows a
        second looked at to delete none; in a paired run the database's CPU fell from
        6-7 % to 5 %)."""
        self.interval = max(sweep_interval(config.default), self._sweep_idle)
        call = self._sweep_call
        if call is not None and call.active():
            call.reset(min(self.interval, max(0.0, call.getTime() - self._reactor.seconds())))

    def _schedule_sweep(self, delay: float) -> None:
        if self._database.running and self._sweep_call is None:
            self._sweep_call = self._reactor.callLater(delay, self._sweep_tick)

    def _sweep_tick(self) -> None:
        def failed(failure: Failure) -> None:
            if failure.check(StoreUnavailable, StoreDataError):  # logged where raised
                log.debug("bucket sweep skipped: {error}", error=failure.value)
            else:
                log.failure("sweeping buckets failed", failure)

        def again(_: object) -> None:
            self._sweep_call = None
            self._schedule_sweep(self.interval)

        Deferred.fromCoroutine(self.sweep()).addErrback(failed).addBoth(again)

    async def sweep(self) -> int:
        """Delete full default rows unchanged for ``sweep_idle`` seconds: one run of the
        periodic sweep; how many went.

        At most SWEEP_MAX_BATCHES statements of SWEEP_BATCH rows each, one at a
        time, each its own short transaction; a run goes on from where the last
        stopped, and wraps around at the end. A statement that finds another
        instance's sweep statement running ends the run. Then counts the rows.
        """
        gone = 0
        for _ in range(SWEEP_MAX_BATCHES):
            after_policy, after = self._sweep_after
            params = {"lock": sql.SWEEP_LOCK, "after_policy": after_policy, "after": after,
                      "batch": SWEEP_BATCH, "idle": self._sweep_idle}
            got, examined, last, deleted = (await self._query(sql.SWEEP, params))[0]
            if not got:
                break
            gone += deleted
            self.swept += deleted
            if examined < SWEEP_BATCH:
                self._sweep_after = ("", "")
                break
            self._sweep_after = tuple(last)
        self.bucket_count = (await self._query(sql.COUNT, None))[0][0]
        return gone

    # IBucketStore ----------------------------------------------------------------------

    def take(self, client_id: str, default: BucketPolicy | None,
             policy: str = DEFAULT_POLICY) -> Deferred[Decision | None]:
        elsewhere = take_elsewhere(self, client_id, default, policy)
        if elsewhere is not None:
            return elsewhere
        if default is None:
            d = self._query(self._take_existing, {"p1": client_id, "p2": policy})
        else:
            params = {"p1": client_id, "p2": default.capacity, "p3": default.refill_rate,
                      "p4": policy}
            d = self._query(self._take_or_create, params)
        return d.addCallback(_decision)

    take_now = take  # every answer comes from the database

    def create(
        self, client_id: str, capacity: int, tokens: float, refill_rate: float,
        policy: str = DEFAULT_POLICY,
    ) -> Deferred[BucketRecord]:
        problem = new_bucket_problem(client_id, capacity, tokens, refill_rate)
        if problem is not None:
            return fail(problem)

        def created(rows: Rows) -> BucketRecord:
            if not rows:
                raise BucketExists(client_id)
            return BucketRecord(*rows[0])

        d = self._query(sql.CREATE, (client_id, capacity, float(tokens), float(refill_rate),
                                     policy))
        return d.addCallbacks(created, _invalid)

    def get(self, client_id: str, policy: str = DEFAULT_POLICY) -> Deferred[BucketRecord | None]:
        if client_id_error(client_id) is not None:
            return succeed(None)  # no bucket has it (and PostgreSQL could not be sent it)
        return self._query(sql.GET, (client_id, policy)).addCallback(_record_or_none)

    def list(self, limit: int, offset: int,
             policy: str = DEFAULT_POLICY) -> Deferred[tuple[list[BucketRecord], int]]:
        if limit < 0 or offset < 0:
            return fail(ValueError("limit and offset must be >= 0"))

        def page(rows: Rows) -> tuple[list[BucketRecord], int]:
            records = [BucketRecord(*row[1:]) for row in rows if row[1] is not None]
            return records, rows[0][0]

        params = {"limit": limit, "offset": offset, "policy": policy}
        return self._query(sql.LIST, params).addCallback(page)

    def update(
        self,
        client_id: str,
        capacity: int | None = None,
        tokens: float | None = None,
        refill_rate: float | None = None,
        policy: str = DEFAULT_POLICY,
    ) -> Deferred[BucketRecord | None]:
        try:
            validate_fields(capacity, tokens, refill_rate)
        except InvalidBucket as e:
            return fail(e)
        if client_id_error(client_id) is not None:
            return succeed(None)
        params = {
            "client_id": client_id,
            "policy": policy,
            "capacity": capacity,
            "tokens": None if tokens is None else float(tokens),
            "refill_rate": None if refill_rate is None else float(refill_rate),
        }
        return self._query(sql.UPDATE, params).addCallbacks(_record_or_none, _invalid)

    def delete(self, client_id: str, policy: str = DEFAULT_POLICY) -> Deferred[bool]:
        if client_id_error(client_id) is not None:
            return succeed(False)
        return self._query(sql.DELETE, (client_id, policy)).addCallback(bool)



def _decision(rows: Rows) -> Decision | None:
    if not rows:
        return None
    capacity, tokens, refill_rate, allowed = rows[0]
    return decide(allowed, capacity, tokens, refill_rate)


def _record_or_none(rows: Rows) -> BucketRecord | None:
    return BucketRecord(*rows[0]) if rows else None


def _invalid(failure: Failure) -> Failure:
    """A CHECK constraint's refusal, as InvalidBucket naming the field."""
    error = failure.value
    if isinstance(error, psycopg2.IntegrityError):
        constraint = getattr(error.diag, "constraint_name", None)
        field = sql.CONSTRAINT_FIELDS.get(constraint or "", "bucket")
        if field == "tokens":
            return Failure(tokens_above_capacity())
        return Failure(InvalidBucket(field, "out of range"))
    return failure
