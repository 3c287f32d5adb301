"""Traffic management over loopback, against real backends (SPEC 4.4 ``retry_on``, 4.6):
outlier ejection and its cap, backups, per-backend limits with the pool queue, slow
start, and retries on a backend's status.

Every wait is bounded (``wait_until``, ``within``); times in the configurations are
short where the test must see them run out, and long where the test must finish
well inside them whatever the machine's load.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest
import pytest_twisted
import treq
from twisted.internet.defer import Deferred
from twisted.web import server

from equalizer.config.loader import parse_config
from tests.integration.harness import (
    equalizer_config,
    get_json,
    name_handler,
    raw_connect,
    wait_until,
    within,
)

pytestmark = pytest.mark.usefixtures("no_logged_errors")


def failing(status: int):
    """A backend handler that answers ``status`` with the backend's name."""

    def handler(backend, request: server.Request) -> bytes:
        request.setResponseCode(status)
        return backend.name.encode()

    return handler


class Held:
    """A backend handler that keeps every request open until the test lets it go."""

    def __init__(self) -> None:
        self.waiting: list[server.Request] = []
        self.gone: set[server.Request] = set()

    def __call__(self, backend, request: server.Request) -> int:
        self.waiting.append(request)
        request.notifyFinish().addErrback(lambda _: self.gone.add(request))
        return server.NOT_DONE_YET

    def release(self, count: int | None = None) -> None:
        """Answer the oldest ``count`` held requests (all by default) with 200."""
        count = len(self.waiting) if count is None else count
        for request in self.waiting[:count]:
            if request not in self.gone:
                request.write(b"done")
                request.finish()
        del self.waiting[:count]


async def fetch(client, method: str, url: str, **kwargs) -> tuple[int, bytes, object]:
    """One request; (status, body, headers)."""
    response = await within(client.request(method, url, **kwargs))
    return response.code, await within(treq.content(response)), response.headers


async def stats(http, balancer) -> dict:
    status, body = await get_json(http, balancer.admin_url + "/stats")
    assert status == 200
    return body


def by_url(body: dict) -> dict[str, dict]:
    return {backend["url"]: backend for backend in body["backends"]}


# -- outlier detection ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_consecutive_5xx_eject_a_backend_until_the_ejection_time_is_over(
        http, backends, equalizer):
    """Three 500s in a row eject a backend: it gets no request while ejected, /stats shows
    when it returns, /metrics counts the ejection, and it serves again after that time."""
    good, bad = backends("good"), backends("bad", failing(500))
    balancer = await equalizer(equalizer_config(
        [good.url, bad.url],
        health={"outlier": {"consecutive_5xx": 3, "base_ejection": "1s"}}))
    statuses = [(await fetch(http, "GET", balancer.proxy_url + "/"))[0] for _ in range(6)]
    assert statuses == [200, 500] * 3
    ejected_until = by_url(await stats(http, balancer))[bad.url]["ejected_until"]
    assert ejected_until is not None
    for _ in range(6):
        assert (await fetch(http, "GET", balancer.proxy_url + "/"))[0] == 200
    assert len(bad.requests) == 3
    _, metrics, _ = await fetch(http, "GET", balancer.admin_url + "/metrics")
    bad_id = by_url(await stats(http, balancer))[bad.url]["id"]
    assert f'equalizer_backend_ejections_total{{backend="{bad_id}",url="{bad.url}"}} 1.0' \
        in metrics.decode()
    bad.handler = name_handler  # fixed meanwhile

    async def returned() -> bool:
        return by_url(await stats(http, balancer))[bad.url]["ejected_until"] is None

    await wait_until(returned, timeout=20, interval=0.05, message="the ejection to end")
    assert time.time() >= ejected_until - 0.05  # not before its time
    answers = Counter([(await fetch(http, "GET", balancer.proxy_url + "/"))[1]
                       for _ in range(4)])
    assert answers == {b"good": 2, b"bad": 2}


@pytest_twisted.ensureDeferred
async def test_ejection_never_takes_out_more_than_max_ejection_percent(
        http, backends, equalizer):
    """Both backends answer 500, but with max_ejection_percent 50 only one of the two is
    ever ejected: the other still takes every request."""
    one, two = backends("one", failing(500)), backends("two", failing(500))
    balancer = await equalizer(equalizer_config(
        [one.url, two.url],
        health={"outlier": {"consecutive_5xx": 1, "base_ejection": "60s",
                            "max_ejection_percent": 50}}))
    for _ in range(10):
        assert (await fetch(http, "GET", balancer.proxy_url + "/"))[0] == 500
    states = by_url(await stats(http, balancer))
    ejected = [url for url, b in states.items() if b["ejected_until"] is not None]
    assert len(ejected) == 1
    kept = two if ejected == [one.url] else one
    assert len(kept.requests) >= 9


