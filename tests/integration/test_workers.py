"""Several worker processes (SPEC 9), against the real ``twistd -n equalizer``: the
workers share the proxy listener, the supervisor keeps the admin API, health checks,
the store and the log; for the operator it is one balancer."""

from __future__ import annotations

import os
import re
import signal
import time
import uuid

import pytest_twisted
import treq
import yaml
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred, FirstError, ensureDeferred, gatherResults
from twisted.internet.error import ConnectionRefusedError

from tests.integration.buckets_support import call, store_section
from tests.integration.harness import (
    LOOPBACK,
    ListeningEqualizer,
    equalizer_config,
    free_port,
    get_json,
    http_client,
    raw_request,
    wait_until,
    within,
)
from tests.integration.test_log_reopen import alive, start_daemon
from tests.integration.test_routes import hup_and_wait, write
from tests.integration.test_runtime_control import SLOW_SECONDS, slow_path_handler

GET = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def workers_config(backends, **sections) -> dict:
    document = equalizer_config([b.url for b in backends], **sections)
    document["proxy"]["workers"] = 2
    return document


async def workers_of(balancer, http) -> list[dict]:
    _, stats = await get_json(http, balancer.admin_url + "/stats")
    return stats["workers"]


def fresh_get(balancer, path: str = "/", headers: dict | None = None) -> Deferred:
    """One request on a connection of its own, so the kernel may pick any worker:
    fires with (status, body)."""
    return ensureDeferred(_fresh_get(balancer, path, headers))


async def _fresh_get(balancer, path: str, headers: dict | None):
    client, pool = http_client(persistent=False)
    try:
        response = await within(client.get(balancer.proxy_url + path, headers=headers))
        body = await within(treq.content(response))
        return response.code, body
    finally:
        await pool.closeCachedConnections()


async def until_both_served(balancer, http, path: str = "/",
                            bodies: list[bytes] | None = None) -> list[dict]:
    """Send requests to ``path`` until each worker has answered more than before (the
    kernel spreads them); every answer's body goes to ``bodies``."""
    before = [w["requests"] for w in await workers_of(balancer, http)]

    async def both() -> bool:
        try:
            answers = await gatherResults([fresh_get(balancer, path) for _ in range(8)],
                                          consumeErrors=True)
        except FirstError as error:  # the listener opens once the store is ready (SPEC 4.5)
            error.subFailure.trap(ConnectionRefusedError)
            return False
        if bodies is not None:
            bodies.extend(body for _, body in answers)
        workers = await workers_of(balancer, http)
        return all(w["requests"] > n for w, n in zip(workers, before, strict=True)) and workers

    return await wait_until(both, 20, interval=0.05, message="both workers to serve")


async def all_counted(balancer, http, servers, removed: bool = False) -> dict:
    """/stats once every request the ``servers`` had is in the workers' figures (and in
    its backends', unless some were ``removed``)."""
    async def counted() -> bool:
        _, stats = await get_json(http, balancer.admin_url + "/stats")
        sent = sum(len(server.requests) for server in servers)
        per_worker = sum(w["requests"] for w in stats["workers"])
        by_backend = per_worker if removed else sum(b["requests"] for b in stats["backends"])
        return stats["requests"]["total"] == per_worker == by_backend == sent and stats

    return await wait_until(counted, 10, interval=0.1, message="/stats to add up")


@pytest_twisted.ensureDeferred
async def test_both_workers_serve_and_stats_and_metrics_count_them_together(
        twistd_process, backends, http):
    one, two = backends("one"), backends("two")
    balancer = await twistd_process(workers_config([one, two]), http)
    workers = await until_both_served(balancer, http)
    assert len(workers) == 2 and len({w["pid"] for w in workers}) == 2
    assert balancer.pid not in {w["pid"] for w in workers}

    stats = await all_counted(balancer, http, [one, two])
    total = stats["requests"]["total"]
    response = await within(http.get(balancer.admin_url + "/metrics"))
    text = (await within(treq.content(response))).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    requests = sum(s.value for s in families["equalizer_requests"].samples
                   if s.name == "equalizer_requests_total" and "code" in s.labels)
    assert requests == total
    counts = [s.value for s in families["equalizer_request_duration_seconds"].samples
              if s.name.endswith("_count")]
    assert sum(counts) == total


