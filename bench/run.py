"""Benchmark equalizer against other reverse proxies on this machine.

One fixed nginx backend (serving /1k and /100k) runs with wrk on CPU 1; each proxy
under test runs alone on CPU 0. Repetitions are interleaved (rep 1: A B C D,
rep 2: A B C D, ...) so drift in a noisy machine hits every proxy alike. The
result is a markdown table of medians, plus the raw numbers as JSON.

Usage (see bench/README.md):

    python bench/run.py [--quick] [--reps 3] [--duration 10]
                        [--only equalizer,stock,aiohttp,nginx] [--scenarios 1k-c32,...]

Only loopback addresses are ever used. Every process the harness starts runs in
its own process group and is stopped by PID when the harness ends, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
sys.path.insert(0, str(REPO_DIR))

from tests.pg_cluster import ClusterUnavailable, free_port, start_cluster  # noqa: E402

DEFAULT_OUTPUT = BENCH_DIR / "results" / "latest.json"

PROXY_CPU = "0"  # the proxy under test has this core to itself
CLIENT_CPU = "1"  # wrk and the backend nginx share the other one
WARMUP_SECONDS = 2
READY_TIMEOUT = 30.0
WRK_TIMEOUT = "5s"  # a response slower than this counts as a wrk timeout error
STOP_GRACE = 5.0  # seconds between SIGTERM and SIGKILL

# Equalizer keeps the product default (one access-log line per request), written
# to a temp file rather than stdout. Set to False to measure without it.
EQUALIZER_ACCESS_LOG = True

DATABASE_URL_ENV = "EQUALIZER_BENCH_DATABASE_URL"
LOOPBACK_HOSTS = {"localhost", "::1", ""}

CLIENT_HEADER = "X-Client"
CONSTANT_CLIENT = "bench-client"
BIG_BUCKET = {"capacity": 1_000_000_000, "refill_rate": 1_000_000_000}  # never refuses
BODIES = {"/1k": 1024, "/100k": 100 * 1024}
PROXIES = ("equalizer", "stock", "aiohttp", "nginx")
BASELINE_PROXY = "stock"
EARLIER_EQUALIZER = "equalizer-before"
"""With ``--baseline REF``: equalizer as of commit REF, run beside the working tree's."""


class BenchError(Exception):
    """A run that could not be measured; becomes an error row, not a crash."""


# --------------------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Scenario:
    """One load shape: which body, how many connections, which limiter setup."""

    name: str
    path: str
    connections: int
    proxies: tuple[str, ...] = PROXIES
    limiter: str | None = None  # None: rate limiting off; else the store name
    keys: int = 0  # client keys: 1 is the client address (SPEC's default `ip`, no header);
    # more are that many X-Client values (key `header:X-Client`)
    baseline: str | None = None  # scenario whose stock median is the ratio base
    routes: int = 0  # routes configured (SPEC 8); the request matches the last one only
    workers: int = 1  # equalizer's proxy.workers
    cpus: str = PROXY_CPU  # where the proxy runs (its workers share these cores)


SCENARIOS = (
    Scenario("1k-c32", "/1k", 32),
    Scenario("1k-c128", "/1k", 128),
    Scenario("1k-c256", "/1k", 256),
    Scenario("100k-c32", "/100k", 32),
    # 1k-c32 beside itself: what a ratio to a base measured in turns reads with no cost.
    Scenario("1k-c32-control", "/1k", 32, ("equalizer",), baseline="1k-c32"),
    Scenario("1k-c32-limit-memory", "/1k", 32, ("equalizer",), "memory", 1, baseline="1k-c32"),
    Scenario("1k-c32-limit-pg-1key", "/1k", 32, ("equalizer",), "postgres", 1, baseline="1k-c32"),
    # The requests of the 10,000-key run with the limiter off: that run's base, so its ratio
    # is the limiter's cost, not that of one more header and of wrk's script.
    Scenario("1k-c32-keys-10k", "/1k", 32, ("equalizer",), keys=10_000, baseline="1k-c32"),
    Scenario(
        "1k-c32-limit-pg-10k", "/1k", 32, ("equalizer",), "postgres", 10_000,
        baseline="1k-c32-keys-10k",
    ),
    # The same 10,000 keys on the memory store: what the keys cost apart from the database.
    Scenario(
        "1k-c32-limit-memory-10k", "/1k", 32, ("equalizer",), "memory", 10_000,
        baseline="1k-c32-keys-10k",
    ),
    *(Scenario(f"1k-c32-routes-{n}", "/1k", 32, ("equalizer",), baseline="1k-c32", routes=n)
      for n in (1, 10, 200)),
    # Workers (SPEC 9): the proxy may use both cores (wrk and the backend still share CPU 1),
    # one process against two, same load; compare the two rows with each other.
    Scenario("1k-c64-workers-1", "/1k", 64, ("equalizer",), cpus="0,1"),
    Scenario("1k-c64-workers-2", "/1k", 64, ("equalizer",), workers=2, cpus="0,1",
             baseline="1k-c64-workers-1"),
)

SCENARIOS_BY_NAME = {s.name: s for s in SCENARIOS}
QUICK_SCENARIOS = ("1k-c32",)

KEYS_SCRIPT = """\
-- Each request carries the next of {keys} client keys, so the limiter sees {keys} buckets.
local n = 0
request = function()
  n = (n % {keys}) + 1
  wrk.headers["{header}"] = "bench-client-" .. n
  return wrk.format()
end
"""


# --------------------------------------------------------------------------- processes


class ProcessGroup:
    """Every child the harness starts, each in its own process group.

    Children get their own session so a terminal Ctrl-C reaches only the
    harness, which then stops them itself, group by group, by PID.
    """

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen] = []

    def start(
        self, argv: list[str], log_path: Path, cwd: Path | None = None, env=None
    ) -> subprocess.Popen:
        """Start ``argv`` with stdout and stderr appended to ``log_path``."""
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env,
                start_new_session=True,
            )
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        """SIGTERM the child's group, SIGKILL it if still there after STOP_GRACE."""
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait()
        if proc in self._procs:
            self._procs.remove(proc)

    def stop_all(self) -> None:
        """Stop every child still registered, newest first."""
        for proc in reversed(list(self._procs)):
            self.stop(proc)


