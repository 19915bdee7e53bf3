"""A discard server: the least an MQTT server can do, to measure the generator's own ceiling.

It accepts every CONNECT, acknowledges QoS 1 PUBLISH and SUBSCRIBE, answers PINGREQ, and
throws the messages away. Once a second it sends the count of PUBLISH packets received as
``$SYS/broker/publish/messages/received`` to the clients that subscribed to it, so the swarm
measures it exactly as it measures a real broker. It is a measuring tool, not a broker: it
routes nothing and checks packets only as far as it must to frame them.
"""

from __future__ import annotations

import asyncio
import resource
import socket
from multiprocessing.connection import Connection

from ironshadow.mqtt import MQTT_3_1_1, Publish

SYS_RECEIVED = "$SYS/broker/publish/messages/received"
_CONNACK = b"\x20\x02\x00\x00"
_PINGRESP = b"\xd0\x00"


class DiscardCounter:
    def __init__(self) -> None:
        self.publish_received = 0
        self.listeners: set[DiscardProtocol] = set()


class DiscardProtocol(asyncio.Protocol):
    def __init__(self, counter: DiscardCounter) -> None:
        self.counter = counter
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.counter.listeners.discard(self)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        position = 0
        replies = []
        while True:
            header = _frame(buffer, position)
            if header is None:
                break
            first_byte, body_start, end = header
            kind = first_byte >> 4
            if kind == 3:  # PUBLISH
                self.counter.publish_received += 1
                if (first_byte >> 1) & 3:
                    topic_length = int.from_bytes(buffer[body_start : body_start + 2], "big")
                    id_at = body_start + 2 + topic_length
                    replies.append(b"\x40\x02" + bytes(buffer[id_at : id_at + 2]))
            elif kind == 1:  # CONNECT
                replies.append(_CONNACK)
            elif kind == 8:  # SUBSCRIBE: grant QoS 0 to each filter
                packet_id = bytes(buffer[body_start : body_start + 2])
                filters = 0
                index = body_start + 2
                while index < end:
                    length = int.from_bytes(buffer[index : index + 2], "big")
                    if buffer[index + 2 : index + 2 + length] == SYS_RECEIVED.encode():
                        self.counter.listeners.add(self)
                    index += 2 + length + 1
                    filters += 1
                replies.append(bytes((0x90, 2 + filters)) + packet_id + b"\x00" * filters)
            elif kind == 12:  # PINGREQ
                replies.append(_PINGRESP)
            elif kind == 14 and self.transport is not None:  # DISCONNECT
                self.transport.close()
            position = end
        del buffer[:position]
        if replies and self.transport is not None:
            self.transport.write(b"".join(replies))


def _frame(buffer: bytearray, position: int) -> tuple[int, int, int] | None:
    """Return (first byte, body start, end) of the packet at ``position``, or None if partial."""
    if len(buffer) - position < 2:
        return None
    length = 0
    shift = 0
    index = position + 1
    while True:
        if index >= len(buffer):
            return None
        byte = buffer[index]
        length |= (byte & 0x7F) << shift
        index += 1
        if not byte & 0x80:
            break
        shift += 7
    end = index + length
    if end > len(buffer):
        return None
    return buffer[position], index, end


async def _serve(sock: socket.socket, ready: Connection) -> None:
    loop = asyncio.get_running_loop()
    counter = DiscardCounter()
    server = await loop.create_server(lambda: DiscardProtocol(counter), sock=sock, backlog=4096)
    ready.send(sock.getsockname()[1])
    async with server:
        while True:
            await asyncio.sleep(1.0)
            packet = Publish(SYS_RECEIVED, str(counter.publish_received).encode()).encode(
                MQTT_3_1_1
            )
            for listener in list(counter.listeners):
                if listener.transport is not None:
                    listener.transport.write(packet)


def run_discard_server(host: str, ready: Connection) -> None:
    """Process entry point: serve on a free port of ``host``; send the port on ``ready``."""
    import uvloop

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(4096)
    sock.setblocking(False)
    uvloop.run(_serve(sock, ready))
