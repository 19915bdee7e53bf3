"""Admission control: the connection limit, the CONNECT rate and the CONNECT timeout."""

from __future__ import annotations

import selectors
import time

import pytest

from conftest import CONNECT_RATE_SHARE, scaled
from ironshadow.broker import core
from ironshadow.mqtt import (
    MQTT_3_1_1,
    Connack,
    Connect,
    Disconnect,
    Puback,
    Publish,
    Suback,
    Subscribe,
    Subscription,
)
from ironshadow.mqtt.properties import PropertyId
from ironshadow.mqtt.reason_codes import ReasonCode
from mqtt_client import TestClient
from raw_client import RawClient


def test_extra_connection_rejected(make_broker):
    broker = make_broker(max_connections=2)
    TestClient(broker.port, "first")
    TestClient(broker.port, "second")
    extra = RawClient(broker.port)
    connack = extra.connect("third")
    assert connack.reason_code == ReasonCode.SERVER_BUSY
    reason = connack.properties[PropertyId.REASON_STRING]
    assert "the maximum is 2" in reason
    assert "only a client whose previous connection is still open may connect" in reason
    assert extra.wait_closed() == []
    assert rejected_connections(broker) == 1


def test_extra_connection_rejected_v311(make_broker):
    broker = make_broker(max_connections=1)
    TestClient(broker.port, "first")
    extra = RawClient(broker.port, MQTT_3_1_1)
    assert extra.connect("second").reason_code == 3  # Server unavailable
    assert extra.wait_closed() == []


def test_takeover_at_the_limit(make_broker):
    """A device that reconnects while its old connection still occupies a place (the
    engine did not see the network drop) takes that place over at the limit."""
    broker = make_broker(max_connections=2)
    old = RawClient(broker.port)
    assert old.connect("press-1", keep_alive=60).reason_code == ReasonCode.SUCCESS
    TestClient(broker.port, "press-2")

    new = RawClient(broker.port)
    assert new.connect("press-1", keep_alive=60).reason_code == ReasonCode.SUCCESS
    packets = old.wait_closed()
    assert len(packets) == 1
    assert isinstance(packets[0], Disconnect)
    assert packets[0].reason_code == ReasonCode.SESSION_TAKEN_OVER
    assert new.is_open(wait=0.2)
    assert open_connections(broker) == 2
    # The new connection has taken the old one's place, so the limit is still reached.
    other = RawClient(broker.port)
    assert other.connect("press-3").reason_code == ReasonCode.SERVER_BUSY
    assert rejected_connections(broker) == 1


def test_silent_socket_over_the_limit_closed(make_broker):
    broker = make_broker(max_connections=1)
    TestClient(broker.port, "first")
    late = RawClient(broker.port)
    # It may still send CONNECT, for OVER_LIMIT_CONNECT_TIMEOUT.
    assert late.is_open(wait=0.2)
    assert late.wait_closed(timeout=scaled(5)) == []
    assert rejected_connections(broker) == 1
    assert open_connections(broker) == 1


def test_place_freed_before_connect(make_broker):
    """A connection accepted over the limit gets a place that frees up before its CONNECT."""
    broker = make_broker(max_connections=1)
    first = RawClient(broker.port)
    assert first.connect("first").reason_code == ReasonCode.SUCCESS
    waiting = RawClient(broker.port)
    assert waiting.is_open(wait=0.2)
    first.close()
    deadline = time.monotonic() + scaled(5)
    while open_connections(broker) > 1:
        assert time.monotonic() < deadline, "the first connection stayed open"
        time.sleep(0.01)
    assert waiting.connect("second").reason_code == ReasonCode.SUCCESS
    # It has the only place now.
    assert RawClient(broker.port).connect("third").reason_code == ReasonCode.SERVER_BUSY


@pytest.mark.one_process("each worker keeps its own connections over the limit")
def test_connections_over_the_limit_bounded(make_broker):
    broker = make_broker(max_connections=1)
    engine = broker.engines[0]
    room = engine.call(lambda: engine.broker.max_over_limit)
    # As many as the open-file limit leaves, and at least MIN_OVER_LIMIT.
    assert room >= core.MIN_OVER_LIMIT
    engine.call(lambda: setattr(engine.broker, "max_over_limit", 1))
    TestClient(broker.port, "first")
    waiting = RawClient(broker.port)
    assert waiting.is_open(wait=0.2)
    # Closed at accept, well before OVER_LIMIT_CONNECT_TIMEOUT.
    started = time.monotonic()
    assert RawClient(broker.port).wait_closed() == []
    assert time.monotonic() - started < core.OVER_LIMIT_CONNECT_TIMEOUT
    assert waiting.connect("first").reason_code == ReasonCode.SUCCESS


def test_room_over_the_limit_per_worker(make_broker, workers):
    """Connections may wait over --max-connections in the descriptors that the engine's
    limit leaves: a worker has about its share of the engine's connections."""
    broker = make_broker(max_connections=3000)
    share = 3000 // workers
    for engine in broker.engines:
        room = engine.call(lambda engine=engine: engine.broker.max_over_limit)
        assert room == max(core.MIN_OVER_LIMIT, core.default_max_connections() - share)


