"""Changing a running balancer: the /backends API, SIGHUP reloads and SIGTERM (SPEC 6, 7).

The admin API tests run the balancer in this process; the signal tests run
``twistd -n equalizer`` as a child process and signal it by PID, as an operator
would. Backends always run in this process, so requests are counted where they land.
"""

from __future__ import annotations

import json
import os
import signal
from collections import Counter

import pytest_twisted
import treq
import yaml
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.web import server

from equalizer.config.loader import parse_config
from tests.integration.harness import (
    LOOPBACK,
    equalizer_config,
    get_json,
    global_reactor,
    http_client,
    name_handler,
    wait_until,
    within,
)

SLOW_SECONDS = 2.0


def slow_path_handler(finished: list):
    """Answers ``/slow`` with the backend's name after SLOW_SECONDS, calling each function in
    ``finished`` just before it does; any other path at once."""

    def handler(backend, request: server.Request) -> bytes | int:
        if request.path != b"/slow":
            return name_handler(backend, request)

        def finish() -> None:
            for call in finished:
                call(backend)
            request.write(name_handler(backend, request))
            request.finish()

        later = global_reactor.callLater(SLOW_SECONDS, finish)
        request.notifyFinish().addErrback(lambda _: later.active() and later.cancel())
        return server.NOT_DONE_YET

    return handler


def settled(d: Deferred) -> list[bool]:
    """A list that gets one item once ``d`` has its result (``Deferred.called`` is already true
    while treq's Deferred waits on an inner one)."""
    outcome: list[bool] = []

    def note(result):
        outcome.append(True)
        return result

    d.addBoth(note)
    return outcome


async def fetch(client, url: str) -> tuple[int, bytes]:
    """GET ``url``; (status, body)."""
    response = await within(client.get(url))
    return response.code, await within(treq.content(response))


async def send_json(client, method: str, url: str, body: dict) -> tuple[int, object, object]:
    """``method`` ``url`` with a JSON body; (status, decoded body or None, response)."""
    response = await within(client.request(method, url, json=body))
    content = await within(treq.content(response))
    return response.code, json.loads(content) if content else None, response


async def backend_items(client, admin_url: str) -> list[dict]:
    status, body = await get_json(client, admin_url + "/backends")
    assert status == 200
    assert body["total"] == len(body["items"])
    return body["items"]


async def stats_backends(client, admin_url: str) -> list[dict]:
    status, body = await get_json(client, admin_url + "/stats")
    assert status == 200
    return body["backends"]


async def backend_id(client, admin_url: str, url: str) -> str:
    return next(item["id"] for item in await backend_items(client, admin_url)
                if item["url"] == url)


# -- the /backends API, in process -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_delete_drains_in_flight_request_then_removes(http, backends, equalizer,
                                                            no_logged_errors):
    """DELETE /backends/{id} during a 2 s request on that backend lets the request finish with
    200, sends no new request there meanwhile, answers 204 only after it, and then the backend
    is gone from /backends and /stats."""
    finished: list = []
    a, b = backends("a", slow_path_handler(finished)), backends("b", slow_path_handler(finished))
    balancer = await equalizer(equalizer_config([a.url, b.url]))
    slow = http.get(balancer.proxy_url + "/slow")
    draining = await wait_until(lambda: next((s for s in (a, b) if s.requests), None),
                                message="the slow request to reach a backend")
    other = b if draining is a else a
    victim = await backend_id(http, balancer.admin_url, draining.url)

    delete: Deferred = http.delete(f"{balancer.admin_url}/backends/{victim}")
    deleted = settled(delete)
    seen_at_finish: list[tuple[bool, bool]] = []
    finished.append(lambda _: seen_at_finish.append(
        (bool(deleted), any(x.id == victim for x in balancer.service.pool.backends))))
    items = await wait_until(
        lambda: _draining_items(http, balancer.admin_url, victim), message="draining: true")
    assert [item["in_flight"] for item in items if item["id"] == victim] == [1]

    for _ in range(10):
        assert await fetch(http, balancer.proxy_url + "/") == (200, other.name.encode())
    assert len(draining.requests) == 1
    assert not deleted

    response = await within(slow, SLOW_SECONDS + 5)
    assert response.code == 200
    assert await within(treq.content(response)) == draining.name.encode()
    response = await within(delete, 5)
    assert response.code == 204
    assert await within(treq.content(response)) == b""
    # When the backend sent its answer the DELETE was still waiting and the backend still pooled.
    assert seen_at_finish == [(False, True)]

    assert [item["url"] for item in await backend_items(http, balancer.admin_url)] == [other.url]
    assert [item["url"] for item in await stats_backends(http, balancer.admin_url)] \
        == [other.url]
    for _ in range(4):
        assert await fetch(http, balancer.proxy_url + "/") == (200, other.name.encode())
    assert len(draining.requests) == 1


