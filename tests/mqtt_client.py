"""A paho-mqtt client wrapper for tests: connect, subscribe, publish and wait, with timeouts."""

from __future__ import annotations

import contextlib
import os
import queue
import socket
import threading
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from conftest import open_clients, scaled

V311 = paho.MQTTv311
V5 = paho.MQTTv5


class TestClient:
    """A real paho-mqtt client on its own network thread; received messages go to a queue."""

    __test__ = False  # not a test class, despite the name

    def __init__(
        self,
        port: int,
        client_id: str = "",
        protocol: int = V5,
        clean: bool = True,
        keepalive: int = 60,
        properties: Properties | None = None,
        will: tuple[str, bytes, int, bool] | None = None,
        will_properties: Properties | None = None,
        connect: bool = True,
        transport: str = "tcp",
        websocket_path: str = "/mqtt",
    ) -> None:
        """``transport="websockets"`` connects to ``websocket_path`` on the HTTP ``port``."""
        self.port = port
        self.protocol = protocol
        kwargs: dict[str, Any] = {}
        if protocol == V311:
            kwargs["clean_session"] = clean
        # No automatic reconnection: a test reconnects explicitly with connect(), and a
        # client closed by the broker must stay closed.
        self.client = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=protocol,
            reconnect_on_failure=False,
            transport=transport,
            **kwargs,
        )
        if transport == "websockets":
            self.client.ws_set_options(path=websocket_path)
        self.messages: queue.Queue[paho.MQTTMessage] = queue.Queue()
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.connack: tuple[Any, Any, Any] | None = None
        self.disconnect_reason: Any = None
        self.subacks: queue.Queue[list[Any]] = queue.Queue()
        self.unsubacks: queue.Queue[Any] = queue.Queue()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_unsubscribe = self._on_unsubscribe
        self.clean = clean
        self.keepalive = keepalive
        self.properties = properties
        if will is not None:
            topic, payload, qos, retain = will
            self.client.will_set(topic, payload, qos, retain, properties=will_properties)
        open_clients.append(self)
        if connect:
            self.connect()

    def connect(self, wait: bool = True) -> None:
        self.connected.clear()
        self.disconnected.clear()
        kwargs: dict[str, Any] = {"keepalive": self.keepalive}
        if self.protocol == V5:
            kwargs["clean_start"] = self.clean
            kwargs["properties"] = self.properties
        # A network thread that ended when the broker closed the connection is still
        # registered until loop_stop(), and loop_start() would not start a new one.
        self.client.loop_stop()
        # NOTE: paho-mqtt 2.2 loop_start() replaces its wake-up socket pair without closing
        # the old one, so a second connect() would leak two sockets. Close them here.
        self.client._reset_sockets(sockpair_only=True)
        self.client.connect("127.0.0.1", self.port, **kwargs)
        self.client.loop_start()
        if wait:
            assert self.connected.wait(scaled(10)), "no CONNACK within 10 s"

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self.connack = (flags, reason, props)
        self.connected.set()

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        self.disconnect_reason = reason
        self.disconnected.set()

    def _on_message(self, client: Any, userdata: Any, message: paho.MQTTMessage) -> None:
        self.messages.put(message)

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        self.subacks.put(list(codes))

    def _on_unsubscribe(self, client: Any, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        self.unsubacks.put(codes)

    def subscribe(self, topic: str, qos: int = 0, **options: Any) -> list[Any]:
        """Subscribe and return the SUBACK reason codes."""
        properties = options.pop("properties", None)
        if self.protocol == V5:
            sub_options = paho.SubscribeOptions(qos=qos, **options)
            self.client.subscribe(topic, options=sub_options, properties=properties)
        else:
            self.client.subscribe(topic, qos)
        return self.subacks.get(timeout=scaled(10))

    def unsubscribe(self, topic: str) -> Any:
        self.client.unsubscribe(topic)
        return self.unsubacks.get(timeout=scaled(10))

    def publish(
        self,
        topic: str,
        payload: bytes | str = b"",
        qos: int = 0,
        retain: bool = False,
        properties: Properties | None = None,
        wait: bool = True,
    ) -> paho.MQTTMessageInfo:
        info = self.client.publish(topic, payload, qos, retain, properties=properties)
        if wait and qos:
            info.wait_for_publish(scaled(10))
        return info

    def expect(self, timeout: float = 5.0) -> paho.MQTTMessage:
        """Return the next message, failing the test if none comes in ``timeout`` seconds."""
        try:
            return self.messages.get(timeout=scaled(timeout))
        except queue.Empty:
            raise AssertionError(f"no message within {timeout} s") from None

    def payloads_until_quiet(self, quiet: float = 0.5) -> list[bytes]:
        """Return the payloads that arrive until none comes for ``quiet`` seconds."""
        payloads = []
        while True:
            try:
                payloads.append(self.messages.get(timeout=scaled(quiet)).payload)
            except queue.Empty:
                return payloads

    def expect_none(self, wait: float = 0.5) -> None:
        try:
            message = self.messages.get(timeout=scaled(wait))
        except queue.Empty:
            return
        raise AssertionError(f"unexpected message on {message.topic!r}: {message.payload!r}")

    def disconnect(self, properties: Properties | None = None, reason: int = 0) -> None:
        if self.protocol == V5:
            self.client.disconnect(ReasonCode(PacketTypes.DISCONNECT, identifier=reason),
                                   properties=properties)
        else:
            self.client.disconnect()
        self.disconnected.wait(scaled(5))
        self.client.loop_stop()

    def drop(self) -> None:
        """Close the socket without DISCONNECT, as a crashed device would."""
        sock = self.client.socket()
        if sock is not None:
            # shutdown() wakes the network thread out of select(), so loop_stop() returns
            # at once. paho's WebSocket wrapper has no shutdown(), so a duplicate of its
            # descriptor is shut down instead, which shuts down the same connection.
            with contextlib.suppress(OSError):
                if isinstance(sock, socket.socket):
                    sock.shutdown(socket.SHUT_RDWR)
                else:
                    with socket.socket(fileno=os.dup(sock.fileno())) as duplicate:
                        duplicate.shutdown(socket.SHUT_RDWR)
        self.client.loop_stop()
        if sock is not None:
            sock.close()

    def close(self) -> None:
        """Disconnect if the network thread runs, then stop it and close the socket."""
        if self.client.is_connected():
            # DISCONNECT wakes the network thread, which would otherwise finish its 1 s
            # select() before loop_stop() returns.
            self.client.disconnect()
        self.drop()


def properties(packet_type: int, **values: Any) -> Properties:
    """Build paho Properties, e.g. ``properties(PacketTypes.CONNECT, SessionExpiryInterval=5)``."""
    props = Properties(packet_type)
    for name, value in values.items():
        setattr(props, name, value)
    return props
