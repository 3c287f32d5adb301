-- Rate-limit policies (SPEC 8): a bucket's identity is (policy, client_id).
--
-- Every bucket stored so far belongs to the policy named "default" (the column's
-- default fills it in), so every call of SPEC section 6, which means that policy,
-- keeps its meaning and no bucket is lost.
ALTER TABLE buckets ADD COLUMN policy text COLLATE "C" NOT NULL DEFAULT 'default';

ALTER TABLE buckets
    DROP CONSTRAINT buckets_pkey,
    ADD CONSTRAINT buckets_pkey PRIMARY KEY (policy, client_id),
    ADD CONSTRAINT buckets_policy_check CHECK (policy <> '' AND length(policy) <= 63);

-- The sweep walks the default rows in (policy, client_id) order.
DROP INDEX buckets_from_default;
CREATE INDEX buckets_from_default ON buckets (policy, client_id) WHERE from_default;

-- equalizer_settle of migration 0004, with the policy: a key is "client id" under
-- the default policy, or "policy" chr(31) "client id" (no client id holds a control
-- character), as equalizer.buckets.interface.bucket_key makes it.
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
            EXIT WHEN r.want = 0 OR r.dcap IS NULL;
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
