"""GET /dashboard rendered by headless Chromium against a real ``twistd equalizer``.

Chromium loads the page from the admin port, the page's script polls /stats,
and the rendered DOM must show every backend with its state. Screenshots are kept in
``artifacts/`` (not tracked); ``EQUALIZER_DASHBOARD_SCREENSHOT=docs/dashboard.png``
writes the logged-in one where README shows it, the deliberate way to refresh it.
Chromium is the Debian package ``chromium`` (``.ci/run`` installs it); without it the
test fails under CI and skips elsewhere.
"""

from __future__ import annotations

import json
import os
import shutil
from html.parser import HTMLParser

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.utils import getProcessOutputAndValue

from tests.integration.harness import (
    REPO,
    equalizer_config,
    free_port,
    get_json,
    sleep,
    wait_until,
    within,
)

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-quic", "--hide-scrollbars",
]
SCREENSHOT = os.path.join(REPO, "artifacts", "dashboard.png")
LOGGED_IN_SCREENSHOT = os.environ.get("EQUALIZER_DASHBOARD_SCREENSHOT") or os.path.join(
    REPO, "artifacts", "dashboard-token.png")
TOKEN = "dashboard-test-token"


def chromium() -> str:
    """The Chromium binary; a failure under CI (it must be installed there), a skip elsewhere."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        message = "chromium is not installed (apt-get install -y chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


class BackendRows(HTMLParser):
    """The dashboard's backend rows: data-backend-id -> (data-state, [cell texts])."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, tuple[str, list[str]]] = {}
        self._row: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "tr" and "data-backend-id" in found:
            self._row = found["data-backend-id"]
            self.rows[self._row] = (found.get("data-state") or "", [])
        elif tag == "td" and self._row is not None:
            self._cell = []

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None and self._row is not None:
            self.rows[self._row][1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr":
            self._row = None


class Headings(HTMLParser):
    """Text of the elements with an id, for the summary cards."""

    def __init__(self) -> None:
        super().__init__()
        self.text: dict[str, str] = {}
        self._stack: list[str | None] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._stack.append(dict(attrs).get("id"))

    def handle_endtag(self, tag: str) -> None:
        if self._stack:
            self._stack.pop()

    def handle_data(self, data: str) -> None:
        for element in self._stack:
            if element:
                self.text[element] = self.text.get(element, "") + data


async def run_chromium(binary: str, profile: str, *args: str) -> bytes:
    """Run headless Chromium with a fresh profile; its standard output."""
    output, errors, code = await within(getProcessOutputAndValue(
        binary, [*CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        env=dict(os.environ), reactor=reactor), 60)
    assert code == 0, errors.decode("utf-8", "replace")[-2000:]
    return output


async def traffic(http, url: str, seconds: float) -> None:
    """Requests through the proxy, about thirty a second, for ``seconds``."""
    deadline = reactor.seconds() + seconds
    while reactor.seconds() < deadline:
        response = await within(http.get(url))
        await within(treq.content(response))
        await sleep(0.03)


@pytest_twisted.ensureDeferred
async def test_dashboard_shows_every_backend_and_its_state(http, backends, twistd_process,
                                                           tmp_path):
    """Headless Chromium renders one row per backend with its URL, weight and state (two
    healthy, one down), the rate-limited share and latency, from live /stats polls."""
    binary = chromium()
    alive = [backends("alpha"), backends("beta")]
    dead = f"http://127.0.0.1:{free_port()}"
    document = equalizer_config(
        [alive[0].url, alive[1].url, dead],
        balancer={"strategy": "weighted_round_robin",
                  "backends": [{"url": alive[0].url, "weight": 3},
                               {"url": alive[1].url, "weight": 1},
                               {"url": dead, "weight": 2}]},
        health={"interval": "200ms", "timeout": "1s", "path": "/"},
        rate_limit={"enabled": True, "store": "memory",
                    "default": {"capacity": 10, "refill_rate": 10}},
    )
    balancer = await twistd_process(document, http)

    async def dead_is_down() -> bool:
        _, stats = await get_json(http, balancer.admin_url + "/stats")
        return [b["healthy"] for b in stats["backends"]] == [True, True, False]

    await wait_until(dead_is_down, message="the dead backend to be marked down")
    await traffic(http, balancer.proxy_url + "/", 1.0)

    page = await within(http.get(balancer.admin_url + "/dashboard"))
    html = (await within(treq.content(page))).decode()
    assert page.code == 200
    assert page.headers.getRawHeaders(b"content-type") == [b"text/html; charset=utf-8"]
    assert b"connect-src 'self'" in page.headers.getRawHeaders(b"content-security-policy")[0]
    assert "src=" not in html and "href=" not in html, "the page must load nothing else"

    url = balancer.admin_url + "/dashboard"
    dom = await run_chromium(binary, str(tmp_path / "profile-dom"),
                             "--virtual-time-budget=5000", "--dump-dom", url)
    rows = BackendRows()
    rows.feed(dom.decode("utf-8"))
    _, stats = await get_json(http, balancer.admin_url + "/stats")
    expected = {b["id"]: (b["url"], b["weight"], "healthy" if b["healthy"] else "down")
                for b in stats["backends"]}
    assert [state for _, (_, _, state) in expected.items()] == ["healthy", "healthy", "down"]
    assert set(rows.rows) == set(expected)
    for backend_id, (backend_url, weight, state) in expected.items():
        row_state, cells = rows.rows[backend_id]
        assert row_state == state
        assert cells[:4] == [backend_id, backend_url, state, str(weight)], cells

    cards = Headings()
    cards.feed(dom.decode("utf-8"))
    assert cards.text["healthy"] == "2 / 3"
    limited, total = stats["requests"]["rate_limited"], stats["requests"]["total"]
    assert limited > 0
    assert cards.text["limited-share"] == f"{100 * limited / total:.1f} %"
    assert cards.text["limited-total"].endswith(f"({limited})")
    assert cards.text["latency"] != "– / –"
    assert "live" in cards.text["status"]

    os.makedirs(os.path.dirname(SCREENSHOT), exist_ok=True)
    if os.path.exists(SCREENSHOT):
        os.remove(SCREENSHOT)
    await DeferredList([
        Deferred.fromCoroutine(traffic(http, balancer.proxy_url + "/", 3.0)),
        Deferred.fromCoroutine(run_chromium(binary, str(tmp_path / "profile-shot"),
                                   "--window-size=1280,800", "--virtual-time-budget=3000",
                                   f"--screenshot={SCREENSHOT}", url)),
    ], fireOnOneErrback=True, consumeErrors=True)
    with open(SCREENSHOT, "rb") as shot:
        assert shot.read(8) == b"\x89PNG\r\n\x1a\n"


class Marked(HTMLParser):
    """The ``data-*`` attributes of the body, the limited clients' rows and the buttons."""

    def __init__(self) -> None:
        super().__init__()
        self.body: dict[str, str | None] = {}
        self.clients: list[str] = []
        self.actions: list[tuple[str, str]] = []
        self._row: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "body":
            self.body = found
        elif tag == "tr" and "data-backend-id" in found:
            self._row = found["data-backend-id"]
        elif tag == "tr" and "data-client" in found:
            self.clients.append(found["data-client"] or "")
        elif tag == "button" and "data-action" in found and self._row is not None:
            self.actions.append((self._row, found["data-action"] or ""))


CLIENTS = ["batch-export"] * 3 + ["crawler-7"] * 2 + ["mobile-app", "web-frontend"]
"""One round of requests as four clients (``X-Client``), the first two greedy."""


async def client_traffic(http, url: str, rounds: int = 1000, seconds: float = 60.0) -> None:
    """``rounds`` rounds of ``CLIENTS``' requests, stopping after ``seconds`` at the latest."""
    deadline = reactor.seconds() + seconds
    for turn in range(rounds * len(CLIENTS)):
        if reactor.seconds() > deadline:
            return
        response = await within(http.get(url, headers={"X-Client": CLIENTS[turn % 7]}))
        await within(treq.content(response))
        await sleep(0.005)


@pytest_twisted.ensureDeferred
async def test_dashboard_logs_in_with_the_token_and_shows_live_figures(
        http, backends, twistd_process, tmp_path):
    """With an admin token set the page itself opens without it while /stats stays closed;
    given the token (a ``#token=`` login link), Chromium's page polls /stats with it and
    shows version, store state, every backend with its state, down-since, error shares,
    retries and actions, and the most rate-limited clients, as /stats has them."""
    binary = chromium()
    alive = [backends("alpha"), backends("beta")]
    dead = f"http://127.0.0.1:{free_port()}"
    balancer = await twistd_process(equalizer_config(
        [alive[0].url, alive[1].url, dead],
        admin={"token": TOKEN},
        health={"interval": "200ms", "timeout": "1s", "path": "/"},
        rate_limit={"enabled": True, "store": "memory", "key": "header:X-Client",
                    "default": {"capacity": 10, "refill_rate": 2}},
    ), http)
    auth = {"Authorization": f"Bearer {TOKEN}"}

    async def stats() -> dict:
        response = await within(http.get(balancer.admin_url + "/stats", headers=auth))
        return json.loads(await within(treq.content(response)))

    async def dead_is_down() -> bool:
        return [b["healthy"] for b in (await stats())["backends"]] == [True, True, False]

    await wait_until(dead_is_down, message="the dead backend to be marked down")
    page = await within(http.get(balancer.admin_url + "/dashboard"))
    assert page.code == 200, "the page holds no data: it is served without the token"
    assert b"<html" in await within(treq.content(page))
    closed = await within(http.get(balancer.admin_url + "/stats"))
    await within(treq.content(closed))
    assert closed.code == 401, "the data stays behind the token"

    # 60, 40, 20 and 20 requests: at 2 tokens/s over 10, batch-export is refused more
    # than crawler-7, and crawler-7 more than the others (at most 10 each), at any speed.
    await client_traffic(http, balancer.proxy_url + "/", rounds=20)
    url = balancer.admin_url + "/dashboard"
    locked = await run_chromium(binary, str(tmp_path / "profile-locked"),
                                "--virtual-time-budget=3000", "--dump-dom", url)
    cards = Headings()
    cards.feed(locked.decode("utf-8"))
    assert "needs a token" in cards.text["status"]
    locked_rows = BackendRows()
    locked_rows.feed(locked.decode("utf-8"))
    assert locked_rows.rows == {}

    dom = (await run_chromium(binary, str(tmp_path / "profile-dom"),
                              "--virtual-time-budget=5000", "--dump-dom",
                              f"{url}#token={TOKEN}")).decode("utf-8")
    after = await stats()
    cards = Headings()
    cards.feed(dom)
    marked = Marked()
    marked.feed(dom)
    rows = BackendRows()
    rows.feed(dom)
    assert "live" in cards.text["status"], cards.text["status"]
    assert int(marked.body["data-polls"] or 0) >= 2, "the page polled /stats more than once"
    assert cards.text["version"] == "v" + after["version"]
    assert cards.text["store"] == "available" and cards.text["store-kind"] == "memory"
    assert cards.text["healthy"] == "2 / 3"
    assert cards.text["total"] == f"{after['requests']['total']} total"
    assert cards.text["retries"] == str(after["requests"]["retries"])
    states = {b["id"]: ("healthy" if b["healthy"] else "down") for b in after["backends"]}
    assert {backend_id: state for backend_id, (state, _) in rows.rows.items()} == states
    for backend in after["backends"]:
        cells = rows.rows[backend["id"]][1]
        if backend["healthy"]:
            assert cells[4] == "" and cells[-2].startswith("ok 200"), cells
        else:
            assert cells[4] != "" and cells[-2].startswith("connection refused"), cells
        assert cells[11] == str(backend["retries"])
    assert {action for _, action in marked.actions} == {"disable", "drain"}
    limited = [entry["client"] for entry in after["limited_clients"]]
    assert limited[:2] == ["batch-export", "crawler-7"], after["limited_clients"]
    assert marked.clients == limited

    # The buttons' own call: same origin, with the bearer token, as the page sends it.
    first = after["backends"][0]["id"]
    change = await within(http.put(
        f"{balancer.admin_url}/backends/{first}", data=b'{"enabled": false}',
        headers={**auth, "Content-Type": "application/json", "Origin": balancer.admin_url}))
    assert (change.code, json.loads(await within(treq.content(change)))["enabled"]) == \
        (200, False)

    os.makedirs(os.path.dirname(LOGGED_IN_SCREENSHOT), exist_ok=True)
    if os.path.exists(LOGGED_IN_SCREENSHOT):
        os.remove(LOGGED_IN_SCREENSHOT)
    await DeferredList([
        Deferred.fromCoroutine(client_traffic(http, balancer.proxy_url + "/", seconds=4.0)),
        Deferred.fromCoroutine(run_chromium(binary, str(tmp_path / "profile-shot"),
                                   "--window-size=1600,820", "--virtual-time-budget=4000",
                                   f"--screenshot={LOGGED_IN_SCREENSHOT}",
                                   f"{url}#token={TOKEN}")),
    ], fireOnOneErrback=True, consumeErrors=True)
    with open(LOGGED_IN_SCREENSHOT, "rb") as shot:
        assert shot.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest_twisted.ensureDeferred
async def test_dashboard_shows_pools_and_routes(http, backends, twistd_process, tmp_path):
    """With pools and routes configured, the page lists each pool (strategy, healthy over
    total) and each route in order (its conditions, pool and policy); backend rows name
    their pool."""
    binary = chromium()
    web, api = backends("web"), backends("api")
    document = equalizer_config([web.url])
    document["pools"] = {"api": {"strategy": "least_connections",
                                 "backends": [{"url": api.url}]}}
    document["routes"] = [
        {"match": {"host": "api.example.com", "path_prefix": "/v1/"}, "pool": "api",
         "strip_prefix": True, "rate_limit": None},
        {"match": {"methods": ["POST"]}, "pool": "default"}]
    balancer = await twistd_process(document, http)
    dom = (await run_chromium(binary, str(tmp_path / "profile-routes"),
                              "--virtual-time-budget=5000", "--dump-dom",
                              balancer.admin_url + "/dashboard")).decode("utf-8")
    texts = Headings()
    texts.feed(dom)
    # cell texts run together in the element's text
    assert texts.text["pools"] == "defaultround_robin1 / 1apileast_connections1 / 1"
    assert texts.text["routes"] == ("0host api.example.com · path /v1/* (stripped)api"
                                    "not limited1POSTdefaultdefault")
    rows = BackendRows()
    rows.feed(dom)
    assert sorted(cells[0] for _, cells in rows.rows.values()) == ["b1", "b2 · api"]
