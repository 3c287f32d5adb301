"""Bucket state stays bounded through the proxy: 20,000 client keys come and go (issue 13).

Clients are told apart by ``X-API-Key``; each key sends one request, through
pipelined raw connections so that 20,000 requests take seconds. The default
policy refills a spent token within a fraction of a second and its refill window
(so the sweep interval, ``equalizer.stores.sweep_interval``) is 1 s, so the
tests wait on the sweep by polling ``/stats`` or the table. Buckets that must
stay: one made through the admin API, and a default bucket partly spent that
never refills (made under a default with refill rate 0, before a reload on the
memory store; given refill rate 0 in its row on PostgreSQL).
"""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest
import pytest_twisted
import yaml
from treq.client import HTTPClient
from twisted.internet.defer import ensureDeferred, gatherResults

from tests.integration.buckets_support import Admin, store_ready, store_section
from tests.integration.harness import (
    equalizer_config,
    get_json,
    raw_connect,
    wait_until,
    within,
)
from tests.postgres import sql

pytestmark = pytest.mark.usefixtures("no_logged_errors")

KEYS = 20_000
CONNECTIONS = 20
QUICK = {"capacity": 2, "refill_rate": 4}  # one spent token is back in 0.25 s; window 1 s
MIB = 1024


async def flood(port: int, keys: list[str], connections: int = CONNECTIONS) -> dict[int, int]:
    """One GET per key, pipelined over ``connections`` raw connections; the count of each
    status answered."""

    async def one(chunk: list[str]) -> bytes:
        client = await raw_connect(port)
        heads = [b"GET /k HTTP/1.1\r\nHost: h\r\nX-API-Key: %s\r\n\r\n" % key.encode()
                 for key in chunk[:-1]]
        heads.append(b"GET /k HTTP/1.1\r\nHost: h\r\nX-API-Key: %s\r\nConnection: close\r\n\r\n"
                     % chunk[-1].encode())
        client.send(b"".join(heads))
        return await client.wait_closed(120)

    chunks = [keys[i::connections] for i in range(connections) if keys[i::connections]]
    answers = await within(gatherResults([ensureDeferred(one(chunk)) for chunk in chunks],
                                         consumeErrors=True), 180)
    counts: dict[int, int] = {}
    for raw in answers:
        for part in raw.split(b"HTTP/1.1 ")[1:]:
            status = int(part[:3])
            counts[status] = counts.get(status, 0) + 1
    return counts


async def buckets_stats(http: HTTPClient, admin_url: str) -> dict[str, Any]:
    status, body = await get_json(http, admin_url + "/stats")
    assert status == 200, body
    return body["buckets"]


async def held_at_most(http: HTTPClient, admin_url: str, count: int) -> bool:
    held = (await buckets_stats(http, admin_url))["held"]
    return held is not None and held <= count


def limited_by_key(**sections: dict) -> dict[str, Any]:
    return {"enabled": True, "key": "header:X-API-Key", "default": QUICK, **sections}


# -- memory store, in a twistd child whose memory is its own -----------------------------------


