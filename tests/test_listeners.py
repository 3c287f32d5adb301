"""Listeners: where an endpoint string listens, and a port found taken at start-up is
one line on stderr and ListenFailed (exit status 1), not a traceback."""

from __future__ import annotations

import errno

import pytest
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock

from equalizer.listeners import Listener, ListenFailed, listen_address, with_backlog
from equalizer.readiness import Readiness


@pytest.mark.parametrize(("description", "address"), [
    ("tcp:8080", ("", 8080)),
    ("tcp:port=8081:interface=127.0.0.1", ("127.0.0.1", 8081)),
    ("tcp6:8082:interface=\\:\\:1", ("::1", 8082)),
    ("tcp:0:interface=127.0.0.1", ("127.0.0.1", 0)),
    ("unix:/run/equalizer.sock", None),
])
def test_listen_address_is_read_by_twisteds_own_parser(description: str,
                                                       address: tuple | None) -> None:
    assert listen_address(description) == address


def gated(reactor: MemoryReactorClock, probe) -> tuple[Listener, Readiness]:
    description = "tcp:8080:interface=127.0.0.1"
    listener = Listener(serverFromString(reactor, description), Factory(), "proxy.listen",
                        description, probe=probe)
    readiness = Readiness()
    listener.gate(readiness, lambda: None, lambda error: None)
    return listener, readiness


def test_port_taken_at_start_up_is_one_line_and_exit_1(capfd) -> None:
    def taken(description: str) -> None:
        raise OSError(errno.EADDRINUSE, "Address already in use")

    listener, _ = gated(MemoryReactorClock(), taken)
    with pytest.raises(ListenFailed) as failed:
        listener.privilegedStartService()
    assert failed.value.code == 1
    assert capfd.readouterr().err == ("error: cannot listen on proxy.listen "
                                      "'tcp:8080:interface=127.0.0.1': Address already in use\n")


def test_gated_listener_listens_once_ready_and_stops() -> None:
    reactor = MemoryReactorClock()
    probed: list[str] = []
    listener, readiness = gated(reactor, probed.append)
    listener.privilegedStartService()
    listener.startService()
    assert (probed, reactor.tcpServers) == (["tcp:8080:interface=127.0.0.1"], [])
    readiness.set()
    assert [(port, interface) for port, _, _, interface in reactor.tcpServers] == [
        (8080, "127.0.0.1")]
    assert listener.port is not None
    listener.stopService()
    assert listener.port is None and not listener.running


@pytest.mark.parametrize(("description", "expected"), [
    ("tcp:8080", "tcp:8080:backlog=511"),
    ("tcp:8080:interface=127.0.0.1", "tcp:8080:interface=127.0.0.1:backlog=511"),
    ("tcp6:8080:interface=\\:\\:1", "tcp6:8080:interface=\\:\\:1:backlog=511"),
    ("ssl:8443:privateKey=k.pem:certKey=c.pem",
     "ssl:8443:privateKey=k.pem:certKey=c.pem:backlog=511"),
    ("unix:/run/equalizer.sock", "unix:/run/equalizer.sock:backlog=511"),
    ("tcp:8080:backlog=64", "tcp:8080:backlog=64"),  # the operator's own wins
    ("tcp:port=8080:backlog=2048:interface=::", "tcp:port=8080:backlog=2048:interface=::"),
    ("systemd:domain=INET:index=0", "systemd:domain=INET:index=0"),  # no backlog to set
])
def test_listeners_queue_511_pending_connections_unless_told_otherwise(description, expected):
    """As nginx does on Linux, not Twisted's 50: a burst of new connections must not
    overflow the accept queue (each overflow costs its client a second or more)."""
    assert with_backlog(description) == expected
