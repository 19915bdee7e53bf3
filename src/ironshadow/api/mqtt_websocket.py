"""MQTT over WebSocket at ``/mqtt``: the broker's own connection logic on a WebSocket.

:class:`WebSocketTransport` looks like an asyncio transport to
:class:`~ironshadow.broker.connection.MQTTConnection`, the protocol that the TCP listener
uses too. A WebSocket client therefore goes through the same admission, connection limit,
keep alive, flow control, broker-wide pause and statistics as a TCP client.

MQTT 3.1.1 and 5.0 set the same rules for WebSocket:

- the client offers the ``mqtt`` subprotocol and the server selects it [MQTT-6.0.0-3]
  [MQTT-6.0.0-4]. A handshake that does not offer it is rejected with HTTP 400;
- packets travel in binary messages, and any other data message closes the connection
  [MQTT-6.0.0-1];
- a message may carry several packets or part of one [MQTT-6.0.0-2], so the payloads of
  all binary messages go to the connection's decoder as one byte stream.

Flow control, checked against uvicorn 0.55 with its ``websockets-sansio`` implementation,
which ``ApiServer`` selects:

- Reading. uvicorn stops reading the socket while one received message waits for the
  application. While the connection is paused, the transport does not ask for the next
  message, so TCP flow control slows the client down as it does on the TCP listener.
- Writing. Bytes written wait in the transport until its writer task hands them to uvicorn,
  up to ``MAX_MESSAGE_BYTES`` per binary message. Above the connection's high-water mark the
  transport calls ``pause_writing()``, and at or below the low-water mark
  ``resume_writing()``, as asyncio's transports do. uvicorn's send waits while its socket
  buffer is above its own mark, so the bytes of a client that stops reading stay here, and
  the broker stops writing to it at the high-water mark.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI, WebSocket
from starlette.responses import PlainTextResponse
from starlette.websockets import WebSocketDisconnect, WebSocketDisconnected

from ..broker.connection import CLOSED, MQTTConnection
from ..broker.core import Broker
from ..broker.hooks import SERVER_INITIATED_DISCONNECT
from ..mqtt.errors import protocol_error
from ..mqtt.reason_codes import ReasonCode

log = logging.getLogger("ironshadow.api")

MQTT_PATH = "/mqtt"
MQTT_SUBPROTOCOL = "mqtt"

# Largest binary message sent to a client, in bytes. The packets of one flush are joined
# into messages of up to this size, so a burst costs few messages while no message makes
# the client buffer much. A single larger packet is sent in a message of its own.
MAX_MESSAGE_BYTES = 64 * 1024
# asyncio's default write buffer marks, in bytes, used until the protocol sets its own.
DEFAULT_HIGH_WATER = 64 * 1024

# WebSocket close codes: RFC 6455, section 7.4.1, and the IANA registry for 1013.
CLOSE_NORMAL = 1000
CLOSE_UNSUPPORTED_DATA = 1003
# The broker aborts a connection only when max_connections connections are open, or
# max_connections_per_address from the client's address.
CLOSE_TRY_AGAIN_LATER = 1013

SUBPROTOCOL_MISSING = (
    "MQTT over WebSocket needs the 'mqtt' subprotocol: offer it in the "
    "Sec-WebSocket-Protocol header of the handshake.\n"
)


class WebSocketTransport(asyncio.Transport):
    """One accepted WebSocket, seen by an MQTT connection as an asyncio transport.

    :meth:`run` connects the protocol and relays data both ways until the WebSocket closes.
    """

    def __init__(self, websocket: WebSocket) -> None:
        client = websocket.client
        peer = (client.host, client.port) if client is not None else None
        super().__init__({"peername": peer, "websocket": websocket})
        self._websocket = websocket
        self._protocol: MQTTConnection | None = None
        self._buffer: list[bytes] = []
        # Bytes written and not yet sent: those in _buffer and the message being sent.
        self._buffered = 0
        self._high_water = DEFAULT_HIGH_WATER
        self._low_water = DEFAULT_HIGH_WATER // 4
        self._writing_paused = False
        self._reading = asyncio.Event()
        self._reading.set()
        self._write_ready = asyncio.Event()
        self._closing = False
        self._close_code = CLOSE_NORMAL
        self._close_reason = ""
        self._lost = False

    @property
    def protocol(self) -> MQTTConnection | None:
        return self._protocol

    async def run(self, protocol: MQTTConnection) -> None:
        """Call ``protocol.connection_made()``, relay data until the WebSocket closes, then
        call ``protocol.connection_lost()``."""
        self._protocol = protocol
        protocol.connection_made(self)
        writer = asyncio.get_running_loop().create_task(self._write_loop())
        try:
            await self._read_loop()
        finally:
            self._lost = True
            self._closing = True
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            self._buffer.clear()
            self._buffered = 0
            protocol.connection_lost(None)

    # --- reading ----------------------------------------------------------------------

    async def _read_loop(self) -> None:
        websocket = self._websocket
        protocol = self._protocol
        assert protocol is not None
        while True:
            await self._reading.wait()
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            if self._closing:
                # What arrives before the client's close frame is discarded, as the TCP
                # listener discards what arrives while it lingers.
                continue
            data = message.get("bytes")
            if data is None:
                self._close_code = CLOSE_UNSUPPORTED_DATA
                self._close_reason = "MQTT packets must be sent in binary messages"
                protocol.protocol_error(
                    protocol_error("text WebSocket message received; MQTT needs binary messages")
                )  # [MQTT-6.0.0-1]
                continue
            protocol.data_received(data)

    def pause_reading(self) -> None:
        self._reading.clear()

    def resume_reading(self) -> None:
        self._reading.set()

    def is_reading(self) -> bool:
        return self._reading.is_set()

    # --- writing ----------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or not data:
            return
        self._buffer.append(bytes(data))
        self._buffered += len(data)
        self._written()

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        if self._closing:
            return
        for data in list_of_data:
            if data:
                self._buffer.append(bytes(data))
                self._buffered += len(data)
        self._written()

    def _written(self) -> None:
        self._write_ready.set()
        if not self._writing_paused and self._buffered > self._high_water:
            self._writing_paused = True
            assert self._protocol is not None
            self._protocol.pause_writing()

    def _next_message(self) -> bytes:
        """Take the first chunks of the buffer, up to MAX_MESSAGE_BYTES and at least one."""
        buffer = self._buffer
        size = len(buffer[0])
        count = 1
        while count < len(buffer) and size + len(buffer[count]) <= MAX_MESSAGE_BYTES:
            size += len(buffer[count])
            count += 1
        if count == 1:
            return buffer.pop(0)
        message = b"".join(buffer[:count])
        del buffer[:count]
        return message

    async def _write_loop(self) -> None:
        websocket = self._websocket
        try:
            while not self._lost:
                if not self._buffer:
                    if self._closing:
                        await websocket.close(self._close_code, self._close_reason)
                        return
                    self._write_ready.clear()
                    await self._write_ready.wait()
                    continue
                message = self._next_message()
                await websocket.send({"type": "websocket.send", "bytes": message})
                self._buffered -= len(message)
                if self._writing_paused and self._buffered <= self._low_water:
                    self._writing_paused = False
                    assert self._protocol is not None
                    self._protocol.resume_writing()
        except (WebSocketDisconnect, WebSocketDisconnected):
            # The client has gone; the read loop receives websocket.disconnect next.
            pass

    def get_write_buffer_size(self) -> int:
        return self._buffered

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low_water, self._high_water

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        # The defaults are asyncio's: high is 64 KiB, or four times low when only low is
        # given, and low is a quarter of high.
        if high is None:
            high = DEFAULT_HIGH_WATER if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high_water = high
        self._low_water = low

    def can_write_eof(self) -> bool:
        # WebSocket has no half-close: the connection closes with a close frame instead.
        return False

    def write_eof(self) -> None:
        raise NotImplementedError("a WebSocket cannot be half-closed")

    # --- closing ----------------------------------------------------------------------

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Send what is buffered, then a close frame. connection_lost() follows the close.

        NOTE: a client that has stopped reading does not get the close frame, so its handler
        and socket remain, with their buffers at the write marks, until it reads or goes away.
        """
        if self._closing:
            return
        self._closing = True
        self._write_ready.set()
        # Read on, discarding data, until the client's close frame or its disconnection.
        self._reading.set()

    def abort(self) -> None:
        """Discard what is buffered and close with 1013 (Try Again Later)."""
        if self._closing:
            return
        self._buffered -= sum(len(chunk) for chunk in self._buffer)
        self._buffer.clear()
        self._close_code = CLOSE_TRY_AGAIN_LATER
        self._close_reason = "too many connections, to the broker or from this address"
        self.close()

    def get_protocol(self) -> Any:
        return self._protocol

    def set_protocol(self, protocol: Any) -> None:
        self._protocol = protocol


