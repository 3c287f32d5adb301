"""Start-up mistakes and restart-only settings (SPEC 2, 7), as an operator meets them.

Start-up runs the real ``twistd -n equalizer`` as a child process and looks at
its exit status and standard error: a mistake is one line and status 1, never a
traceback. Reloads run in this process and look at what is logged and what keeps
running.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.logger import formatEvent, globalLogPublisher

from equalizer.config.loader import parse_config
from tests.integration.buckets_support import call
from tests.integration.harness import LOOPBACK, REPO, equalizer_config, twistd_command

START_TIMEOUT = 60


@pytest.fixture()
def held_port() -> Iterator[int]:
    """A loopback port this test listens on, so nobody else can."""
    holder = socket.socket()
    holder.bind((LOOPBACK, 0))
    holder.listen()
    yield holder.getsockname()[1]
    holder.close()


def run_twistd(directory: Path, *arguments: str,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``twistd -n equalizer ARGUMENTS`` in ``directory`` until it exits; its outcome."""
    environment = {name: value for name, value in os.environ.items()
                   if not name.startswith("EQUALIZER_")}
    environment.update(PYTHONPATH=REPO, **(env or {}))
    return subprocess.run(
        [*twistd_command(), "-n", "--pidfile", str(directory / "twistd.pid"), "equalizer",
         "--backend", f"http://{LOOPBACK}:9", *arguments],
        cwd=directory, env=environment, stdin=subprocess.DEVNULL, capture_output=True,
        text=True, timeout=START_TIMEOUT)


def assert_one_line_exit(outcome: subprocess.CompletedProcess[str], line: str) -> None:
    assert outcome.returncode == 1, (outcome.stdout, outcome.stderr)
    assert outcome.stderr == line + "\n"
    assert "Traceback" not in outcome.stdout + outcome.stderr


# -- endpoints that cannot be bound -------------------------------------------------------


@pytest.mark.parametrize("which", ["proxy", "admin"])
def test_port_in_use_is_one_line_and_exit_1(tmp_path: Path, held_port: int, which: str) -> None:
    """A proxy or admin port already taken stops start-up with one line naming the setting,
    status 1, no traceback, and no pidfile left behind."""
    taken = f"tcp:{held_port}:interface={LOOPBACK}"
    free = f"tcp:0:interface={LOOPBACK}"
    listen, admin = (taken, free) if which == "proxy" else (free, taken)
    outcome = run_twistd(tmp_path, "--listen", listen, "--admin", admin)
    assert_one_line_exit(
        outcome, f"error: cannot listen on {which}.listen {taken!r}: Address already in use")
    assert not (tmp_path / "twistd.pid").exists()


def test_unix_socket_in_missing_directory_is_one_line(tmp_path: Path) -> None:
    """A unix: endpoint in a directory that does not exist is one line and status 1."""
    outcome = run_twistd(tmp_path, "--listen", "unix:/nonexistent/dir/s.sock",
                         "--admin", f"tcp:0:interface={LOOPBACK}")
    assert_one_line_exit(outcome, "error: cannot listen on proxy.listen "
                                  "'unix:/nonexistent/dir/s.sock': No such file or directory")


# -- malformed database URLs ------------------------------------------------------------------


REASON = 'not a valid PostgreSQL DSN or URL: missing "=" after "http://x" in connection info string'


def test_malformed_database_url_in_the_file_is_a_config_error(tmp_path: Path) -> None:
    """A database_url libpq cannot parse stops start-up as a config error naming the key,
    instead of retrying the connection forever."""
    config = tmp_path / "eq.yml"
    config.write_text('rate_limit: {store: postgres, database_url: "http://x"}\n')
    outcome = run_twistd(tmp_path, "--config", str(config))
    assert_one_line_exit(outcome, f"config error: rate_limit.database_url: {REASON}")


def test_malformed_database_url_flag_and_environment_are_config_errors(tmp_path: Path) -> None:
    """The same mistake in --database-url or EQUALIZER_DATABASE_URL names where it came from."""
    outcome = run_twistd(tmp_path, "--database-url", "http://x")
    assert_one_line_exit(outcome, f"config error: --database-url: {REASON}")
    outcome = run_twistd(tmp_path, env={"EQUALIZER_DATABASE_URL": "http://x"})
    assert_one_line_exit(outcome, f"config error: EQUALIZER_DATABASE_URL: {REASON}")


# -- reloads of restart-only settings -------------------------------------------------------


@pytest.fixture()
def warnings() -> Iterator[list[dict]]:
    """Every warning logged during the test, as events."""
    events: list[dict] = []

    def observe(event: dict) -> None:
        if event.get("log_level") is not None and event["log_level"].name == "warn":
            events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


def texts(events: list[dict]) -> list[str]:
    """The messages of ``events``, which are then forgotten."""
    lines = [formatEvent(event) for event in events]
    events.clear()
    return lines


@pytest_twisted.ensureDeferred
async def test_reload_warnings_compare_the_file_with_what_runs(equalizer, backends, warnings):
    """Reloading a changed listen endpoint warns each time the file differs from the running
    endpoint, and the running configuration keeps saying what really listens."""
    document = equalizer_config([backends("b1").url])
    balancer = await equalizer(document)
    service = balancer.service
    running = document["proxy"]["listen"]
    other = dict(document, proxy=dict(document["proxy"], listen="tcp:1:interface=127.0.0.1"))
    expected = (f"proxy.listen changes only on restart; keeping {running!r} "
                "(file says 'tcp:1:interface=127.0.0.1')")
    service.apply(parse_config(other))
    assert texts(warnings) == [expected]
    service.apply(parse_config(other))
    assert texts(warnings) == [expected]
    assert service.config.proxy.listen == running
    service.apply(parse_config(document))
    assert texts(warnings) == []


@pytest_twisted.ensureDeferred
async def test_reload_never_logs_the_admin_token(equalizer, backends, http, warnings):
    """A reload that sets an admin token says the running token is kept, without any value,
    and the admin API goes on without one."""
    document = equalizer_config([backends("b1").url])
    balancer = await equalizer(document)
    dsn = "postgresql://eq:pa55word@127.0.0.1/eq"
    changed = dict(document, admin=dict(document["admin"], token="sekret"),
                   rate_limit=dict(document["rate_limit"], database_url=dsn))
    balancer.service.apply(parse_config(changed))
    assert texts(warnings) == [
        "admin.token changes only on restart; the running token is kept",
        "rate_limit.database_url changes only on restart; the running database URL is kept",
    ]
    assert balancer.service.config.admin.token is None
    assert (await call(http, "GET", balancer.admin_url + "/stats")).status == 200
    balancer.service.apply(parse_config(changed))
    events = list(warnings)
    assert len(events) == 2
    assert not any("sekret" in repr(event) or "pa55word" in repr(event) for event in events)
