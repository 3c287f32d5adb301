"""The real HTTP health checker against a real loopback server: one kept-alive
connection, status codes, a slow check timing out, a refused connection."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet.defer import TimeoutError
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from equalizer.balancer.checker import HTTPHealthChecker
from equalizer.balancer.pool import Backend


class _Status(Resource):
    isLeaf = True

    def __init__(self, code: int, peers: list[int]) -> None:
        super().__init__()
        self._code = code
        self._peers = peers

    def render_GET(self, request: Request) -> bytes:
        self._peers.append(request.getClientAddress().port)
        request.setResponseCode(self._code)
        return b"x" * 1000


class _Trickle(Resource):
    isLeaf = True

    def __init__(self, lost: list[Failure]) -> None:
        super().__init__()
        self._lost = lost

    def render_GET(self, request: Request) -> object:
        request.write(b"the start of a body that never ends")
        request.notifyFinish().addErrback(self._lost.append)
        return NOT_DONE_YET


@pytest_twisted.ensureDeferred
async def test_http_checker_against_a_real_server() -> None:
    """The real checker reads 200/500 over one kept-alive connection; slow or closed ones fail."""
    from twisted.internet import reactor

    peers: list[int] = []
    root = Resource()
    api = Resource()
    root.putChild(b"api", api)
    api.putChild(b"ok", _Status(200, peers))
    api.putChild(b"fail", _Status(500, peers))
    lost: list[Failure] = []
    api.putChild(b"slow", _Trickle(lost))
    port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
    closed = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
    closed_port = closed.getHost().port
    await closed.stopListening()
    checker = HTTPHealthChecker(reactor)
    try:
        backend = Backend.from_url("b1", f"http://127.0.0.1:{port.getHost().port}/api")
        assert await checker.check(backend, "/ok", 5.0) == 200
        assert await checker.check(backend, "/fail", 5.0) == 500
        assert len(peers) == 2 and peers[0] == peers[1]
        with pytest.raises(TimeoutError):
            await checker.check(backend, "/slow", 0.2)
        for _ in range(100):
            if lost:
                break
            await deferLater(reactor, 0.02)
        assert len(lost) == 1, "the timed-out check left its connection open"
        dead = Backend.from_url("b2", f"http://127.0.0.1:{closed_port}/")
        with pytest.raises(ConnectionRefusedError):
            await checker.check(dead, "/", 5.0)
    finally:
        await checker.close()
        await port.stopListening()
