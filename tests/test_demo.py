"""The ``--demo`` backends: each answers with its name and the request it saw."""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock

from equalizer.config.model import Config
from equalizer.demo import (
    DEMO_API_PORT,
    DEMO_PORTS,
    demo_api_service,
    demo_routing,
    demo_service,
    demo_urls,
)
from equalizer.testing import send


def test_three_whoami_servers_listen_on_loopback() -> None:
    reactor = MemoryReactorClock()
    parent = demo_service(reactor)
    parent.startService()
    assert [(port, interface) for port, _, _, interface in reactor.tcpServers] == [
        (port, "127.0.0.1") for port in DEMO_PORTS]
    assert demo_urls() == tuple(f"http://127.0.0.1:{port}" for port in DEMO_PORTS)


def test_whoami_answers_with_its_name_and_the_request_it_saw() -> None:
    reactor = MemoryReactorClock()
    demo_service(reactor).startService()
    site = reactor.tcpServers[1][1]
    response = send(site, "GET", "/hello?x=1", headers=[("X-Test", "yes")], host="demo")
    assert response.headers[b"x-backend"] == b"demo-2"
    lines = response.body.decode().splitlines()
    assert lines[:2] == ["Name: demo-2", "GET /hello?x=1 HTTP/1.1"]
    assert "X-Test: yes" in lines


def test_the_demo_routes_api_to_a_pool_of_its_own() -> None:
    """--demo adds a second pool (one whoami on 9004) and a route /api/ to it, stripped,
    unless the configuration has pools or routes of its own."""
    config = demo_routing(Config())
    (pool,), (route,) = config.pools, config.routes
    assert (pool.name, [b.url for b in pool.balancer.backends]) == (
        "api", [f"http://127.0.0.1:{DEMO_API_PORT}"])
    assert (route.match.path_prefix, route.pool, route.strip_prefix) == ("/api/", "api", True)
    assert demo_routing(config) == config
    reactor = MemoryReactorClock()
    demo_api_service(reactor).startService()
    assert [(port, interface) for port, _, _, interface in reactor.tcpServers] == [
        (DEMO_API_PORT, "127.0.0.1")]
