"""``twistd equalizer``: command-line options and the service tree they build.

makeService only wires parts together; each part lives in its own module.
Children start in the order they are added and stop in reverse, so on the way
down the listeners close first, then the health monitor, then the store.
"""

from __future__ import annotations

import os
import sys

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.server import Site

from equalizer.admin import AdminAPI
from equalizer.config import Config, ConfigError, apply_overrides, load_config
from equalizer.demo import demo_service, demo_urls
from equalizer.health import HealthMonitor, HTTPHealthChecker
from equalizer.limiter import RateLimiter
from equalizer.pool import BackendPool
from equalizer.proxy import Proxy, ProxySite, key_reader
from equalizer.stats import TrafficStats
from equalizer.stores import IBucketStore, MemoryStore, PostgresStore
from equalizer.upstream import UpstreamPool

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
    return EqualizerService(config, reactor, demo=options["demo"])


class EqualizerService(MultiService):
    """The running balancer: proxy, admin API, health monitor and their shared state."""

    def __init__(self, config: Config, reactor, *, demo: bool = False) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.stats = TrafficStats(started=reactor.seconds())
        self.pool = BackendPool(config.balancer.backends, config.balancer.strategy)
        if demo:
            demo_service(reactor).setServiceParent(self)
        self.store = make_store(config, reactor)
        BucketService(self.store, reactor).setServiceParent(self)
        self.health = HealthMonitor(self.pool, config.health, HTTPHealthChecker(reactor), reactor)
        self.health.setServiceParent(self)
        timeouts = config.proxy.timeouts
        self.upstreams = UpstreamPool(reactor, reactor, connect_timeout=timeouts.connect,
                                      idle_timeout=timeouts.idle)
        self.upstreams.setServiceParent(self)
        self.proxy = Proxy(
            self.pool, self.upstreams, config.proxy, reactor, self.stats, self.health,
            scheme=b"https" if config.proxy.listen.startswith("ssl:") else b"http",
            log_access=config.logging.access_log,
        )
        if config.balancer.strategy == "hash":
            self.proxy.hash_key = key_reader(config.balancer.hash_key)
        self.limiter = RateLimiter(self.store, config.rate_limit, self.stats)
        if config.rate_limit.enabled:
            self.proxy.admit = self.limiter.admit
            self.proxy.decorate_response = self.limiter.decorate
        self.proxy_site = ProxySite(self.proxy, config.proxy, reactor)
        self._listen(config.proxy.listen, self.proxy_site)
        self.admin = AdminAPI(self.pool, self.stats, reactor, self.store,
                              config.rate_limit.default, self.upstreams.drop_backend)
        admin_site = Site(self.admin.resource())
        admin_site.noisy = False
        self._listen(config.admin.listen, admin_site)

    def _listen(self, description: str, factory) -> StreamServerEndpointService:
        endpoint = serverFromString(self.reactor, description)
        listener = StreamServerEndpointService(endpoint, factory)
        listener._raiseSynchronously = True
        listener.setServiceParent(self)
        return listener


def make_store(config: Config, reactor) -> IBucketStore:
    """The bucket store the configuration names; the bucket API uses it either way."""
    if config.rate_limit.store == "postgres":
        return PostgresStore(config.rate_limit.database_url, reactor)
    return MemoryStore(reactor)


class BucketService(Service):
    """Starts the bucket store and stops it last; a database down at start-up is retried.

    Until the store is up, ``on_store_error`` decides for proxied requests and
    the bucket API answers 503, exactly as when the database goes away later.
    """

    def __init__(self, store: IBucketStore, clock) -> None:
        self.store = store
        self._clock = clock
        self._retry = None

    def startService(self) -> None:
        super().startService()
        self._start()

    def _start(self) -> None:
        self._retry = None
        self.store.start().addErrback(self._failed)

    def _failed(self, failure) -> None:
        if not self.running:
            return
        log.error("bucket store unavailable at start-up, retrying in {seconds}s: {error}",
                  seconds=STORE_RETRY_SECONDS, error=failure.getErrorMessage())
        self._retry = self._clock.callLater(STORE_RETRY_SECONDS, self._start)

    def stopService(self):
        super().stopService()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        return self.store.stop()
