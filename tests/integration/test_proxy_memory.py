"""1 GiB through a twistd equalizer without its memory growing with the body (SPEC 4.1).

The balancer runs as a child process so that its resident memory (``VmRSS``)
is its own; backend and client run here. At 256 MiB, the receiving side
stops reading for a second while the sending side goes on: without
back-pressure the proxy would buffer hundreds of megabytes then. Each test
prints the growth it measured (run pytest with ``-s`` to see it).
"""

from __future__ import annotations

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.client import ResponseDone
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from tests.integration.harness import equalizer_config, reset_peak_rss, vm_rss_kib, within

pytestmark = pytest.mark.usefixtures("no_logged_errors")

GIB = 1024 ** 3
BLOCK = b"\x5a" * (256 * 1024)
LIMIT_KIB = 64 * 1024
TRANSFER_TIMEOUT = 120.0


class RssSampler:
    """The peak VmRSS of a process above its level when sampling started.

    The kernel's own peak mark (VmHWM, reset at the start) catches what sampling
    between reactor turns could miss; sampling covers kernels that refuse the reset.
    """

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid = pid
        self.baseline = vm_rss_kib(pid)
        self.exact = reset_peak_rss(pid)
        self.peak = self.baseline
        self.samples = 0
        self._loop = LoopingCall(self.sample)
        self._loop.start(interval)

    def sample(self) -> None:
        self.samples += 1
        self.peak = max(self.peak, vm_rss_kib(self.pid))

    def stop(self) -> int:
        """Stop sampling; the growth in KiB."""
        self.sample()
        self._loop.stop()
        if self.exact:
            self.peak = max(self.peak, vm_rss_kib(self.pid, "VmHWM"))
        return self.peak - self.baseline

    def report(self, what: str, seconds: float) -> str:
        how = "kernel peak mark" if self.exact else f"{self.samples} samples"
        return (f"\n[rss] {what}: equalizer VmRSS {self.baseline} KiB before, peak "
                f"{self.peak} KiB ({how}), growth {(self.peak - self.baseline) / 1024:.1f} MiB, "
                f"{seconds:.1f}s")


@implementer(IPushProducer)
class ZeroResponse:
    """Writes ``total`` bytes into a twisted.web response as fast as the proxy takes them."""

    def __init__(self, request: server.Request, total: int) -> None:
        self.request = request
        self.remaining = total
        self.paused = False
        self.producing = False
        self.stopped = False

    def start(self) -> None:
        self.request.registerProducer(self, True)
        reactor.callLater(0, self.resumeProducing)

    def resumeProducing(self) -> None:
        self.paused = False
        if self.producing or self.stopped:
            return
        self.producing = True
        try:
            while not self.paused and not self.stopped and self.remaining > 0:
                block = BLOCK if self.remaining >= len(BLOCK) else BLOCK[:self.remaining]
                self.remaining -= len(block)
                self.request.write(block)
        finally:
            self.producing = False
        if self.remaining == 0 and not self.stopped:
            self.stopped = True
            self.request.unregisterProducer()
            self.request.finish()

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.stopped = True


@implementer(IBodyProducer)
class ZeroBody:
    """An upload body of ``total`` bytes (sent chunked when ``chunked``), made as it is sent."""

    def __init__(self, total: int, chunked: bool) -> None:
        self.length = UNKNOWN_LENGTH if chunked else total
        self.remaining = total
        self.paused = False
        self.producing = False
        self.consumer = None
        self.done: Deferred[None] | None = None

    def startProducing(self, consumer) -> Deferred[None]:
        self.consumer = consumer
        self.done = Deferred()
        self.resumeProducing()
        return self.done

    def resumeProducing(self) -> None:
        self.paused = False
        if self.producing or self.done is None or self.done.called:
            return
        self.producing = True
        try:
            while not self.paused and self.remaining > 0:
                block = BLOCK if self.remaining >= len(BLOCK) else BLOCK[:self.remaining]
                self.remaining -= len(block)
                self.consumer.write(block)
        finally:
            self.producing = False
        if self.remaining == 0 and not self.done.called:
            self.done.callback(None)

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.remaining = 0
        self.paused = True