def _signal_group(pgid: int, sig: int) -> None:
    """Signal a process group we created, ignoring one that is already gone."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def pinned(cpu: str, argv: list[str]) -> list[str]:
    """``argv`` run with ``taskset`` on one CPU."""
    return ["taskset", "-c", cpu, *argv]


def log_tail(path: Path, lines: int = 12) -> str:
    """The last lines of a child's log, for error rows."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# --------------------------------------------------------------------------- tools


def find_binary(name: str) -> str | None:
    """Path of ``name`` on PATH or in the sbin directories (nginx lives there)."""
    extra = os.pathsep.join(["/usr/sbin", "/usr/local/sbin", "/sbin"])
    return shutil.which(name, path=os.environ.get("PATH", "") + os.pathsep + extra)


def ensure_apt_packages(binaries: dict[str, str]) -> None:
    """Install the Debian package of each missing binary (``apt-get update`` if needed)."""
    missing = sorted({pkg for binary, pkg in binaries.items() if not find_binary(binary)})
    if not missing:
        return
    if os.geteuid() != 0:
        raise SystemExit(f"bench: missing {', '.join(missing)}; install them (apt-get) first")
    print(f"installing {' '.join(missing)} with apt-get ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", *missing]
    if subprocess.run(install, env=env, stdout=subprocess.DEVNULL).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, stdout=subprocess.DEVNULL, check=True)
        subprocess.run(install, env=env, stdout=subprocess.DEVNULL, check=True)


