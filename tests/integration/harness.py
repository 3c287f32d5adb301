"""Loopback harness for the integration tests: real backends, a real balancer, real sockets.

Everything listens on 127.0.0.1 and runs on the global reactor that pytest-twisted
drives, so each test is an ``async def`` that awaits network events:

* `BackendServer`: a twisted.web backend on an ephemeral port that records what it
  received (every request, every connection) and answers through a handler the
  test chooses; health checks (``User-Agent: equalizer-health-check``) are
  counted apart and answered with ``health_status``.
* `start_equalizer`: an `EqualizerService` built from a config dict (see
  `equalizer_config`) and started in this process, listening on ephemeral ports.
* `EqualizerProcess`: ``twistd -n equalizer --config FILE`` as a child process,
  ready once its admin ``/health`` answers, stopped by PID with SIGTERM; its
  memory (``VmRSS``) can be read on its own.
* `RawClient` / `raw_request`: byte-level HTTP for malformed requests and for
  controlling exactly when a client sends or disconnects.
* `ScriptedBackend`: a raw backend whose script writes exact response bytes.

Every wait is bounded: `wait_until` polls with a deadline and `within` puts a
timeout on a Deferred, so a broken proxy fails a test instead of hanging it.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import treq
import yaml
from treq.client import HTTPClient
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.web import resource, server
from twisted.web.client import Agent, HTTPConnectionPool

from equalizer.config.loader import parse_config
from equalizer.listeners import Listener
from equalizer.service import EqualizerService
from tests.pg_cluster import free_port

LOOPBACK = "127.0.0.1"
HEALTH_CHECK_AGENT = b"equalizer-health-check"
DEFAULT_TIMEOUT = 10.0
BACKEND_MAX_HEAD = 1 << 20
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# -- waiting, always bounded ----------------------------------------------------------


def sleep(seconds: float) -> Deferred[None]:
    return deferLater(global_reactor, seconds, lambda: None)


def within(d: Deferred | Awaitable, seconds: float = DEFAULT_TIMEOUT) -> Deferred:
    """``d`` with a deadline: it fails with TimeoutError after ``seconds``."""
    d = ensureDeferred(d) if not isinstance(d, Deferred) else d
    return d.addTimeout(seconds, global_reactor)


async def wait_until(predicate: Callable[[], Any], timeout: float = DEFAULT_TIMEOUT,
                     interval: float = 0.01, message: str = "condition") -> Any:
    """Poll ``predicate`` (sync or async) until it returns something truthy, for ``timeout`` s."""
    deadline = global_reactor.seconds() + timeout
    while True:
        value = predicate()
        if isinstance(value, Deferred) or hasattr(value, "__await__"):
            value = await value
        if value:
            return value
        if global_reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        await sleep(interval)


# -- HTTP clients ------------------------------------------------------------------------


def http_client(persistent: bool = True) -> tuple[HTTPClient, HTTPConnectionPool]:
    """A treq client on a pool of its own; close the pool in teardown."""
    pool = HTTPConnectionPool(global_reactor, persistent=persistent)
    return HTTPClient(Agent(global_reactor, pool=pool)), pool


async def get_json(client: HTTPClient, url: str, timeout: float = DEFAULT_TIMEOUT
                   ) -> tuple[int, Any]:
    """GET ``url`` and decode its JSON body: (status, body)."""
    response = await within(client.get(url), timeout)
    body = await within(treq.content(response), timeout)
    return response.code, json.loads(body)


class RawClient(Protocol):
    """A client that sends exactly the bytes a test gives and keeps everything it receives."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.closed: Deferred[bytes] = Deferred()
        self._waiters: list[tuple[Callable[[bytes], bool], Deferred[None]]] = []

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        for waiter in list(self._waiters):
            predicate, d = waiter
            if predicate(bytes(self.received)):
                self._waiters.remove(waiter)
                d.callback(None)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        for _, d in self._waiters:
            d.errback(AssertionError(f"connection closed; received {bytes(self.received)!r}"))
        self._waiters = []
        self.closed.callback(bytes(self.received))

    def send(self, data: bytes) -> None:
        self.transport.write(data)

    def received_until(self, predicate: Callable[[bytes], bool],
                       timeout: float = DEFAULT_TIMEOUT) -> Deferred[None]:
        """Fires once what was received satisfies ``predicate``."""
        d: Deferred[None] = Deferred()
        if predicate(bytes(self.received)):
            d.callback(None)
        else:
            self._waiters.append((predicate, d))
        return within(d, timeout)

    def wait_closed(self, timeout: float = DEFAULT_TIMEOUT) -> Deferred[bytes]:
        return within(self.closed, timeout)


