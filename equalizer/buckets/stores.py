"""Bucket stores: where token buckets live, in memory or in PostgreSQL (SPEC section 5).

Both stores provide :class:`IBucketStore`. The proxy calls :meth:`~IBucketStore.take`
once per request; the admin API calls the rest. ``take`` is the single entry point
of the hot path, so anything that later makes it cheaper (local token leasing, say)
goes behind it.

:class:`MemoryStore` keeps buckets in a dict and does the arithmetic with
:func:`equalizer.ratelimit.take`, reading the injected clock once per call.

:class:`PostgresStore` keeps them in the ``buckets`` table, through a txpostgres
connection pool. Decisions that make it correct across instances:

Time comes from the database.
    Every refill is computed in SQL from the server's ``clock_timestamp()``.
    Instances sharing a database share no other clock, and passing each host's
    time in would let clock skew between hosts mint or swallow tokens. The
    refill timestamp only moves forward (``greatest(updated_at, now)``), so no
    interval is credited twice. A take that waited on the row lock refills up to
    when it arrived, not when it got the lock: a few milliseconds of refill are
    forgone under contention, never granted twice.

One statement per token.
    A take is a single ``INSERT ... ON CONFLICT (client_id) DO UPDATE ... RETURNING``
    (an ``UPDATE ... RETURNING`` when there is no default policy): it creates the
    bucket on first sight, refills and takes under the row lock, and returns the
    outcome. No read-then-write across statements, so N instances admit exactly
    what one would: there is no slack. Each session prepares the two take
    statements once (``prepare=False`` sends them in full, for poolers in
    transaction mode). ``create``, ``update``, ``delete``, ``get`` and ``list``
    are single statements too. Takes commit with ``synchronous_commit = off``
    (set per session): should the database server crash, the last fraction of a
    second of token deductions may be lost (clients get those tokens back).
    Bucket definitions written through the admin API are committed durably.

Schema migrations run at :meth:`PostgresStore.start`.
    ``equalizer/migrations/NNNN_name.sql``, in version order, inside one
    transaction that holds an advisory lock, so instances starting together
    neither race nor half-apply; applied versions are recorded in
    ``schema_migrations``. CHECK constraints in the schema enforce the bucket
    invariants (capacity > 0, 0 <= tokens <= capacity, refill_rate 0 or within
    the bounds of :func:`equalizer.config.validate_refill_rate`, so every refill
    can be computed).

Full default rows are swept.
    A row made from the default policy (``from_default``, migration 0004) that
    has refilled to its capacity holds no information and is deleted by a sweep
    every :func:`sweep_interval` seconds (:meth:`PostgresStore.sweep`): batches
    of :data:`SWEEP_BATCH` rows in client id order over a partial index, each
    its own statement and transaction, locking with ``SKIP LOCKED`` and only
    when it gets a transaction-level advisory try-lock, so it never waits on a
    take and one instance sweeps at a time. Rows made or changed through the
    admin API are never swept.

Failures are bounded and recovered from.
    Each query has a timeout (``query_timeout``, 5 s); a call that hits it fails
    with :class:`StoreUnavailable` (its statement may still be applied later).
    A connection-level error (the server went away, a socket died, or the server
    answered nothing at all for ``query_timeout``) also marks the store
    unavailable (``available`` is False, which ``/health`` reports), throws the
    pool away and starts a reconnect loop: a fresh pool whose every session must
    answer its set-up statements (as a ``SELECT 1`` would), retried with backoff
    from 0.5 s up to 2 s, until it works. Meanwhile every call fails at once with
    :class:`StoreUnavailable`, so a dead database never holds a request up. The
    store also notices the server hanging up on idle connections, before any
    query does. Nothing is lost: the buckets live in the database. A statement
    the server refuses over the values it computes (a data exception, SQLSTATE
    class 22) fails that call with :class:`StoreDataError` and one log line; the
    store stays available.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable
from datetime import UTC, datetime
from importlib.resources import files
from typing import Any

import psycopg2
from attrs import frozen
from twisted.internet.defer import Deferred, FirstError, fail, gatherResults, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from txpostgres.txpostgres import Connection, ConnectionPool, Cursor
from zope.interface import Attribute, Interface, implementer

from equalizer.buckets.maths import Bucket, Decision, decide, is_full, refill, window
from equalizer.buckets.maths import take as take_token
from equalizer.config.loader import (
    DEFAULT_MAX_BUCKETS,
    BucketPolicy,
    RateLimitConfig,
    validate_capacity,
    validate_refill_rate,
    validate_tokens,
)

log = Logger()

MAX_CLIENT_ID_LENGTH = 512
"""Longest client id, in characters, a store accepts (an index entry must stay small)."""


class StoreUnavailable(Exception):
    """The store cannot answer now (database unreachable, timed out); it recovers by itself."""


class StoreDataError(StoreUnavailable):
    """The database refused to compute a statement over the stored values (a data
    exception, such as a numeric overflow): this call fails, but the store is up."""


class BucketExists(Exception):
    """``create`` found a bucket with that client id already."""


class InvalidBucket(ValueError):
    """A value a bucket cannot hold; ``field`` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@frozen
class BucketRecord:
    """A bucket as the admin API shows it: ``tokens`` as of the moment it was read.

    ``updated_at`` is the last time the stored state changed: a take, or an
    admin change. ``created_at`` and ``updated_at`` are timezone-aware.
    """

    client_id: str
    capacity: int
    tokens: float
    refill_rate: float
    created_at: datetime
    updated_at: datetime

    def to_json(self) -> dict[str, Any]:
        """The SPEC section 6 shape, with ISO-8601 UTC timestamps (``...Z``)."""
        return {
            "client_id": self.client_id,
            "capacity": self.capacity,
            "tokens": round(self.tokens, 6),
            "refill_rate": self.refill_rate,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
        }