@pytest_twisted.ensureDeferred
async def test_one_limit_across_workers(twistd_process, backends, http, store_kind, dsn):
    one = backends("one")
    capacity = 20
    balancer = await twistd_process(workers_config([one], rate_limit={
        "enabled": True, "key": "header:X-Client", **store_section(store_kind, dsn),
        "default": {"capacity": capacity, "refill_rate": 0}}), http)
    await until_both_served(balancer, http)
    client = f"c-{uuid.uuid4().hex}"
    answers = await gatherResults([
        fresh_get(balancer, headers={"X-Client": [client]}) for _ in range(3 * capacity)])
    admitted = sum(1 for code, _ in answers if code == 200)
    # Never more than the bucket; at most one lease (max(1, C // 10) tokens) per worker
    # may be left unused on the worker that did not get the last requests.
    assert capacity - 2 * max(1, capacity // 10) <= admitted <= capacity
    assert {code for code, _ in answers} == {200, 429}
    refused = {"client": client, "count": len(answers) - admitted, "error": 0}

    async def refusals_summed() -> bool:
        _, stats = await get_json(http, balancer.admin_url + "/stats")
        return refused in stats["limited_clients"]

    await wait_until(refusals_summed, 10, interval=0.1,
                     message="/stats to list the refusals of both workers")


@pytest_twisted.ensureDeferred
async def test_every_worker_routes_to_every_pool_and_hears_its_health(
        twistd_process, backends, http):
    """With two pools and a route, each worker sends the route's requests to the second
    pool and the others to ``default``; a health check failing in the second pool
    reaches every worker; /stats counts each pool's backends across workers."""
    web, api, api2 = backends("web"), backends("api"), backends("api2")
    document = workers_config([web], health={"interval": "200ms", "unhealthy_threshold": 1,
                                             "healthy_threshold": 1})
    document["pools"] = {"api": {"backends": [{"url": api.url}, {"url": api2.url}]}}
    document["routes"] = [{"match": {"path_prefix": "/api/"}, "pool": "api"}]
    balancer = await twistd_process(document, http)
    await until_both_served(balancer, http)
    await all_counted(balancer, http, [web])  # a worker's "more" below is the route's
    routed: list[bytes] = []
    await until_both_served(balancer, http, "/api/x", routed)
    assert set(routed) == {b"api", b"api2"}
    await all_counted(balancer, http, [web, api, api2])
    others: list[bytes] = []
    await until_both_served(balancer, http, "/x", others)
    assert set(others) == {b"web"}
    stats = await all_counted(balancer, http, [web, api, api2])
    by_url = {b["url"]: b for b in stats["backends"]}
    assert by_url[api.url]["pool"] == "api" and by_url[api.url]["requests"] == len(api.requests)
    assert by_url[api2.url]["requests"] == len(api2.requests)

    api2.health_status = 503

    async def api_only() -> bool:
        answers = await gatherResults([fresh_get(balancer, "/api/x") for _ in range(16)])
        return {body for _, body in answers} == {b"api"}

    await wait_until(api_only, 10, interval=0.05, message="api2 down everywhere")
    await all_counted(balancer, http, [web, api, api2])  # the counts before are settled
    after: list[bytes] = []
    await until_both_served(balancer, http, "/api/x", after)
    assert set(after) == {b"api"}


@pytest_twisted.ensureDeferred
async def test_reloads_and_drains_of_named_pools_reach_every_worker(
        twistd_process, backends, http):
    """SIGHUP adding a pool and its route: both workers send the route there; removing
    the backend of a named pool through the API drains it on every worker; SIGHUP
    dropping the pool and route: its requests go to ``default`` again."""
    web, new, extra = backends("web"), backends("new"), backends("extra")
    document = workers_config([web])
    balancer = await twistd_process(document, http)
    await until_both_served(balancer, http)
    document["pools"] = {"new": {"backends": [{"url": new.url}, {"url": extra.url}]}}
    document["routes"] = [{"match": {"path_prefix": "/new/"}, "pool": "new"}]
    write(balancer.config_path, document)
    await hup_and_wait(balancer, "configuration reloaded")

    async def settled_then_both(path: str, removed: bool = True) -> set[bytes]:
        await all_counted(balancer, http, [web, new, extra], removed)
        bodies: list[bytes] = []
        await until_both_served(balancer, http, path, bodies)
        return set(bodies)

    await wait_until(lambda: gatherResults([fresh_get(balancer, "/new/x") for _ in range(8)])
                     .addCallback(lambda answers: {b for _, b in answers} == {b"new", b"extra"}),
                     10, interval=0.05, message="every worker to route to the new pool")
    assert await settled_then_both("/new/x", removed=False) == {b"new", b"extra"}
    stats = (await get_json(http, balancer.admin_url + "/stats"))[1]
    extra_id = {b["url"]: b["id"] for b in stats["backends"]}[extra.url]
    reply = await call(http, "DELETE", balancer.admin_url + f"/backends/{extra_id}")
    assert reply.status == 204
    assert await settled_then_both("/new/x") == {b"new"}
    del document["pools"], document["routes"]
    write(balancer.config_path, document)
    await hup_and_wait(balancer, "configuration reloaded")
    await wait_until(lambda: gatherResults([fresh_get(balancer, "/new/x") for _ in range(8)])
                     .addCallback(lambda answers: {b for _, b in answers} == {b"web"}),
                     10, interval=0.05, message="every worker to drop the pool")
    assert await settled_then_both("/new/x") == {b"web"}
    assert "Traceback" not in balancer.output()


@pytest_twisted.ensureDeferred
async def test_a_route_policy_is_one_limit_across_workers(twistd_process, backends, http):
    """A route's rate-limit policy counts its buckets (keyed by policy and client) on the
    supervisor's store: both workers together admit about its capacity, while the
    default policy elsewhere is untouched."""
    one = backends("one")
    capacity = 20
    document = workers_config([one], rate_limit={
        "enabled": True, "key": "header:X-Client",
        "default": {"capacity": 1000, "refill_rate": 0},
        "policies": {"tight": {"default": {"capacity": capacity, "refill_rate": 0}}}})
    document["routes"] = [{"match": {"path_prefix": "/tight/"}, "rate_limit": "tight"}]
    balancer = await twistd_process(document, http)
    await until_both_served(balancer, http)
    client = f"c-{uuid.uuid4().hex}"
    answers = await gatherResults([
        fresh_get(balancer, "/tight/x", headers={"X-Client": [client]})
        for _ in range(3 * capacity)])
    admitted = sum(1 for code, _ in answers if code == 200)
    # As for the default policy: at most one lease per worker may be left unused.
    assert capacity - 2 * max(1, capacity // 10) <= admitted <= capacity
    assert {code for code, _ in answers} == {200, 429}
    elsewhere = await gatherResults([
        fresh_get(balancer, "/x", headers={"X-Client": [client]}) for _ in range(16)])
    assert {code for code, _ in elsewhere} == {200}
    bucket = await call(http, "GET", balancer.admin_url + f"/buckets/{client}?policy=tight")
    assert bucket.status == 200 and bucket.json["capacity"] == capacity


@pytest_twisted.ensureDeferred
async def test_admin_changes_and_health_results_reach_every_worker(
        twistd_process, backends, http):
    one, two = backends("one"), backends("two")
    balancer = await twistd_process(workers_config(
        [one, two], health={"interval": "200ms", "unhealthy_threshold": 1,
                            "healthy_threshold": 1}), http)
    await until_both_served(balancer, http)
    reply = await call(http, "PUT", balancer.admin_url + "/backends/b1", {"enabled": False})
    assert reply.status == 200

    async def only(name: bytes) -> bool:
        answers = await gatherResults([fresh_get(balancer) for _ in range(16)])
        return {body for _, body in answers} == {name}

    await wait_until(lambda: only(b"two"), 10, interval=0.05, message="b1 off everywhere")
    await call(http, "PUT", balancer.admin_url + "/backends/b1", {"enabled": True})
    two.health_status = 503
    await wait_until(lambda: only(b"one"), 10, interval=0.05, message="b2 down everywhere")
    await until_both_served(balancer, http)
    assert {body for _, body in await gatherResults(
        [fresh_get(balancer) for _ in range(16)])} == {b"one"}


@pytest_twisted.ensureDeferred
async def test_a_drain_waits_for_requests_in_flight_on_every_worker(
        twistd_process, backends, http):
    finished: list = []
    slow = backends("slow", slow_path_handler([finished.append]))
    balancer = await twistd_process(workers_config([slow]), http)
    await until_both_served(balancer, http)
    in_flight = gatherResults([fresh_get(balancer, "/slow") for _ in range(6)])
    await wait_until(lambda: sum(1 for r in slow.requests if r.uri == b"/slow") == 6, 10,
                     message="the slow requests to reach the backend")
    workers = await workers_of(balancer, http)
    reply = await call(http, "DELETE", balancer.admin_url + "/backends/b1",
                       timeout=SLOW_SECONDS + 10)
    assert reply.status == 204
    assert len(finished) == 6  # answered only once every worker's requests had finished
    assert [code for code, _ in await in_flight] == [200] * 6
    assert all(w["pid"] for w in workers)


@pytest_twisted.ensureDeferred
async def test_access_log_has_whole_lines_from_every_worker(
        twistd_process, backends, http, tmp_path):
    one = backends("one")
    log_file = tmp_path / "equalizer.log"
    balancer = await twistd_process(workers_config(
        [one], logging={"access_log": True, "file": str(log_file)}), http)
    await until_both_served(balancer, http)
    await gatherResults([fresh_get(balancer, f"/n/{i}") for i in range(200)])
    await balancer.stop()
    lines = log_file.read_text().splitlines()
    access = [line for line in lines if "[equalizer.access]" in line]
    shape = re.compile(r'^\S+Z \[info\] \[equalizer\.access\] 127\.0\.0\.1 "GET (/\S*)" 200 '
                       r'\d+ [\d.]+ms upstream_addr="127\.0\.0\.1:\d+" backend=b1 '
                       r'request_id=[0-9a-f]+ rate_limit=\w+$')
    assert all(shape.match(line) for line in access), [x for x in access if not shape.match(x)]
    paths = {shape.match(line).group(1) for line in access}
    assert {f"/n/{i}" for i in range(200)} <= paths
    assert all(line[:4].isdigit() for line in lines)  # no line cut into another


@pytest_twisted.ensureDeferred
async def test_a_killed_worker_is_replaced_and_the_others_keep_serving(
        twistd_process, backends, http):
    one = backends("one")
    balancer = await twistd_process(workers_config([one]), http)
    workers = await until_both_served(balancer, http)
    victim = workers[0]["pid"]
    killed = time.monotonic()
    os.kill(victim, signal.SIGKILL)

    async def replaced() -> bool:
        now = await workers_of(balancer, http)
        return now[0]["pid"] not in (None, victim) and now[0]["restarts"] == 1 and now

    now = await wait_until(replaced, 10, interval=0.02, message="the worker's replacement")
    assert time.monotonic() - killed < 5  # within 1 s on an idle machine
    assert now[1]["pid"] == workers[1]["pid"]
    await until_both_served(balancer, http)
    assert f"(pid {victim}) ended" in balancer.output()


@pytest_twisted.ensureDeferred
async def test_a_replaced_worker_runs_the_supervisors_configuration_not_the_file(
        twistd_process, backends, http):
    """The file is edited (another backend, a route to a new pool) but not reloaded, then
    a worker dies: its replacement serves what the supervisor runs, not the edit."""
    web, edited = backends("web"), backends("edited")
    document = workers_config([web])
    balancer = await twistd_process(document, http)
    workers = await until_both_served(balancer, http)
    write(balancer.config_path, {
        **workers_config([edited]),
        "pools": {"new": {"backends": [{"url": edited.url}]}},
        "routes": [{"match": {"path_prefix": "/new/"}, "pool": "new"}]})
    os.kill(workers[0]["pid"], signal.SIGKILL)

    async def replaced() -> bool:
        now = await workers_of(balancer, http)
        return now[0]["pid"] not in (None, workers[0]["pid"]) and now

    await wait_until(replaced, 10, interval=0.02, message="the worker's replacement")
    bodies: list[bytes] = []
    await until_both_served(balancer, http, "/new/x", bodies)
    assert set(bodies) == {b"web"} and not edited.requests
    assert "Traceback" not in balancer.output()


@pytest_twisted.ensureDeferred
async def test_sigterm_drains_every_worker_then_exits(twistd_process, backends, http):
    slow = backends("slow", slow_path_handler([]))
    balancer = await twistd_process(workers_config(
        [slow], proxy={"timeouts": {"shutdown": "10s"}}), http)
    workers = await until_both_served(balancer, http)
    in_flight = fresh_get(balancer, "/slow")
    await wait_until(lambda: any(r.uri == b"/slow" for r in slow.requests), 10,
                     message="the slow request to reach the backend")
    os.kill(balancer.pid, signal.SIGTERM)
    code, body = await within(in_flight, SLOW_SECONDS + 10)
    assert (code, body) == (200, b"slow")
    await wait_until(lambda: balancer.process.poll() is not None, 15, message="exit")
    assert balancer.process.returncode == -signal.SIGTERM  # as twistd exits after SIGTERM
    assert not any(alive(w["pid"]) for w in workers)


@pytest_twisted.ensureDeferred
async def test_no_worker_serves_after_the_supervisor_is_killed(twistd_process, backends, http):
    one = backends("one")
    balancer = await twistd_process(workers_config([one]), http)
    workers = await until_both_served(balancer, http)
    os.kill(balancer.pid, signal.SIGKILL)
    killed = time.monotonic()
    await wait_until(lambda: not any(alive(w["pid"]) for w in workers), 10, interval=0.02,
                     message="the workers to exit")
    assert time.monotonic() - killed < 2
    try:
        answer = await raw_request(balancer.proxy_port, GET, timeout=2)
    except Exception:
        answer = b""
    assert answer == b""  # refused: nothing listens any more


@pytest_twisted.ensureDeferred
async def test_a_daemon_with_workers_reloads_them_all_on_sighup(tmp_path, http, backends):
    """``twistd equalizer`` daemonized runs its workers; SIGHUP reaches each of them (here:
    rate-limit headers turned off); SIGTERM by the pidfile's PID stops them all."""
    admin_port, proxy_port = free_port(), free_port()
    document = workers_config(
        [backends("one")], rate_limit={"enabled": True, "headers": "both"},
        proxy={"listen": f"tcp:{proxy_port}:interface={LOOPBACK}"},
        admin={"listen": f"tcp:{admin_port}:interface={LOOPBACK}"})
    balancer = ListeningEqualizer()
    balancer.proxy_port, balancer.admin_port = proxy_port, admin_port
    pid = start_daemon(tmp_path, document)
    try:
        await wait_until(lambda: "serving" in (tmp_path / "eq.log").read_text(), 20,
                         message="a worker serving")
        workers = await until_both_served(balancer, http)
        assert all(alive(w["pid"]) for w in workers)

        async def limit_headers() -> set[bool]:
            client, pool = http_client(persistent=False)
            try:
                responses = await gatherResults([within(client.get(balancer.proxy_url))
                                                 for _ in range(16)])
                for response in responses:
                    await within(treq.content(response))
                return {response.headers.hasHeader(b"RateLimit-Limit")
                        for response in responses}
            finally:
                await pool.closeCachedConnections()

        assert await limit_headers() == {True}
        document["rate_limit"]["headers"] = "none"
        (tmp_path / "equalizer.yml").write_text(yaml.safe_dump(document))
        os.kill(pid, signal.SIGHUP)
        await wait_until(lambda: ensureDeferred(limit_headers()).addCallback(
            lambda seen: seen == {False}), 10, interval=0.05, message="every worker reloaded")
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGTERM)
    await wait_until(lambda: not alive(pid), 15, message="the daemon to exit")
    assert not any(alive(w["pid"]) for w in workers)
    assert not (tmp_path / "twistd.pid").exists()
    assert "Traceback" not in (tmp_path / "eq.log").read_text()