def ensure_python_packages(modules: dict[str, str]) -> None:
    """pip-install into this interpreter's environment each module it cannot import."""
    missing = [pkg for module, pkg in modules.items() if importlib.util.find_spec(module) is None]
    if missing:
        print(f"installing {' '.join(missing)} with pip ...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *missing], check=True)


def tool_versions() -> dict[str, str]:
    """Versions of what was measured, for the JSON record."""

    def first_line(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return "?"
        lines = (out.stdout + out.stderr).strip().splitlines()
        return lines[0] if lines else "?"

    versions = {
        "python": platform.python_version(),
        "nginx": first_line([find_binary("nginx") or "nginx", "-v"]),
        "wrk": first_line(["wrk", "--version"]),
        "git": git_revision(),
    }
    for module in ("twisted", "aiohttp"):
        try:
            versions[module] = __import__(module).__version__
        except ImportError:
            pass
    return versions


def git_revision() -> str:
    """The checked-out commit, with ``+dirty`` when the tree has changes."""
    git = ["git", "-C", str(REPO_DIR)]
    try:
        head = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        dirty = subprocess.run([*git, "status", "--porcelain"], capture_output=True, text=True)
    except OSError:
        return "?"
    if head.returncode != 0:
        return "no commit"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


# --------------------------------------------------------------------------- database


def check_loopback_dsn(dsn: str) -> None:
    """Refuse a database that is not on this machine: load goes to loopback only."""
    if "://" in dsn:
        host = urlsplit(dsn).hostname or ""
    else:
        match = re.search(r"(?:^|\s)host\s*=\s*(\S+)", dsn)
        host = match.group(1) if match else ""
    if host.startswith("/") or host.startswith("127.") or host in LOOPBACK_HOSTS:
        return
    raise SystemExit(f"bench: database host {host!r} is not loopback; refusing to load it")


class OwnCluster:
    """The default database: a throw-away cluster of the harness's own, pinned to
    CLIENT_CPU with the load generator, so the proxy's core stays the proxy's alone
    (the machine's own PostgreSQL service would run on either core)."""

    def __init__(self) -> None:
        self._cluster = None

    def create(self) -> str:
        """Start the cluster and return its URL."""
        try:
            self._cluster = start_cluster(launcher=tuple(pinned(CLIENT_CPU, [])))
        except ClusterUnavailable as exc:
            raise SystemExit(f"bench: {exc}; or name a server with --database-url") from exc
        return self._cluster.url

    def another(self, name: str) -> str:
        """One more database in the cluster (gone with it); its URL."""
        return create_database(self._cluster.url, name)

    @property
    def server_pid(self) -> int | None:
        """The cluster's postmaster (its backends are its children), None when not running."""
        if self._cluster is None:
            return None
        with open(Path(self._cluster.data) / "postmaster.pid") as pidfile:
            return int(pidfile.readline())

    def drop(self) -> None:
        """Stop the cluster and delete it."""
        if self._cluster is not None:
            self._cluster.remove()
            self._cluster = None


def create_database(url: str, name: str) -> str:
    """Create database ``name`` on the server of ``url`` and return its URL."""
    import psycopg2

    conn = psycopg2.connect(url, connect_timeout=5)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()
    return urlunsplit(urlsplit(url)._replace(path="/" + name))


class ScratchDatabase:
    """A throw-away database next to the given one, so runs start from empty tables.

    Falls back to the given database when it cannot create one (no psycopg2, no
    CREATEDB right, a key=value DSN): the results then include buckets left over
    from earlier runs, which is harmless with the huge default bucket.
    """

    def __init__(self, url: str) -> None:
        self.given = url
        self.url = url
        self._name: str | None = None
        self._others: list[str] = []

    def another(self, name: str) -> str:
        """One more throw-away database beside the scratch one; its URL."""
        url = create_database(self.url, name)
        self._others.append(name)
        return url

    def create(self) -> str:
        """Create the scratch database and return the URL to use."""
        parts = urlsplit(self.given)
        if "://" not in self.given or importlib.util.find_spec("psycopg2") is None:
            return self.url
        name = f"equalizer_bench_{os.getpid()}"
        try:
            self._execute(f'CREATE DATABASE "{name}"')
        except Exception as exc:  # noqa: BLE001 - any failure means "use the given one"
            print(f"bench: using {self.given} as is (no scratch database: {exc})", flush=True)
            return self.url
        self._name = name
        self.url = urlunsplit(parts._replace(path="/" + name))
        return self.url

    def drop(self) -> None:
        """Drop the scratch databases, if any were made."""
        for name in [*self._others, *([self._name] if self._name else [])]:
            try:
                self._execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            except Exception as exc:  # noqa: BLE001
                print(f"bench: could not drop database {name}: {exc}", flush=True)
        self._name = None
        self._others = []

    def _execute(self, statement: str) -> None:
        import psycopg2

        conn = psycopg2.connect(self.given, connect_timeout=5)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(statement)
        finally:
            conn.close()


# --------------------------------------------------------------------------- servers


@dataclass
class Context:
    """What every run needs: the temp dir, the children, the backend, the settings."""

    tmp: Path
    processes: ProcessGroup
    duration: int
    database_url: str
    earlier_database_url: str = ""  # --baseline: the earlier equalizer's, with its own schema
    backend_port: int = 0
    counter: int = 0
    wrk_scripts: dict[int, Path] = field(default_factory=dict)
    earlier_tree: Path = REPO_DIR  # --baseline: the exported tree of the earlier commit
    database_pid: int | None = None  # the harness's own cluster: its CPU time is recorded

    def new_dir(self, label: str) -> Path:
        """A fresh directory for one server's files."""
        self.counter += 1
        path = self.tmp / f"{self.counter:03d}-{label}"
        path.mkdir()
        return path

    @property
    def backend_url(self) -> str:
        return f"http://127.0.0.1:{self.backend_port}"


@dataclass
class Server:
    """A proxy under test: where it listens and keeps its files, and its process."""

    workdir: Path
    port: int
    admin_port: int  # equalizer's admin API; unused by the others
    proc: subprocess.Popen | None = None

    @property
    def log(self) -> Path:
        return self.workdir / "stdout.log"

    def log_tails(self) -> str:
        """The end of its output and, for equalizer, of its log file."""
        return "\n".join(
            tail for tail in (log_tail(self.log), log_tail(self.workdir / "equalizer.log")) if tail
        )


def nginx_config(workdir: Path, server_block: str) -> Path:
    """Write a self-contained nginx.conf: foreground, one worker, everything in workdir."""
    user = "user root;" if os.geteuid() == 0 else ""
    temp_paths = "\n".join(
        f"  {kind}_temp_path {workdir / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = f"""\
daemon off;
master_process on;
worker_processes 1;
{user}
pid {workdir / "nginx.pid"};
error_log {workdir / "error.log"} warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  default_type application/octet-stream;
  sendfile on;
  tcp_nopush on;
  tcp_nodelay on;
  keepalive_timeout 65s;
  keepalive_requests 1000000;
{temp_paths}
{server_block}
}}
"""
    path = workdir / "nginx.conf"
    path.write_text(conf)
    return path


def nginx_argv(workdir: Path, conf: Path) -> list[str]:
    """The nginx command line for a config written by ``nginx_config``."""
    nginx = find_binary("nginx") or "nginx"
    return [nginx, "-p", str(workdir), "-c", str(conf), "-e", str(workdir / "error.log")]


def start_backend(ctx: Context) -> None:
    """Start the fixed nginx backend on CLIENT_CPU and wait until it answers."""
    workdir = ctx.new_dir("backend")
    www = workdir / "www"
    www.mkdir()
    for path, size in BODIES.items():
        (www / path.lstrip("/")).write_bytes(b"x" * size)
    port = free_port()
    server = f"""\
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{ root {www}; }}
  }}"""
    conf = nginx_config(workdir, server)
    log = workdir / "stdout.log"
    proc = ctx.processes.start(pinned(CLIENT_CPU, nginx_argv(workdir, conf)), log)
    try:
        wait_ready(proc, port, "/1k")
    except BenchError as exc:
        tail = log_tail(workdir / "error.log") or log_tail(log)
        raise SystemExit(f"bench: backend nginx did not start: {exc}\n{tail}") from exc
    ctx.backend_port = port


def equalizer_config(ctx: Context, server: Server, scenario: Scenario,
                     earlier: bool = False) -> Path:
    """Write the equalizer YAML for one run (JSON syntax, which YAML reads as is); the
    earlier equalizer (``--baseline``) uses a database of its own."""
    rate_limit: dict = {"enabled": False}
    if scenario.limiter:
        rate_limit = {
            "enabled": True,
            "key": f"header:{CLIENT_HEADER}" if scenario.keys > 1 else "ip",
            "default": BIG_BUCKET,
            "store": scenario.limiter,
        }
        if scenario.limiter == "postgres":
            rate_limit["database_url"] = (
                ctx.earlier_database_url if earlier and ctx.earlier_database_url
                else ctx.database_url)
    config = {
        "proxy": {
            "listen": f"tcp:{server.port}:interface=127.0.0.1",
            "timeouts": {"shutdown": "1s"},
            **({"workers": scenario.workers} if scenario.workers != 1 else {}),
        },
        "admin": {"listen": f"tcp:{server.admin_port}:interface=127.0.0.1"},
        "balancer": {"backends": [{"url": ctx.backend_url}]},
        "health": {"path": "/1k", "interval": "30s"},
        "rate_limit": rate_limit,
        "logging": {
            "level": "warn",
            "file": str(server.workdir / "equalizer.log"),
            "access_log": EQUALIZER_ACCESS_LOG,
        },
    }
    if scenario.routes:
        config["routes"] = bench_routes(scenario.routes, scenario.path)
    path = server.workdir / "equalizer.yml"
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


def bench_routes(count: int, path: str) -> list[dict]:
    """``count`` routes of which only the last matches ``path``: the others differ in host,
    path prefix, method or a header value, so the matcher weighs every kind of condition
    before it finds the match."""
    def other(i: int) -> dict:
        return [{"match": {"host": f"svc{i}.example.com"}},
                {"match": {"path_prefix": f"/svc{i}/"}},
                {"match": {"path_prefix": path, "methods": ["POST"]}},
                {"match": {"path_prefix": path, "headers": {"X-Route": f"r{i}"}}}][i % 4]

    routes = [other(i) for i in range(count - 1)]
    return [*routes, {"match": {"path_prefix": path}, "pool": "default"}]


def proxy_argv(ctx: Context, name: str, server: Server, scenario: Scenario) -> list[str]:
    """The command line that serves proxy ``name`` on ``server.port`` (not yet pinned)."""
    workdir, port = server.workdir, server.port
    if name in ("equalizer", EARLIER_EQUALIZER):
        config = equalizer_config(ctx, server, scenario, earlier=name == EARLIER_EQUALIZER)
        twistd = "from twisted.scripts.twistd import run; run()"
        pidfile = str(workdir / "twistd.pid")
        return [sys.executable, "-c", twistd, "-n", "--pidfile", pidfile,
                "equalizer", "--config", str(config)]  # fmt: skip
    if name == "stock":
        return [sys.executable, str(BENCH_DIR / "stock_proxy.py"),
                "--port", str(port), "--backend-port", str(ctx.backend_port)]  # fmt: skip
    if name == "aiohttp":
        return [sys.executable, str(BENCH_DIR / "aiohttp_proxy.py"),
                "--port", str(port), "--backend", ctx.backend_url]  # fmt: skip
    if name == "nginx":
        server = f"""\
  upstream backend {{
    server 127.0.0.1:{ctx.backend_port};
    keepalive 64;
  }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}"""
        return nginx_argv(workdir, nginx_config(workdir, server))
    raise ValueError(f"unknown proxy {name!r}")


def child_env() -> dict[str, str]:
    """The environment for proxies: equalizer's own variables removed, so the file rules."""
    return {k: v for k, v in os.environ.items() if not k.startswith("EQUALIZER_")}