async def raw_connect(port: int) -> RawClient:
    endpoint = TCP4ClientEndpoint(global_reactor, LOOPBACK, port, timeout=5)
    return await within(endpoint.connect(Factory.forProtocol(RawClient)))


async def raw_request(port: int, data: bytes, timeout: float = DEFAULT_TIMEOUT) -> bytes:
    """Send ``data`` and return everything received once the server closes the connection."""
    client = await raw_connect(port)
    client.send(data)
    try:
        return await client.wait_closed(timeout)
    finally:
        if client.transport.connected:
            client.transport.abortConnection()


def status_of(raw_response: bytes) -> int:
    """The status code of a raw HTTP response."""
    return int(raw_response.split(b"\r\n", 1)[0].split(b" ")[1])


def header_values(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    """Every value of header ``name`` (case-insensitive), in order."""
    lowered = name.lower()
    return [value for key, value in headers if key.lower() == lowered]


@attrs.define
class RawResponse:
    """One HTTP/1.x response as bytes on the wire: status, headers in order, decoded body."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> list[bytes]:
        return header_values(self.headers, name)

    def names(self) -> set[bytes]:
        return {key.lower() for key, _ in self.headers}


def parse_response(raw: bytes) -> RawResponse:
    """Parse one complete response (Content-Length, chunked, or read until close)."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = [(name.strip(), value.strip()) for name, _, value in
               (line.partition(b":") for line in lines[1:])]
    response = RawResponse(status_of(raw), headers, b"")
    if b"chunked" in b",".join(response.header(b"transfer-encoding")).lower():
        body = bytearray()
        while True:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            body += rest[:size]
            rest = rest[size + 2:]
        response.body = bytes(body)
    elif response.header(b"content-length"):
        response.body = rest[:int(response.header(b"content-length")[0])]
    else:
        response.body = rest
    return response


# -- backends --------------------------------------------------------------------------


@attrs.define
class RecordedRequest:
    """What a backend received: request line, headers in order, and (when buffered) the body."""

    method: bytes
    uri: bytes
    version: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> list[bytes]:
        return header_values(self.headers, name)


Handler = Callable[["BackendServer", server.Request], bytes | int]


def name_handler(backend: BackendServer, request: server.Request) -> bytes:
    """The default answer: 200, the backend's name as body and in ``X-Backend``."""
    request.setHeader(b"X-Backend", backend.name.encode())
    return backend.name.encode()


class StreamingRequest(server.Request):
    """A backend request whose body is counted and handed on as it arrives, never stored.

    twisted.web would buffer the body before rendering; this lets a test see a
    1 GiB upload without keeping it, and see the first bytes arrive before the
    client has finished sending.
    """

    body_received = 0

    def gotLength(self, length: int | None) -> None:
        super().gotLength(0)  # a small BytesIO that stays empty
        self.channel.site.backend.upload_started(self)

    def handleContentChunk(self, data: bytes) -> None:
        self.body_received += len(data)
        self.channel.site.backend.upload_chunk(self, data)


class _Leaf(resource.Resource):
    isLeaf = True

    def __init__(self, backend: BackendServer) -> None:
        super().__init__()
        self.backend = backend

    def render(self, request: server.Request) -> bytes | int:
        return self.backend.render(request)