async def _draining_items(client, admin_url: str, backend: str) -> list[dict] | None:
    items = await backend_items(client, admin_url)
    return items if any(i["id"] == backend and i["draining"] for i in items) else None


@pytest_twisted.ensureDeferred
async def test_disabled_backend_gets_no_new_requests_until_enabled(http, backends, equalizer,
                                                                   no_logged_errors):
    """PUT enabled=false takes a backend out of the rotation at once, and enabled=true puts it
    back."""
    a, b = backends("a"), backends("b")
    balancer = await equalizer(equalizer_config([a.url, b.url]))
    a_id = await backend_id(http, balancer.admin_url, a.url)

    status, body, _ = await send_json(http, "PUT", f"{balancer.admin_url}/backends/{a_id}",
                                      {"enabled": False})
    assert (status, body["id"], body["enabled"]) == (200, a_id, False)
    for _ in range(8):
        assert await fetch(http, balancer.proxy_url + "/") == (200, b"b")
    assert (len(a.requests), len(b.requests)) == (0, 8)
    [stats] = [s for s in await stats_backends(http, balancer.admin_url) if s["id"] == a_id]
    assert (stats["enabled"], stats["requests"]) == (False, 0)

    status, body, _ = await send_json(http, "PUT", f"{balancer.admin_url}/backends/{a_id}",
                                      {"enabled": True})
    assert (status, body["enabled"]) == (200, True)
    for _ in range(4):
        assert (await fetch(http, balancer.proxy_url + "/"))[0] == 200
    assert (len(a.requests), len(b.requests)) == (2, 10)


@pytest_twisted.ensureDeferred
async def test_added_backend_takes_traffic_at_once(http, backends, equalizer, no_logged_errors):
    """POST /backends adds a backend that /stats shows at once and that the very next requests
    reach, in proportion to the weight it was given."""
    old, new = backends("old"), backends("new")
    balancer = await equalizer(equalizer_config(
        [old.url], balancer={"strategy": "weighted_round_robin"}))
    for _ in range(2):
        assert await fetch(http, balancer.proxy_url + "/") == (200, b"old")

    status, body, response = await send_json(http, "POST", balancer.admin_url + "/backends",
                                             {"url": new.url, "weight": 3})
    assert status == 201
    assert (body["url"], body["weight"], body["enabled"]) == (new.url, 3, True)
    assert response.headers.getRawHeaders("Location") == [f"/backends/{body['id']}"]
    [listed] = [s for s in await stats_backends(http, balancer.admin_url) if s["id"] == body["id"]]
    assert (listed["url"], listed["requests"], listed["healthy"]) == (new.url, 0, True)

    answers = Counter()
    for _ in range(8):
        status, name = await fetch(http, balancer.proxy_url + "/")
        assert status == 200
        answers[name] += 1
    assert answers == {b"new": 6, b"old": 2}
    [listed] = [s for s in await stats_backends(http, balancer.admin_url) if s["id"] == body["id"]]
    assert listed["requests"] == 6


