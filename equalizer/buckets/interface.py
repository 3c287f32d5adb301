"""What a bucket store is: the interface the proxy and the admin API call, the record
the admin API shows, the errors, and the value checks every store applies.

The proxy calls :meth:`IBucketStore.take` once per request; the admin API calls the
rest. ``take`` is the single entry point of the hot path, so anything that makes it
cheaper (token leasing, :mod:`equalizer.buckets.leasing`) goes behind it. The value
rules themselves (bounds, client ids, the digest) are :mod:`equalizer.config.rules`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from attrs import frozen
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import Attribute, Interface

from equalizer.buckets.maths import Decision, window
from equalizer.config.model import DEFAULT_POLICY, BucketPolicy, RateLimitConfig
from equalizer.config.rules import (
    client_id_problem,
    key_digest,
    validate_capacity,
    validate_refill_rate,
    validate_tokens,
)


class StoreUnavailable(Exception):
    """The store cannot answer now (database unreachable, timed out); it recovers by itself."""


class StoreDataError(Exception):
    """The database refused to compute a statement over the stored values (a data
    exception, such as a numeric overflow): this call fails, but the store is up.
    Not a :class:`StoreUnavailable`: bad data is not an outage."""


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
    policy: str = DEFAULT_POLICY

    def to_json(self) -> dict[str, Any]:
        """The SPEC section 6 shape with the policy of SPEC 8, with ISO-8601 UTC timestamps
        (``...Z``)."""
        return {
            "policy": self.policy,
            "client_id": self.client_id,
            "capacity": self.capacity,
            "tokens": round(self.tokens, 6),
            "refill_rate": self.refill_rate,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
        }


class IBucketStore(Interface):
    """Token buckets keyed by (policy, client id): every method takes ``policy``, by
    default ``default`` (SPEC 8). Every method but ``take_now`` answers with a Deferred."""

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

    def take(client_id: str, default: BucketPolicy | None,
             policy: str = DEFAULT_POLICY) -> Deferred[Decision | None]:
        """Take one token from the client's bucket, atomically.

        A client without a bucket gets one from ``default``, full, on first sight;
        with ``default`` None it is not limited and the result is None. A client id
        no bucket can have (control characters, not UTF-8, too long) takes from the
        bucket of its digest (:func:`take_key`); an empty one fails with InvalidBucket.
        """

    def take_now(client_id: str, default: BucketPolicy | None,
                 policy: str = DEFAULT_POLICY) -> Decision | None | Deferred[Decision | None]:
        """``take``, answered without a Deferred when the answer is known at once (the
        memory store, a live lease): the limiter's hot path, where a Deferred per
        request cost more than the arithmetic. A Deferred when the answer must wait
        or is a failure."""

    def create(
        client_id: str, capacity: int, tokens: float, refill_rate: float,
        policy: str = DEFAULT_POLICY,
    ) -> Deferred[BucketRecord]:
        """Create a bucket; fails with BucketExists or InvalidBucket."""

    def get(client_id: str, policy: str = DEFAULT_POLICY) -> Deferred[BucketRecord | None]:
        """The bucket, tokens as of now, or None (also for a client id no bucket can have)."""

    def list(limit: int, offset: int,
             policy: str = DEFAULT_POLICY) -> Deferred[tuple[list[BucketRecord], int]]:
        """A page of the policy's buckets ordered by client id (code-point order), and
        their total count."""

    def update(
        client_id: str,
        capacity: int | None = None,
        tokens: float | None = None,
        refill_rate: float | None = None,
        policy: str = DEFAULT_POLICY,
    ) -> Deferred[BucketRecord | None]:
        """Change the given fields; None when there is no such bucket.

        The bucket is first refilled up to now under its old settings. Lowering
        the capacity below the tokens held clamps them to the new capacity;
        explicit ``tokens`` above the capacity fail with InvalidBucket.
        """

    def delete(client_id: str, policy: str = DEFAULT_POLICY) -> Deferred[bool]:
        """Remove the bucket; whether there was one."""


# --- value checks, shared by every store --------------------------------------------


def client_id_error(client_id: object) -> InvalidBucket | None:
    """Why no bucket can have this client id (:func:`~equalizer.config.rules.client_id_problem`),
    as the error a store fails with, or None."""
    problem = client_id_problem(client_id)
    return None if problem is None else InvalidBucket("client_id", problem)


def take_key(client_id: str) -> str:
    """The bucket key a take uses for ``client_id``: itself, or the digest of its UTF-8
    bytes (:func:`~equalizer.config.rules.key_digest`) when no bucket can have it, so
    such a value is limited like any other.

    Raises:
        InvalidBucket: for an empty client id (the proxy never sends one).
    """
    problem = client_id_error(client_id)
    if problem is None:
        return client_id
    if not client_id:
        raise problem
    return key_digest(client_id.encode("utf-8", "surrogatepass"))


def take_elsewhere(store: IBucketStore, client_id: str, default: BucketPolicy | None,
                   policy: str = DEFAULT_POLICY) -> Deferred[Decision | None] | None:
    """For a take: None when ``client_id`` is its own take key; else the take under its
    digest, or the InvalidBucket failure of an empty id. Only first sights pay for it."""
    try:
        key = take_key(client_id)
    except InvalidBucket as error:
        return fail(error)
    if key == client_id:
        return None
    return store.take(key, default) if policy == DEFAULT_POLICY else \
        store.take(key, default, policy)


def as_deferred(answer: Decision | None | Deferred[Decision | None]) -> Deferred[Decision | None]:
    """A ``take_now`` answer as ``take`` gives it: always a Deferred."""
    return answer if isinstance(answer, Deferred) else succeed(answer)


KEY_SEPARATOR = "\x1f"
"""Between the policy and the client id in a :func:`bucket_key`."""


def bucket_key(policy: str, client_id: str) -> str:
    """One string for (policy, client id), for stores that key buckets by one: the client
    id itself under ``default`` (so those keys are as before), else ``policy US id``
    (US is chr(31): no client id holds a control character; migration 0005 of the
    PostgreSQL schema splits leased keys the same way)."""
    return client_id if policy == DEFAULT_POLICY else f"{policy}{KEY_SEPARATOR}{client_id}"


def split_key(key: str) -> tuple[str, str]:
    """(policy, client id) of a :func:`bucket_key`."""
    policy, separator, client_id = key.partition(KEY_SEPARATOR)
    return (policy, client_id) if separator else (DEFAULT_POLICY, key)



def _field(name: str, check: Any, value: object) -> None:
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


def new_bucket_problem(client_id: object, capacity: int, tokens: float,
                       refill_rate: float) -> InvalidBucket | None:
    """What is wrong with a bucket about to be created, or None."""
    problem = client_id_error(client_id)
    if problem is not None:
        return problem
    try:
        validate_fields(capacity, tokens, refill_rate)
    except InvalidBucket as error:
        return error
    return None


def tokens_above_capacity() -> InvalidBucket:
    return InvalidBucket("tokens", "must not exceed the capacity")


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

