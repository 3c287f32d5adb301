"""Two equalizers on the proxy's core at once: the ratio of their req/s is the ratio of
their costs per request, whatever the machine does meanwhile.

``run.py`` measures one proxy at a time, so a ratio between two runs carries the
machine's drift between them (on this machine a run's req/s moves by a tenth or more
from one minute to the next, and the limiter's paired ratios ranged 0.77-1.25 in one
run). Here both proxies share CPU 0 for the same seconds, each under its own wrk (both
on CPU 1, with the backend); the kernel's scheduler gives each half of the core, so
whatever slows the machine slows both alike. Two identical proxies come out within a
couple of percent of 1.00 (the ``1k-c32/1k-c32`` pair, run first as the control).

Usage (see bench/README.md):

    python bench/side_by_side.py [--pairs 1k-c32/1k-c32-limit-memory,...] [--reps 3]
                                 [--duration 8] [--baseline REF --scenarios 1k-c32,...]

A pair ``A/B`` runs scenario A's equalizer beside scenario B's and reports B's req/s
over A's. With ``--baseline REF`` each scenario instead runs equalizer as of commit REF
beside the working tree's, and reports the working tree's over REF's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
from pathlib import Path

import run
from run import (
    EARLIER_EQUALIZER,
    SCENARIOS_BY_NAME,
    BenchError,
    Context,
    OwnCluster,
    ProcessGroup,
    ScratchDatabase,
)

DEFAULT_OUTPUT = run.BENCH_DIR / "results" / "side_by_side.json"
CONTROL = "1k-c32/1k-c32"
DEFAULT_PAIRS = (
    CONTROL,
    "1k-c32/1k-c32-limit-memory",
    "1k-c32/1k-c32-limit-pg-1key",
    "1k-c32-keys-10k/1k-c32-limit-pg-10k",
)

Side = tuple[run.Scenario, str]  # (scenario, proxy)


def in_parallel(*calls):
    """Run the calls in threads at once; their results in order. A call's exception is
    raised here, not printed by its thread (after Ctrl-C the calls still running find
    their files gone, and nobody waits for them)."""
    results: list = [None] * len(calls)

    def call(index: int) -> None:
        try:
            results[index] = calls[index]()
        except Exception as error:  # noqa: BLE001 (raised in the caller's thread below)
            results[index] = error

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for result in results:
        if isinstance(result, Exception):
            raise result
    return results


def measure_pair(ctx: Context, first: Side, second: Side, swapped: bool = False) -> dict:
    """Start both proxies on the proxy's core, warm both up, measure both for the same
    seconds; the record of the pair (``ratio``: the second's req/s over the first's).
    ``swapped`` starts the second first (alternate reps do, see ``main``)."""
    record: dict = {"first": f"{first[0].name} {first[1]}",
                    "second": f"{second[0].name} {second[1]}", "ok": False}
    servers = []
    try:
        for scenario, proxy in (second, first) if swapped else (first, second):
            servers.append(run.start_proxy(ctx, proxy, scenario))
        if swapped:
            servers.reverse()
        for server, (scenario, _) in zip(servers, (first, second), strict=True):
            run.wait_ready(server.proc, server.port, scenario.path,
                           limiter=bool(scenario.limiter))
        sides = list(zip(servers, (first[0], second[0]), strict=True))
        in_parallel(*(lambda s=s, c=c: run.warm_up(ctx, s.port, c) for s, c in sides))
        before = [run.process_cpu_seconds(s.proc.pid) for s in servers]
        results = in_parallel(
            *(lambda s=s, c=c: run.run_wrk(ctx, s.port, c, ctx.duration) for s, c in sides))
        cpu = [run.process_cpu_seconds(server.proc.pid) - seconds
               for server, seconds in zip(servers, before, strict=True)]
        for server in servers:
            if server.proc.poll() is not None:
                raise BenchError(f"a proxy exited with status {server.proc.returncode}")
        if not all(r.get("rps") for r in results):
            raise BenchError("a wrk run measured no requests")
        record.update(
            ok=True,
            rps=[r["rps"] for r in results],
            p99_ms=[r["p99_ms"] for r in results],
            errors=[r["errors"] for r in results],
            cpu_share=[round(c / ctx.duration, 3) for c in cpu],
            cpu_us_per_request=[run.us_per_request(seconds, result["requests"])
                                for seconds, result in zip(cpu, results, strict=True)],
            ratio=results[1]["rps"] / results[0]["rps"],
        )
    except BenchError as error:
        record["error"] = str(error)
    finally:
        for server in servers:
            if server.proc is not None:
                ctx.processes.stop(server.proc)
    return record


def pairs_of(args: argparse.Namespace) -> list[tuple[Side, Side]]:
    """The (first, second) sides the command line asks for."""
    if args.baseline:
        names = (args.scenarios or "1k-c32").split(",")
        return [((scenario_named(n), EARLIER_EQUALIZER), (scenario_named(n), "equalizer"))
                for n in names]
    pairs = []
    for text in (args.pairs or ",".join(DEFAULT_PAIRS)).split(","):
        first, _, second = text.partition("/")
        pairs.append(((scenario_named(first), "equalizer"), (scenario_named(second), "equalizer")))
    return pairs


def scenario_named(name: str) -> run.Scenario:
    if name.strip() not in SCENARIOS_BY_NAME:
        raise SystemExit(f"bench: unknown scenario {name!r}")
    return SCENARIOS_BY_NAME[name.strip()]


def table(pairs: list[tuple[Side, Side]], records: list[dict], reps: int) -> str:
    """One row per pair: the median ratio, each rep's, and the medians of each side."""
    header = ["first", "second", "second / first", *(f"rep {i}" for i in range(1, reps + 1)),
              "req/s", "p99", "CPU per request", "errors"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for first, second in pairs:
        label = (f"{first[0].name} {first[1]}", f"{second[0].name} {second[1]}")
        mine = [r for r in records if (r["first"], r["second"]) == label]
        ok = [r for r in mine if r["ok"]]
        cells = [*label, f"{statistics.median(r['ratio'] for r in ok):.3f}" if ok else "ERROR"]
        cells += [f"{r['ratio']:.3f}" if r["ok"] else "error" for r in mine]
        cells += [""] * (reps - len(mine))
        if ok:
            cells.append(" / ".join(f"{statistics.median(r['rps'][i] for r in ok):.0f}"
                                    for i in (0, 1)))
            cells.append(" / ".join(f"{statistics.median(r['p99_ms'][i] for r in ok):.2f} ms"
                                    for i in (0, 1)))
            cells.append(" / ".join(
                f"{statistics.median(r['cpu_us_per_request'][i] for r in ok):.1f} µs"
                for i in (0, 1)))
            cells.append(" / ".join(str(sum(r["errors"][i] for r in ok)) for i in (0, 1)))
        else:
            cells += ["", "", "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Two equalizers on one core at once: the ratio of their req/s.")
    parser.add_argument("--pairs", help="comma-separated FIRST/SECOND scenario pairs "
                        f"(default: {','.join(DEFAULT_PAIRS)})")
    parser.add_argument("--baseline", metavar="REF",
                        help="pair equalizer as of commit REF with the working tree's instead")
    parser.add_argument("--scenarios", help="with --baseline: the scenarios (default 1k-c32)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--duration", type=int, default=8, help="seconds per measured run")
    parser.add_argument("--database-url", default=os.environ.get(run.DATABASE_URL_ENV),
                        help="PostgreSQL server for the postgres scenarios (as run.py)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help="JSON file of every pair's record (the table goes next to it)")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.duration < 1:
        parser.error("--reps and --duration must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    pairs = pairs_of(args)
    if args.database_url:
        run.check_loopback_dsn(args.database_url)
    os.sched_setaffinity(0, {int(run.CLIENT_CPU)})
    run.ensure_apt_packages({"wrk": "wrk", "nginx": "nginx", "taskset": "util-linux"})
    needs_db = any(side[0].limiter == "postgres" for pair in pairs for side in pair)
    processes = ProcessGroup()
    database = ScratchDatabase(args.database_url) if args.database_url else OwnCluster()
    records: list[dict] = []
    with run.Harness(processes, database) as harness, \
            tempfile.TemporaryDirectory(prefix="equalizer-bench-") as tmp:
        ctx = Context(Path(tmp), processes, args.duration,
                      database.create() if needs_db else "")
        if args.baseline:
            ctx.earlier_tree = run.export_tree(args.baseline, Path(tmp) / "earlier")
            if needs_db:
                ctx.earlier_database_url = database.another(f"equalizer_before_{os.getpid()}")
        run.start_backend(ctx)
        for rep in range(1, args.reps + 1):
            for first, second in pairs:
                # Which side starts first alternates, so an edge of either place falls
                # on both sides.
                record = measure_pair(ctx, first, second, swapped=rep % 2 == 0)
                records.append({**record, "rep": rep})
                print(f"rep {rep} {record['first']} / {record['second']}: "
                      + (f"{record['rps'][0]:.0f} / {record['rps'][1]:.0f} req/s, "
                         f"ratio {record['ratio']:.3f}, CPU {record['cpu_share']}"
                         if record["ok"] else f"ERROR {record['error']}"), flush=True)
    text = table(pairs, records, args.reps)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                if k != "database_url"}  # a DSN may carry a password
    args.output.write_text(json.dumps({"settings": settings, "records": records},
                                      indent=2) + "\n")
    args.output.with_suffix(".md").write_text(text + "\n")
    print()
    print(text)
    print(f"\nraw results: {args.output}")
    return 130 if harness.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