@pytest_twisted.ensureDeferred
async def test_added_backend_health_is_unknown_until_its_first_check(http, backends, equalizer):
    """With active checks on, a backend added through the API is ``"healthy": null`` (it takes
    traffic all the same) until its first check, then true."""
    old, new = backends("old"), backends("new")
    balancer = await equalizer(equalizer_config(
        [old.url], health={"interval": "300ms", "timeout": "1s", "path": "/"}))
    await wait_until(lambda: balancer.backend(old.url).checked, message="the first round")
    status, body, _ = await send_json(http, "POST", balancer.admin_url + "/backends",
                                      {"url": new.url})
    assert (status, body["healthy"], body["down_since"]) == (201, None, None)

    async def checked() -> bool:
        [listed] = [b for b in await stats_backends(http, balancer.admin_url)
                    if b["id"] == body["id"]]
        return listed["healthy"] is True and listed["last_check"]["ok"]

    await wait_until(checked, message="the new backend's first check")


@pytest_twisted.ensureDeferred
async def test_delete_answered_when_a_reload_keeps_the_backend(http, backends, equalizer):
    """A DELETE still draining when a reload lists that backend again gets an answer (the file
    wins, so an error) instead of hanging, and the backend stays in service."""
    held: list[server.Request] = []

    def hold(backend, request: server.Request) -> int:
        held.append(request)
        return server.NOT_DONE_YET

    a, b = backends("a", hold), backends("b")
    document = equalizer_config([a.url, b.url])
    balancer = await equalizer(document)
    request = http.get(balancer.proxy_url + "/held")
    await wait_until(lambda: held, message="the request to reach a")
    a_id = await backend_id(http, balancer.admin_url, a.url)
    delete = http.delete(f"{balancer.admin_url}/backends/{a_id}")
    await wait_until(lambda: balancer.backend(a.url).draining, message="a to drain")

    balancer.service.apply(parse_config(document))  # what SIGHUP does with an unchanged file
    held[0].write(b"done")
    held[0].finish()
    assert (await within(request)).code == 200
    response = await within(delete, 2)
    assert 400 <= response.code < 500
    assert json.loads(await within(treq.content(response)))["error"]["code"]
    assert [i["url"] for i in await backend_items(http, balancer.admin_url)] == [a.url, b.url]


# -- signals, on a twistd child process -----------------------------------------------------------


class SteadyClients:
    """Client loops requesting through the proxy back to back until stopped, recording every
    outcome: one on kept-alive connections, one opening a new connection per request."""

    def __init__(self, proxy_url: str, http) -> None:
        self.proxy_url = proxy_url
        self.results: list[tuple[int | None, bytes | str]] = []
        self._running = True
        self._fresh, self._fresh_pool = http_client(persistent=False)
        self._loops = gatherResults([Deferred.fromCoroutine(self._loop(client))
                                     for client in (http, self._fresh)], consumeErrors=True)

    async def _loop(self, client) -> None:
        while self._running:
            try:
                self.results.append(await fetch(client, self.proxy_url + "/"))
            except Exception as error:  # any failure is what the test counts
                self.results.append((None, repr(error)))

    async def more(self, n: int) -> None:
        """Wait for ``n`` more outcomes."""
        target = len(self.results) + n
        await wait_until(lambda: len(self.results) >= target, message=f"{n} more requests")

    async def stop(self) -> list[tuple[int | None, bytes | str]]:
        self._running = False
        await within(self._loops, 15)
        await within(self._fresh_pool.closeCachedConnections())
        return self.results


def rewrite_backends(config_path: str, backends: list[dict] | str) -> None:
    """Replace the balancer's backends in the child's YAML file (or the whole file by text)."""
    if isinstance(backends, str):
        text = backends
    else:
        with open(config_path) as f:
            document = yaml.safe_load(f)
        document["balancer"]["backends"] = backends
        text = yaml.safe_dump(document)
    with open(config_path, "w") as f:
        f.write(text)


async def sighup_and_wait_for(process, line: str) -> None:
    """SIGHUP the child by PID and wait for one more log line containing ``line``."""
    before = process.output().count(line)
    os.kill(process.pid, signal.SIGHUP)
    await wait_until(lambda: process.output().count(line) > before,
                     message=f"log line {line!r} after SIGHUP")


