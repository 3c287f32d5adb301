"""Workers (SPEC 9) without processes: the setting, the settlement of leases on the memory
store, the sum of the workers' figures, and the control channel's long values."""

from __future__ import annotations

import itertools
import os

import attrs
import pytest
from twisted.internet.defer import succeed
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web.http_headers import Headers

from equalizer.balancer.pool import BackendPool
from equalizer.balancer.stats import SpaceSaving, TrafficStats
from equalizer.buckets.memory import MemoryStore
from equalizer.config.loader import ConfigError, apply_overrides, parse_config
from equalizer.config.model import BackendConfig, QueueConfig
from equalizer.logs.batch import LineBatcher
from equalizer.service import EqualizerService, read_config
from equalizer.workers.aggregate import Aggregate, snapshot
from equalizer.workers.commands import CHUNK, BigUnicode, decode_config
from equalizer.workers.leases import settle_in_memory
from equalizer.workers.supervisor import Supervisor, SupervisorChannel, pools_state
from equalizer.workers.worker import (
    FLUSH_GRACE,
    WorkerChannel,
    WorkerService,
    stop,
    worker_config,
)


@pytest.mark.parametrize(("value", "workers"), [(1, 1), (4, 4), ("auto", os.cpu_count())])
def test_workers_setting(value, workers) -> None:
    assert parse_config({"proxy": {"workers": value}}).proxy.workers == workers


@pytest.mark.parametrize("value", [0, -1, 257, "two", True, 1.5])
def test_workers_setting_refuses_what_is_no_count(value) -> None:
    with pytest.raises(ConfigError, match=r"proxy\.workers: expected a number from 1 to 256"):
        parse_config({"proxy": {"workers": value}})


def test_workers_flag_overrides_the_file_and_ssl_needs_one_worker() -> None:
    config = parse_config({"proxy": {"workers": 3}})
    assert apply_overrides(config, env={}, workers="2").proxy.workers == 2
    assert apply_overrides(config, env={}, workers="auto").proxy.workers == os.cpu_count()
    with pytest.raises(ConfigError, match="--workers: expected a number"):
        apply_overrides(config, env={}, workers="0")
    tls = attrs.evolve(config, proxy=attrs.evolve(config.proxy, listen="ssl:8443:privateKey=k"))
    with pytest.raises(ConfigError, match="proxy.workers: more than one worker needs a tcp:"):
        apply_overrides(tls, env={}, workers="2")


def test_workers_run_with_pools_and_routes() -> None:
    """Workers take every pool's state from the supervisor: several workers with pools and
    routes is a configuration like any other, and the workers' health checks are off in
    every pool (the supervisor runs them)."""
    routed = parse_config({
        "pools": {"api": {"backends": [{"url": "http://127.0.0.1:9004"}]}},
        "routes": [{"match": {"path_prefix": "/api/"}, "pool": "api"}],
    })
    config = apply_overrides(routed, env={}, workers="2")
    assert config.proxy.workers == 2
    assert [pool.name for pool in config.pools] == ["api"]
    assert [pool.health.interval for pool in worker_config(config).pools] == [0.0]
    assert worker_config(config).health.interval == 0.0


def test_the_demo_routes_with_workers(tmp_path) -> None:
    config_file = tmp_path / "equalizer.yml"
    config_file.write_text("{}\n")
    options = {"config": str(config_file), "listen": None, "admin": None, "backends": [],
               "database-url": None, "demo": True, "workers": "2"}
    config = read_config(options, {})
    assert config.proxy.workers == 2
    assert [pool.name for pool in config.pools] == ["api"] and len(config.routes) == 1


def test_memory_settlement_follows_the_sql_rule() -> None:
    clock = MemoryReactorClock()
    store = MemoryStore(clock)
    store.create("kept", 100, 50, 10)
    rows = settle_in_memory(store, [
        ("new", 2, 256, 0, 30, 1.0),  # from the default, full: 2 waiting + min(256, 30 // 10)
        ("kept", 1, 256, 0, 30, 1.0),  # its own bucket: 1 + min(256, 100 // 10) of 50
        ("nobody", 1, 8, 0, None, None),  # no bucket, no default: not limited, no row
    ], clock.seconds())
    assert rows == [("new", 5, 25.0, 30, 1.0), ("kept", 11, 39.0, 100, 10.0)]
    clock.advance(1)
    rows = settle_in_memory(store, [("kept", 0, 0, 80, None, None)], clock.seconds())
    assert rows == [("kept", 0, 100.0, 100, 10.0)]  # 39 + 10 refilled + 80 back, capped


