"""What an operator is told at start-up: ``--version``, the ``--help`` text on signals and
environment variables, ``--check``, and the summary block logged when the service starts.

The summary says what is running, from where, with what: the version, the file read
(or that the built-in defaults are in use), the store and its target (never its
password), the backends, the listeners and the dashboard's address.
"""

from __future__ import annotations

import os
import platform
import sys
import textwrap
from collections.abc import Callable, Iterator

from twisted.logger import Logger

import twisted
from equalizer import __version__
from equalizer.config.checks import database_target
from equalizer.config.loader import (
    DEFAULT_CONFIG_PATH,
    ENV_ADMIN_TOKEN,
    ENV_DATABASE_URL,
    ConfigError,
)
from equalizer.config.model import Config
from equalizer.listeners import listen_address

log = Logger()

HELP = f"""Signals: SIGHUP re-reads the configuration file and applies it (an invalid file changes
nothing; listeners, the admin token, the store and the log file change only on restart).
SIGTERM (and SIGINT) stops accepting, waits up to proxy.timeouts.shutdown for requests in
flight, then exits. SIGUSR1 reopens the log file (for logrotate).

Environment: {ENV_DATABASE_URL} is the PostgreSQL DSN of the bucket store (over the file's
rate_limit.database_url, under --database-url); {ENV_ADMIN_TOKEN} is the admin API's bearer
token (over admin.token). Empty counts as unset.

--check reads and validates the file, flags and environment as start-up does, prints
the summary or the problems and exits 0 or 1; it binds no port and connects to no
database.
"""

def help_text(width: int) -> str:
    """HELP wrapped to ``width``, its paragraphs kept apart (``--help`` ends with it)."""
    return "".join("\n" + textwrap.fill(" ".join(paragraph.split()), width) + "\n"
                   for paragraph in HELP.split("\n\n") if paragraph.strip())


SHOWN_BACKENDS = 10
"""Backends named one by one in the summary; the rest are counted."""


def version_text() -> str:
    """``equalizer 0.1.0 (Twisted 25.5.0, Python 3.11.7)``."""
    return (f"equalizer {__version__} (Twisted {twisted.__version__}, "
            f"Python {platform.python_version()})")


def print_config_error(error: ConfigError) -> None:
    """Each problem on standard error as ``config error: ...``, as start-up reports it."""
    for problem in error.problems:
        print(f"config error: {problem}", file=sys.stderr)


def check(read: Callable[[], Config], path: str | None) -> int:
    """``--check``: validate as start-up would, print the summary or the problems.

    Returns:
        the exit status: 0 for a usable configuration, 1 otherwise.
    """
    try:
        config = read()
    except ConfigError as error:
        print_config_error(error)
        return 1
    for line in summary(config, path):
        print(line)
    print(f"configuration OK: {describe_source(path)}")
    return 0


def describe_source(path: str | None) -> str:
    """The file read, as an absolute path, or the built-in defaults and why."""
    if path is None:
        return (f"built-in defaults (no --config, and no {DEFAULT_CONFIG_PATH} "
                f"in {os.getcwd()})")
    return os.path.abspath(path)


Address = tuple[str, int]


def log_summary(config: Config, path: str | None, proxy: Address | None,
                admin: Address | None) -> None:
    """The start-up block, one line each, at info level (``equalizer.startup``); ``proxy``
    and ``admin`` are the addresses bound so far (None: not yet, or not TCP)."""
    for line in summary(config, path, proxy, admin, pid=os.getpid()):
        log.info("{line}", line=line)


def summary(config: Config, path: str | None, proxy: Address | None = None,
            admin: Address | None = None, pid: int | None = None) -> list[str]:
    """The summary block's lines; ``proxy`` and ``admin`` are where the listeners are
    bound, when they are (else the endpoint strings say), ``pid`` the running process."""
    running = f", pid {pid}" if pid is not None else ""
    return [f"{version_text()}{running}",
            f"config: {describe_source(path)}",
            *_store_lines(config),
            *_backend_lines(config),
            f"proxy: {config.proxy.listen}{_bound(config.proxy.listen, proxy)}"
            + (" (opens once the bucket store has answered, within 10s)"
               if proxy is None and config.rate_limit.store == "postgres" else "")
            + (f", {config.proxy.workers} worker processes" if config.proxy.workers > 1 else ""),
            f"admin: {config.admin.listen}{_bound(config.admin.listen, admin)} "
            + ("(bearer token required)" if config.admin.token else "(no token)"),
            f"dashboard: {dashboard_url(config.admin.listen, admin)}"]


def _bound(endpoint: str, address: Address | None) -> str:
    """`` (port N)`` for an endpoint on port 0 that is bound; else nothing."""
    wanted = listen_address(endpoint)
    if address is None or wanted is None or wanted[1]:
        return ""
    return f" (port {address[1]})"


def _store_lines(config: Config) -> Iterator[str]:
    rate_limit = config.rate_limit
    if rate_limit.store == "postgres":
        yield f"store: postgres {database_target(rate_limit.database_url or '')} (leased tokens)"
    else:
        yield f"store: memory (at most {rate_limit.max_buckets:,} buckets)"
    if not rate_limit.enabled:
        yield "rate limit: off"
        return
    default = rate_limit.default
    policy = (f"default {default.capacity} tokens, {default.refill_rate:g}/s"
              if default is not None else "no default (clients without a bucket are not limited)")
    yield (f"rate limit: key {rate_limit.key}, {policy}, "
           f"on_store_error {rate_limit.on_store_error}")


def _backend_lines(config: Config) -> Iterator[str]:
    backends = config.balancer.backends
    named = [f"{backend.url} (weight {backend.weight})" for backend in backends[:SHOWN_BACKENDS]]
    if len(backends) > SHOWN_BACKENDS:
        named.append(f"and {len(backends) - SHOWN_BACKENDS} more")
    yield f"backends ({len(backends)}, {config.balancer.strategy}): {', '.join(named)}"
    for pool in config.pools:  # SPEC 8: only when configured, so the block is as before
        yield (f"pool {pool.name} ({len(pool.balancer.backends)}, {pool.balancer.strategy}): "
               + ", ".join(backend.url for backend in pool.balancer.backends[:SHOWN_BACKENDS]))
    if config.routes:
        yield (f"routes: {len(config.routes)}; rate-limit policies: "
               + ", ".join(config.rate_limit.all_policies()))


def dashboard_url(endpoint: str, bound: Address | None = None) -> str:
    """The dashboard's address from the admin endpoint (``bound``: its bound address, for
    port 0); a wildcard interface is shown as ``localhost``."""
    scheme = "https" if endpoint.startswith("ssl:") else "http"
    address = bound or listen_address(endpoint)
    if address is None:
        return f"/dashboard on {endpoint}"
    host, port = address
    if host in ("", "0.0.0.0", "::"):
        host = "localhost"
    elif ":" in host:
        host = f"[{host}]"
    if not port:
        return f"{scheme}://{host}:PORT/dashboard (port chosen at start-up)"
    return f"{scheme}://{host}:{port}/dashboard"
