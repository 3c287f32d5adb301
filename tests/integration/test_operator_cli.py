"""What an operator sees of ``twistd equalizer``: --version, --check, --help, the start-up
summary, and the one-line messages for the usual mistakes. Each runs the real twistd.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from pathlib import Path

import psycopg2.extensions
import pytest
import pytest_twisted

import twisted
from equalizer import __version__
from equalizer.config.checks import database_target
from tests.integration.harness import (
    LOOPBACK,
    REPO,
    equalizer_config,
    twistd_command,
    wait_until,
)
from tests.integration.test_readiness import health_store_ok, held_migration_lock
from tests.integration.test_service_startup import (
    START_TIMEOUT,
    assert_one_line_exit,
    held_port,  # noqa: F401 -- a fixture
    run_twistd,
)

VERSION = re.compile(rf"equalizer {re.escape(__version__)} "
                     rf"\(Twisted {re.escape(twisted.__version__)}, Python \d+\.\d+\.\d+\)")


def twistd(directory: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    """``twistd ARGUMENTS`` (no flags added) in ``directory``, without EQUALIZER_* variables."""
    environment = {name: value for name, value in os.environ.items()
                   if not name.startswith("EQUALIZER_")}
    environment["PYTHONPATH"] = REPO
    return subprocess.run([*twistd_command(), *arguments], cwd=directory, env=environment,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=START_TIMEOUT)


def test_version_is_equalizers(tmp_path: Path) -> None:
    outcome = twistd(tmp_path, "equalizer", "--version")
    assert outcome.returncode == 0, outcome.stderr
    assert VERSION.fullmatch(outcome.stdout.rstrip("\n")), outcome.stdout


def test_help_lists_signals_environment_and_check(tmp_path: Path) -> None:
    outcome = twistd(tmp_path, "equalizer", "--help")
    assert outcome.returncode == 0, outcome.stderr
    text = " ".join(outcome.stdout.split())
    for words in ("SIGHUP re-reads the configuration file", "SIGTERM (and SIGINT) stops",
                  "SIGUSR1 reopens the log file", "EQUALIZER_DATABASE_URL is the PostgreSQL DSN",
                  "EQUALIZER_ADMIN_TOKEN is the admin API's bearer token", "--check",
                  "--version"):
        assert words in text


def test_check_accepts_a_valid_file_and_prints_the_summary(tmp_path: Path) -> None:
    """--check exits 0 and prints what start-up would run, without listening on anything."""
    config = tmp_path / "eq.yml"
    config.write_text("proxy: {listen: 'tcp:8080'}\nbalancer: {strategy: least_connections}\n")
    outcome = run_twistd(tmp_path, "--config", str(config), "--check")
    assert outcome.returncode == 0, outcome.stderr
    lines = outcome.stdout.splitlines()
    assert VERSION.fullmatch(lines[0])
    assert lines[1:] == [
        f"config: {config}",
        "store: memory (at most 1,000,000 buckets)",
        "rate limit: key ip, default 100 tokens, 10/s, on_store_error allow",
        f"backends (1, least_connections): http://{LOOPBACK}:9 (weight 1)",
        "proxy: tcp:8080",
        "admin: tcp:8081:interface=127.0.0.1 (no token)",
        "dashboard: http://127.0.0.1:8081/dashboard",
        f"configuration OK: {config}",
    ]
    assert outcome.stderr == ""


def test_check_says_when_the_built_in_defaults_are_used(tmp_path: Path) -> None:
    outcome = run_twistd(tmp_path, "--check")
    assert outcome.returncode == 0, outcome.stderr
    assert outcome.stdout.splitlines()[-1] == (
        f"configuration OK: built-in defaults (no --config, and no config/equalizer.yml "
        f"in {tmp_path})")


def test_check_refuses_with_start_ups_messages(tmp_path: Path) -> None:
    """An invalid file is exit status 1 and the very lines start-up prints."""
    config = tmp_path / "eq.yml"
    config.write_text("proxy: {listen: '8080', retries: -1}\n")
    checked = run_twistd(tmp_path, "--config", str(config), "--check")
    started = run_twistd(tmp_path, "--config", str(config))
    assert checked.returncode == started.returncode == 1
    assert checked.stdout == ""
    assert checked.stderr == started.stderr == (
        "config error: proxy.listen: invalid endpoint '8080': Unknown endpoint type: '8080' "
        "(did you mean 'tcp:8080'?)\n"
        "config error: proxy.retries: must be at least 0, got -1\n")


def test_listen_port_alone_suggests_tcp(tmp_path: Path) -> None:
    outcome = run_twistd(tmp_path, "--listen", "18080")
    assert_one_line_exit(outcome, "config error: --listen: invalid endpoint '18080': Unknown "
                                  "endpoint type: '18080' (did you mean 'tcp:18080'?)")


def test_backend_without_scheme_suggests_http(tmp_path: Path) -> None:
    outcome = run_twistd(tmp_path, "--backend", "127.0.0.1:9001")
    assert_one_line_exit(outcome, "config error: --backend: not an http(s) URL: "
                                  "'127.0.0.1:9001' (did you mean 'http://127.0.0.1:9001'?)")


def test_yaml_syntax_error_shows_the_files_lines(tmp_path: Path) -> None:
    config = tmp_path / "eq.yml"
    config.write_text("proxy:\n  listen: tcp:8080\n    retries: 2\n")
    outcome = run_twistd(tmp_path, "--config", str(config))
    assert outcome.returncode == 1
    assert outcome.stderr == (
        f"config error: config: YAML syntax error in {str(config)!r} at line 3, column 12: "
        "mapping values are not allowed here\n"
        "  2 |   listen: tcp:8080\n"
        "  3 |     retries: 2\n"
        "    |            ^\n")


@pytest.mark.parametrize("which", ["proxy", "admin"])
def test_port_in_use_when_daemonized_is_one_line(tmp_path: Path, held_port: int,  # noqa: F811
                                                 which: str) -> None:
    """Without -n, a port in use is found before twistd forks: the same one line on the
    terminal and exit status 1, no pidfile, no log file, no exception repr."""
    taken = f"tcp:{held_port}:interface={LOOPBACK}"
    free = f"tcp:0:interface={LOOPBACK}"
    listen, admin = (taken, free) if which == "proxy" else (free, taken)
    outcome = twistd(tmp_path, f"--pidfile={tmp_path / 'twistd.pid'}",
                     f"--logfile={tmp_path / 'twistd.log'}", "equalizer",
                     "--backend", f"http://{LOOPBACK}:9", "--listen", listen, "--admin", admin)
    assert_one_line_exit(
        outcome, f"error: cannot listen on {which}.listen {taken!r}: Address already in use")
    assert not (tmp_path / "twistd.pid").exists()
    assert not (tmp_path / "twistd.log").exists()


# -- the start-up summary -----------------------------------------------------------------


def summary_of(output: str) -> list[str]:
    """The messages of the ``equalizer.startup`` lines of a text log."""
    return [line.split("[equalizer.startup] ", 1)[1] for line in output.splitlines()
            if "[equalizer.startup] " in line]


@pytest_twisted.ensureDeferred
async def test_start_up_logs_one_summary_block(twistd_process, http, backends):
    """At start: version and pid, the file, store, limits, backends, listeners (with the
    ports bound) and the dashboard's address; once."""
    backend = backends("b1")
    process = await twistd_process(equalizer_config([backend.url]), http)
    lines = summary_of(process.output())
    assert VERSION.fullmatch(lines[0].rsplit(", pid ", 1)[0])
    assert lines[0].endswith(f", pid {process.pid}")
    assert lines[1:] == [
        f"config: {process.config_path}",
        "store: memory (at most 1,000,000 buckets)",
        "rate limit: off",
        f"backends (1, round_robin): {backend.url} (weight 1)",
        f"proxy: tcp:{process.proxy_port}:interface={LOOPBACK}",
        f"admin: tcp:{process.admin_port}:interface={LOOPBACK} (no token)",
        f"dashboard: http://{LOOPBACK}:{process.admin_port}/dashboard",
    ]


