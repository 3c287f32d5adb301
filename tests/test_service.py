"""``twistd equalizer`` wiring, on a MemoryReactorClock: what makeService builds from the
options, the order services start and stop in, the SIGHUP reload, and how the process
is told to stop. No socket is opened: the memory reactor only records its listeners."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml
from twisted.internet.error import ReactorNotRunning
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from equalizer import service as service_module
from equalizer.buckets.leasing import LeasingStore
from equalizer.config.loader import ConfigError, parse_config
from equalizer.demo import DEMO_PORTS
from equalizer.listeners import LISTEN_BACKLOG
from equalizer.proxy.site import ProxySite
from equalizer.readiness import STORE_RETRY_SECONDS, BucketService
from equalizer.service import (
    EqualizerService,
    Options,
    make_store,
    makeService,
    restart_only_changes,
    stop_twistd,
    with_running_settings,
)
from equalizer.testing import FakeStore
from tests.helpers import result_of

LISTEN = "tcp:0:interface=127.0.0.1"


def document(**sections: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "proxy": {"listen": LISTEN},
        "admin": {"listen": LISTEN},
        "balancer": {"backends": [{"url": "http://127.0.0.1:9001"},
                                  {"url": "http://127.0.0.1:9002", "weight": 2}]},
        "health": {"interval": 0},
        "logging": {"access_log": False},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return base


class ThreadlessReactor(MemoryReactorClock):
    """A MemoryReactorClock whose callFromThread runs the call at once."""

    def callFromThread(self, f, *args, **kwargs) -> None:
        f(*args, **kwargs)


@pytest.fixture
def events() -> list[dict]:
    seen: list[dict] = []
    globalLogPublisher.addObserver(seen.append)
    yield seen
    globalLogPublisher.removeObserver(seen.append)


def options(tmp_path: Path, *args: str, config: dict | None = None) -> Options:
    path = tmp_path / "equalizer.yml"
    path.write_text(yaml.safe_dump(document() if config is None else config))
    parsed = Options()
    parsed.parseOptions(["--config", str(path), *args])
    parsed.parent = None  # no twistd: logging goes where the file says
    return parsed


def stop_with_its_log_writer(built: EqualizerService) -> None:
    """Stop a service makeService built: its log writer thread ends the stop, so wait
    for that thread (it hands the end to the reactor's callFromThread)."""
    stopping = built.stopService()
    for thread in threading.enumerate():
        if thread.name == "equalizer-log-writer":
            thread.join(10)
    result_of(stopping)


# -- makeService --------------------------------------------------------------------------

def test_make_service_listens_on_both_endpoints_once_started(tmp_path: Path) -> None:
    reactor = ThreadlessReactor()
    built = makeService(options(tmp_path), reactor)
    built.privilegedStartService()
    built.startService()
    assert [type(factory) for _, factory, *_ in reactor.tcpServers][0] is ProxySite
    assert len(reactor.tcpServers) == 2
    assert [backlog for _, _, backlog, _ in reactor.tcpServers] == [LISTEN_BACKLOG] * 2
    assert [b.url for b in built.pool.backends] == ["http://127.0.0.1:9001",
                                                   "http://127.0.0.1:9002"]
    stop_with_its_log_writer(built)


def test_flags_override_the_file(tmp_path: Path) -> None:
    built = makeService(options(tmp_path, "--backend", "http://127.0.0.1:7001",
                                "--listen", "tcp:0:interface=127.0.0.2"), ThreadlessReactor())
    assert [b.url for b in built.pool.backends] == ["http://127.0.0.1:7001"]
    assert built.config.proxy.listen == "tcp:0:interface=127.0.0.2"


def test_demo_starts_three_backends_and_balances_over_them(tmp_path: Path) -> None:
    reactor = ThreadlessReactor()
    built = makeService(options(tmp_path, "--demo", config=document(balancer={})),
                        reactor)
    built.privilegedStartService()
    built.startService()
    ports = [port for port, *_ in reactor.tcpServers]
    assert set(DEMO_PORTS) <= set(ports)
    assert [b.url for b in built.pool.backends] == [f"http://127.0.0.1:{port}"
                                                   for port in DEMO_PORTS]
    stop_with_its_log_writer(built)


def test_bad_configuration_is_one_line_per_problem_and_exit_1(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        makeService(options(tmp_path, config=document(proxy={"listen": "nope:1"},
                                                      health={"interval": -1})),
                    ThreadlessReactor())
    assert exit_.value.code == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and all(line.startswith("config error: ") for line in lines)


def test_unusable_log_destination_is_exit_1(tmp_path: Path, capsys) -> None:
    parsed = options(tmp_path)
    parsed.parent = {"logfile": "-", "nodaemon": False}  # a daemon logging to stdout
    with pytest.raises(SystemExit):
        makeService(parsed, ThreadlessReactor())
    assert capsys.readouterr().err.startswith("config error: --logfile: ")


# -- stopping the process -----------------------------------------------------------------

def test_stop_twistd_stops_the_reactor_and_exits_with_the_status_at_exit(monkeypatch) -> None:
    at_exit: list[tuple] = []
    monkeypatch.setattr(service_module.atexit, "register", lambda *call: at_exit.append(call))
    reactor = MemoryReactorClock()
    reactor.running = True
    stop_twistd(reactor, 3)
    assert reactor.hasStopped
    exits: list[int] = []
    monkeypatch.setattr(service_module.os, "_exit", exits.append)
    function, status = at_exit[0]
    function(status)
    assert exits == [3]


def test_stop_twistd_on_a_stopping_reactor_still_sets_the_status(monkeypatch) -> None:
    class Stopping(MemoryReactorClock):
        def stop(self) -> None:
            raise ReactorNotRunning()

    at_exit: list[tuple] = []
    monkeypatch.setattr(service_module.atexit, "register", lambda *call: at_exit.append(call))
    stop_twistd(Stopping(), 1)
    assert at_exit[0][1:] == (1,)


# -- start, stop and reload ---------------------------------------------------------------

def started(reactor: MemoryReactorClock, reread: Any = None, **sections: Any
            ) -> EqualizerService:
    service = EqualizerService(parse_config(document(**sections)), reactor, reread=reread,
                               store=FakeStore(reactor))
    service.privilegedStartService()
    service.startService()
    return service


def test_children_stop_after_the_listeners_store_last() -> None:
    reactor = MemoryReactorClock()
    service = started(reactor)
    result_of(service.stopService())
    assert not any(child.running for child in service)
    assert service.store.stopped


def test_sighup_reloads_the_file_and_the_old_handler_comes_back(events: list[dict]) -> None:
    reactor = ThreadlessReactor()
    wanted = parse_config(document(balancer={
        "strategy": "least_connections",
        "backends": [{"url": "http://127.0.0.1:9002", "weight": 5},
                     {"url": "http://127.0.0.1:9003"}]}))
    before = signal.getsignal(signal.SIGHUP)
    service = started(reactor, reread=lambda: wanted)
    try:
        gone = service.pool.backends[0]
        service._on_sighup(signal.SIGHUP, None)
        assert [(b.url, b.weight) for b in service.pool.backends] == [
            ("http://127.0.0.1:9002", 5), ("http://127.0.0.1:9003", 1)]
        assert gone not in service.pool.backends  # nothing in flight: drained at once
        assert type(service.pool.strategy).__name__ != "RoundRobin"
        assert "configuration reloaded" in [e.get("log_format") for e in events]
    finally:
        result_of(service.stopService())
    assert signal.getsignal(signal.SIGHUP) == before


def test_invalid_file_on_reload_changes_nothing(events: list[dict]) -> None:
    def reread() -> Any:
        raise ConfigError(["proxy.listen: bad"])

    service = started(MemoryReactorClock(), reread=reread)
    try:
        assert service.reload() is False
        assert [b.url for b in service.pool.backends] == ["http://127.0.0.1:9001",
                                                         "http://127.0.0.1:9002"]
        assert any(e.get("problem") == "proxy.listen: bad" for e in events)
    finally:
        result_of(service.stopService())


def test_restart_only_settings_keep_their_running_values(events: list[dict]) -> None:
    running = parse_config(document(admin={"token": "old"}))
    new = parse_config(document(admin={"token": "new", "listen": "tcp:0:interface=127.0.0.9"}))
    assert restart_only_changes(running, new) == ["admin.listen", "admin.token"]
    kept = with_running_settings(new, running)
    assert (kept.admin.token, kept.admin.listen) == ("old", LISTEN)
    service = EqualizerService(running, MemoryReactorClock(), store=FakeStore(None))
    service.apply(new)
    assert service.config.admin.token == "old"
    warnings = {e["key"]: e for e in events if e.get("log_level") == LogLevel.warn}
    assert set(warnings) == {"admin.listen", "admin.token"}
    assert warnings["admin.listen"]["wanted"] == "tcp:0:interface=127.0.0.9"
    assert "wanted" not in warnings["admin.token"]  # a secret is never logged


def test_backend_kept_by_a_reload_stops_draining() -> None:
    service = started(MemoryReactorClock())
    try:
        backend = service.pool.backends[0]
        backend.in_flight = 1
        service.pool.drain(backend).addErrback(lambda failure: None)
        service.apply(service.config)
        assert not backend.draining and backend in service.pool.backends
    finally:
        backend.in_flight = 0
        result_of(service.stopService())


def test_sigusr1_without_a_log_file_of_our_own_is_logged(events: list[dict]) -> None:
    service = EqualizerService(parse_config(document()), ThreadlessReactor(),
                               store=FakeStore(None))
    service._on_sigusr1(signal.SIGUSR1, None)
    assert any("nothing to reopen" in e.get("log_format", "") for e in events)


def test_postgres_configuration_leases_from_a_postgres_store() -> None:
    config = parse_config(document(rate_limit={"store": "postgres",
                                               "database_url": "dbname=unused"}))
    assert isinstance(make_store(config, MemoryReactorClock()), LeasingStore)


# -- the bucket store's start-up ----------------------------------------------------------

def test_store_failing_at_start_up_is_retried_until_it_connects(events: list[dict]) -> None:
    reactor = MemoryReactorClock()
    store = FakeStore(reactor, manual_start=True)
    buckets = BucketService(store, reactor)
    buckets.startService()
    store.attempts[0].errback(ConnectionRefusedError("refused"))
    assert buckets.readiness.ready
    reactor.advance(STORE_RETRY_SECONDS)
    store.attempts[1].callback(None)
    assert store.available
    assert "bucket store available" in [e.get("log_format") for e in events]
    result_of(buckets.stopService())


def test_store_stopped_before_its_retry_retries_no_more() -> None:
    reactor = MemoryReactorClock()
    store = FakeStore(reactor, manual_start=True)
    buckets = BucketService(store, reactor)
    buckets.startService()
    store.attempts[0].errback(ConnectionRefusedError("refused"))
    result_of(buckets.stopService())
    reactor.advance(60)
    assert len(store.attempts) == 1 and store.stopped
    assert not any(call.active() for call in reactor.getDelayedCalls())


def test_reload_rule_the_file_wins_for_what_it_says(events: list[dict]) -> None:
    """After API changes, a reload gives listed backends the file's weight (1 where the
    entry has none), max_requests and backup, keeps `enabled: false` (not a file setting),
    drains backends the file does not list (API-added ones too), and logs each of these."""
    service = started(MemoryReactorClock())
    try:
        first, second = service.pool.backends
        service.pool.set_weight(first, 7)
        service.pool.set_limits(first, 5, True)
        service.pool.set_weight(second, 9)
        service.pool.set_enabled(second, False)
        added = service.pool.add("http://127.0.0.1:9005", 3)
        events.clear()
        service.apply(service.config)
        assert [(b.url, b.weight, b.max_requests, b.backup, b.enabled)
                for b in service.pool.backends] == [
            ("http://127.0.0.1:9001", 1, 0, False, True),
            ("http://127.0.0.1:9002", 2, 0, False, False)]
        assert added not in service.pool.backends
        assert [formatEvent(e) for e in events if e.get("log_format", "").startswith("reload")] \
            == [f"reload: backend {first.id} (http://127.0.0.1:9001) weight 7 -> 1, the file's",
                f"reload: backend {first.id} (http://127.0.0.1:9001) max_requests 5 -> 0, "
                "backup True -> False, the file's",
                f"reload: backend {second.id} (http://127.0.0.1:9002) weight 9 -> 2, the file's",
                f"reload: backend {second.id} (http://127.0.0.1:9002) stays disabled (set "
                "through the API; the file has no enabled setting)",
                f"reload: backend {added.id} (http://127.0.0.1:9005) is not in the file; "
                "draining it, then removing it"]
    finally:
        result_of(service.stopService())
