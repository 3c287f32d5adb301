"""GET /metrics read back with prometheus_client's own parser, while traffic flows."""

from __future__ import annotations

import platform

import pytest
import pytest_twisted
import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.web import server

from equalizer import __version__
from tests.integration.buckets_support import store_ready
from tests.integration.harness import equalizer_config, free_port, get_json, wait_until, within

pytestmark = pytest.mark.usefixtures("no_logged_errors")


async def scrape(http, admin_url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics, keyed by (name, sorted labels)."""
    response = await within(http.get(admin_url + "/metrics"))
    assert response.code == 200
    assert response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain")
    text = (await within(treq.content(response))).decode("utf-8")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def proxy_get(http, url: str) -> int:
    response = await within(http.get(url))
    await within(treq.content(response))
    return response.code


@pytest_twisted.ensureDeferred
async def test_metrics_parse_and_follow_the_traffic(http, backends, equalizer):
    """Requests, durations, rate-limit decisions, health checks, retries and backend state
    appear in /metrics and change as requests go through."""
    good = backends("good")
    dead_url = f"http://127.0.0.1:{free_port()}"
    balancer = await equalizer(equalizer_config(
        [good.url, dead_url],
        proxy={"retries": 1},
        health={"interval": "100ms", "timeout": "1s", "unhealthy_threshold": 5},
        rate_limit={"enabled": True, "default": {"capacity": 3, "refill_rate": 0}},
    ))
    await wait_until(lambda: good.health_checks >= 1, message="a health check")
    await wait_until(lambda: balancer.backend(dead_url).health_checks["failed"] >= 1,
                     message="a failed health check of the dead backend")
    before = await scrape(http, balancer.admin_url)
    good_id = balancer.backend(good.url).id
    dead_id = balancer.backend(dead_url).id

    statuses = [await proxy_get(http, balancer.proxy_url + "/") for _ in range(5)]
    assert statuses == [200, 200, 200, 429, 429]

    after = await scrape(http, balancer.admin_url)

    def grew(name: str, labels: dict, by: float) -> None:
        key = (name, tuple(sorted(labels.items())))
        assert after[key] - before.get(key, 0.0) == by, (name, labels)

    grew("equalizer_requests_total", {"backend": good_id, "code": "200", "status_class": "2xx"},
         3)
    grew("equalizer_requests_total", {"backend": "none", "code": "429", "status_class": "4xx"},
         2)
    grew("equalizer_request_duration_seconds_count", {"backend": good_id}, 3)
    grew("equalizer_rate_limit_decisions_total", {"outcome": "allowed"}, 3)
    grew("equalizer_rate_limit_decisions_total", {"outcome": "limited"}, 2)
    assert after[("equalizer_backend_up", (("backend", good_id), ("url", good.url)))] == 1
    assert after[("equalizer_backend_in_flight", (("backend", good_id),))] == 0
    assert after[("equalizer_store_up", ())] == 1
    assert after[("equalizer_health_checks_total", (("backend", good_id), ("result", "ok")))] >= 1
    dead_checks = ("equalizer_health_checks_total", (("backend", dead_id), ("result", "failed")))
    assert after[dead_checks] >= 1
    # Round robin sent some of the three admitted requests to the dead backend first:
    # each was retried on the good one, and counted.
    assert after[("equalizer_retries_total", (("backend", dead_id), ("reason", "connect")))] >= 1
    assert after[("equalizer_backend_failures_total",
                  (("backend", dead_id), ("reason", "connect")))] >= 1
    assert after[("equalizer_build_info", (("python", platform.python_version()),
                                           ("version", __version__)))] == 1
    assert after[("process_open_fds", ())] > 0
    assert ("equalizer_client_connections", ()) in after
    key = ("equalizer_response_bytes_total", ())
    assert after[key] > before[key], "the bodies of three answers and two 429s were counted"
    buckets = [v for (name, labels), v in after.items()
               if name == "equalizer_request_duration_seconds_bucket"
               and dict(labels) == {"backend": good_id, "le": "+Inf"}]
    assert buckets == [after[("equalizer_request_duration_seconds_count",
                              (("backend", good_id),))]]


@pytest_twisted.ensureDeferred
async def test_lease_metrics_of_the_postgres_limiter(http, backends, equalizer, postgres_dsn):
    """With the postgres store, /metrics counts settlements, the keys they carried and the
    requests that waited for one: a new client waits once, then uses its allowance."""
    good = backends("good")
    balancer = await store_ready(await equalizer(equalizer_config(
        [good.url],
        rate_limit={"enabled": True, "default": {"capacity": 100, "refill_rate": 0},
                    "store": "postgres", "database_url": postgres_dsn},
    )), postgres_dsn)
    before = await scrape(http, balancer.admin_url)
    assert before[("equalizer_lease_keys", ())] == 0

    statuses = [await proxy_get(http, balancer.proxy_url + "/") for _ in range(3)]
    assert statuses == [200, 200, 200]

    after = await scrape(http, balancer.admin_url)
    waits = ("equalizer_lease_waits_total", ())
    assert after[waits] - before[waits] == 1
    assert after[("equalizer_lease_settlements_total", ())] >= 1
    assert after[("equalizer_lease_settled_keys_total", ())] >= 1
    assert after[("equalizer_lease_keys", ())] == 1
    statements = ("equalizer_database_query_duration_seconds_count", ())
    assert after[statements] > before[statements], "the settlement's statement was timed"


@pytest_twisted.ensureDeferred
async def test_no_lease_metrics_with_the_memory_store(http, backends, equalizer):
    """The lease families belong to the postgres store only."""
    balancer = await equalizer(equalizer_config(
        [backends("good").url], rate_limit={"enabled": True, "default": None}))
    samples = await scrape(http, balancer.admin_url)
    assert not [name for name, _ in samples if name.startswith("equalizer_lease_")]


def hold(held: list):
    """A handler that keeps every proxied request open, in ``held``, until the test ends it."""

    def handler(backend, request: server.Request) -> int:
        held.append((backend, request))
        return server.NOT_DONE_YET

    return handler


@pytest_twisted.ensureDeferred
async def test_backend_settings_and_uptime_as_in_stats(http, backends, equalizer):
    """/metrics has /stats' uptime and each backend's weight, enabled and draining (1/0)
    flags, labelled with backend and url."""
    held: list = []
    a, b, c = backends("a", hold(held)), backends("b"), backends("c", hold(held))
    balancer = await equalizer(equalizer_config([a.url, b.url, c.url]))
    admin = balancer.admin_url
    ids = {backend.url: balancer.backend(backend.url).id for backend in (a, b, c)}
    response = await within(http.put(f"{admin}/backends/{ids[b.url]}",
                                     json={"weight": 5, "enabled": False}))
    await within(treq.content(response))
    assert response.code == 200
    request = http.get(balancer.proxy_url + "/held")
    await wait_until(lambda: held, message="the request to be held")
    [(victim, held_request)] = held
    delete = http.delete(f"{admin}/backends/{ids[victim.url]}")
    await wait_until(lambda: balancer.backend(victim.url).draining, message="the drain")

    first = await scrape(http, admin)
    _, stats = await get_json(http, admin + "/stats")
    last = await scrape(http, admin)
    uptime = ("equalizer_uptime_seconds", ())
    assert 0 <= first[uptime] <= stats["uptime_seconds"] <= last[uptime]
    for backend in (a, b, c):
        labels = (("backend", ids[backend.url]), ("url", backend.url))
        settings = tuple(last[(name, labels)] for name in (
            "equalizer_backend_weight", "equalizer_backend_enabled", "equalizer_backend_draining"))
        expected = (5, 0, 0) if backend is b else (1, 1, 1 if backend is victim else 0)
        assert settings == expected, backend.name

    held_request.write(b"done")
    held_request.finish()
    assert (await within(request)).code == 200
    assert (await within(delete)).code == 204
