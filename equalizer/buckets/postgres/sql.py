"""The SQL text of the PostgreSQL bucket store and of token leasing.

Time comes from the database: every refill is computed from the server's
``clock_timestamp()`` (instances share no other clock, and passing each host's
time in would let clock skew mint or swallow tokens). The refill timestamp only
moves forward (``greatest(updated_at, now)``), so no interval is credited twice.
The arithmetic is :func:`equalizer.buckets.maths.refill`'s; a unit test holds the
two together.
"""

from __future__ import annotations

import re

MIGRATION_LOCK = 0x657175616C697A72  # "equalizr": the advisory lock migrations hold

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
    " RETURNING b.client_id, b.capacity, b.tokens, b.refill_rate, b.created_at, b.updated_at,"
    " b.policy"
)

# A take. With a default policy ($2 capacity, $3 refill rate) the bucket is created
# on first sight, full, minus this request; without one only an existing bucket is
# touched. $1 is the client id, $4 (or $2) the policy.
TAKE_OR_CREATE = (
    "INSERT INTO buckets AS b (policy, client_id, capacity, tokens, refill_rate, last_allowed,"
    " created_at, updated_at, from_default)"
    f" SELECT $4, $1, $2, $2::float8 - 1, $3, true, n.now, n.now, true FROM {_NOW}"
    f" ON CONFLICT (policy, client_id) DO UPDATE SET {_taking('EXCLUDED.updated_at')}"
    + _TAKE_RETURNING
)
TAKE_EXISTING = (
    f"UPDATE buckets AS b SET {_taking('n.now')} FROM {_NOW}"
    " WHERE b.policy = $2 AND b.client_id = $1" + _TAKE_RETURNING
)
_TAKE_STATEMENTS = {
    # name: (parameter types, SQL with $n parameters)
    "equalizer_take_or_create": ("text, integer, float8, text", TAKE_OR_CREATE),
    "equalizer_take_existing": ("text, text", TAKE_EXISTING),
}


def inline(sql: str) -> str:
    """The SQL with psycopg2 placeholders instead of $n, to send it unprepared."""
    return re.sub(r"\$(\d)(?!\d)", lambda m: f"%(p{m.group(1)})s", sql)


# Takes commit asynchronously (see the module docstring); admin writes opt back in
# for their own implicit transaction. A multi-statement query is one transaction.
SESSION_SETUP = "SET synchronous_commit TO off"
PREPARE = "; ".join(
    f"PREPARE {name} ({types}) AS {sql}" for name, (types, sql) in _TAKE_STATEMENTS.items()
)
_DURABLY = "SET LOCAL synchronous_commit TO on; "

_RECORD_COLUMNS = (
    f"b.client_id, b.capacity, {_REFILLED_NOW}, b.refill_rate, b.created_at, b.updated_at,"
    " b.policy"
)
GET = (f"SELECT {_RECORD_COLUMNS} FROM buckets AS b, {_NOW}"
       " WHERE b.client_id = %s AND b.policy = %s")
LIST = (
    f"WITH page AS (SELECT {_RECORD_COLUMNS} FROM buckets AS b, {_NOW}"
    " WHERE b.policy = %(policy)s ORDER BY b.client_id LIMIT %(limit)s OFFSET %(offset)s)"
    " SELECT t.total, page.* FROM"
    " (SELECT count(*) AS total FROM buckets WHERE policy = %(policy)s) AS t"
    " LEFT JOIN page ON true ORDER BY page.client_id"
)
CREATE = (
    _DURABLY + "INSERT INTO buckets AS b"
    " (client_id, capacity, tokens, refill_rate, created_at, updated_at, policy)"
    f" SELECT %s, %s, %s, %s, n.now, n.now, %s FROM {_NOW}"
    " ON CONFLICT (policy, client_id) DO NOTHING" + _RECORD_RETURNING
)
UPDATE = (
    _DURABLY + "UPDATE buckets AS b SET"
    " capacity = coalesce(%(capacity)s::integer, b.capacity),"
    " refill_rate = coalesce(%(refill_rate)s::float8, b.refill_rate),"
    " tokens = coalesce(%(tokens)s::float8,"
    f" least(coalesce(%(capacity)s::integer, b.capacity)::float8, {_REFILLED_NOW})),"
    " updated_at = greatest(b.updated_at, n.now), from_default = false"
    f" FROM {_NOW} WHERE b.client_id = %(client_id)s AND b.policy = %(policy)s"
    + _RECORD_RETURNING
)
DELETE = _DURABLY + "DELETE FROM buckets WHERE client_id = %s AND policy = %s RETURNING 1"

