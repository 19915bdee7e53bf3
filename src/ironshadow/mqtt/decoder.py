"""Incremental framing: feed byte chunks of any size, get every complete packet.

The decoder reads the fixed header and the remaining length first and rejects a packet that
exceeds ``max_packet_size`` before its body is buffered, so a peer cannot make it hold more
than one maximum-size packet.
"""

from __future__ import annotations

from .constants import MAX_PACKET_SIZE, MQTT_3_1_1, PacketType
from .constants import SUPPORTED_PROTOCOL_LEVELS as SUPPORTED_LEVELS
from .errors import MQTTProtocolError, malformed
from .packets import Packet, decode_packet
from .reason_codes import ReasonCode


class PacketDecoder:
    """Split a byte stream into packets.

    ``version`` is the protocol level used to decode packets. A broker-side decoder starts at
    3.1.1 and switches to the level of the CONNECT it decodes, so that the packets following
    CONNECT in the same chunk are decoded with the right version.

    ``counts``, when given, is a list of 16 integers: the decoder adds one at the index of
    each packet's type, so that many decoders can share one set of counters.
    """

    __slots__ = ("_buffer", "counts", "max_packet_size", "version")

    def __init__(
        self,
        max_packet_size: int = MAX_PACKET_SIZE,
        version: int = MQTT_3_1_1,
        counts: list[int] | None = None,
    ) -> None:
        self._buffer = bytearray()
        self.max_packet_size = max_packet_size
        self.version = version
        self.counts = counts if counts is not None else [0] * 16

    @property
    def buffered(self) -> int:
        """Number of bytes received but not yet decoded."""
        return len(self._buffer)

    def feed(self, data: bytes | bytearray) -> list[Packet]:
        """Decode every complete packet in the bytes received so far.

        Raises :class:`MQTTProtocolError` on the first malformed packet. The stream cannot be
        resynchronised after that, so the caller must close the connection.
        """
        buffer: bytes | bytearray
        if self._buffer:
            self._buffer += data
            buffer = self._buffer
        else:
            buffer = data
        size = len(buffer)
        pos = 0
        packets: list[Packet] = []
        max_size = self.max_packet_size
        counts = self.counts
        while size - pos >= 2:
            first = buffer[pos]
            # Remaining length: a variable byte integer of at most 4 bytes.
            length = 0
            shift = 0
            index = pos + 1
            while True:
                if index >= size:
                    length = -1
                    break
                byte = buffer[index]
                index += 1
                length |= (byte & 0x7F) << shift
                if not byte & 0x80:
                    break
                shift += 7
                if shift == 28:
                    raise malformed("remaining length is longer than 4 bytes")
            if length < 0:
                break
            total = index - pos + length
            if total > max_size:
                raise MQTTProtocolError(
                    ReasonCode.PACKET_TOO_LARGE,
                    f"packet of {total} bytes exceeds the maximum packet size of {max_size} bytes",
                )
            stop = index + length
            if stop > size:
                break
            body = bytes(buffer[index:stop])
            if first >> 4 == PacketType.CONNECT:
                self._take_connect_version(body)
            packet = decode_packet(first, body, self.version)
            counts[first >> 4] += 1
            packets.append(packet)
            pos = stop
        if pos:
            if buffer is self._buffer:
                del self._buffer[:pos]
            else:
                self._buffer = bytearray(buffer[pos:])
        elif buffer is not self._buffer:
            self._buffer = bytearray(buffer)
        return packets

    def _take_connect_version(self, body: bytes) -> None:
        """Switch to the protocol level of a CONNECT before decoding the rest of it.

        Doing this first means that an error later in a v5 CONNECT is reported in the v5
        way, with a CONNACK reason code, rather than in the 3.1.1 way.
        """
        if len(body) >= 7 and body[:6] == b"\x00\x04MQTT" and body[6] in SUPPORTED_LEVELS:
            self.version = body[6]
