"""How two Twisted processes share one listening port: one socket inherited by both
(what equalizer's workers do) or one SO_REUSEPORT socket each. Prints, per mode, the
requests/s wrk measured and how many connections each process accepted.

    python bench/listener_sharing.py [--seconds 5] [--connections 64]

Loopback only; every process is stopped by PID; each run lasts ``--seconds``.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import time

RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Length: 1024\r\nConnection: close\r\n\r\n"
            + b"x" * 1024)


def serve(fd: int, seconds: float, counts: str) -> None:
    """One process: answer every request with 1 KiB and close; count connections."""
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory, Protocol

    accepted = [0]

    class Answer(Protocol):
        def connectionMade(self) -> None:
            accepted[0] += 1

        def dataReceived(self, data: bytes) -> None:
            if b"\r\n\r\n" in data:
                self.transport.write(RESPONSE)
                self.transport.loseConnection()

    family = socket.socket(fileno=fd)
    kind = family.family
    family.detach()
    reactor.adoptStreamPort(fd, kind, Factory.forProtocol(Answer))

    def done() -> None:
        with open(counts, "a") as f:
            f.write(f"{accepted[0]}\n")
        reactor.stop()

    reactor.callLater(seconds, done)
    reactor.run()


def listening_socket(port: int, reuseport: bool) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", port))
    s.listen(1024)
    return s


def run(mode: str, port: int, seconds: float, connections: int, counts: str) -> str:
    open(counts, "w").close()
    sockets = []
    if mode == "inherited":
        sockets = [listening_socket(port, False)] * 2
    else:
        sockets = [listening_socket(port, True), listening_socket(port, True)]
    children = []
    for s in sockets:
        fd = s.fileno()
        children.append(subprocess.Popen(
            [sys.executable, __file__, "--serve", str(fd), "--seconds", str(seconds + 3),
             "--counts", counts], pass_fds=(fd,)))
    for s in set(sockets):
        s.close()
    time.sleep(2)  # both processes up
    wrk = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{int(seconds)}s", "-H", "Connection: close",
         f"http://127.0.0.1:{port}/"], capture_output=True, text=True, timeout=seconds + 30)
    for child in children:
        try:
            child.wait(timeout=seconds + 10)
        except subprocess.TimeoutExpired:
            os.kill(child.pid, signal.SIGKILL)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", wrk.stdout)
    with open(counts) as f:
        accepted = [int(line) for line in f if line.strip()]
    return f"{mode:10} {rate.group(1) if rate else '?':>10} req/s  accepted per process {accepted}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--serve", type=int)
    parser.add_argument("--counts", default="/tmp/listener_sharing.counts")
    args = parser.parse_args()
    if args.serve is not None:
        serve(args.serve, args.seconds, args.counts)
        return
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tests.pg_cluster import free_port

    for mode in ("inherited", "reuseport", "inherited", "reuseport"):
        print(run(mode, free_port(), args.seconds, args.connections, args.counts), flush=True)


if __name__ == "__main__":
    main()
