"""A request that found every candidate backend at its ``max_requests`` waits in the
pool's queue (``balancer.queue.WaitQueue``) for a slot, or is refused: 503
``overloaded`` with ``Retry-After`` when the queue is full (or off) or the wait is over.

While it waits its body stays unread (the client is paused, as for any request
whose backend is not connected yet). A client that leaves is taken out of the
queue at once (``Exchange.client_lost``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from twisted.python.failure import Failure

    from equalizer.balancer.pool import Backend
    from equalizer.proxy.exchange import Exchange

RETRY_AFTER = ((b"Retry-After", b"1"),)


def wait_for_slot(exchange: Exchange) -> None:
    """Queue ``exchange`` for a slot, or refuse it when the queue is full."""
    queue = exchange.unit.pool.queue
    ticket = queue.join(lambda: _take_slot(exchange), lambda: _expired(exchange))
    if ticket is None:
        overloaded(exchange, "every backend is at its max_requests and the queue is full")
    else:
        exchange.ticket = ticket


def _take_slot(exchange: Exchange) -> Callable[[], None] | None:
    backend = exchange.choose()
    if backend is None:
        return None

    def go() -> None:
        exchange.ticket = None  # the ticket and the exchange no longer hold each other
        exchange.send_to(backend)

    return go


def _expired(exchange: Exchange) -> None:
    overloaded(exchange, "no backend had a free slot within the queue timeout")


def overloaded(exchange: Exchange, message: str) -> None:
    exchange.ticket = None
    exchange.respond_locally(503, "overloaded", message, RETRY_AFTER)


def out_of_resources(exchange: Exchange, backend: Backend, reason: Failure) -> None:
    """The proxy could not even create a socket (EMFILE and the like): its own shortage,
    not the backend's failure, and no other backend would fare better. 503 with
    Retry-After, no attempt recorded, and a warning at most every few seconds."""
    exchange.tried.remove(backend)
    exchange.proxy.resource_warning.report(reason.getErrorMessage())
    exchange.respond_locally(503, "proxy_overloaded",
                             "the proxy is out of connections (file descriptors); retry shortly",
                             RETRY_AFTER)
