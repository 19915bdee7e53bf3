"""MQTT control packets of versions 3.1.1 and 5.0, with their encoders and decoders.

Each packet class has ``encode(version) -> bytes``. ``decode_packet(first_byte, body,
version)`` turns one packet's body (the bytes after the remaining length) into a packet
object; the incremental framing lives in :mod:`ironshadow.mqtt.decoder`. Every check here
raises :class:`MQTTProtocolError` with the reason code the receiver should respond with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from .constants import MQTT_3_1_1, MQTT_5, SUPPORTED_PROTOCOL_LEVELS, PacketType
from .encoding import (
    decode_binary,
    decode_string,
    decode_uint16,
    encode_binary,
    encode_string,
    encode_vbi,
)
from .errors import MQTTProtocolError, malformed, protocol_error
from .properties import WILL, Properties, PropertyId, decode_properties, encode_properties
from .reason_codes import ALLOWED_REASON_CODES, ReasonCode
from .topics import validate_topic_name

_PROTOCOL_NAME = b"\x00\x04MQTT"


def _frame(first_byte: int, body: bytes) -> bytes:
    return bytes((first_byte,)) + encode_vbi(len(body)) + body


def _check_packet_id(packet_id: int) -> None:
    if packet_id == 0:
        raise malformed("packet identifier must not be 0")  # [MQTT-2.2.1-3]


def _check_reason_code(packet_type: PacketType, code: int) -> int:
    if code not in ALLOWED_REASON_CODES[packet_type]:
        raise malformed(f"reason code 0x{code:02X} is not valid in {packet_type.name}")
    return code


@dataclass(slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    properties: Properties = field(default_factory=dict)


@dataclass(slots=True)
class Connect:
    client_id: str
    protocol_level: int = MQTT_3_1_1
    clean_start: bool = True
    keep_alive: int = 0
    username: str | None = None
    password: bytes | None = None
    will: Will | None = None
    properties: Properties = field(default_factory=dict)

    packet_type: ClassVar[PacketType] = PacketType.CONNECT

    def encode(self, version: int | None = None) -> bytes:
        level = self.protocol_level
        flags = 0
        if self.clean_start:
            flags |= 0x02
        will = self.will
        if will is not None:
            flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
        if self.password is not None:
            flags |= 0x40
        if self.username is not None:
            flags |= 0x80
        parts = [_PROTOCOL_NAME, bytes((level, flags)), self.keep_alive.to_bytes(2, "big")]
        if level == MQTT_5:
            parts.append(encode_properties(self.properties))
        parts.append(encode_string(self.client_id))
        if will is not None:
            if level == MQTT_5:
                parts.append(encode_properties(will.properties))
            parts.append(encode_string(will.topic))
            parts.append(encode_binary(will.payload))
        if self.username is not None:
            parts.append(encode_string(self.username))
        if self.password is not None:
            parts.append(encode_binary(self.password))
        return _frame(0x10, b"".join(parts))


@dataclass(slots=True)
class Connack:
    reason_code: int = ReasonCode.SUCCESS
    session_present: bool = False
    properties: Properties = field(default_factory=dict)

    packet_type: ClassVar[PacketType] = PacketType.CONNACK

    def encode(self, version: int) -> bytes:
        head = bytes((1 if self.session_present else 0, self.reason_code))
        if version == MQTT_5:
            return _frame(0x20, head + encode_properties(self.properties))
        return _frame(0x20, head)


@dataclass(slots=True)
class Publish:
    topic: str
    payload: bytes = b""
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int = 0
    properties: Properties = field(default_factory=dict)

    packet_type: ClassVar[PacketType] = PacketType.PUBLISH

    def encode(self, version: int) -> bytes:
        first = 0x30 | (self.qos << 1)
        if self.dup:
            first |= 0x08
        if self.retain:
            first |= 0x01
        parts = [encode_string(self.topic)]
        if self.qos:
            parts.append(self.packet_id.to_bytes(2, "big"))
        if version == MQTT_5:
            parts.append(encode_properties(self.properties))
        parts.append(self.payload)
        return _frame(first, b"".join(parts))


@dataclass(slots=True)
class _Ack:
    """PUBACK, PUBREC, PUBREL and PUBCOMP share one layout."""

    packet_id: int
    reason_code: int = ReasonCode.SUCCESS
    properties: Properties = field(default_factory=dict)

    packet_type: ClassVar[PacketType] = PacketType.PUBACK
    _first_byte: ClassVar[int] = 0x40

    def encode(self, version: int) -> bytes:
        pid = self.packet_id.to_bytes(2, "big")
        if version != MQTT_5 or (not self.reason_code and not self.properties):
            return bytes((self._first_byte, 2)) + pid
        if not self.properties:
            return bytes((self._first_byte, 3)) + pid + bytes((self.reason_code,))
        body = pid + bytes((self.reason_code,)) + encode_properties(self.properties)
        return _frame(self._first_byte, body)


class Puback(_Ack):
    __slots__ = ()
    packet_type: ClassVar[PacketType] = PacketType.PUBACK
    _first_byte: ClassVar[int] = 0x40


class Pubrec(_Ack):
    __slots__ = ()
    packet_type: ClassVar[PacketType] = PacketType.PUBREC
    _first_byte: ClassVar[int] = 0x50


class Pubrel(_Ack):
    __slots__ = ()
    packet_type: ClassVar[PacketType] = PacketType.PUBREL
    _first_byte: ClassVar[int] = 0x62


class Pubcomp(_Ack):
    __slots__ = ()
    packet_type: ClassVar[PacketType] = PacketType.PUBCOMP
    _first_byte: ClassVar[int] = 0x70


@dataclass(slots=True)
class Subscription:
    """One topic filter of a SUBSCRIBE with its options (the options byte of MQTT 5)."""

    topic_filter: str
    qos: int = 0
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0

    def options_byte(self, version: int) -> int:
        if version != MQTT_5:
            return self.qos
        value = self.qos | (self.retain_handling << 4)
        if self.no_local:
            value |= 0x04
        if self.retain_as_published:
            value |= 0x08
        return value


@dataclass(slots=True)
class Subscribe:
    packet_id: int
    subscriptions: list[Subscription]
    properties: Properties = field(default_factory=dict)

    packet_type: ClassVar[PacketType] = PacketType.SUBSCRIBE

    def encode(self, version: int) -> bytes:
        parts = [self.packet_id.to_bytes(2, "big")]
        if version == MQTT_5:
            parts.append(encode_properties(self.properties))
        for sub in self.subscriptions:
            parts.append(encode_string(sub.topic_filter))
            parts.append(bytes((sub.options_byte(version),)))
        return _frame(0x82, b"".join(parts))


@dataclass(slots=True)
class Suback:
    packet_id: int
    reason_codes: list[int]
    properties: Properties = field(default_factory=dict)

    packet_type: ClassVar[PacketType] = PacketType.SUBACK

    def encode(self, version: int) -> bytes:
        codes = self.reason_codes
        if version != MQTT_5:
            # MQTT 3.1.1 defines only the granted QoS and 0x80 for failure.
            codes = [code if code < 0x80 else 0x80 for code in codes]
        parts = [self.packet_id.to_bytes(2, "big")]
        if version == MQTT_5:
            parts.append(encode_properties(self.properties))
        parts.append(bytes(codes))
        return _frame(0x90, b"".join(parts))


@dataclass(slots=True)
class Unsubscribe:
    packet_id: int
    topic_filters: list[str]
    properties: Properties = field(default_factory=dict)

    packet_type: ClassVar[PacketType] = PacketType.UNSUBSCRIBE

    def encode(self, version: int) -> bytes:
        parts = [self.packet_id.to_bytes(2, "big")]
        if version == MQTT_5:
            parts.append(encode_properties(self.properties))
        parts.extend(encode_string(topic_filter) for topic_filter in self.topic_filters)
        return _frame(0xA2, b"".join(parts))


@dataclass(slots=True)
class Unsuback:
    packet_id: int
    reason_codes: list[int] = field(default_factory=list)
    properties: Properties = field(default_factory=dict)

    packet_type: ClassVar[PacketType] = PacketType.UNSUBACK

    def encode(self, version: int) -> bytes:
        pid = self.packet_id.to_bytes(2, "big")
        if version != MQTT_5:
            return _frame(0xB0, pid)
        return _frame(0xB0, pid + encode_properties(self.properties) + bytes(self.reason_codes))


@dataclass(slots=True)
class Pingreq:
    packet_type: ClassVar[PacketType] = PacketType.PINGREQ

    def encode(self, version: int) -> bytes:
        return b"\xc0\x00"


@dataclass(slots=True)
class Pingresp:
    packet_type: ClassVar[PacketType] = PacketType.PINGRESP

    def encode(self, version: int) -> bytes:
        return b"\xd0\x00"


@dataclass(slots=True)
class Disconnect:
    reason_code: int = ReasonCode.SUCCESS
    properties: Properties = field(default_factory=dict)

    packet_type: ClassVar[PacketType] = PacketType.DISCONNECT

    def encode(self, version: int) -> bytes:
        if version != MQTT_5 or (not self.reason_code and not self.properties):
            return b"\xe0\x00"
        return _frame(0xE0, bytes((self.reason_code,)) + encode_properties(self.properties))


@dataclass(slots=True)
class Auth:
    reason_code: int = ReasonCode.SUCCESS
    properties: Properties = field(default_factory=dict)

    packet_type: ClassVar[PacketType] = PacketType.AUTH

    def encode(self, version: int = MQTT_5) -> bytes:
        if not self.reason_code and not self.properties:
            return b"\xf0\x00"
        return _frame(0xF0, bytes((self.reason_code,)) + encode_properties(self.properties))


Packet = (
    Connect | Connack | Publish | Puback | Pubrec | Pubrel | Pubcomp | Subscribe | Suback
    | Unsubscribe | Unsuback | Pingreq | Pingresp | Disconnect | Auth
)


# --- decoders -------------------------------------------------------------------------


def _decode_connect(flags: int, body: bytes, version: int) -> Connect:
    end = len(body)
    name, pos = decode_string(body, 0, end)
    if pos + 4 > end:
        raise malformed("CONNECT variable header is truncated")
    level = body[pos]
    if name != "MQTT" or level not in SUPPORTED_PROTOCOL_LEVELS:
        # [MQTT-3.1.2-2] The broker responds with CONNACK 0x01 (3.1.1) or 0x84 (5).
        raise MQTTProtocolError(
            ReasonCode.UNSUPPORTED_PROTOCOL_VERSION,
            f"unsupported protocol {name!r} level {level}; this broker speaks MQTT 3.1.1 and 5.0",
        )
    connect_flags = body[pos + 1]
    keep_alive = (body[pos + 2] << 8) | body[pos + 3]
    pos += 4
    if connect_flags & 0x01:
        raise malformed("reserved bit of the CONNECT flags is set")  # [MQTT-3.1.2-3]
    will_flag = connect_flags & 0x04
    will_qos = (connect_flags >> 3) & 0x03
    will_retain = bool(connect_flags & 0x20)
    if will_qos == 3:
        raise malformed("will QoS is 3")  # [MQTT-3.1.2-14]
    if not will_flag and (will_qos or will_retain):
        raise malformed("will QoS or will retain set without the will flag")  # [MQTT-3.1.2-13]
    has_password = connect_flags & 0x40
    has_username = connect_flags & 0x80
    if level == MQTT_3_1_1 and has_password and not has_username:
        raise malformed("password flag set without the user name flag")  # [MQTT-3.1.2-22]

    properties: Properties = {}
    if level == MQTT_5:
        properties, pos = decode_properties(body, pos, end, PacketType.CONNECT)
        if PropertyId.AUTHENTICATION_DATA in properties and (
            PropertyId.AUTHENTICATION_METHOD not in properties
        ):
            raise protocol_error("Authentication Data without Authentication Method")
    client_id, pos = decode_string(body, pos, end)
    will = None
    if will_flag:
        will_properties: Properties = {}
        if level == MQTT_5:
            will_properties, pos = decode_properties(body, pos, end, WILL)
        will_topic, pos = decode_string(body, pos, end)
        # The will is published under this topic, so it must be a valid topic name
        # [MQTT-4.7.0-1], [MQTT-4.7.3-1].
        validate_topic_name(will_topic)
        will_payload, pos = decode_binary(body, pos, end)
        will = Will(will_topic, will_payload, will_qos, will_retain, will_properties)
    username = None
    password = None
    if has_username:
        username, pos = decode_string(body, pos, end)
    if has_password:
        password, pos = decode_binary(body, pos, end)
    if pos != end:
        raise malformed(f"CONNECT has {end - pos} bytes after its payload")
    return Connect(
        client_id=client_id,
        protocol_level=level,
        clean_start=bool(connect_flags & 0x02),
        keep_alive=keep_alive,
        username=username,
        password=password,
        will=will,
        properties=properties,
    )


def _decode_connack(flags: int, body: bytes, version: int) -> Connack:
    end = len(body)
    if end < 2:
        raise malformed("CONNACK is shorter than 2 bytes")
    if body[0] & 0xFE:
        raise malformed("reserved bits of the CONNACK flags are set")
    code = body[1]
    properties: Properties = {}
    if version == MQTT_5:
        _check_reason_code(PacketType.CONNACK, code)
        properties, pos = decode_properties(body, 2, end, PacketType.CONNACK)
    else:
        if code > 5:
            raise malformed(f"CONNACK return code {code} is not defined in MQTT 3.1.1")
        pos = 2
    if pos != end:
        raise malformed(f"CONNACK has {end - pos} bytes too many")
    return Connack(code, bool(body[0] & 0x01), properties)


def decode_publish(flags: int, body: bytes, version: int) -> Publish:
    qos = (flags >> 1) & 0x03
    if qos == 3:
        raise malformed("PUBLISH with QoS 3")  # [MQTT-3.3.1-4]
    dup = bool(flags & 0x08)
    if dup and not qos:
        raise malformed("PUBLISH with QoS 0 has the DUP flag set")  # [MQTT-3.3.1-2]
    end = len(body)
    topic, pos = decode_string(body, 0, end)
    if "+" in topic or "#" in topic:
        raise MQTTProtocolError(
            ReasonCode.TOPIC_NAME_INVALID, f"topic name {topic!r} contains a wildcard"
        )  # [MQTT-3.3.2-2]
    packet_id = 0
    if qos:
        packet_id, pos = decode_uint16(body, pos, end)
        _check_packet_id(packet_id)
    properties: Properties
    if version == MQTT_5:
        if body[pos : pos + 1] == b"\x00":
            properties = {}
            pos += 1
        else:
            properties, pos = decode_properties(body, pos, end, PacketType.PUBLISH)
    else:
        properties = {}
    if not topic and PropertyId.TOPIC_ALIAS not in properties:
        raise MQTTProtocolError(
            ReasonCode.TOPIC_NAME_INVALID, "PUBLISH has an empty topic name and no topic alias"
        )
    return Publish(topic, body[pos:], qos, bool(flags & 0x01), dup, packet_id, properties)


def _decode_ack(packet_class: type[_Ack]):  # type: ignore[no-untyped-def]
    packet_type = packet_class.packet_type

    def decode(flags: int, body: bytes, version: int) -> _Ack:
        end = len(body)
        if end < 2:
            raise malformed(f"{packet_type.name} is shorter than 2 bytes")
        packet_id = (body[0] << 8) | body[1]
        _check_packet_id(packet_id)
        if version != MQTT_5:
            if end != 2:
                raise malformed(f"{packet_type.name} of MQTT 3.1.1 must be 2 bytes long")
            return packet_class(packet_id)
        code: int = ReasonCode.SUCCESS
        properties: Properties = {}
        if end > 2:
            code = _check_reason_code(packet_type, body[2])
            if end > 3:
                properties, pos = decode_properties(body, 3, end, packet_type)
                if pos != end:
                    raise malformed(f"{packet_type.name} has {end - pos} bytes too many")
        return packet_class(packet_id, code, properties)

    return decode


def _decode_subscribe(flags: int, body: bytes, version: int) -> Subscribe:
    end = len(body)
    packet_id, pos = decode_uint16(body, 0, end)
    _check_packet_id(packet_id)
    properties: Properties = {}
    if version == MQTT_5:
        properties, pos = decode_properties(body, pos, end, PacketType.SUBSCRIBE)
    subscriptions = []
    while pos < end:
        topic_filter, pos = decode_string(body, pos, end)
        if pos >= end:
            raise malformed(f"topic filter {topic_filter!r} has no subscription options")
        options = body[pos]
        pos += 1
        qos = options & 0x03
        if qos == 3:
            raise malformed(f"subscription to {topic_filter!r} asks for QoS 3")
        if version == MQTT_5:
            if options & 0xC0:
                raise malformed("reserved bits of the subscription options are set")
            retain_handling = (options >> 4) & 0x03
            if retain_handling == 3:
                raise malformed("retain handling 3 is not defined")  # [MQTT-3.8.3-5]
            subscriptions.append(
                Subscription(
                    topic_filter, qos, bool(options & 0x04), bool(options & 0x08), retain_handling
                )
            )
        else:
            if options & 0xFC:
                raise malformed("reserved bits of the requested QoS byte are set")
            subscriptions.append(Subscription(topic_filter, qos))
    if not subscriptions:
        raise protocol_error("SUBSCRIBE has no topic filter")  # [MQTT-3.8.3-3]
    return Subscribe(packet_id, subscriptions, properties)


def _decode_suback(flags: int, body: bytes, version: int) -> Suback:
    end = len(body)
    packet_id, pos = decode_uint16(body, 0, end)
    _check_packet_id(packet_id)
    properties: Properties = {}
    if version == MQTT_5:
        properties, pos = decode_properties(body, pos, end, PacketType.SUBACK)
        codes = [_check_reason_code(PacketType.SUBACK, code) for code in body[pos:]]
    else:
        codes = list(body[pos:])
        for code in codes:
            if code not in (0, 1, 2, 0x80):
                raise malformed(f"SUBACK return code 0x{code:02X} is not defined in MQTT 3.1.1")
    if not codes:
        raise protocol_error("SUBACK has no return code")
    return Suback(packet_id, codes, properties)


def _decode_unsubscribe(flags: int, body: bytes, version: int) -> Unsubscribe:
    end = len(body)
    packet_id, pos = decode_uint16(body, 0, end)
    _check_packet_id(packet_id)
    properties: Properties = {}
    if version == MQTT_5:
        properties, pos = decode_properties(body, pos, end, PacketType.UNSUBSCRIBE)
    filters = []
    while pos < end:
        topic_filter, pos = decode_string(body, pos, end)
        filters.append(topic_filter)
    if not filters:
        raise protocol_error("UNSUBSCRIBE has no topic filter")  # [MQTT-3.10.3-2]
    return Unsubscribe(packet_id, filters, properties)


def _decode_unsuback(flags: int, body: bytes, version: int) -> Unsuback:
    end = len(body)
    packet_id, pos = decode_uint16(body, 0, end)
    _check_packet_id(packet_id)
    if version != MQTT_5:
        if end != 2:
            raise malformed("UNSUBACK of MQTT 3.1.1 must be 2 bytes long")
        return Unsuback(packet_id)
    properties, pos = decode_properties(body, pos, end, PacketType.UNSUBACK)
    codes = [_check_reason_code(PacketType.UNSUBACK, code) for code in body[pos:]]
    return Unsuback(packet_id, codes, properties)


def _decode_empty(packet_class: type[Pingreq] | type[Pingresp]):  # type: ignore[no-untyped-def]
    def decode(flags: int, body: bytes, version: int) -> Pingreq | Pingresp:
        if body:
            raise malformed(f"{packet_class.packet_type.name} must have no body")
        return packet_class()

    return decode


def _decode_reason_and_properties(packet_class: type[Disconnect] | type[Auth]):  # type: ignore[no-untyped-def]
    packet_type = packet_class.packet_type

    def decode(flags: int, body: bytes, version: int) -> Disconnect | Auth:
        end = len(body)
        if version != MQTT_5:
            if packet_type == PacketType.AUTH:
                raise protocol_error("AUTH is not part of MQTT 3.1.1")
            if end:
                raise malformed("DISCONNECT of MQTT 3.1.1 must have no body")
            return packet_class()
        if not end:
            return packet_class()
        code = _check_reason_code(packet_type, body[0])
        properties: Properties = {}
        if end > 1:
            properties, pos = decode_properties(body, 1, end, packet_type)
            if pos != end:
                raise malformed(f"{packet_type.name} has {end - pos} bytes too many")
        return packet_class(code, properties)

    return decode


# Fixed-header flags that each packet type must carry [MQTT-2.2.2-1]; PUBLISH has its own.
REQUIRED_FLAGS = {
    PacketType.PUBREL: 0x02,
    PacketType.SUBSCRIBE: 0x02,
    PacketType.UNSUBSCRIBE: 0x02,
}

DECODERS = {
    PacketType.CONNECT: _decode_connect,
    PacketType.CONNACK: _decode_connack,
    PacketType.PUBLISH: decode_publish,
    PacketType.PUBACK: _decode_ack(Puback),
    PacketType.PUBREC: _decode_ack(Pubrec),
    PacketType.PUBREL: _decode_ack(Pubrel),
    PacketType.PUBCOMP: _decode_ack(Pubcomp),
    PacketType.SUBSCRIBE: _decode_subscribe,
    PacketType.SUBACK: _decode_suback,
    PacketType.UNSUBSCRIBE: _decode_unsubscribe,
    PacketType.UNSUBACK: _decode_unsuback,
    PacketType.PINGREQ: _decode_empty(Pingreq),
    PacketType.PINGRESP: _decode_empty(Pingresp),
    PacketType.DISCONNECT: _decode_reason_and_properties(Disconnect),
    PacketType.AUTH: _decode_reason_and_properties(Auth),
}

# Indexed by the high nibble of the first byte; index 0 is the reserved type.
_DECODER_TABLE = [None] + [DECODERS[PacketType(t)] for t in range(1, 16)]
_FLAGS_TABLE = [None] + [REQUIRED_FLAGS.get(PacketType(t), 0) for t in range(1, 16)]
_FLAGS_TABLE[PacketType.PUBLISH] = None


def decode_packet(first_byte: int, body: bytes, version: int) -> Packet:
    """Decode one packet from its first byte and its body."""
    kind = first_byte >> 4
    decoder = _DECODER_TABLE[kind]
    if decoder is None:
        raise malformed("packet type 0 is reserved")
    flags = first_byte & 0x0F
    required = _FLAGS_TABLE[kind]
    if required is not None and flags != required:
        raise malformed(
            f"{PacketType(kind).name} has fixed-header flags 0x{flags:X}, expected 0x{required:X}"
        )
    return decoder(flags, body, version)
