"""One request through the proxy, phase by phase, without sockets: a client channel from
``ProxySite`` on a StringTransport, backends as ``UpstreamConnection``s on StringTransports
handed out by a fake pool, and a MemoryReactorClock for the timeouts."""

from __future__ import annotations

from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.python.failure import Failure

from tests.integration.harness import parse_response
from tests.test_proxy import GET, OK, Setup, responses

POST = b"POST /up HTTP/1.1\r\nHost: front\r\nContent-Length: 6\r\n\r\n"
UPGRADE = (b"GET /ws HTTP/1.1\r\nHost: front\r\nConnection: Upgrade\r\n"
           b"Upgrade: websocket\r\n\r\n")


def lose(connection, reason=ConnectionLost) -> None:
    connection.connectionLost(Failure(reason()))


# -- the ordinary path ------------------------------------------------------------------------


def test_get_goes_to_a_backend_and_its_response_comes_back():
    setup = Setup()
    client = setup.client(GET)
    backend = setup.complete_connect()
    sent = backend.transport.value()
    assert sent.startswith(b"GET /x HTTP/1.1\r\nHost: front\r\n")
    assert b"X-Forwarded-For: 10.0.0.1\r\n" in sent and b"X-Forwarded-Host: front\r\n" in sent
    backend.dataReceived(OK)
    response = parse_response(client.value())
    assert response.status == 200 and response.body == b"ok"
    assert response.header(b"x-request-id")
    assert setup.upstreams.released == [backend]
    assert setup.proxy.active == 0 and setup.passive.successes == 1
    assert setup.pool.backends[0].in_flight == 0


def test_kept_alive_connection_is_reused():
    setup = Setup()
    idle = setup.put_idle(setup.pool.backends[0])
    client = setup.client(GET)
    assert not setup.upstreams.connects
    idle.dataReceived(OK)
    assert responses(client.value()) == [b"HTTP/1.1 200 OK"]


def test_body_sent_before_the_connection_is_buffered_then_streamed():
    setup = Setup()
    client = setup.client(POST + b"abc")
    assert client.producerState == "paused"
    client.channel.dataReceived(b"def")
    backend = setup.complete_connect()
    assert backend.transport.value().endswith(b"\r\n\r\nabcdef")
    assert client.producerState == "producing"
    backend.dataReceived(OK)
    assert responses(client.value()) == [b"HTTP/1.1 200 OK"]


def test_chunked_upload_streams_as_it_arrives_with_backpressure():
    setup = Setup()
    client = setup.client(b"POST /up HTTP/1.1\r\nHost: front\r\n"
                          b"Transfer-Encoding: chunked\r\n\r\n")
    backend = setup.complete_connect()
    backend.transport.producer.pauseProducing()  # the backend socket is full
    client.channel.dataReceived(b"3\r\nabc\r\n")
    assert client.producerState == "paused"
    assert backend.transport.value().endswith(b"3\r\nabc\r\n")
    backend.transport.producer.resumeProducing()
    client.channel.dataReceived(b"0\r\n\r\n")
    assert backend.transport.value().endswith(b"0\r\n\r\n")
    assert backend.transport.producer is None
    backend.dataReceived(OK)
    assert responses(client.value()) == [b"HTTP/1.1 200 OK"]


