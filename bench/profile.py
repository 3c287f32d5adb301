"""Profile equalizer under the bench's load with py-spy: where a request's CPU goes.

equalizer runs exactly as in run.py (pinned alone to CPU 0, behind the same
nginx backend, the same generated config), wrk loads it from CPU 1 for a warm-up
and then for the measured seconds, and ``py-spy record --nonblocking`` samples it
from CPU 1 meanwhile, so the sampler takes none of the proxy's core. The folded
stacks go to ``bench/results/profile-<scenario>.txt`` (speedscope.app and
flamegraph.pl read them as they are), and two tables are printed: the functions
with the most samples of their own (self) and in their call trees (total).

Usage:

    python bench/profile.py [--scenarios 1k-c32,1k-c32-limit-memory]
                            [--duration 10] [--rate 250] [--top 25]

Installs py-spy with pip, wrk and nginx with apt-get, when missing. Only
loopback is used; every child is stopped by PID.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from run import (
    BENCH_DIR,
    CLIENT_CPU,
    REPO_DIR,
    SCENARIOS_BY_NAME,
    BenchError,
    Context,
    OwnCluster,
    ProcessGroup,
    ensure_apt_packages,
    pinned,
    run_wrk,
    start_backend,
    start_proxy,
    wait_ready,
    warm_up,
)

RESULTS_DIR = BENCH_DIR / "results"


def py_spy() -> str:
    """The py-spy beside this interpreter, pip-installed there when it is missing."""
    beside = Path(sys.executable).with_name("py-spy")
    if not beside.exists():
        print("installing py-spy with pip ...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"], check=True)
    return str(beside)


def record(ctx: Context, scenario, args: argparse.Namespace) -> tuple[Path, dict]:
    """Load equalizer in ``scenario`` while py-spy samples it: folded stacks, wrk figures."""
    server = start_proxy(ctx, "equalizer", scenario)
    proc = server.proc
    try:
        wait_ready(proc, server.port, scenario.path, limiter=bool(scenario.limiter))
        warm_up(ctx, server.port, scenario)  # as run.py: every key seen, leases settled
        folded = RESULTS_DIR / f"profile-{scenario.name}.txt"
        sampler_argv = [py_spy(), "record", "--nonblocking", "--format", "raw",
                        "--rate", str(args.rate), "--duration", str(args.duration + 1),
                        "--output", str(folded), "--pid", str(proc.pid)]  # fmt: skip
        sampler = ctx.processes.start(pinned(CLIENT_CPU, sampler_argv),
                                      server.workdir / "py-spy.log")  # fmt: skip
        try:
            figures = run_wrk(ctx, server.port, scenario, args.duration)
            if sampler.wait(timeout=60) != 0:
                raise BenchError("py-spy failed: " + (server.workdir / "py-spy.log").read_text())
        finally:
            ctx.processes.stop(sampler)
        return folded, figures
    finally:
        ctx.processes.stop(proc)


def tallies(folded: Path) -> tuple[int, collections.Counter, collections.Counter]:
    """Samples in all, per function on top of the stack (self), per function anywhere (total).

    A folded line is ``frame;frame;...;frame COUNT``, outermost first; each frame is
    ``function (file:line)``. Functions are told apart by name and file, not line.
    """
    own: collections.Counter = collections.Counter()
    anywhere: collections.Counter = collections.Counter()
    total = 0
    for line in folded.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue  # a sample py-spy read torn (--nonblocking): a frame name holds a newline
        samples = int(count_text)
        total += samples
        frames = [_function_of(frame) for frame in stack.split(";")]
        own[frames[-1]] += samples
        for function in set(frames):
            anywhere[function] += samples
    return total, own, anywhere


def _function_of(frame: str) -> str:
    """``name (path/to/file.py:123)`` as ``name (file.py)``, shortened for the tables."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    return f"{name} ({_short_path(path)})" if path else name


def _short_path(path: str) -> str:
    """Site-packages and repository paths from the package on (``twisted/web/http.py``)."""
    repo = str(REPO_DIR) + os.sep
    if path.startswith(repo):
        return path[len(repo):]
    marker = "site-packages" + os.sep
    return path.split(marker, 1)[1] if marker in path else path


def table(title: str, counter: collections.Counter, total: int, top: int) -> str:
    rows = [f"\n| {title} | samples | share |", "|---|---:|---:|"]
    rows += [f"| `{function}` | {samples} | {samples / total:.1%} |"
             for function, samples in counter.most_common(top)]  # fmt: skip
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", default="1k-c32")
    parser.add_argument("--duration", type=int, default=10, help="seconds sampled under load")
    parser.add_argument("--rate", type=int, default=250, help="samples per second")
    parser.add_argument("--top", type=int, default=25, help="rows per table")
    args = parser.parse_args()
    by_name = SCENARIOS_BY_NAME
    unknown = [name for name in args.scenarios.split(",") if name not in by_name]
    if unknown:
        raise SystemExit(f"profile: unknown scenario {', '.join(unknown)}")
    chosen = [by_name[name] for name in args.scenarios.split(",")]
    os.sched_setaffinity(0, {int(CLIENT_CPU)})
    ensure_apt_packages({"wrk": "wrk", "nginx": "nginx", "taskset": "util-linux"})
    py_spy()
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    processes = ProcessGroup()
    database = OwnCluster()
    try:
        with tempfile.TemporaryDirectory(prefix="equalizer-profile-") as tmp:
            needs_db = any(s.limiter == "postgres" for s in chosen)
            ctx = Context(Path(tmp), processes, args.duration,
                          database.create() if needs_db else "")  # fmt: skip
            start_backend(ctx)
            for scenario in chosen:
                folded, figures = record(ctx, scenario, args)
                total, own, anywhere = tallies(folded)
                print(f"\n## {scenario.name}: {figures['rps']:.0f} req/s while sampled, "
                      f"{total} samples, folded stacks in {folded}")  # fmt: skip
                print(table("self", own, total, args.top))
                print(table("total (in the call tree)", anywhere, total, args.top))
    except (BenchError, subprocess.SubprocessError) as exc:
        raise SystemExit(f"profile: {exc}") from exc
    finally:
        processes.stop_all()
        database.drop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