def test_memory_settlement_grants_no_more_than_the_bucket_holds() -> None:
    clock = MemoryReactorClock()
    store = MemoryStore(clock)
    store.create("k", 10, 3.5, 0)
    assert settle_in_memory(store, [("k", 5, 8, 0, None, None)], 0) == [("k", 3, 0.5, 10, 0.0)]


def _worker(requests: int, in_flight: int, latency: float) -> dict:
    stats = TrafficStats(started=0)
    pool = BackendPool([BackendConfig("http://127.0.0.1:9001")])
    backend = pool.backends[0]
    for _ in range(requests):
        stats.record(200, backend, latency)
    stats.record(503, None, 0.001)
    stats.connections = 2
    backend.in_flight = in_flight
    return snapshot(stats, [pool], in_flight)


def test_figures_of_all_workers_are_summed_and_a_dead_one_keeps_its_counts() -> None:
    aggregate = Aggregate()
    aggregate.live = {1: _worker(3, 1, 0.002), 2: _worker(5, 2, 0.2)}
    stats = TrafficStats(started=0)
    pool = BackendPool([BackendConfig("http://127.0.0.1:9001")])
    aggregate.write_into(stats, [pool])
    backend = pool.backends[0]
    assert (stats.total, stats.by_code, stats.connections) == (10, {200: 8, 503: 2}, 4)
    assert (backend.requests, backend.in_flight, sum(backend.durations.counts)) == (8, 3, 8)
    assert backend.durations.total == pytest.approx(3 * 0.002 + 5 * 0.2)
    assert sorted(backend.latencies) == [0.002] * 3 + [0.2] * 5
    aggregate.retire(2)
    aggregate.write_into(stats, [pool])
    assert (stats.total, stats.connections, backend.requests, backend.in_flight) == (10, 2, 8, 1)


def test_figures_of_every_pool_are_summed_and_its_state_goes_by_name() -> None:
    """Backend ids are unique across pools: a worker's snapshot carries the backends of
    every pool, and the sum lands on each pool's backend of that id."""
    ids = itertools.count(1)
    pools = {"default": BackendPool([BackendConfig("http://127.0.0.1:9001")], ids=ids),
             "api": BackendPool([BackendConfig("http://127.0.0.1:9004")], name="api", ids=ids)}
    web, api = pools["default"].backends[0], pools["api"].backends[0]
    stats = TrafficStats(started=0)
    stats.record(200, web, 0.001)
    stats.record(200, api, 0.001)
    stats.record(200, api, 0.001)
    aggregate = Aggregate()
    aggregate.live = {1: snapshot(stats, pools.values(), 0),
                      2: snapshot(stats, pools.values(), 0)}
    into = {name: BackendPool([BackendConfig(p.backends[0].url)], name=name, ids=iter([b]))
            for (name, p), b in zip(pools.items(), (1, 2), strict=True)}
    aggregate.write_into(TrafficStats(started=0), into.values())
    assert [(p.backends[0].id, p.backends[0].requests) for p in into.values()] == [
        ("b1", 2), ("b2", 4)]
    assert pools_state(pools) == {"default": [["b1", web.url, 1, True, False, True, 0, False]],
                                  "api": [["b2", api.url, 1, True, False, True, 0, False]]}


def _limiting_worker(clients: dict[str, int], queued: int, waiting: int, ejected: float | None,
                     size: int = 100) -> dict:
    """A worker's snapshot: clients refused so many times each, a queue that took
    ``queued`` requests and holds ``waiting``, its backend ejected once until ``ejected``."""
    stats = TrafficStats(started=0)
    stats.limited_clients = SpaceSaving(size)
    for client, times in clients.items():
        for _ in range(times):
            stats.limited_clients.add(client)
    clock = MemoryReactorClock()
    pool = BackendPool([BackendConfig("http://127.0.0.1:9001")], clock=clock,
                       queue=QueueConfig(max=10))
    for _ in range(queued):
        pool.queue.join(lambda: None, lambda: None)
    for ticket in list(pool.queue.waiting)[waiting:]:
        pool.queue.leave(ticket)
    pool.queue.refused = 1
    if ejected is not None:
        pool.set_ejected(pool.backends[0], ejected)
    return snapshot(stats, [pool], 0)


