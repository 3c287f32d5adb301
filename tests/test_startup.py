"""The start-up summary's lines, the dashboard's address and --help's text (no sockets)."""

from __future__ import annotations

import pytest

from equalizer.config.loader import parse_config
from equalizer.startup import SHOWN_BACKENDS, dashboard_url, help_text, summary


@pytest.mark.parametrize(("endpoint", "bound", "url"), [
    ("tcp:8081:interface=127.0.0.1", None, "http://127.0.0.1:8081/dashboard"),
    ("tcp:8081", None, "http://localhost:8081/dashboard"),
    ("tcp6:8081:interface=\\:\\:1", None, "http://[::1]:8081/dashboard"),
    ("tcp:0:interface=127.0.0.1", ("127.0.0.1", 40123), "http://127.0.0.1:40123/dashboard"),
    ("tcp:0:interface=127.0.0.1", None,
     "http://127.0.0.1:PORT/dashboard (port chosen at start-up)"),
    ("unix:/run/equalizer/admin.sock", None, "/dashboard on unix:/run/equalizer/admin.sock"),
])
def test_dashboard_url(endpoint: str, bound, url: str) -> None:
    assert dashboard_url(endpoint, bound) == url


def test_summary_counts_the_backends_beyond_ten_and_never_shows_the_password() -> None:
    urls = [f"http://10.0.0.{n}:8080" for n in range(1, 14)]
    config = parse_config({
        "balancer": {"backends": [{"url": url} for url in urls]},
        "admin": {"token": "sekret"},
        "rate_limit": {"store": "postgres", "enabled": False,
                       "database_url": "postgresql://eq:pa55@db:5433/eq"},
    })
    lines = summary(config, None, proxy=None, admin=None, pid=7)
    assert lines[0].endswith(", pid 7")
    assert lines[2:4] == ["store: postgres eq@db:5433/eq (leased tokens)", "rate limit: off"]
    assert lines[4].endswith(f"http://10.0.0.10:8080 (weight 1), and {13 - SHOWN_BACKENDS} more")
    assert lines[5] == "proxy: tcp:8080 (opens once the bucket store has answered, within 10s)"
    assert lines[6] == "admin: tcp:8081:interface=127.0.0.1 (bearer token required)"
    assert not any("pa55" in line or "sekret" in line for line in lines)


def test_summary_shows_the_bound_port_of_port_0() -> None:
    config = parse_config({"proxy": {"listen": "tcp:0"}})
    lines = summary(config, None, proxy=("0.0.0.0", 40000), admin=("127.0.0.1", 8081))
    assert "proxy: tcp:0 (port 40000)" in lines
    assert "admin: tcp:8081:interface=127.0.0.1 (no token)" in lines


def test_help_keeps_its_paragraphs_within_the_width() -> None:
    text = help_text(60)
    assert all(len(line) <= 60 for line in text.splitlines())
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    assert [p.split()[0] for p in paragraphs] == ["Signals:", "Environment:", "--check"]
