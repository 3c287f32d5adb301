-- A settlement settles its keys in two set-based statements, not in a loop per key.
--
-- The loop of migrations 0002-0006 ran, per key, a SELECT ... FOR UPDATE and an
-- UPDATE (or an INSERT), each a separate trip through the executor: with 10,000 rows,
-- about 41 us of database time a key on one machine, 120 us on a slower one, which
-- under load came in bursts on the core that also runs the clients. Set-based, the
-- same batches cost 2 to 3 times less (bench/README.md).
--
-- What it does is unchanged (the arithmetic and the rows it answers, migration 0002):
--
-- 1. Every key whose row exists is locked, in the order of its key (the string sent,
--    COLLATE "C", as before: the lock sits above the sort), and updated. Rows are
--    locked in one global order, so settlements never wait on each other in a cycle.
--    A row changed by another transaction meanwhile is locked and settled as last
--    committed (the lock re-reads it); a row deleted meanwhile is missing.
-- 2. Only if some key was not found: the missing keys that may be created (a default
--    and something wanted) are inserted, again in key order, full less the grant. An
--    insert waits only for another settlement's insert of the same key, and those too
--    go in key order. A row that appeared since the first statement is left alone
--    (ON CONFLICT DO NOTHING, and the insert no longer looks again): the key comes
--    back without a row, and equalizer.leasing sends it again with its next
--    settlement, as it did for a row deleted and created again meanwhile. Looking
--    again here would lock that row after rows further on in key order.
CREATE OR REPLACE FUNCTION equalizer_settle(batch json)
RETURNS TABLE (
    settled_id text,
    granted integer,
    tokens_left double precision,
    bucket_capacity integer,
    bucket_refill_rate double precision
)
LANGUAGE plpgsql
SET enable_seqscan = off  -- migration 0007: every key by its index
AS $$
DECLARE
    at timestamptz := clock_timestamp();
    settled integer;
BEGIN
    RETURN QUERY
    WITH e AS (
        SELECT j->>0 AS id, (j->>1)::integer AS want, (j->>2)::integer AS extra,
               (j->>3)::integer AS back
        FROM json_array_elements(batch) AS j
    ), locked AS (
        SELECT e.id, e.want, e.extra, b.policy, b.client_id, b.capacity, b.refill_rate,
               b.updated_at, b.last_allowed,
               least(b.capacity::float8,
                     b.tokens + b.refill_rate
                         * greatest(0.0, extract(epoch FROM (at - b.updated_at))::float8)
                     + e.back) AS held
        FROM e JOIN buckets AS b
            ON b.policy = CASE WHEN strpos(e.id, chr(31)) > 0
                               THEN split_part(e.id, chr(31), 1) ELSE 'default' END
           AND b.client_id = CASE WHEN strpos(e.id, chr(31)) > 0
                                  THEN substr(e.id, strpos(e.id, chr(31)) + 1) ELSE e.id END
        ORDER BY e.id COLLATE "C"
        FOR UPDATE OF b
    ), grants AS (
        SELECT l.*, least(floor(l.held)::integer,
                          l.want + least(l.extra, greatest(1, l.capacity / 10))) AS g
        FROM locked AS l
    )
    UPDATE buckets AS s
    SET tokens = t.held - t.g,
        updated_at = greatest(t.updated_at, at),
        last_allowed = CASE WHEN t.want > 0 THEN t.g > 0 ELSE t.last_allowed END
    FROM grants AS t
    WHERE s.policy = t.policy AND s.client_id = t.client_id
    RETURNING t.id, t.g, t.held - t.g, t.capacity, t.refill_rate;
    GET DIAGNOSTICS settled = ROW_COUNT;
    IF settled = json_array_length(batch) THEN
        RETURN;
    END IF;
    RETURN QUERY
    WITH e AS (
        SELECT j->>0 AS id, (j->>1)::integer AS want, (j->>2)::integer AS extra,
               (j->>4)::integer AS dcap, (j->>5)::float8 AS drate
        FROM json_array_elements(batch) AS j
    ), wanted AS (
        SELECT e.*,
               CASE WHEN strpos(e.id, chr(31)) > 0
                    THEN split_part(e.id, chr(31), 1) ELSE 'default' END AS pol,
               CASE WHEN strpos(e.id, chr(31)) > 0
                    THEN substr(e.id, strpos(e.id, chr(31)) + 1) ELSE e.id END AS cid,
               least(e.dcap, e.want + least(e.extra, greatest(1, e.dcap / 10))) AS g
        FROM e WHERE e.dcap IS NOT NULL AND (e.want > 0 OR e.extra > 0)
    ), fresh AS (
        SELECT w.* FROM wanted AS w
        WHERE NOT EXISTS (SELECT 1 FROM buckets AS b
                          WHERE b.policy = w.pol AND b.client_id = w.cid)
        ORDER BY w.id COLLATE "C"
    ), made AS (
        INSERT INTO buckets AS s
            (policy, client_id, capacity, tokens, refill_rate, last_allowed, created_at,
             updated_at, from_default)
        SELECT f.pol, f.cid, f.dcap, f.dcap - f.g, f.drate, true, at, at, true FROM fresh AS f
        ON CONFLICT (policy, client_id) DO NOTHING
        RETURNING s.policy, s.client_id, s.capacity, s.tokens, s.refill_rate
    )
    SELECT f.id, f.g, m.tokens, m.capacity, m.refill_rate
    FROM made AS m JOIN fresh AS f ON f.pol = m.policy AND f.cid = m.client_id;
END
$$;