@pytest_twisted.ensureDeferred
async def test_memory_store_forgets_20000_keys_and_keeps_what_matters(http, backends,
                                                                      twistd_process):
    """20,000 keys through a twistd balancer on the memory store: once their buckets are full
    again the sweep forgets them (count back to the two that matter, RSS growth under 5 MiB),
    while an API bucket and a partly spent default bucket stay as they were."""
    backend = backends("b1")
    document = equalizer_config([backend.url], rate_limit=limited_by_key(
        default={"capacity": 5, "refill_rate": 0}))
    process = await twistd_process(document, http)
    admin = Admin(http, process.admin_url)
    assert await flood(process.proxy_port, ["partial"] * 3, 1) == {200: 3}
    await reload_with_default(process, QUICK)
    await admin.create("api", 10, refill_rate=0)

    await flood(process.proxy_port, [f"warm-{i}" for i in range(KEYS // 10)])
    await wait_until(lambda: held_at_most(http, process.admin_url, 2), 30, interval=0.1,
                     message="the warm-up keys to be swept")
    baseline = process.rss_kib()
    assert await flood(process.proxy_port, [f"key-{i}" for i in range(KEYS)]) == {200: KEYS}
    await wait_until(lambda: held_at_most(http, process.admin_url, 2), 30, interval=0.1,
                     message="the 20,000 keys to be swept")
    growth = process.rss_kib() - baseline
    print(f"\n[rss] memory store, {KEYS} keys: growth {growth} KiB after the sweep")
    assert growth < 5 * MIB

    stats = await buckets_stats(http, process.admin_url)
    assert stats["held"] == 2
    assert stats["swept"] >= KEYS + KEYS // 10
    assert {item["client_id"] for item in (await admin.all())["items"]} == {"api", "partial"}
    partial = (await admin.bucket("partial")).json
    assert (partial["capacity"], partial["tokens"], partial["refill_rate"]) == (5, 2.0, 0.0)
    assert (await admin.bucket("api")).json["tokens"] == 10.0
    metrics = (await admin("GET", "/metrics")).body.decode()
    assert "equalizer_buckets 2.0" in metrics
    assert "equalizer_buckets_swept_total" in metrics


async def reload_with_default(process: Any, default: dict[str, Any]) -> None:
    """Rewrite the child's rate_limit.default and SIGHUP it; wait for the reload."""
    with open(process.config_path) as f:
        document = yaml.safe_load(f)
    document["rate_limit"]["default"] = default
    with open(process.config_path, "w") as f:
        yaml.safe_dump(document, f)
    before = process.output().count("configuration reloaded")
    os.kill(process.pid, signal.SIGHUP)
    await wait_until(lambda: process.output().count("configuration reloaded") > before,
                     message="the reload")


# -- PostgreSQL store ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_postgres_store_deletes_rows_of_20000_keys_and_keeps_what_matters(
        http, backends, equalizer, postgres_dsn):
    """20,000 keys through a balancer on PostgreSQL: once their rows are full again the sweep
    deletes them, while an API bucket and a partly spent default row that never refills stay."""
    backend = backends("b1")
    balancer = await equalizer(equalizer_config([backend.url], rate_limit=limited_by_key(
        **store_section("postgres", postgres_dsn))))
    await store_ready(balancer, postgres_dsn)
    admin = Admin(http, balancer.admin_url)
    await admin.create("api", 10, refill_rate=0)
    assert await flood(balancer.proxy_port, ["partial"], 1) == {200: 1}
    await sql(postgres_dsn, "UPDATE buckets SET refill_rate = 0 WHERE client_id = 'partial'")

    assert await flood(balancer.proxy_port, [f"key-{i}" for i in range(KEYS)]) == {200: KEYS}

    async def rows() -> int:
        return (await sql(postgres_dsn, "SELECT count(*) FROM buckets", None, True))[0][0]

    await wait_until(lambda: ensureDeferred(only(rows, 2)), 60, interval=0.2,
                     message="the 20,000 rows to be swept")
    kept = await sql(postgres_dsn, "SELECT client_id, tokens, refill_rate, from_default"
                                   " FROM buckets ORDER BY client_id", None, True)
    assert [(client_id, from_default) for client_id, _, _, from_default in kept] == [
        ("api", False), ("partial", True)]
    assert kept[1][1] < 2 and kept[1][2] == 0  # spent, not refilled, not swept
    await wait_until(lambda: held_at_most(http, balancer.admin_url, 2), 10, interval=0.1,
                     message="/stats to count the rows")
    assert (await buckets_stats(http, balancer.admin_url))["swept"] >= KEYS


async def only(count: Any, expected: int) -> bool:
    """Whether the async ``count()`` is ``expected``."""
    return await count() == expected


# -- the cap, on both stores -----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_new_keys_over_max_buckets_are_refused_with_429(http, backends, equalizer,
                                                              store_kind, dsn):
    """With max_buckets 100 and buckets that never refill, 100 new keys are admitted and the
    next ones get 429 with Retry-After, counted in /stats; known keys are still served."""
    backend = backends("b1")
    balancer = await equalizer(equalizer_config([backend.url], rate_limit=limited_by_key(
        default={"capacity": 5, "refill_rate": 0}, max_buckets=100,
        **store_section(store_kind, dsn))))
    await store_ready(balancer, dsn)
    keys = [f"key-{i:03d}" for i in range(150)]
    assert await flood(balancer.proxy_port, keys[:100], 1) == {200: 100}
    assert await flood(balancer.proxy_port, keys[100:], 1) == {429: 50}
    assert await flood(balancer.proxy_port, keys[:10], 1) == {200: 10}
    stats = await buckets_stats(http, balancer.admin_url)
    assert stats["over_cap"] == 50
    raw = await flood_raw(balancer.proxy_port, "key-149")
    assert b"HTTP/1.1 429 " in raw and b"\r\nRetry-After: " in raw


async def flood_raw(port: int, key: str) -> bytes:
    """The whole raw answer to one request with ``key``."""
    client = await raw_connect(port)
    client.send(b"GET /k HTTP/1.1\r\nHost: h\r\nX-API-Key: %s\r\nConnection: close\r\n\r\n"
                % key.encode())
    return await client.wait_closed()