async def listed_exactly(process, client, *servers) -> bool:
    """Whether the child's /backends lists exactly these servers."""
    items = await backend_items(client, process.admin_url)
    return sorted(i["url"] for i in items) == sorted(s.url for s in servers)


async def reload_metrics(http, admin_url: str) -> dict:
    """``equalizer_reloads_total`` by result, and the last good reload's time (or None)."""
    response = await within(http.get(admin_url + "/metrics"))
    text = (await within(treq.content(response))).decode()
    found: dict = {"last": None}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "equalizer_reloads_total":
                found[sample.labels["result"]] = sample.value
            elif sample.name == "equalizer_last_reload_success_timestamp_seconds":
                found["last"] = sample.value
    return found


@pytest_twisted.ensureDeferred
async def test_sighup_adds_and_removes_backends_without_failed_requests(http, backends,
                                                                       twistd_process):
    """SIGHUP with a rewritten file brings in a new backend and drains out a removed one while
    two clients request without pause, and not one of their requests fails."""
    a, b, c = backends("a"), backends("b"), backends("c")
    process = await twistd_process(equalizer_config([a.url, b.url]), http)
    clients = SteadyClients(process.proxy_url, http)
    try:
        await wait_until(lambda: a.requests and b.requests, message="traffic to a and b")
        await clients.more(40)

        rewrite_backends(process.config_path, [{"url": a.url}, {"url": c.url}])
        await sighup_and_wait_for(process, "configuration reloaded")
        await wait_until(lambda: len(c.requests) >= 10, message="traffic to the new backend")

        await wait_until(lambda: listed_exactly(process, http, a, c), message="b to leave")
        b_count = len(b.requests)  # drained: whatever was sent to b has been answered
        await clients.more(60)
        assert len(b.requests) == b_count

        rewrite_backends(process.config_path, [{"url": c.url}, {"url": b.url}])
        await sighup_and_wait_for(process, "configuration reloaded")
        await wait_until(lambda: len(b.requests) >= b_count + 10, message="b back in")
        await wait_until(lambda: listed_exactly(process, http, c, b), message="a to leave")
        a_count = len(a.requests)
        await clients.more(40)
    finally:
        results = await clients.stop()
    assert len(a.requests) == a_count
    failures = [r for r in results if r[0] != 200]
    assert failures == []
    assert len(results) >= 180
    assert {body for _, body in results} == {b"a", b"b", b"c"}
    counts = await reload_metrics(http, process.admin_url)
    assert counts["success"] == 2 and counts["failure"] == 0 and counts["last"] > 0


@pytest_twisted.ensureDeferred
async def test_sighup_with_invalid_file_changes_nothing(http, backends, twistd_process):
    """SIGHUP with a file that is not YAML, then with one that is invalid, is refused with a log
    line each time, and the same backends go on serving every request."""
    a, b = backends("a"), backends("b")
    process = await twistd_process(equalizer_config([a.url, b.url]), http)
    before = await backend_items(http, process.admin_url)
    with open(process.config_path) as f:
        valid = f.read()
    clients = SteadyClients(process.proxy_url, http)
    try:
        rewrite_backends(process.config_path, valid + "\nbalancer: [unclosed\n  - {\n")
        await sighup_and_wait_for(process, "reload refused")
        document = yaml.safe_load(valid)
        document["balancer"]["backends"] = [{"url": "ftp://x"}]
        rewrite_backends(process.config_path, yaml.safe_dump(document))
        await sighup_and_wait_for(process, "reload refused")
        counts = len(a.requests), len(b.requests)
        await clients.more(40)
    finally:
        results = await clients.stop()

    assert "balancer.backends[0].url" in process.output()
    assert "configuration reloaded" not in process.output()
    after = await backend_items(http, process.admin_url)
    assert [(i["id"], i["url"]) for i in after] == [(i["id"], i["url"]) for i in before]
    assert len(a.requests) > counts[0] and len(b.requests) > counts[1]
    assert [r for r in results if r[0] != 200] == []
    assert await reload_metrics(http, process.admin_url) == {"success": 0, "failure": 2,
                                                             "last": None}


