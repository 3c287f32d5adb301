"""WebSocket through the proxy: the Upgrade is relayed, the 101 joins both sides (SPEC 4.1).

Both ends are autobahn's own WebSocket implementations, so every frame, mask and
close handshake is checked by a real peer on each side of the tunnel.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_twisted
from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.endpoints import TCP4ClientEndpoint

from tests.integration.harness import (
    LOOPBACK,
    equalizer_config,
    global_reactor,
    wait_until,
    within,
)

pytestmark = pytest.mark.usefixtures("no_logged_errors")


class EchoServerProtocol(WebSocketServerProtocol):
    """Sends every message back as it came (text stays text, binary stays binary)."""

    def __init__(self) -> None:
        super().__init__()
        self.closed: Deferred[tuple[bool, int | None]] = Deferred()
        self.request_headers: dict[str, str] = {}

    def onConnect(self, request) -> None:
        self.request_headers = dict(request.headers)
        self.factory.connections.append(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if payload == b"please close":
            self.sendClose(1000, "asked to")
        else:
            self.sendMessage(payload, isBinary)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.closed.called:
            self.closed.callback((wasClean, code))


class ClientProtocol(WebSocketClientProtocol):
    """Queues every message it receives; ``opened`` and ``closed`` fire on the handshakes."""

    def __init__(self) -> None:
        super().__init__()
        self.opened: Deferred[None] = Deferred()
        self.closed: Deferred[tuple[bool, int | None]] = Deferred()
        self.messages: DeferredQueue = DeferredQueue()

    def onOpen(self) -> None:
        self.opened.callback(None)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.messages.put((payload, isBinary))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.opened.called:
            self.opened.errback(AssertionError(f"handshake failed: {code} {reason}"))
        if not self.closed.called:
            self.closed.callback((wasClean, code))


@pytest_twisted.async_yield_fixture()
async def echo_backend() -> AsyncIterator[WebSocketServerFactory]:
    """An autobahn echo server on loopback; ``.url`` is its http:// address for the balancer."""
    factory = WebSocketServerFactory()
    factory.protocol = EchoServerProtocol
    factory.connections = []
    port = global_reactor.listenTCP(0, factory, interface=LOOPBACK)
    factory.url = f"http://{LOOPBACK}:{port.getHost().port}"
    yield factory
    await within(port.stopListening())
    for connection in factory.connections:
        if connection.transport is not None and connection.transport.connected:
            connection.transport.abortConnection()


async def connect_client(proxy_port: int) -> ClientProtocol:
    """A WebSocket client connected to ``/echo`` through the proxy, its handshake done."""
    factory = WebSocketClientFactory(f"ws://{LOOPBACK}:{proxy_port}/echo?room=1")
    factory.protocol = ClientProtocol
    endpoint = TCP4ClientEndpoint(global_reactor, LOOPBACK, proxy_port, timeout=5)
    client = await within(endpoint.connect(factory))
    await within(client.opened)
    return client


async def round_trip(client: ClientProtocol, payload: bytes, is_binary: bool) -> None:
    client.sendMessage(payload, isBinary=is_binary)
    assert await within(client.messages.get()) == (payload, is_binary)


@pytest_twisted.ensureDeferred
async def test_text_and_binary_messages_round_trip(echo_backend, equalizer):
    """Text and binary messages, small and large, come back through the proxy unchanged, and
    the backend saw the client's WebSocket handshake headers."""
    balancer = await equalizer(equalizer_config([echo_backend.url]))
    client = await connect_client(balancer.proxy_port)
    await round_trip(client, "héllo, wörld".encode(), False)
    await round_trip(client, bytes(range(256)), True)
    await round_trip(client, b"\x00" * 3 + bytes(range(256)) * 1024, True)  # 256 KiB
    await round_trip(client, ("x" * 70000).encode(), False)
    for n in range(20):
        client.sendMessage(b"%d" % n, isBinary=n % 2 == 1)
    for n in range(20):
        assert await within(client.messages.get()) == (b"%d" % n, n % 2 == 1)

    [server] = echo_backend.connections
    assert server.request_headers["upgrade"].lower() == "websocket"
    assert "sec-websocket-key" in server.request_headers
    assert server.http_request_uri == "/echo?room=1"
    client.sendClose(1000)
    await within(client.closed)


@pytest_twisted.ensureDeferred
async def test_client_close_handshake_closes_the_backend_side(echo_backend, equalizer):
    """A close sent by the client reaches the backend, both sides close cleanly with code 1000,
    and the proxy then holds nothing open for that exchange."""
    balancer = await equalizer(equalizer_config([echo_backend.url]))
    client = await connect_client(balancer.proxy_port)
    await round_trip(client, b"before close", False)
    [server] = echo_backend.connections
    assert balancer.service.proxy.active == 1

    client.sendClose(1000, "bye")
    assert await within(server.closed) == (True, 1000)
    assert await within(client.closed) == (True, 1000)
    await wait_until(lambda: balancer.service.proxy.active == 0, message="exchange to end")
    assert balancer.backend(echo_backend.url).in_flight == 0


@pytest_twisted.ensureDeferred
async def test_client_dropping_its_connection_closes_the_backend_side(echo_backend, equalizer):
    """A client whose TCP connection drops without a close frame has its backend connection
    closed too, not left open."""
    balancer = await equalizer(equalizer_config([echo_backend.url]))
    client = await connect_client(balancer.proxy_port)
    await round_trip(client, b"still there?", True)
    [server] = echo_backend.connections

    client.transport.abortConnection()
    clean, _ = await within(server.closed)
    assert clean is False
    await wait_until(lambda: balancer.service.proxy.active == 0, message="exchange to end")
    assert balancer.backend(echo_backend.url).in_flight == 0


@pytest_twisted.ensureDeferred
async def test_backend_close_handshake_reaches_the_client(echo_backend, equalizer):
    """A close started by the backend reaches the client, and both sides close cleanly."""
    balancer = await equalizer(equalizer_config([echo_backend.url]))
    client = await connect_client(balancer.proxy_port)
    [server] = echo_backend.connections
    client.sendMessage(b"please close")
    assert await within(client.closed) == (True, 1000)
    assert await within(server.closed) == (True, 1000)
    await wait_until(lambda: balancer.service.proxy.active == 0, message="exchange to end")


@pytest_twisted.ensureDeferred
async def test_the_101_carries_the_request_id_and_rate_limit_fields(echo_backend, equalizer):
    """The 101 that opens a tunnel went through the proxy and its limiter like any response,
    so it carries X-Request-ID and the RateLimit fields."""
    balancer = await equalizer(equalizer_config([echo_backend.url], rate_limit={
        "enabled": True, "default": {"capacity": 10, "refill_rate": 0}}))
    client = await connect_client(balancer.proxy_port)
    headers = client.http_headers
    assert len(headers["x-request-id"]) == 32
    assert headers["ratelimit"] == '"default";r=9;t=3600'
    assert headers["ratelimit-remaining"] == "9"
    client.sendClose(1000)
    await within(client.closed)
