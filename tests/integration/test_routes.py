"""Routes, pools and rate-limit policies through the real service (SPEC 8): each match
condition, first-match order, the default pool and ``no_route``, ``strip_prefix``, header
rewriting both ways, per-route policies on both stores, pools in the admin API, SIGHUP
reload and configuration errors."""

from __future__ import annotations

import json
import os
import signal
from typing import Any

import pytest
import pytest_twisted
import treq
import yaml
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import ensureDeferred

from tests.integration.buckets_support import call, store_ready, store_section
from tests.integration.harness import (
    EqualizerProcess,
    equalizer_config,
    get_json,
    parse_response,
    raw_request,
    wait_until,
    within,
)

pytestmark = pytest.mark.usefixtures("no_logged_errors")


async def send(balancer, path: str = "/", *, method: str = "GET", host: str = "example.com",
               headers: dict[str, str] | None = None):
    """One request over a raw connection (so Host is exactly what the test says)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: close",
             *(f"{name}: {value}" for name, value in (headers or {}).items())]
    raw = await raw_request(balancer.proxy_port, ("\r\n".join(lines) + "\r\n\r\n").encode())
    return parse_response(raw)


def routed(backends: dict[str, str], routes: list[dict], default: list[str] | None = None,
           **sections: Any) -> dict:
    """A document with one pool per entry of ``backends`` (name: URL) and ``routes``."""
    document = equalizer_config(default if default is not None else [], **sections)
    document["pools"] = {name: {"backends": [{"url": url}]} for name, url in backends.items()}
    document["routes"] = routes
    return document


@pytest_twisted.ensureDeferred
async def test_each_match_condition_and_first_match_wins(backends, equalizer):
    """Host (exact and wildcard, any case, port ignored), path prefix, method and header
    value each pick their route; of two that match, the first listed wins."""
    names = ["exact", "wild", "path", "method", "header", "first", "second", "fallback"]
    servers = {name: backends(name) for name in names}
    balancer = await equalizer(routed(
        {name: server.url for name, server in servers.items() if name != "fallback"},
        [{"match": {"host": "API.example.com"}, "pool": "exact"},
         {"match": {"host": "*.example.org"}, "pool": "wild"},
         {"match": {"path_prefix": "/static/"}, "pool": "path"},
         {"match": {"methods": ["DELETE", "PATCH"]}, "pool": "method"},
         {"match": {"headers": {"X-Canary": "1"}}, "pool": "header"},
         {"match": {"path_prefix": "/both/"}, "pool": "first"},
         {"match": {"path_prefix": "/both/more"}, "pool": "second"}],
        default=[servers["fallback"].url]))

    async def body(*args: Any, **kwargs: Any) -> bytes:
        reply = await send(balancer, *args, **kwargs)
        assert reply.status == 200
        return reply.body

    assert await body(host="api.EXAMPLE.com:8080") == b"exact"
    assert await body(host="api.example.com.evil") == b"fallback"
    assert await body(host="a.b.Example.org") == b"wild"
    assert await body(host="example.org") == b"fallback"  # *.suffix needs a label before it
    assert await body("/static/app.js") == b"path"
    assert await body("/stat") == b"fallback"
    assert await body(method="DELETE") == b"method"
    assert await body(method="GET") == b"fallback"
    assert await body(headers={"X-Canary": "1"}) == b"header"
    assert await body(headers={"X-Canary": "2"}) == b"fallback"
    assert await body("/both/more/x") == b"first"
    assert servers["second"].requests == []


@pytest_twisted.ensureDeferred
async def test_every_condition_of_a_route_must_hold(backends, equalizer):
    """A route with host, path, methods and a header matches only when all of them do."""
    api, web = backends("api"), backends("web")
    balancer = await equalizer(routed({"api": api.url}, [{
        "match": {"host": "api.example.com", "path_prefix": "/v1/", "methods": ["POST"],
                  "headers": {"X-Tenant": "acme"}},
        "pool": "api"}], default=[web.url]))
    full = {"path": "/v1/x", "method": "POST", "host": "api.example.com",
            "headers": {"X-Tenant": "acme"}}
    assert (await send(balancer, **full)).body == b"api"
    for change in ({"path": "/v2/x"}, {"method": "PUT"}, {"host": "web.example.com"},
                   {"headers": {"X-Tenant": "other"}}, {"headers": {}}):
        assert (await send(balancer, **{**full, **change})).body == b"web", change


@pytest_twisted.ensureDeferred
async def test_no_match_goes_to_the_default_pool_or_is_404_no_route(backends, equalizer):
    """Without a match the default pool serves; with no default backends it is a 404
    ``no_route`` in the proxy's JSON error shape."""
    api, web = backends("api"), backends("web")
    with_default = await equalizer(routed({"api": api.url},
                                          [{"match": {"path_prefix": "/api/"}, "pool": "api"}],
                                          default=[web.url]))
    assert (await send(with_default, "/other")).body == b"web"
    without = await equalizer(routed({"api": api.url},
                                     [{"match": {"path_prefix": "/api/"}, "pool": "api"}]))
    reply = await send(without, "/other")
    assert reply.status == 404
    assert json.loads(reply.body)["error"]["code"] == "no_route"
    assert (await send(without, "/api/x")).body == b"api"


