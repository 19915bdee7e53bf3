"""MQTT over WebSocket at /mqtt: paho-mqtt's websockets transport and a raw WebSocket client
against a real engine, beside TCP clients on the same broker."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from api_harness import EngineApiThread, running_engine
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from conftest import scaled
from ironshadow.api.mqtt_websocket import MAX_MESSAGE_BYTES
from ironshadow.api.server import MIN_WEBSOCKET_MESSAGE_BYTES
from ironshadow.mqtt import (
    MQTT_3_1_1,
    MQTT_5,
    Connack,
    Connect,
    Disconnect,
    PacketDecoder,
    Pingreq,
    Pingresp,
    Publish,
    ReasonCode,
    Suback,
    Subscribe,
    Subscription,
)
from mqtt_client import V5, V311, TestClient

HOST = "127.0.0.1"


@pytest.fixture
def engine() -> Iterator[EngineApiThread]:
    with running_engine() as thread:
        yield thread


def websocket_client(thread: EngineApiThread, client_id: str, protocol: int = V5) -> TestClient:
    return TestClient(thread.http_port, client_id, protocol, transport="websockets")


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + scaled(timeout)
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


class RawWebSocketClient:
    """An MQTT client that chooses which bytes go in which WebSocket message.

    Packets are encoded and decoded with the project's codec. Nothing is acknowledged or
    sent unless the test sends it.
    """

    def __init__(self, websocket: ClientConnection, version: int) -> None:
        self.websocket = websocket
        self.version = version
        self.decoder = PacketDecoder(version=version)
        self.received: deque[Any] = deque()

    def send(self, *packets: Any) -> None:
        """Send the packets (objects or raw bytes) together in one binary message."""
        self.websocket.send(b"".join(self._encode(packet) for packet in packets))

    def _encode(self, packet: Any) -> bytes:
        return packet if isinstance(packet, bytes) else packet.encode(self.version)

    def connect(self, client_id: str, keep_alive: int = 0) -> Connack:
        self.send(Connect(client_id, self.version, keep_alive=keep_alive))
        return self.receive(Connack)

    def receive(self, expected: type | None = None) -> Any:
        while not self.received:
            message = self.websocket.recv(timeout=scaled(10))
            assert isinstance(message, bytes), f"text message from the broker: {message!r}"
            self.received.extend(self.decoder.feed(message))
        packet = self.received.popleft()
        if expected is not None:
            assert isinstance(packet, expected), f"expected {expected.__name__}: {packet!r}"
        return packet

    def wait_closed(self) -> tuple[list[Any], int | None]:
        """Read until the broker closes, and return the packets before the close and its
        close code."""
        packets = list(self.received)
        self.received.clear()
        try:
            while True:
                message = self.websocket.recv(timeout=scaled(10))
                packets.extend(self.decoder.feed(message))
        except ConnectionClosed as closed:
            return packets, closed.rcvd.code if closed.rcvd is not None else None


@contextlib.contextmanager
def raw_client(
    thread: EngineApiThread, version: int = MQTT_5, **options: Any
) -> Iterator[RawWebSocketClient]:
    url = f"ws://{HOST}:{thread.http_port}/mqtt"
    options.setdefault("compression", None)
    with connect(url, subprotocols=["mqtt"], open_timeout=scaled(10), **options) as websocket:
        assert websocket.subprotocol == "mqtt"
        yield RawWebSocketClient(websocket, version)


# --- paho-mqtt over WebSocket ------------------------------------------------------------


@pytest.mark.parametrize("protocol", [V311, V5], ids=["v311", "v5"])
def test_websocket_and_tcp_clients_exchange_messages(
    engine: EngineApiThread, protocol: int
) -> None:
    over_websocket = websocket_client(engine, "ws-client", protocol)
    over_tcp = TestClient(engine.mqtt_port, "tcp-client", protocol)
    assert over_websocket.subscribe("plant/from-tcp", qos=1)[0] == 1
    assert over_tcp.subscribe("plant/from-ws", qos=1)[0] == 1

    over_tcp.publish("plant/from-tcp", b"to websocket", qos=1)
    over_websocket.publish("plant/from-ws", b"to tcp", qos=1)

    received_by_websocket = over_websocket.expect()
    assert received_by_websocket.topic == "plant/from-tcp"
    assert received_by_websocket.payload == b"to websocket"
    assert received_by_websocket.qos == 1
    received_by_tcp = over_tcp.expect()
    assert received_by_tcp.topic == "plant/from-ws"
    assert received_by_tcp.payload == b"to tcp"
    assert received_by_tcp.qos == 1


def test_websocket_shadow_update_is_accepted(engine: EngineApiThread) -> None:
    device = websocket_client(engine, "press-7")
    prefix = "$aws/things/press-7/shadow"
    device.subscribe(prefix + "/update/accepted", qos=1)
    device.subscribe(prefix + "/update/delta", qos=1)

    device.publish(prefix + "/update", json.dumps({"state": {"desired": {"speed": 3}}}), qos=1)

    accepted = device.expect()
    assert accepted.topic == prefix + "/update/accepted"
    document = json.loads(accepted.payload)
    assert document["state"] == {"desired": {"speed": 3}}
    assert document["version"] == 1
    delta = device.expect()
    assert delta.topic == prefix + "/update/delta"
    assert json.loads(delta.payload)["state"] == {"speed": 3}


def test_websocket_large_message_arrives_whole(engine: EngineApiThread) -> None:
    subscriber = websocket_client(engine, "ws-subscriber")
    publisher = websocket_client(engine, "ws-publisher")
    subscriber.subscribe("bulk", qos=1)
    payload = bytes(range(256)) * (3 * MAX_MESSAGE_BYTES // 256)

    publisher.publish("bulk", payload, qos=1)

    assert subscriber.expect().payload == payload


def test_websocket_client_counts_as_connection(engine: EngineApiThread) -> None:
    before = engine.call(lambda: engine.engine.broker.stats.connections_accepted)
    client = websocket_client(engine, "counted")
    assert client.connack is not None

    def counts() -> tuple[int, bool]:
        broker = engine.engine.broker
        session = broker.sessions.get("counted")
        return broker.stats.connections_accepted, session is not None and bool(session.connection)

    accepted, connected = engine.call(counts)
    assert accepted == before + 1
    assert connected


def test_server_shutdown_sends_disconnect(engine: EngineApiThread) -> None:
    client = websocket_client(engine, "until-shutdown", V5)

    engine.stop()

    assert client.disconnected.wait(scaled(10))
    assert client.disconnect_reason.value == ReasonCode.SERVER_SHUTTING_DOWN


# --- the handshake -------------------------------------------------------------------------


@pytest.mark.parametrize("subprotocols", [None, ["mqttv3.1"]], ids=["none", "other"])
def test_handshake_without_mqtt_subprotocol_is_rejected(
    engine: EngineApiThread, subprotocols: list[str] | None
) -> None:
    url = f"ws://{HOST}:{engine.http_port}/mqtt"
    with (
        pytest.raises(InvalidStatus) as raised,
        connect(url, subprotocols=subprotocols, open_timeout=scaled(10)),
    ):
        pass
    response = raised.value.response
    assert response.status_code == 400
    assert b"'mqtt' subprotocol" in response.body


def test_connection_over_limit_is_closed_with_1013() -> None:
    with running_engine(max_connections=1) as thread:
        TestClient(thread.mqtt_port, "takes-the-only-slot")
        with raw_client(thread) as client:
            packets, code = client.wait_closed()
        rejected = thread.call(lambda: thread.engine.broker.stats.connections_rejected)

    assert packets == []
    assert code == 1013
    assert rejected == 1


def test_per_address_limit_counts_websockets() -> None:
    with running_engine(max_connections_per_address=1) as thread:
        # The TCP client and the WebSocket client both come from 127.0.0.1.
        TestClient(thread.mqtt_port, "takes-the-address-slot")
        with raw_client(thread) as client:
            packets, code = client.wait_closed()
        trips = thread.call(
            lambda: thread.engine.broker.stats.limit_trips["max_connections_per_address"]
        )

    assert packets == []
    assert code == 1013
    assert trips == 1


# --- framing -----------------------------------------------------------------------------


def test_packets_split_and_joined_across_messages(engine: EngineApiThread) -> None:
    with raw_client(engine) as client:
        connect_packet = Connect("split", MQTT_5).encode()
        # One packet over three messages, the first holding only the packet type.
        client.send(connect_packet[:1])
        client.send(connect_packet[1:5])
        client.send(connect_packet[5:])
        connack = client.receive(Connack)
        # Two packets in one message.
        client.send(Subscribe(1, [Subscription("split/topic", 1)]), Pingreq())
        suback = client.receive(Suback)
        pingresp = client.receive()

    assert connack.reason_code == 0
    assert suback.reason_codes == [1]
    assert isinstance(pingresp, Pingresp)


def test_message_over_limit_closes_with_1009() -> None:
    with running_engine(max_packet_size=1000) as thread, raw_client(thread) as client:
        client.connect("big-message")
        # Small packets, but too many for one message.
        pings = Pingreq().encode(MQTT_5) * (MIN_WEBSOCKET_MESSAGE_BYTES // 2 + 1)
        client.send(pings)
        packets, code = client.wait_closed()

    assert packets == []
    assert code == 1009


def test_text_message_closes_connection(engine: EngineApiThread) -> None:
    with raw_client(engine) as client:
        client.connect("sends-text")
        client.websocket.send("not a binary message")
        packets, code = client.wait_closed()

    assert code == 1003
    assert len(packets) == 1
    assert isinstance(packets[0], Disconnect)
    assert packets[0].reason_code == ReasonCode.PROTOCOL_ERROR


def test_malformed_packet_closes_only_that_connection(engine: EngineApiThread) -> None:
    bystander = websocket_client(engine, "bystander")
    bystander.subscribe("still/working", qos=1)
    errors_before = engine.call(lambda: engine.engine.broker.stats.protocol_errors)

    with raw_client(engine) as client:
        client.connect("malformed")
        # Packet type 0 is reserved.
        client.send(b"\x00\x00")
        packets, code = client.wait_closed()

    assert code == 1000
    assert len(packets) == 1
    assert isinstance(packets[0], Disconnect)
    assert packets[0].reason_code == ReasonCode.MALFORMED_PACKET
    errors = engine.call(lambda: engine.engine.broker.stats.protocol_errors)
    assert errors == errors_before + 1
    TestClient(engine.mqtt_port, "publisher").publish("still/working", b"yes", qos=1)
    assert bystander.expect().payload == b"yes"


@pytest.mark.parametrize("version", [MQTT_3_1_1, MQTT_5], ids=["v311", "v5"])
def test_keep_alive_closes_idle_client(engine: EngineApiThread, version: int) -> None:
    with raw_client(engine, version) as client:
        assert client.connect("idle", keep_alive=1).reason_code == 0
        packets, code = client.wait_closed()

    assert code == 1000
    if version == MQTT_5:
        assert len(packets) == 1
        assert packets[0].reason_code == ReasonCode.KEEP_ALIVE_TIMEOUT
    else:
        assert packets == []


# --- flow control --------------------------------------------------------------------------


def test_broker_pause_stops_reading_websocket_clients(engine: EngineApiThread) -> None:
    subscriber = TestClient(engine.mqtt_port, "tcp-subscriber")
    subscriber.subscribe("paused/topic", qos=0)
    publisher = websocket_client(engine, "ws-publisher")
    broker = engine.engine.broker

    engine.call(broker.pause_reading)
    publisher.publish("paused/topic", b"held back", qos=0)
    subscriber.expect_none(0.5)
    engine.call(broker.resume_reading)

    assert subscriber.expect().payload == b"held back"


def test_client_that_stops_reading_has_bounded_buffer(engine: EngineApiThread) -> None:
    broker = engine.engine.broker
    high_water = broker.config.write_high_water
    endpoint = engine.api.app.state.mqtt_websockets
    payload = b"\x5a" * 20_000
    # A small receive buffer and a one-message queue make the client stop reading soon.
    sock = socket.create_connection((HOST, engine.http_port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    with raw_client(engine, sock=sock, max_queue=1) as client:
        client.connect("stops-reading")
        client.send(Subscribe(1, [Subscription("flood/#", 0)]))
        client.receive(Suback)
        publisher = TestClient(engine.mqtt_port, "flooder")

        def dropped() -> int:
            return engine.call(lambda: broker.stats.publish_dropped)

        for _ in range(20):
            for _ in range(50):
                publisher.publish("flood/data", payload, qos=0)
            if wait_until(lambda: dropped() > 0, timeout=1.0):
                break
        buffered = engine.call(
            lambda: max(transport.get_write_buffer_size() for transport in endpoint.transports)
        )

    assert dropped() > 0
    # At most one flush of packets goes past the high-water mark.
    assert buffered <= 2 * high_water + len(payload) + 100


def test_publishes_from_websocket_are_counted(engine: EngineApiThread) -> None:
    with raw_client(engine) as client:
        client.connect("counted-publisher")
        before = engine.call(lambda: engine.engine.broker.stats.publish_received)
        client.send(Publish("counted/topic", b"1"), Publish("counted/topic", b"2"))
        client.send(Pingreq())
        client.receive(Pingresp)
        after = engine.call(lambda: engine.engine.broker.stats.publish_received)

    assert after == before + 2