def test_queues_ejections_and_limited_clients_of_all_workers_are_summed() -> None:
    aggregate = Aggregate()
    aggregate.live = {1: _limiting_worker({"a": 3, "b": 1}, queued=3, waiting=2, ejected=50.0),
                      2: _limiting_worker({"a": 2, "c": 4}, queued=1, waiting=1, ejected=None)}
    stats = TrafficStats(started=0)
    pool = BackendPool([BackendConfig("http://127.0.0.1:9001")])
    aggregate.write_into(stats, [pool])
    assert pool.queue.to_json() == {"length": 3, "max": 0, "timeout": 5.0, "queued": 4,
                                    "refused": 2, "timed_out": 0}
    backend = pool.backends[0]
    assert (backend.ejections, backend.ejected_until) == (1, 50.0)
    assert stats.limited_clients.top() == [{"client": "a", "count": 5, "error": 0},
                                           {"client": "c", "count": 4, "error": 0},
                                           {"client": "b", "count": 1, "error": 0}]
    aggregate.retire(1)  # its counts stay, what it held waiting or ejected goes
    aggregate.write_into(stats, [pool])
    assert (pool.queue.length(), pool.queue.queued, backend.ejections) == (1, 4, 1)
    assert backend.ejected_until is None
    assert stats.limited_clients.top()[0] == {"client": "a", "count": 5, "error": 0}


def test_a_client_a_full_summary_does_not_hold_counts_up_to_its_floor() -> None:
    """Worker 1 holds two counters, both taken (its floor is 2): client "c", which only
    worker 2 holds, may have been refused twice on worker 1 too."""
    aggregate = Aggregate()
    aggregate.live = {1: _limiting_worker({"a": 5, "b": 2}, 0, 0, None, size=2),
                      2: _limiting_worker({"c": 3}, 0, 0, None, size=2)}
    stats = TrafficStats(started=0)
    aggregate.write_into(stats, [BackendPool([BackendConfig("http://127.0.0.1:9001")])])
    assert stats.limited_clients.top() == [{"client": "a", "count": 5, "error": 0},
                                           {"client": "c", "count": 5, "error": 2},
                                           {"client": "b", "count": 2, "error": 0}]


def test_long_values_cross_the_channel_in_pieces() -> None:
    text = "é" * CHUNK  # two bytes each: three AMP values
    strings: dict = {}
    BigUnicode().toBox(b"rows", strings, {"rows": text}, None)
    assert len(strings) == 2 and all(len(v) <= CHUNK for v in strings.values())
    objects: dict = {}
    BigUnicode().fromBox(b"rows", strings, objects, None)
    assert objects == {"rows": text}


class Pipe:
    """Both ends of a control channel, joined in memory: ``flow`` delivers what each
    end wrote until neither has anything left to say."""

    def __init__(self, supervisor_end, worker_end) -> None:
        self.ends = [(supervisor_end, StringTransport()), (worker_end, StringTransport())]
        for protocol, transport in self.ends:
            protocol.makeConnection(transport)

    def flow(self) -> None:
        while any(transport.value() for _, transport in self.ends):
            for (_, transport), (peer, _) in (self.ends, self.ends[::-1]):
                data, _ = transport.value(), transport.clear()
                if data:
                    peer.dataReceived(data)


RUNNING = {"balancer": {"backends": [{"url": "http://127.0.0.1:9001"}]},
           "proxy": {"workers": 2}}
ROUTED = {**RUNNING, "pools": {"new": {"backends": [{"url": "http://127.0.0.1:9002"}]}},
          "routes": [{"match": {"path_prefix": "/new/"}, "pool": "new"}]}