@pytest_twisted.ensureDeferred
async def test_strip_prefix_gives_the_backend_a_path_starting_with_a_slash(backends, equalizer):
    """``strip_prefix`` removes the matched prefix; what is left always starts with ``/``
    and keeps its query; without it the path goes unchanged."""
    api, plain = backends("api"), backends("plain")
    balancer = await equalizer(routed({"api": api.url, "plain": plain.url}, [
        {"match": {"path_prefix": "/v1/"}, "pool": "api", "strip_prefix": True},
        {"match": {"path_prefix": "/v2"}, "pool": "api", "strip_prefix": True},
        {"match": {"path_prefix": "/keep/"}, "pool": "plain"}]))
    for path in ("/v1/users?page=2", "/v1/", "/v2", "/v2?x=1", "/v2/a/b"):
        assert (await send(balancer, path)).status == 200
    assert [r.uri for r in api.requests] == [b"/users?page=2", b"/", b"/", b"/?x=1", b"/a/b"]
    await send(balancer, "/keep/it")
    assert plain.requests[-1].uri == b"/keep/it"


@pytest_twisted.ensureDeferred
async def test_headers_are_set_and_removed_both_ways(backends, equalizer):
    """A route sets and removes request fields on the way in and response fields on the
    way out; other routes' requests are untouched."""
    api, web = backends("api"), backends("web")
    balancer = await equalizer(routed({"api": api.url}, [{
        "match": {"path_prefix": "/api/"}, "pool": "api",
        "request_headers": {"set": {"X-Env": "prod"}, "remove": ["X-Debug"]},
        "response_headers": {"set": {"Cache-Control": "no-store"}, "remove": ["X-Backend"]},
    }], default=[web.url]))
    reply = await send(balancer, "/api/x", headers={"X-Debug": "1", "X-Env": "dev"})
    seen = api.requests[-1]
    assert (seen.header(b"x-env"), seen.header(b"x-debug")) == ([b"prod"], [])
    assert reply.header(b"cache-control") == [b"no-store"]
    assert reply.header(b"x-backend") == []
    other = await send(balancer, "/web", headers={"X-Debug": "1"})
    assert web.requests[-1].header(b"x-debug") == [b"1"]
    assert other.header(b"x-backend") == [b"web"] and other.header(b"cache-control") == []


@pytest_twisted.ensureDeferred
async def test_routes_pick_their_rate_limit_policy(backends, equalizer, http, store_kind, dsn):
    """A limited route counts under its own policy and names it in the RateLimit fields; a
    route with ``rate_limit: null`` is not limited; a bucket created through the API
    under a header-keyed policy limits that key on its route only."""
    app = backends("app")
    document = equalizer_config([app.url], rate_limit={
        "enabled": True, "default": {"capacity": 100, "refill_rate": 0},
        **store_section(store_kind, dsn),
        "policies": {"tight": {"default": {"capacity": 2, "refill_rate": 0}},
                     "keyed": {"key": "header:X-API-Key"}}})
    document["routes"] = [
        {"match": {"path_prefix": "/tight/"}, "rate_limit": "tight"},
        {"match": {"path_prefix": "/free/"}, "rate_limit": None},
        {"match": {"path_prefix": "/keyed/"}, "rate_limit": "keyed"}]
    balancer = await store_ready(await equalizer(document), dsn)

    tight = [await send(balancer, "/tight/x") for _ in range(3)]
    assert [r.status for r in tight] == [200, 200, 429]
    assert tight[0].header(b"ratelimit-policy")[0].startswith(b'"tight";q=2')
    assert tight[0].header(b"ratelimit")[0].startswith(b'"tight";r=1')
    free = [await send(balancer, "/free/x") for _ in range(4)]
    assert {r.status for r in free} == {200}
    assert all(not r.header(b"ratelimit-policy") for r in free)
    other = await send(balancer, "/elsewhere")  # no route: the default policy, untouched
    assert other.header(b"ratelimit")[0].startswith(b'"default";r=99')

    created = await call(http, "POST", balancer.admin_url + "/buckets", {
        "policy": "keyed", "client_id": "k1", "capacity": 1, "refill_rate": 0})
    assert created.status == 201 and created.json["policy"] == "keyed"
    assert created.header("location") == ["/buckets/k1?policy=keyed"]
    keyed = [await send(balancer, "/keyed/x", headers={"X-API-Key": "k1"}) for _ in range(2)]
    assert [r.status for r in keyed] == [200, 429]
    listed = (await get_json(http, balancer.admin_url + "/buckets?policy=keyed"))[1]
    assert [(b["policy"], b["client_id"], b["tokens"]) for b in listed["items"]] == [
        ("keyed", "k1", 0.0)]
    tight_bucket = await call(http, "GET", balancer.admin_url + "/buckets/127.0.0.1?policy=tight")
    assert tight_bucket.status == 200 and tight_bucket.json["capacity"] == 2
    default_list = (await get_json(http, balancer.admin_url + "/buckets"))[1]
    assert {b["policy"] for b in default_list["items"]} == {"default"}
    unknown = await call(http, "GET", balancer.admin_url + "/buckets?policy=nope")
    assert unknown.status == 404 and "unknown policy" in unknown.error["message"]
    deleted = await call(http, "DELETE", balancer.admin_url + "/buckets/k1?policy=keyed")
    assert deleted.status == 204