class BackendSite(server.Site):
    """A Site that counts and tracks its connections, so a test can count or drop them."""

    noisy = False

    def __init__(self, backend: BackendServer, *, streaming: bool) -> None:
        super().__init__(_Leaf(backend))
        self.backend = backend
        if streaming:
            self.requestFactory = StreamingRequest

    def buildProtocol(self, addr):
        protocol = super().buildProtocol(addr)
        # Heads as large as a test's balancer lets through (twisted.web's own limits are
        # 16 KiB a line and 16 KiB in all).
        protocol._channel.MAX_LENGTH = protocol._channel.totalHeadersSize = BACKEND_MAX_HEAD
        backend = self.backend
        backend.connections_made += 1
        make_connection, connection_lost = protocol.makeConnection, protocol.connectionLost
        transports = []

        def made(transport) -> None:
            transports.append(transport)
            backend.open_connections.add(transport)
            make_connection(transport)

        def lost(reason: Failure) -> None:
            backend.open_connections.difference_update(transports)
            backend.connections_lost += 1
            connection_lost(reason)

        protocol.makeConnection = made
        protocol.connectionLost = lost
        return protocol

    def log(self, request: server.Request) -> None:
        pass


class BackendServer:
    """A real HTTP backend on 127.0.0.1 that records what reaches it.

    ``handler(backend, request)`` answers proxied requests as a twisted.web
    ``render`` would (bytes, or NOT_DONE_YET). Health checks never reach it; they
    are counted in ``health_checks`` and answered with ``health_status``.
    """

    def __init__(self, name: str, handler: Handler = name_handler, *, prefix: str = "",
                 streaming: bool = False) -> None:
        self.name = name
        self.handler = handler
        self.prefix = prefix
        self.health_status = 200
        self.health_checks = 0
        self.requests: list[RecordedRequest] = []
        self.connections_made = 0
        self.connections_lost = 0
        self.open_connections: set = set()
        self.uploads: list[StreamingRequest] = []
        self.on_upload_chunk: Callable[[StreamingRequest, bytes], None] | None = None
        self.site = BackendSite(self, streaming=streaming)
        self.port: IListeningPort | None = None
        self.port_number = 0

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port_number}{self.prefix}"

    def start(self) -> BackendServer:
        """Listen on an ephemeral port (or the one it had, after `stop_listening`)."""
        self.port = global_reactor.listenTCP(self.port_number, self.site, interface=LOOPBACK)
        self.port_number = self.port.getHost().port
        return self

    def render(self, request: server.Request) -> bytes | int:
        if request.getHeader(b"user-agent") == HEALTH_CHECK_AGENT:
            self.health_checks += 1
            request.setResponseCode(self.health_status)
            return b"health"
        body = b"" if isinstance(request, StreamingRequest) else request.content.read()
        self.requests.append(RecordedRequest(
            method=request.method,
            uri=request.uri,
            version=request.clientproto,
            headers=[(name, value) for name, values in request.requestHeaders.getAllRawHeaders()
                     for value in values],
            body=body,
        ))
        return self.handler(self, request)

    def upload_started(self, request: StreamingRequest) -> None:
        self.uploads.append(request)

    def upload_chunk(self, request: StreamingRequest, data: bytes) -> None:
        if self.on_upload_chunk is not None:
            self.on_upload_chunk(request, data)

    async def stop_listening(self) -> None:
        if self.port is not None:
            port, self.port = self.port, None
            await within(port.stopListening())

    def drop_connections(self) -> None:
        """Abort every open connection, as a crashed server's kernel would reset them."""
        for transport in list(self.open_connections):
            transport.abortConnection()

    async def close(self) -> None:
        await self.stop_listening()
        self.drop_connections()
        await wait_until(lambda: not self.open_connections, message=f"{self.name} to close")


class UnresponsiveListener:
    """A port whose accept queue is full, so the kernel leaves new connections unanswered.

    Connecting to it hangs until the connector gives up: a connect timeout on
    loopback, deterministically.
    """

    def __init__(self) -> None:
        self._server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._server.bind((LOOPBACK, 0))
        self._server.listen(0)
        self.port_number = self._server.getsockname()[1]
        self._fillers: list[socket.socket] = []
        for _ in range(16):
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            filler.settimeout(0.05)
            self._fillers.append(filler)
            try:
                filler.connect((LOOPBACK, self.port_number))
            except (TimeoutError, BlockingIOError):
                return  # the queue is full: this one was left hanging
        self.close()
        raise RuntimeError("the kernel answers connections beyond a full accept queue")

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port_number}"

    def close(self) -> None:
        for sock in [*self._fillers, self._server]:
            sock.close()


