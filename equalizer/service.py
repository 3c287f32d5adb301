"""``twistd equalizer``: command-line options and the service tree they build.

makeService only wires parts together; each part lives in its own module.
Children start in the order they are added and stop in reverse, so on the way
down the listeners close first, then the health monitor, then the store.
"""

from __future__ import annotations

import atexit
import gc
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import NoReturn

import attrs
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError, ReactorNotRunning
from twisted.logger import Logger
from twisted.python import usage

from equalizer.admin.api import AdminAPI
from equalizer.balancer.health import HealthMonitor, HTTPHealthChecker
from equalizer.balancer.pool import BackendPool, DrainCancelled
from equalizer.balancer.stats import TrafficStats
from equalizer.balancer.strategies import make_strategy
from equalizer.buckets.interface import IBucketStore
from equalizer.buckets.leasing import LeasingStore
from equalizer.buckets.memory import MemoryStore
from equalizer.buckets.postgres.store import PostgresStore
from equalizer.config.loader import Config, ConfigError, apply_overrides, load_config, url_identity
from equalizer.demo import demo_service, demo_urls
from equalizer.logs.service import LogFileError, LoggingService, open_logging
from equalizer.metrics import EqualizerCollector, metrics_registry
from equalizer.proxy.admission import RateLimiter
from equalizer.proxy.exchange import Exchange, Proxy, ProxySite, key_reader, no_lines
from equalizer.proxy.upstream import UpstreamPool
from equalizer.readiness import READY_TIMEOUT, Readiness

log = Logger()

STORE_RETRY_SECONDS = 2.0
"""How often start-up tries again to reach a database that was down."""


class Options(usage.Options):
    """Flags override the YAML file; see SPEC section 2."""

    synopsis = "[options]"
    optParameters = [
        ["config", "c", None, "YAML configuration file (default: config/equalizer.yml if present)"],
        ["listen", None, None, "proxy endpoint, e.g. tcp:8080"],
        ["admin", None, None, "admin API endpoint, e.g. tcp:8081:interface=127.0.0.1"],
        ["database-url", None, None, "PostgreSQL DSN for the bucket store"],
    ]
    optFlags = [["demo", None, "start three whoami backends on loopback and balance over them"]]

    def __init__(self) -> None:
        super().__init__()
        self["backends"] = []

    def opt_backend(self, url: str) -> None:
        """backend URL (repeatable; replaces the configured backends)"""
        self["backends"].append(url)


def read_config(options: Options, environ: dict[str, str]) -> Config:
    """The configuration from file, environment and flags, or ConfigError."""
    config = load_config(options["config"])
    backends = tuple(options["backends"]) or (demo_urls() if options["demo"] else ())
    return apply_overrides(
        config,
        listen=options["listen"],
        admin=options["admin"],
        backends=backends,
        database_url=options["database-url"],
        env=environ,
    )


def makeService(options: Options, reactor=None) -> MultiService:
    """Build the service tree, or exit with one line per configuration problem."""
    if reactor is None:
        from twisted.internet import reactor
    try:
        config = read_config(options, os.environ)
    except ConfigError as error:
        for problem in error.problems:
            print(f"config error: {problem}", file=sys.stderr)
        raise SystemExit(1) from None
    try:
        logging_service = open_logging(config.logging, reactor, options.parent)
    except LogFileError as error:
        print(f"config error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    service = EqualizerService(config, reactor, demo=options["demo"],
                               reread=lambda: read_config(options, os.environ),
                               logging_service=logging_service)
    service.stop_process = lambda status: stop_twistd(reactor, status)
    return service


def stop_twistd(reactor, status: int) -> None:
    """Stop the reactor (services stop in order) and have the process exit with ``status``.

    twistd exits 0 whenever its reactor stops, whatever the reason; so the status is
    set at interpreter exit, after twistd has removed its pidfile and stopped logging.
    """
    atexit.register(_exit_now, status)
    try:
        reactor.stop()
    except ReactorNotRunning:
        pass  # already stopping


def _exit_now(status: int) -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


