"""Token-bucket maths and rate-limit headers, with explicit "now" values (no clocks)."""

from __future__ import annotations

import pytest

from equalizer.buckets.maths import (
    NO_REFILL_SECONDS,
    RENDERED_KEPT,
    Bucket,
    Decision,
    decide,
    header_renderer,
    rate_limit_headers,
    refill,
    take,
    window,
)


def run(bucket: Bucket, times: list[float]) -> tuple[Bucket, list[Decision]]:
    decisions = []
    for now in times:
        bucket, decision = take(bucket, now)
        decisions.append(decision)
    return bucket, decisions


def test_a_decision_that_says_what_the_last_said_is_the_last():
    """Given the last decision taken from a bucket of the same refill rate, take answers
    with it when the new one would say the same (a client slower than the refill), else
    with a new one."""
    bucket, first = take(Bucket(10, 10.0, 100.0, 0.0), 1.0)
    bucket, again = take(bucket, 2.0, first)  # full again by then: the same answer
    assert again is first
    bucket, drained = take(bucket, 2.0, again)  # no refill in between: a token fewer
    assert drained is not first
    assert drained == Decision(True, 10, first.remaining - 1, 0, 1, 1)
    _, refused = take(Bucket(10, 0.5, 0.25, 0.0), 0.0, drained)
    assert refused == Decision(False, 10, 0, 2, 2, 40)


def test_full_bucket_admits_capacity_then_refuses():
    """A full bucket of capacity 3 admits exactly 3 requests at one instant, then refuses."""
    bucket, decisions = run(Bucket(3, 3.0, 1.0, 0.0), [0.0] * 5)
    assert [d.allowed for d in decisions] == [True, True, True, False, False]
    assert [d.remaining for d in decisions] == [2, 1, 0, 0, 0]
    assert bucket.tokens == 0.0


def test_schedule_of_admits_follows_the_refill_rate():
    """With 2 tokens/s an empty bucket admits one request per half second, no more."""
    bucket = Bucket(2, 0.0, 2.0, 0.0)
    times = [0.25, 0.5, 0.75, 1.0, 1.0, 1.5, 1.5]
    _, decisions = run(bucket, times)
    assert [d.allowed for d in decisions] == [False, True, False, True, False, True, False]


def test_partial_refill_accumulates_across_refusals():
    """Refused requests do not reset the refill: fractions add up to a whole token."""
    bucket = Bucket(5, 0.0, 0.25, 0.0)
    bucket, first = take(bucket, 2.0)  # 0.5 token
    assert not first.allowed
    assert bucket.tokens == 0.5
    bucket, second = take(bucket, 3.0)  # 0.75 token
    assert not second.allowed
    assert second.retry_after == 1
    bucket, third = take(bucket, 4.0)  # 1 token
    assert third.allowed
    assert bucket.tokens == 0.0


def test_refill_never_exceeds_capacity():
    """A bucket idle for a long time holds at most its capacity."""
    bucket, decision = take(Bucket(10, 2.0, 5.0, 0.0), 1000.0)
    assert bucket.tokens == 9.0
    assert decision.remaining == 9


def test_clock_going_backwards_neither_drains_nor_double_credits():
    """A "now" before the last update refills nothing and keeps the later timestamp."""
    bucket, decision = take(Bucket(10, 5.0, 1.0, 100.0), 90.0)
    assert decision.allowed
    assert bucket.tokens == 4.0
    assert bucket.updated == 100.0
    bucket, _ = take(bucket, 101.0)  # only the second since 100 counts
    assert bucket.tokens == pytest.approx(4.0)


def test_capacity_below_current_tokens_clamps_on_next_refill():
    """A bucket holding more tokens than a (lowered) capacity is clamped when refilled."""
    bucket, decision = take(Bucket(2, 5.0, 1.0, 0.0), 1.0)
    assert decision.allowed
    assert bucket.tokens == 1.0
    assert decision.remaining == 1
    assert decision.limit == 2


def test_refill_rate_zero_never_refills():
    """A bucket with refill rate 0 admits its tokens once, then refuses forever."""
    bucket, decisions = run(Bucket(2, 2.0, 0.0, 0.0), [0.0, 10.0, 1e6])
    assert [d.allowed for d in decisions] == [True, True, False]
    refused = decisions[-1]
    assert refused.retry_after == NO_REFILL_SECONDS
    assert refused.reset == NO_REFILL_SECONDS
    assert refused.window == NO_REFILL_SECONDS


def test_refill_rate_zero_full_bucket_has_no_reset():
    """A full bucket that never refills reports reset 0 (nothing to wait for)."""
    assert decide(True, 3, 3.0, 0.0).reset == 0


def test_retry_after_rounds_up():
    """Retry-After is the whole seconds until a token is back, rounded up."""
    _, decision = take(Bucket(10, 0.0, 0.3, 0.0), 0.0)  # 1/0.3 = 3.33 s
    assert not decision.allowed
    assert decision.retry_after == 4
    assert decision.reset == 4


def test_retry_after_exact_despite_float_noise():
    """A wait of exactly 3 s is 3, although (1 - 0.7) / 0.1 is 3.0000000000000004 in floats."""
    decision = decide(False, 1, 0.7, 0.1)
    assert decision.retry_after == 3
    assert decision.reset == 3


