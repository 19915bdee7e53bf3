"""Passing TCP sockets between processes' event loops with SCM_RIGHTS, and adopting them.

Sender and listener run on one uvloop event loop here. The descriptors still go through a
real Unix socket, and the connections are real loopback TCP connections.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import uvloop

from conftest import scaled
from ironshadow.broker.config import BrokerConfig
from ironshadow.broker.core import Broker
from ironshadow.broker.message import Message
from ironshadow.cluster.bus import (
    PUBLISH,
    InboundLink,
    decode_message,
    encode_message,
    frame,
)
from ironshadow.cluster.handoff import ClusterConnection, HandoffListener, HandoffSender
from ironshadow.mqtt import (
    MQTT_5,
    Connack,
    Connect,
    PacketDecoder,
    Suback,
    Subscribe,
    Subscription,
)
from ironshadow.mqtt.properties import PropertyId

TIMEOUT_S = 5.0


def run(coroutine: Callable[[], Coroutine[Any, Any, None]]) -> None:
    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(asyncio.wait_for(coroutine(), scaled(TIMEOUT_S)))
    finally:
        loop.close()


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Return (client, accepted) ends of a new loopback TCP connection."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        accepted, _address = server.accept()
    return client, accepted


async def received(items: list[Any], count: int) -> None:
    while len(items) < count:
        await asyncio.sleep(0.01)


def test_handoff_passes_socket_and_bytes(tmp_path: Path) -> None:
    async def scenario() -> None:
        got: list[tuple[int, bytes]] = []
        listener = HandoffListener(
            str(tmp_path / "handoff.sock"), lambda fd, data: got.append((fd, data))
        )
        listener.start()
        sender = HandoffSender(str(tmp_path / "handoff.sock"))
        pairs = [tcp_pair() for _ in range(3)]
        try:
            for number, (_client, accepted) in enumerate(pairs):
                assert sender.send(accepted.fileno(), f"saved-{number}".encode() * 1000)
                # The sender's copy closes at once, as a worker's transport does.
                accepted.close()
            await received(got, 3)
            assert [data for _fd, data in got] == [
                f"saved-{number}".encode() * 1000 for number in range(3)
            ]
            for number, (fd, _data) in enumerate(got):
                adopted = socket.socket(fileno=fd)
                adopted.setblocking(True)
                client = pairs[number][0]
                # Records and descriptors stay paired: descriptor n is connection n.
                client.sendall(f"ping-{number}".encode())
                assert adopted.recv(100) == f"ping-{number}".encode()
                adopted.sendall(b"pong")
                assert client.recv(100) == b"pong"
                adopted.close()
        finally:
            sender.close()
            listener.close()
            for client, _accepted in pairs:
                client.close()

    run(scenario)


def test_handoff_burst_waits_for_a_full_socket(tmp_path: Path) -> None:
    """A burst larger than the Unix socket's buffer, sent without yielding to the event loop,
    is queued, not refused: every connection reaches the listener, paired with its bytes.
    The sender counts the queued hand-offs, whose descriptors it holds, and reports when
    they are sent."""
    count = 2_000

    async def scenario() -> None:
        got: list[tuple[int, bytes]] = []
        listener = HandoffListener(
            str(tmp_path / "handoff.sock"), lambda fd, data: got.append((fd, data))
        )
        listener.start()
        sender = HandoffSender(str(tmp_path / "handoff.sock"))
        released: list[int] = []
        sender.released = lambda: released.append(sender.queued)
        clients = []
        with socket.create_server(("127.0.0.1", 0), backlog=count) as server:
            try:
                for number in range(count):
                    client = socket.create_connection(server.getsockname())
                    clients.append(client)
                    accepted, _address = server.accept()
                    saved = f"connect-{number:05d}".encode() * 20
                    assert sender.send(accepted.fileno(), saved), f"hand-off {number} refused"
                    accepted.close()
                assert sender.queued > 0, "the burst fitted in the socket's buffer"
                await received(got, count)
                assert sender.queued == 0
                assert released, "the sender never reported sent hand-offs"
                assert released[-1] == 0
                for number, (fd, data) in enumerate(got):
                    assert data == f"connect-{number:05d}".encode() * 20
                    adopted = socket.socket(fileno=fd)
                    adopted.setblocking(True)
                    clients[number].sendall(b"ping")
                    assert adopted.recv(10) == b"ping"
                    adopted.close()
            finally:
                sender.close()
                listener.close()
                for client in clients:
                    client.close()

    run(scenario)


def test_handoff_without_listener_returns_false(tmp_path: Path) -> None:
    async def scenario() -> None:
        sender = HandoffSender(str(tmp_path / "missing.sock"))
        client, accepted = tcp_pair()
        try:
            assert not sender.send(accepted.fileno(), b"saved")
            # The connection is still usable here, where it stays.
            client.sendall(b"still here")
            assert accepted.recv(100) == b"still here"
        finally:
            sender.close()
            client.close()
            accepted.close()

    run(scenario)


def test_handoff_reconnects_after_listener_restart(tmp_path: Path) -> None:
    async def scenario() -> None:
        path = str(tmp_path / "handoff.sock")
        got: list[tuple[int, bytes]] = []
        listener = HandoffListener(path, lambda fd, data: got.append((fd, data)))
        listener.start()
        sender = HandoffSender(path)
        client, accepted = tcp_pair()
        try:
            assert sender.send(accepted.fileno(), b"first")
            await received(got, 1)
            listener.close()
            listener = HandoffListener(path, lambda fd, data: got.append((fd, data)))
            listener.start()
            await asyncio.sleep(0.05)  # the old connection's end reaches the sender
            assert sender.send(accepted.fileno(), b"second")
            await received(got, 2)
            assert got[1][1] == b"second"
        finally:
            for fd, _data in got:
                os.close(fd)
            sender.close()
            listener.close()
            client.close()
            accepted.close()

    run(scenario)


def test_adopted_connection_replays_saved_bytes() -> None:
    async def scenario() -> None:
        broker = Broker(BrokerConfig(port=0, sys_interval=0))
        client, accepted = tcp_pair()
        saved = Connect("adopted-1", MQTT_5).encode() + Subscribe(
            1, [Subscription("a/b", 1)]
        ).encode(MQTT_5)
        try:
            loop = asyncio.get_running_loop()
            await loop.connect_accepted_socket(
                lambda: ClusterConnection(broker, adopted=saved), accepted
            )
            client.setblocking(False)
            decoder = PacketDecoder(version=MQTT_5)
            packets: list[Any] = []
            while len(packets) < 2:
                try:
                    data = client.recv(4096)
                except BlockingIOError:
                    await asyncio.sleep(0.01)
                    continue
                assert data, "the broker closed the adopted connection"
                packets.extend(decoder.feed(data))
            assert isinstance(packets[0], Connack)
            assert packets[0].reason_code == 0
            assert isinstance(packets[1], Suback)
            assert packets[1].reason_codes == [1]
            assert broker.sessions["adopted-1"].subscriptions.keys() == {"a/b"}
            connection = broker.sessions["adopted-1"].connection
            assert isinstance(connection, ClusterConnection)
            # An adopted connection is never routed again.
            assert connection.early is None
        finally:
            client.close()
            await broker.shutdown()

    run(scenario)


def test_bus_message_round_trip() -> None:
    message = Message(
        "plant/line1",
        b"\x00payload",
        2,
        True,
        {PropertyId.CONTENT_TYPE: "text/plain", PropertyId.USER_PROPERTY: [("k", "v")]},
        "sensor-1",
    )
    body = encode_message(message, 0.0)
    copy = decode_message(body, 0, len(body))
    assert copy.topic == "plant/line1"
    assert copy.payload == b"\x00payload"
    assert copy.qos == 2
    assert copy.retain
    assert copy.origin == "sensor-1"
    assert copy.properties == message.properties
    anonymous = decode_message(*_whole(encode_message(Message("t", b"", 0, False), 0.0)))
    assert anonymous.origin is None
    assert anonymous.properties is None


def _whole(body: bytes) -> tuple[bytes, int, int]:
    return body, 0, len(body)


def test_inbound_link_splits_frames() -> None:
    frames: list[tuple[int | None, int, bytes]] = []
    link = InboundLink(
        lambda link, kind, body, pos, end: frames.append((link.peer, kind, bytes(body[pos:end]))),
        lambda link: None,
    )
    data = frame(0, (2).to_bytes(2, "big")) + frame(PUBLISH, b"abc") + frame(3, b"a/#")
    # Fed one byte at a time, the link must still find every frame boundary.
    for index in range(len(data)):
        link.data_received(data[index : index + 1])
    assert frames == [(2, PUBLISH, b"abc"), (2, 3, b"a/#")]