@pytest_twisted.ensureDeferred
async def test_pools_in_the_admin_api(backends, equalizer, http):
    """GET /pools lists each pool with its backends; backends carry their pool in
    /backends and /stats; POST /backends adds to a named pool, which then serves its
    route; /metrics labels per-backend series with the pool."""
    api, web, extra = backends("api"), backends("web"), backends("extra")
    balancer = await equalizer(routed(
        {"api": api.url}, [{"match": {"path_prefix": "/api/"}, "pool": "api"}],
        default=[web.url]))
    pools = (await get_json(http, balancer.admin_url + "/pools"))[1]
    assert [(p["name"], [b["url"] for b in p["backends"]]) for p in pools["items"]] == [
        ("default", [web.url]), ("api", [api.url])]
    listed = (await get_json(http, balancer.admin_url + "/backends"))[1]
    assert {b["url"]: b["pool"] for b in listed["items"]} == {web.url: "default", api.url: "api"}

    added = await call(http, "POST", balancer.admin_url + "/backends",
                       {"url": extra.url, "pool": "api"})
    assert added.status == 201 and added.json["pool"] == "api"
    refused = await call(http, "POST", balancer.admin_url + "/backends",
                         {"url": extra.url, "pool": "nope"})
    assert refused.status == 404 and "unknown pool 'nope'" in refused.error["message"]
    for _ in range(4):
        await send(balancer, "/api/x")
    assert len(extra.requests) == 2 and web.requests == []

    stats = (await get_json(http, balancer.admin_url + "/stats"))[1]
    assert {b["url"]: b["pool"] for b in stats["backends"]}[extra.url] == "api"
    assert [p["name"] for p in stats["pools"]] == ["default", "api"]
    assert stats["routes"] == [{"match": {"path_prefix": "/api/"}, "pool": "api",
                                "rate_limit": "default", "strip_prefix": False}]
    text = (await within(treq.content(await within(http.get(
        balancer.admin_url + "/metrics"))))).decode()
    pools_of = {sample.labels["backend"]: sample.labels["pool"]
                for family in text_string_to_metric_families(text)
                for sample in family.samples if sample.name == "equalizer_backend_up"}
    assert pools_of == {b["id"]: b["pool"] for b in stats["backends"]}
    assert pools_of[added.json["id"]] == "api"


@pytest_twisted.ensureDeferred
async def test_pool_health_overrides_the_top_level_health(backends, equalizer):
    """A pool's ``health`` keys lay over the top-level ones: its backends are checked on
    its own path, and an unhealthy one there leaves its pool only."""
    api, web = backends("api"), backends("web")
    document = routed({"api": api.url}, [{"match": {"path_prefix": "/api/"}, "pool": "api"}],
                      default=[web.url], health={"interval": "50ms", "path": "/_health",
                                                 "unhealthy_threshold": 1})
    document["pools"]["api"]["health"] = {"path": "/_api_health"}
    api.health_status = 503
    balancer = await equalizer(document)
    await wait_until(lambda: api.health_checks >= 1 and web.health_checks >= 1,
                     message="checks of both pools")
    service = balancer.service
    api_backend = service.named_pools.units["api"].pool.backends[0]
    await wait_until(lambda: not api_backend.healthy, message="api marked down")
    assert (await send(balancer, "/api/x")).status == 503
    assert (await send(balancer, "/x")).body == b"web"


