"""Fakes the unit tests share: no sockets, no real clock."""

from __future__ import annotations

from attrs import define, field
from twisted.internet.defer import Deferred

from equalizer.balancer.pool import Backend
from equalizer.proxy.upstream import UpstreamConnection

# -- the proxy ------------------------------------------------------------------------------


@define
class FakeUpstreams:
    """The proxy's UpstreamPool as a test drives it: idle connections the test put there,
    and connects that wait for the test."""

    idle: dict = field(factory=dict)
    connects: list[tuple[Backend, Deferred]] = field(factory=list)
    released: list[UpstreamConnection] = field(factory=list)

    def get_idle(self, backend: Backend) -> UpstreamConnection | None:
        connections = self.idle.get(backend)
        if connections:
            connection = connections.pop()
            connection.reused = True
            return connection
        return None

    def connect(self, backend: Backend) -> Deferred:
        d: Deferred = Deferred()
        self.connects.append((backend, d))
        return d

    def release(self, connection: UpstreamConnection) -> None:
        self.released.append(connection)

    def forget(self, connection: UpstreamConnection) -> None:
        pass


@define
class FakePassive:
    """The health monitor as the proxy reports to it: what it heard, kept."""

    failures: list[tuple[Backend, str]] = field(factory=list)
    successes: int = 0

    def record_connect_failure(self, backend: Backend, reason: str) -> None:
        self.failures.append((backend, reason))

    def record_connect_success(self, backend: Backend) -> None:
        self.successes += 1
