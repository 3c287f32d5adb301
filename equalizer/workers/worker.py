"""A worker process (SPEC 9): ``python -m equalizer.workers.worker SUPERVISOR_PID``, started
by the supervisor with the configuration it runs on stdin (``commands.encode_config``; a
worker never reads the file), the listening socket as fd 3 and its end of the control
channel as fd 4.

It runs the data plane of an EqualizerService: the proxy on the inherited socket, a
leasing bucket store whose settlements go to the supervisor, passive health checks
(active ones run in the supervisor, their results come with the backends). Its log
lines go to the supervisor, whole, in batches. It ends when the supervisor says so
(SIGTERM: drain, then exit) or goes away: the channel closing, or the kernel's
``PR_SET_PDEATHSIG``, stop it accepting at once.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.error import ReactorNotRunning
from twisted.internet.task import deferLater
from twisted.logger import FilteringLogObserver, Logger, globalLogBeginner
from twisted.protocols import amp

from equalizer.balancer.pool import DrainCancelled
from equalizer.buckets.leasing import LeasingStore
from equalizer.config.model import Config
from equalizer.logs.batch import LineBatcher
from equalizer.logs.formats import FORMATS, LineObserver, level_filter
from equalizer.proxy.site import accept_in_turn
from equalizer.service import EqualizerService
from equalizer.workers import commands
from equalizer.workers.aggregate import snapshot
from equalizer.workers.leases import RemoteStore

log = Logger()

LISTEN_FD = 3
CONTROL_FD = 4
PR_SET_PDEATHSIG = 1
FLUSH_GRACE = 0.1
"""Seconds a stopping worker lets its last answers be written before it exits."""


def worker_config(config: Config) -> Config:
    """The configuration as a worker applies it: no active health checks in any pool (the
    supervisor runs them and sends their results)."""
    pools = tuple(attrs.evolve(pool, health=attrs.evolve(pool.health, interval=0.0))
                  for pool in config.pools)
    return attrs.evolve(config, health=attrs.evolve(config.health, interval=0.0),
                        pools=pools)


def supervisor_lines(channel: WorkerChannel) -> Callable[[str], Deferred[Any] | None]:
    """Delivery of a batch of log lines to the supervisor; to standard error when the
    channel is gone or the supervisor does not take them."""

    def deliver(text: str) -> Deferred[Any] | None:
        if channel.connected:
            return channel.callRemote(commands.Lines, text=text).addErrback(
                lambda failure: sys.stderr.write(text))
        sys.stderr.write(text)
        return None

    return deliver


@attrs.define
class ForwardingLog:
    """What the access log and the log observer need of a LoggingService."""

    config: Any
    writer: LineBatcher

    @property
    def access_lines(self) -> LineBatcher:
        """The access log's lines go with the others, already in batches."""
        return self.writer

    def observer(self) -> FilteringLogObserver:
        return FilteringLogObserver(LineObserver(FORMATS[self.config.format], self.writer.write),
                                    [level_filter(self.config)])


class AdoptedListener(Service):
    """The proxy listener on the socket the supervisor bound, opened once ready."""

    def __init__(self, reactor: Any, fd: int, factory: Any) -> None:
        self.reactor = reactor
        self.fd = fd
        self.factory = factory
        self.port: Any = None
        self._gate: tuple | None = None

    def gate(self, readiness, on_open, on_failure) -> None:
        self._gate = (readiness, on_open)

    def startService(self) -> None:
        super().startService()
        readiness, on_open = self._gate
        readiness.wait().addCallback(lambda _: self._open(on_open))

    def _open(self, on_open) -> None:
        if not self.running or self.port is not None:
            return
        family = socket.socket(fileno=self.fd)
        kind = family.family
        family.detach()
        self.port = self.reactor.adoptStreamPort(self.fd, kind, self.factory)
        accept_in_turn(self.port)
        os.close(self.fd)
        on_open()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        port, self.port = self.port, None
        return port.stopListening() if port is not None else None


