"""A raw MQTT client on a plain socket, for packet-level tests that paho-mqtt cannot produce.

It encodes and decodes with the project's own codec, acknowledges nothing by itself and
never sends PINGREQ, so a test controls every byte that goes to the broker.
"""

from __future__ import annotations

import socket
import time
from collections import deque
from typing import Any

from conftest import open_clients, scaled
from ironshadow.mqtt import (
    MQTT_5,
    Connack,
    Connect,
    Packet,
    PacketDecoder,
    Publish,
    Suback,
    Subscribe,
    Subscription,
    Will,
)


class RawClient:
    """One TCP connection to the broker that sends and receives whole packets."""

    def __init__(
        self, port: int, version: int = MQTT_5, receive_buffer: int = 0, source: str = ""
    ) -> None:
        """``source`` is a loopback address to connect from, such as 127.0.0.2."""
        self.version = version
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        open_clients.append(self)
        if receive_buffer:
            # Set before connect() so that the TCP window is small from the first segment.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        if source:
            self.sock.bind((source, 0))
        self.sock.connect(("127.0.0.1", port))
        self.decoder = PacketDecoder(version=version)
        self.received: deque[Packet] = deque()
        self.closed = False

    def send(self, *packets: Any) -> None:
        """Send packet objects (encoded for this client's version) or raw bytes."""
        data = b"".join(
            packet if isinstance(packet, bytes) else packet.encode(self.version)
            for packet in packets
        )
        self.sock.sendall(data)

    def connect(
        self,
        client_id: str,
        clean_start: bool = True,
        keep_alive: int = 0,
        properties: dict[int, Any] | None = None,
        will: Will | None = None,
    ) -> Connack:
        """Send CONNECT and return the CONNACK."""
        self.send(
            Connect(
                client_id,
                self.version,
                clean_start,
                keep_alive,
                will=will,
                properties=properties or {},
            )
        )
        return self.receive(Connack)

    def subscribe(
        self,
        topic_filter: str,
        qos: int = 0,
        packet_id: int = 1,
        properties: dict[int, Any] | None = None,
        **options: Any,
    ) -> Suback:
        """Subscribe to one filter and return the SUBACK."""
        subscription = Subscription(topic_filter, qos, **options)
        self.send(Subscribe(packet_id, [subscription], properties or {}))
        return self.receive(Suback)

    def _read(self, timeout: float) -> bool:
        """Read once from the socket. Return False if nothing arrived within ``timeout``."""
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return False
        except ConnectionResetError:
            data = b""
        if not data:
            self.closed = True
            return True
        self.received.extend(self.decoder.feed(data))
        return True

    def receive(self, expected: type | None = None, timeout: float = 5.0) -> Any:
        """Return the next packet, failing if none comes in ``timeout`` seconds or it is not
        of the ``expected`` class."""
        deadline = time.monotonic() + scaled(timeout)
        while not self.received:
            if self.closed:
                raise AssertionError("the broker closed the connection")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no packet within {timeout} s")
            self._read(remaining)
        packet = self.received.popleft()
        if expected is not None and not isinstance(packet, expected):
            raise AssertionError(f"expected {expected.__name__}, received {packet!r}")
        return packet

    def receive_publishes(self, count: int, timeout: float = 5.0) -> list[Publish]:
        return [self.receive(Publish, timeout) for _ in range(count)]

    def receive_none(self, wait: float = 0.5) -> None:
        """Fail if any packet arrives within ``wait`` seconds."""
        deadline = time.monotonic() + scaled(wait)
        while not self.received and not self.closed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._read(remaining)
        if self.received:
            raise AssertionError(f"unexpected packet {self.received[0]!r}")

    def wait_closed(self, timeout: float = 5.0) -> list[Packet]:
        """Wait for the broker to close the connection and return the packets sent before.

        Fails if the connection is still open after ``timeout`` seconds.
        """
        deadline = time.monotonic() + scaled(timeout)
        while not self.closed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"the connection is still open after {timeout} s")
            self._read(remaining)
        packets = list(self.received)
        self.received.clear()
        return packets

    def is_open(self, wait: float = 0.0) -> bool:
        """Read what arrives within ``wait`` seconds. Return False if the broker closed."""
        deadline = time.monotonic() + wait
        while not self.closed:
            self._read(deadline - time.monotonic())
            if time.monotonic() >= deadline:
                break
        return not self.closed

    def close(self) -> None:
        """Close the socket without DISCONNECT."""
        self.sock.close()
