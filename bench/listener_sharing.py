"""Measure the two ways worker processes can share one listening port (loopback only).

``inherit``: this script binds the port once and the servers adopt the inherited
socket (``adoptStreamPort``), as equalizer's supervisor does with ``spawnProcess``
``childFDs``: one accept queue, whichever process accepts first gets the connection.
``reuseport``: each server binds its own socket with ``SO_REUSEPORT``: one accept queue
per process, the kernel hashes each new connection to one of them.

Each run starts two small Twisted HTTP servers (1 KiB answers), loads them with wrk for
a bounded time and reports requests/s and how many connections and requests each server
took. Modes are interleaved, ``--reps`` times. Every process started is stopped by PID
(SIGTERM, then SIGKILL) in a ``finally`` block, and every wait has a timeout.

    python bench/listener_sharing.py [--reps 3] [--duration 5] [--connections 64]

The same file is the server (``--serve``), started by the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HOST = "127.0.0.1"
SERVERS = 2
MODES = ("inherit", "reuseport")
READY_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
BODY = b"x" * 1024


def serve(mode: str, port: int, fd: int, out: Path) -> None:
    """One server: count connections and requests, write them to ``out`` on SIGTERM."""
    from twisted.internet import reactor
    from twisted.web import resource, server

    counts = {"pid": os.getpid(), "connections": 0, "requests": 0}

    class Body(resource.Resource):
        isLeaf = True

        def render_GET(self, request):
            counts["requests"] += 1
            return BODY

    class CountingSite(server.Site):
        def buildProtocol(self, addr):
            counts["connections"] += 1
            return super().buildProtocol(addr)

    site = CountingSite(Body())
    site.log = lambda request: None
    if mode == "reuseport":
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((HOST, port))
        sock.listen(1024)
        sock.setblocking(False)
        fd = sock.fileno()
    os.set_blocking(fd, False)  # adoptStreamPort needs it; the reactor accepts until EAGAIN
    reactor.adoptStreamPort(fd, socket.AF_INET, site)
    if mode == "inherit":
        os.close(fd)  # adoptStreamPort took its own copy

    def report():
        out.with_suffix(".json").write_text(json.dumps(counts))

    reactor.addSystemEventTrigger("before", "shutdown", report)
    out.with_suffix(".ready").write_text("ready")
    reactor.run()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each child by PID, SIGKILL whichever is still there after STOP_TIMEOUT."""
    for proc in procs:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=STOP_TIMEOUT)


def run_once(mode: str, args: argparse.Namespace, workdir: Path) -> dict:
    """Start the servers in ``mode``, load them, stop them; what each one served."""
    listener = None
    procs: list[subprocess.Popen] = []
    outs = [workdir / f"{mode}-{i}" for i in range(SERVERS)]
    for out in outs:
        for suffix in (".ready", ".json"):
            out.with_suffix(suffix).unlink(missing_ok=True)
    try:
        if mode == "inherit":
            listener = socket.socket()
            listener.bind((HOST, 0))
            listener.listen(1024)
            listener.setblocking(False)  # shared with the servers, which accept until EAGAIN
            port, fd = listener.getsockname()[1], listener.fileno()
        else:
            port, fd = free_port(), -1
        for out in outs:
            argv = [sys.executable, __file__, "--serve", mode, str(port), str(fd), str(out)]
            procs.append(subprocess.Popen(
                argv, pass_fds=(fd,) if fd >= 0 else (), stdout=subprocess.DEVNULL))
        if listener is not None:
            listener.close()  # the servers hold it now, as workers do
            listener = None
        deadline = time.monotonic() + READY_TIMEOUT
        while not all(out.with_suffix(".ready").exists() for out in outs):
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise SystemExit(f"listener_sharing: {mode} servers did not start")
            time.sleep(0.05)
        wrk = subprocess.run(
            [args.wrk, "-t", "2", "-c", str(args.connections), "-d", f"{args.duration}s",
             f"http://{HOST}:{port}/"],
            capture_output=True, text=True, timeout=args.duration + 15, check=False)
        stop(procs)
        missing = [str(out) for out in outs if not out.with_suffix(".json").exists()]
        if missing:
            raise SystemExit(f"listener_sharing: {mode} servers did not stop cleanly: {missing}")
        served = [json.loads(out.with_suffix(".json").read_text()) for out in outs]
    finally:
        if listener is not None:
            listener.close()
        for proc in procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=STOP_TIMEOUT)
    rps = re.search(r"Requests/sec:\s*([\d.]+)", wrk.stdout)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: .*", wrk.stdout)
    return {"mode": mode, "rps": float(rps.group(1)) if rps else 0.0,
            "errors": errors.group(0) if errors else "",
            "connections": [s["connections"] for s in served],
            "requests": [s["requests"] for s in served]}


def share(values: list[int]) -> str:
    total = sum(values) or 1
    return "/".join(f"{100 * v / total:.0f}" for v in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--wrk", default=shutil.which("wrk") or "/usr/bin/wrk")
    parser.add_argument("--serve", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        mode, port, fd, out = args.serve
        serve(mode, int(port), int(fd), Path(out))
        return
    if not 1 <= args.duration <= 60 or not 1 <= args.reps <= 10:
        raise SystemExit("listener_sharing: --duration 1..60 s, --reps 1..10")
    rows = []
    with tempfile.TemporaryDirectory(prefix="listener-sharing-") as tmp:
        for rep in range(args.reps):
            for mode in MODES if rep % 2 == 0 else reversed(MODES):
                row = run_once(mode, args, Path(tmp))
                rows.append(row)
                print(f"rep {rep + 1} {mode:9} {row['rps']:9.0f} req/s  connections "
                      f"{row['connections']} ({share(row['connections'])} %)  requests "
                      f"{share(row['requests'])} %  {row['errors']}", flush=True)
    for mode in MODES:
        mine = [r for r in rows if r["mode"] == mode]
        rates = sorted(r["rps"] for r in mine)
        print(f"{mode:9} median {rates[len(rates) // 2]:.0f} req/s  "
              f"(min {rates[0]:.0f}, max {rates[-1]:.0f})")


if __name__ == "__main__":
    main()