def test_retry_after_is_zero_when_admitted():
    """An admitted request has retry_after 0, whatever is left."""
    _, decision = take(Bucket(1, 1.0, 0.01, 0.0), 0.0)
    assert decision.allowed
    assert decision.retry_after == 0
    assert decision.reset == 100


def test_reset_counts_to_the_next_whole_token():
    """reset is the time until the whole-token count grows by one, not until full."""
    decision = decide(True, 10, 4.5, 2.0)  # needs 0.5 token at 2/s
    assert decision.remaining == 4
    assert decision.reset == 1
    assert decide(True, 10, 4.0, 0.5).reset == 2


def test_reset_is_zero_when_full():
    """A full bucket has nothing to wait for."""
    assert decide(True, 5, 5.0, 1.0).reset == 0


def test_window_is_capacity_over_rate_rounded_up():
    """W = ceil(C/R), at least 1, and NO_REFILL_SECONDS when R = 0."""
    assert window(100, 10.0) == 10
    assert window(100, 3.0) == 34
    assert window(1, 1000.0) == 1
    assert window(5, 0.0) == NO_REFILL_SECONDS


def test_refill_does_not_take():
    """refill() brings the bucket up to date without spending a token."""
    bucket = refill(Bucket(4, 1.0, 1.0, 0.0), 2.0)
    assert bucket == Bucket(4, 3.0, 1.0, 2.0)
    assert refill(bucket, 1.0) is bucket


ALLOWED = Decision(allowed=True, limit=100, remaining=42, retry_after=0, reset=3, window=10)
REFUSED = Decision(allowed=False, limit=100, remaining=0, retry_after=7, reset=7, window=10)


def test_headers_draft():
    """Draft mode gives RateLimit-Policy and RateLimit in the IETF draft's syntax."""
    assert rate_limit_headers(ALLOWED, "draft") == [
        (b"RateLimit-Policy", b'"default";q=100;w=10'),
        (b"RateLimit", b'"default";r=42;t=3'),
    ]


def test_headers_legacy():
    """Legacy mode gives the RateLimit-Limit/Remaining/Reset trio."""
    assert rate_limit_headers(ALLOWED, "legacy") == [
        (b"RateLimit-Limit", b"100"),
        (b"RateLimit-Remaining", b"42"),
        (b"RateLimit-Reset", b"3"),
    ]


def test_headers_both():
    """Both mode gives the draft fields followed by the legacy trio."""
    assert rate_limit_headers(ALLOWED, "both") == (
        rate_limit_headers(ALLOWED, "draft") + rate_limit_headers(ALLOWED, "legacy")
    )


def test_headers_none():
    """None mode gives no fields for an admitted request."""
    assert rate_limit_headers(ALLOWED, "none") == []


@pytest.mark.parametrize("mode", ["both", "draft", "legacy", "none"])
def test_refusal_carries_retry_after_in_every_mode(mode):
    """A refused decision always ends with Retry-After, whatever the header mode."""
    headers = rate_limit_headers(REFUSED, mode)
    assert headers[-1] == (b"Retry-After", b"7")
    assert sum(1 for name, _ in headers if name == b"Retry-After") == 1


def test_headers_for_a_refusal_in_both_mode():
    """A 429 in both mode carries the draft fields, the trio and Retry-After."""
    assert rate_limit_headers(REFUSED, "both") == [
        (b"RateLimit-Policy", b'"default";q=100;w=10'),
        (b"RateLimit", b'"default";r=0;t=7'),
        (b"RateLimit-Limit", b"100"),
        (b"RateLimit-Remaining", b"0"),
        (b"RateLimit-Reset", b"7"),
        (b"Retry-After", b"7"),
    ]


def test_headers_are_fresh_lists():
    """Callers may append to the returned list without corrupting later answers."""
    first = rate_limit_headers(ALLOWED, "draft")
    first.append((b"X", b"y"))
    assert len(rate_limit_headers(ALLOWED, "draft")) == 2


@pytest.mark.parametrize("mode", ["both", "draft", "legacy", "none"])
@pytest.mark.parametrize("decision", [ALLOWED, REFUSED])
def test_rendered_lines_are_the_fields_as_header_lines(mode, decision):
    """header_renderer gives the same fields as ready header lines, each ending in CRLF."""
    lines = header_renderer(mode)(decision)
    fields = rate_limit_headers(decision, mode)
    assert lines == b"".join(b"%s: %s\r\n" % field for field in fields)


def test_unknown_mode_is_an_error():
    """An unknown header mode raises rather than silently sending nothing."""
    with pytest.raises(KeyError):
        rate_limit_headers(ALLOWED, "bogus")


def test_rendered_lines_are_kept_per_decision_up_to_a_bound():
    """A decision seen before is answered from the lines kept for it; once RENDERED_KEPT
    decisions are held they are all dropped, and rendered again as needed."""
    lines = header_renderer("both", "api")
    first = lines[REFUSED]
    assert lines(REFUSED) is first and first.endswith(b"Retry-After: %d\r\n" % REFUSED.retry_after)
    for remaining in range(RENDERED_KEPT - 1):
        lines[Decision(True, 10**6, remaining, 0, 1, 1)]
    assert len(lines) == RENDERED_KEPT and lines[REFUSED] is first
    lines[ALLOWED]  # one more: all dropped, then this one kept
    assert len(lines) == 1
    assert lines[REFUSED] == first and len(lines) == 2