class NoListener(Service):
    """The admin listener of a worker: the supervisor has the admin API."""

    def gate(self, readiness, on_open, on_failure) -> None:
        """Never opens."""


class WorkerService(EqualizerService):
    """An EqualizerService without the control plane: its admin listener is never
    opened, its backends come from the supervisor, its store leases from it."""

    summary = False
    backends_from_file = False

    def __init__(self, config: Config, reactor: Any, channel: WorkerChannel) -> None:
        self.channel = channel
        self.given = config
        self.first_backends: Deferred[None] = Deferred()
        self._supervisor_health: dict[str, bool] = {}
        store = LeasingStore(RemoteStore(channel.settle, self.first_backends), reactor)
        super().__init__(worker_config(config), reactor, reread=self._given, store=store,
                         probe=lambda d: None)

    def _given(self) -> Config:
        """What a reload applies: the supervisor's configuration, never the file."""
        return worker_config(self.given)

    def _listen(self, key: str, description: str, factory: Any) -> Any:
        listener: Service = (AdoptedListener(self.reactor, LISTEN_FD, factory)
                             if key == "proxy.listen" else NoListener())
        listener.setServiceParent(self)
        return listener

    def _apply_backends(self, config: Config) -> None:
        """Backends come from the supervisor (``set_backends``), not from the file."""

    def _proxy_listening(self) -> None:
        log.info("worker {pid} serving", pid=os.getpid())

    def reload_with(self, config: Config, state: dict[str, list[list[Any]]]) -> bool:
        """Apply the supervisor's new configuration, then take its backends, in one turn
        of the reactor: no request sees a new route whose pool has no backends yet."""
        self.given = config
        reloaded = self.reload()
        self.set_backends(state)
        return reloaded

    def set_backends(self, state: dict[str, list[list[Any]]]) -> None:
        """Make each pool as the supervisor's: same ids, settings and health results. A
        pool this worker does not run is skipped (the state of a pool a reload adds comes
        with that reload, :meth:`reload_with`)."""
        pools = self.pools()
        for name, entries in state.items():
            pool = pools.get(name)
            if pool is not None:
                self._set_pool(pool, entries)
        if not self.first_backends.called:
            self.first_backends.callback(None)

    def _set_pool(self, pool, state: list[list[Any]]) -> None:
        wanted = {entry[0]: entry for entry in state}
        for backend in list(pool.backends):
            entry = wanted.get(backend.id)
            if entry is None or entry[1] != backend.url:
                pool.remove(backend)
                self.forget_backend(backend)
        known = {backend.id: backend for backend in pool.backends}
        for backend_id, url, weight, enabled, draining, healthy, max_requests, backup in state:
            backend = known.get(backend_id)
            if backend is None:
                backend = pool.add(url, weight, max_requests=max_requests, backup=backup)
                backend.id = backend_id
            self._update(pool, backend, weight, enabled, draining, healthy, max_requests,
                         backup)

    def _update(self, pool, backend, weight, enabled, draining, healthy, max_requests,
                backup) -> None:
        if backend.weight != weight:
            pool.set_weight(backend, weight)
        if (backend.max_requests, backend.backup) != (max_requests, backup):
            pool.set_limits(backend, max_requests, backup)
        if backend.enabled != enabled:
            pool.set_enabled(backend, enabled)
        if draining and not backend.draining:
            pool.drain(backend).addErrback(lambda f: f.trap(DrainCancelled))
        elif backend.draining and not draining:
            pool.cancel_drain(backend)
        if self._supervisor_health.get(backend.id) != healthy:  # the supervisor's news only
            self._supervisor_health[backend.id] = healthy
            pool.set_healthy(backend, healthy, "supervisor's health check",
                             self.reactor.seconds())

    def drain_backend(self, backend_id: str) -> Deferred[dict[str, bool]]:
        for pool in self.pools().values():
            backend = pool.get(backend_id)
            if backend is not None:
                return self._drain(pool, backend)
        d: Deferred[dict[str, bool]] = Deferred()
        d.callback({"cancelled": False})
        return d

    def _drain(self, pool, backend) -> Deferred[dict[str, bool]]:
        return pool.drain(backend).addCallbacks(
            lambda _: {"cancelled": False},
            lambda f: f.trap(DrainCancelled) and {"cancelled": True})

    def figures(self) -> dict[str, Any]:
        return snapshot(self.stats, self.pools().values(), self.proxy.active)


