"""Listeners that fail as a user's mistake, not a traceback, and open when the service is ready.

twistd binds every listener before the reactor runs; the proxy listener waits
instead for start-up readiness (SPEC 4.5), so a port taken meanwhile is found
by a probe at twistd's start and reported before it daemonizes.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from equalizer.config.checks import endpoint_fields

if TYPE_CHECKING:
    from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
    from twisted.internet.protocol import ServerFactory
    from twisted.python.failure import Failure

    from equalizer.readiness import Readiness

log = Logger()

LISTEN_BACKLOG = 511
"""Connections the kernel may hold for a listener before it accepts them: nginx's default
on Linux (Twisted's is 50). With 50, a burst of new connections (wrk's 256 at once, a
client pool reconnecting) overflowed the queue (``ListenOverflows``): the kernel dropped
the handshake's last step and the client's first request waited a second or more for
the retransmission (p99 of 360-630 ms at c=256 in some 8 s runs, max 952 ms). The kernel
caps it at ``net.core.somaxconn``; an endpoint string's own ``backlog=`` wins."""

BACKLOG_ENDPOINTS = frozenset({"tcp", "tcp6", "ssl", "unix"})
"""The endpoint types whose string takes a ``backlog`` (Twisted's parsers)."""


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


class Listener(Service):
    """A listener whose failure to bind (port in use, no such directory) is one line
    on stderr and ListenFailed: a user's mistake, not a traceback.

    twistd binds in ``privilegedStartService``, before the reactor runs. A gated
    listener (:meth:`gate`) that is not ready by then binds once it is, and reports
    a failure to bind to ``on_failure`` instead of raising.
    """

    def __init__(self, endpoint: IStreamServerEndpoint, factory: ServerFactory, key: str,
                 description: str, *, probe: Callable[[str], None] | None = None) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.key = key
        self.description = description
        self._probe = probe_address if probe is None else probe
        self._readiness: Readiness | None = None
        self._on_open: Callable[[], None] = lambda: None
        self._on_failure: Callable[[ListenFailed], None] = lambda error: None
        self._pending: Deferred[None] | None = None  # waiting for readiness
        self._listening: Deferred[IListeningPort | None] | None = None  # listen() was called
        self.port: IListeningPort | None = None
        """The listening port, once listening."""

    def gate(self, readiness: Readiness, on_open: Callable[[], None],
             on_failure: Callable[[ListenFailed], None]) -> None:
        """Listen only once ``readiness`` is set (SPEC 4.5); ``on_open`` once listening."""
        self._readiness = readiness
        self._on_open = on_open
        self._on_failure = on_failure

    def privilegedStartService(self) -> None:
        Service.privilegedStartService(self)
        if self._readiness is not None and not self._readiness.ready:
            try:  # bind later, in startService's wait; find a taken port now
                self._probe(self.description)
            except OSError as error:
                self._fail(error)
            return
        self._bind()

    def startService(self) -> None:
        Service.startService(self)
        if self._listening is not None or self._pending is not None:
            return
        if self._readiness is None:
            self._bind()
        else:
            self._pending = self._readiness.wait()
            self._pending.addCallback(self._bind_late)

    def _bind(self) -> None:
        """Listen. The built-in endpoints (tcp, ssl, unix) answer at once, so a failure to
        bind is known here and raised as ListenFailed."""
        failures: list[Failure] = []
        listening = self.endpoint.listen(self.factory)
        listening.addCallbacks(self._opened, failures.append)
        if failures:
            if failures[0].check(CannotListenError, OSError):
                self._fail(failures[0].value)
            failures[0].raiseException()
        self._listening = listening
        self._on_open()

    def address(self) -> tuple[str, int] | None:
        """The (host, port) listened on, once listening on TCP; else None."""
        host = self.port.getHost() if self.port is not None else None
        return (host.host, host.port) if hasattr(host, "port") else None

    def _opened(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        return port

    def _fail(self, error: Exception) -> NoReturn:
        message = cannot_listen(self.key, self.description, error)
        log.error("{message}; exiting", message=message)  # a daemon's record of why
        if sys.__stderr__ is not None:
            print(f"error: {message}", file=sys.__stderr__, flush=True)
        raise ListenFailed(message) from None

    def _bind_late(self, result: None) -> None:
        self._pending = None
        try:
            self._bind()
        except ListenFailed as error:
            self._on_failure(error)

    def stopService(self) -> Deferred[None]:
        """Stop listening, or stop waiting to."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.cancel()
            pending.addErrback(lambda failure: failure.trap(defer.CancelledError))
        Service.stopService(self)
        listening, self._listening, self.port = self._listening, None, None
        if listening is None:
            return defer.succeed(None)
        return listening.addCallback(lambda port: port and port.stopListening())


def cannot_listen(key: str, description: str, error: Exception) -> str:
    """``cannot listen on proxy.listen 'tcp:8080': Address already in use``."""
    return f"cannot listen on {key} {description!r}: {_reason(error)}"


def probe_addresses(endpoints: dict[str, str]) -> str | None:
    """Probe each endpoint (by its key path) with :func:`probe_address`: the message for
    the first that cannot be bound, or None.

    Called before twistd daemonizes, so a port in use is one line on the terminal and
    exit status 1, not a daemon's truncated exception repr after the fork.
    """
    for key, description in endpoints.items():
        try:
            probe_address(description)
        except OSError as error:
            return cannot_listen(key, description, error)
    return None


def probe_address(description: str) -> None:
    """Bind, without listening, the address a TCP or SSL endpoint string will listen on,
    and let it go at once; OSError if it cannot be bound (taken, not this host's).

    A listener that opens only later (SPEC 4.5) so still finds a port already in use
    while twistd starts: one line and exit 1 before it daemonizes, not a daemon that
    reports success and then exits. Nothing accepts on the probe, so no client ever
    connects to it. Ephemeral ports (0) and other endpoints (``unix:``) are not probed.
    """
    address = listen_address(description)
    if address is None or not address[1]:
        return
    interface, port = address
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as listenTCP does
        probe.bind((interface, port))


def with_backlog(description: str) -> str:
    """The endpoint string with ``backlog=`` :data:`LISTEN_BACKLOG` when it is of a type
    that takes one and sets none; any other string as it is."""
    fields = endpoint_fields(description)
    if fields[0] not in BACKLOG_ENDPOINTS or any(f.startswith("backlog=") for f in fields):
        return description
    return f"{description}:backlog={LISTEN_BACKLOG}"


def listen_address(description: str) -> tuple[str, int] | None:
    """The (interface, port) a TCP or SSL endpoint string listens on; None for others.

    Twisted's own parser reads the string (``serverFromString``), and the endpoint
    tells where it would listen through the reactor interface it calls: the recorder
    below stands in for the reactor, so nothing is bound.
    """
    recorder = _AddressRecorder()
    endpoint = serverFromString(recorder, description)
    try:
        listening = endpoint.listen(Factory())
    except AttributeError:  # it asks for another kind of listening (listenUNIX, ...)
        return None
    listening.addErrback(lambda failure: None)  # the same: not a TCP or SSL endpoint
    return recorder.address


class _AddressRecorder:
    """A stand-in reactor that notes where an endpoint asks to listen (IReactorTCP,
    IReactorSSL) and listens nowhere."""

    def __init__(self) -> None:
        self.address: tuple[str, int] | None = None

    def listenTCP(self, port: int, factory: object, backlog: int = 50,
                  interface: str = "") -> None:
        self.address = (interface, port)

    def listenSSL(self, port: int, factory: object, contextFactory: object,
                  backlog: int = 50, interface: str = "") -> None:
        self.address = (interface, port)


def _reason(error: Exception) -> str:
    cause = error.socketError if isinstance(error, CannotListenError) else error
    return getattr(cause, "strerror", None) or str(cause)
