-- A lease asked for ahead of need creates its key's bucket from the default policy
-- when the row is gone, as a waiting request does.
--
-- The sweep deletes default buckets once they are full again, so the row of a client
-- that uses less than its refill is gone within a refill window of its last
-- settlement. Its next lease, asked for before its allowance ran out so that no
-- request waits (equalizer.buckets.leasing), used to find no row and lease nothing,
-- and the client's next request waited for a statement after all. Such a row now
-- carries the default (Python sends it) and is created full, less the grant: the
-- very row the waiting request would have made a moment later. A row that only gives
-- tokens back (no demand, no lease) still creates nothing.
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
    pol text;
    cid text;
BEGIN
    FOR r IN
        SELECT e->>0 AS id, (e->>1)::integer AS want, (e->>2)::integer AS extra,
               (e->>3)::integer AS back, (e->>4)::integer AS dcap, (e->>5)::float8 AS drate
        FROM json_array_elements(batch) AS e
        ORDER BY (e->>0) COLLATE "C"
    LOOP
        IF strpos(r.id, chr(31)) > 0 THEN
            pol := split_part(r.id, chr(31), 1);
            cid := substr(r.id, strpos(r.id, chr(31)) + 1);
        ELSE
            pol := 'default';
            cid := r.id;
        END IF;
        FOR attempt IN 1..2 LOOP
            SELECT s.capacity, s.tokens, s.refill_rate, s.updated_at, s.last_allowed INTO b
            FROM buckets AS s WHERE s.policy = pol AND s.client_id = cid FOR UPDATE;
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
                WHERE s.policy = pol AND s.client_id = cid;
                settled_id := r.id;
                tokens_left := held - granted;
                bucket_capacity := b.capacity;
                bucket_refill_rate := b.refill_rate;
                RETURN NEXT;
                EXIT;
            END IF;
            EXIT WHEN r.dcap IS NULL OR (r.want = 0 AND r.extra = 0);
            granted := least(r.dcap, r.want + least(r.extra, greatest(1, r.dcap / 10)));
            INSERT INTO buckets AS s
                (policy, client_id, capacity, tokens, refill_rate, last_allowed, created_at,
                 updated_at, from_default)
            VALUES (pol, cid, r.dcap, r.dcap - granted, r.drate, true, at, at, true)
            ON CONFLICT (policy, client_id) DO NOTHING;
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