class IBucketStore(Interface):
    """Token buckets keyed by client id. Every method answers with a Deferred."""

    available = Attribute(
        "bool: False while the backing database is unreachable (for /health). "
        "Calls fail with StoreUnavailable meanwhile."
    )

    bucket_count = Attribute("int | None: buckets held (for /stats); None while unknown.")
    swept = Attribute("int: full default buckets forgotten by this process's sweeps.")
    over_cap = Attribute("int: new clients that found rate_limit.max_buckets reached.")

    def configure(config: RateLimitConfig) -> None:
        """Take the settings of ``config`` the store uses (sweep interval, cap)."""

    def start() -> Deferred[None]:
        """Connect and migrate; fires once the store can serve."""

    def stop() -> Deferred[None]:
        """Release connections and timers; pending calls fail with StoreUnavailable."""

    def take(client_id: str, default: BucketPolicy | None) -> Deferred[Decision | None]:
        """Take one token from the client's bucket, atomically.

        A client without a bucket gets one from ``default``, full, on first sight;
        with ``default`` None it is not limited and the result is None. A client id
        no bucket can have (control characters, not UTF-8, too long) takes from the
        bucket of its digest (:func:`take_key`); an empty one fails with InvalidBucket.
        """

    def create(
        client_id: str, capacity: int, tokens: float, refill_rate: float
    ) -> Deferred[BucketRecord]:
        """Create a bucket; fails with BucketExists or InvalidBucket."""

    def get(client_id: str) -> Deferred[BucketRecord | None]:
        """The bucket, tokens as of now, or None (also for a client id no bucket can have)."""

    def list(limit: int, offset: int) -> Deferred[tuple[list[BucketRecord], int]]:
        """A page of buckets ordered by client id (code-point order), and the total count."""

    def update(
        client_id: str,
        capacity: int | None = None,
        tokens: float | None = None,
        refill_rate: float | None = None,
    ) -> Deferred[BucketRecord | None]:
        """Change the given fields; None when there is no such bucket.

        The bucket is first refilled up to now under its old settings. Lowering
        the capacity below the tokens held clamps them to the new capacity;
        explicit ``tokens`` above the capacity fail with InvalidBucket.
        """

    def delete(client_id: str) -> Deferred[bool]:
        """Remove the bucket; whether there was one."""


# --- validation, shared by both stores ---------------------------------------------


_CONTROL = re.compile("[\x00-\x1f\x7f]")


def _client_id_problem(client_id: object) -> InvalidBucket | None:
    """Why no bucket can have this client id, or None.

    Control characters could not travel in a URL path the admin API routes (LF,
    for one), and text that is not UTF-8 (lone surrogates) PostgreSQL cannot hold.
    """
    if not isinstance(client_id, str) or not client_id:
        return InvalidBucket("client_id", "must be a non-empty string")
    if len(client_id) > MAX_CLIENT_ID_LENGTH:
        return InvalidBucket("client_id", f"must be at most {MAX_CLIENT_ID_LENGTH} characters")
    if client_id in (".", ".."):
        return InvalidBucket("client_id", "must not be '.' or '..' (no URL path can name it)")
    if _CONTROL.search(client_id):
        return InvalidBucket("client_id", "must not contain control characters "
                             "(such as NUL, TAB, CR, LF or DEL)")
    if not client_id.isascii():
        try:
            client_id.encode("utf-8")
        except UnicodeEncodeError:
            return InvalidBucket("client_id", "must be valid Unicode text (no lone surrogates)")
    return None


def take_key(client_id: str) -> str:
    """The bucket key a take uses for ``client_id``: itself, or ``sha256:<hex>`` of its
    UTF-8 bytes when no bucket can have it, so such a value is limited like any other.

    Raises:
        InvalidBucket: for an empty client id (the proxy never sends one).
    """
    problem = _client_id_problem(client_id)
    if problem is None:
        return client_id
    if not client_id:
        raise problem
    digest = hashlib.sha256(client_id.encode("utf-8", "surrogatepass")).hexdigest()
    return "sha256:" + digest


def take_elsewhere(store: IBucketStore, client_id: str,
                   default: BucketPolicy | None) -> Deferred[Decision | None] | None:
    """For a take: None when ``client_id`` is its own take key; else the take under its
    digest, or the InvalidBucket failure of an empty id. Only first sights pay for it."""
    try:
        key = take_key(client_id)
    except InvalidBucket as error:
        return fail(error)
    return None if key == client_id else store.take(key, default)


def _field(name: str, check: Callable[[object], Any], value: object) -> None:
    try:
        check(value)
    except ValueError as error:
        raise InvalidBucket(name, str(error)) from None


def validate_fields(capacity: int | None, tokens: float | None, refill_rate: float | None) -> None:
    """Check the fields that are given (not None); raise InvalidBucket for the first bad one.

    The bounds are config's, the same for ``rate_limit.default``: every value they
    let in refills without overflow or underflow, in SQL and in Python. ``tokens``
    is checked against ``capacity`` only when both are given; against a stored
    capacity it is the store's job (the schema's CHECK, for Postgres).
    """
    if capacity is not None:
        _field("capacity", validate_capacity, capacity)
    if tokens is not None:
        _field("tokens", validate_tokens, tokens)
        if capacity is not None and tokens > capacity:
            raise InvalidBucket("tokens", f"must not exceed the capacity ({capacity})")
    if refill_rate is not None:
        _field("refill_rate", validate_refill_rate, refill_rate)


def _new_bucket_problem(client_id: object, capacity: int, tokens: float,
                        refill_rate: float) -> InvalidBucket | None:
    """What is wrong with a bucket about to be created, or None."""
    problem = _client_id_problem(client_id)
    if problem is not None:
        return problem
    try:
        validate_fields(capacity, tokens, refill_rate)
    except InvalidBucket as error:
        return error
    return None


