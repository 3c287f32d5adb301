"""The ``--demo`` backends: three tiny "whoami" servers on loopback, and a fourth in a
pool of its own that a route sends ``/api/`` to (SPEC 8).

Each answers any request with its own name and the request it saw, so a
newcomer can watch the balancer spread requests, and route them, with no other setup.
"""

from __future__ import annotations

import attrs
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.web import resource, server

from equalizer.config.model import (
    BackendConfig,
    BalancerConfig,
    Config,
    HeaderRewrite,
    MatchConfig,
    PoolConfig,
    RouteConfig,
)

DEMO_PORTS = (9001, 9002, 9003)
DEMO_API_PORT = 9004
"""The whoami of the demo's ``api`` pool."""


class QuietSite(server.Site):
    """A demo backend logs nothing: the balancer's own access log tells the story."""

    noisy = False

    def log(self, request: server.Request) -> None:
        pass


class WhoAmI(resource.Resource):
    """Answers with its name, the request line and the headers it received."""

    isLeaf = True

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def render(self, request: server.Request) -> bytes:
        lines = [
            f"Name: {self.name}",
            f"{request.method.decode()} {request.uri.decode('latin-1')} "
            f"{request.clientproto.decode()}",
        ]
        for name, values in request.requestHeaders.getAllRawHeaders():
            lines.extend(f"{name.decode('latin-1')}: {v.decode('latin-1')}" for v in values)
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        request.setHeader(b"X-Backend", self.name.encode())
        return ("\n".join(lines) + "\n").encode("utf-8")


def demo_urls() -> tuple[str, ...]:
    return tuple(f"http://127.0.0.1:{port}" for port in DEMO_PORTS)


def demo_service(reactor) -> MultiService:
    """The three whoami servers, each on 127.0.0.1."""
    parent = MultiService()
    for number, port in enumerate(DEMO_PORTS, start=1):
        site = QuietSite(WhoAmI(f"demo-{number}"))
        endpoint = TCP4ServerEndpoint(reactor, port, interface="127.0.0.1")
        StreamServerEndpointService(endpoint, site).setServiceParent(parent)
    return parent


def demo_api_service(reactor) -> StreamServerEndpointService:
    """The whoami of the ``api`` pool, on 127.0.0.1."""
    endpoint = TCP4ServerEndpoint(reactor, DEMO_API_PORT, interface="127.0.0.1")
    return StreamServerEndpointService(endpoint, QuietSite(WhoAmI("demo-api")))


def demo_routing(config: Config) -> Config:
    """``config`` with the demo's second pool and its route, unless it has pools or routes
    of its own: ``/api/...`` goes to the ``api`` pool as ``/...``, answered with
    ``X-Route: api``; everything else to the three default whoami servers."""
    if config.pools or config.routes:
        return config
    api = PoolConfig("api", BalancerConfig(
        backends=(BackendConfig(f"http://127.0.0.1:{DEMO_API_PORT}"),)), config.health)
    route = RouteConfig(match=MatchConfig(path_prefix="/api/"), pool="api", strip_prefix=True,
                        response_headers=HeaderRewrite(set=(("X-Route", "api"),)))
    return attrs.evolve(config, pools=(api,), routes=(route,))
