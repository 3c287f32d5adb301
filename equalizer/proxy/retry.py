"""When a failed try goes to another backend (SPEC 4.4, ``proxy.retries`` and ``retry_on``).

A connection that cannot be made is retried for any method (nothing was sent), if
``connect_failure`` is listed (the default). ``retry_on`` may add ``502``, ``503``,
``504`` (a backend answered with that status) and ``timeout`` (no response head
within ``timeouts.response``): those are retried only for idempotent methods whose
body has not started going out, only while ``retries`` allow, and only when
another backend, not tried yet, is available; otherwise the backend's answer
goes to the client as it is (a 504 of our own, for a timeout). A retry never goes
to a backend the request already tried, and the access log names every one.
The answer being retried is not read: its connection is closed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from attrs import frozen

if TYPE_CHECKING:
    from equalizer.balancer.pool import Backend
    from equalizer.proxy.attempt import Attempt
    from equalizer.proxy.exchange import Exchange
    from equalizer.proxy.upstream import UpstreamConnection

IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"TRACE"})


@frozen
class RetryPolicy:
    """``proxy.retry_on`` read once: what the hot path tests."""

    connect_failure: bool = True
    timeout: bool = False
    statuses: frozenset[int] = frozenset()

    @classmethod
    def from_names(cls, names: Iterable[str]) -> RetryPolicy:
        names = set(names)
        return cls(connect_failure="connect_failure" in names, timeout="timeout" in names,
                   statuses=frozenset(int(name) for name in names if name.isdigit()))


def may_retry(attempt: Attempt) -> bool:
    """Whether this try's request may go to another backend after an answer or a timeout:
    idempotent, no body byte sent, retries left, and a backend not tried yet available."""
    exchange = attempt.exchange
    if exchange.method not in IDEMPOTENT_METHODS or attempt.body_sent:
        return False
    proxy = exchange.proxy
    tried = exchange.tried
    if len(tried) > proxy.config.retries:
        return False
    return any(backend not in tried for backend in exchange.unit.pool.available)


def after_connect_failure(exchange: Exchange, backend: Backend, kind: str) -> None:
    """A connection to ``backend`` failed for ``kind`` (connect or connect_timeout, and was
    counted): outlier detection hears of it, and the request goes to another backend if
    ``connect_failure`` is listed."""
    proxy = exchange.proxy
    outlier = exchange.unit.outlier
    if outlier is not None:
        outlier.gateway_error(backend, "connection failed")
    if proxy.retry.connect_failure:
        exchange.retry_or_fail(backend, kind)
    else:
        exchange.gateway_failure()


def retry_after_timeout(attempt: Attempt, backend: Backend) -> bool:
    """No response head within ``timeouts.response``: outlier detection hears of it, and
    whether the request goes to another backend (``timeout`` listed, see ``may_retry``)."""
    proxy = attempt.exchange.proxy
    outlier = attempt.exchange.unit.outlier
    if outlier is not None:
        outlier.gateway_error(backend, "response timeout")
    return proxy.retry.timeout and may_retry(attempt)


def resend_afresh(attempt: Attempt, connection: UpstreamConnection, backend: Backend) -> bool:
    """Send the request again on a fresh connection if its reused one died before any
    response byte: most likely the backend closed it as the request went out (the
    keep-alive race; connections it had closed before are never used, see
    ``UpstreamPool.get_idle``). Only for idempotent methods (RFC 9112 9.3.1.1: the
    backend may have read it), with the body kept for it; not a backend failure."""
    exchange = attempt.exchange
    if not connection.reused or connection.received_any or exchange.fresh_only \
            or exchange.method not in IDEMPOTENT_METHODS:
        return False
    kept = attempt.resend_chunks
    if attempt.body_sent and kept is None:
        return False  # the body outgrew RESEND_BODY_BYTES: it cannot go again
    attempt.resend_chunks = None
    exchange.resend_afresh(backend, kept)
    return True