class EqualizerService(MultiService):
    """The running balancer: proxy, admin API, health monitor and their shared state.

    ``reread`` reads and validates the configuration again; when given, SIGHUP
    reloads it (SPEC 7).
    """

    def __init__(self, config: Config, reactor, *, demo: bool = False,
                 reread: Callable[[], Config] | None = None,
                 logging_service: LoggingService | None = None,
                 store: IBucketStore | None = None) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.reread = reread
        self.logging_service = logging_service
        if logging_service is not None:
            logging_service.setServiceParent(self)  # first: starts first, stops last
        self.stats = TrafficStats(started=reactor.seconds())
        self.pool = BackendPool(config.balancer.backends, config.balancer.strategy)
        if demo:
            demo_service(reactor).setServiceParent(self)
        self.store = make_store(config, reactor) if store is None else store
        buckets = BucketService(self.store, reactor,
                                needs_connection=not isinstance(self.store, MemoryStore))
        buckets.setServiceParent(self)
        self.readiness = buckets.readiness
        self.health = HealthMonitor(self.pool, config.health, HTTPHealthChecker(reactor), reactor)
        self.health.setServiceParent(self)
        timeouts = config.proxy.timeouts
        self.upstreams = UpstreamPool(reactor, reactor, connect_timeout=timeouts.connect,
                                      idle_timeout=timeouts.idle)
        self.upstreams.setServiceParent(self)
        self.proxy = Proxy(
            self.pool, self.upstreams, config.proxy, reactor, self.stats, self.health,
            scheme=b"https" if config.proxy.listen.startswith("ssl:") else b"http",
        )
        self.proxy.access_log.attach(logging_service)
        self.limiter = RateLimiter(self.store, config.rate_limit, self.stats)
        self.proxy_site = ProxySite(self.proxy, config.proxy, reactor)
        self.admin = AdminAPI(self.pool, self.stats, reactor, self.store,
                              config.rate_limit.default, self.forget_backend, config.admin.token)
        self.admin.metrics_registry = metrics_registry(
            EqualizerCollector(self.pool, self.stats, self.limiter, self.store, reactor))
        self.admin.readiness = self.readiness
        self._apply_settings(config)
        self.proxy_listener = self._listen("proxy.listen", config.proxy.listen, self.proxy_site)
        self.proxy_listener.gate(self.readiness, self._proxy_listening, self._cannot_listen_late)
        self.admin_listener = self._listen("admin.listen", config.admin.listen, self.admin.site())
        self._previous_sighup = None
        self._previous_sigusr1 = None
        self._starting_since = reactor.seconds()
        self.exit_status = 0
        self.stop_process: Callable[[int], None] | None = None

    def setServiceParent(self, parent) -> None:
        """twistd hands us its Application here: our log observer replaces its own."""
        super().setServiceParent(parent)
        if self.logging_service is not None:
            self.logging_service.install(parent)

    def _apply_settings(self, config: Config) -> None:
        """Settings that take effect at once, at start-up and on reload."""
        self.proxy.config = config.proxy
        self.proxy.log_access = config.logging.access_log
        self.proxy.hash_key = (key_reader(config.balancer.hash_key)
                               if config.balancer.strategy == "hash" else None)
        self.proxy_site.max_header_bytes = config.proxy.max_header_bytes
        self.proxy_site.timeOut = config.proxy.timeouts.idle or None
        self.upstreams.configure(connect_timeout=config.proxy.timeouts.connect,
                                 idle_timeout=config.proxy.timeouts.idle)
        self.limiter.configure(config.rate_limit)
        self.store.configure(config.rate_limit)
        if config.rate_limit.enabled:
            self.proxy.admit = self.limiter.admit
            self.proxy.response_lines = self.limiter.response_lines
            self.proxy.owned_fields = self.limiter.owned_fields
        else:
            self.proxy.admit = Exchange.dispatch
            self.proxy.response_lines = no_lines
            self.proxy.owned_fields = frozenset()
        self.admin.default_policy = config.rate_limit.default

    # -- SIGHUP reload ----------------------------------------------------------------

    def reload(self) -> bool:
        """Read the file again and apply it; an invalid file changes nothing."""
        try:
            config = self.reread()
        except ConfigError as error:
            for problem in error.problems:
                log.error("reload refused, running configuration kept: {problem}",
                          problem=problem)
            return False
        self.apply(config)
        log.info("configuration reloaded")
        return True

    def apply(self, config: Config) -> None:
        """Switch a running balancer to ``config`` without dropping a connection.

        Settings that change only on restart keep their running values, in
        ``self.config`` too: it always says what is in effect.
        """
        for key in restart_only_changes(self.config, config):
            _warn_restart_only(key, setting(self.config, key), setting(config, key))
        config = with_running_settings(config, self.config)
        self._apply_backends(config)
        if config.balancer.strategy != self.config.balancer.strategy:
            self.pool.strategy = make_strategy(config.balancer.strategy)
        self._apply_settings(config)
        self.health.reconfigure(config.health)
        if self.logging_service is not None:
            self.logging_service.reconfigure(config.logging)
        self.config = config

    def _apply_backends(self, config: Config) -> None:
        """The file's backends win: new ones join, missing ones drain and leave."""
        wanted = {url_identity(b.url): b for b in config.balancer.backends}
        for backend in list(self.pool.backends):
            entry = wanted.pop(url_identity(backend.url), None)
            if entry is None:
                self.pool.drain(backend).addCallbacks(
                    lambda _, b=backend: self.remove_backend(b),
                    lambda failure: failure.trap(DrainCancelled))
            else:
                backend.weight = entry.weight
                if backend.draining:
                    self.pool.cancel_drain(backend)
        for entry in wanted.values():
            self.pool.add(entry.url, entry.weight)
        self.pool.changed()

    def remove_backend(self, backend) -> None:
        if backend in self.pool.backends:
            self.pool.remove(backend)
            self.forget_backend(backend)

    def forget_backend(self, backend) -> None:
        self.upstreams.drop_backend(backend)

    def _on_sighup(self, signum, frame) -> None:
        self.reactor.callFromThread(self.reload)

    # -- SIGUSR1: reopen the log file -----------------------------------------------------

    def reopen_logs(self) -> None:
        """Open the log file again under its name, as ``logrotate ... postrotate kill -USR1``
        and twistd expect: after the old file was moved away, new lines go to a new one."""
        if self.logging_service is None:
            log.info("SIGUSR1: twistd's own logging (--syslog, --logger) is in use; "
                     "nothing to reopen")
            return
        self.logging_service.reopen()

    def _on_sigusr1(self, signum, frame) -> None:
        self.reactor.callFromThread(self.reopen_logs)

    # -- readiness (SPEC 4.5) ---------------------------------------------------------------

    def _proxy_listening(self) -> None:
        """The proxy listener is open: say so, and how long start-up took."""
        log.info("proxy listening on {endpoint}, {waited:.3f}s after start-up began "
                 "(bucket store {store})", endpoint=self.config.proxy.listen,
                 waited=self.reactor.seconds() - self._starting_since,
                 store="available" if self.store.available else "unavailable")

    def _cannot_listen_late(self, error: ListenFailed) -> None:
        """The proxy port could not be bound once ready (it was taken meanwhile): there is
        nothing to serve, so stop with status 1 (the Listener logged the line)."""
        self.exit_status = 1
        if self.stop_process is not None:
            self.stop_process(1)

    # -- start and graceful stop ----------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        # Everything built so far (modules, config, services) lives as long as the
        # process: move it out of the cyclic collector's sight. Full collections then
        # scan only what requests create; they were the 30-40 ms p99 stalls.
        gc.collect()
        gc.freeze()
        if self.reread is not None:
            self._previous_sighup = signal.signal(signal.SIGHUP, self._on_sighup)
            self._previous_sigusr1 = signal.signal(signal.SIGUSR1, self._on_sigusr1)

    def stopService(self) -> Deferred[None]:
        """Stop accepting, let requests in flight finish (bounded), then stop the rest."""
        if self._previous_sighup is not None:
            signal.signal(signal.SIGHUP, self._previous_sighup)
            self._previous_sighup = None
        if self._previous_sigusr1 is not None:
            signal.signal(signal.SIGUSR1, self._previous_sigusr1)
            self._previous_sigusr1 = None
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        Service.stopService(self)
        listeners = (self.admin_listener, self.proxy_listener)
        for listener in listeners:
            await maybeDeferred(listener.stopService)
        timeout = self.config.proxy.timeouts.shutdown
        in_flight = self.proxy.active
        if in_flight:
            log.info("waiting up to {timeout}s for {n} requests in flight", timeout=timeout,
                     n=in_flight)
        try:
            await self.proxy.wait_idle().addTimeout(timeout, self.reactor)
        except defer.TimeoutError:
            log.warn("{n} requests still in flight after {timeout}s; stopping anyway",
                     n=self.proxy.active, timeout=timeout)
        for child in reversed(list(self)):
            if child not in listeners:
                await maybeDeferred(child.stopService)

    def _listen(self, key: str, description: str, factory) -> Listener:
        """A listener child; bad endpoint strings were refused by config validation."""
        endpoint = serverFromString(self.reactor, description)
        listener = Listener(endpoint, factory, key, description)
        listener.setServiceParent(self)
        return listener


