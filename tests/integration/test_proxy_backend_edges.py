"""The backend side of the wire, byte for byte (issue 13, section 3): 1xx responses, transfer
codings, bodiless statuses, backends that close kept-alive connections, the proxy running
out of file descriptors; and access lines that name where a request went (section 4).

Backends here are `ScriptedBackend`s: each writes exactly the bytes its test gives.
"""

from __future__ import annotations

import gzip
import json
import os
import resource
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.testing import StringTransport
from twisted.web import server

from equalizer.balancer.pool import Backend
from equalizer.proxy.upstream import UpstreamConnection
from equalizer.testing import FakeUpstreams
from tests.integration.harness import (
    ScriptedBackend,
    ScriptedConnection,
    equalizer_config,
    free_port,
    get_json,
    parse_response,
    raw_connect,
    raw_request,
    wait_until,
    within,
)

pytestmark = pytest.mark.usefixtures("no_logged_errors")

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@pytest_twisted.async_yield_fixture()
async def scripted() -> AsyncIterator[Callable[..., ScriptedBackend]]:
    """A factory of started scripted backends, all closed afterwards."""
    started: list[ScriptedBackend] = []

    def make(script) -> ScriptedBackend:
        backend = ScriptedBackend(script).start()
        started.append(backend)
        return backend

    yield make
    for backend in started:
        await backend.close()


def always(data: bytes):
    """A script answering every request with ``data``."""

    def answer(connection: ScriptedConnection, request: bytes) -> None:
        connection.write(data)

    return answer


def one_response(raw: bytes) -> list[bytes]:
    """The status lines in what a client received."""
    return [line for line in raw.split(b"\r\n") if line.startswith(b"HTTP/1.")]


