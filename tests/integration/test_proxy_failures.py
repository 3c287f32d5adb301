"""Backends that die, fail health checks or hang, and clients that send garbage (SPEC 4.3-4.4)."""

from __future__ import annotations

import json
import socket

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.web import server

from tests.integration.harness import (
    equalizer_config,
    free_port,
    get_json,
    parse_response,
    raw_connect,
    raw_request,
    sleep,
    wait_until,
    within,
)

pytestmark = pytest.mark.usefixtures("no_logged_errors")


def never_answers(backend, request: server.Request) -> int:
    """Keeps the request open until the test ends (the backends fixture drops it)."""
    return server.NOT_DONE_YET


def hang_up(backend, request: server.Request) -> int:
    """Reads the whole request, then drops the connection without a word."""
    request.transport.abortConnection()
    return server.NOT_DONE_YET


def echo(backend, request: server.Request) -> bytes:
    return backend.name.encode() + b":" + backend.requests[-1].body


def promise_more(backend, request: server.Request) -> int:
    """Promises 100000 bytes and sends 10000; the test then kills the connection."""
    request.setHeader(b"Content-Length", b"100000")
    request.write(b"h" * 10000)
    return server.NOT_DONE_YET


async def get(http, url: str):
    """GET ``url``: (response, body)."""
    response = await within(http.get(url))
    return response, await within(treq.content(response))


async def backend_state(http, admin_url: str, backend_id: str) -> dict:
    status, stats = await get_json(http, admin_url + "/stats")
    assert status == 200
    return next(b for b in stats["backends"] if b["id"] == backend_id)


def assert_error(body: bytes, code: str) -> None:
    error = json.loads(body)["error"]
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    assert set(error) == {"code", "message"}


@pytest_twisted.ensureDeferred
async def test_killed_backend_taken_out_without_failed_requests(http, backends, equalizer):
    """A backend killed mid-stream (listener closed, connections reset) is taken out and every
    client request still succeeds, served by the survivor after at most one retry."""
    survivor, victim = backends("survivor"), backends("victim")
    balancer = await equalizer(equalizer_config(
        [survivor.url, victim.url],
        proxy={"retries": 1},
        health={"interval": 0, "unhealthy_threshold": 2, "fail_timeout": "60s"},
    ))
    for _ in range(20):
        response, _ = await get(http, balancer.proxy_url + "/")
        assert response.code == 200
    assert len(victim.requests) == 10

    await victim.stop_listening()
    victim.drop_connections()
    statuses = []
    for _ in range(40):
        response, body = await get(http, balancer.proxy_url + "/")
        statuses.append(response.code)
        assert body == b"survivor"
    assert statuses == [200] * 40
    assert len(victim.requests) == 10
    assert len(survivor.requests) == 50

    state = await backend_state(http, balancer.admin_url, balancer.backend(victim.url).id)
    assert state["healthy"] is False
    assert state["failures"] >= 2
    status, health = await get_json(http, balancer.admin_url + "/health")
    assert (status, health["status"], health["backends"]) == \
        (200, "degraded", {"healthy": 1, "total": 2})


@pytest_twisted.ensureDeferred
async def test_backend_failing_health_checks_out_and_back(http, backends, equalizer):
    """A backend whose health path answers 500 is taken out, gets no traffic, and comes back after
    healthy_threshold passing checks; its /stats requests never include health checks."""
    steady, flaky = backends("steady"), backends("flaky")
    balancer = await equalizer(equalizer_config(
        [steady.url, flaky.url],
        health={"interval": "100ms", "timeout": "1s", "unhealthy_threshold": 2,
                "healthy_threshold": 2},
    ))
    flaky_id = balancer.backend(flaky.url).id

    flaky.health_status = 500
    await wait_until(lambda: not balancer.backend(flaky.url).healthy, 5,
                     message="the flaky backend to be taken out")
    state = await backend_state(http, balancer.admin_url, flaky_id)
    assert state["healthy"] is False
    assert state["last_check"]["ok"] is False
    status, health = await get_json(http, balancer.admin_url + "/health")
    assert (status, health["status"]) == (200, "degraded")
    for _ in range(6):
        _, body = await get(http, balancer.proxy_url + "/")
        assert body == b"steady"
    assert flaky.requests == []

    flaky.health_status = 200
    checks_before = flaky.health_checks
    await wait_until(lambda: balancer.backend(flaky.url).healthy, 5,
                     message="the flaky backend to come back")
    assert flaky.health_checks - checks_before >= 2
    bodies = []
    for _ in range(6):
        _, body = await get(http, balancer.proxy_url + "/")
        bodies.append(body)
    assert sorted(bodies) == [b"flaky"] * 3 + [b"steady"] * 3
    state = await backend_state(http, balancer.admin_url, flaky_id)
    assert state["healthy"] is True
    assert state["requests"] == len(flaky.requests) == 3
    assert flaky.health_checks > state["requests"]


