"""Fixtures for the loopback integration tests; the machinery is in harness.py."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest
import pytest_twisted
from treq.client import HTTPClient
from twisted.logger import globalLogPublisher

from tests.integration.buckets_support import STORES
from tests.integration.harness import (
    BackendServer,
    EqualizerProcess,
    RunningEqualizer,
    UnresponsiveListener,
    http_client,
    start_equalizer,
    within,
)


@pytest.fixture()
def no_logged_errors():
    """Fail a test during which anything logged an error or a failure (an exception that a
    callback swallowed, an unhandled error in a Deferred)."""
    errors = []

    def observe(event: dict) -> None:
        if event.get("log_failure") is not None or event.get("isError"):
            errors.append(event)

    globalLogPublisher.addObserver(observe)
    yield
    globalLogPublisher.removeObserver(observe)
    assert not errors, "errors were logged:\n" + "\n".join(
        str(event.get("log_failure") or event.get("log_format")) for event in errors)


@pytest_twisted.async_yield_fixture()
async def http() -> AsyncIterator[HTTPClient]:
    """A treq client whose persistent pool is closed after the test."""
    client, pool = http_client()
    yield client
    await within(pool.closeCachedConnections())


@pytest_twisted.async_yield_fixture()
async def backends() -> AsyncIterator[Callable[..., BackendServer]]:
    """A factory of started backends (same arguments as BackendServer), all closed afterwards."""
    started: list[BackendServer] = []

    def make(*args, **kwargs) -> BackendServer:
        backend = BackendServer(*args, **kwargs).start()
        started.append(backend)
        return backend

    yield make
    for backend in started:
        await backend.close()


@pytest.fixture()
def unresponsive():
    """A backend address that never completes a connection (its accept queue is full)."""
    try:
        listener = UnresponsiveListener()
    except RuntimeError as error:
        pytest.skip(str(error))
    yield listener
    listener.close()


@pytest_twisted.async_yield_fixture()
async def equalizer() -> AsyncIterator[Callable[[dict], object]]:
    """A starter of in-process balancers (``await equalizer(document)``), stopped afterwards."""
    running: list[RunningEqualizer] = []

    async def start(document: dict) -> RunningEqualizer:
        balancer = await start_equalizer(document)
        running.append(balancer)
        return balancer

    yield start
    for balancer in running:
        await balancer.stop()


@pytest_twisted.async_yield_fixture()
async def twistd_process(tmp_path) -> AsyncIterator[Callable[[dict], object]]:
    """A starter of ``twistd -n equalizer`` child processes, each stopped by PID afterwards."""
    processes: list[EqualizerProcess] = []

    async def start(document: dict, client: HTTPClient) -> EqualizerProcess:
        process = EqualizerProcess(document, str(tmp_path))
        processes.append(process)
        await process.start(client)
        return process

    yield start
    for process in processes:
        output = await process.stop()
        assert "Traceback" not in output, output


@pytest.fixture(params=STORES)
def store_kind(request: pytest.FixtureRequest) -> str:
    """Each bucket store in turn: the tests that ask for it run once per store."""
    return request.param


@pytest.fixture()
def dsn(store_kind: str, request: pytest.FixtureRequest) -> str | None:
    """The test database's DSN for the postgres store (only then is PostgreSQL needed)."""
    return request.getfixturevalue("postgres_dsn") if store_kind == "postgres" else None
