"""``twistd equalizer``: command-line options and the service tree they build.

makeService only wires parts together; each part lives in its own module.
Children start in the order they are added and stop in reverse, so on the way
down the listeners close first, then the health monitor, then the store.
"""

from __future__ import annotations

import atexit
import gc
import itertools
import os
import signal
import sys
from collections.abc import Callable, Iterable

import attrs
from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ReactorNotRunning
from twisted.logger import Logger
from twisted.python import usage

from equalizer.admin.api import AdminAPI
from equalizer.balancer.checker import HTTPHealthChecker
from equalizer.balancer.health import HealthMonitor
from equalizer.balancer.outlier import OutlierDetector
from equalizer.balancer.pool import Backend, BackendPool, DrainCancelled
from equalizer.balancer.stats import TrafficStats
from equalizer.buckets.interface import IBucketStore
from equalizer.buckets.leasing import LeasingStore
from equalizer.buckets.memory import MemoryStore
from equalizer.buckets.postgres.store import PostgresStore
from equalizer.config.checks import url_identity
from equalizer.config.loader import ConfigError, apply_overrides, config_path, load_config
from equalizer.config.model import BackendConfig, Config
from equalizer.demo import demo_api_service, demo_routing, demo_service, demo_urls
from equalizer.listeners import Listener, ListenFailed, probe_addresses, with_backlog
from equalizer.logs.service import LogFileError, LoggingService, open_logging
from equalizer.metrics import EqualizerCollector, metrics_registry
from equalizer.proxy.admission import ADMIT_ALL, RateLimiter
from equalizer.proxy.exchange import Proxy
from equalizer.proxy.site import Outbox, ProxySite
from equalizer.proxy.upstream import UpstreamPool
from equalizer.readiness import BucketService
from equalizer.routing.pools import NamedPools, hash_key_of
from equalizer.routing.table import RouteTable
from equalizer.startup import check, help_text, log_summary, print_config_error, version_text

log = Logger()

