"""Count equalizer's CPU instructions per proxied request, with callgrind.

Throughput on a shared 2-core VM swings by a quarter from one minute to the
next, so a 5% change hides in the noise of bench/run.py. An instruction count
does not: equalizer runs under ``valgrind --tool=callgrind`` behind the same
nginx backend as run.py, a warm-up of sequential keep-alive requests runs, the
counters are zeroed (``callgrind_control -z``), N more requests run, and the
counters are dumped. The result is user-space instructions of the whole process
(access-log thread included) per request; the kernel's share (send, recv,
epoll) is not in it. Under callgrind a request takes some fifty times longer,
so work that follows the clock rather than the requests (timers, and the
postgres store's leases, sized by demand per settlement round trip) weighs far
more per request than at full speed: use it for the per-request code path.

Usage:

    python bench/instructions.py [--requests 2000] [--warmup 300]
                                 [--scenarios 1k-c32,1k-c32-limit-memory]
                                 [--baseline REF] [--extra-config JSON]
                                 [--keep DIR]

Scenarios are run.py's (their connection count does not apply: one client,
one request at a time). Installs valgrind with apt-get when missing. Only
loopback is used; every child is stopped by PID.
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from run import (
    CLIENT_HEADER,
    REPO_DIR,
    SCENARIOS_BY_NAME,
    BenchError,
    Context,
    OwnCluster,
    ProcessGroup,
    Server,
    child_env,
    ensure_apt_packages,
    equalizer_config,
    export_tree,
    free_port,
    start_backend,
    wait_ready,
)

READY_TIMEOUT = 600.0  # startup under callgrind is some fifty times slower


def requests(port: int, path: str, count: int, keys: int, first: int = 0) -> None:
    """``count`` sequential GETs over one keep-alive connection, spread over ``keys`` keys."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        for i in range(first, first + count):
            headers = {CLIENT_HEADER: f"bench-client-{i % keys + 1}"} if keys > 1 else {}
            conn.request("GET", path, headers=headers)
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise BenchError(f"HTTP {response.status} from the proxy")
    finally:
        conn.close()


def newest_dump(workdir: Path, pid: int) -> Path:
    """The newest dump callgrind wrote for ``pid``."""
    return max(workdir.glob(f"callgrind.out.{pid}*"), key=lambda p: p.stat().st_mtime)


def dumped_instructions(workdir: Path, pid: int) -> int:
    """The ``summary`` of the newest dump callgrind wrote for ``pid``."""
    dump = newest_dump(workdir, pid)
    for line in dump.read_text().splitlines():
        if line.startswith("summary:"):
            return int(line.split()[1])
    raise BenchError(f"no summary in {dump}")


def source_label(source: Path) -> str:
    """The dump's name suffix: none for the working tree, ``-baseline`` for ``--baseline``."""
    return "" if source == REPO_DIR else "-baseline"


def count(ctx: Context, scenario, args: argparse.Namespace, source: Path = REPO_DIR) -> float:
    """Instructions per request of equalizer (run from ``source``) in ``scenario``."""
    server = Server(ctx.new_dir(f"callgrind-{scenario.name}"), free_port(), free_port())
    config = equalizer_config(ctx, server, scenario)
    if args.extra_config:  # each section's keys laid over the run's own
        document = json.loads(config.read_text())
        for section, values in json.loads(args.extra_config).items():
            document.setdefault(section, {}).update(values)
        config.write_text(json.dumps(document, indent=2) + "\n")
    argv = ["valgrind", "--tool=callgrind",
            f"--callgrind-out-file={server.workdir}/callgrind.out.%p",
            sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
            "--pidfile", str(server.workdir / "twistd.pid"),
            "equalizer", "--config", str(config)]  # fmt: skip
    proc = ctx.processes.start(argv, server.log, cwd=source, env=child_env())
    try:
        wait_ready(proc, server.port, scenario.path, limiter=bool(scenario.limiter),
                   timeout=READY_TIMEOUT)
        requests(server.port, scenario.path, args.warmup, scenario.keys)
        subprocess.run(["callgrind_control", "-z", str(proc.pid)], check=True,
                       capture_output=True)  # fmt: skip
        requests(server.port, scenario.path, args.requests, scenario.keys, args.warmup)
        subprocess.run(["callgrind_control", "-d", str(proc.pid)], check=True,
                       capture_output=True)  # fmt: skip
        time.sleep(1)
        if args.keep:  # for callgrind_annotate: where the instructions went
            args.keep.mkdir(parents=True, exist_ok=True)
            shutil.copy(newest_dump(server.workdir, proc.pid),
                        args.keep / f"callgrind.{scenario.name}{source_label(source)}.out")
        return dumped_instructions(server.workdir, proc.pid) / args.requests
    finally:
        ctx.processes.stop(proc)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--scenarios", default="1k-c32,1k-c32-limit-memory")
    parser.add_argument("--baseline", metavar="REF",
                        help="also count equalizer as of git commit REF, in the same run")
    parser.add_argument("--extra-config", metavar="JSON",
                        help="a JSON object of sections whose keys replace those of each "
                             "run's equalizer configuration (e.g. to turn features on); "
                             "the baseline gets it too")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="copy each run's callgrind dump into DIR "
                             "(callgrind.<scenario>[-baseline].out), for callgrind_annotate")
    args = parser.parse_args()
    by_name = SCENARIOS_BY_NAME
    chosen = [by_name[name] for name in args.scenarios.split(",")]
    ensure_apt_packages({"valgrind": "valgrind", "callgrind_control": "valgrind",
                         "nginx": "nginx", "taskset": "util-linux"})  # fmt: skip
    processes = ProcessGroup()
    database = OwnCluster()
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="equalizer-callgrind-") as tmp:
            needs_db = any(s.limiter == "postgres" for s in chosen)
            ctx = Context(Path(tmp), processes, 0, database.create() if needs_db else "")
            start_backend(ctx)
            sources = [("", REPO_DIR)]
            if args.baseline:
                earlier = export_tree(args.baseline, Path(tmp) / "earlier")
                sources.append((f" @{args.baseline}", earlier))
            for scenario in chosen:
                for label, source in sources:
                    per_request = count(ctx, scenario, args, source)
                    rows.append((scenario.name + label, per_request))
                    print(f"{scenario.name}{label}: {per_request:,.0f} instructions per request",
                          flush=True)
    finally:
        processes.stop_all()
        database.drop()
    base = rows[0][1]
    print("\n| scenario | instructions per request | vs first |\n|---|---|---|")
    for name, per_request in rows:
        print(f"| {name} | {per_request:,.0f} | {per_request / base:.1%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