def _tokens_above_capacity() -> InvalidBucket:
    return InvalidBucket("tokens", "must not exceed the capacity")


# --- memory ----------------------------------------------------------------------------


SWEEP_CHUNK = 2_000
"""Buckets the memory store's sweep looks at per reactor turn (1 to 3 ms)."""

MIN_SWEEP_INTERVAL = 1.0
MAX_SWEEP_INTERVAL = 60.0


def sweep_interval(default: BucketPolicy | None) -> float:
    """Seconds between sweeps of full default buckets: the default's refill window
    ``ceil(C/R)`` (a bucket emptied just after one sweep is full by the next), within
    1 to 60 s; 60 s without a default or with refill rate 0."""
    if default is None:
        return MAX_SWEEP_INTERVAL
    seconds = window(default.capacity, default.refill_rate)
    return float(min(MAX_SWEEP_INTERVAL, max(MIN_SWEEP_INTERVAL, seconds)))



def _moment(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


@implementer(IBucketStore)
class MemoryStore:
    """Buckets in a dict: one process, lost on restart. Answers synchronously.

    Buckets made from the default policy are forgotten once full again (they hold
    no information), by a sweep every :func:`sweep_interval` seconds that looks
    at :data:`SWEEP_CHUNK` buckets per reactor turn, so memory follows the
    clients active within about one refill window. Buckets created or changed
    through the admin API are kept until deleted. ``max_buckets`` caps the
    buckets held: a new client arriving at the cap is refused (429) and a sweep
    starts at once; clients with a bucket are served as ever.
    """

    available = True

    def __init__(self, clock: IReactorTime, max_buckets: int = DEFAULT_MAX_BUCKETS) -> None:
        self._clock = clock
        # client id -> (bucket, created at, in clock seconds)
        self._buckets: dict[str, tuple[Bucket, float]] = {}
        self._kept: set[str] = set()  # made or changed through the admin API: never swept
        self.max_buckets = max_buckets
        self.interval = MAX_SWEEP_INTERVAL
        self.swept = 0
        """Default buckets forgotten because they were full again."""
        self.over_cap = 0
        """New clients refused because ``max_buckets`` buckets were held."""
        self._running = False
        self._timer: IDelayedCall | None = None
        self._pass: list[str] | None = None  # client ids the sweep under way has yet to see

    @property
    def bucket_count(self) -> int:
        """Buckets held now."""
        return len(self._buckets)

    def configure(self, config: RateLimitConfig) -> None:
        """Take the cap and the sweep interval of ``config`` (start-up and reload)."""
        self.max_buckets = config.max_buckets
        self.interval = sweep_interval(config.default)
        timer = self._timer
        if self._pass is None and timer is not None and timer.active():
            timer.reset(min(self.interval, max(0.0, timer.getTime() - self._clock.seconds())))

    def start(self) -> Deferred[None]:
        """Start sweeping (takes work without it; tests drive the sweep with a Clock)."""
        if not self._running:
            self._running = True
            self._timer = self._clock.callLater(self.interval, self._sweep)
        return succeed(None)

    def stop(self) -> Deferred[None]:
        self._running = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._pass = None
        return succeed(None)

    def _sweep(self) -> None:
        """One step of a sweep: forget the full default buckets among the next
        SWEEP_CHUNK client ids, then come back on the next reactor turn, or after
        the interval once every bucket held when the sweep began has been seen."""
        self._timer = None
        try:
            if self._pass is None:
                self._pass = list(self._buckets)
                self._peak = max(self._peak, len(self._pass))
            self.swept += self._forget_full(self._pass, self._clock.seconds())
        except Exception:
            log.failure("sweeping buckets failed")
            self._pass = None
        if self._pass:
            self._timer = self._clock.callLater(0, self._sweep)
            return
        self._pass = None
        self._cap_logged = False
        self._compact()
        if self._running:
            self._timer = self._clock.callLater(self.interval, self._sweep)

    def _forget_full(self, ids: list[str], now: float) -> int:
        """Drop the full default buckets among the last SWEEP_CHUNK of ``ids`` (which
        are consumed); how many went."""
        chunk = ids[-SWEEP_CHUNK:]
        del ids[-SWEEP_CHUNK:]
        buckets = self._buckets
        kept = self._kept
        gone = 0
        for client_id in chunk:
            entry = buckets.get(client_id)
            if entry is not None and client_id not in kept and is_full(entry[0], now):
                del buckets[client_id]
                gone += 1
        return gone

    def _compact(self) -> None:
        """Give back the dict's room once it holds far fewer buckets than it has room
        for: a dict never shrinks when keys are deleted, only when copied."""
        held = len(self._buckets)
        if held < self._peak // 4:
            self._buckets = dict(self._buckets)
            self._peak = held

    _peak = 0
    _cap_logged = False

    def _sweep_soon(self) -> None:
        """Start a sweep on the next reactor turn unless one is under way (cap reached)."""
        if self._running and self._pass is None:
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            self._timer = self._clock.callLater(0, self._sweep)

    def _at_cap(self, default: BucketPolicy) -> Decision:
        """The refusal of a new client while ``max_buckets`` buckets are held.

        Refusing, not evicting: every bucket held is either kept on purpose (admin
        API) or not yet full (its client spent tokens), and forgetting one would
        hand that client fresh tokens. Full ones go in the sweep this starts.
        """
        if not self._cap_logged:
            self._cap_logged = True  # again after the next sweep, if still at the cap
            log.warn("rate_limit.max_buckets ({cap}) buckets held: new clients are refused "
                     "until the sweep frees room", cap=self.max_buckets)
        self.over_cap += 1
        self._sweep_soon()
        retry = max(1, math.ceil(self.interval))
        return Decision(False, default.capacity, 0, retry, retry,
                        window(default.capacity, default.refill_rate))

    def take(self, client_id: str, default: BucketPolicy | None) -> Deferred[Decision | None]:
        now = self._clock.seconds()
        entry = self._buckets.get(client_id)
        if entry is None:
            elsewhere = take_elsewhere(self, client_id, default)
            if elsewhere is not None:
                return elsewhere
            if default is None:
                return succeed(None)
            if len(self._buckets) >= self.max_buckets:
                return succeed(self._at_cap(default))
            bucket = Bucket(default.capacity, float(default.capacity), default.refill_rate, now)
            created = now
        else:
            bucket, created = entry
        bucket, decision = take_token(bucket, now)
        self._buckets[client_id] = (bucket, created)
        return succeed(decision)

    def _record(self, client_id: str, bucket: Bucket, created: float) -> BucketRecord:
        return BucketRecord(
            client_id,
            bucket.capacity,
            bucket.tokens,
            bucket.refill_rate,
            _moment(created),
            _moment(bucket.updated),
        )

    def _as_of_now(self, client_id: str, entry: tuple[Bucket, float], now: float) -> BucketRecord:
        bucket, created = entry
        stored = bucket.updated
        current = refill(bucket, now)
        return BucketRecord(
            client_id,
            current.capacity,
            current.tokens,
            current.refill_rate,
            _moment(created),
            _moment(stored),
        )

    def create(
        self, client_id: str, capacity: int, tokens: float, refill_rate: float
    ) -> Deferred[BucketRecord]:
        now = self._clock.seconds()
        problem = _new_bucket_problem(client_id, capacity, tokens, refill_rate)
        if problem is not None:
            return fail(problem)
        if client_id in self._buckets:
            return fail(BucketExists(client_id))
        bucket = Bucket(capacity, float(tokens), float(refill_rate), now)
        self._buckets[client_id] = (bucket, now)
        self._kept.add(client_id)
        return succeed(self._record(client_id, bucket, now))

    def get(self, client_id: str) -> Deferred[BucketRecord | None]:
        now = self._clock.seconds()
        entry = self._buckets.get(client_id)
        if entry is None:
            return succeed(None)
        return succeed(self._as_of_now(client_id, entry, now))

    def list(self, limit: int, offset: int) -> Deferred[tuple[list[BucketRecord], int]]:
        now = self._clock.seconds()
        if limit < 0 or offset < 0:
            return fail(ValueError("limit and offset must be >= 0"))
        page = sorted(self._buckets)[offset : offset + limit]
        records = [self._as_of_now(key, self._buckets[key], now) for key in page]
        return succeed((records, len(self._buckets)))

    def update(
        self,
        client_id: str,
        capacity: int | None = None,
        tokens: float | None = None,
        refill_rate: float | None = None,
    ) -> Deferred[BucketRecord | None]:
        now = self._clock.seconds()
        try:
            validate_fields(capacity, tokens, refill_rate)
        except InvalidBucket as e:
            return fail(e)
        entry = self._buckets.get(client_id)
        if entry is None:
            return succeed(None)
        bucket, created = entry
        current = refill(bucket, now)  # settle the past under the old settings
        new_capacity = current.capacity if capacity is None else capacity
        if tokens is None:
            new_tokens = min(current.tokens, float(new_capacity))
        elif tokens > new_capacity:
            return fail(_tokens_above_capacity())
        else:
            new_tokens = float(tokens)
        new_rate = current.refill_rate if refill_rate is None else float(refill_rate)
        updated = Bucket(new_capacity, new_tokens, new_rate, max(now, bucket.updated))
        self._buckets[client_id] = (updated, created)
        self._kept.add(client_id)
        return succeed(self._record(client_id, updated, created))

    def delete(self, client_id: str) -> Deferred[bool]:
        self._kept.discard(client_id)
        return succeed(self._buckets.pop(client_id, None) is not None)


# --- postgres --------------------------------------------------------------------------

_MIGRATION_NAME = re.compile(r"^(\d{4})_(\w+)\.sql$")
_MIGRATION_LOCK = 0x657175616C697A72  # "equalizr": the advisory lock migrations hold

# The refill, in SQL: the bucket's tokens at {now}, from its row "b".
_REFILLED = (
    "least(b.capacity::float8, b.tokens + b.refill_rate"
    " * greatest(0.0, extract(epoch FROM ({now} - b.updated_at))::float8))"
)


def _taking(now: str) -> str:
    refilled = _REFILLED.format(now=now)
    return (
        f"tokens = CASE WHEN {refilled} >= 1 THEN {refilled} - 1 ELSE {refilled} END,"
        f" last_allowed = {refilled} >= 1,"
        f" updated_at = greatest(b.updated_at, {now})"
    )


_NOW = "(SELECT clock_timestamp() AS now) AS n"
_REFILLED_NOW = _REFILLED.format(now="n.now")
_TAKE_RETURNING = " RETURNING b.capacity, b.tokens, b.refill_rate, b.last_allowed"
_RECORD_RETURNING = (
    " RETURNING b.client_id, b.capacity, b.tokens, b.refill_rate, b.created_at, b.updated_at"
)

# A take. With a default policy ($2 capacity, $3 refill rate) the bucket is created
# on first sight, full, minus this request; without one only an existing bucket is
# touched. $1 is the client id.
_TAKE_OR_CREATE = (
    "INSERT INTO buckets AS b (client_id, capacity, tokens, refill_rate, last_allowed,"
    " created_at, updated_at, from_default)"
    f" SELECT $1, $2, $2::float8 - 1, $3, true, n.now, n.now, true FROM {_NOW}"
    f" ON CONFLICT (client_id) DO UPDATE SET {_taking('EXCLUDED.updated_at')}" + _TAKE_RETURNING
)
_TAKE_EXISTING = (
    f"UPDATE buckets AS b SET {_taking('n.now')} FROM {_NOW} WHERE b.client_id = $1"
    + _TAKE_RETURNING
)
_TAKE_STATEMENTS = {
    # name: (parameter types, SQL with $n parameters)
    "equalizer_take_or_create": ("text, integer, float8", _TAKE_OR_CREATE),
    "equalizer_take_existing": ("text", _TAKE_EXISTING),
}


def _inline(sql: str) -> str:
    """The SQL with psycopg2 placeholders instead of $n, to send it unprepared."""
    return re.sub(r"\$(\d)(?!\d)", lambda m: f"%(p{m.group(1)})s", sql)


# Takes commit asynchronously (see the module docstring); admin writes opt back in
# for their own implicit transaction. A multi-statement query is one transaction.
_SESSION_SETUP = "SET synchronous_commit TO off"
_PREPARE = "; ".join(
    f"PREPARE {name} ({types}) AS {sql}" for name, (types, sql) in _TAKE_STATEMENTS.items()
)
_DURABLY = "SET LOCAL synchronous_commit TO on; "

_RECORD_COLUMNS = (
    f"b.client_id, b.capacity, {_REFILLED_NOW}, b.refill_rate, b.created_at, b.updated_at"
)
_GET = f"SELECT {_RECORD_COLUMNS} FROM buckets AS b, {_NOW} WHERE b.client_id = %s"
_LIST = (
    f"WITH page AS (SELECT {_RECORD_COLUMNS} FROM buckets AS b, {_NOW}"
    " ORDER BY b.client_id LIMIT %s OFFSET %s)"
    " SELECT t.total, page.* FROM (SELECT count(*) AS total FROM buckets) AS t"
    " LEFT JOIN page ON true ORDER BY page.client_id"
)
_CREATE = (
    _DURABLY + "INSERT INTO buckets AS b"
    " (client_id, capacity, tokens, refill_rate, created_at, updated_at)"
    f" SELECT %s, %s, %s, %s, n.now, n.now FROM {_NOW}"
    " ON CONFLICT (client_id) DO NOTHING" + _RECORD_RETURNING
)
_UPDATE = (
    _DURABLY + "UPDATE buckets AS b SET"
    " capacity = coalesce(%(capacity)s::integer, b.capacity),"
    " refill_rate = coalesce(%(refill_rate)s::float8, b.refill_rate),"
    " tokens = coalesce(%(tokens)s::float8,"
    f" least(coalesce(%(capacity)s::integer, b.capacity)::float8, {_REFILLED_NOW})),"
    " updated_at = greatest(b.updated_at, n.now), from_default = false"
    f" FROM {_NOW} WHERE b.client_id = %(client_id)s" + _RECORD_RETURNING
)
_DELETE = _DURABLY + "DELETE FROM buckets WHERE client_id = %s RETURNING 1"

SWEEP_BATCH = 1000
"""Default rows one sweep statement looks at (deleting the full ones among them)."""

SWEEP_MAX_BATCHES = 100
"""Sweep statements per run at most; the next run goes on from where this one stopped."""

_SWEEP_LOCK = _MIGRATION_LOCK + 1  # held by a sweep statement, so instances take turns

# Full as of now, on the database clock, for the row "b".
_FULL = _REFILLED.format(now="clock_timestamp()") + " >= b.capacity"

# One sweep batch: look at the next SWEEP_BATCH default rows after %(after)s in
# client id order (the partial index), lock the full ones that nobody holds
# (SKIP LOCKED: a take or settlement in progress wins; FOR UPDATE checks fullness
# again on the row's latest version) and delete them. Answers whether this
# instance got the sweep lock, the rows looked at, the last client id looked at
# and the rows deleted.
_SWEEP = (
    "WITH sweeper AS (SELECT pg_try_advisory_xact_lock(%(lock)s) AS got),"
    f" examined AS (SELECT b.client_id, {_FULL} AS is_full FROM buckets AS b, sweeper"
    " WHERE sweeper.got AND b.from_default AND b.client_id > %(after)s"
    " ORDER BY b.client_id LIMIT %(batch)s),"
    " doomed AS (SELECT b.client_id FROM buckets AS b"
    " WHERE b.client_id IN (SELECT e.client_id FROM examined AS e WHERE e.is_full)"
    f" AND b.from_default AND {_FULL} FOR UPDATE SKIP LOCKED),"
    " gone AS (DELETE FROM buckets AS b USING doomed AS d"
    " WHERE b.client_id = d.client_id RETURNING 1)"
    " SELECT (SELECT got FROM sweeper), (SELECT count(*) FROM examined),"
    " (SELECT max(e.client_id) FROM examined AS e), (SELECT count(*) FROM gone)"
)
_COUNT = "SELECT count(*) FROM buckets"

_CONSTRAINT_FIELDS = {
    "buckets_client_id_check": "client_id",
    "buckets_capacity_check": "capacity",
    "buckets_tokens_check": "tokens",
    "buckets_refill_rate_check": "refill_rate",
}


def migrations() -> list[tuple[int, str, str]]:
    """``(version, name, sql)`` of every packaged migration, by version."""
    found = []
    for entry in files("equalizer.buckets").joinpath("migrations").iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), match.group(2), entry.read_text("utf-8")))
    found.sort()
    return found


