"""The outbox: a turn's writes to TCP connections go out together at its end, in order,
with Twisted's buffer taking what a socket does not. No socket: Twisted's own TCP
connection class over a fake socket, on a MemoryReactorClock."""

from __future__ import annotations

from twisted.internet.protocol import Protocol
from twisted.internet.tcp import Connection
from twisted.internet.testing import MemoryReactorClock, StringTransport

from equalizer.proxy.site import Outbox


class FakeSocket:
    """Takes up to ``room`` bytes in all, then none (a full socket buffer)."""

    def __init__(self, room: int = 1 << 30) -> None:
        self.room = room
        self.sent: list[bytes] = []
        self.error: OSError | None = None

    def setblocking(self, flag: bool) -> None:
        pass

    def fileno(self) -> int:
        return 7

    def send(self, data: bytes) -> int:
        if self.error is not None:
            raise self.error
        taken = bytes(data[:self.room])
        self.room -= len(taken)
        if taken:
            self.sent.append(taken)
        return len(taken)


def connection(clock: MemoryReactorClock, sock: FakeSocket) -> Connection:
    transport = Connection(sock, Protocol(), reactor=clock)
    transport.connected = True
    return transport


def left_to_twisted(transport: Connection, sock: FakeSocket) -> bytes:
    """What Twisted holds for the socket: what its own next write round sends, once the
    socket takes everything."""
    sock.room, sock.error = 1 << 30, None
    before = len(sock.sent)
    transport.doWrite()
    return b"".join(sock.sent[before:])


def test_a_turns_writes_go_out_at_its_end_in_order_one_send_each():
    clock = MemoryReactorClock()
    outbox = Outbox(clock)
    first, second = FakeSocket(), FakeSocket()
    write_first = outbox.writer(connection(clock, first))
    write_second = outbox.writer(connection(clock, second))
    write_first(b"a1")
    write_second(b"b1")
    write_first(b"a2")
    assert first.sent == second.sent == []
    assert len(clock.getDelayedCalls()) == 1  # one flush per turn, however many writes
    clock.advance(0)
    assert first.sent == [b"a1", b"a2"] and second.sent == [b"b1"]
    assert clock.getDelayedCalls() == []


def test_what_the_socket_does_not_take_waits_in_twisteds_buffer_and_the_rest_behind_it():
    clock = MemoryReactorClock()
    outbox = Outbox(clock)
    sock = FakeSocket(room=3)
    transport = connection(clock, sock)
    write = outbox.writer(transport)
    write(b"abcdef")
    write(b"gh")
    clock.advance(0)
    assert sock.sent == [b"abc"]
    assert transport in clock.getWriters()
    assert left_to_twisted(transport, sock) == b"defgh"  # "gh" is not sent ahead of "def"


def test_a_send_error_leaves_the_bytes_to_twisted():
    """Twisted meets the error again on its own next try and closes the connection."""
    clock = MemoryReactorClock()
    outbox = Outbox(clock)
    sock = FakeSocket()
    sock.error = ConnectionResetError()
    transport = connection(clock, sock)
    outbox.writer(transport)(b"data")
    clock.advance(0)
    assert sock.sent == [] and left_to_twisted(transport, sock) == b"data"


def test_a_closing_or_closed_connection_gets_its_bytes_through_twisted():
    clock = MemoryReactorClock()
    outbox = Outbox(clock)
    closing, closed = FakeSocket(), FakeSocket()
    closing_transport = connection(clock, closing)
    closed_transport = connection(clock, closed)
    outbox.writer(closing_transport)(b"last")
    outbox.writer(closed_transport)(b"lost")
    closing_transport.disconnecting = True
    closed_transport.connected = False
    clock.advance(0)
    assert closing.sent == closed.sent == []
    assert left_to_twisted(closing_transport, closing) == b"last"
    assert closed_transport not in clock.getWriters()  # Twisted drops it: nothing to send on


def test_flush_sends_at_once_for_a_connection_about_to_close():
    clock = MemoryReactorClock()
    outbox = Outbox(clock)
    sock = FakeSocket()
    outbox.writer(connection(clock, sock))(b"answer")
    outbox.flush()
    assert sock.sent == [b"answer"]
    clock.advance(0)  # the turn's own flush finds nothing left
    assert sock.sent == [b"answer"]


def test_other_transports_keep_their_own_write():
    """TLS and the tests' in-memory transports: written at once, as before."""
    transport = StringTransport()
    Outbox(MemoryReactorClock()).writer(transport)(b"x")
    assert transport.value() == b"x"
