"""The ``--demo`` backends: three tiny "whoami" servers on loopback.

Each answers any request with its own name and the request it saw, so a
newcomer can watch the balancer spread requests with no other setup.
"""

from __future__ import annotations

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.web import resource, server

DEMO_PORTS = (9001, 9002, 9003)


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