def _is_connection_error(error: BaseException) -> bool:
    """Whether ``error`` means the connection (not just the query) is gone."""
    if isinstance(error, psycopg2.OperationalError):
        code = error.pgcode
        # None: libpq's own error (socket closed, server vanished); 08: connection
        # exception; 57: operator intervention (shutdown), except query_canceled.
        return code is None or code.startswith("08") or (code[:2] == "57" and code != "57014")
    return isinstance(error, psycopg2.InterfaceError | ConnectionDone | ConnectionLost)


class _Connection(Connection):
    """A txpostgres connection that reports the server hanging up, and closes quietly."""

    on_lost: Callable[[], object] | None = None

    def doRead(self) -> ConnectionLost | None:
        try:
            super().doRead()
        except psycopg2.Error:
            # The server hung up on this idle connection (shutdown, crash, network).
            # Returning the reason makes the reactor call connectionLost quietly,
            # instead of logging the exception as unhandled and then doing so.
            return ConnectionLost()
        return None

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        pg = self._connection
        if self.on_lost is not None and pg is not None and pg.closed:
            on_lost, self.on_lost = self.on_lost, None
            on_lost()

    def shut(self) -> None:
        """Close without reporting it, whatever state the connection is in."""
        self.on_lost = None
        if self._connection is not None:
            try:
                self.close()
            except Exception:  # an already broken connection may refuse to close cleanly
                pass


