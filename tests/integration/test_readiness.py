"""Start-up readiness (SPEC 4.5) of a real ``twistd -n equalizer`` on the PostgreSQL store.

The proxy port opens only once the store's first connection attempt is over (at most
10 s), so the first request to reach it is limited for real; bucket calls made earlier
wait instead of failing; ``/health`` says ``starting`` until then. To hold start-up back
deterministically, the tests hold the migrations' advisory lock, so the first attempt
connects and then waits; a database that is down at start is a DSN naming a loopback
port nobody listens on, where a port forwarder to the real server appears later.
"""

from __future__ import annotations

import os
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator

import psycopg2.extensions
import pytest
import pytest_twisted
import yaml
from twisted.internet import reactor
from twisted.internet.error import ConnectError
from twisted.protocols.portforward import ProxyFactory
from txpostgres.txpostgres import Connection

from equalizer.buckets.postgres.sql import MIGRATION_LOCK
from equalizer.listeners import probe_address
from equalizer.readiness import READY_TIMEOUT
from tests.integration.buckets_support import call
from tests.integration.harness import (
    LOOPBACK,
    REPO,
    EqualizerProcess,
    equalizer_config,
    free_port,
    get_json,
    raw_connect,
    twistd_command,
    wait_until,
    within,
)

CAPACITY = 10


def limited_config(backend_url: str, dsn: str, on_store_error: str = "deny") -> dict:
    """Rate limiting on the PostgreSQL store, keyed by X-Client, tokens never refilled."""
    return equalizer_config([backend_url], rate_limit={
        "enabled": True, "store": "postgres", "database_url": dsn, "key": "header:X-Client",
        "on_store_error": on_store_error,
        "default": {"capacity": CAPACITY, "refill_rate": 0},
    })


@pytest_twisted.async_yield_fixture()
async def processes(tmp_path) -> AsyncIterator[list[EqualizerProcess]]:
    """twistd children the test launches itself (not waiting for anything), stopped by PID."""
    started: list[EqualizerProcess] = []
    yield started
    for process in started:
        output = await process.stop()
        assert "Traceback" not in output, output


def launch(document: dict, tmp_path, started: list[EqualizerProcess]) -> EqualizerProcess:
    process = EqualizerProcess(document, str(tmp_path))
    started.append(process)
    process.launch()
    return process


async def first_connection(process: EqualizerProcess, timeout: float = 30.0):
    """Poll the proxy port until it accepts; the connected raw client."""
    connected = []

    async def accepts() -> bool:
        if process.process.poll() is not None:
            raise AssertionError(f"twistd exited:\n{process.output()}")
        try:
            connected.append(await raw_connect(process.proxy_port))
        except ConnectError:
            return False
        return True

    await wait_until(accepts, timeout, interval=0.005, message="the proxy port to accept")
    return connected[0]


async def proxied(client, key: str) -> int:
    """One GET through a raw connection; its status code."""
    client.send(f"GET /x HTTP/1.1\r\nHost: eq\r\nX-Client: {key}\r\n"
                "Connection: close\r\n\r\n".encode())
    raw = await client.wait_closed(15)
    return int(raw.split(b" ", 2)[1])


async def health(http, process: EqualizerProcess) -> tuple[int, dict]:
    return await get_json(http, process.admin_url + "/health")


