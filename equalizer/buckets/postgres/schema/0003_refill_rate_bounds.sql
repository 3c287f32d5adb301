-- Refill rates every refill can compute (equalizer.config.validate_refill_rate):
-- 0, or from 1e-6 to 1e9 tokens a second. Rates outside those bounds were let in
-- before and could make a row unusable for good: with 1e308 the refill
-- (rate * elapsed seconds) overflows double precision, with 5e-324 it underflows,
-- and every statement reading the row then fails (settlements of other keys with it).
--
-- Rows outside the bounds get the nearest one, which keeps what they meant: a
-- rate above 1e9 refills any bucket (capacity <= 2^31 - 1) within about 2 s, and
-- one below 1e-6 (not a token in 11 days) refills at that slowest rate.
UPDATE buckets
SET refill_rate = CASE WHEN refill_rate > 1e9 THEN 1e9 ELSE 1e-6 END
WHERE refill_rate > 1e9 OR (refill_rate > 0 AND refill_rate < 1e-6);

-- NaN sorts above every number, so "<= 1e9" also refuses it.
ALTER TABLE buckets
    DROP CONSTRAINT buckets_refill_rate_check,
    ADD CONSTRAINT buckets_refill_rate_check
        CHECK (refill_rate = 0 OR (refill_rate >= 1e-6 AND refill_rate <= 1e9));