# -- backups ---------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_backup_serves_only_while_every_primary_is_down(http, backends, equalizer):
    """A backup gets nothing while a primary is up, everything once both primaries fail
    their health checks, and nothing again as soon as one primary is back."""
    first, second, backup = backends("first"), backends("second"), backends("backup")
    balancer = await equalizer(equalizer_config(
        [], balancer={"backends": [{"url": first.url}, {"url": second.url},
                                   {"url": backup.url, "backup": True}]},
        health={"interval": "100ms", "timeout": "2s", "unhealthy_threshold": 1,
                "healthy_threshold": 1}))

    async def bodies(count: int) -> Counter:
        return Counter([(await fetch(http, "GET", balancer.proxy_url + "/"))[1]
                        for _ in range(count)])

    assert await bodies(4) == {b"first": 2, b"second": 2}
    first.health_status = second.health_status = 500

    async def healthy() -> set[str]:
        return {url for url, b in by_url(await stats(http, balancer)).items() if b["healthy"]}

    await wait_until(lambda: Deferred.fromCoroutine(healthy()).addCallback(
        lambda urls: urls == {backup.url}), timeout=20, message="both primaries down")
    assert await bodies(3) == {b"backup": 3}
    first.health_status = 200
    await wait_until(lambda: Deferred.fromCoroutine(healthy()).addCallback(
        lambda urls: first.url in urls), timeout=20, message="the first primary back")
    assert await bodies(3) == {b"first": 3}


# -- limits and the queue ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_full_backends_queue_then_refuse(http, backends, equalizer):
    """Two backends with max_requests 1 and a queue of 2 facing 5 slow requests at once:
    2 are served, 2 wait, 1 is refused at once with 503 overloaded and Retry-After; the
    waiting ones are served as slots free up, or refused when the wait is over."""
    held = Held()
    one, two = backends("one", held), backends("two", held)
    document = equalizer_config(
        [], balancer={"backends": [{"url": one.url, "max_requests": 1},
                                   {"url": two.url, "max_requests": 1}],
                      "queue": {"max": 2, "timeout": "60s"}})
    balancer = await equalizer(document)
    url = balancer.proxy_url + "/"
    pending = [Deferred.fromCoroutine(fetch(http, "GET", url)) for _ in range(5)]
    refused = await within(Deferred.fromCoroutine(_first_done(pending)))
    status, body, headers = refused
    assert status == 503 and b'"overloaded"' in body
    assert headers.getRawHeaders(b"retry-after") == [b"1"]
    await wait_until(lambda: len(held.waiting) == 2, message="two requests at the backends")
    queue = (await stats(http, balancer))["queue"]
    assert (queue["length"], queue["refused"]) == (2, 1)
    assert [b["in_flight"] for b in (await stats(http, balancer))["backends"]] == [1, 1]
    held.release()  # two served; the two queued take their slots
    await wait_until(lambda: len(held.waiting) == 2, message="the queued requests served")
    held.release()
    results = [await within(d) for d in pending]
    assert sorted(status for status, _, _ in results) == [200, 200, 200, 200, 503]

    # Now the wait runs out: the two queued requests are refused by the timeout.
    balancer.service.apply(parse_config(
        {**document, "balancer": {**document["balancer"], "queue": {"max": 2,
                                                                   "timeout": "500ms"}}}))
    results: list[tuple] = []
    pending = [Deferred.fromCoroutine(fetch(http, "GET", url)).addCallback(results.append)
               for _ in range(5)]
    await wait_until(lambda: len(held.waiting) == 2, message="two requests at the backends")
    await wait_until(lambda: len(results) == 3, message="one refusal and two timeouts")
    assert [status for status, _, _ in results] == [503, 503, 503]
    assert all(b'"overloaded"' in body for _, body, _ in results)
    assert (await stats(http, balancer))["queue"]["timed_out"] == 2
    held.release()
    for d in pending:
        await within(d)
    assert [status for status, _, _ in results[3:]] == [200, 200]


async def _first_done(pending: list[Deferred]):
    """The result of whichever of ``pending`` fires first (the others keep running)."""
    first: Deferred = Deferred()
    for d in pending:
        d.addCallback(lambda result: (first.called or first.callback(result), result)[1])
    return await first


