"""Back-pressure between the two sides of a proxied request: a full socket on one side
pauses reading on the other, so neither side's bytes pile up in the proxy."""

from __future__ import annotations

CLIENT_BUFFER_BYTES = 256 * 1024
"""Bytes a client socket may have queued before the backend is paused (Twisted's
default, 64 KiB, pauses and resumes the backend several times for every 100 KiB
response; each costs epoll calls). Bounds memory per client connection."""


class UploadThrottle:
    """Pauses reading from the client while the backend socket is full.

    Registered as the producer of the backend transport during an upload (and both
    ways in a tunnel). It never stops the client connection: a lost backend must not
    drop the client before it has its 502.
    """

    __slots__ = ("client_transport", "paused")

    def __init__(self, client_transport) -> None:
        self.client_transport = client_transport
        self.paused = False

    def pauseProducing(self) -> None:
        self.paused = True
        self.client_transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        self.client_transport.resumeProducing()

    def stopProducing(self) -> None:
        pass