def rejected_connections(broker) -> int:
    return sum(
        engine.call(lambda engine=engine: engine.broker.stats.connections_rejected)
        for engine in broker.engines
    )


def test_slot_freed_after_disconnect(make_broker):
    broker = make_broker(max_connections=1)
    first = TestClient(broker.port, "first")
    first.disconnect()
    # The client closes its socket without waiting for the engine to see the close.
    deadline = time.monotonic() + scaled(5)
    while open_connections(broker):
        assert time.monotonic() < deadline, "the first connection stayed open"
        time.sleep(0.01)
    second = TestClient(broker.port, "second")
    assert second.client.is_connected()


def test_each_connection_accepted_once(make_broker):
    broker = make_broker()
    clients = [TestClient(broker.port, f"device-{number}") for number in range(6)]
    assert all(client.client.is_connected() for client in clients)
    # With several workers, a connection passed to its owner counts on the one that
    # accepted it only.
    accepted = sum(
        engine.call(lambda engine=engine: engine.broker.stats.connections_accepted)
        for engine in broker.engines
    )
    assert accepted == 6


def open_connections(broker) -> int:
    return sum(
        engine.call(lambda engine=engine: len(engine.broker.connections))
        for engine in broker.engines
    )


def test_limit_counts_open_sockets(make_broker):
    broker = make_broker(max_connections=1)
    # A socket that has not sent CONNECT yet already takes the only slot.
    silent = RawClient(broker.port)
    assert silent.is_open(wait=0.1)
    late = RawClient(broker.port)
    assert late.connect("late").reason_code == ReasonCode.SERVER_BUSY


def connect_all(clients: list[RawClient]) -> list[float]:
    """Send CONNECT on every client in order and return the time each CONNACK arrived."""
    for index, client in enumerate(clients):
        client.send(Connect(f"storm{index}", 5))
    arrived: dict[int, float] = {}
    with selectors.DefaultSelector() as selector:
        for index, client in enumerate(clients):
            selector.register(client.sock, selectors.EVENT_READ, index)
        deadline = time.monotonic() + scaled(10)
        while len(arrived) < len(clients) and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=0.1):
                index = key.data
                clients[index].receive(Connack)
                arrived[index] = time.monotonic()
                selector.unregister(key.fileobj)
    assert len(arrived) == len(clients), f"{len(clients) - len(arrived)} CONNACKs missing"
    return [arrived[index] for index in range(len(clients))]


@CONNECT_RATE_SHARE
def test_connect_rate_serves_everyone(make_broker):
    broker = make_broker(connect_rate=20)
    clients = [RawClient(broker.port) for _ in range(30)]
    started = time.monotonic()
    arrived = connect_all(clients)
    # At most one second's worth (20) is admitted at once, so 30 take at least 0.5 s.
    assert arrived[-1] - started > 0.45
    assert broker.call(lambda: len(broker.broker.sessions)) == 30


@CONNECT_RATE_SHARE
def test_connect_rate_keeps_arrival_order(make_broker):
    broker = make_broker(connect_rate=20)
    clients = [RawClient(broker.port) for _ in range(30)]
    arrived = connect_all(clients)
    assert arrived == sorted(arrived)


@CONNECT_RATE_SHARE
def test_connected_clients_served_during_storm(make_broker):
    broker = make_broker(connect_rate=5)
    subscriber = TestClient(broker.port, "sub")
    subscriber.subscribe("s/t", 1)
    publisher = TestClient(broker.port, "pub")
    storm = [RawClient(broker.port) for _ in range(15)]
    for index, client in enumerate(storm):
        client.send(Connect(f"storm{index}", 5))
    publisher.publish("s/t", b"still flowing", 1)
    assert subscriber.expect(timeout=1).payload == b"still flowing"
    assert broker.call(lambda: broker.broker.admission_queue_length) > 0


@CONNECT_RATE_SHARE
def test_pipelined_packets_wait_for_admission(make_broker):
    # The token bucket starts empty, and "first" takes the token of the first 0.25 s.
    broker = make_broker(connect_rate=4)
    RawClient(broker.port).connect("first")
    client = RawClient(broker.port)
    # A client may send packets right after CONNECT, before its CONNACK.
    client.send(
        Connect("second", 5),
        Subscribe(1, [Subscription("s/t", 1)]),
        Publish("s/t", b"to myself", qos=1, packet_id=2),
    )
    assert isinstance(client.receive(Connack, timeout=3), Connack)
    assert isinstance(client.receive(Suback), Suback)
    replies = {type(client.receive()), type(client.receive())}
    assert replies == {Puback, Publish}


def test_silent_socket_closed_after_timeout(make_broker):
    broker = make_broker(connect_timeout=0.5)
    silent = RawClient(broker.port)
    started = time.monotonic()
    assert silent.wait_closed(timeout=2) == []
    assert time.monotonic() - started >= 0.5


def test_connect_timeout_spares_connected(make_broker):
    broker = make_broker(connect_timeout=0.5)
    client = RawClient(broker.port)
    client.connect("dev")
    assert client.is_open(wait=1.2)


def test_partial_connect_still_times_out(make_broker):
    broker = make_broker(connect_timeout=0.5)
    client = RawClient(broker.port)
    client.send(Connect("dev", 5).encode()[:5])
    assert client.wait_closed(timeout=2) == []
