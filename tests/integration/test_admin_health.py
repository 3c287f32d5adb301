"""GET /health says what the proxy can serve: the backends that can take traffic now.

``healthy`` counts backends that are healthy, enabled and not draining (the
strategies' candidates); ``total`` every backend in the pool. ``down`` (503)
when none can take traffic, ``degraded`` when a backend meant to serve (enabled,
not draining) is unhealthy or the store is unreachable, ``ok`` otherwise.
"""

from __future__ import annotations

import json

import pytest
import pytest_twisted
import treq
from twisted.web import server

from tests.integration.harness import (
    equalizer_config,
    free_port,
    get_json,
    wait_until,
    within,
)

pytestmark = pytest.mark.usefixtures("no_logged_errors")


async def health(http, balancer) -> tuple[int, str, dict[str, int]]:
    status, body = await get_json(http, balancer.admin_url + "/health")
    return status, body["status"], body["backends"]


async def set_enabled(http, balancer, url: str, enabled: bool) -> None:
    backend_id = balancer.backend(url).id
    response = await within(http.put(f"{balancer.admin_url}/backends/{backend_id}",
                                     json={"enabled": enabled}))
    await within(treq.content(response))
    assert response.code == 200


async def proxied(http, balancer) -> tuple[int, bytes]:
    response = await within(http.get(balancer.proxy_url + "/"))
    return response.code, await within(treq.content(response))


@pytest_twisted.ensureDeferred
async def test_only_draining_backends_is_down_as_the_proxy_answers(http, backends, equalizer):
    """With its only backend draining, /health is 503 down, as the proxy answers 503
    no_healthy_backend; both serve again once the drain is over and the backend is back."""
    held: list[server.Request] = []

    def hold(backend, request: server.Request) -> int:
        held.append(request)
        return server.NOT_DONE_YET

    a = backends("a", hold)
    balancer = await equalizer(equalizer_config([a.url]))
    assert await health(http, balancer) == (200, "ok", {"healthy": 1, "total": 1})
    request = http.get(balancer.proxy_url + "/held")
    await wait_until(lambda: held, message="the request to be held")
    delete = http.delete(f"{balancer.admin_url}/backends/{balancer.backend(a.url).id}")
    await wait_until(lambda: balancer.backend(a.url).draining, message="the drain")

    assert await health(http, balancer) == (503, "down", {"healthy": 0, "total": 1})
    status, body = await proxied(http, balancer)
    assert (status, json.loads(body)["error"]["code"]) == (503, "no_healthy_backend")

    held[0].finish()
    assert (await within(request)).code == 200
    assert (await within(delete)).code == 204
    assert await health(http, balancer) == (503, "down", {"healthy": 0, "total": 0})


@pytest_twisted.ensureDeferred
async def test_a_disabled_backend_does_not_degrade(http, backends, equalizer):
    """A backend disabled on purpose is not counted healthy, and does not make /health
    degraded: the rest serve as intended."""
    a, b = backends("a"), backends("b")
    balancer = await equalizer(equalizer_config([a.url, b.url]))
    await set_enabled(http, balancer, b.url, False)
    assert await health(http, balancer) == (200, "ok", {"healthy": 1, "total": 2})
    await set_enabled(http, balancer, a.url, False)
    assert await health(http, balancer) == (503, "down", {"healthy": 0, "total": 2})
    assert (await proxied(http, balancer))[0] == 503


@pytest_twisted.ensureDeferred
async def test_an_unhealthy_backend_degrades_until_disabled(http, backends, equalizer):
    """An enabled backend failing its checks makes /health degraded; disabled, it no longer
    does."""
    good, dead_url = backends("good"), f"http://127.0.0.1:{free_port()}"
    balancer = await equalizer(equalizer_config(
        [good.url, dead_url],
        health={"interval": "100ms", "timeout": "1s", "unhealthy_threshold": 1}))
    await wait_until(lambda: not balancer.backend(dead_url).healthy, message="dead to be out")
    assert await health(http, balancer) == (200, "degraded", {"healthy": 1, "total": 2})
    await set_enabled(http, balancer, dead_url, False)
    assert await health(http, balancer) == (200, "ok", {"healthy": 1, "total": 2})
