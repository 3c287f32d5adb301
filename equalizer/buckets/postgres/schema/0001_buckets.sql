-- Token buckets, one row per client key (SPEC sections 5 and 6).
--
-- tokens is the count as measured at updated_at; readers refill it lazily from
-- the elapsed time (see equalizer/ratelimit.py). Every change of the row, a take
-- included, moves updated_at. last_allowed is the outcome of the latest take:
-- INSERT ... ON CONFLICT ... RETURNING only sees the new row, so the decision
-- travels in it. client_id uses the "C" collation so that ORDER BY client_id is
-- code-point order, the order MemoryStore lists in.
CREATE TABLE buckets (
    client_id    text COLLATE "C" NOT NULL,
    capacity     integer NOT NULL,
    tokens       double precision NOT NULL,
    refill_rate  double precision NOT NULL,
    last_allowed boolean NOT NULL DEFAULT true,
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT buckets_pkey PRIMARY KEY (client_id),
    CONSTRAINT buckets_client_id_check CHECK (client_id <> '' AND length(client_id) <= 512),
    CONSTRAINT buckets_capacity_check CHECK (capacity > 0),
    -- NaN sorts above every number in PostgreSQL, so these also refuse NaN.
    CONSTRAINT buckets_tokens_check CHECK (tokens >= 0 AND tokens <= capacity),
    CONSTRAINT buckets_refill_rate_check
        CHECK (refill_rate >= 0 AND refill_rate < 'Infinity'::double precision)
) WITH (fillfactor = 70);  -- room on each page for HOT updates: a take rewrites its row