class Balancer:
    """A supervisor's service, reading ``document`` (the file) on reload, and one worker's,
    started as the supervisor starts it, joined by a control channel in memory. Time
    never moves."""

    def __init__(self, document: dict) -> None:
        self.document = document
        self.clock = MemoryReactorClock()
        self.service = EqualizerService(self.read(), self.clock, reread=self.read,
                                        store=MemoryStore(self.clock))
        self.supervisor = Supervisor(self.service)
        self.service.on_reload.append(self.supervisor.reload)
        self.start_worker()

    def start_worker(self) -> None:
        """A new worker, given what a spawned one reads on its stdin."""
        self.channel = WorkerChannel(MemoryReactorClock())
        self.worker = self.channel.service = WorkerService(
            decode_config(self.supervisor.config_text()), self.channel.reactor, self.channel)
        self.pipe = Pipe(SupervisorChannel(self.supervisor, self.supervisor.workers[0]),
                         self.channel)
        self.pipe.flow()

    def read(self):
        return parse_config(self.document)

    def reload(self, document: dict) -> None:
        self.document = document
        assert self.service.reload()
        self.pipe.flow()

    def worker_route(self, path: bytes):
        router = self.worker.proxy.router
        return router and router.match(b"GET", b"example.com", path, Headers())


def test_a_reload_brings_the_backends_of_the_pools_it_adds() -> None:
    """SIGHUP adds a pool and a route to it: the moment a worker has taken the reload, the
    route's pool has the supervisor's backends. Not one sync tick later (the clock does not
    move here): until then the worker would answer 503 on the new route."""
    balancer = Balancer(RUNNING)
    assert [b.url for b in balancer.worker.pool.backends] == ["http://127.0.0.1:9001"]
    balancer.reload(ROUTED)
    route = balancer.worker_route(b"/new/x")
    assert route is not None and route.unit.name == "new"
    chosen = route.unit.pool.choose()
    assert chosen is not None and chosen.url == "http://127.0.0.1:9002"
    assert chosen.id == balancer.service.pools()["new"].backends[0].id


def test_a_reload_drops_a_pools_route_before_its_backends_drain() -> None:
    """SIGHUP removes a pool and its route: the supervisor drains the pool's backends
    everywhere, and that drain reaches a worker after the reload, never while the worker
    still routes to the pool (its requests would find only draining backends: 503)."""
    balancer = Balancer(ROUTED)
    balancer.reload(ROUTED)  # the pools reach the workers' drains, as attach() does
    routes_when_draining = []
    drain = balancer.worker.drain_backend

    def recorded(backend_id: str):
        routes_when_draining.append(balancer.worker_route(b"/new/x"))
        return drain(backend_id)

    balancer.worker.drain_backend = recorded
    balancer.reload(RUNNING)
    balancer.clock.advance(0)  # the next turn, when drains are sent
    balancer.pipe.flow()
    assert routes_when_draining == [None]


def test_a_worker_reloads_to_what_the_supervisor_read_not_the_file_now() -> None:
    """The file is edited again after the supervisor read it and before the worker takes
    the reload: the worker applies the supervisor's configuration, routes included."""
    balancer = Balancer(RUNNING)
    balancer.document = ROUTED
    assert balancer.service.reload()
    balancer.document = RUNNING  # the operator's next edit, not yet SIGHUPed
    balancer.pipe.flow()
    route = balancer.worker_route(b"/new/x")
    assert route is not None and route.unit.name == "new"


def test_a_replaced_worker_starts_with_the_supervisors_configuration() -> None:
    """A worker started after the file was edited but not reloaded runs what the
    supervisor runs: no route of the edit, the pools and backends of the supervisor."""
    balancer = Balancer(ROUTED)
    balancer.document = RUNNING
    balancer.start_worker()
    route = balancer.worker_route(b"/new/x")
    assert route is not None and route.unit.name == "new"
    chosen = route.unit.pool.choose()
    assert chosen is not None and chosen.url == "http://127.0.0.1:9002"


def test_a_stopping_worker_hands_on_its_last_lines_and_every_later_one_at_once(
        monkeypatch) -> None:
    """The batch that waits goes once the service has stopped, and a line logged after
    that (as the reactor stops, when no timer runs any more) goes at once, not with a
    batch that would never be handed on."""
    clock = MemoryReactorClock()
    delivered: list[str] = []
    lines = LineBatcher(clock, delivered.append)
    service = attrs.make_class("Service", {"reactor": attrs.field()})(clock)
    service.stopService = lambda: succeed(None)
    monkeypatch.setattr("signal.signal", lambda *args: None)  # the test runner's own stay
    lines.write("before\n")
    stopped = stop(service, lines)
    clock.advance(FLUSH_GRACE)
    assert stopped.called and delivered == ["before\n"]
    lines.write("after\n")
    assert delivered == ["before\n", "after\n"]
    assert not clock.getDelayedCalls()