SWEEP_LOCK = MIGRATION_LOCK + 1  # held by a sweep statement, so instances take turns

# Full as of now, on the database clock, and unchanged for %(idle)s seconds, for the
# row "b": the row of a client still active is updated, not deleted and made again.
_SWEEPABLE = (_REFILLED.format(now="clock_timestamp()") + " >= b.capacity"
              " AND b.updated_at <= clock_timestamp() - %(idle)s * interval '1 second'")

# One sweep batch: look at the next SWEEP_BATCH default rows after %(after)s in
# client id order (the partial index), lock the sweepable ones that nobody holds
# (SKIP LOCKED: a take or settlement in progress wins; FOR UPDATE checks fullness
# again on the row's latest version) and delete them. Answers whether this
# instance got the sweep lock, the rows looked at, the last client id looked at
# and the rows deleted. Each row is locked by a probe of its own (LATERAL) and
# deleted by its tuple id, so no join between the batch and the table is left to
# the planner: with the table analyzed before it held rows, joins on the key read
# the whole table for every row of the batch (3 s a batch at 10,000 rows). A row
# changed meanwhile has another tuple id and is left for the next sweep.
SWEEP = (
    "WITH sweeper AS (SELECT pg_try_advisory_xact_lock(%(lock)s) AS got),"
    f" examined AS (SELECT b.policy, b.client_id, {_SWEEPABLE} AS sweepable"
    " FROM buckets AS b, sweeper WHERE sweeper.got AND b.from_default"
    " AND (b.policy, b.client_id) > (%(after_policy)s, %(after)s)"
    " ORDER BY b.policy, b.client_id LIMIT %(batch)s),"
    " doomed AS (SELECT d.row_id FROM examined AS e CROSS JOIN LATERAL"
    " (SELECT b.ctid AS row_id FROM buckets AS b"
    " WHERE b.policy = e.policy AND b.client_id = e.client_id"
    f" AND b.from_default AND {_SWEEPABLE} FOR UPDATE SKIP LOCKED) AS d"
    " WHERE e.sweepable),"
    " gone AS (DELETE FROM buckets AS b USING doomed AS d"
    " WHERE b.ctid = d.row_id RETURNING 1)"
    " SELECT (SELECT got FROM sweeper), (SELECT count(*) FROM examined),"
    " (SELECT ARRAY[e.policy, e.client_id] FROM examined AS e"
    " ORDER BY e.policy DESC, e.client_id DESC LIMIT 1), (SELECT count(*) FROM gone)"
)
COUNT = "SELECT count(*) FROM buckets"

CONSTRAINT_FIELDS = {
    "buckets_client_id_check": "client_id",
    "buckets_capacity_check": "capacity",
    "buckets_tokens_check": "tokens",
    "buckets_refill_rate_check": "refill_rate",
    "buckets_policy_check": "policy",
}


# One settlement of token leasing: the function of migrations 0002, 0008 and 0009 (its plans
# are cached per session, so the server neither parses nor plans much per statement).
# Its one parameter is a JSON array with, per key, [client id, requests waiting,
# lease wanted beyond them, tokens given back, default capacity (null: no default),
# default refill rate]: json.dumps builds it in C, where psycopg2 would quote array
# elements one by one in Python (about 2 us each).
SETTLE = "SELECT * FROM equalizer_settle(%s::json)"
