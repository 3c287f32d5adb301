"""The proxy over loopback: balancing, keep-alive reuse, and what the admin API reports.

Header rules are in test_proxy_headers.py, body streaming in test_proxy_streaming.py,
failures in test_proxy_failures.py and the 1 GiB memory checks in test_proxy_memory.py.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import pytest_twisted
import treq
from twisted.web import server

from tests.integration.harness import (
    equalizer_config,
    get_json,
    http_client,
    raw_connect,
    wait_until,
    within,
)

pytestmark = pytest.mark.usefixtures("no_logged_errors")


async def get_body(client, url: str) -> tuple[int, bytes]:
    response = await within(client.get(url))
    return response.code, await within(treq.content(response))


@pytest_twisted.ensureDeferred
async def test_round_robin_exact_and_stats_count_proxied_requests_only(http, backends, equalizer):
    """Thirty sequential requests over three backends reach each exactly ten times, and /stats
    counts those ten per backend while health checks run alongside uncounted."""
    servers = [backends(f"b{i}") for i in range(3)]
    balancer = await equalizer(equalizer_config(
        [s.url for s in servers], health={"interval": "100ms", "timeout": "1s"},
    ))
    await wait_until(lambda: all(s.health_checks >= 2 for s in servers),
                     message="health checks of every backend")
    for _ in range(30):
        status, _ = await get_body(http, balancer.proxy_url + "/")
        assert status == 200
    assert [len(s.requests) for s in servers] == [10, 10, 10]

    status, stats = await get_json(http, balancer.admin_url + "/stats")
    assert status == 200
    assert [b["url"] for b in stats["backends"]] == [s.url for s in servers]
    assert [b["requests"] for b in stats["backends"]] == [10, 10, 10]
    assert all(s.health_checks >= 2 for s in servers)
    assert stats["requests"]["total"] == 30
    assert stats["requests"]["by_status"]["2xx"] == 30
    assert stats["requests"]["errors"] == 0
    for backend in stats["backends"]:
        assert backend["healthy"] is True and backend["in_flight"] == 0
        assert backend["failures"] == 0
        assert backend["latency_ms"]["p50"] is not None
        assert backend["last_check"]["ok"] is True


@pytest_twisted.ensureDeferred
async def test_backend_connections_kept_alive_and_reused(backends, equalizer):
    """A hundred sequential requests, each on a new client connection, reach the backend over
    one reused connection."""
    backend = backends("b1")
    balancer = await equalizer(equalizer_config([backend.url]))
    client, pool = http_client(persistent=False)
    try:
        for _ in range(100):
            status, body = await get_body(client, balancer.proxy_url + "/")
            assert (status, body) == (200, b"b1")
    finally:
        await within(pool.closeCachedConnections())
    assert len(backend.requests) == 100
    assert backend.connections_made == 1
    assert balancer.service.upstreams.connections_made == 1


@pytest_twisted.ensureDeferred
async def test_connection_reused_after_response_back_pressure(http, backends, equalizer):
    """Large request and response bodies, which make both sides push back, still leave the
    backend connection reusable: ten 300 kB round trips all complete over one connection."""

    def echo(backend, request: server.Request) -> bytes:
        return backend.requests[-1].body

    backend = backends("b1", echo)
    balancer = await equalizer(equalizer_config([backend.url]))
    body = bytes(range(256)) * 1200
    for _ in range(10):
        response = await within(http.post(balancer.proxy_url + "/echo", data=body))
        assert await within(treq.content(response)) == body
    assert backend.connections_made == 1


@pytest_twisted.ensureDeferred
async def test_backend_closing_connections_gets_new_ones(http, backends, equalizer):
    """A backend that answers with Connection: close gets a fresh connection per request and
    every request still succeeds."""

    def close_each(backend, request: server.Request) -> bytes:
        request.setHeader(b"Connection", b"close")
        return b"once"

    backend = backends("b1", close_each)
    balancer = await equalizer(equalizer_config([backend.url]))
    for _ in range(10):
        assert await get_body(http, balancer.proxy_url + "/") == (200, b"once")
    assert backend.connections_made == 10


@pytest_twisted.ensureDeferred
async def test_idle_backend_connection_closed_by_backend_is_replaced(http, backends, equalizer):
    """When a backend drops its idle kept-alive connections the next request opens a new one
    and succeeds."""
    backend = backends("b1")
    balancer = await equalizer(equalizer_config([backend.url]))
    assert await get_body(http, balancer.proxy_url + "/") == (200, b"b1")
    backend.drop_connections()
    await wait_until(lambda: balancer.service.upstreams.idle_count(balancer.backend(backend.url))
                     == 0, message="the proxy to notice the dropped connection")
    assert await get_body(http, balancer.proxy_url + "/") == (200, b"b1")
    assert backend.connections_made == 2


@pytest_twisted.ensureDeferred
async def test_pipelined_requests_answered_in_order(backends, equalizer):
    """Requests pipelined on one client connection (a POST with a body among them) are each
    forwarded once and answered in order."""

    def path_and_body(backend, request: server.Request) -> bytes:
        return request.path + b"=" + backend.requests[-1].body

    backend = backends("b1", path_and_body)
    balancer = await equalizer(equalizer_config([backend.url]))
    client = await raw_connect(balancer.proxy_port)
    client.send(b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\n"
                b"POST /2 HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello"
                b"GET /3 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    raw = await client.wait_closed()
    bodies = [part.split(b"\r\n\r\n", 1)[1] for part in raw.split(b"HTTP/1.1 ")[1:]]
    assert raw.count(b"HTTP/1.1 200 ") == 3
    assert bodies == [b"/1=", b"/2=hello", b"/3="]
    assert [r.uri for r in backend.requests] == [b"/1", b"/2", b"/3"]


@pytest_twisted.ensureDeferred
async def test_admin_health_and_stats_follow_traffic(http, backends, equalizer):
    """/health reports every backend healthy and /stats counts responses by status class."""

    def by_path(backend, request: server.Request) -> bytes:
        if request.path == b"/missing":
            request.setResponseCode(404)
        elif request.path == b"/broken":
            request.setResponseCode(500)
        return b"answer"

    first, second = backends("first", by_path), backends("second", by_path)
    balancer = await equalizer(equalizer_config([first.url, second.url]))
    status, health = await get_json(http, balancer.admin_url + "/health")
    assert status == 200
    assert health["status"] == "ok"
    assert health["backends"] == {"healthy": 2, "total": 2}

    for path, code in [("/", 200), ("/missing", 404), ("/broken", 500), ("/", 200)]:
        assert (await get_body(http, balancer.proxy_url + path))[0] == code
    status, stats = await get_json(http, balancer.admin_url + "/stats")
    assert stats["requests"]["total"] == 4
    assert stats["requests"]["by_status"] == {"1xx": 0, "2xx": 2, "3xx": 0, "4xx": 1, "5xx": 1}
    assert stats["requests"]["errors"] == 0
    assert [b["requests"] for b in stats["backends"]] == [2, 2]
    assert stats["uptime_seconds"] >= 0


@pytest_twisted.ensureDeferred
async def test_finished_requests_are_freed_without_the_cyclic_collector(http, backends,
                                                                        equalizer):
    """A request and its exchange hold no reference cycle once answered: reference counting
    frees them, so the proxy leaves the cyclic collector nothing to sweep per request."""
    backend = backends("b")
    balancer = await equalizer(equalizer_config([backend.url]))
    proxy = balancer.service.proxy
    requests = []
    exchange_done = proxy.exchange_done

    def watch(exchange, *args):
        requests.append(weakref.ref(exchange.request))
        exchange_done(exchange, *args)

    proxy.exchange_done = watch
    gc.collect()
    gc.disable()
    try:
        for path in ("/", "/a/b?x=1", "/c"):
            await get_body(http, balancer.proxy_url + path)
        await wait_until(lambda: len(requests) == 3, message="three exchanges done")
        await wait_until(lambda: all(ref() is None for ref in requests),
                         message="answered requests freed by reference counting")
    finally:
        gc.enable()