async def connection_refused(port: int) -> bool:
    """Whether a new TCP connection to ``port`` on loopback is refused right now."""
    endpoint = TCP4ClientEndpoint(global_reactor, LOOPBACK, port, timeout=2)
    try:
        protocol = await within(endpoint.connect(Factory.forProtocol(Protocol)), 3)
    except ConnectionRefusedError:
        return True
    protocol.transport.abortConnection()
    return False


def assert_clean_sigterm_exit(process) -> None:
    """The child shut down in order and exited as twistd does after SIGTERM.

    twistd ends by re-raising the signal that stopped it (``twisted/scripts/twistd.py``,
    ``app._exitWithSignal``), so a clean exit after SIGTERM is "killed by SIGTERM" (143 in a
    shell), not 0; SPEC 7 asks for exactly twistd's behaviour.
    """
    output = process.output()
    assert process.process.returncode == -signal.SIGTERM, output
    assert "Server Shut Down." in output
    assert "Traceback" not in output, output


@pytest_twisted.ensureDeferred
async def test_sigterm_finishes_request_in_flight_then_exits_cleanly(http, backends,
                                                                     twistd_process):
    """SIGTERM during a 2 s request closes the listeners at once, lets that request finish with
    200, and then the process exits as twistd does (by SIGTERM, no traceback)."""
    finished: list = []
    slow = backends("slow", slow_path_handler(finished))
    process = await twistd_process(equalizer_config(
        [slow.url], proxy={"timeouts": {"shutdown": "20s"}}), http)
    alive_at_finish: list[bool] = []
    finished.append(lambda _: alive_at_finish.append(process.process.poll() is None))
    assert await fetch(http, process.proxy_url + "/") == (200, b"slow")

    request = http.get(process.proxy_url + "/slow")
    answered = settled(request)
    await wait_until(lambda: len(slow.requests) == 2, message="the slow request to arrive")
    os.kill(process.pid, signal.SIGTERM)
    await wait_until(lambda: connection_refused(process.proxy_port), timeout=SLOW_SECONDS / 2,
                     message="the proxy to refuse new connections")
    assert await connection_refused(process.admin_port)
    assert not answered

    response = await within(request, SLOW_SECONDS + 5)
    assert response.code == 200
    assert await within(treq.content(response)) == b"slow"
    assert alive_at_finish == [True]
    # Well before the 20 s bound: the process leaves as soon as nothing is in flight.
    await wait_until(lambda: process.process.poll() is not None, timeout=5,
                     message="twistd to exit")
    assert_clean_sigterm_exit(process)
    assert len(slow.requests) == 2


@pytest_twisted.ensureDeferred
async def test_sigterm_waits_no_longer_than_the_shutdown_timeout(http, backends, twistd_process):
    """SIGTERM with a request that never ends exits cleanly once proxy.timeouts.shutdown has
    passed, cutting that request off."""
    stuck = backends("stuck", lambda backend, request: server.NOT_DONE_YET)
    process = await twistd_process(equalizer_config(
        [stuck.url], proxy={"timeouts": {"shutdown": "1s", "response": "30s"}}), http)
    request = http.get(process.proxy_url + "/")
    await wait_until(lambda: stuck.requests, message="the request to arrive")
    signalled = global_reactor.seconds()
    os.kill(process.pid, signal.SIGTERM)
    await wait_until(lambda: process.process.poll() is not None, timeout=6,
                     message="twistd to exit after the shutdown timeout")
    assert global_reactor.seconds() - signalled >= 0.9
    assert_clean_sigterm_exit(process)
    try:
        response = await within(request, 5)
    except Exception:
        pass  # cut off: the connection closed without a response
    else:
        assert response.code != 200
    assert "still in flight" in process.output()
