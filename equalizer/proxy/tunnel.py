"""An upgraded connection (a 101, WebSocket): after the backend's switch, the client's
and the backend's connections are joined and bytes flow both ways until one closes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from equalizer.proxy.backpressure import UploadThrottle

if TYPE_CHECKING:
    from twisted.python.failure import Failure

    from equalizer.proxy.attempt import Attempt


class Tunnel:
    """The backend connection's handler once it has switched protocols.

    The 101 head goes to the client as the backend sent it (Connection and Upgrade
    included: they are the point of it), plus the request id and the admission's
    fields like every other response. The client channel's own parsing stops; what
    it had buffered after the request goes on first.
    """

    __slots__ = ("attempt", "connection", "send")

    def __init__(self, attempt: Attempt, reason: bytes,
                 headers: list[tuple[bytes, bytes]]) -> None:
        self.attempt = attempt
        exchange = attempt.exchange
        request = exchange.request
        client = request.transport
        self.connection = request.connection
        self.send = request.send  # as every write to the client: in order with the rest
        lines = [b"HTTP/1.1 101 %s\r\n" % reason]
        lines.extend(b"%s: %s\r\n" % (name, value) for name, value in headers)
        if not any(name.lower() == b"x-request-id" for name, _ in headers):
            lines.append(b"X-Request-ID: %s\r\n" % exchange.request_id)
        lines.append(exchange.limit_lines)
        lines.append(b"\r\n")
        self.send(b"".join(lines))
        request.head_sent = True
        backend = attempt.connection
        backend_side = backend.transport
        buffered = request.connection.hand_over(backend.write)
        if buffered:
            backend.write(buffered)
        client.registerProducer(backend_side, True)
        backend_side.registerProducer(UploadThrottle(client), True)
        client.resumeProducing()

    def response_body(self, data: bytes) -> None:
        attempt = self.attempt
        attempt.progress += 1
        attempt.exchange.bytes_sent += len(data)
        self.send(data)

    def response_done(self) -> None:
        """The backend closed its side: the tunnel is over, the client's side closes too."""
        self.attempt.connection = None
        self.attempt.exchange.finish()
        self.connection.close()

    def response_failed(self, reason: Failure, response_started: bool) -> None:
        self.attempt.response_failed(reason, response_started)
