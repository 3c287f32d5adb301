-- Every key of a settlement is found by a probe of the primary key of its own, whatever
-- the table's statistics say.
--
-- Migration 0008 joined the batch to the buckets table and left the join to the
-- planner. Once the sweep had emptied the table and it was analyzed (no rows, its pages
-- still there), the planner took the table for empty and read all of it again for
-- every key of a batch: with 10,000 rows, one settlement of 1,000 keys cost 10 s of
-- database CPU instead of 13 ms, the statements timed out, and the limiter fell back to
-- on_store_error until autovacuum analyzed the table again. The insert's NOT EXISTS did
-- the same. Sequential scans off (migration 0007) did not prevent it: it was a full
-- index scan.
--
-- Now no step's cost depends on the table's size as the statistics tell it:
--
-- 1. The batch is sorted by key (COLLATE "C") and each key's row is looked up and
--    locked by a LATERAL subquery, which can only run as one index probe per key, in
--    that order: rows are still locked in one global order.
-- 2. The locked rows are written back by an INSERT ... ON CONFLICT DO UPDATE of the
--    same keys: its arbiter finds each row by a probe of the primary key, so there is
--    no join between the batch and the table for the planner to get wrong.
-- 3. Only if some key was not found: the keys that may be created are inserted in key
--    order; ON CONFLICT DO NOTHING leaves alone the rows found in 1 and those another
--    settlement created meanwhile (that key comes back without a row and is sent
--    again), so there is no anti-join against the table.
--
-- What it answers is unchanged (migrations 0002 and 0008).
CREATE OR REPLACE FUNCTION equalizer_settle(batch json)
RETURNS TABLE (
    settled_id text,
    granted integer,
    tokens_left double precision,
    bucket_capacity integer,
    bucket_refill_rate double precision
)
LANGUAGE plpgsql
SET enable_seqscan = off  -- migration 0007
AS $$
DECLARE
    at timestamptz := clock_timestamp();
    settled integer;
BEGIN
    RETURN QUERY
    WITH locked AS (
        SELECT e.id, e.want, e.extra, b.policy, b.client_id, b.capacity, b.refill_rate,
               b.updated_at, b.last_allowed,
               least(b.capacity::float8,
                     b.tokens + b.refill_rate
                         * greatest(0.0, extract(epoch FROM (at - b.updated_at))::float8)
                     + e.back) AS held
        FROM (
            SELECT j->>0 AS id, (j->>1)::integer AS want, (j->>2)::integer AS extra,
                   (j->>3)::integer AS back,
                   CASE WHEN strpos(j->>0, chr(31)) > 0
                        THEN split_part(j->>0, chr(31), 1) ELSE 'default' END AS pol,
                   CASE WHEN strpos(j->>0, chr(31)) > 0
                        THEN substr(j->>0, strpos(j->>0, chr(31)) + 1) ELSE j->>0 END AS cid
            FROM json_array_elements(batch) AS j
            ORDER BY (j->>0) COLLATE "C"
        ) AS e
        CROSS JOIN LATERAL (
            SELECT k.* FROM buckets AS k
            WHERE k.policy = e.pol AND k.client_id = e.cid
            FOR UPDATE
        ) AS b
    ), grants AS (
        SELECT l.*, least(floor(l.held)::integer,
                          l.want + least(l.extra, greatest(1, l.capacity / 10))) AS g
        FROM locked AS l
    ), written AS (
        INSERT INTO buckets AS s (policy, client_id, capacity, tokens, refill_rate,
                                  updated_at, last_allowed)
        SELECT t.policy, t.client_id, t.capacity, t.held - t.g, t.refill_rate,
               greatest(t.updated_at, at),
               CASE WHEN t.want > 0 THEN t.g > 0 ELSE t.last_allowed END
        FROM grants AS t
        ON CONFLICT (policy, client_id) DO UPDATE
        SET tokens = excluded.tokens, updated_at = excluded.updated_at,
            last_allowed = excluded.last_allowed
    )
    SELECT t.id, t.g, t.held - t.g, t.capacity, t.refill_rate FROM grants AS t;
    GET DIAGNOSTICS settled = ROW_COUNT;
    IF settled = json_array_length(batch) THEN
        RETURN;
    END IF;
    RETURN QUERY
    WITH wanted AS (
        SELECT e.id, e.dcap, e.drate,
               CASE WHEN strpos(e.id, chr(31)) > 0
                    THEN split_part(e.id, chr(31), 1) ELSE 'default' END AS pol,
               CASE WHEN strpos(e.id, chr(31)) > 0
                    THEN substr(e.id, strpos(e.id, chr(31)) + 1) ELSE e.id END AS cid,
               least(e.dcap, e.want + least(e.extra, greatest(1, e.dcap / 10))) AS g
        FROM (
            SELECT j->>0 AS id, (j->>1)::integer AS want, (j->>2)::integer AS extra,
                   (j->>4)::integer AS dcap, (j->>5)::float8 AS drate
            FROM json_array_elements(batch) AS j
        ) AS e
        WHERE e.dcap IS NOT NULL AND (e.want > 0 OR e.extra > 0)
        ORDER BY e.id COLLATE "C"
    ), made AS (
        INSERT INTO buckets AS s
            (policy, client_id, capacity, tokens, refill_rate, last_allowed, created_at,
             updated_at, from_default)
        SELECT w.pol, w.cid, w.dcap, w.dcap - w.g, w.drate, true, at, at, true FROM wanted AS w
        ON CONFLICT (policy, client_id) DO NOTHING
        RETURNING s.policy, s.client_id, s.capacity, s.tokens, s.refill_rate
    )
    SELECT w.id, w.g, m.tokens, m.capacity, m.refill_rate
    FROM made AS m JOIN wanted AS w ON w.pol = m.policy AND w.cid = m.client_id;
END
$$;