class MQTTWebSocketEndpoint:
    """The ``/mqtt`` endpoint: accepts MQTT clients over WebSocket for ``broker``."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.transports: set[WebSocketTransport] = set()
        self._all_closed = asyncio.Event()
        self._all_closed.set()

    async def serve(self, websocket: WebSocket) -> None:
        if MQTT_SUBPROTOCOL not in websocket.scope.get("subprotocols", ()):
            await websocket.send_denial_response(
                PlainTextResponse(SUBPROTOCOL_MISSING, status_code=400)
            )
            return
        await websocket.accept(subprotocol=MQTT_SUBPROTOCOL)
        transport = WebSocketTransport(websocket)
        self.transports.add(transport)
        self._all_closed.clear()
        try:
            await transport.run(MQTTConnection(self.broker))
        finally:
            self.transports.discard(transport)
            if not self.transports:
                self._all_closed.set()

    async def close_all(self, timeout: float) -> None:
        """Close every connection as the broker does when it stops: MQTT 5 clients get
        DISCONNECT with 0x8B (server shutting down), and no will is published.

        Waits up to ``timeout`` seconds for the close handshakes.
        """
        for transport in list(self.transports):
            connection = transport.protocol
            if connection is not None and connection.state != CLOSED:
                connection.disconnect_reason = SERVER_INITIATED_DISCONNECT
                connection.close(
                    ReasonCode.SERVER_SHUTTING_DOWN, publish_will=False, linger=False
                )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._all_closed.wait(), timeout)


def add_mqtt_websocket_route(app: FastAPI, endpoint: MQTTWebSocketEndpoint) -> None:
    @app.websocket(MQTT_PATH)
    async def mqtt_over_websocket(websocket: WebSocket) -> None:
        await endpoint.serve(websocket)