def start_proxy(ctx: Context, name: str, scenario: Scenario) -> Server:
    """Start proxy ``name`` on PROXY_CPU, on fresh loopback ports."""
    server = Server(ctx.new_dir(name), free_port(), free_port())
    argv = pinned(scenario.cpus, proxy_argv(ctx, name, server, scenario))
    server.proc = ctx.processes.start(argv, server.log, cwd=source_dir(ctx, name),
                                      env=child_env())
    return server


def source_dir(ctx: Context, name: str) -> Path:
    """Where a proxy runs from: the earlier equalizer from its exported tree (the
    interpreter finds ``equalizer`` in its working directory first), the rest here."""
    return ctx.earlier_tree if name == EARLIER_EQUALIZER else REPO_DIR


def export_tree(ref: str, into: Path) -> Path:
    """The files of commit ``ref`` (``git archive``), for the earlier equalizer."""
    into.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO_DIR), "archive", ref],
                             capture_output=True, check=False)  # fmt: skip
    if archive.returncode != 0:
        raise SystemExit(f"bench: cannot export {ref!r}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def runs_in(scenario: Scenario, proxy: str) -> bool:
    """Whether ``proxy`` runs in ``scenario`` (the earlier equalizer wherever equalizer does)."""
    if proxy == EARLIER_EQUALIZER:
        proxy = "equalizer"
    return proxy in scenario.proxies


def admin_get(server: Server, path: str) -> tuple[int, bytes] | None:
    """Status and body of a GET of ``path`` on equalizer's admin API (None if unreachable)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.admin_port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def count_buckets(server: Server) -> int | None:
    """How many buckets equalizer's admin API lists (None if it cannot tell)."""
    answer = admin_get(server, "/buckets?limit=1")
    if answer is None or answer[0] != 200:
        return None
    try:
        return json.loads(answer[1])["total"]
    except (ValueError, KeyError, TypeError):
        return None


LEASE_COUNTERS = ("waits", "settlements", "settled_keys")
"""The postgres limiter's lease counters of /metrics (``equalizer_lease_<name>_total``)."""


def lease_counters(server: Server) -> dict[str, float]:
    """The lease counters equalizer's /metrics shows now (empty if it cannot tell)."""
    answer = admin_get(server, "/metrics")
    if answer is None:
        return {}
    text = answer[1].decode("utf-8", "replace")
    found = {}
    for name in LEASE_COUNTERS:
        match = re.search(rf"^equalizer_lease_{name}_total (\S+)$", text, re.MULTILINE)
        if match:
            found[name] = float(match[1])
    return found


def wait_ready(
    proc: subprocess.Popen,
    port: int,
    path: str,
    limiter: bool = False,
    timeout: float = READY_TIMEOUT,
) -> int:
    """Poll until ``GET path`` on ``port`` answers 200; fail if the process dies first.

    With ``limiter``, a 200 must also carry a RateLimit header (the answer really
    went through the rate limiter), so a store still connecting is waited for.
    Returns how many 200 answers came without one before that.
    """
    deadline = time.monotonic() + timeout
    last, unlimited = "no answer", 0
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"exited with status {proc.returncode} before it was ready")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request("GET", path, headers={CLIENT_HEADER: CONSTANT_CLIENT})
            response = conn.getresponse()
            response.read()
            if response.status == 200 and (not limiter or has_limit_headers(response.headers)):
                return unlimited
            if response.status == 200:
                unlimited += 1
                last = "200 without RateLimit header: is the rate limiter on?"
            else:
                last = f"HTTP {response.status}"
        except (OSError, http.client.HTTPException) as exc:
            last = str(exc) or type(exc).__name__
        finally:
            conn.close()
        time.sleep(0.1)
    raise BenchError(f"not ready after {timeout:.0f}s ({last})")


def has_limit_headers(headers: http.client.HTTPMessage) -> bool:
    """Whether an answer carries the RateLimit fields of SPEC section 5 (either draft)."""
    return bool(headers.get("RateLimit-Policy") or headers.get("RateLimit-Limit"))


# --------------------------------------------------------------------------- wrk


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def parse_wrk(output: str) -> dict:
    """requests/s, p50/p99 (ms), non-2xx and socket errors from ``wrk --latency`` output."""
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.M)
    if not rps:
        raise BenchError("could not read wrk output: " + output.strip()[-300:])
    latency = {
        pct: float(value) * _UNITS_MS[unit]
        for pct, value, unit in re.findall(
            r"^\s+(50|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\s*$", output, re.M
        )
    }
    total = re.search(r"^\s*(\d+) requests in", output, re.M)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    sock = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    counts = map(int, sock.groups()) if sock else (0, 0, 0, 0)
    socket_errors = dict(zip(("connect", "read", "write", "timeout"), counts, strict=True))
    return {
        "rps": float(rps.group(1)),
        "p50_ms": latency.get("50"),
        "p99_ms": latency.get("99"),
        "requests": int(total.group(1)) if total else None,
        "non2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": socket_errors,
        "errors": (int(non2xx.group(1)) if non2xx else 0) + sum(socket_errors.values()),
    }


