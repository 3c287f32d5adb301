"""The supervisor: the twistd process when ``proxy.workers`` is more than 1 (SPEC 9).

It keeps the control plane (admin API, dashboard, health monitor, bucket store, log
files) and binds the proxy listener once, as with one process, but never accepts on
it: each worker inherits the listening socket (``spawnProcess`` ``childFDs``, then
``adoptStreamPort``) and the kernel hands every new connection to one of the workers
waiting in ``accept``. Each worker also inherits one end of a socketpair, the control
channel (AMP, :mod:`equalizer.workers.commands`).

Over it the supervisor sends the backends as its pools have them, every named pool
with ``default`` (every :data:`SYNC_INTERVAL` when they changed: admin changes, health
results), drains, reloads (each carrying the configuration and the pools' state after
the supervisor's own reload, so that a worker runs what the supervisor read, and
applies a new route and its pool's backends at once) and asks
for stats snapshots (every :data:`SNAPSHOT_INTERVAL`, summed
into its own figures, :mod:`equalizer.workers.aggregate`); workers send token
settlements (:mod:`equalizer.workers.leases`) and log lines.

A worker that exits is replaced at once with a warning; one that keeps dying within
:data:`STABLE_AFTER` seconds of its start waits twice as long each time (from
:data:`FIRST_BACKOFF`, at most :data:`MAX_BACKOFF`). SIGTERM stops accepting, has
every worker drain and exit (bounded by ``proxy.timeouts.shutdown``), then exits.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from typing import TYPE_CHECKING, Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.protocols import amp

import equalizer
from equalizer.balancer.pool import DrainCancelled
from equalizer.buckets.interface import StoreUnavailable
from equalizer.buckets.memory import MemoryStore
from equalizer.workers import commands
from equalizer.workers.aggregate import Aggregate
from equalizer.workers.leases import encode_rows, settle_in_memory

if TYPE_CHECKING:
    from collections.abc import Mapping

log = Logger()

SYNC_INTERVAL = 0.05
"""Seconds between two looks at the backends for changes to send to the workers."""

SNAPSHOT_INTERVAL = 0.25
"""Seconds between two collections of the workers' figures for /stats and /metrics."""

STABLE_AFTER = 10.0
"""A worker that lived this long before dying is replaced at once."""

FIRST_BACKOFF = 0.5
MAX_BACKOFF = 30.0
"""Waits before replacing a worker that keeps dying: doubling, within these bounds."""

KILL_AFTER = 5.0
"""Seconds past ``proxy.timeouts.shutdown`` after which workers still running are killed."""