class ListenFailed(SystemExit, Exception):
    """An endpoint could not be bound: exit status 1, without a traceback.

    A SystemExit, so the interpreter exits quietly; an Exception too, so that
    twistd removes its pidfile and, daemonized, hands the message to its parent.
    """

    def __init__(self, message: str) -> None:
        super().__init__(1)
        self.message = message

    def __str__(self) -> str:
        return self.message


class Listener(StreamServerEndpointService):
    """A listener whose failure to bind (port in use, no such directory) is one line
    on stderr and ListenFailed: a user's mistake, not a traceback.

    twistd binds in ``privilegedStartService``, before the reactor runs. A gated
    listener (:meth:`gate`) that is not ready by then binds once it is, and reports
    a failure to bind to ``on_failure`` instead of raising.
    """

    _raiseSynchronously = True

    def __init__(self, endpoint, factory, key: str, description: str) -> None:
        super().__init__(endpoint, factory)
        self.key = key
        self.description = description
        self._readiness: Readiness | None = None
        self._on_open: Callable[[], None] = lambda: None
        self._on_failure: Callable[[ListenFailed], None] = lambda error: None
        self._pending: Deferred[None] | None = None

    def gate(self, readiness: Readiness, on_open: Callable[[], None],
             on_failure: Callable[[ListenFailed], None]) -> None:
        """Listen only once ``readiness`` is set (SPEC 4.5); ``on_open`` once listening."""
        self._readiness = readiness
        self._on_open = on_open
        self._on_failure = on_failure

    def privilegedStartService(self) -> None:
        if self._readiness is not None and not self._readiness.ready:
            Service.privilegedStartService(self)  # bind later, in startService's wait
            try:
                probe_address(self.endpoint)
            except OSError as error:
                self._fail(error)
            return
        self._bind()

    def startService(self) -> None:
        Service.startService(self)
        if self._waitingForPort is not None or self._pending is not None:
            return
        if self._readiness is None:
            self._bind()
        else:
            self._pending = self._readiness.wait()
            self._pending.addCallback(self._bind_late)

    def _bind(self) -> None:
        try:
            super().privilegedStartService()
        except (CannotListenError, OSError) as error:
            self._fail(error)
        self._on_open()

    def _fail(self, error: Exception) -> NoReturn:
        message = f"cannot listen on {self.key} {self.description!r}: {_reason(error)}"
        log.error("{message}; exiting", message=message)  # a daemon's record of why
        if sys.__stderr__ is not None:
            print(f"error: {message}", file=sys.__stderr__, flush=True)
        raise ListenFailed(message) from None

    def _bind_late(self, result: None) -> None:
        self._pending = None
        try:
            self._bind()
        except ListenFailed as error:
            self._waitingForPort = None
            self._on_failure(error)

    def stopService(self) -> Deferred[None]:
        """Stop listening, or stop waiting to."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.cancel()
            pending.addErrback(lambda failure: failure.trap(defer.CancelledError))
        if self._waitingForPort is None:
            Service.stopService(self)
            return defer.succeed(None)
        return super().stopService()


def probe_address(endpoint) -> None:
    """Bind, without listening, the address a TCP or SSL endpoint will listen on, and let
    it go at once; OSError if it cannot be bound (taken, not this host's).

    A listener that opens only later (SPEC 4.5) so still finds a port already in use
    while twistd starts: one line and exit 1 before it daemonizes, not a daemon that
    reports success and then exits. Nothing accepts on the probe, so no client ever
    connects to it. Ephemeral ports (0) and other endpoints (``unix:``) are not probed.
    """
    port, interface = getattr(endpoint, "_port", None), getattr(endpoint, "_interface", None)
    if not isinstance(port, int) or not port or not isinstance(interface, str):
        return
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as listenTCP does
        probe.bind((interface, port))


def _reason(error: Exception) -> str:
    cause = error.socketError if isinstance(error, CannotListenError) else error
    return getattr(cause, "strerror", None) or str(cause)


RESTART_ONLY = ("proxy.listen", "admin.listen", "admin.token", "rate_limit.store",
                "rate_limit.database_url", "logging.file", "logging.rotate")
"""Settings a reload cannot change: sockets, the store and the log are opened once."""

SECRETS = {"admin.token": "token", "rate_limit.database_url": "database URL"}
"""Restart-only settings whose values are never logged, and what to call them instead."""


def setting(config: Config, key: str) -> object:
    """The value at a ``section.name`` key path."""
    section, name = key.split(".")
    return getattr(getattr(config, section), name)


def restart_only_changes(running: Config, new: Config) -> list[str]:
    """The restart-only keys whose value in ``new`` is not the running one."""
    return [key for key in RESTART_ONLY if setting(running, key) != setting(new, key)]


def with_running_settings(new: Config, running: Config) -> Config:
    """``new`` with the running value of every restart-only setting: what is in effect."""
    sections: dict[str, dict[str, object]] = {}
    for key in RESTART_ONLY:
        section, name = key.split(".")
        sections.setdefault(section, {})[name] = setting(running, key)
    return attrs.evolve(new, **{section: attrs.evolve(getattr(new, section), **values)
                                for section, values in sections.items()})


def _warn_restart_only(key: str, running: object, wanted: object) -> None:
    if key in SECRETS:
        log.warn("{key} changes only on restart; the running {what} is kept",
                 key=key, what=SECRETS[key])
    else:
        log.warn("{key} changes only on restart; keeping {running!r} (file says {wanted!r})",
                 key=key, running=running, wanted=wanted)


def make_store(config: Config, reactor) -> IBucketStore:
    """The bucket store the configuration names; the bucket API uses it either way."""
    if config.rate_limit.store == "postgres":
        return LeasingStore(PostgresStore(config.rate_limit.database_url, reactor), reactor)
    return MemoryStore(reactor)


class BucketService(Service):
    """Starts the bucket store and stops it last; a database down at start-up is retried.

    ``readiness`` is set once the store's first connection attempt has finished
    (connected and migrated, or failed) or READY_TIMEOUT has passed (SPEC 4.5);
    a store that needs no connection (memory) is ready from the start. Once ready,
    while the store is down, ``on_store_error`` decides for proxied requests and the
    bucket API answers 503, exactly as when the database goes away later.
    """

    def __init__(self, store: IBucketStore, clock, *, needs_connection: bool = True,
                 ready_timeout: float = READY_TIMEOUT) -> None:
        self.store = store
        self._clock = clock
        self._retry = None
        self._ready_timer = None
        self._ready_timeout = ready_timeout
        self._late = False  # serving without the store: say when it comes
        self.readiness = Readiness(ready=not needs_connection)

    def startService(self) -> None:
        super().startService()
        if not self.readiness.ready:
            self._ready_timer = self._clock.callLater(self._ready_timeout, self._time_up)
        self._start()

    def _start(self) -> None:
        self._retry = None
        self.store.start().addCallbacks(self._connected, self._failed)

    def _connected(self, result: object = None) -> None:
        if self._late:
            log.info("bucket store available")
        self._attempted()

    def _attempted(self, result: object = None) -> None:
        self._cancel_ready_timer()
        self.readiness.set()

    def _time_up(self) -> None:
        """The first attempt is taking too long (a database that accepts and never answers):
        serve anyway, under ``on_store_error``, and let the attempt go on."""
        self._ready_timer = None
        self._late = True
        log.warn("bucket store: no answer to its first connection attempt after {seconds}s; "
                 "serving now, on_store_error applies until it connects",
                 seconds=self._ready_timeout)
        self.readiness.set()

    def _cancel_ready_timer(self) -> None:
        if self._ready_timer is not None and self._ready_timer.active():
            self._ready_timer.cancel()
        self._ready_timer = None

    def _failed(self, failure) -> None:
        self._late = True
        self._attempted()
        if not self.running:
            return
        log.error("bucket store unavailable at start-up, retrying in {seconds}s: {error}",
                  seconds=STORE_RETRY_SECONDS, error=failure.getErrorMessage())
        self._retry = self._clock.callLater(STORE_RETRY_SECONDS, self._start)

    def stopService(self):
        super().stopService()
        self._cancel_ready_timer()
        self.readiness.set()  # bucket calls still waiting get their answer (503) now
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        return self.store.stop()