Script = Callable[["ScriptedConnection", bytes], None]


class ScriptedConnection(Protocol):
    """One connection to a `ScriptedBackend`: splits what arrives into requests (a head,
    then a Content-Length or chunked body) and hands each, as raw bytes, to the script."""

    def __init__(self, backend: ScriptedBackend) -> None:
        self.backend = backend
        self.buffer = b""
        self.requests = 0  # answered on this connection so far

    def connectionMade(self) -> None:
        self.backend.connections_made += 1
        self.backend.open_connections.add(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.backend.open_connections.discard(self)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = _request_end(self.buffer)
            if end is None:
                return
            request, self.buffer = self.buffer[:end], self.buffer[end:]
            self.backend.requests.append(request)
            self.backend.script(self, request)
            self.requests += 1
            if not self.transport.connected or self.transport.disconnecting:
                return

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    def close(self) -> None:
        self.transport.loseConnection()


def _request_end(buffer: bytes) -> int | None:
    """Where the first complete request in ``buffer`` ends, if it is all there."""
    head_end = buffer.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    body_start = head_end + 4
    head = buffer[:head_end].lower()
    if b"\r\ntransfer-encoding:" in head:
        end = buffer.find(b"\r\n0\r\n\r\n", body_start - 2)
        return None if end < 0 else end + 7
    for line in head.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
            return body_start + length if len(buffer) >= body_start + length else None
    return body_start


class ScriptedBackend:
    """A raw loopback backend that writes exact bytes, for the bugs that live on the
    backend's side of the wire: ``script(connection, request)`` is called for every
    complete request and answers with ``connection.write`` (anything at all: 1xx,
    odd framing, a close without a word). Health checks are scripted like the rest."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[bytes] = []
        self.connections_made = 0
        self.open_connections: set[ScriptedConnection] = set()
        self.port: IListeningPort | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port.getHost().port}"

    def start(self) -> ScriptedBackend:
        factory = Factory.forProtocol(lambda: ScriptedConnection(self))
        factory.noisy = False
        self.port = global_reactor.listenTCP(0, factory, interface=LOOPBACK)
        return self

    async def close(self) -> None:
        if self.port is not None:
            port, self.port = self.port, None
            await within(port.stopListening())
        for connection in list(self.open_connections):
            connection.transport.abortConnection()
        await wait_until(lambda: not self.open_connections, message="scripted backend to close")


# -- the balancer, in process --------------------------------------------------------------


def _merge(base: dict, extra: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def equalizer_config(backends: list[str], **sections: dict) -> dict:
    """A config document for tests: loopback listeners on ephemeral ports, no rate limit,
    active health checks off, quick shutdown; ``sections`` override any of it."""
    base = {
        "proxy": {"listen": f"tcp:0:interface={LOOPBACK}", "retries": 1,
                  "timeouts": {"connect": "2s", "response": "10s", "idle": "10s",
                               "shutdown": "1s"}},
        "admin": {"listen": f"tcp:0:interface={LOOPBACK}"},
        "balancer": {"strategy": "round_robin", "backends": [{"url": url} for url in backends]},
        "health": {"interval": 0, "path": "/_health"},
        "rate_limit": {"enabled": False},
        "logging": {"access_log": False},
    }
    return _merge(base, sections)


class ListeningEqualizer:
    """Where a balancer with ``proxy_port`` and ``admin_port`` on loopback answers."""

    proxy_port: int
    admin_port: int

    @property
    def proxy_url(self) -> str:
        return f"http://{LOOPBACK}:{self.proxy_port}"

    @property
    def admin_url(self) -> str:
        return f"http://{LOOPBACK}:{self.admin_port}"


@attrs.define
class RunningEqualizer(ListeningEqualizer):
    """An EqualizerService started in this process, and where to reach it."""

    service: EqualizerService
    proxy_port: int
    admin_port: int

    def backend(self, url: str):
        """The pool's Backend for ``url``."""
        return next(b for b in self.service.pool.backends if b.url == url)

    async def stop(self) -> None:
        await within(Deferred.fromCoroutine(_stop_service(self.service)), 15)


async def _stop_service(service: EqualizerService) -> None:
    result = service.stopService()
    if isinstance(result, Deferred):
        await result


async def start_equalizer(document: dict) -> RunningEqualizer:
    """Build and start an EqualizerService from a config document, on the global reactor."""
    service = EqualizerService(parse_config(document), global_reactor)
    service.startService()
    # The proxy listens once the store's first connection attempt is over (SPEC 4.5).
    await within(service.readiness.wait(), 15)
    ports = {}
    for child in service:
        if isinstance(child, Listener):
            ports["proxy" if child.factory is service.proxy_site else "admin"] = \
                child.port.getHost().port
    return RunningEqualizer(service, ports["proxy"], ports["admin"])


# -- the balancer, as a twistd child process --------------------------------------------------


def twistd_command() -> list[str]:
    """The twistd next to this interpreter (``python -m twisted`` is not twistd)."""
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.path.exists(twistd):
        return [twistd]
    return [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; "
            "sys.argv[0] = 'twistd'; run()"]


def vm_rss_kib(pid: int, field: str = "VmRSS") -> int:
    """Resident memory of process ``pid`` in KiB, from /proc/PID/status (``VmHWM``: its peak)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def reset_peak_rss(pid: int) -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of ``pid`` to its current RSS, if allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


class EqualizerProcess(ListeningEqualizer):
    """``twistd -n equalizer --config FILE`` in a child process, with its output in a file."""

    def __init__(self, document: dict, directory: str) -> None:
        self.proxy_port = free_port()
        self.admin_port = free_port()
        document = _merge(document, {
            "proxy": {"listen": f"tcp:{self.proxy_port}:interface={LOOPBACK}"},
            "admin": {"listen": f"tcp:{self.admin_port}:interface={LOOPBACK}"},
        })
        self.config_path = os.path.join(directory, "equalizer.yml")
        with open(self.config_path, "w") as f:
            yaml.safe_dump(document, f)
        self._output = tempfile.TemporaryFile(dir=directory)
        self.process: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_kib(self) -> int:
        return vm_rss_kib(self.pid)

    def launch(self) -> None:
        """Start twistd without waiting for anything."""
        env = dict(os.environ, PYTHONPATH=REPO)
        env.pop("EQUALIZER_DATABASE_URL", None)
        env.pop("EQUALIZER_ADMIN_TOKEN", None)
        self.process = subprocess.Popen(
            [*twistd_command(), "-n", "--pidfile=", "equalizer", "--config", self.config_path],
            cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=self._output,
            stderr=subprocess.STDOUT,
        )

    async def start(self, client: HTTPClient, timeout: float = 20.0) -> None:
        """Start twistd and wait until the admin ``/health`` answers (any status)."""
        self.launch()

        async def answers() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"twistd exited with {self.process.returncode}:\n"
                                     f"{self.output()}")
            try:
                await within(client.get(self.admin_url + "/health"), 2)
            except Exception:
                return False
            return True

        await wait_until(answers, timeout, interval=0.05, message="twistd's admin /health")

    async def stop(self, timeout: float = 15.0) -> str:
        """SIGTERM by PID, wait for the exit (SIGKILL after ``timeout``); return the output."""
        process = self.process
        if process is not None and process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                await wait_until(lambda: process.poll() is not None, timeout, interval=0.02,
                                 message="twistd to exit after SIGTERM")
            finally:
                if process.poll() is None:
                    os.kill(process.pid, signal.SIGKILL)
                    process.wait(5)
        return self.output()

    def output(self) -> str:
        self._output.seek(0)
        return self._output.read().decode("utf-8", "replace")


__all__ = [
    "BackendServer", "EqualizerProcess", "RawClient", "RawResponse", "RecordedRequest",
    "RunningEqualizer", "UnresponsiveListener", "equalizer_config", "free_port", "get_json",
    "http_client", "name_handler", "parse_response", "raw_connect", "raw_request", "sleep",
    "reset_peak_rss", "start_equalizer", "status_of", "vm_rss_kib", "wait_until", "within",
]