def write(path: str, document: dict) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(document, f)


async def hup_and_wait(process, line: str) -> None:
    before = process.output().count(line)
    os.kill(process.pid, signal.SIGHUP)
    await wait_until(lambda: process.output().count(line) > before,
                     message=f"log line {line!r} after SIGHUP")


@pytest_twisted.ensureDeferred
async def test_sighup_reloads_pools_routes_and_policies_without_failed_requests(
        http, backends, twistd_process):
    """While a client requests without pause, SIGHUP moves a route to a new pool, then
    drops that pool and its route: every request is answered 200; a reload naming an
    unknown pool is refused with the key path in the log and changes nothing."""
    old, new, web = backends("old"), backends("new"), backends("web")
    document = routed({"old": old.url}, [{"match": {"path_prefix": "/api/"}, "pool": "old"}],
                      default=[web.url])
    process = await twistd_process(document, http)
    statuses: list[int] = []
    running = True

    async def client() -> None:
        while running and len(statuses) < 2000:
            response = await within(http.get(process.proxy_url + "/api/x"))
            await within(treq.content(response))
            statuses.append(response.code)

    loop = ensureDeferred(client())
    try:
        await wait_until(lambda: len(old.requests) >= 5, message="traffic to old")
        document["pools"]["new"] = {"backends": [{"url": new.url}]}
        document["routes"][0]["pool"] = "new"
        write(process.config_path, document)
        await hup_and_wait(process, "configuration reloaded")
        await wait_until(lambda: len(new.requests) >= 5, message="traffic to new")

        broken = {**document, "routes": [{"match": {"path_prefix": "/api/"}, "pool": "gone"}]}
        write(process.config_path, broken)
        await hup_and_wait(process, "reload refused")
        assert "routes[0].pool: unknown pool 'gone'" in process.output()
        count = len(new.requests)
        await wait_until(lambda: len(new.requests) >= count + 5, message="new still serving")

        document["routes"] = []
        del document["pools"]["new"]
        write(process.config_path, document)
        await hup_and_wait(process, "configuration reloaded")
        count = len(web.requests)
        await wait_until(lambda: len(web.requests) >= count + 5, message="default serving")
    finally:
        running = False
        await within(loop, 15)
    assert statuses and set(statuses) == {200}
    pools = (await get_json(http, process.admin_url + "/pools"))[1]
    assert [p["name"] for p in pools["items"]] == ["default", "old"]


@pytest_twisted.ensureDeferred
async def test_a_route_naming_an_unknown_pool_or_policy_stops_start_up(tmp_path):
    """twistd refuses to start, naming each key path, with exit status 1."""
    document = equalizer_config(["http://127.0.0.1:9"])
    document["routes"] = [{"pool": "nope"}, {"rate_limit": "missing"}]
    process = EqualizerProcess(document, str(tmp_path))
    process.launch()
    await wait_until(lambda: process.process.poll() is not None, message="twistd to exit")
    assert process.process.returncode == 1
    assert "routes[0].pool: unknown pool 'nope'" in process.output()
    assert "routes[1].rate_limit: unknown policy 'missing'" in process.output()


def failing(backend, request) -> bytes:
    request.setResponseCode(500)
    return backend.name.encode()


@pytest_twisted.ensureDeferred
async def test_traffic_management_works_per_pool(backends, equalizer, http):
    """Outlier detection of a named pool ejects its failing backend (its own settings, not
    the default pool's), and its requests then go to the pool's other backend; the
    default pool is untouched."""
    good, bad, web = backends("good"), backends("bad", failing), backends("web")
    document = routed({}, [{"match": {"path_prefix": "/api/"}, "pool": "api"}],
                      default=[web.url])
    document["pools"]["api"] = {
        "backends": [{"url": good.url}, {"url": bad.url}],
        "health": {"outlier": {"consecutive_5xx": 2, "base_ejection": "60s"}}}
    balancer = await equalizer(document)
    statuses = [(await send(balancer, "/api/x")).status for _ in range(8)]
    assert statuses.count(500) == 2  # then ejected: the rest go to the good backend
    assert statuses[-4:] == [200] * 4
    pools = (await get_json(http, balancer.admin_url + "/pools"))[1]
    api = {b["url"]: b for b in pools["items"][1]["backends"]}
    assert api[bad.url]["ejected_until"] is not None and api[bad.url]["ejections"] == 1
    assert all(b["ejections"] == 0 for b in pools["items"][0]["backends"])