async def held_migration_lock(dsn: str) -> Connection:
    """A session holding the migrations' advisory lock: a starting equalizer connects, then
    waits in its first attempt until the session lets go (closes)."""
    holder = Connection(reactor)
    await within(holder.connect(dsn))
    await within(holder.runQuery("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,)))
    return holder


async def process_admin_up(http, process: EqualizerProcess) -> None:
    """Wait until the child's admin port answers /health (with any status)."""

    async def answers() -> bool:
        if process.process.poll() is not None:
            raise AssertionError(f"twistd exited:\n{process.output()}")
        try:
            await within(http.get(process.admin_url + "/health"), 2)
        except Exception:
            return False
        return True

    await wait_until(answers, 30, interval=0.005, message="the admin port")


@pytest_twisted.ensureDeferred
async def test_first_request_at_the_first_accept_is_limited_for_real(
        tmp_path, http, backends, postgres_dsn, processes):
    """The request sent the moment the proxy port accepts is admitted by the store and
    counted in its bucket, never 503; a POST /buckets sent as soon as the admin port
    answers is 201, however early."""
    backend = backends("b1")
    key = f"first-{uuid.uuid4().hex}"
    process = launch(limited_config(backend.url, postgres_dsn), tmp_path, processes)
    await process_admin_up(http, process)
    created = await call(http, "POST", process.admin_url + "/buckets",
                         {"client_id": f"early-{key}", "capacity": 3, "refill_rate": 1})
    assert created.status == 201, created.body
    client = await first_connection(process)
    assert await proxied(client, key) == 200
    assert len(backend.requests) == 1
    status, bucket = await get_json(http, f"{process.admin_url}/buckets/{key}")
    assert status == 200
    assert bucket["tokens"] == CAPACITY - 1
    await wait_until(lambda: "proxy listening on" in process.output(),
                     message="the line saying the proxy listens")


@pytest_twisted.ensureDeferred
async def test_health_says_starting_until_the_first_attempt_is_over(
        tmp_path, http, backends, postgres_dsn, processes):
    """While the store's first attempt is held back, /health is 503 "starting", the proxy port
    refuses connections and a bucket call waits; once the attempt finishes, all three
    answer for real."""
    backend = backends("b1")
    holder = await held_migration_lock(postgres_dsn)
    try:
        process = launch(limited_config(backend.url, postgres_dsn), tmp_path, processes)
        await process_admin_up(http, process)
        status, body = await health(http, process)
        assert (status, body["status"]) == (503, "starting")
        with pytest.raises(ConnectError):
            await raw_connect(process.proxy_port)
        waiting = call(http, "POST", process.admin_url + "/buckets",
                       {"client_id": f"waits-{uuid.uuid4().hex}", "capacity": 2,
                        "refill_rate": 1}, timeout=30)
    finally:
        holder.close()
    assert (await waiting).status == 201
    status, body = await health(http, process)
    assert (status, body["status"]) == (200, "ok")
    client = await first_connection(process, timeout=5)
    assert await proxied(client, f"after-{uuid.uuid4().hex}") == 200


@pytest_twisted.ensureDeferred
async def test_first_attempt_held_past_ten_seconds_serves_under_on_store_error(
        tmp_path, http, backends, postgres_dsn, processes):
    """A first attempt that has not finished after 10 s no longer holds the proxy back: it
    opens, on_store_error (deny) answers 503 store_unavailable, and once the attempt
    finishes the store is used."""
    backend = backends("b1")
    holder = await held_migration_lock(postgres_dsn)
    try:
        launched_at = reactor.seconds()
        process = launch(limited_config(backend.url, postgres_dsn), tmp_path, processes)
        client = await first_connection(process, timeout=READY_TIMEOUT + 20)
        opened_after = reactor.seconds() - launched_at
        assert opened_after >= READY_TIMEOUT - 0.5
        assert await proxied(client, "denied") == 503
        status, body = await health(http, process)
        assert status == 200 and body["store"] == "unavailable"
        await wait_until(lambda: "no answer to its first connection attempt after 10.0s"
                         in process.output(), message="the readiness warning")
    finally:
        holder.close()
    await wait_until(lambda: health_store_ok(http, process), 20, interval=0.1,
                     message="the store to connect")
    assert await proxied(await raw_connect(process.proxy_port), "admitted") == 200
    await wait_until(lambda: "bucket store available" in process.output(),
                     message="the line saying the store came")


async def health_store_ok(http, process: EqualizerProcess) -> bool:
    status, body = await health(http, process)
    return body["store"] == "ok"


@pytest_twisted.ensureDeferred
async def test_database_down_at_start_then_reconnected(
        tmp_path, http, backends, postgres_dsn, processes):
    """With nothing listening at the database's address the proxy opens at once (well within
    10 s) under on_store_error; when the database appears there, the store connects and
    requests are limited again."""
    parts = psycopg2.extensions.parse_dsn(postgres_dsn)
    if parts.get("host") not in (LOOPBACK, "localhost") or "port" not in parts:
        pytest.skip("the test database is not on a loopback TCP port")
    forward_port = free_port()
    dsn = psycopg2.extensions.make_dsn(postgres_dsn, host=LOOPBACK, port=forward_port)
    backend = backends("b1")
    process = launch(limited_config(backend.url, dsn), tmp_path, processes)
    client = await first_connection(process, timeout=READY_TIMEOUT + 20)
    assert await proxied(client, "down") == 503
    await wait_until(lambda: "(bucket store unavailable)" in process.output(),
                     message="the line saying the proxy listens without the store")
    assert "no answer to its first connection attempt" not in process.output()
    forwarder = reactor.listenTCP(forward_port, ProxyFactory(LOOPBACK, int(parts["port"])),
                                  interface=LOOPBACK)
    try:
        await wait_until(lambda: health_store_ok(http, process), 20, interval=0.1,
                         message="the store to connect once the database is there")
        assert await proxied(await raw_connect(process.proxy_port), "up") == 200
        await process.stop()  # its database connections go through the forwarder
    finally:
        await within(forwarder.stopListening())


@pytest_twisted.ensureDeferred
async def test_proxy_port_taken_while_starting_is_one_line_and_exit_1(
        tmp_path, http, backends, postgres_dsn):
    """A proxy port another process takes while start-up waits for the store is, once ready,
    one error line on stderr and exit status 1, without a traceback; the pidfile goes."""
    process = EqualizerProcess(limited_config(backends("b1").url, postgres_dsn), str(tmp_path))
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("EQUALIZER_")}
    env["PYTHONPATH"] = REPO
    pidfile = tmp_path / "twistd.pid"
    holder = await held_migration_lock(postgres_dsn)
    taker = socket.socket()
    child = None
    try:
        try:
            with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
                child = subprocess.Popen(
                    [*twistd_command(), "-n", f"--pidfile={pidfile}", "equalizer",
                     "--config", process.config_path],
                    cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
            process.process = child
            await process_admin_up(http, process)
            taker.bind((LOOPBACK, process.proxy_port))
            taker.listen()
        finally:
            holder.close()
        await wait_until(lambda: child.poll() is not None, 20, message="twistd to exit")
    finally:
        taker.close()
        if child is not None and child.poll() is None:
            child.kill()
            child.wait(5)
    stderr = (tmp_path / "err").read_text()
    assert child.returncode == 1, ((tmp_path / "out").read_text(), stderr)
    assert stderr == (f"error: cannot listen on proxy.listen "
                      f"'tcp:{process.proxy_port}:interface={LOOPBACK}': Address already in use\n")
    assert "Traceback" not in (tmp_path / "out").read_text()
    assert not pidfile.exists()


@pytest_twisted.ensureDeferred
async def test_proxy_port_taken_at_start_is_found_before_the_store(tmp_path, postgres_dsn):
    """On the PostgreSQL store a proxy port taken before start-up is still one line and exit
    status 1 at once, without waiting for the store (held back here) and before twistd
    would daemonize."""
    holder = socket.socket()
    holder.bind((LOOPBACK, 0))
    holder.listen()
    taken = f"tcp:{holder.getsockname()[1]}:interface={LOOPBACK}"
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("EQUALIZER_")}
    env["PYTHONPATH"] = REPO
    config = tmp_path / "equalizer.yml"
    config.write_text(yaml.safe_dump(limited_config(f"http://{LOOPBACK}:9", postgres_dsn)))
    lock = await held_migration_lock(postgres_dsn)
    try:
        # Blocks this reactor, harmlessly: the lock is held by the server meanwhile.
        outcome = subprocess.run(
            [*twistd_command(), "-n", f"--pidfile={tmp_path / 'twistd.pid'}", "equalizer",
             "--config", str(config), "--listen", taken],
            cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=60)
    finally:
        lock.close()
        holder.close()
    assert outcome.returncode == 1, (outcome.stdout, outcome.stderr)
    assert outcome.stderr == (f"error: cannot listen on proxy.listen {taken!r}: "
                              "Address already in use\n")
    assert "no answer to its first connection attempt" not in outcome.stdout
    assert "Traceback" not in outcome.stdout
    assert not (tmp_path / "twistd.pid").exists()


def test_probe_finds_a_taken_port_and_binds_nothing() -> None:
    """The start-up probe fails on a port in use, leaves a free port free (nothing listens
    there afterwards), and skips port 0 and unix sockets."""
    holder = socket.socket()
    holder.bind((LOOPBACK, 0))
    holder.listen()
    try:
        with pytest.raises(OSError):
            probe_address(f"tcp:{holder.getsockname()[1]}:interface={LOOPBACK}")
    finally:
        holder.close()
    port = free_port()
    probe_address(f"tcp:{port}:interface={LOOPBACK}")
    with pytest.raises(ConnectionRefusedError), socket.create_connection((LOOPBACK, port), 5):
        pass
    probe_address(f"tcp:0:interface={LOOPBACK}")
    probe_address("unix:/nonexistent/dir/s.sock")