class WorkerChannel(amp.AMP):
    """The worker's end of the control channel."""

    service: WorkerService | None = None
    connected = False

    def __init__(self, reactor: Any) -> None:
        super().__init__()
        self.reactor = reactor

    def connectionMade(self) -> None:
        super().connectionMade()
        self.connected = True

    def connectionLost(self, reason) -> None:
        """The supervisor is gone: stop accepting now, finish what is in flight, exit."""
        super().connectionLost(reason)
        self.connected = False
        if self.service is not None and self.service.running:
            self.service.proxy_listener.stopService()
            self.reactor.callLater(0, _stop_reactor, self.reactor)

    def settle(self, batch: list) -> Deferred[str]:
        if not self.connected:
            from equalizer.buckets.interface import StoreUnavailable
            d: Deferred[str] = Deferred()
            d.errback(StoreUnavailable("the supervisor is gone"))
            return d
        return self.callRemote(commands.Settle, batch=json.dumps(batch, ensure_ascii=False)
                               ).addCallback(lambda answer: answer["rows"])

    @commands.SetBackends.responder
    def set_backends(self, state: str) -> dict:
        self.service.set_backends(json.loads(state))
        return {}

    @commands.Drain.responder
    def drain(self, backend_id: str) -> Deferred[dict[str, bool]]:
        return self.service.drain_backend(backend_id)

    @commands.Reload.responder
    def reload(self, config: str, state: str) -> dict[str, bool]:
        return {"ok": self.service.reload_with(commands.decode_config(config),
                                               json.loads(state))}

    @commands.Snapshot.responder
    def snapshot(self) -> dict[str, str]:
        return {"figures": json.dumps(self.service.figures())}


async def _stop(service: WorkerService, lines: LineBatcher) -> None:
    await service.stopService()
    # The reactor's shutdown drops connections without writing what they buffered:
    # give the last answers a moment to go out first.
    await deferLater(service.reactor, FLUSH_GRACE, lambda: None)
    # Lines logged from here on, as the reactor stops, go at once: no timer would run.
    sent = lines.close()
    if sent is not None:  # the last lines reach the supervisor before this process ends
        await sent


def stop(service: WorkerService, lines: LineBatcher) -> Deferred[None]:
    """Drain and stop; signals that come meanwhile (the supervisor's SIGTERM, then the
    kernel's as it exits, or a terminal's SIGINT) change nothing."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return Deferred.fromCoroutine(_stop(service, lines))


def _stop_reactor(reactor: Any) -> None:
    try:
        reactor.stop()
    except ReactorNotRunning:
        pass  # already stopping (SIGTERM came first)


def die_with_parent(parent: int) -> None:
    """Have the kernel send SIGTERM when the supervisor dies; exit if it already has."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the channel closing stops the worker all the same
    if os.getppid() != parent:
        raise SystemExit(0)


def main(argv: list[str]) -> None:
    die_with_parent(int(argv[1]))
    config = commands.decode_config(sys.stdin.read())  # until the supervisor closes it
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory

    channel = WorkerChannel(reactor)
    logging = ForwardingLog(config.logging, LineBatcher(reactor, supervisor_lines(channel)))
    globalLogBeginner.beginLoggingTo([logging.observer()], redirectStandardIO=False)
    service = WorkerService(config, reactor, channel)
    channel.service = service
    reactor.adoptStreamConnection(CONTROL_FD, socket.AF_UNIX,
                                  Factory.forProtocol(lambda: channel))
    os.close(CONTROL_FD)
    service.proxy.access_log.attach(logging)
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", stop, service, logging.writer)
    reactor.run()
