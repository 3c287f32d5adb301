"""Token-bucket maths: pure functions of a bucket and "now", no clocks, no I/O.

The algorithm (SPEC section 5)
------------------------------
A bucket has a capacity ``C`` (whole tokens), a refill rate ``R`` (tokens per
second, ``R >= 0``), a token count ``T`` (a float, ``0 <= T <= C``) and the time
``updated`` at which ``T`` was last measured. There is no timer per bucket: the
bucket is refilled lazily, from the elapsed time, whenever somebody looks at it::

    elapsed = max(0, now - updated)       # a clock that steps back never drains a bucket
    T       = min(C, T + R * elapsed)     # refill, never above capacity
    if T >= 1:  admit,  T = T - 1         # a request costs one token
    else:       refuse (HTTP 429)
    updated = max(updated, now)           # monotonic, so no interval is credited twice

What a :class:`Decision` reports, with ``T`` the token count after the request:

``limit``
    ``C``.
``remaining``
    ``floor(T)``, the whole tokens left.
``reset``
    Seconds, rounded up, until the next whole token is back, i.e. until
    ``floor(T)`` grows by one: ``ceil((floor(T) + 1 - T) / R)``. ``0`` when the
    bucket is full. This is the ``t`` of the ``RateLimit`` field and the value of
    ``RateLimit-Reset``.
``retry_after``
    ``0`` when admitted. When refused (``T < 1``) it is the seconds, rounded up,
    until one token is back, ``ceil((1 - T) / R)``, which equals ``reset``.
    Rounding up (as Synapse does) means a client that waits that long is admitted.
``window``
    ``W = ceil(C / R)``: the seconds an empty bucket takes to fill up again, the
    ``w`` of ``RateLimit-Policy: "default";q=C;w=W``.

A bucket that never refills (``R == 0``) has no natural window and no time at
which a token comes back. For it every one of those durations (``window``, and
``reset`` / ``retry_after`` whenever they are not 0) is :data:`NO_REFILL_SECONDS`
(one hour): a finite, honest "not soon" that clients can act on, and within which
an operator has usually refilled the bucket through the admin API.

Rounding up divides floats, so ``(1 - 0.9) / 0.1`` would be ``1.0000000000000002``
and round up to 2. Durations are rounded up after subtracting a tiny
:data:`_EPSILON`, which only absorbs that noise.

Headers (SPEC section 5)
------------------------
:func:`rate_limit_headers` renders a decision for one of the ``rate_limit.headers``
modes: ``draft`` (``RateLimit-Policy`` + ``RateLimit``), ``legacy``
(``RateLimit-Limit``, ``RateLimit-Remaining``, ``RateLimit-Reset``), ``both`` or
``none``. The mode governs only those fields: a refused decision always carries
``Retry-After`` (whole seconds), whatever the mode, because it is the standard
companion of a 429.

This runs for every proxied request, so it is kept cheap: :class:`Bucket` and
:class:`Decision` are named tuples (a third of the cost of frozen attrs classes
to create), the window is cached per ``(C, R)`` and the fields are rendered as
ready header lines in one formatting operation (:func:`header_renderer`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache
from operator import itemgetter
from typing import NamedTuple

NO_REFILL_SECONDS = 3600
"""Window, reset and retry-after, in seconds, of a bucket whose refill rate is 0."""

_EPSILON = 1e-9

RENDERED_KEPT = 1024
"""Rendered header lines a renderer keeps, by decision (some 300 KB at most, per policy);
all are dropped when full. A bucket's states recur, so few are ever held."""


class Bucket(NamedTuple):
    """A token bucket's state: ``tokens`` as measured at time ``updated`` (seconds)."""

    capacity: int
    tokens: float
    refill_rate: float
    updated: float


class Decision(NamedTuple):
    """The outcome of one request against a bucket; see the module docstring."""

    allowed: bool
    limit: int
    remaining: int
    retry_after: int
    reset: int
    window: int


make_tuple = tuple.__new__
"""``make_tuple(Decision, fields)``: a named tuple from a tuple of its fields, at half the
cost of calling the class (whose ``__new__`` is a Python function), for the tuples made
on every request."""


def _ceil(seconds: float) -> int:
    return max(0, math.ceil(seconds - _EPSILON))


@lru_cache(maxsize=1024)
def window(capacity: int, refill_rate: float) -> int:
    """``W = ceil(C / R)``, or :data:`NO_REFILL_SECONDS` when ``R`` is 0."""
    if refill_rate <= 0:
        return NO_REFILL_SECONDS
    return max(1, _ceil(capacity / refill_rate))


def credit(capacity: int, tokens: float, added: float) -> float:
    """Tokens after ``added`` come in (refill over time, or a lease given back): never
    above the capacity. The one settlement rule of every store; the PostgreSQL
    functions (schema/0002_settle.sql) write the same in SQL."""
    tokens += added
    return capacity if tokens > capacity else tokens


def refill(bucket: Bucket, now: float) -> Bucket:
    """The bucket as of ``now``: refilled for the elapsed time, nothing taken."""
    elapsed = now - bucket.updated
    if elapsed <= 0:
        return bucket
    capacity = bucket.capacity
    tokens = credit(capacity, bucket.tokens, bucket.refill_rate * elapsed)
    return Bucket(capacity, tokens, bucket.refill_rate, now)


def is_full(bucket: Bucket, now: float) -> bool:
    """Whether the bucket has refilled to its capacity by ``now``.

    A full bucket holds no information: it is what a client without a bucket
    would be given, so a store may forget it (when it was made from the default).
    The refill's sum without the refilled bucket: the memory store's sweep asks this of
    the buckets it holds, every second for a default that refills within one (10,000
    keys: the sweep took a twentieth of the proxy's CPU, most of it building a bucket
    per question).
    """
    capacity, tokens, rate, updated = bucket
    if now > updated:
        tokens += rate * (now - updated)  # credit() without the cap: compared with it
    return tokens >= capacity


