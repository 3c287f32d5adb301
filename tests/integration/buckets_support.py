"""Helpers shared by the bucket API and rate-limiting integration tests.

Both files run every scenario against the memory store and the real PostgreSQL
store (``store_kind``), over real HTTP on loopback. A balancer on the postgres
store starts from an empty ``buckets`` table: the session's database is shared
with the other integration tests, which run one after the other.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

import attrs
import treq
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from tests.integration.harness import DEFAULT_TIMEOUT, RunningEqualizer, wait_until, within
from tests.postgres import sql

STORES = ("memory", "postgres")

_ABSENT = object()


@attrs.define
class Reply:
    """One HTTP answer: status, headers and the whole body."""

    status: int
    headers: Headers
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> list[str]:
        """Every value of header ``name``, as text (empty when absent)."""
        return [value.decode("latin-1")
                for value in self.headers.getRawHeaders(name.encode("latin-1"), [])]

    @property
    def error(self) -> dict[str, str]:
        """The ``{"error": {...}}`` object of a JSON error answer."""
        return self.json["error"]


async def call(client: HTTPClient, method: str, url: str, body: Any = _ABSENT, *,
               raw: bytes | None = None, headers: dict[str, str] | None = None,
               timeout: float = DEFAULT_TIMEOUT) -> Reply:
    """Send one request (``body`` as JSON, or ``raw`` bytes) and read the whole answer."""
    sent = {name: [value] for name, value in (headers or {}).items()}
    data = None
    if raw is not None:
        data = raw
    elif body is not _ABSENT:
        data = json.dumps(body).encode("utf-8")
    if data is not None:
        sent.setdefault("Content-Type", ["application/json"])
    response = await within(client.request(method, url, data=data, headers=sent), timeout)
    content = await within(treq.content(response), timeout)
    return Reply(response.code, response.headers, content)


@implementer(IAgentEndpointFactory)
@attrs.define
class _BoundEndpoints:
    source: str

    def endpointForURI(self, uri):  # noqa: N802 (Twisted's name)
        return TCP4ClientEndpoint(reactor, uri.host.decode("ascii"), uri.port, timeout=5,
                                  bindAddress=(self.source, 0))


def client_from(source: str) -> tuple[HTTPClient, HTTPConnectionPool]:
    """A treq client whose connections come from loopback address ``source`` (127.0.0.2, ...),
    so that the proxy sees another client IP; close the pool in teardown."""
    pool = HTTPConnectionPool(reactor, persistent=False)
    agent = Agent.usingEndpointFactory(reactor, _BoundEndpoints(source), pool=pool)
    return HTTPClient(agent), pool


def bucket_path(client_id: str) -> str:
    """The admin path of a bucket, its client id percent-encoded (``/`` included)."""
    return "/buckets/" + quote(client_id, safe="")



def store_section(store_kind: str, dsn: str | None) -> dict[str, Any]:
    """The ``rate_limit`` keys that choose the store."""
    if store_kind == "postgres":
        return {"store": "postgres", "database_url": dsn}
    return {"store": "memory"}


async def store_ready(balancer: RunningEqualizer, dsn: str | None = None, *,
                      empty: bool = True) -> RunningEqualizer:
    """Wait until the balancer's store serves; on PostgreSQL, empty the buckets table."""
    store = balancer.service.store
    await wait_until(lambda: store.available, 15, message="the bucket store to be available")
    if dsn is not None and empty:
        await sql(dsn, "TRUNCATE buckets")
    return balancer


StartBalancer = Callable[[dict], Awaitable[RunningEqualizer]]


@attrs.define
class Admin:
    """A client of one balancer's admin API."""

    client: HTTPClient
    base: str

    async def __call__(self, method: str, path: str, body: Any = _ABSENT, *,
                       raw: bytes | None = None, timeout: float = DEFAULT_TIMEOUT) -> Reply:
        return await call(self.client, method, self.base + path, body, raw=raw, timeout=timeout)

    async def bucket(self, client_id: str) -> Reply:
        return await self("GET", bucket_path(client_id))

    async def create(self, client_id: str, capacity: int, **fields: Any) -> dict[str, Any]:
        """POST a bucket that must be accepted; the bucket as answered."""
        reply = await self("POST", "/buckets",
                           {"client_id": client_id, "capacity": capacity, **fields})
        assert reply.status == 201, (reply.status, reply.body)
        return reply.json

    async def all(self) -> dict[str, Any]:
        """GET /buckets?limit=1000, which must be answered."""
        reply = await self("GET", "/buckets?limit=1000")
        assert reply.status == 200, (reply.status, reply.body)
        return reply.json
