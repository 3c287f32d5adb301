"""GET /dashboard rendered by headless Chromium against a real ``twistd equalizer``.

Chromium loads the page from the admin port, the page's script polls /stats,
and the rendered DOM must show every backend with its state. A screenshot is
kept in ``artifacts/dashboard.png``. Chromium is the Debian package ``chromium``
(``.ci/run`` installs it); without it the test fails under CI and skips elsewhere.
"""

from __future__ import annotations

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