# -- 1xx -------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_early_hints_reach_http_1_1_clients_only(scripted, equalizer):
    """A backend's 103 Early Hints reaches an HTTP/1.1 client ahead of the 200, with its Link
    field; an HTTP/1.0 client gets only the 200."""
    backend = scripted(always(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
                              + OK))
    balancer = await equalizer(equalizer_config([backend.url]))
    raw = await raw_request(balancer.proxy_port,
                            b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    assert one_response(raw) == [b"HTTP/1.1 103 Early Hints", b"HTTP/1.1 200 OK"]
    early, final = raw.split(b"\r\n\r\n", 1)
    assert b"\r\nLink: </s.css>; rel=preload" in early
    assert parse_response(final).body == b"ok"
    raw = await raw_request(balancer.proxy_port, b"GET / HTTP/1.0\r\n\r\n")
    assert one_response(raw) == [b"HTTP/1.0 200 OK"]


@pytest_twisted.ensureDeferred
async def test_one_100_continue_for_a_client_that_expects_it(scripted, equalizer):
    """A client sending ``Expect: 100-continue`` gets one 100 Continue (twisted.web's, before
    its body), not a second one when the backend sends its own, then the final answer."""
    backend = scripted(always(b"HTTP/1.1 100 Continue\r\n\r\n" + OK))
    balancer = await equalizer(equalizer_config([backend.url]))
    client = await raw_connect(balancer.proxy_port)
    try:
        client.send(b"PUT /x HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\n"
                    b"Content-Length: 4\r\n\r\n")
        await client.received_until(lambda data: b"100 Continue\r\n\r\n" in data)
        client.send(b"body")
        await client.received_until(lambda data: data.endswith(b"ok"))
    finally:
        client.transport.abortConnection()
    received = bytes(client.received)
    assert received.count(b"100 Continue") == 1 and received.count(b"HTTP/1.1 200 OK") == 1
    assert backend.requests[0].endswith(b"\r\n\r\nbody")


@pytest_twisted.ensureDeferred
async def test_endless_1xx_is_a_502(scripted, equalizer):
    """A backend that sends 1xx after 1xx and never a final answer gets the client a 502
    after a bounded number of them."""
    backend = scripted(always(b"HTTP/1.1 102 Processing\r\n\r\n" * 1000))
    balancer = await equalizer(equalizer_config([backend.url], proxy={"retries": 0}))
    raw = await raw_request(balancer.proxy_port,
                            b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    statuses = one_response(raw)
    assert statuses[-1].startswith(b"HTTP/1.1 502") and len(statuses) <= 33


# -- transfer codings, bodiless statuses ------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_gzip_chunked_arrives_intact(scripted, equalizer, http):
    """``Transfer-Encoding: gzip, chunked`` reaches an HTTP/1.1 client with the gzip coding
    named, and the body inflates to what the backend compressed; an HTTP/1.0 client gets a
    502 rather than gzip bytes passed off as the content."""
    text = b"hello, world\n" * 200
    packed = gzip.compress(text)
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(packed[i:i + 500]), packed[i:i + 500])
                      for i in range(0, len(packed), 500))
    backend = scripted(always(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
                              + chunks + b"0\r\n\r\n"))
    balancer = await equalizer(equalizer_config([backend.url]))
    raw = await raw_request(balancer.proxy_port,
                            b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    response = parse_response(raw)
    assert response.header(b"transfer-encoding") == [b"gzip, chunked"]
    assert gzip.decompress(response.body) == text
    raw = await raw_request(balancer.proxy_port, b"GET / HTTP/1.0\r\n\r\n")
    response = parse_response(raw)
    assert response.status == 502 and b"HTTP/1.0" in response.body
    _, stats = await get_json(http, balancer.admin_url + "/stats")
    assert stats["backends"][0]["healthy"] and stats["backends"][0]["failures"] == 0


@pytest_twisted.ensureDeferred
async def test_204_loses_content_length_and_the_connection_stays_in_step(scripted, equalizer):
    """A 204 sent with ``Content-Length: 5`` reaches the client without the field, and the next
    request on the same client connection is answered as usual."""
    answers = iter([b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n", OK])
    backend = scripted(lambda connection, request: connection.write(next(answers)))
    balancer = await equalizer(equalizer_config([backend.url]))
    client = await raw_connect(balancer.proxy_port)
    try:
        client.send(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n")
        await client.received_until(lambda data: data.endswith(b"\r\n\r\n"))
        first = bytes(client.received)
        assert first.startswith(b"HTTP/1.1 204 ") and b"content-length" not in first.lower()
        client.send(b"GET /b HTTP/1.1\r\nHost: h\r\n\r\n")
        await client.received_until(lambda data: data.endswith(b"ok"))
        assert parse_response(bytes(client.received)[len(first):]).body == b"ok"
    finally:
        client.transport.abortConnection()


# -- kept-alive connections the backend closes ---------------------------------------------------


def answer_then_close(connection: ScriptedConnection, request: bytes) -> None:
    """Answer without ``Connection: close``, then close anyway."""
    connection.write(OK)
    connection.close()


@pytest_twisted.ensureDeferred
async def test_posts_to_a_backend_that_closes_after_each_answer_all_succeed(scripted, equalizer):
    """A backend that answers and closes without saying so gets every POST exactly once, each
    answered 200, pipelined or one by one: the proxy never sends one on the connection the
    backend had closed (pipelined, the next request goes out before the reactor has read
    the close)."""
    backend = scripted(answer_then_close)
    balancer = await equalizer(equalizer_config([backend.url], proxy={"retries": 0}))
    client = await raw_connect(balancer.proxy_port)
    try:
        client.send(b"".join(b"POST /p%d HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc"
                             % n for n in range(10)))
        await client.received_until(lambda data: data.count(b"HTTP/1.1 ") == 10)
        for n in range(10, 20):
            client.send(b"POST /p%d HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc" % n)
            await client.received_until(lambda data, n=n: data.count(b"HTTP/1.1 ") == n + 1)
    finally:
        client.transport.abortConnection()
    received = bytes(client.received)
    assert received.count(b"HTTP/1.1 200 OK\r\n") == 20 and b"bad_gateway" not in received
    assert [request.split(b" ")[1] for request in backend.requests] == \
        [b"/p%d" % n for n in range(20)]
    assert balancer.backend(backend.url).failures == 0


def test_peer_closed_sees_a_real_fin():
    """On a real socket pair, the pool's poll sees the other side's close before any read."""
    ours, theirs = socket.socketpair()
    try:
        ours.setblocking(False)
        connection = UpstreamConnection(FakeUpstreams(), Backend.from_url("b1", "http://h:1"))
        connection.makeConnection(SocketTransport(ours))
        assert connection.peer_closed() is False
        theirs.close()
        assert connection.peer_closed() is True
    finally:
        ours.close()


class SocketTransport(StringTransport):
    """A StringTransport that hands out a real socket as its handle."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self.sock = sock

    def getHandle(self) -> socket.socket:
        return self.sock


def close_on_reuse(connection: ScriptedConnection, request: bytes) -> None:
    """Answer the first request of a connection; close later ones unanswered, as a backend
    does whose keep-alive timeout strikes just as the request arrives."""
    if connection.requests == 0:
        connection.write(OK)
    else:
        connection.transport.abortConnection()


@pytest_twisted.ensureDeferred
async def test_reused_connection_dying_unanswered(scripted, equalizer):
    """When a reused connection dies before any response byte, a PUT goes again on a fresh
    connection with its body and succeeds (not a backend failure); a POST is not sent twice
    and gets 502."""
    backend = scripted(close_on_reuse)
    balancer = await equalizer(equalizer_config([backend.url], proxy={"retries": 0}))
    client = await raw_connect(balancer.proxy_port)
    try:
        for method, expected in [(b"GET", 200), (b"PUT", 200), (b"POST", 502)]:
            client.received.clear()
            client.send(b"%s /x HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n\r\nbody" % method)
            await client.received_until(lambda data: data.endswith(b"ok") or data.endswith(b"}"))
            assert parse_response(bytes(client.received)).status == expected, method
    finally:
        client.transport.abortConnection()
    methods = [request.split(b" ")[0] for request in backend.requests]
    assert methods == [b"GET", b"PUT", b"PUT", b"POST"]
    assert backend.requests[2].endswith(b"\r\n\r\nbody")
    assert balancer.backend(backend.url).failures == 1  # the POST's only


# -- the proxy out of file descriptors ----------------------------------------------------


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest_twisted.ensureDeferred
async def test_running_out_of_file_descriptors_does_not_take_backends_out(
        backends, twistd_process, http):
    """A twistd child whose descriptors run out under a connection flood answers 503
    proxy_overloaded for what it cannot connect, logs it once, and keeps its backend healthy:
    once the flood is over requests succeed at once."""
    held: list[server.Request] = []

    def hold(backend, request: server.Request) -> bytes | int:
        if request.path != b"/flood":
            return b"fine"
        held.append(request)
        return server.NOT_DONE_YET

    backend = backends("b1", hold)
    document = equalizer_config(
        [backend.url], proxy={"retries": 1},
        health={"interval": "200ms", "unhealthy_threshold": 2, "healthy_threshold": 50,
                "path": "/_health"})
    process = await twistd_process(document, http)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = open_fds(process.pid) + 24
    resource.prlimit(process.pid, resource.RLIMIT_NOFILE, (limit, hard))
    clients = []
    try:
        # A few requests that reach the backend and stay there, holding descriptors...
        for _ in range(3):
            clients.append(await raw_connect(process.proxy_port))
            clients[-1].send(b"GET /flood HTTP/1.1\r\nHost: h\r\n\r\n")
        await wait_until(lambda: len(held) == 3, message="the held requests")
        # ...then a flood of connections that takes every descriptor left...
        flood = [await raw_connect(process.proxy_port) for _ in range(40)]
        clients += flood
        await wait_until(lambda: open_fds(process.pid) >= limit, message="descriptors to run out")
        # ...so that what the flood asks for cannot be sent to the backend.
        for client in flood:
            if client.transport.connected:
                client.send(b"GET /flood HTTP/1.1\r\nHost: h\r\n\r\n")
        await wait_until(lambda: any(b"proxy_overloaded" in c.received for c in flood),
                         message="a 503 proxy_overloaded")
        overloaded = [c for c in flood if b"proxy_overloaded" in c.received]
        assert all(parse_response(bytes(c.received)).status == 503 for c in overloaded)
    finally:
        for request in held:
            if not request.finished and request.channel is not None:
                request.write(b"done")
                request.finish()
        for client in clients:
            client.transport.abortConnection()
    resource.prlimit(process.pid, resource.RLIMIT_NOFILE, (soft, hard))
    response = await within(http.get(process.proxy_url + "/after"))
    assert response.code == 200
    await response.text()
    status, stats = await get_json(http, process.admin_url + "/stats")
    [state] = stats["backends"]
    assert state["healthy"] and state["failures"] == 0, state
    output = await process.stop()
    assert output.count("cannot open connections to backends") == 1, output
    assert "is down" not in output


# -- the access log ----------------------------------------------------------------------


def access_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if "equalizer.access" in line]


@pytest.mark.parametrize("fmt", ["text", "json"])
@pytest_twisted.ensureDeferred
async def test_access_lines_name_upstream_addresses(backends, twistd_process, http, tmp_path,
                                                    fmt):
    """Access lines name the backend by host:port: every address tried on a retry, in order
    (``a:1, b:2``), the one that answered otherwise, and ``-`` for a 429 or a 503 the proxy
    answered itself; in text and JSON lines alike."""
    good = backends("good")
    refused = f"http://127.0.0.1:{free_port()}"
    log_file = tmp_path / f"access-{fmt}.log"
    document = equalizer_config(
        [refused, good.url], proxy={"retries": 1},
        rate_limit={"enabled": True, "key": "header:X-Key", "store": "memory",
                    "default": {"capacity": 2, "refill_rate": 0}},
        logging={"access_log": True, "format": fmt, "file": str(log_file)})
    process = await twistd_process(document, http)
    good_address = good.url.removeprefix("http://")
    refused_address = refused.removeprefix("http://")
    statuses = []
    for key in (b"a", b"b"):
        response = await within(http.get(process.proxy_url + "/", headers={b"X-Key": [key]}))
        statuses.append(response.code)
        await response.text()
    response = await within(http.get(process.proxy_url + "/", headers={b"X-Key": [b"a"]}))
    await response.text()
    response = await within(http.get(process.proxy_url + "/", headers={b"X-Key": [b"a"]}))
    statuses.append(response.code)
    await response.text()
    _, listing = await get_json(http, process.admin_url + "/backends")
    for item in listing["items"]:
        changed = await within(http.put(process.admin_url + "/backends/" + item["id"],
                                        json={"enabled": False}))
        await changed.text()
    response = await within(http.get(process.proxy_url + "/", headers={b"X-Key": [b"c"]}))
    statuses.append(response.code)
    await response.text()
    await process.stop()
    assert statuses == [200, 200, 429, 503]
    if fmt == "json":
        records = [json.loads(line) for line in access_lines(log_file)]
        seen = [(r["status"], r["upstream_addr"]) for r in records]
        assert all("backend" in r for r in records)
    else:
        seen = [(int(line.split('" ', 1)[1].split(" ", 1)[0]),
                 line.split('upstream_addr="', 1)[1].split('"', 1)[0])
                for line in access_lines(log_file)]
    assert (200, f"{refused_address}, {good_address}") in seen
    assert (200, good_address) in seen
    assert seen[-2:] == [(429, "-"), (503, "-")]
