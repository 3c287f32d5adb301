"""Connections to PostgreSQL: a pool, bounded queries, and reconnection.

Failures are bounded and recovered from. Each query has a timeout
(``query_timeout``, 5 s); a call that hits it fails with :class:`StoreUnavailable`
(its statement may still be applied later). A connection-level error (the server
went away, a socket died, or the server answered nothing at all for
``query_timeout``) also marks the database unavailable (``available`` is False,
which ``/health`` reports), throws the pool away and starts a reconnect loop: a
fresh pool whose every session must answer its set-up statements (as a
``SELECT 1`` would), retried with backoff from 0.5 s up to 2 s, until it works.
Meanwhile every call fails at once with :class:`StoreUnavailable`, so a dead
database never holds a request up. The pool also notices the server hanging up
on idle connections, before any query does. A statement the server refuses over
the values it computes (a data exception, SQLSTATE class 22) fails that call with
:class:`StoreDataError` and one log line; the database stays available.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import partial
from typing import Any

import psycopg2
from twisted.internet.defer import Deferred, FirstError, fail, gatherResults
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from txpostgres.txpostgres import Connection, ConnectionPool

from equalizer.buckets.interface import StoreDataError, StoreUnavailable
from equalizer.buckets.outage import OutageLog
from equalizer.buckets.postgres.migrations import Migration, migrate
from equalizer.config.checks import database_target
from equalizer.histogram import DurationHistogram

log = Logger()

Rows = list[tuple[Any, ...]]


def _is_connection_error(error: BaseException) -> bool:
    """Whether ``error`` means the connection (not just the query) is gone."""
    if isinstance(error, psycopg2.OperationalError):
        code = error.pgcode
        # None: libpq's own error (socket closed, server vanished); 08: connection
        # exception; 57: operator intervention (shutdown), except query_canceled.
        return code is None or code.startswith("08") or (code[:2] == "57" and code != "57014")
    return isinstance(error, psycopg2.InterfaceError | ConnectionDone | ConnectionLost)


class _Connection(Connection):
    """A txpostgres connection that reports the server hanging up (``on_lost``), and
    closes quietly."""

    def __init__(self, reactor: Any, cooperator: Any = None,
                 on_lost: Callable[[], object] | None = None) -> None:
        super().__init__(reactor, cooperator)
        self.on_lost = on_lost

    def doRead(self) -> ConnectionLost | None:
        try:
            super().doRead()
        except psycopg2.Error:
            # The server hung up on this idle connection (shutdown, crash, network).
            # Returning the reason makes the reactor call connectionLost quietly,
            # instead of logging the exception as unhandled and then doing so.
            return ConnectionLost()
        return None

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        pg = self.pollable()
        if self.on_lost is not None and pg is not None and pg.closed:
            on_lost, self.on_lost = self.on_lost, None
            on_lost()

    def shut(self) -> None:
        """Close without reporting it, whatever state the connection is in."""
        self.on_lost = None
        if self.pollable() is not None:
            try:
                self.close()
            except Exception:  # an already broken connection may refuse to close cleanly
                pass


class _Pool(ConnectionPool):
    """A txpostgres pool on an injected reactor, with its sessions set up at start.

    It remembers all of its connections: ``ConnectionPool.connections`` holds only
    the idle ones, and closing a pool for good must also close those busy with a
    (possibly hung) query.
    """

    def __init__(self, reactor: Any, dsn: str, size: int, setup: str,
                 on_lost: Callable[[_Pool], object]) -> None:
        self.reactor = reactor  # read by ConnectionPool.__init__ instead of the global one
        lost = partial(on_lost, self)
        # txpostgres's documented hook: how the pool makes its connections.
        self.connectionFactory = partial(_Connection, on_lost=lost)
        super().__init__(None, dsn, min=size)
        self.every: tuple[_Connection, ...] = tuple(self.connections)
        self._setup = setup
        self.last_answer = reactor.seconds()

    def answered(self, rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        """Note that the server answers (a callback on every query)."""
        self.last_answer = self.reactor.seconds()
        return rows

    def start(self) -> Deferred[_Pool]:
        """Connect every connection and run the session setup on each."""
        d = super().start()
        d.addCallback(
            lambda _: gatherResults(
                [c.runOperation(self._setup) for c in self.every], consumeErrors=True
            )
        )
        return d.addCallback(lambda _: self)

    def shut(self) -> None:
        for connection in self.every:
            connection.shut()


def _within(
    d: Deferred[Any], clock: IReactorTime, seconds: float, on_timeout: Callable[[], object],
    what: str = "PostgreSQL",
) -> Deferred[Any]:
    """A Deferred with ``d``'s result, or StoreUnavailable after ``seconds``.

    ``d`` itself is never cancelled (cancelling a txpostgres query blocks on
    ``PQcancel``); its late result is dropped, and ``on_timeout`` is called so
    the caller can throw away whatever ``d`` was waiting on.
    """

    def cancel(_: Deferred[Any]) -> None:
        if timer.active():
            timer.cancel()

    result: Deferred[Any] = Deferred(cancel)

    def expire() -> None:
        if not result.called:
            on_timeout()
            result.errback(StoreUnavailable(f"{what} did not answer within {seconds:g}s"))

    def done(value: object) -> None:
        if result.called:
            return  # timed out or cancelled; the late result is of no use
        timer.cancel()
        if isinstance(value, Failure):
            result.errback(value)
        else:
            result.callback(value)

    timer = clock.callLater(seconds, expire)
    d.addBoth(done)
    return result


def _unwrap(failure: Failure) -> BaseException:
    error = failure.value
    while True:
        if isinstance(error, FirstError):
            error = error.subFailure.value
        else:
            return error


_SERVER_AT = re.compile(r'^connection to server (?:at "[^"]*"(?: \([^)]*\))?, port \d+|on socket '
                        r'"[^"]*") failed: ')


def describe(error: BaseException) -> str:
    """A libpq error on one line, without the address it repeats (the target says it):
    ``Connection refused; Is the server running on that host and accepting TCP/IP
    connections?``."""
    lines = [" ".join(line.split()) for line in str(error).splitlines()]
    return _SERVER_AT.sub("", "; ".join(line for line in lines if line)) or type(error).__name__


async def _in_transaction(connection: _Connection, scripts: list[Migration]) -> None:
    """Migrate in one transaction, rolled back if it fails.

    Not txpostgres's ``runInteraction``: when stop() or a timeout has closed the
    connection under it, its rollback fails and it logs that as an unhandled error
    with a traceback; here the rollback of a closed connection is skipped (the
    server ends the session and its transaction anyway).
    """
    cursor = connection.cursor()
    await cursor.execute("BEGIN")
    try:
        await migrate(cursor, scripts)
    except BaseException:
        try:
            await cursor.execute("ROLLBACK")
        except psycopg2.Error:
            pass  # the connection is gone, and the transaction with it
        raise
    await cursor.execute("COMMIT")


class Database:
    """A pool of sessions on one PostgreSQL database that reconnects by itself
    (module docstring). Every query answers with its rows or fails with
    :class:`StoreUnavailable` (or :class:`StoreDataError`, or the IntegrityError of
    a CHECK constraint).

    Args:
        dsn: a libpq connection string or ``postgresql://`` URL.
        reactor: for sockets and timers (IReactorFDSet and IReactorTime).
        setup: the statements each session runs once connected.
        pool_size: connections held open; also the most queries in flight at once.
        query_timeout: seconds a query may take before the pool is given up on.
        connect_timeout: seconds to connect a pool and set its sessions up.
        migrate_timeout: seconds the start-up migration may take (it may wait for
            another instance's).
        min_backoff, max_backoff: reconnect delays, doubling from one to the other.
    """

    def __init__(
        self,
        dsn: str,
        reactor: Any,
        setup: str,
        pool_size: int = 8,
        query_timeout: float = 5.0,
        connect_timeout: float = 5.0,
        migrate_timeout: float = 60.0,
        min_backoff: float = 0.5,
        max_backoff: float = 2.0,
    ) -> None:
        self._dsn = dsn
        self.where = f"PostgreSQL at {database_target(dsn)}"
        """What and where the database is, for messages (``PostgreSQL at user@host:5432/db``)."""
        self.outage = OutageLog(reactor, "bucket store")
        self._reactor = reactor
        self._setup = setup
        self._pool_size = pool_size
        self._query_timeout = query_timeout
        self._connect_timeout = connect_timeout
        self._migrate_timeout = migrate_timeout
        self._min_backoff = min_backoff
        self._max_backoff = max_backoff
        self.available = False
        self.running = False
        self._pool: _Pool | None = None
        # How to abort the connections being made (start-up, reconnection) on stop().
        self._aborts: set[Callable[[], None]] = set()
        self._reconnect_call: IDelayedCall | None = None
        self.query_durations = DurationHistogram()
        """Statement times, answered or failed; read by ``/metrics``."""

    async def start(self, scripts: list[Migration]) -> None:
        """Apply ``scripts`` the database lacks, then connect the pool.

        Fails with StoreUnavailable when the database cannot be reached; the
        database then stays stopped, and ``start`` may be called again.
        """
        if self.running:
            return
        self.running = True
        try:
            await self._migrate(scripts)
            pool = await self._connect()
        except BaseException:
            self.running = False
            raise
        if not self.running:  # stop() was called meanwhile
            pool.shut()
            raise StoreUnavailable("stopped while starting")
        self._install(pool)

    def stop(self) -> None:
        """Close every connection and cancel the reconnect loop."""
        self.running = False
        self.available = False
        if self._reconnect_call is not None and self._reconnect_call.active():
            self._reconnect_call.cancel()
        self._reconnect_call = None
        for abort in list(self._aborts):
            abort()
        self._aborts.clear()
        if self._pool is not None:
            self._pool.shut()
            self._pool = None

    async def _migrate(self, scripts: list[Migration]) -> None:
        """Apply the migrations the database lacks, on a connection of their own.

        Before the pool connects, because its sessions prepare statements against
        the schema.
        """
        connection = _Connection(self._reactor)
        self._aborts.add(connection.shut)
        try:
            await self._guarded(
                connection.connect(self._dsn), self._connect_timeout, connection.shut
            )
            await self._guarded(
                Deferred.fromCoroutine(_in_transaction(connection, scripts)),
                self._migrate_timeout,
                connection.shut,
            )
        finally:
            self._aborts.discard(connection.shut)
            connection.shut()

    async def _connect(self) -> _Pool:
        """A started pool whose sessions are all set up, or StoreUnavailable."""
        pool = _Pool(self._reactor, self._dsn, self._pool_size, self._setup, self._hung_up)
        self._aborts.add(pool.shut)
        try:
            await self._guarded(pool.start(), self._connect_timeout, pool.shut)
        except BaseException:
            pool.shut()
            raise
        finally:
            self._aborts.discard(pool.shut)
        return pool

    def _install(self, pool: _Pool) -> None:
        self._pool = pool
        self.available = True

    def _hung_up(self, pool: _Pool) -> None:
        self._lost(pool, "the server closed a connection")

    def _lost(self, pool: _Pool, why: str) -> None:
        """``pool`` is broken: stop using it, and reconnect in the background."""
        if pool is not self._pool:
            return  # already replaced (or stopped), or not installed yet
        self.outage.failed(f"{self.where}: {why}", retry="reconnecting")
        self.available = False
        self._pool = None
        # Not from inside txpostgres's own callbacks: close on the next turn.
        self._reactor.callLater(0, pool.shut)
        self._schedule_reconnect(self._min_backoff)

    def _schedule_reconnect(self, delay: float) -> None:
        if self.running:
            self._reconnect_call = self._reactor.callLater(delay, self._reconnect, delay)

    def _reconnect(self, delay: float) -> None:
        self._reconnect_call = None

        def connected(pool: _Pool) -> None:
            if not self.running:
                pool.shut()
                return
            self._install(pool)
            self.outage.recovered()

        def failed(failure: Failure) -> None:
            self.outage.failed(failure.getErrorMessage(), retry="reconnecting")
            self._schedule_reconnect(min(delay * 2, self._max_backoff))

        Deferred.fromCoroutine(self._connect()).addCallbacks(connected, failed)

    def _guarded(
        self, d: Deferred[Any], timeout: float, on_timeout: Callable[[], object]
    ) -> Deferred[Any]:
        """``d`` bounded by ``timeout``, with connection failures as StoreUnavailable."""
        return _within(d, self._reactor, timeout, on_timeout, self.where).addErrback(
            self._translate, None)

    def _translate(self, failure: Failure, pool: _Pool | None) -> Failure:
        error = _unwrap(failure)
        if isinstance(error, StoreUnavailable | StoreDataError | psycopg2.IntegrityError):
            return failure if error is failure.value else Failure(error)
        if _is_connection_error(error):
            if pool is not None:
                self._lost(pool, describe(error))
            return Failure(StoreUnavailable(f"{self.where}: {describe(error)}"))
        if isinstance(error, psycopg2.DataError):
            # A value the statement cannot compute: this call fails, the store stays up.
            message = " ".join(str(error).split())
            log.error("PostgreSQL refused a statement ({code}): {error}; the store stays "
                      "available", code=error.pgcode, error=message)
            return Failure(StoreDataError(f"PostgreSQL could not compute it: {message}"))
        if isinstance(error, psycopg2.Error):
            log.failure("PostgreSQL query failed", failure)
            return Failure(StoreUnavailable(f"PostgreSQL error: {error}".strip()))
        return failure

    def query(self, sql: str, params: Any) -> Deferred[Rows]:
        """Run one statement: its rows, or StoreUnavailable.

        Bounded by the query timeout; connection failures reconnect.
        """
        pool = self._pool
        if pool is None:
            return fail(StoreUnavailable(f"{self.where}: unreachable; reconnecting"))
        started = self._reactor.seconds()
        d = _within(
            pool.runQuery(sql, params).addCallback(pool.answered),
            self._reactor,
            self._query_timeout,
            lambda: self._timed_out(pool),
            self.where,
        )
        d.addBoth(self._timed, started)
        return d.addErrback(self._translate, pool)

    def _timed(self, result: Any, started: float) -> Any:
        """Count the statement's time, answered or failed, in ``query_durations``."""
        self.query_durations.observe(self._reactor.seconds() - started)
        return result

    def _timed_out(self, pool: _Pool) -> None:
        """A query on ``pool`` took too long: the pool is dead if nothing else got answers.

        A query can also time out waiting for a free connection while the server
        keeps answering (overload); that call fails, but the pool is fine.
        """
        if self._reactor.seconds() - pool.last_answer >= self._query_timeout:
            self._lost(pool, f"no answer for {self._query_timeout:g}s")