def test_response_before_the_whole_upload_closes_the_client_connection():
    setup = Setup()
    client = setup.client(POST + b"ab")
    backend = setup.complete_connect()
    backend.dataReceived(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n")
    assert responses(client.value()) == [b"HTTP/1.1 413 Too Large"]
    assert client.disconnecting


# -- failures and retries ------------------------------------------------------------------------


def test_no_healthy_backend_is_503():
    setup = Setup()
    for backend in setup.pool.backends:
        setup.pool.set_healthy(backend, False, "test")
    client = setup.client(GET)
    response = parse_response(client.value())
    assert response.status == 503 and response.header(b"retry-after") == [b"1"]
    assert setup.stats.errors == 1


def test_every_backend_refusing_is_502_after_the_retries():
    setup = Setup(retries=1)
    client = setup.client(GET)
    for _ in range(2):
        setup.upstreams.connects[-1][1].errback(Failure(ConnectionRefusedError()))
    response = parse_response(client.value())
    assert response.status == 502 and b"no backend could be reached" in response.body
    assert setup.stats.retries == 1 and len(setup.passive.failures) == 2


def test_invalid_response_is_502_and_retried_for_get():
    setup = Setup(retries=0)
    client = setup.client(GET)
    setup.complete_connect().dataReceived(b"NOT HTTP\r\n\r\n")
    response = parse_response(client.value())
    assert response.status == 502 and b"not valid HTTP" in response.body
    assert setup.pool.backends[0].failures == 1


def test_backend_closing_before_answering_a_post_is_502():
    setup = Setup()
    client = setup.client(POST + b"abcdef")
    lose(setup.complete_connect())
    response = parse_response(client.value())
    assert response.status == 502 and b"failed before answering" in response.body
    assert len(setup.upstreams.connects) == 1


def test_backend_breaking_off_its_response_aborts_the_client():
    setup = Setup()
    client = setup.client(GET)
    backend = setup.complete_connect()
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    lose(backend)
    assert client.disconnected or client.disconnecting
    assert setup.pool.backends[0].failures == 1 and setup.proxy.active == 0


# -- timeouts ---------------------------------------------------------------------------------


def test_backend_silent_past_the_response_timeout_is_504():
    setup = Setup()
    client = setup.client(GET)
    backend = setup.complete_connect()
    setup.clock.advance(setup.config.timeouts.response)
    response = parse_response(client.value())
    assert response.status == 504 and b"did not answer in time" in response.body
    assert backend.transport.disconnecting or backend.transport.disconnected
    assert setup.pool.backends[0].failures == 1


def test_response_that_keeps_coming_is_not_cut_but_one_gone_idle_is():
    setup = Setup()
    client = setup.client(GET)
    backend = setup.complete_connect()
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab")
    idle = setup.config.timeouts.idle
    setup.clock.advance(idle - 1)
    backend.dataReceived(b"cd")
    setup.clock.advance(idle - 1)  # progress since armed: re-armed, not cut
    assert not client.disconnecting
    setup.clock.advance(idle)
    assert client.disconnected or client.disconnecting
    assert setup.pool.backends[0].failures == 1


# -- the client going away -------------------------------------------------------------------


def test_client_lost_while_connecting_cancels_without_blaming_the_backend():
    setup = Setup()
    client = setup.client(GET)
    client.channel.connectionLost(Failure(ConnectionDone()))
    assert setup.upstreams.connects[0][1].called  # cancelled
    assert setup.passive.failures == [] and setup.proxy.active == 0
    assert setup.pool.backends[0].in_flight == 0
    assert setup.access[-1]["status"] == 499


def test_client_lost_mid_response_aborts_the_backend():
    setup = Setup()
    client = setup.client(GET)
    backend = setup.complete_connect()
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab")
    client.channel.connectionLost(Failure(ConnectionDone()))
    assert backend.transport.disconnected or backend.transport.disconnecting
    assert setup.pool.backends[0].failures == 0 and setup.proxy.active == 0


def test_connection_made_after_the_client_left_goes_back_to_the_pool():
    setup = Setup()
    client = setup.client(GET)
    backend_d = setup.upstreams.connects[0][1]
    exchange = client.channel.requests[0].exchange
    exchange.finish()
    connection = setup.backend_connection()
    backend_d.callback(connection)
    assert setup.upstreams.released == [connection]


def test_wait_idle_fires_when_the_last_exchange_ends():
    setup = Setup()
    client = setup.client(GET)
    waiter = setup.proxy.wait_idle()
    assert not waiter.called
    setup.complete_connect().dataReceived(OK)
    assert waiter.called
    assert setup.proxy.wait_idle().called
    assert responses(client.value()) == [b"HTTP/1.1 200 OK"]


# -- upgrades ---------------------------------------------------------------------------------


def test_upgrade_joins_the_two_connections_until_the_backend_closes():
    setup = Setup()
    client = setup.client(UPGRADE)
    backend = setup.complete_connect()
    assert b"Connection: Upgrade\r\nUpgrade: websocket\r\n" in backend.transport.value()
    backend.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                         b"Upgrade: websocket\r\n\r\nhello")
    head, _, rest = client.value().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"X-Request-ID: " in head and rest == b"hello"
    backend.transport.clear()
    client.channel.dataReceived(b"\x81\x01x")  # the client's frames go to the backend as-is
    assert backend.transport.value() == b"\x81\x01x"
    setup.clock.advance(setup.config.timeouts.response * 10)  # no timeout in a tunnel
    backend.dataReceived(b"more")
    assert client.value().endswith(b"hellomore")
    lose(backend, ConnectionDone)
    assert client.disconnecting
    assert setup.proxy.active == 0 and setup.access[-1]["status"] == 101


