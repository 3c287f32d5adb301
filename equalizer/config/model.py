"""The configuration as frozen typed objects: what the rest of the program reads.

Field names mirror the YAML keys of SPEC section 3. Durations are float seconds.
The defaults here are the documented defaults; loader.py fills them in from YAML.
"""

from __future__ import annotations

import ipaddress

from attrs import field, frozen

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

STRATEGY_NAMES = ("round_robin", "weighted_round_robin", "least_connections", "random",
                  "power_of_two", "hash")
"""The strategies ``balancer.strategy`` may name. Config sits below the balancer, so it
keeps the names; a unit test checks the balancer's registry agrees."""

MAX_WEIGHT = 1000
"""Largest backend weight."""


DEFAULT_MAX_BUCKETS = 1_000_000
"""Most buckets a process holds for clients (``rate_limit.max_buckets``), by default."""

MAX_MAX_BUCKETS = 1_000_000_000
"""Largest ``rate_limit.max_buckets`` accepted: past that the cap would bound nothing."""


@frozen
class Timeouts:
    connect: float = 5.0
    response: float = 30.0
    idle: float = 60.0
    shutdown: float = 30.0


@frozen
class ProxyConfig:
    listen: str = "tcp:8080"
    preserve_host: bool = True
    timeouts: Timeouts = Timeouts()
    retries: int = 2
    trusted_proxies: tuple[Network, ...] = ()
    max_header_bytes: int = 16384
    retry_on: tuple[str, ...] = ("connect_failure",)
    workers: int = 1


@frozen
class AdminConfig:
    listen: str = "tcp:8081:interface=127.0.0.1"
    token: str | None = None


RETRY_ON_NAMES = ("connect_failure", "timeout", "502", "503", "504")
"""What ``proxy.retry_on`` may list (SPEC 4.4)."""

MAX_BACKEND_REQUESTS = 1_000_000
"""Largest ``max_requests`` of a backend (0 = no limit)."""

MAX_QUEUE = 1_000_000
"""Largest ``balancer.queue.max``: the queue is bounded memory."""


@frozen
class BackendConfig:
    url: str
    weight: int = 1
    max_requests: int = 0
    backup: bool = False


@frozen
class QueueConfig:
    max: int = 0
    timeout: float = 5.0


@frozen
class BalancerConfig:
    strategy: str = "round_robin"
    hash_key: str = "ip"
    backends: tuple[BackendConfig, ...] = (BackendConfig("http://127.0.0.1:9001"),)
    slow_start: float = 0.0
    queue: QueueConfig = QueueConfig()


@frozen
class OutlierConfig:
    consecutive_5xx: int = 0
    consecutive_gateway_errors: int = 0
    base_ejection: float = 30.0
    max_ejection_percent: int = 50

    @property
    def enabled(self) -> bool:
        return bool(self.consecutive_5xx or self.consecutive_gateway_errors)


@frozen
class HealthConfig:
    path: str = "/"
    interval: float = 30.0
    timeout: float = 5.0
    fail_timeout: float = 10.0
    unhealthy_threshold: int = 3
    healthy_threshold: int = 2
    expected_status: tuple[int, int] = (200, 399)
    outlier: OutlierConfig = OutlierConfig()


@frozen
class BucketPolicy:
    capacity: int
    refill_rate: float



DEFAULT_POLICY = "default"
"""The rate-limit policy ``rate_limit.key`` and ``rate_limit.default`` make (SPEC 8)."""


@frozen
class PolicyConfig:
    """A named rate-limit policy: its own client key and default bucket."""

    key: str = "ip"
    default: BucketPolicy | None = BucketPolicy(100, 10.0)


@frozen
class RateLimitConfig:
    enabled: bool = True
    key: str = "ip"
    default: BucketPolicy | None = BucketPolicy(100, 10.0)
    policies: tuple[tuple[str, PolicyConfig], ...] = ()

    def all_policies(self) -> dict[str, PolicyConfig]:
        """Every policy by name, ``default`` (``key`` and ``default``) first."""
        return {DEFAULT_POLICY: PolicyConfig(self.key, self.default), **dict(self.policies)}
    store: str = "memory"
    database_url: str | None = None
    on_store_error: str = "allow"
    headers: str = "both"
    max_buckets: int = DEFAULT_MAX_BUCKETS


@frozen
class PoolConfig:
    """A named pool (SPEC 8): the keys of ``balancer`` and its own ``health``."""

    name: str
    balancer: BalancerConfig
    health: HealthConfig


@frozen
class HeaderRewrite:
    """Header fields a route sets (name, value) and removes (lower-case names)."""

    set: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


@frozen
class MatchConfig:
    host: str | None = None
    path_prefix: str | None = None
    methods: tuple[str, ...] = ()
    headers: tuple[tuple[str, str], ...] = ()


@frozen
class RouteConfig:
    match: MatchConfig = MatchConfig()
    pool: str = "default"
    strip_prefix: bool = False
    rate_limit: str | None = DEFAULT_POLICY
    request_headers: HeaderRewrite = HeaderRewrite()
    response_headers: HeaderRewrite = HeaderRewrite()


@frozen
class RotateConfig:
    max_bytes: int = 10 * 1024 * 1024
    retention_days: int = 90
    compress: bool = True


@frozen
class LoggingConfig:
    level: str = "info"
    format: str = "text"
    file: str | None = None
    rotate: RotateConfig = RotateConfig()
    access_log: bool = True


@frozen
class Config:
    proxy: ProxyConfig = field(factory=ProxyConfig)
    admin: AdminConfig = field(factory=AdminConfig)
    balancer: BalancerConfig = field(factory=BalancerConfig)
    health: HealthConfig = field(factory=HealthConfig)
    rate_limit: RateLimitConfig = field(factory=RateLimitConfig)
    logging: LoggingConfig = field(factory=LoggingConfig)
    pools: tuple[PoolConfig, ...] = ()
    routes: tuple[RouteConfig, ...] = ()

    def all_pools(self) -> tuple[PoolConfig, ...]:
        """Every pool, ``default`` (``balancer`` and ``health``) first."""
        return (PoolConfig("default", self.balancer, self.health), *self.pools)

