"""The real health check: one HTTP GET of a backend over treq, on a pool of its own.

`IHealthChecker` is the seam between the monitor (health.py) and the network, so the
monitor's logic is tested with a clock and a fake checker.
"""

from __future__ import annotations

from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IAddress,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    ResponseDone,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IAgentEndpointFactory, IResponse
from zope.interface import Interface, implementer

from equalizer.balancer.pool import Backend

USER_AGENT = b"equalizer-health-check"


class IHealthChecker(Interface):
    """One health check of one backend; the seam between the monitor and the network."""

    def check(backend: Backend, path: str, timeout: float) -> Deferred[int]:
        """
        Ask ``backend`` for ``path`` (under its URL's path prefix).

        Returns:
            A Deferred that fires with the HTTP status code, or fails on a
            connection error or after ``timeout`` seconds. Cancelling it
            abandons the check.
        """

    def close() -> Deferred[None]:
        """Release what the checker holds (cached connections); it stays usable."""


def health_url(backend: Backend, path: str) -> str:
    """The URL a check asks for: the backend's scheme, host, port and path prefix, then ``path``."""
    scheme = "https" if backend.url.lower().startswith("https:") else "http"
    host = f"[{backend.host}]" if ":" in backend.host else backend.host
    if not path.startswith("/"):
        path = "/" + path
    return f"{scheme}://{host}:{backend.port}{backend.prefix.decode('ascii')}{path}"


class _Discard(Protocol):
    """Reads a response body to its end and throws it away.

    Cancelling ``finished`` drops the connection, so a backend that trickles its
    body cannot hold a timed-out check's connection open.
    """

    def __init__(self) -> None:
        self.finished: Deferred[None] = Deferred(self._cancel)

    def _cancel(self, _: Deferred[None]) -> None:
        if self.transport is not None:
            self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.finished.called:
            return  # cancelled: the timeout already failed the check
        if reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(None)
        else:
            self.finished.errback(reason)


class _QuietFactory(Factory):
    """Hands the pool's connection factory its protocol without the "Starting factory" and
    "Stopping factory" lines Twisted logs for every connection (one per check)."""

    noisy = False

    def __init__(self, factory: IProtocolFactory) -> None:
        self._factory = factory

    def buildProtocol(self, addr: IAddress) -> IProtocol | None:
        return self._factory.buildProtocol(addr)


@implementer(IStreamClientEndpoint)
class _QuietEndpoint:
    """An endpoint that connects through a `_QuietFactory`."""

    def __init__(self, endpoint: IStreamClientEndpoint) -> None:
        self._endpoint = endpoint

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        return self._endpoint.connect(_QuietFactory(factory))


@implementer(IAgentEndpointFactory)
class _QuietEndpoints:
    """The endpoints Agent would use (TCP, TLS for https), made quiet.

    The connection pool builds its protocol factory itself and has no public switch
    for its ``noisy`` flag; the endpoint is the public place that factory passes through.
    """

    def __init__(self, reactor: IReactorTime) -> None:
        self._reactor = reactor
        self._tls = BrowserLikePolicyForHTTPS()

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        endpoint = HostnameEndpoint(self._reactor, uri.host.decode("ascii"), uri.port)
        if uri.scheme == b"https":
            endpoint = wrapClientTLS(self._tls.creatorForNetloc(uri.host, uri.port), endpoint)
        return _QuietEndpoint(endpoint)


@implementer(IHealthChecker)
class HTTPHealthChecker:
    """Health checks over HTTP with treq, on a persistent pool of its own.

    The pool is separate from the proxy's, so checks neither count as proxied
    requests nor wait behind them, and one kept-alive connection per backend is
    reused from check to check. Redirects are not followed: a 3xx is a status
    like any other, judged against ``expected_status``.
    """

    def __init__(self, reactor: IReactorTime) -> None:
        """``reactor`` must also provide IReactorTCP (the Agent connects with it)."""
        self._reactor = reactor
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = 1
        agent = Agent.usingEndpointFactory(reactor, _QuietEndpoints(reactor), pool=self._pool)
        self._client = HTTPClient(agent)

    def check(self, backend: Backend, path: str, timeout: float) -> Deferred[int]:
        d = Deferred.fromCoroutine(self._status(health_url(backend, path)))
        if timeout > 0:
            d.addTimeout(timeout, self._reactor)
        return d

    async def _status(self, url: str) -> int:
        response: IResponse = await self._client.get(
            url,
            headers={b"User-Agent": [USER_AGENT]},
            allow_redirects=False,
            unbuffered=True,
        )
        body = _Discard()
        response.deliverBody(body)
        await body.finished
        return response.code

    def close(self) -> Deferred[None]:
        return self._pool.closeCachedConnections()
