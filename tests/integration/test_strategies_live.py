"""Balancing strategies and retry rules over loopback, counted at real backends (SPEC 4.2, 4.4).

The pure strategy maths is in tests/test_strategies.py; here every request goes
through a running balancer and is counted where it lands.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict

import pytest
import pytest_twisted
import treq
from twisted.internet.defer import Deferred, gatherResults
from twisted.web import server

from tests.integration.harness import (
    equalizer_config,
    free_port,
    global_reactor,
    name_handler,
    within,
)

pytestmark = pytest.mark.usefixtures("no_logged_errors")


def answer_after(seconds: float):
    """A backend handler that answers with the backend's name ``seconds`` later (unless the
    client has gone by then)."""

    def handler(backend, request: server.Request) -> int:
        def finish() -> None:
            request.write(name_handler(backend, request))
            request.finish()

        call = global_reactor.callLater(seconds, finish)
        request.notifyFinish().addErrback(lambda _: call.active() and call.cancel())
        return server.NOT_DONE_YET

    return handler


def hang_up(backend, request: server.Request) -> int:
    """Reads the whole request (twisted.web buffers the body first), then drops the connection."""
    request.transport.abortConnection()
    return server.NOT_DONE_YET


def echo(backend, request: server.Request) -> bytes:
    return backend.name.encode() + b":" + backend.requests[-1].body


async def fetch(client, url: str, **kwargs) -> tuple[int, bytes]:
    """GET ``url``; (status, body)."""
    response = await within(client.get(url, **kwargs))
    return response.code, await within(treq.content(response))


# -- strategies --------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_weighted_round_robin_follows_weights_exactly(http, backends, equalizer):
    """With weights 3:1, forty sequential requests reach the backends exactly 30 and 10 times."""
    heavy, light = backends("heavy"), backends("light")
    balancer = await equalizer(equalizer_config(
        [], balancer={"strategy": "weighted_round_robin",
                      "backends": [{"url": heavy.url, "weight": 3},
                                   {"url": light.url, "weight": 1}]},
    ))
    answers = Counter()
    for _ in range(40):
        status, body = await fetch(http, balancer.proxy_url + "/")
        assert status == 200
        answers[body] += 1
    assert (len(heavy.requests), len(light.requests)) == (30, 10)
    assert answers == {b"heavy": 30, b"light": 10}


@pytest_twisted.ensureDeferred
async def test_least_connections_sends_fewer_requests_to_a_slow_backend(http, backends, equalizer):
    """Under concurrent load, least_connections sends a backend that holds each request for
    200 ms far fewer requests than an instant one."""
    fast, slow = backends("fast"), backends("slow", answer_after(0.2))
    balancer = await equalizer(equalizer_config(
        [slow.url, fast.url], balancer={"strategy": "least_connections"},
    ))
    statuses = Counter()
    budget = iter(range(60))  # shared, so every worker stays busy until the last request

    async def worker() -> None:
        for _ in budget:
            status, _ = await fetch(http, balancer.proxy_url + "/")
            statuses[status] += 1

    await within(gatherResults([Deferred.fromCoroutine(worker()) for _ in range(4)],
                               consumeErrors=True), 20)
    assert statuses == {200: 60}
    assert len(fast.requests) + len(slow.requests) == 60
    assert 1 <= len(slow.requests) and len(slow.requests) * 4 < len(fast.requests), \
        (len(slow.requests), len(fast.requests))


@pytest.mark.parametrize("hash_key", ["header:X-User", "cookie:session"])
@pytest_twisted.ensureDeferred
async def test_hash_keeps_each_user_on_one_backend(http, backends, equalizer, hash_key):
    """With strategy hash on a header or a cookie, each of twelve users' requests (five each,
    interleaved, other cookies changing) all land on one backend, and the users spread out."""
    servers = [backends(f"b{i}") for i in range(3)]
    balancer = await equalizer(equalizer_config(
        [s.url for s in servers], balancer={"strategy": "hash", "hash_key": hash_key},
    ))
    users = [f"user-{n}" for n in range(12)]
    for round_ in range(5):
        for user in users:
            if hash_key.startswith("header:"):
                headers = {"X-User": user}
            else:
                headers = {"Cookie": f"theme=t{round_}; session={user}; lang=x{round_}"}
            status, _ = await fetch(http, balancer.proxy_url + f"/r{round_}", headers=headers)
            assert status == 200

    where: dict[str, set[str]] = defaultdict(set)
    for backend in servers:
        for recorded in backend.requests:
            if hash_key.startswith("header:"):
                user = recorded.header(b"x-user")[0].decode()
            else:
                cookie = recorded.header(b"cookie")[0].decode()
                user = dict(part.strip().split("=") for part in cookie.split(";"))["session"]
            where[user].add(backend.name)
    assert sum(len(s.requests) for s in servers) == 60
    assert set(where) == set(users)
    assert all(len(names) == 1 for names in where.values()), dict(where)
    assert len(set().union(*where.values())) >= 2


# -- retries -------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_post_to_refusing_backend_is_retried_elsewhere(http, backends, equalizer):
    """A POST whose chosen backend refuses the connection is answered 200 by another backend,
    which receives the body intact and exactly once."""
    alive = backends("alive", echo)
    refusing = f"http://127.0.0.1:{free_port()}"
    balancer = await equalizer(equalizer_config([refusing, alive.url], proxy={"retries": 1}))
    body = b"order=42&" + bytes(range(256)) * 64
    response = await within(http.post(balancer.proxy_url + "/orders", data=body))
    assert response.code == 200
    assert await within(treq.content(response)) == b"alive:" + body
    assert [(r.method, r.uri, r.body) for r in alive.requests] == [(b"POST", b"/orders", body)]


@pytest_twisted.ensureDeferred
async def test_post_not_retried_once_its_backend_had_the_body(http, backends, equalizer):
    """A POST whose backend dies after receiving the body gets 502 and never reaches the other
    backend; the next POST goes to that other backend normally."""
    dying, other = backends("dying", hang_up), backends("other", echo)
    balancer = await equalizer(equalizer_config([dying.url, other.url], proxy={"retries": 2}))
    response = await within(http.post(balancer.proxy_url + "/pay", data=b"charge once"))
    assert response.code == 502
    error = json.loads(await within(treq.content(response)))["error"]
    assert error["code"] == "bad_gateway"
    assert [r.body for r in dying.requests] == [b"charge once"]
    assert other.requests == []

    response = await within(http.post(balancer.proxy_url + "/pay", data=b"second"))
    assert response.code == 200
    assert await within(treq.content(response)) == b"other:second"
    assert [r.body for r in other.requests] == [b"second"]
    assert len(dying.requests) == 1
