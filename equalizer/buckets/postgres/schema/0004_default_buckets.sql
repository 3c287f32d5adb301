-- Buckets made from rate_limit.default, marked so that the sweep may forget them
-- once they are full again (equalizer.stores.PostgresStore): a full default
-- bucket holds no information, a client without a row gets the same one.
--
-- Rows already stored cannot tell who made them, so they all count as made
-- through the admin API and are kept until deleted (never swept); the column's
-- default is false for the same reason: only the take statements and the
-- settlement function, which create rows from the default, say true. An admin
-- change (PUT) sets it back to false.
ALTER TABLE buckets ADD COLUMN from_default boolean NOT NULL DEFAULT false;

-- The sweep walks the default rows in client_id order, a batch at a time. The
-- column is not changed by takes, so their updates stay HOT.
CREATE INDEX buckets_from_default ON buckets (client_id) WHERE from_default;

-- equalizer_settle of migration 0002, unchanged but for the rows it creates from
-- the default, which are marked so.
CREATE OR REPLACE FUNCTION equalizer_settle(batch json)
RETURNS TABLE (
    settled_id text,
    granted integer,
    tokens_left double precision,
    bucket_capacity integer,
    bucket_refill_rate double precision
)
LANGUAGE plpgsql
AS $$
DECLARE
    r record;
    b record;
    at timestamptz := clock_timestamp();
    held double precision;
BEGIN
    FOR r IN
        SELECT e->>0 AS id, (e->>1)::integer AS want, (e->>2)::integer AS extra,
               (e->>3)::integer AS back, (e->>4)::integer AS dcap, (e->>5)::float8 AS drate
        FROM json_array_elements(batch) AS e
        ORDER BY (e->>0) COLLATE "C"
    LOOP
        FOR attempt IN 1..2 LOOP
            SELECT s.capacity, s.tokens, s.refill_rate, s.updated_at, s.last_allowed INTO b
            FROM buckets AS s WHERE s.client_id = r.id FOR UPDATE;
            IF FOUND THEN
                held := least(b.capacity::float8,
                              b.tokens + b.refill_rate
                                  * greatest(0.0, extract(epoch FROM (at - b.updated_at))::float8)
                              + r.back);
                granted := least(floor(held)::integer,
                                 r.want + least(r.extra, greatest(1, b.capacity / 10)));
                UPDATE buckets AS s
                SET tokens = held - granted,
                    updated_at = greatest(b.updated_at, at),
                    last_allowed = CASE WHEN r.want > 0 THEN granted > 0 ELSE b.last_allowed END
                WHERE s.client_id = r.id;
                settled_id := r.id;
                tokens_left := held - granted;
                bucket_capacity := b.capacity;
                bucket_refill_rate := b.refill_rate;
                RETURN NEXT;
                EXIT;
            END IF;
            EXIT WHEN r.want = 0 OR r.dcap IS NULL;
            granted := least(r.dcap, r.want + least(r.extra, greatest(1, r.dcap / 10)));
            INSERT INTO buckets AS s
                (client_id, capacity, tokens, refill_rate, last_allowed, created_at, updated_at,
                 from_default)
            VALUES (r.id, r.dcap, r.dcap - granted, r.drate, true, at, at, true)
            ON CONFLICT (client_id) DO NOTHING;
            IF FOUND THEN
                settled_id := r.id;
                tokens_left := r.dcap - granted;
                bucket_capacity := r.dcap;
                bucket_refill_rate := r.drate;
                RETURN NEXT;
                EXIT;
            END IF;
            -- Someone else inserted it meanwhile (and committed: ON CONFLICT waited).
        END LOOP;
    END LOOP;
END
$$;