@pytest_twisted.ensureDeferred
async def test_twistd_equalizer_runs_on_the_products_reactor(twistd_process, http, backends):
    """Installed by the plugin's module before the service's imports install Twisted's
    default (equalizer.tap), and serving."""
    backend = backends("b1")
    process = await twistd_process(equalizer_config([backend.url]), http)
    assert "reactor class: equalizer.proxy.site.DirectEPollReactor." in process.output()
    response = await http.get(f"http://{LOOPBACK}:{process.proxy_port}/")
    await response.content()
    assert response.code == 200


@pytest_twisted.ensureDeferred
async def test_summary_names_the_database_without_its_password(
        twistd_process, http, backends, postgres_dsn):
    dsn = psycopg2.extensions.make_dsn(postgres_dsn, password="pa55word-not-shown")
    document = equalizer_config([backends("b1").url], rate_limit={
        "enabled": True, "store": "postgres", "database_url": dsn})
    process = await twistd_process(document, http)
    # connected before it is stopped (a stop during the first connection is another test's)
    await wait_until(lambda: health_store_ok(http, process), message="the store to connect")
    lines = summary_of(process.output())
    assert f"store: postgres {database_target(dsn)} (leased tokens)" in lines
    assert "pa55word" not in process.output()
    assert any(line.endswith("(opens once the bucket store has answered, within 10s)")
               for line in lines)


OUTAGE = "[error] [equalizer.buckets.outage]"


@pytest_twisted.ensureDeferred
async def test_database_down_is_one_line_naming_its_target(twistd_process, http, backends):
    """A database nobody answers for is one error line with user@host:port/db, libpq's two
    lines made one, and no password."""
    with socket.socket() as unused:
        unused.bind((LOOPBACK, 0))
        port = unused.getsockname()[1]
    dsn = f"postgresql://eq:pa55word@{LOOPBACK}:{port}/eqdb"
    document = equalizer_config([backends("b1").url], rate_limit={
        "enabled": True, "store": "postgres", "database_url": dsn})
    process = await twistd_process(document, http)
    await wait_until(lambda: OUTAGE in process.output(), message="the store's error line")
    (line, *_) = [line for line in process.output().splitlines() if OUTAGE in line]
    assert line.endswith(
        f"{OUTAGE} bucket store unavailable: PostgreSQL at "
        f"eq@{LOOPBACK}:{port}/eqdb: Connection refused; Is the server running on that host "
        "and accepting TCP/IP connections?; retrying every 2s")
    assert "pa55word" not in process.output()


@pytest_twisted.ensureDeferred
async def test_stop_while_migrating_is_quiet(twistd_process, http, backends, postgres_dsn):
    """SIGTERM while the start-up migration waits (another instance holds its lock) stops
    cleanly: the migration's connection is closed without a traceback in the log."""
    document = equalizer_config([backends("b1").url], rate_limit={
        "enabled": True, "store": "postgres", "database_url": postgres_dsn})
    holder = await held_migration_lock(postgres_dsn)
    try:
        process = await twistd_process(document, http)
        output = await process.stop()
    finally:
        holder.close()
    assert "Server Shut Down." in output
    assert "Traceback" not in output and "Unhandled" not in output, output