class _Pool(ConnectionPool):
    """A txpostgres pool on an injected reactor, with its sessions set up at start.

    It remembers all of its connections: ``ConnectionPool.connections`` holds only
    the idle ones, and closing a pool for good must also close those busy with a
    (possibly hung) query.
    """

    connectionFactory = _Connection

    def __init__(self, reactor: Any, dsn: str, size: int, setup: str) -> None:
        self.reactor = reactor  # read by ConnectionPool.__init__ instead of the global one
        super().__init__(None, dsn, min=size)
        self.every: tuple[_Connection, ...] = tuple(self.connections)
        self._setup = setup
        self.last_answer = reactor.seconds()

    def answered(self, rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        """Note that the server answers (a callback on every query)."""
        self.last_answer = self.reactor.seconds()
        return rows

    def start(self) -> Deferred[_Pool]:
        """Connect every connection and run the session setup on each."""
        d = super().start()
        d.addCallback(
            lambda _: gatherResults(
                [c.runOperation(self._setup) for c in self.every], consumeErrors=True
            )
        )
        return d.addCallback(lambda _: self)

    def shut(self) -> None:
        for connection in self.every:
            connection.shut()


def _within(
    d: Deferred[Any], clock: IReactorTime, seconds: float, on_timeout: Callable[[], object]
) -> Deferred[Any]:
    """A Deferred with ``d``'s result, or StoreUnavailable after ``seconds``.

    ``d`` itself is never cancelled (cancelling a txpostgres query blocks on
    ``PQcancel``); its late result is dropped, and ``on_timeout`` is called so
    the caller can throw away whatever ``d`` was waiting on.
    """

    def cancel(_: Deferred[Any]) -> None:
        if timer.active():
            timer.cancel()

    result: Deferred[Any] = Deferred(cancel)

    def expire() -> None:
        if not result.called:
            on_timeout()
            result.errback(StoreUnavailable(f"PostgreSQL did not answer within {seconds:g}s"))

    def done(value: object) -> None:
        if result.called:
            return  # timed out or cancelled; the late result is of no use
        timer.cancel()
        if isinstance(value, Failure):
            result.errback(value)
        else:
            result.callback(value)

    timer = clock.callLater(seconds, expire)
    d.addBoth(done)
    return result


def _unwrap(failure: Failure) -> BaseException:
    error = failure.value
    while True:
        if isinstance(error, FirstError):
            error = error.subFailure.value
        else:
            return error


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
    ) -> None:
        self._dsn = dsn
        self._reactor = reactor
        self._pool_size = pool_size
        self._query_timeout = query_timeout
        self._connect_timeout = connect_timeout
        self._migrate_timeout = migrate_timeout
        self._min_backoff = min_backoff
        self._max_backoff = max_backoff
        if prepare:
            self._setup = f"{_SESSION_SETUP}; {_PREPARE}"
            self._take_or_create = "EXECUTE equalizer_take_or_create(%(p1)s, %(p2)s, %(p3)s)"
            self._take_existing = "EXECUTE equalizer_take_existing(%(p1)s)"
        else:
            self._setup = _SESSION_SETUP
            self._take_or_create = _inline(_TAKE_OR_CREATE)
            self._take_existing = _inline(_TAKE_EXISTING)
        self.available = False
        self._running = False
        self.interval = MAX_SWEEP_INTERVAL
        self.bucket_count: int | None = None
        """Rows in the table (every instance's) as of the last sweep; None before it."""
        self.swept = 0
        """Full default rows this instance's sweeps deleted."""
        self._sweep_after = ""  # the last client id the sweep looked at
        self._sweep_call: IDelayedCall | None = None
        self._pool: _Pool | None = None
        # How to abort the connections being made (start-up, reconnection) on stop().
        self._aborts: set[Callable[[], None]] = set()
        self._reconnect_call: IDelayedCall | None = None

    # life cycle ----------------------------------------------------------------------

    def start(self) -> Deferred[None]:
        """Migrate the schema, connect the pool and serve.

        Fails with StoreUnavailable when the database cannot be reached; the store
        then stays stopped, and ``start`` may be called again.
        """
        return Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        if self._running:
            return
        scripts = migrations()
        self._running = True
        try:
            await self._migrate(scripts)
            pool = await self._connect()
        except BaseException:
            self._running = False
            raise
        if not self._running:  # stop() was called meanwhile
            pool.shut()
            raise StoreUnavailable("stopped while starting")
        self._install(pool)
        self._schedule_sweep(self.interval)

    def stop(self) -> Deferred[None]:
        """Close every connection and cancel the reconnect loop."""
        self._running = False
        self.available = False
        if self._reconnect_call is not None and self._reconnect_call.active():
            self._reconnect_call.cancel()
        self._reconnect_call = None
        if self._sweep_call is not None and self._sweep_call.active():
            self._sweep_call.cancel()
        self._sweep_call = None
        for abort in list(self._aborts):
            abort()
        self._aborts.clear()
        if self._pool is not None:
            self._pool.shut()
            self._pool = None
        return succeed(None)

    async def _migrate(self, scripts: list[tuple[int, str, str]]) -> None:
        """Apply the migrations the database lacks, on a connection of their own.

        Before the pool connects, because its sessions prepare statements against
        the schema.
        """
        connection = _Connection(self._reactor)
        self._aborts.add(connection.shut)
        try:
            await self._guarded(
                connection.connect(self._dsn), self._connect_timeout, connection.shut
            )
            await self._guarded(
                connection.runInteraction(self._migrate_in, scripts),
                self._migrate_timeout,
                connection.shut,
            )
        finally:
            self._aborts.discard(connection.shut)
            connection.shut()

    def _migrate_in(self, cursor: Cursor, scripts: list[tuple[int, str, str]]) -> Deferred[None]:
        return Deferred.fromCoroutine(self._migrate_with(cursor, scripts))

    async def _migrate_with(self, cursor: Cursor, scripts: list[tuple[int, str, str]]) -> None:
        # Runs in one transaction (runInteraction): all of it, or none of it. The
        # advisory lock makes instances starting together take turns.
        await cursor.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        await cursor.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY,"
            " name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT clock_timestamp())"
        )
        await cursor.execute("SELECT version FROM schema_migrations")
        applied = {row[0] for row in cursor.fetchall()}
        for version, name, sql in scripts:
            if version in applied:
                continue
            log.info("applying database migration {version:04d}_{name}", version=version, name=name)
            await cursor.execute(sql)
            await cursor.execute(
                "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (version, name)
            )
        unknown = applied - {version for version, _, _ in scripts}
        if unknown:
            log.warn(
                "the database has schema versions {versions} this equalizer does not know",
                versions=sorted(unknown),
            )

    # connections -------------------------------------------------------------------

    async def _connect(self) -> _Pool:
        """A started pool whose sessions are all set up, or StoreUnavailable."""
        pool = _Pool(self._reactor, self._dsn, self._pool_size, self._setup)
        self._aborts.add(pool.shut)
        try:
            await self._guarded(pool.start(), self._connect_timeout, pool.shut)
        except BaseException:
            pool.shut()
            raise
        finally:
            self._aborts.discard(pool.shut)
        return pool

    def _install(self, pool: _Pool) -> None:
        for connection in pool.every:
            connection.on_lost = lambda: self._lost(pool, "the server closed a connection")
        self._pool = pool
        self.available = True

    def _lost(self, pool: _Pool, why: str) -> None:
        """``pool`` is broken: stop using it, and reconnect in the background."""
        if pool is not self._pool:
            return  # already replaced (or stopped)
        log.warn("PostgreSQL store unavailable ({why}); reconnecting", why=why)
        self.available = False
        self._pool = None
        # Not from inside txpostgres's own callbacks: close on the next turn.
        self._reactor.callLater(0, pool.shut)
        self._schedule_reconnect(self._min_backoff)

    def _schedule_reconnect(self, delay: float) -> None:
        if self._running:
            self._reconnect_call = self._reactor.callLater(delay, self._reconnect, delay)

    def _reconnect(self, delay: float) -> None:
        self._reconnect_call = None

        def connected(pool: _Pool) -> None:
            if not self._running:
                pool.shut()
                return
            self._install(pool)
            log.info("PostgreSQL store available again")

        def failed(failure: Failure) -> None:
            emit = log.warn if delay == self._min_backoff else log.debug
            emit("reconnecting to PostgreSQL failed: {error}", error=failure.value)
            self._schedule_reconnect(min(delay * 2, self._max_backoff))

        Deferred.fromCoroutine(self._connect()).addCallbacks(connected, failed)

    def _guarded(
        self, d: Deferred[Any], timeout: float, on_timeout: Callable[[], object]
    ) -> Deferred[Any]:
        """``d`` bounded by ``timeout``, with connection failures as StoreUnavailable."""
        return _within(d, self._reactor, timeout, on_timeout).addErrback(self._translate, None)

    def _translate(self, failure: Failure, pool: _Pool | None) -> Failure:
        error = _unwrap(failure)
        if isinstance(error, StoreUnavailable | psycopg2.IntegrityError):
            return failure if error is failure.value else Failure(error)
        if _is_connection_error(error):
            if pool is not None:
                self._lost(pool, str(error).strip() or type(error).__name__)
            return Failure(StoreUnavailable(f"PostgreSQL unreachable: {error}".strip()))
        if isinstance(error, psycopg2.DataError):
            # A value the statement cannot compute: this call fails, the store stays up.
            message = " ".join(str(error).split())
            log.error("PostgreSQL refused a statement ({code}): {error}; the store stays "
                      "available", code=error.pgcode, error=message)
            return Failure(StoreDataError(f"PostgreSQL could not compute it: {message}"))
        if isinstance(error, psycopg2.Error):
            log.failure("PostgreSQL query failed", failure)
            return Failure(StoreUnavailable(f"PostgreSQL error: {error}".strip()))
        return failure

    def query(self, sql: str, params: Any) -> Deferred[list[tuple[Any, ...]]]:
        """Run one statement for code built on this store: its rows, or StoreUnavailable.

        Bounded by the query timeout; connection failures reconnect, as for takes.
        """
        return self._query(sql, params)

    def _query(self, sql: str, params: Any) -> Deferred[list[tuple[Any, ...]]]:
        pool = self._pool
        if pool is None:
            return fail(StoreUnavailable("PostgreSQL unreachable; reconnecting"))
        d = _within(
            pool.runQuery(sql, params).addCallback(pool.answered),
            self._reactor,
            self._query_timeout,
            lambda: self._timed_out(pool),
        )
        return d.addErrback(self._translate, pool)

    def _timed_out(self, pool: _Pool) -> None:
        """A query on ``pool`` took too long: the pool is dead if nothing else got answers.

        A query can also time out waiting for a free connection while the server
        keeps answering (overload); that call fails, but the pool is fine.
        """
        if self._reactor.seconds() - pool.last_answer >= self._query_timeout:
            self._lost(pool, f"no answer for {self._query_timeout:g}s")

    # the sweep ---------------------------------------------------------------------------

    def configure(self, config: RateLimitConfig) -> None:
        """Sweep every :func:`sweep_interval` of the default policy (start-up and reload)."""
        self.interval = sweep_interval(config.default)
        call = self._sweep_call
        if call is not None and call.active():
            call.reset(min(self.interval, max(0.0, call.getTime() - self._reactor.seconds())))

    def _schedule_sweep(self, delay: float) -> None:
        if self._running and self._sweep_call is None:
            self._sweep_call = self._reactor.callLater(delay, self._sweep_tick)

    def _sweep_tick(self) -> None:
        def failed(failure: Failure) -> None:
            if failure.check(StoreUnavailable):
                log.debug("bucket sweep skipped: {error}", error=failure.value)
            else:
                log.failure("sweeping buckets failed", failure)

        def again(_: object) -> None:
            self._sweep_call = None
            self._schedule_sweep(self.interval)

        Deferred.fromCoroutine(self.sweep()).addErrback(failed).addBoth(again)

    async def sweep(self) -> int:
        """Delete full default rows: one run of the periodic sweep; how many went.

        At most SWEEP_MAX_BATCHES statements of SWEEP_BATCH rows each, one at a
        time, each its own short transaction; a run goes on from where the last
        stopped, and wraps around at the end. A statement that finds another
        instance's sweep statement running ends the run. Then counts the rows.
        """
        gone = 0
        for _ in range(SWEEP_MAX_BATCHES):
            params = {"lock": _SWEEP_LOCK, "after": self._sweep_after, "batch": SWEEP_BATCH}
            got, examined, last, deleted = (await self._query(_SWEEP, params))[0]
            if not got:
                break
            gone += deleted
            self.swept += deleted
            if examined < SWEEP_BATCH:
                self._sweep_after = ""
                break
            self._sweep_after = last
        self.bucket_count = (await self._query(_COUNT, None))[0][0]
        return gone

    # IBucketStore ----------------------------------------------------------------------

    def take(self, client_id: str, default: BucketPolicy | None) -> Deferred[Decision | None]:
        elsewhere = take_elsewhere(self, client_id, default)
        if elsewhere is not None:
            return elsewhere
        if default is None:
            d = self._query(self._take_existing, {"p1": client_id})
        else:
            params = {"p1": client_id, "p2": default.capacity, "p3": default.refill_rate}
            d = self._query(self._take_or_create, params)
        return d.addCallback(_decision)

    def create(
        self, client_id: str, capacity: int, tokens: float, refill_rate: float
    ) -> Deferred[BucketRecord]:
        problem = _new_bucket_problem(client_id, capacity, tokens, refill_rate)
        if problem is not None:
            return fail(problem)

        def created(rows: list[tuple[Any, ...]]) -> BucketRecord:
            if not rows:
                raise BucketExists(client_id)
            return BucketRecord(*rows[0])

        d = self._query(_CREATE, (client_id, capacity, float(tokens), float(refill_rate)))
        return d.addCallbacks(created, _invalid)

    def get(self, client_id: str) -> Deferred[BucketRecord | None]:
        if _client_id_problem(client_id) is not None:
            return succeed(None)  # no bucket has it (and PostgreSQL could not be sent it)
        return self._query(_GET, (client_id,)).addCallback(_record_or_none)

    def list(self, limit: int, offset: int) -> Deferred[tuple[list[BucketRecord], int]]:
        if limit < 0 or offset < 0:
            return fail(ValueError("limit and offset must be >= 0"))

        def page(rows: list[tuple[Any, ...]]) -> tuple[list[BucketRecord], int]:
            records = [BucketRecord(*row[1:]) for row in rows if row[1] is not None]
            return records, rows[0][0]

        return self._query(_LIST, (limit, offset)).addCallback(page)

    def update(
        self,
        client_id: str,
        capacity: int | None = None,
        tokens: float | None = None,
        refill_rate: float | None = None,
    ) -> Deferred[BucketRecord | None]:
        try:
            validate_fields(capacity, tokens, refill_rate)
        except InvalidBucket as e:
            return fail(e)
        if _client_id_problem(client_id) is not None:
            return succeed(None)
        params = {
            "client_id": client_id,
            "capacity": capacity,
            "tokens": None if tokens is None else float(tokens),
            "refill_rate": None if refill_rate is None else float(refill_rate),
        }
        return self._query(_UPDATE, params).addCallbacks(_record_or_none, _invalid)

    def delete(self, client_id: str) -> Deferred[bool]:
        if _client_id_problem(client_id) is not None:
            return succeed(False)
        return self._query(_DELETE, (client_id,)).addCallback(bool)


def _decision(rows: list[tuple[Any, ...]]) -> Decision | None:
    if not rows:
        return None
    capacity, tokens, refill_rate, allowed = rows[0]
    return decide(allowed, capacity, tokens, refill_rate)


def _record_or_none(rows: list[tuple[Any, ...]]) -> BucketRecord | None:
    return BucketRecord(*rows[0]) if rows else None


def _invalid(failure: Failure) -> Failure:
    """A CHECK constraint's refusal, as InvalidBucket naming the field."""
    error = failure.value
    if isinstance(error, psycopg2.IntegrityError):
        constraint = getattr(error.diag, "constraint_name", None)
        field = _CONSTRAINT_FIELDS.get(constraint or "", "bucket")
        if field == "tokens":
            return Failure(_tokens_above_capacity())
        return Failure(InvalidBucket(field, "out of range"))
    return failure