def decide(allowed: bool, capacity: int, tokens: float, refill_rate: float,
           last: Decision | None = None) -> Decision:
    """The :class:`Decision` for a request, given the bucket's state after it.

    Shared by :func:`take` and by stores that do the arithmetic elsewhere (the
    Postgres store refills and takes in SQL and hands the resulting row here).
    ``last``, a decision made before from a bucket of the same refill rate, is the
    answer when it says the same: clients slower than their buckets' refill get the same
    decision request after request, and making one (the named tuple, the window's cache)
    cost some 4,000 of the memory store's 16,800 instructions per request
    (bench/README.md).
    """
    remaining = int(tokens)  # tokens >= 0, so int() is floor()
    if tokens >= capacity:
        reset = 0
    elif refill_rate <= 0:
        reset = NO_REFILL_SECONDS
    else:  # _ceil, inline: the quotient is > 0, so only the "or 1" bound applies
        reset = math.ceil((remaining + 1 - tokens) / refill_rate - _EPSILON) or 1
    if last is not None and last[2] == remaining and last[4] == reset \
            and last[1] == capacity and last[0] == allowed:
        return last  # retry_after and window follow from those and the refill rate
    return make_tuple(Decision, (allowed, capacity, remaining, 0 if allowed else reset, reset,
                           window(capacity, refill_rate)))


def take(bucket: Bucket, now: float, last: Decision | None = None) -> tuple[Bucket, Decision]:
    """Refill ``bucket`` up to ``now`` and try to take one token from it.

    Returns the new bucket state (store it) and the decision for the request (``last``
    when the same: see :func:`decide`).
    """
    capacity, tokens, rate, updated = bucket
    if now > updated:
        tokens += rate * (now - updated)  # credit(), inline on every request's path
        if tokens > capacity:
            tokens = capacity
        updated = now
    allowed = tokens >= 1
    if allowed:
        tokens -= 1
    bucket = make_tuple(Bucket, (capacity, tokens, rate, updated))
    return bucket, decide(allowed, capacity, tokens, rate, last)


# --- headers ---------------------------------------------------------------------

Fields = list[tuple[bytes, bytes]]


_DRAFT = (b'RateLimit-Policy: "default";q=%d;w=%d\r\nRateLimit: "default";r=%d;t=%d\r\n',
          ("limit", "window", "remaining", "reset"))
_LEGACY = (b"RateLimit-Limit: %d\r\nRateLimit-Remaining: %d\r\nRateLimit-Reset: %d\r\n",
           ("limit", "remaining", "reset"))
_TEMPLATES = {
    "both": (_DRAFT[0] + _LEGACY[0], _DRAFT[1] + _LEGACY[1]),
    "draft": _DRAFT,
    "legacy": _LEGACY,
    "none": (b"", ()),
}
"""Per mode: the header lines as a ``%`` template, and the decision's fields it takes."""


def _no_fields(decision: Decision) -> tuple[()]:
    return ()


def header_renderer(mode: str, policy: str = "default") -> RenderedLines:
    """The decision's response fields in ``mode`` (both, draft, legacy, none) as header
    lines, each ending in CRLF, ready to go into a response head: ``lines[decision]``
    (or ``lines(decision)``); a refused decision also gets ``Retry-After``, in every mode.

    Lines rather than (name, value) pairs: one formatting operation per response
    instead of one per field, on every proxied request. And most responses need none:
    the lines are kept per decision (:class:`RenderedLines`), since a bucket's few
    states (whole tokens left, seconds to reset) recur from request to request.

    Raises ``KeyError`` for an unknown mode (the configuration is validated first).
    """
    template, names = _TEMPLATES[mode]
    if policy != "default":  # RateLimit-Policy and RateLimit name the policy (SPEC 8)
        quoted = b'"%s"' % policy.encode("ascii").replace(b"%", b"%%")
        template = template.replace(b'"default"', quoted)
    values = itemgetter(*map(Decision._fields.index, names)) if names else _no_fields
    return RenderedLines(template, values)


class RenderedLines(dict[Decision, bytes]):
    """Header lines by decision, rendered on first sight and kept (all dropped once
    :data:`RENDERED_KEPT` are held): a lookup that finds them runs no Python code, and
    one that does not runs one call, formatting in C (a PostgreSQL lease's decisions
    differ from request to request when its bucket is large)."""

    __slots__ = ("_template", "_values")

    def __init__(self, template: bytes, values: Callable[[Decision], object]) -> None:
        super().__init__()
        self._template = template
        self._values = values  # the decision's fields for the template, picked in C

    def __missing__(self, decision: Decision) -> bytes:
        if len(self) >= RENDERED_KEPT:
            self.clear()
        lines = self._template % self._values(decision)
        if not decision.allowed:
            lines += b"Retry-After: %d\r\n" % decision.retry_after
        self[decision] = lines
        return lines

    __call__ = dict.__getitem__


def field_pairs(lines: bytes) -> Fields:
    """Header lines from :func:`header_renderer` as (name, value) pairs."""
    return [(name, value) for name, _, value in
            (line.partition(b": ") for line in lines.split(b"\r\n") if line)]


def rate_limit_headers(decision: Decision, mode: str) -> Fields:
    """The response header fields for ``decision`` in ``mode``; see :func:`header_renderer`."""
    return field_pairs(header_renderer(mode)(decision))