class Options(usage.Options):
    """Flags override the YAML file; see SPEC section 2."""

    synopsis = "[options]"
    longdesc = ""  # getUsage adds HELP, paragraph by paragraph
    optParameters = [
        ["config", "c", None, "YAML configuration file (default: config/equalizer.yml if present)"],
        ["listen", None, None, "proxy endpoint, e.g. tcp:8080"],
        ["admin", None, None, "admin API endpoint, e.g. tcp:8081:interface=127.0.0.1"],
        ["database-url", None, None, "PostgreSQL DSN for the bucket store"],
        ["workers", None, None, "proxy worker processes: a number or auto (proxy.workers)"],
    ]
    optFlags = [
        ["demo", None, "start whoami backends on loopback and balance over them "
                       "(three, and /api/ routed to a fourth in its own pool)"],
        ["check", None, "validate the configuration, print its summary, exit 0 (valid) or 1"],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["backends"] = []

    def getUsage(self, width: int | None = None) -> str:
        return super().getUsage(width) + help_text(width or 80)

    def opt_version(self) -> None:
        """print equalizer's version (and Twisted's, Python's) and exit"""
        print(version_text())
        raise SystemExit(0)

    def postOptions(self) -> None:
        if self["check"]:
            raise SystemExit(check(lambda: read_config(self, os.environ),
                                   config_path(self["config"])))

    def opt_backend(self, url: str) -> None:
        """backend URL (repeatable; replaces the configured backends)"""
        self["backends"].append(url)


def read_config(options: Options, environ: dict[str, str]) -> Config:
    """The configuration from file, environment and flags, or ConfigError."""
    backends = tuple(options["backends"]) or (demo_urls() if options["demo"] else ())
    config = apply_overrides(
        load_config(options["config"]),
        listen=options["listen"],
        admin=options["admin"],
        backends=backends,
        database_url=options["database-url"],
        env=environ,
        workers=options.get("workers"),
    )
    if options["demo"]:
        config = demo_routing(config)
    return config


def makeService(options: Options, reactor=None) -> MultiService:
    """Build the service tree, or exit with one line per configuration problem."""
    if reactor is None:
        from twisted.internet import reactor
    try:
        config = read_config(options, os.environ)
    except ConfigError as error:
        print_config_error(error)
        raise SystemExit(1) from None
    taken = probe_addresses({"proxy.listen": config.proxy.listen,
                             "admin.listen": config.admin.listen})
    if taken is not None:
        print(f"error: {taken}", file=sys.stderr)
        raise SystemExit(1)
    try:
        logging_service = open_logging(config.logging, reactor, options.parent)
    except LogFileError as error:
        print(f"config error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    service = EqualizerService(config, reactor, demo=options["demo"],
                               reread=lambda: read_config(options, os.environ),
                               config_path=config_path(options["config"]),
                               logging_service=logging_service,
                               stop_process=lambda status: stop_twistd(reactor, status))
    if config.proxy.workers > 1:  # SPEC 9: this process supervises, workers proxy
        from equalizer.workers.supervisor import Supervisor
        Supervisor(service).attach()
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
    reloads it (SPEC 7). ``stop_process`` ends the process with an exit status when
    the service cannot go on (twistd's reactor, see ``stop_twistd``); ``probe`` is the
    listeners' start-up check of an address (see ``Listener``).
    """

    def __init__(self, config: Config, reactor, *, demo: bool = False,
                 reread: Callable[[], Config] | None = None,
                 logging_service: LoggingService | None = None,
                 store: IBucketStore | None = None,
                 stop_process: Callable[[int], None] = lambda status: None,
                 probe: Callable[[str], None] | None = None,
                 config_path: str | None = None) -> None:
        super().__init__()
        self.config = config
        self.config_path = config_path
        self.reactor = reactor
        self.reread = reread
        self.stop_process = stop_process
        self._probe = probe
        self.logging_service = logging_service
        if logging_service is not None:
            logging_service.setServiceParent(self)  # first: starts first, stops last
        self.stats = TrafficStats(started=reactor.seconds())
        ids = itertools.count(1)  # backend ids, unique across pools
        self.pool = BackendPool(config.balancer.backends, config.balancer.strategy,
                                clock=reactor, ids=ids)
        self.outlier = OutlierDetector(self.pool, config.health.outlier, reactor)
        if demo:
            demo_service(reactor).setServiceParent(self)
            demo_api_service(reactor).setServiceParent(self)
        self.store = make_store(config, reactor) if store is None else store
        buckets = BucketService(self.store, reactor,
                                needs_connection=not isinstance(self.store, MemoryStore))
        buckets.setServiceParent(self)
        self.readiness = buckets.readiness
        self.health = HealthMonitor(self.pool, config.health, HTTPHealthChecker(reactor), reactor)
        self.health.setServiceParent(self)
        self.named_pools = NamedPools(reactor, ids, self.forget_backend,
                                      reload_backends if self.backends_from_file else None)
        self.named_pools.setServiceParent(self)
        timeouts = config.proxy.timeouts
        outbox = Outbox(reactor)  # the writes of both sides go out together each turn
        self.upstreams = UpstreamPool(reactor, reactor, connect_timeout=timeouts.connect,
                                      idle_timeout=timeouts.idle, writer=outbox.writer)
        self.upstreams.setServiceParent(self)
        self.proxy = Proxy(
            self.pool, self.upstreams, config.proxy, reactor, self.stats, self.health,
            scheme=b"https" if config.proxy.listen.startswith("ssl:") else b"http",
        )
        self.proxy.access_log.attach(logging_service)
        self.limiter = RateLimiter(self.store, config.rate_limit, self.stats)
        self.proxy_site = ProxySite(self.proxy, config.proxy, reactor, outbox)
        self.admin = AdminAPI(
            self.pool, self.stats, reactor, self.store, config.rate_limit.default,
            self.forget_backend, config.admin.token, readiness=self.readiness,
            metrics=metrics_registry(EqualizerCollector(
                self.pool, self.stats, self.limiter, self.store, reactor, pools=self.pools)),
            pools=self.pools)
        self._apply_settings(config)
        self.proxy_listener = self._listen("proxy.listen", config.proxy.listen, self.proxy_site)
        self.proxy_listener.gate(self.readiness, self._proxy_listening, self._cannot_listen_late)
        self.admin_listener = self._listen("admin.listen", config.admin.listen, self.admin.site())
        self._previous_sighup = None
        self._previous_sigusr1 = None
        self.on_reload: list[Callable[[], None]] = []
        """Called after each good reload (worker processes reload too)."""
        self._starting_since = reactor.seconds()
        self.exit_status = 0

    def setServiceParent(self, parent) -> None:
        """twistd hands us its Application here: our log observer replaces its own."""
        super().setServiceParent(parent)
        if self.logging_service is not None:
            self.logging_service.install(parent)

    def _apply_settings(self, config: Config) -> None:
        """Settings that take effect at once, at start-up and on reload."""
        self.proxy_site.max_header_bytes = config.proxy.max_header_bytes
        self.proxy_site.timeOut = config.proxy.timeouts.idle or None
        self.upstreams.configure(connect_timeout=config.proxy.timeouts.connect,
                                 idle_timeout=config.proxy.timeouts.idle)
        self.limiter.configure(config.rate_limit)
        self.store.configure(config.rate_limit)
        self.pool.configure(slow_start=config.balancer.slow_start, queue=config.balancer.queue)
        self.outlier.configure(config.health.outlier)
        admission = ADMIT_ALL
        if config.rate_limit.enabled:
            admission = self.limiter.routed() if config.routes else self.limiter
        self.proxy.configure(
            config.proxy, admission, hash_key=hash_key_of(config.balancer),
            log_access=config.logging.access_log,
            outlier=self.outlier if config.health.outlier.enabled else None)
        self.named_pools.apply(config.pools)
        self.proxy.route_with(RouteTable(
            config.routes, {"default": self.proxy.default_unit, **self.named_pools.units},
            self.limiter.policies) if config.routes else None)
        self.admin.default_policy = config.rate_limit.default
        self.admin.policies = config.rate_limit.all_policies()
        self.admin.routes = config.routes

    def pools(self) -> dict[str, BackendPool]:
        """Every pool by name, ``default`` first."""
        return {"default": self.pool,
                **{name: unit.pool for name, unit in self.named_pools.units.items()}}

    # -- SIGHUP reload ----------------------------------------------------------------

    def reload(self) -> bool:
        """Read the file again and apply it; an invalid file changes nothing."""
        try:
            config = self.reread()
        except ConfigError as error:
            for problem in error.problems:
                log.error("reload refused, running configuration kept: {problem}",
                          problem=problem)
            self.stats.reloaded(False, self.reactor.seconds())
            return False
        self.apply(config)
        self.stats.reloaded(True, self.reactor.seconds())
        log.info("configuration reloaded")
        for call in self.on_reload:
            call()
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
            self.pool.use_strategy(config.balancer.strategy)
        self._apply_settings(config)
        self.health.reconfigure(config.health)
        if self.logging_service is not None:
            self.logging_service.reconfigure(config.logging)
        self.config = config

    def _apply_backends(self, config: Config) -> None:
        """The file's backends (a worker process takes the supervisor's instead)."""
        reload_backends(self.pool, config.balancer.backends, self.remove_backend)

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
        self.stop_process(1)

    # -- start and graceful stop ----------------------------------------------------------

    summary = True
    """Log the start-up summary (a worker process does not: its supervisor did)."""

    backends_from_file = True
    """Pools take their backends from the file (a worker process: from its supervisor)."""

    def startService(self) -> None:
        if self.summary:
            log_summary(self.config, self.config_path, self.proxy_listener.address(),
                        self.admin_listener.address())
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
        self.outlier.stop()

    def _listen(self, key: str, description: str, factory) -> Listener:
        """A listener child; bad endpoint strings were refused by config validation."""
        endpoint = serverFromString(self.reactor, with_backlog(description))
        listener = Listener(endpoint, factory, key, description, probe=self._probe)
        listener.setServiceParent(self)
        return listener


def reload_backends(pool: BackendPool, entries: Iterable[BackendConfig],
                    remove: Callable[[Backend], None]) -> None:
    """The file wins for what it says: which backends there are, their weights,
    ``max_requests`` and ``backup`` (the defaults where an entry has none).
    ``enabled`` is not a file setting, so a backend
    disabled through the API stays disabled. Each change to the pool is logged."""
    wanted = {url_identity(b.url): b for b in entries}
    for backend in list(pool.backends):
        entry = wanted.pop(url_identity(backend.url), None)
        if entry is None:
            log.info("reload: backend {id} ({url}) is not in the file; draining it, then "
                     "removing it", id=backend.id, url=backend.url)
            pool.drain(backend).addCallbacks(
                lambda _, b=backend: remove(b),
                lambda failure: failure.trap(DrainCancelled))
            continue
        if backend.weight != entry.weight:
            log.info("reload: backend {id} ({url}) weight {running} -> {weight}, the "
                     "file's", id=backend.id, url=backend.url, running=backend.weight,
                     weight=entry.weight)
            pool.set_weight(backend, entry.weight)
        if (backend.max_requests, backend.backup) != (entry.max_requests, entry.backup):
            log.info("reload: backend {id} ({url}) max_requests {running_max} -> {max}, "
                     "backup {running_backup} -> {backup}, the file's", id=backend.id,
                     url=backend.url, running_max=backend.max_requests,
                     max=entry.max_requests, running_backup=backend.backup,
                     backup=entry.backup)
            pool.set_limits(backend, entry.max_requests, entry.backup)
        if backend.draining:
            log.info("reload: backend {id} ({url}) is in the file: it stays (the DELETE "
                     "waiting for its drain is answered 409)", id=backend.id,
                     url=backend.url)
            pool.cancel_drain(backend)
        if not backend.enabled:
            log.info("reload: backend {id} ({url}) stays disabled (set through the API; "
                     "the file has no enabled setting)", id=backend.id, url=backend.url)
    for entry in wanted.values():
        backend = pool.add(entry.url, entry.weight, max_requests=entry.max_requests,
                                backup=entry.backup)
        log.info("reload: backend {id} ({url}) added, weight {weight}", id=backend.id,
                 url=backend.url, weight=backend.weight)


RESTART_ONLY = ("proxy.listen", "proxy.workers", "admin.listen", "admin.token",
                "rate_limit.store", "rate_limit.database_url", "logging.file", "logging.rotate")
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