def wrk_script(ctx: Context, keys: int) -> Path:
    """The Lua script that spreads requests over ``keys`` client keys (written once)."""
    if keys not in ctx.wrk_scripts:
        path = ctx.tmp / f"keys-{keys}.lua"
        path.write_text(KEYS_SCRIPT.format(keys=keys, header=CLIENT_HEADER))
        ctx.wrk_scripts[keys] = path
    return ctx.wrk_scripts[keys]


def run_wrk(ctx: Context, port: int, scenario: Scenario, seconds: int) -> dict:
    """Run wrk on CLIENT_CPU against ``port`` for ``seconds``; return the parsed numbers."""
    argv = ["wrk", "-t1", f"-c{scenario.connections}", f"-d{seconds}s",
            "--latency", "--timeout", WRK_TIMEOUT]  # fmt: skip
    if scenario.keys > 1:
        argv += ["-s", str(wrk_script(ctx, scenario.keys))]
    argv.append(f"http://127.0.0.1:{port}{scenario.path}")
    out = ctx.new_dir("wrk") / "wrk.out"
    proc = ctx.processes.start(pinned(CLIENT_CPU, argv), out)
    try:
        proc.wait(timeout=seconds + 30)
    except subprocess.TimeoutExpired as exc:
        raise BenchError("wrk did not finish in time") from exc
    finally:
        ctx.processes.stop(proc)
    text = out.read_text(errors="replace")
    return {**parse_wrk(text), "wrk_output": text}


MAX_WARMUP_SECONDS = 32


LEASES_WARMUP_SECONDS = 12
"""Least warm-up of a run on the PostgreSQL limiter: past ``max_age`` (10 s), by when
every key renews its lease at its own pace (its first lease is renewed at half of
``max_age``, its pace unknown). After 2 s the measured run held every key's second lease
at once: with 4,000 keys, 4,001 rows in each 8 s run whatever the renewal rule, against
16,001 and 21,000 in 30 s runs of the new and the old rule."""


def least_warmup(scenario: Scenario) -> int:
    """Seconds a run of ``scenario`` warms up at least."""
    return LEASES_WARMUP_SECONDS if scenario.limiter == "postgres" else WARMUP_SECONDS


def warm_up(ctx: Context, port: int, scenario: Scenario) -> None:
    """wrk for WARMUP_SECONDS (LEASES_WARMUP_SECONDS on PostgreSQL). A keyed scenario warms
    up until one wrk run has sent every key (wrk's script starts from the first key again
    in each run), doubling the run's length up to MAX_WARMUP_SECONDS: a key seen first in
    the measured run waits for a statement there, so a warm-up slowed by those first
    sights left a varying share of the 10,000 keys (0 to 3,000 waits a run) to count
    against the limiter's steady state."""
    seconds = WARMUP_SECONDS
    warmed = 0
    while True:
        sent = run_wrk(ctx, port, scenario, seconds)["requests"] or 0
        warmed += seconds
        if scenario.keys <= 1 or sent >= scenario.keys or seconds >= MAX_WARMUP_SECONDS:
            break
        seconds *= 2
    if warmed < least_warmup(scenario):
        run_wrk(ctx, port, scenario, least_warmup(scenario) - warmed)


# --------------------------------------------------------------------------- memory


