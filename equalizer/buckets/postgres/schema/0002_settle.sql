-- equalizer_settle(batch): one settlement of equalizer.leasing, for many keys at once.
--
-- batch is a JSON array with, per key, [client_id, waiting, extra, back, default
-- capacity or null, default refill rate or null]. For each key, in client_id
-- order (so two instances settling overlapping keys lock rows in the same order
-- and never deadlock), under the row lock and from the database clock:
--
--     T       = min(C, refilled T + back)
--     granted = min(floor(T), waiting + min(extra, max(1, C / 10)))
--     T       = T - granted
--
-- A key with no row and a default is inserted full, minus its grant; a row
-- inserted by someone else meanwhile is taken from on a second look. A key with
-- no row and no default (or nothing waiting) returns nothing. The refill is the
-- one of equalizer.stores (tokens measured at updated_at; the clock only moves
-- updated_at forward).
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
                (client_id, capacity, tokens, refill_rate, last_allowed, created_at, updated_at)
            VALUES (r.id, r.dcap, r.dcap - granted, r.drate, true, at, at)
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