@pytest_twisted.ensureDeferred
async def test_client_that_leaves_the_queue_is_removed_at_once(http, backends, equalizer):
    """A queued request whose client disconnects leaves the queue at once."""
    held = Held()
    only = backends("only", held)
    balancer = await equalizer(equalizer_config(
        [], balancer={"backends": [{"url": only.url, "max_requests": 1}],
                      "queue": {"max": 5, "timeout": "60s"}}))
    first = Deferred.fromCoroutine(fetch(http, "GET", balancer.proxy_url + "/"))
    await wait_until(lambda: len(held.waiting) == 1, message="the first request held")
    client = await raw_connect(balancer.proxy_port)
    client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")

    async def queued() -> int:
        return (await stats(http, balancer))["queue"]["length"]

    await wait_until(queued, message="the second request queued")
    client.transport.loseConnection()
    await wait_until(lambda: Deferred.fromCoroutine(queued()).addCallback(lambda n: n == 0),
                     timeout=5, message="the queue to empty")
    held.release()
    assert (await within(first))[0] == 200
    assert len(only.requests) == 1


# -- slow start ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_returning_backend_ramps_up_to_its_full_share(http, backends, equalizer):
    """A backend enabled again gets well under its third early in the slow-start window
    (0.1 / 2.1 of the requests at first) and exactly its third once the window is over
    (a reload shortens the window, so the test need not wait minutes)."""
    a, b, c = backends("a"), backends("b"), backends("c")
    document = equalizer_config([a.url, b.url, c.url], balancer={"slow_start": "300s"})
    balancer = await equalizer(document)
    backend_c = by_url(await stats(http, balancer))[c.url]["id"]
    for enabled in (False, True):
        status, _, _ = await fetch(http, "PUT", f"{balancer.admin_url}/backends/{backend_c}",
                                   json={"enabled": enabled})
        assert status == 200
    started = time.monotonic()
    early = Counter([(await fetch(http, "GET", balancer.proxy_url + "/"))[1]
                     for _ in range(60)])
    assert time.monotonic() - started < 30  # all within the first tenth of the window
    assert early[b"c"] <= 6  # its full share would be 20
    balancer.service.apply(parse_config(
        {**document, "balancer": {**document["balancer"], "slow_start": "1s"}}))
    pool = balancer.service.pool
    await wait_until(lambda: pool.slow_start.share(balancer.backend(c.url)) == 1.0,
                     timeout=10, message="the shortened window to end")
    late = Counter([(await fetch(http, "GET", balancer.proxy_url + "/"))[1]
                    for _ in range(60)])
    assert late == {b"a": 20, b"b": 20, b"c": 20}


# -- retries on a status -----------------------------------------------------------------------


def access_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if "equalizer.access" in line]


@pytest_twisted.ensureDeferred
async def test_get_is_retried_past_a_503_and_a_post_is_not(http, backends, twistd_process,
                                                           tmp_path):
    """With retry_on 503, a GET that met a 503 gets the other backend's answer and the
    access line names both backends; a POST gets the 503 as it was."""
    unavailable, good = backends("unavailable", failing(503)), backends("good")
    log_file = tmp_path / "access.log"
    process = await twistd_process(equalizer_config(
        [unavailable.url, good.url], proxy={"retries": 1, "retry_on": ["connect_failure", 503]},
        logging={"access_log": True, "file": str(log_file)}), http)
    gets = [await fetch(http, "GET", process.proxy_url + "/g") for _ in range(2)]
    assert [(status, body) for status, body, _ in gets] == [(200, b"good")] * 2
    posts = [await fetch(http, "POST", process.proxy_url + "/p", data=b"x") for _ in range(2)]
    assert sorted((status, body) for status, body, _ in posts) == [
        (200, b"good"), (503, b"unavailable")]
    assert [r.method for r in unavailable.requests] == [b"GET", b"POST"]
    await process.stop()
    both = f'upstream_addr="{unavailable.url[7:]}, {good.url[7:]}"'
    retried = [line for line in access_lines(log_file) if both in line]
    assert len(retried) == 1 and '"GET /g' in retried[0] and '" 200 ' in retried[0]


@pytest_twisted.ensureDeferred
async def test_get_is_retried_after_a_response_timeout(http, backends, equalizer):
    """With retry_on timeout, a GET whose backend does not answer in time goes to the other
    backend; without it, the client gets the 504."""
    held = Held()
    slow, good = backends("slow", held), backends("good")
    document = equalizer_config(
        [slow.url, good.url],
        proxy={"retries": 1, "retry_on": ["timeout"], "timeouts": {"response": "300ms"}})
    balancer = await equalizer(document)
    assert [(await fetch(http, "GET", balancer.proxy_url + "/"))[:2] for _ in range(2)] == \
        [(200, b"good")] * 2
    assert len(slow.requests) == 1
    balancer.service.apply(parse_config(
        {**document, "proxy": {**document["proxy"], "retry_on": ["connect_failure"]}}))
    statuses = sorted([(await fetch(http, "GET", balancer.proxy_url + "/"))[0]
                       for _ in range(2)])
    assert statuses == [200, 504]
    held.release()