@pytest_twisted.ensureDeferred
async def test_all_backends_refusing_is_502(http, equalizer):
    """When no backend accepts the connection the client gets 502 bad_gateway as JSON."""
    balancer = await equalizer(equalizer_config(
        [f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"],
        proxy={"retries": 1}, health={"unhealthy_threshold": 5},
    ))
    response, body = await get(http, balancer.proxy_url + "/anything")
    assert response.code == 502
    assert response.headers.getRawHeaders(b"Content-Type") == [b"application/json"]
    assert response.headers.getRawHeaders(b"X-Request-ID")
    assert_error(body, "bad_gateway")
    status, stats = await get_json(http, balancer.admin_url + "/stats")
    assert stats["requests"]["by_status"]["5xx"] == 1
    assert stats["requests"]["errors"] == 1
    assert [b["failures"] for b in stats["backends"]] == [1, 1]
    assert [b["requests"] for b in stats["backends"]] == [0, 0]


@pytest.mark.parametrize("refusal", ["502", "503"])
@pytest_twisted.ensureDeferred
async def test_upload_refused_before_its_body_ends(http, backends, equalizer, refusal):
    """An upload that cannot be forwarded is answered at once, before the client has sent its
    body, and the connection is closed since the rest of the body cannot be skipped."""
    if refusal == "502":
        config = equalizer_config([f"http://127.0.0.1:{free_port()}"], proxy={"retries": 0},
                                  health={"unhealthy_threshold": 100})
    else:
        sick = backends("sick")
        sick.health_status = 500
        config = equalizer_config([sick.url], health={"interval": "50ms",
                                                      "unhealthy_threshold": 1})
    balancer = await equalizer(config)
    if refusal == "503":
        await wait_until(lambda: not balancer.service.pool.available,
                         message="the backend to be taken out")
    client = await raw_connect(balancer.proxy_port)
    client.send(b"POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: 1000000\r\n\r\n" + b"z" * 1000)
    response = parse_response(await client.wait_closed())
    assert response.status == int(refusal)
    assert_error(response.body, "bad_gateway" if refusal == "502" else "no_healthy_backend")
    status, stats = await get_json(http, balancer.admin_url + "/stats")
    assert stats["requests"]["by_status"]["5xx"] == 1


def upload_then_read(port: int, head: bytes, size: int) -> bytes:
    """A blocking client that writes its whole request before it reads, as Python's
    ``http.client`` and most client libraries do: what it reads once the upload is out."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(head + b"z" * size)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


@pytest_twisted.ensureDeferred
async def test_refused_upload_is_read_to_its_end_so_the_client_gets_the_answer(
        backends, equalizer):
    """The proxy answers 503 after the head and closes, but reads and drops the rest of the
    16 MB upload first (lingering close): closing with it unread would reset the
    connection, and this client would get a broken pipe instead of the answer."""
    sick = backends("sick")
    sick.health_status = 500
    balancer = await equalizer(equalizer_config([sick.url], health={
        "interval": "50ms", "unhealthy_threshold": 1}))
    await wait_until(lambda: not balancer.service.pool.available,
                     message="the backend to be taken out")
    size = 16 * 1024 * 1024
    head = b"POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % size
    raw = await within(deferToThread(upload_then_read, balancer.proxy_port, head, size), 30)
    response = parse_response(raw)
    assert response.status == 503 and response.header(b"connection") == [b"close"]
    assert_error(response.body, "no_healthy_backend")


@pytest_twisted.ensureDeferred
async def test_no_healthy_backend_is_503_with_retry_after(http, backends, equalizer):
    """When every backend fails its health checks the client gets 503 no_healthy_backend with
    Retry-After, and /health says down."""
    sick = backends("sick")
    sick.health_status = 500
    balancer = await equalizer(equalizer_config(
        [sick.url], health={"interval": "100ms", "timeout": "1s", "unhealthy_threshold": 1},
    ))

    async def down() -> bool:
        status, health = await get_json(http, balancer.admin_url + "/health")
        return status == 503 and health["status"] == "down"

    await wait_until(down, 5, message="/health to say down")
    response, body = await get(http, balancer.proxy_url + "/")
    assert response.code == 503
    retry_after = response.headers.getRawHeaders(b"Retry-After")
    assert retry_after and retry_after[0].isdigit()
    assert_error(body, "no_healthy_backend")
    assert sick.requests == []


@pytest_twisted.ensureDeferred
async def test_backend_never_answering_is_504(http, backends, equalizer):
    """A backend that accepts the request but never answers gets the client a 504
    gateway_timeout after the response timeout."""
    silent = backends("silent", never_answers)
    balancer = await equalizer(equalizer_config(
        [silent.url], proxy={"timeouts": {"response": "500ms"}},
    ))
    started = reactor.seconds()
    pending = within(http.get(balancer.proxy_url + "/slow"))
    await wait_until(lambda: silent.requests, message="the request to reach the backend")
    state = await backend_state(http, balancer.admin_url, balancer.backend(silent.url).id)
    assert state["in_flight"] == 1
    response = await pending
    body = await within(treq.content(response))
    elapsed = reactor.seconds() - started
    assert response.code == 504
    assert_error(body, "gateway_timeout")
    assert 0.45 <= elapsed < 5
    assert len(silent.requests) == 1
    await wait_until(lambda: silent.connections_lost >= 1, 5,
                     message="the abandoned backend connection to close")


@pytest_twisted.ensureDeferred
async def test_backend_not_accepting_in_time_is_504(http, equalizer, unresponsive):
    """A backend that does not complete the connection within the connect timeout gets the
    client a 504 gateway_timeout."""
    balancer = await equalizer(equalizer_config(
        [unresponsive.url], proxy={"retries": 0, "timeouts": {"connect": "300ms"}},
    ))
    started = reactor.seconds()
    response, body = await get(http, balancer.proxy_url + "/")
    assert response.code == 504
    assert_error(body, "gateway_timeout")
    assert 0.25 <= reactor.seconds() - started < 5


@pytest_twisted.ensureDeferred
async def test_client_leaving_during_connect_is_not_a_backend_failure(backends, equalizer,
                                                                      unresponsive):
    """A client that disconnects while the proxy is still connecting to a backend cancels that
    connection attempt without counting it against the backend or retrying elsewhere."""
    other = backends("other")
    balancer = await equalizer(equalizer_config(
        [unresponsive.url, other.url],
        proxy={"retries": 1, "timeouts": {"connect": "5s"}}, health={"unhealthy_threshold": 1},
    ))
    slow = balancer.backend(unresponsive.url)
    upstreams = balancer.service.upstreams
    client = await raw_connect(balancer.proxy_port)
    client.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    await wait_until(lambda: upstreams.connections_made == 1 and slow.in_flight == 1,
                     message="the proxy to start connecting")
    client.transport.abortConnection()
    await wait_until(lambda: slow.in_flight == 0, message="the exchange to end")
    await sleep(0.05)  # a retry, if any, would start connecting now
    assert upstreams.connections_made == 1
    assert (slow.failures, slow.consecutive_failures, slow.healthy) == (0, 0, True)
    assert other.requests == [] and other.connections_made == 0


@pytest_twisted.ensureDeferred
async def test_post_retried_when_connection_refused_with_body_intact(http, backends, equalizer):
    """A POST whose first backend refuses the connection goes, body intact, to the next one:
    nothing had been sent, so even a non-idempotent request is retried."""
    alive = backends("alive", echo)
    dead_url = f"http://127.0.0.1:{free_port()}"
    balancer = await equalizer(equalizer_config(
        [dead_url, alive.url], proxy={"retries": 1}, health={"unhealthy_threshold": 100},
    ))
    body = bytes(range(256)) * 1000
    for _ in range(4):
        response = await within(http.post(balancer.proxy_url + "/form", data=body))
        assert response.code == 200
        assert await within(treq.content(response)) == b"alive:" + body
    assert [r.body for r in alive.requests] == [body] * 4


@pytest_twisted.ensureDeferred
async def test_idempotent_request_retried_after_backend_hangs_up(http, backends, equalizer):
    """A GET whose backend drops the connection before answering is retried on another backend."""
    rude, polite = backends("rude", hang_up), backends("polite")
    balancer = await equalizer(equalizer_config([rude.url, polite.url], proxy={"retries": 1}))
    for _ in range(4):
        response, body = await get(http, balancer.proxy_url + "/")
        assert (response.code, body) == (200, b"polite")
    assert len(rude.requests) == 2


@pytest_twisted.ensureDeferred
async def test_post_not_retried_after_its_body_went_out(http, backends, equalizer):
    """A POST whose backend drops the connection after receiving the body is answered 502, not
    sent again to another backend."""
    rude, polite = backends("rude", hang_up), backends("polite", echo)
    balancer = await equalizer(equalizer_config([rude.url, polite.url], proxy={"retries": 1}))
    response = await within(http.post(balancer.proxy_url + "/pay", data=b"once only"))
    assert response.code == 502
    assert_error(await within(treq.content(response)), "bad_gateway")
    assert [r.body for r in rude.requests] == [b"once only"]
    assert polite.requests == []


@pytest_twisted.ensureDeferred
async def test_backend_dying_mid_response_cuts_client_off(backends, equalizer):
    """When a backend dies halfway through its body the client's connection is cut, so the
    truncation shows, rather than the response ending as if complete."""
    dying = backends("dying", promise_more)
    balancer = await equalizer(equalizer_config([dying.url]))
    client = await raw_connect(balancer.proxy_port)
    client.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    await client.received_until(lambda data: data.endswith(b"h" * 10000))
    dying.drop_connections()
    raw = await client.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"Content-Length: 100000" in head
    assert len(body) == 10000
    assert balancer.backend(dying.url).in_flight == 0


@pytest_twisted.ensureDeferred
async def test_backend_idle_mid_response_is_cut_after_idle_timeout(backends, equalizer):
    """A backend that stops sending halfway through its body is given up after
    ``timeouts.idle``: the client's connection is cut and the backend's is dropped."""
    stalled = backends("stalled", promise_more)
    balancer = await equalizer(equalizer_config(
        [stalled.url], proxy={"timeouts": {"idle": "500ms"}}))
    client = await raw_connect(balancer.proxy_port)
    client.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    await client.received_until(lambda data: data.endswith(b"h" * 10000))
    raw = await within(client.wait_closed(), 5)
    assert len(raw.partition(b"\r\n\r\n")[2]) == 10000
    await wait_until(lambda: stalled.connections_lost >= 1, 5,
                     message="the backend connection to be dropped")
    assert balancer.backend(stalled.url).in_flight == 0


MALFORMED = {
    "bad request line": b"THIS IS NOT HTTP\r\n\r\n",
    "missing version": b"GET /\r\nHost: h\r\n\r\n",
    "oversized headers": b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: " + b"a" * 4096 + b"\r\n\r\n",
    "content-length and transfer-encoding": (
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
    "transfer-encoding then content-length, mid-head": (
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Length: 5\r\nX-After: 1\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
    "non-numeric content-length": (
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: five\r\n\r\nhello"),
    "negative content-length": b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: -5\r\n\r\nhello",
    "bad chunk size": (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"zz\r\nhello\r\n0\r\n\r\n"),
    "request line over max_header_bytes": b"GET /" + b"a" * 3000 + b" HTTP/1.1\r\nHost: h\r\n\r\n",
    "no Host in HTTP/1.1": b"GET / HTTP/1.1\r\n\r\n",
    "two Host headers": b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
}


@pytest.mark.parametrize("data", list(MALFORMED.values()), ids=list(MALFORMED))
@pytest_twisted.ensureDeferred
async def test_malformed_request_gets_4xx_and_proxy_keeps_serving(http, backends, equalizer, data):
    """A malformed request gets a 4xx on its connection and the proxy goes on serving others."""
    backend = backends("b1")
    balancer = await equalizer(equalizer_config([backend.url],
                                                proxy={"max_header_bytes": 2048}))
    raw = await raw_request(balancer.proxy_port, data)
    status = parse_response(raw).status
    assert 400 <= status < 500, raw
    response, body = await get(http, balancer.proxy_url + "/after")
    assert (response.code, body) == (200, b"b1")
    assert [r.uri for r in backend.requests] == [b"/after"]


@pytest_twisted.ensureDeferred
async def test_a_header_line_may_be_as_long_as_max_header_bytes(backends, equalizer):
    """``max_header_bytes`` above twisted.web's 16 KiB line limit lets a single header line of
    that size through to the backend."""
    backend = backends("b1")
    balancer = await equalizer(equalizer_config([backend.url],
                                                proxy={"max_header_bytes": 65536}))
    big = b"a" * 40000
    raw = await raw_request(balancer.proxy_port, b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: " + big
                            + b"\r\nConnection: close\r\n\r\n")
    assert parse_response(raw).status == 200
    assert backend.requests[-1].header(b"x-big") == [big]


@pytest_twisted.ensureDeferred
async def test_http_1_0_without_host_is_served(backends, equalizer):
    """An HTTP/1.0 request may leave out Host (RFC 9112 makes it mandatory from 1.1 on)."""
    backend = backends("b1")
    balancer = await equalizer(equalizer_config([backend.url]))
    raw = await raw_request(balancer.proxy_port, b"GET / HTTP/1.0\r\n\r\n")
    assert parse_response(raw).status == 200


def canned(head: bytes):
    """A backend answering every request with ``head`` and a 2-byte body, written raw."""

    def answer(backend, request: server.Request) -> int:
        request.transport.write(head + b"Content-Length: 2\r\n\r\nok")
        request.transport.loseConnection()
        return server.NOT_DONE_YET

    return answer


@pytest.mark.parametrize("head", [
    b"HTTP/1.1 200 OK\r\nX-A: b\nInjected: yes\r\n",
    b"HTTP/1.1 200 OK\r\nX-A: b\rInjected: yes\r\n",
    b"HTTP/1.1 200 OK\r\nX A: b\r\n",
    b"HTTP/1.1 200 OK\r\nX-A: b\r\n folded: yes\r\n",
    b"HTTP/1.1 200 OK\r\nX-A: \x00\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nInjected: yes\r\n",
], ids=["bare-lf", "bare-cr", "space-in-name", "obs-fold", "nul", "conflicting-length"])
@pytest_twisted.ensureDeferred
async def test_malformed_backend_header_is_a_502_never_relayed(backends, equalizer, head):
    """A backend header line with control characters, a non-token name or an obsolete fold is
    refused (502): nothing of it reaches the client, so it cannot smuggle in a field."""
    backend = backends("bad", canned(head))
    balancer = await equalizer(equalizer_config([backend.url], proxy={"retries": 0}))
    raw = await raw_request(balancer.proxy_port,
                            b"GET / HTTP/1.1\r\nHost: front\r\nConnection: close\r\n\r\n")
    response = parse_response(raw)
    assert response.status == 502
    assert json.loads(response.body)["error"]["code"] == "bad_gateway"
    assert b"injected" not in response.names() and b"Injected" not in raw


@pytest_twisted.ensureDeferred
async def test_access_line_of_a_failed_response_names_the_backend(backends, equalizer):
    """When a backend's answer is refused (502), the access line still names the backend that
    was tried, with the status the client got."""
    backend = backends("bad", canned(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n"))
    balancer = await equalizer(equalizer_config([backend.url], proxy={"retries": 0},
                                                logging={"access_log": True}))
    lines: list[dict] = []

    def observe(event: dict) -> None:
        if event.get("log_namespace") == "equalizer.access":
            lines.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        raw = await raw_request(balancer.proxy_port,
                                b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    finally:
        globalLogPublisher.removeObserver(observe)
    assert parse_response(raw).status == 502
    assert [(line["status"], line["backend"]) for line in lines] == \
        [(502, balancer.backend(backend.url).id)]