def _status_kib(pid: int, field_name: str) -> int:
    """One ``kB`` field of /proc/PID/status, 0 when the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _descendants(pid: int) -> list[int]:
    """``pid`` and all its descendants (nginx's workers, for instance)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as children:
                    todo.extend(int(child) for child in children.read().split())
        except OSError:
            pass
    return found


def process_cpu_seconds(pid: int) -> float:
    """User and system CPU seconds of ``pid`` and its descendants so far, from /proc."""
    ticks = 0
    for member in _descendants(pid):
        try:
            with open(f"/proc/{member}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def cpu_times() -> dict[str, tuple[int, int]]:
    """(busy, total) jiffies of each core since boot, from /proc/stat."""
    times = {}
    with open("/proc/stat") as stat:
        for line in stat:
            name, *fields = line.split()
            if name.startswith("cpu") and name != "cpu":
                ticks = [int(field) for field in fields]
                idle = ticks[3] + ticks[4]  # idle and iowait
                times[name] = (sum(ticks) - idle, sum(ticks))
    return times


class RssSampler(threading.Thread):
    """Peak resident memory of a process tree while a run lasts.

    The peak is the larger of the sampled sum of VmRSS over the tree and the
    main process's own VmHWM (its exact high-water mark, read at the end).
    """

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.peak_kib = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.interval):
            total = sum(_status_kib(pid, "VmRSS") for pid in _descendants(self.pid))
            self.peak_kib = max(self.peak_kib, total)

    def finish(self) -> int:
        """Stop sampling and return the peak in KiB."""
        self._done.set()
        self.join()
        return max(self.peak_kib, _status_kib(self.pid, "VmHWM"))


# --------------------------------------------------------------------------- runs


TURN_SECONDS = 1
"""A scenario with a base runs beside it, measured in turns of about this many seconds."""


@dataclass
class Measured:
    """What one proxy's measured seconds added up to: one wrk run, or its turns of a
    paired run (wrk's figures summed; latencies the worst turn's)."""

    results: list[dict] = field(default_factory=list)
    cpu_seconds: float = 0.0  # the proxy's own (user and system, its process tree)
    database_seconds: float = 0.0  # the harness's cluster's, when one is watched
    cores: dict[str, list[int]] = field(default_factory=dict)  # core: [busy, total] jiffies

    def add(self, ctx: Context, server: Server, scenario: Scenario, seconds: int,
            database_pid: int | None) -> None:
        """Measure ``server`` under ``scenario``'s load for ``seconds`` more."""
        cores_before = cpu_times()
        before = (process_cpu_seconds(server.proc.pid),
                  process_cpu_seconds(database_pid) if database_pid else 0.0)
        self.results.append(run_wrk(ctx, server.port, scenario, seconds))
        self.cpu_seconds += process_cpu_seconds(server.proc.pid) - before[0]
        if database_pid:
            self.database_seconds += process_cpu_seconds(database_pid) - before[1]
        for core, (busy, total) in cpu_times().items():
            tally = self.cores.setdefault(core, [0, 0])
            tally[0] += busy - cores_before[core][0]
            tally[1] += total - cores_before[core][1]

    def wrk(self) -> dict:
        """wrk's figures over every turn (a single run's as wrk gave them)."""
        if len(self.results) == 1:
            return self.results[0]
        if not all(r["requests"] and r["rps"] for r in self.results):
            raise BenchError("a turn of the paired run measured no requests")
        requests = sum(r["requests"] for r in self.results)
        latencies = {key: [r[key] for r in self.results if r[key] is not None]
                     for key in ("p50_ms", "p99_ms")}
        return {
            "rps": requests / sum(r["requests"] / r["rps"] for r in self.results),
            **{key: max(values) if values else None for key, values in latencies.items()},
            "requests": requests,
            "non2xx": sum(r["non2xx"] for r in self.results),
            "socket_errors": {kind: sum(r["socket_errors"][kind] for r in self.results)
                              for kind in self.results[0]["socket_errors"]},
            "errors": sum(r["errors"] for r in self.results),
            "wrk_output": "\n".join(r["wrk_output"] for r in self.results),
        }

    def busy_shares(self) -> dict[str, float]:
        """Each core's busy share over the measured seconds (0.0 to 1.0)."""
        return {core: busy / total if total else 0.0
                for core, (busy, total) in self.cores.items()}


def in_turns(ctx: Context, sides: list[tuple], count: int, seconds: int) -> None:
    """``count`` rounds of a turn of ``seconds`` for each of ``sides`` (its ``Measured``,
    server, scenario and the database's pid to watch), in their order."""
    for _ in range(count):
        for measured, server, scenario, watched in sides:
            measured.add(ctx, server, scenario, seconds, watched)


def warm_up_turns(ctx: Context, sides: list[tuple], seconds: int) -> None:
    """The turns of ``sides`` for ``seconds`` each, measured for nothing."""
    count, each = turns(seconds)
    in_turns(ctx, [(Measured(), *side[1:]) for side in sides], count, each)


def us_per_request(cpu_seconds: float, requests: int) -> float:
    """CPU microseconds per request, as the records give them."""
    return round(cpu_seconds / requests * 1e6, 1)


def turns(seconds: int) -> tuple[int, int]:
    """(turns, seconds per turn) that make about ``seconds`` of a run in turns."""
    count = max(1, seconds // TURN_SECONDS)
    return count, seconds // count


def run_case(ctx: Context, scenario: Scenario, proxy: str, rep: int) -> dict:
    """Start the proxy, warm it up, measure it, stop it. Errors become the record.

    A scenario with a base runs with the same proxy in its base beside it on the proxy's
    core, and the two are measured in turns (base, this, base, this, ...; this first in
    even reps; each ``duration`` seconds in all), so ``base_rps`` and this run's req/s
    come from the same seconds: on this machine the req/s moves by a tenth from one second
    to the next, and the base's own run, a minute away, made the limiter's ratio swing
    0.60-1.24. The turns are warmed up too, for as long as the run's own warm-up lasts
    at least, so leases renew at the pace the turns give their keys before the measuring
    starts (from a plain warm-up, the first renewals in turns made thousands of 10,000
    keys wait).
    """
    record: dict = {"rep": rep, "scenario": scenario.name, "proxy": proxy, "ok": False}
    base = SCENARIOS_BY_NAME[scenario.baseline] if scenario.baseline else None
    servers: list[Server] = []
    try:
        for side in (base, scenario) if base else (scenario,):
            servers.append(start_proxy(ctx, proxy, side))
        server = servers[-1]
        record["pid"] = server.proc.pid
        if base:
            wait_ready(servers[0].proc, servers[0].port, base.path, limiter=bool(base.limiter))
            warm_up(ctx, servers[0].port, base)
        unlimited = wait_ready(server.proc, server.port, scenario.path,
                               limiter=bool(scenario.limiter))
        if unlimited:
            record["answers_before_limiter"] = unlimited  # the store was not ready at start
        warm_up(ctx, server.port, scenario)
        database_pid = ctx.database_pid if scenario.limiter == "postgres" else None
        mine, theirs = Measured(), Measured()
        sides = [(mine, server, scenario, database_pid)]
        if base:
            sides.insert(0 if rep % 2 else 1, (theirs, servers[0], base, None))
            warm_up_turns(ctx, sides, least_warmup(scenario))
        leases_before = lease_counters(server) if scenario.limiter == "postgres" else {}
        sampler = RssSampler(server.proc.pid)
        sampler.start()
        try:
            in_turns(ctx, sides, *(turns(ctx.duration) if base else (1, ctx.duration)))
        finally:
            record["peak_rss_kib"] = sampler.finish()
        result = mine.wrk()
        record["cpu_busy"] = mine.busy_shares()
        if result.get("requests"):  # the proxy's own CPU (user and system) per request
            record["cpu_us_per_request"] = us_per_request(mine.cpu_seconds, result["requests"])
        if database_pid:  # the share of a core the database took during the run
            record["database_busy"] = round(mine.database_seconds / ctx.duration, 3)
        for side_server in servers:
            if side_server.proc.poll() is not None:
                raise BenchError(f"exited with status {side_server.proc.returncode} "
                                 "during the run")
        if leases_before:  # what the measured run cost the limiter's leases
            after = lease_counters(server)
            record["leases"] = {name: after[name] - leases_before[name]
                                for name in leases_before if name in after}
        if scenario.limiter:
            record["buckets"] = count_buckets(server)
        if base:
            theirs_wrk = theirs.wrk()
            record["base_rps"] = theirs_wrk["rps"]
            record["base_cpu_us_per_request"] = us_per_request(theirs.cpu_seconds,
                                                              theirs_wrk["requests"])
        record.update(result, ok=True)
    except BenchError as exc:
        record["error"] = str(exc)
        if servers:
            record["log_tail"] = servers[-1].log_tails()
    finally:
        for side_server in servers:
            if side_server.proc is not None:
                ctx.processes.stop(side_server.proc)
    return record


def plan(scenarios: list[Scenario], proxies: list[str], reps: int) -> list[tuple]:
    """(rep, scenario, proxy) in run order: every proxy once per scenario, per rep."""
    return [(rep, scenario, proxy) for rep in range(1, reps + 1) for scenario in scenarios
            for proxy in proxies if runs_in(scenario, proxy)]


def run_seconds(scenario: Scenario, duration: int) -> int:
    """About how long one run of ``scenario`` takes (its base's warm-up and turns too)."""
    seconds = duration + 2 + least_warmup(scenario)
    if scenario.baseline:  # the base's warm-up and turns, and the warm-up in turns
        seconds += duration + 2 * least_warmup(scenario)
        seconds += least_warmup(SCENARIOS_BY_NAME[scenario.baseline])
    return seconds


def run_all(ctx: Context, runs: list[tuple], records: list[dict]) -> None:
    """Run the plan, appending each record as it completes, with a progress line."""
    for index, (rep, scenario, proxy) in enumerate(runs, 1):
        print(f"[{index}/{len(runs)}] rep {rep} {scenario.name} {proxy} ... ", end="", flush=True)
        record = run_case(ctx, scenario, proxy, rep)
        records.append(record)
        if record["ok"]:
            print(
                f"{record['rps']:.0f} req/s  p50 {fmt_ms(record['p50_ms'])}  "
                f"p99 {fmt_ms(record['p99_ms'])}  errors {record['errors']}"
                + (f"  cpu {record['cpu_us_per_request']:.0f} us/req"
                   if "cpu_us_per_request" in record else "")
                + (f"  database {record['database_busy']:.0%} busy"
                   if "database_busy" in record else "")
                + (f"  buckets {record['buckets']}" if "buckets" in record else "")
                + (f"  base {record['base_rps']:.0f} req/s "
                   f"({record['rps'] / record['base_rps']:.3f})" if "base_rps" in record else "")
                + "".join(f"  {name} {value:.0f}"
                          for name, value in record.get("leases", {}).items())
                + (
                    f"  ({record['answers_before_limiter']} early answers skipped the limiter)"
                    if "answers_before_limiter" in record
                    else ""
                ),
                flush=True,
            )
        else:
            print(f"ERROR: {record['error']}", flush=True)


# --------------------------------------------------------------------------- report


def fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}ms"


def median_of(records: list[dict], key: str) -> float | None:
    values = [r[key] for r in records if r.get(key) is not None]
    return statistics.median(values) if values else None


def paired_ratio(runs: list[dict], records: list[dict], scenario: str | None,
                 proxy: str) -> float | None:
    """The median, over ``runs``, of each one's req/s over that of the same rep's run of
    ``proxy`` in ``scenario`` (None when no run has such a pair)."""
    other = {
        r["rep"]: r["rps"] for r in records
        if r["ok"] and r["scenario"] == scenario and r["proxy"] == proxy
    }  # fmt: skip
    ratios = [r["rps"] / other[r["rep"]] for r in runs if other.get(r["rep"])]
    return statistics.median(ratios) if ratios else None


def ratio_to_base(runs: list[dict]) -> float | None:
    """The median, over ``runs``, of each one's req/s over that of its base measured
    beside it in turns (None when none was)."""
    ratios = [r["rps"] / r["base_rps"] for r in runs if r.get("base_rps")]
    return statistics.median(ratios) if ratios else None


def summarize(records: list[dict], scenarios: list[Scenario], proxies: list[str]) -> list[dict]:
    """One row per (scenario, proxy): medians over reps, errors summed, ratios to stock
    and to the base, each the median of the reps' paired ratios."""
    def ratio_base(scenario: Scenario) -> str:
        """The scenario whose stock proxy runs this one is compared with: the first of
        its chain of baselines (a limiter run's base may have a base of its own)."""
        while scenario.baseline is not None:
            scenario = SCENARIOS_BY_NAME[scenario.baseline]
        return scenario.name

    rows = []
    for scenario in scenarios:
        for proxy in proxies:
            mine = [r for r in records if r["scenario"] == scenario.name and r["proxy"] == proxy]
            if not mine:
                continue
            ok = [r for r in mine if r["ok"]]
            rss = median_of(ok, "peak_rss_kib")
            busy = {
                core: statistics.median(r["cpu_busy"][core] for r in ok)
                for core in (ok[0].get("cpu_busy", {}) if ok else {})
            }  # fmt: skip
            rows.append(
                {
                    "scenario": scenario.name,
                    "proxy": proxy,
                    "runs": f"{len(ok)}/{len(mine)}",
                    "rps": median_of(ok, "rps"),
                    "p50_ms": median_of(ok, "p50_ms"),
                    "p99_ms": median_of(ok, "p99_ms"),
                    "errors": sum(r["errors"] for r in ok),
                    "peak_rss_mib": None if rss is None else rss / 1024,
                    "vs_stock": paired_ratio(ok, records, ratio_base(scenario), BASELINE_PROXY),
                    "vs_base": ratio_to_base(ok),
                    "cpu_busy": busy,
                    "failure": next((r["error"] for r in mine if not r["ok"]), None),
                }
            )
    return rows


def markdown_table(rows: list[dict]) -> str:
    """The summary rows as a markdown table."""
    header = ("scenario", "proxy", "req/s", "p50", "p99", "errors", "peak RSS", "vs stock",
              "vs base", "busy per core", "runs")  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if row["rps"] is None:
            cells = [row["scenario"], row["proxy"], f"ERROR: {row['failure']}",
                     "", "", "", "", "", "", "", row["runs"]]  # fmt: skip
        else:
            cells = [
                row["scenario"],
                row["proxy"],
                f"{row['rps']:.0f}",
                fmt_ms(row["p50_ms"]),
                fmt_ms(row["p99_ms"]),
                str(row["errors"]),
                "-" if row["peak_rss_mib"] is None else f"{row['peak_rss_mib']:.1f} MiB",
                "-" if row["vs_stock"] is None else f"{row['vs_stock']:.2f}x",
                "-" if row["vs_base"] is None else f"{row['vs_base']:.0%}",
                " ".join(f"{core} {share:.0%}" for core, share in row["cpu_busy"].items()) or "-",
                row["runs"],
            ]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def write_results(path: Path, meta: dict, records: list[dict], rows: list[dict]) -> None:
    """Raw records, summary rows and settings as JSON; the table next to it as .md."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "summary": rows, "runs": records}, indent=2) + "\n")
    path.with_suffix(".md").write_text(markdown_table(rows) + "\n")


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; --quick only changes what was not given explicitly."""
    parser = argparse.ArgumentParser(
        description="Benchmark equalizer against other reverse proxies (loopback only)."
    )
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 1 rep, 3 s runs, scenario 1k-c32 only")  # fmt: skip
    parser.add_argument("--reps", type=int, help="repetitions (default 3; quick: 1)")
    parser.add_argument("--duration", type=int, help="seconds per run (default 10; quick: 3)")
    parser.add_argument("--only", help=f"comma-separated proxies out of {','.join(PROXIES)}")
    parser.add_argument(
        "--scenarios", help=f"comma-separated, out of {','.join(s.name for s in SCENARIOS)}"
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get(DATABASE_URL_ENV),
        help="PostgreSQL server for the postgres-store scenarios (env "
        f"{DATABASE_URL_ENV}); default: a cluster of the harness's own on CPU {CLIENT_CPU}",
    )
    parser.add_argument("--no-scratch-db", action="store_true",
                        help="use --database-url itself, not a throw-away database")  # fmt: skip
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results file")
    parser.add_argument("--baseline", metavar="REF",
                        help=f"also run equalizer as of git commit REF ({EARLIER_EQUALIZER!r})")
    args = parser.parse_args(argv)
    args.reps = args.reps or (1 if args.quick else 3)
    args.duration = args.duration or (3 if args.quick else 10)
    if args.reps < 1 or args.duration < 1:
        parser.error("--reps and --duration must be at least 1")
    return args


def choose(parser_value: str | None, known: list[str], default: list[str], what: str) -> list[str]:
    """Names from a comma-separated option, in canonical order, checked against ``known``."""
    if not parser_value:
        return default
    wanted = [name.strip() for name in parser_value.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise SystemExit(f"bench: unknown {what} {', '.join(unknown)}; known: {', '.join(known)}")
    return [name for name in known if name in wanted]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark described by the command line; return the exit status."""
    args = parse_args(argv)
    proxies = choose(args.only, list(PROXIES), list(PROXIES), "proxy")
    if args.baseline and "equalizer" in proxies:
        proxies.insert(proxies.index("equalizer") + 1, EARLIER_EQUALIZER)
    by_name = SCENARIOS_BY_NAME
    default_scenarios = list(QUICK_SCENARIOS) if args.quick else list(by_name)
    names = choose(args.scenarios, list(by_name), default_scenarios, "scenario")
    scenarios = [by_name[n] for n in names if any(runs_in(by_name[n], p) for p in proxies)]
    runs = plan(scenarios, proxies, args.reps)
    if not runs:
        raise SystemExit("bench: nothing to run for that choice of proxies and scenarios")
    needs_db = any(s.limiter == "postgres" for s in scenarios) and "equalizer" in proxies
    if needs_db and args.database_url:
        check_loopback_dsn(args.database_url)

    if not {int(PROXY_CPU), int(CLIENT_CPU)} <= os.sched_getaffinity(0):
        raise SystemExit(f"bench: needs CPUs {PROXY_CPU} and {CLIENT_CPU}")
    os.sched_setaffinity(0, {int(CLIENT_CPU)})  # keep the harness itself off the proxy's core
    ensure_apt_packages({"wrk": "wrk", "nginx": "nginx", "taskset": "util-linux"})
    if "aiohttp" in proxies:
        ensure_python_packages({"aiohttp": "aiohttp"})

    est = sum(run_seconds(scenario, args.duration) for _, scenario, _ in runs)
    print(f"{len(runs)} runs, about {est // 60} min {est % 60} s", flush=True)
    meta = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "reps": args.reps,
        "duration_s": args.duration,
        "warmup_s": WARMUP_SECONDS,
        "postgres_warmup_s": LEASES_WARMUP_SECONDS,
        "proxies": proxies,
        "scenarios": [s.name for s in scenarios],
        "equalizer_access_log": EQUALIZER_ACCESS_LOG,
        "cpus": {"proxy": PROXY_CPU, "wrk_and_backend": CLIENT_CPU},
        "versions": tool_versions(),
    }
    records: list[dict] = []
    processes = ProcessGroup()
    database = ScratchDatabase(args.database_url) if args.database_url else OwnCluster()
    with Harness(processes, database) as harness, \
            tempfile.TemporaryDirectory(prefix="equalizer-bench-") as tmp:
        if not needs_db:
            database_url = ""
        elif args.database_url and args.no_scratch_db:
            database_url = args.database_url
        else:
            database_url = database.create()
        ctx = Context(Path(tmp), processes, args.duration, database_url)
        if isinstance(database, OwnCluster):
            ctx.database_pid = database.server_pid
        if args.baseline:
            ctx.earlier_tree = export_tree(args.baseline, Path(tmp) / "earlier")
            meta["baseline"] = args.baseline
            if database_url and not args.no_scratch_db:
                # Each version migrates a database of its own: on one, the earlier
                # would run the functions of the later's migrations.
                ctx.earlier_database_url = database.another(
                    f"equalizer_before_{os.getpid()}")
        try:
            start_backend(ctx)
            run_all(ctx, runs, records)
        finally:
            processes.stop_all()

    meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    meta["interrupted"] = harness.interrupted
    rows = summarize(records, scenarios, proxies)
    write_results(args.output, meta, records, rows)
    print()
    print(markdown_table(rows))
    print(f"\nraw results: {args.output}")
    return 130 if harness.interrupted else 0


class Harness:
    """A run's cleanup: within ``with``, SIGINT and SIGTERM (even if inherited as ignored)
    raise KeyboardInterrupt, which ends the block quietly (``interrupted``); on the way
    out every process the run started is stopped and its database dropped."""

    interrupted = False

    def __init__(self, processes: ProcessGroup, database: OwnCluster | ScratchDatabase) -> None:
        self.processes = processes
        self.database = database
        self.previous: dict = {}

    def __enter__(self) -> Harness:
        self.previous = {sig: signal.signal(sig, _raise_interrupt)
                         for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        if kind is KeyboardInterrupt:
            self.interrupted = True
            print("\ninterrupted; stopping everything", flush=True)
        self.processes.stop_all()
        self.database.drop()
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return kind is KeyboardInterrupt


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