def test_bytes_the_client_sent_after_the_upgrade_request_go_first():
    """The channel had buffered them, unparsed; the tunnel sends them on before any other."""
    setup = Setup()
    client = setup.client(UPGRADE)
    client.channel.dataReceived(b"early")
    backend = setup.complete_connect()
    backend.transport.clear()
    backend.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nX-Request-ID: mine\r\n\r\n")
    assert backend.transport.value() == b"early"
    assert client.value().count(b"X-Request-ID") == 1


def test_tunnel_failing_aborts_the_client():
    setup = Setup()
    client = setup.client(UPGRADE)
    backend = setup.complete_connect()
    backend.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
    backend.handler.response_failed(Failure(ConnectionLost()), True)
    assert client.disconnected or client.disconnecting
    assert setup.proxy.active == 0


# -- the response head ------------------------------------------------------------------------


def relayed_head(response: bytes) -> bytes:
    """The response head a client gets for a GET the backend answers with ``response``."""
    setup = Setup()
    client = setup.client(GET)
    setup.complete_connect().dataReceived(response)
    return client.value().split(b"\r\n\r\n", 1)[0]


def test_fields_the_backend_names_in_connection_do_not_reach_the_client():
    head = relayed_head(
        b"HTTP/1.1 200 OK\r\nConnection: X-Private, Content-Length\r\nX-Private: s\r\n"
        b"X-Request-ID: theirs\r\nContent-Length: 2\r\n\r\nok")
    assert b"X-Private" not in head and b"Connection:" not in head
    assert b"Content-Length" not in head and b"Transfer-Encoding: chunked" in head
    assert head.count(b"X-Request-ID") == 1 and b"X-Request-ID: theirs" in head


def test_fields_named_in_every_connection_field_stay_behind():
    """Two ``Connection`` fields are one list (RFC 9110 5.3): what either names goes."""
    head = relayed_head(
        b"HTTP/1.1 200 OK\r\nConnection: X-One\r\nConnection: keep-alive, X-Two\r\n"
        b"X-One: 1\r\nX-Two: 2\r\nX-Three: 3\r\nContent-Length: 2\r\n\r\nok")
    assert b"X-One" not in head and b"X-Two" not in head and b"X-Three: 3" in head


def test_204_never_carries_content_length():
    setup = Setup()
    client = setup.client(GET)
    setup.complete_connect().dataReceived(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
    assert b"Content-Length" not in client.value()


def test_a_route_removing_every_field_leaves_a_well_formed_head():
    setup = Setup()
    client = setup.client(GET)
    backend = setup.complete_connect()
    backend.handler.exchange.route = RemovesEverything()
    backend.dataReceived(b"HTTP/1.1 204 No Content\r\nX-Request-ID: theirs\r\n\r\n")
    assert client.value() == b"HTTP/1.1 204 No Content\r\n\r\n"
    assert setup.upstreams.released == [backend]


class RemovesEverything:
    """A route whose response rewrite removes every field (X-Request-ID included)."""

    rewrites_response = True

    def rewrite_response(self, fields):
        return []


def test_admission_fields_replace_the_backends_own():
    setup = Setup()
    setup.proxy.configure(setup.config, OwnFields())
    client = setup.client(GET)
    setup.complete_connect().dataReceived(
        b"HTTP/1.1 200 OK\r\nX-Limit: backend\r\nContent-Length: 2\r\n\r\nok")
    head = client.value().split(b"\r\n\r\n", 1)[0]
    assert b"X-Limit: backend" not in head and b"X-Limit: ours" in head


class OwnFields:
    """An admission that admits all and writes one field of its own."""

    owned_fields = frozenset({b"x-limit"})

    def admit(self, exchange) -> None:
        exchange.limit_lines = b"X-Limit: ours\r\n"
        exchange.dispatch()