def worker_environment() -> dict[str, str]:
    """This process's environment, with this equalizer package first on the path."""
    env = dict(os.environ)
    here = os.path.dirname(os.path.dirname(os.path.abspath(equalizer.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (here, env.get("PYTHONPATH"))))
    return env


def backend_state(pool) -> list[list[Any]]:
    """What workers need of each backend: id, url, weight, enabled, draining, healthy,
    max_requests, backup."""
    return [[b.id, b.url, b.weight, b.enabled, b.draining, b.healthy, b.max_requests,
             b.backup] for b in pool.backends]


def pools_state(pools: Mapping[str, Any]) -> dict[str, list[list[Any]]]:
    """:func:`backend_state` of every pool, by pool name."""
    return {name: backend_state(pool) for name, pool in pools.items()}


class Worker:
    """One worker slot: the process in it now, and how often it was replaced."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.pid: int | None = None
        self.process: Any = None
        self.channel: SupervisorChannel | None = None
        self.restarts = 0
        self.started = 0.0
        self.quick_deaths = 0
        self.ended: Deferred[None] | None = None

    def json(self, figures: dict[str, Any] | None) -> dict[str, Any]:
        figures = figures or {}
        return {"pid": self.pid, "requests": figures.get("total", 0),
                "in_flight": figures.get("in_flight", 0), "restarts": self.restarts}


class WorkerProcess(ProcessProtocol):
    def __init__(self, supervisor: Supervisor, worker: Worker) -> None:
        self.supervisor = supervisor
        self.worker = worker

    def processEnded(self, reason) -> None:
        self.supervisor.ended(self.worker, reason.value)


class SupervisorChannel(amp.AMP):
    """The supervisor's end of one worker's control channel."""

    def __init__(self, supervisor: Supervisor, worker: Worker) -> None:
        super().__init__()
        self.supervisor = supervisor
        self.worker = worker

    def connectionMade(self) -> None:
        super().connectionMade()
        self.worker.channel = self
        self.supervisor.send_backends(self)

    def connectionLost(self, reason) -> None:
        super().connectionLost(reason)
        if self.worker.channel is self:
            self.worker.channel = None

    @commands.Settle.responder
    def settle(self, batch: str) -> Deferred[dict[str, str]]:
        return self.supervisor.settle(json.loads(batch)).addCallback(
            lambda rows: {"rows": encode_rows(rows)})

    @commands.Lines.responder
    def lines(self, text: str) -> dict:
        self.supervisor.write_lines(text)
        return {}


class Supervisor(Service):
    """Runs ``proxy.workers`` worker processes for an EqualizerService (see module)."""

    name = "workers"

    def __init__(self, service: Any) -> None:
        self.service = service
        self.reactor = service.reactor
        self.workers = [Worker(i) for i in range(service.config.proxy.workers)]
        self.aggregate = Aggregate()
        self.listen_fd: int | None = None
        self.stopping = False
        self._sent_state: list | None = None
        self._sync = LoopingCall(self.sync)
        self._sync.clock = self.reactor
        self._snapshots = LoopingCall(self.collect)
        self._snapshots.clock = self.reactor

    def attach(self) -> None:
        """Become part of ``service``: its proxy listener opens for the workers, drains
        and reloads reach them, /stats lists them."""
        service = self.service
        self.setServiceParent(service)
        service.proxy_listener.gate(service.readiness, self._listening,
                                    service._cannot_listen_late)
        self._reach_pools()
        service.on_reload.append(self.reload)
        service.admin.workers = self

    # -- start, replace, stop ------------------------------------------------------

    def _listening(self) -> None:
        self.service._proxy_listening()
        port = self.service.proxy_listener.port
        port.stopReading()  # the workers accept; this process only holds the socket
        self.listen_fd = port.fileno()
        if self.running:  # else (bound before the reactor ran) startService starts them
            self._start_workers()

    def startService(self) -> None:
        super().startService()
        if self.listen_fd is not None:
            self._start_workers()

    def _start_workers(self) -> None:
        for worker in self.workers:
            self.spawn(worker)
        self._sync.start(SYNC_INTERVAL, now=False)
        self._snapshots.start(SNAPSHOT_INTERVAL, now=False)

    def spawn(self, worker: Worker) -> None:
        if self.stopping or not self.running:
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        process = WorkerProcess(self, worker)
        worker.process = self.reactor.spawnProcess(
            process, sys.executable,
            [sys.executable, "-m", "equalizer.workers", str(os.getpid())],
            env=worker_environment(), childFDs={0: "w", 1: 1, 2: 2, 3: self.listen_fd,
                                            4: theirs.fileno()})
        theirs.close()
        worker.process.write(self.config_text().encode("ascii"))
        worker.process.closeStdin()
        worker.pid = worker.process.pid
        worker.started = self.reactor.seconds()
        factory = Factory.forProtocol(lambda: SupervisorChannel(self, worker))
        self.reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX, factory)
        ours.close()
        log.info("worker {index} started, pid {pid}", index=worker.index, pid=worker.pid)

    def ended(self, worker: Worker, reason: Exception) -> None:
        pid, worker.pid, worker.process = worker.pid, None, None
        self.aggregate.retire(pid)
        if worker.ended is not None:
            ended, worker.ended = worker.ended, None
            ended.callback(None)
        if self.stopping or not self.running:
            return
        lived = self.reactor.seconds() - worker.started
        worker.quick_deaths = worker.quick_deaths + 1 if lived < STABLE_AFTER else 0
        delay = 0.0 if worker.quick_deaths <= 1 else min(
            MAX_BACKOFF, FIRST_BACKOFF * 2 ** (worker.quick_deaths - 2))
        worker.restarts += 1
        log.warn("worker {index} (pid {pid}) ended: {reason}; replacing it in {delay}s",
                 index=worker.index, pid=pid, reason=reason, delay=delay)
        self.reactor.callLater(delay, self.spawn, worker)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self.stopping = True
        for call in (self._sync, self._snapshots):
            if call.running:
                call.stop()
        waits = []
        for worker in self.workers:
            if worker.process is not None:
                worker.ended = Deferred()
                waits.append(worker.ended)
                worker.process.signalProcess("TERM")
        if not waits:
            return succeed(None)
        done = DeferredList(waits)
        timeout = self.service.config.proxy.timeouts.shutdown + KILL_AFTER
        killer = self.reactor.callLater(timeout, self._kill)
        return done.addCallback(lambda _: killer.active() and killer.cancel())

    def _kill(self) -> None:
        for worker in self.workers:
            if worker.pid is not None:
                log.warn("worker pid {pid} still running: killed", pid=worker.pid)
                os.kill(worker.pid, signal.SIGKILL)

    # -- what goes to the workers ------------------------------------------------------

    def config_text(self) -> str:
        """The configuration this process runs (read, checked, overridden, restart-only
        settings kept), for the workers: they never read the file themselves."""
        return commands.encode_config(self.service.config)

    def channels(self) -> list[SupervisorChannel]:
        return [w.channel for w in self.workers if w.channel is not None]

    def _reach_pools(self) -> None:
        """Drains in every pool, named ones too (a reload may add some), go through here."""
        for pool in self.service.pools().values():
            pool.elsewhere = self

    def sync(self) -> None:
        state = pools_state(self.service.pools())
        if state != self._sent_state:
            self._sent_state = state
            for channel in self.channels():
                self.send_backends(channel)

    def send_backends(self, channel: SupervisorChannel) -> None:
        state = json.dumps(pools_state(self.service.pools()))
        channel.callRemote(commands.SetBackends, state=state).addErrback(_lost)

    def drain(self, backend) -> Deferred[None]:
        """Drain on every worker (the pool marked it draining): fires once none has a
        request in flight on it. Sent on the next turn: a drain that a reload starts (of
        a backend or a pool it removes) reaches the workers after that reload, so a
        worker drops a removed pool's route before it drains the pool's backends, not
        after (in between, the route would find no backend and answer 503)."""
        return deferLater(self.reactor, 0, self.sync).addCallback(
            lambda _: Deferred.fromCoroutine(self._drain(backend.id)))

    async def _drain(self, backend_id: str) -> None:
        calls = [c.callRemote(commands.Drain, backend_id=backend_id).addErrback(_drained)
                 for c in self.channels()]
        answers = await DeferredList(calls, consumeErrors=True)
        if any(ok and answer["cancelled"] for ok, answer in answers):
            raise DrainCancelled(backend_id)

    def reload(self) -> None:
        """Each worker reloads to the configuration this process has just applied, with
        the state of the pools as this reload left them."""
        self._reach_pools()
        self._sent_state = pools_state(self.service.pools())
        state, config = json.dumps(self._sent_state), self.config_text()
        for channel in self.channels():
            channel.callRemote(commands.Reload, config=config, state=state).addErrback(_lost)

    # -- what comes back ---------------------------------------------------------------

    def collect(self) -> None:
        for worker in self.workers:
            if worker.channel is not None:
                worker.channel.callRemote(commands.Snapshot).addCallbacks(
                    self._collected, _lost, callbackArgs=(worker, worker.pid))

    def _collected(self, answer: dict[str, str], worker: Worker, pid: int | None) -> None:
        if pid is not None and worker.pid == pid:
            self.aggregate.live[pid] = json.loads(answer["figures"])
            self.aggregate.write_into(self.service.stats, self.service.pools().values())

    def json(self) -> list[dict[str, Any]]:
        return [w.json(self.aggregate.live.get(w.pid)) for w in self.workers]

    def settle(self, batch: list) -> Deferred[list]:
        store = self.service.store
        if isinstance(store, MemoryStore):
            return succeed(settle_in_memory(store, batch, self.reactor.seconds()))
        return store.leases().settle(batch).addErrback(_unavailable)

    def write_lines(self, text: str) -> None:
        logging_service = self.service.logging_service
        if logging_service is not None:
            logging_service.writer.write(text)
        else:
            sys.stdout.write(text)


def _drained(failure) -> dict[str, bool]:
    """A worker lost during a drain has nothing in flight any more."""
    failure.trap(ConnectionLost, ConnectionDone)
    return {"cancelled": False}


def _lost(failure) -> None:
    """A worker that went away meanwhile: its replacement gets everything anew."""


def _unavailable(failure) -> None:
    raise StoreUnavailable(failure.getErrorMessage())
