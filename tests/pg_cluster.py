"""A throw-away PostgreSQL cluster: ``initdb`` into a temporary directory, ``pg_ctl``.

Used by the test session (``tests/postgres.py``) and by the benchmark
(``bench/run.py``, which pins the server to the load generator's core through
``launcher``). No pytest here, so the benchmark can import it.

``initdb`` and ``pg_ctl`` come from ``PATH`` or ``/usr/lib/postgresql/*/bin``. The
cluster listens on 127.0.0.1 on a free port and on a unix socket in its
directory, trusts local connections and runs without fsync (it is thrown away
anyway). Running as root, the binaries run as the ``postgres`` OS user
(``runuser``), because PostgreSQL refuses to run as root.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections import deque

from attrs import define

OS_USER = "postgres"


class ClusterUnavailable(Exception):
    """No cluster can be made here; the message says why."""


def find_binary(name: str) -> str | None:
    """``name`` (initdb, pg_ctl) from PATH, else from the newest /usr/lib/postgresql/*/bin."""
    found = shutil.which(name)
    if found:
        return found
    candidates = glob.glob(f"/usr/lib/postgresql/*/bin/{name}")
    candidates.sort(key=lambda path: int(path.split("/")[4]) if path.split("/")[4].isdigit() else 0)
    return candidates[-1] if candidates else None


_HANDED_OUT: deque[int] = deque(maxlen=1024)
"""The ports :func:`free_port` gave most recently."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago, and none this process
    was given recently: the kernel may hand the same free port to two binds in a row, and
    a twistd child once got one port for both its proxy and its admin listener."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.append(port)
            return port


@define
class EphemeralCluster:
    """A throw-away cluster made by ``initdb`` in a temporary directory.

    ``launcher`` prefixes every command (``taskset -c 1``, say); the server
    processes inherit what it sets.
    """

    initdb: str
    pg_ctl: str
    directory: str
    port: int
    as_user: str | None
    launcher: tuple[str, ...] = ()

    @property
    def data(self) -> str:
        return os.path.join(self.directory, "data")

    @property
    def dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *argv: str) -> None:
        as_user = ("runuser", "-u", self.as_user, "--") if self.as_user is not None else ()
        command = [*self.launcher, *as_user, *argv]
        result = subprocess.run(
            command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command)} exited with {result.returncode}:\n"
                f"{result.stdout}{result.stderr}"
            )

    def init(self) -> None:
        self._run(
            self.initdb,
            "-D",
            self.data,
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        )

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c full_page_writes=off -c max_connections=200"
        )
        self._run(
            self.pg_ctl,
            "start",
            "-w",
            "-t",
            "60",
            "-D",
            self.data,
            "-l",
            os.path.join(self.directory, "server.log"),
            "-o",
            options,
        )

    def stop(self) -> None:
        self._run(self.pg_ctl, "stop", "-w", "-t", "60", "-m", "fast", "-D", self.data)

    def remove(self) -> None:
        """Stop the server if it runs (best effort) and delete its directory."""
        try:
            self.stop()
        except (RuntimeError, OSError, subprocess.TimeoutExpired):
            pass  # not running (never started, or stopped by a fault test), or wedged
        shutil.rmtree(self.directory, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(os.path.join(self.directory, "server.log")) as log:
                return "".join(log.readlines()[-lines:])
        except OSError:
            return ""


def start_cluster(launcher: tuple[str, ...] = ()) -> EphemeralCluster:
    """Make and start a cluster; raises ClusterUnavailable with the reason if it cannot."""
    initdb, pg_ctl = find_binary("initdb"), find_binary("pg_ctl")
    if initdb is None or pg_ctl is None:
        raise ClusterUnavailable(
            "initdb and pg_ctl are not on PATH nor in /usr/lib/postgresql/*/bin")
    as_user = None
    if os.geteuid() == 0:
        try:
            entry = pwd.getpwnam(OS_USER)
        except KeyError:
            raise ClusterUnavailable(
                f"running as root and there is no {OS_USER!r} OS user to run initdb as"
            ) from None
        if shutil.which("runuser") is None:
            raise ClusterUnavailable("running as root and runuser is missing")
        as_user = OS_USER
    directory = tempfile.mkdtemp(prefix="equalizer-pg-")
    if as_user is not None:
        os.chown(directory, entry.pw_uid, entry.pw_gid)
    cluster = EphemeralCluster(initdb, pg_ctl, directory, free_port(), as_user, launcher)
    try:
        cluster.init()
        cluster.start()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        log = cluster.log_tail()
        cluster.remove()
        raise ClusterUnavailable(f"could not start a PostgreSQL cluster: {e}\n{log}") from e
    return cluster