STALL_AT = 256 * 1024 * 1024
STALL_SECONDS = 1.0


class StallingReader(Protocol):
    """Reads a response body, but stops reading for a while at ``STALL_AT`` bytes: only
    back-pressure through the proxy keeps the backend from piling the body up in it."""

    def __init__(self) -> None:
        self.received = 0
        self.stalled = False
        self.done: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        if not self.stalled and self.received >= STALL_AT:
            self.stalled = True
            self.transport.pauseProducing()
            reactor.callLater(STALL_SECONDS, self.transport.resumeProducing)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if reason.check(ResponseDone):
            self.done.callback(None)
        else:
            self.done.errback(reason)


def stall_upload(request, data: bytes) -> None:
    """The backend stops reading an upload for a while at ``STALL_AT`` bytes."""
    if request.body_received >= STALL_AT and not getattr(request, "stalled", False):
        request.stalled = True
        transport = request.channel.transport
        transport.pauseProducing()
        reactor.callLater(STALL_SECONDS, transport.resumeProducing)


def download(backend, request: server.Request) -> int:
    """1 GiB of body, with Content-Length unless the path says /chunked."""
    if not request.path.startswith(b"/chunked"):
        request.setHeader(b"Content-Length", b"%d" % GIB)
    ZeroResponse(request, GIB).start()
    return server.NOT_DONE_YET


def count_upload(backend, request: server.Request) -> bytes:
    return b"%d" % request.body_received


def small_for_warm_up(handler):
    """``handler``, except that ``/warm-up`` gets a short answer."""

    def answer(backend, request: server.Request) -> bytes | int:
        if request.path == b"/warm-up":
            return b"warm"
        return handler(backend, request)

    return answer


async def start_balancer(http, backends, twistd_process, handler, streaming=False):
    backend = backends("big", small_for_warm_up(handler), streaming=streaming)
    document = equalizer_config([backend.url], proxy={"timeouts": {"response": "60s"}},
                                logging={"access_log": True})
    process = await twistd_process(document, http)
    response = await within(http.get(process.proxy_url + "/warm-up"))  # the code paths in memory
    await within(treq.content(response))
    return backend, process


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest_twisted.ensureDeferred
async def test_1gib_download_in_bounded_memory(http, backends, twistd_process, framing):
    """A 1 GiB response streams through twistd equalizer while its RSS grows under 64 MB."""
    backend, process = await start_balancer(http, backends, twistd_process, download)
    sampler = RssSampler(process.pid)
    started = reactor.seconds()
    path = "/chunked" if framing == "chunked" else "/plain"
    try:
        response = await within(http.get(process.proxy_url + path, unbuffered=True), 30)
        assert response.code == 200
        reader = StallingReader()
        response.deliverBody(reader)
        await within(reader.done, TRANSFER_TIMEOUT)
    finally:
        growth = sampler.stop()
    elapsed = reactor.seconds() - started
    print(sampler.report(f"1 GiB download ({framing})", elapsed))
    assert reader.stalled and reader.received == GIB
    assert growth < LIMIT_KIB


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest_twisted.ensureDeferred
async def test_1gib_upload_in_bounded_memory(http, backends, twistd_process, framing):
    """A 1 GiB request body streams through twistd equalizer while its RSS grows under 64 MB."""
    backend, process = await start_balancer(http, backends, twistd_process, count_upload,
                                            streaming=True)
    backend.on_upload_chunk = stall_upload
    sampler = RssSampler(process.pid)
    started = reactor.seconds()
    body = ZeroBody(GIB, chunked=framing == "chunked")
    try:
        response = await within(http.post(process.proxy_url + "/upload", data=body),
                                TRANSFER_TIMEOUT)
        answer = await within(treq.content(response))
    finally:
        growth = sampler.stop()
    elapsed = reactor.seconds() - started
    print(sampler.report(f"1 GiB upload ({framing})", elapsed))
    assert (response.code, answer) == (200, b"%d" % GIB)
    assert backend.uploads[-1].body_received == GIB and backend.uploads[-1].stalled
    assert growth < LIMIT_KIB
