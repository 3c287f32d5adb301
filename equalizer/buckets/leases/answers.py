"""What a settlement's rows mean: the answers to its waiting requests, and the
allowances and remembered decisions it leaves (see :mod:`equalizer.buckets.leasing`).

Per key of the batch, the row says how many tokens were granted and what is left in
the bucket: the first waiting requests get the tokens in arrival order, the rest
the refusal the row gives, and what is left of the grant becomes the key's
allowance, unless an admin change came in meanwhile (the key's epoch moved) or the
key was forgotten (the store is stopping: the tokens go straight back). A key the
statement neither found nor created (created, or deleted and created again, by
others meanwhile: migrations 0008 and 0009) is tried again, at most :data:`MAX_ATTEMPTS` times.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.logger import Logger

from equalizer.buckets.interface import StoreDataError, StoreUnavailable
from equalizer.buckets.maths import Decision, decide

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred
    from twisted.python.failure import Failure

    from equalizer.buckets.leases.allowances import Allowances, Answers, Key
    from equalizer.config.model import BucketPolicy

log = Logger()

MAX_ATTEMPTS = 3
"""Settlements a key's requests may go through without an answer (its bucket created,
or deleted and created again, by others while the statement ran), before they fail."""

Sent = tuple[str, "Key", list["Deferred[Any]"], int, "BucketPolicy | None"]
"""One key of a settlement in flight: client id, its state, the requests it answers,
the key's epoch when sent, the default policy sent."""


def take_in(rows: list[tuple[Any, ...]], batch: list[Sent], sent: float, now: float,
            allowances: Allowances, pending: dict[str, Key]) -> bool:
    """Answer the requests of a settlement sent at ``sent`` from its ``rows``, and keep
    what it leased; keys to try again go back to ``pending`` (whether any did)."""
    retried = False
    found = {row[0]: row for row in rows}
    answers: Answers = []
    errors: list[Deferred[Any]] = []
    keys = allowances.keys
    for client_id, key, waiters, epoch, default in batch:
        key.settling = False
        current = key.epoch == epoch and keys.get(client_id) is key
        row = found.get(client_id)
        if row is not None:
            key.attempts = 0
            if not _granted(row, key, waiters, epoch, current, sent, now, allowances, answers):
                continue
        elif not waiters:
            continue  # a lease asked for ahead of need: nothing to answer
        elif default is None:  # no bucket, no default: not limited
            answers.extend((d, None) for d in waiters)
            if not current:
                continue
            allowances.not_limited(key, now)
        else:  # created or deleted by someone else meanwhile: again
            key.attempts += 1
            if key.attempts > MAX_ATTEMPTS:
                key.attempts = 0
                errors.extend(waiters)
            else:
                key.waiters[:0] = waiters
                pending[client_id] = key
                retried = True
            continue
        if key.waiters and allowances.serve(key, now, answers):  # came meanwhile
            pending.pop(client_id, None)
    for d, answer in answers:
        d.callback(answer)
    for d in errors:
        d.errback(StoreUnavailable("the bucket kept changing under the lease"))
    return retried


def _granted(row: tuple[Any, ...], key: Key, waiters: list[Deferred[Any]], epoch: int,
             current: bool, sent: float, now: float, allowances: Allowances,
             answers: Answers) -> bool:
    """A key the statement found (or created): tokens to its requests, the rest kept as
    its allowance; whether the key is current (requests that came meanwhile may use it)."""
    client_id, granted, tokens, capacity, rate = row
    info = decide(True, capacity, tokens, rate)
    served = 0
    if waiters:  # none for most keys: their leases are asked for ahead of need
        served = min(granted, len(waiters))
        base, reset, window = info.remaining, info.reset, info.window
        for i, d in enumerate(waiters[:served]):
            answers.append((d, Decision(True, capacity, base + granted - i - 1, 0, reset,
                                        window)))
        if served < len(waiters):
            refusal = decide(False, capacity, tokens, rate)
            answers.extend((d, refusal) for d in waiters[served:])
    if key.epoch != epoch:
        return False  # an admin change came in meanwhile: no allowance from before it
    if not current:  # stopping: straight back to the database
        if granted > served:
            returns = allowances.returns
            returns[client_id] = returns.get(client_id, 0) + granted - served
        return False
    allowances.lease(client_id, key, granted - served, sent, info, tokens, rate, now)
    return True


def failed(failure: Failure, batch: list[Sent]) -> None:
    """Every request of a failed statement fails with StoreUnavailable, so the limiter
    applies ``on_store_error``; tokens it was giving back are lost (under-admission)."""
    if not failure.check(StoreUnavailable, StoreDataError):  # those are logged where raised
        log.failure("settling leased tokens failed", failure)
    message = failure.getErrorMessage()
    for _, key, waiters, _, _ in batch:
        key.settling = False
        for d in waiters:
            d.errback(StoreUnavailable(message))
