"""MQTT 5 properties: their identifiers, value types and the packets that may carry them.

Properties travel as a ``dict`` keyed by :class:`PropertyId`. User Property values are a list of
``(name, value)`` pairs and Subscription Identifier values a list of integers, because those two
may appear more than once; every other property appears at most once [MQTT-2.2.2].
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any

from .constants import MAX_SUBSCRIPTION_ID, PacketType
from .encoding import (
    decode_binary,
    decode_string,
    decode_uint16,
    decode_uint32,
    decode_vbi,
    encode_binary,
    encode_string,
    encode_vbi,
)
from .errors import MQTTProtocolError, malformed, protocol_error
from .reason_codes import ReasonCode

Properties = dict[int, Any]

# The will properties of CONNECT are checked against their own list, under this key.
WILL = 0


class PropertyId(IntEnum):
    PAYLOAD_FORMAT_INDICATOR = 0x01
    MESSAGE_EXPIRY_INTERVAL = 0x02
    CONTENT_TYPE = 0x03
    RESPONSE_TOPIC = 0x08
    CORRELATION_DATA = 0x09
    SUBSCRIPTION_IDENTIFIER = 0x0B
    SESSION_EXPIRY_INTERVAL = 0x11
    ASSIGNED_CLIENT_IDENTIFIER = 0x12
    SERVER_KEEP_ALIVE = 0x13
    AUTHENTICATION_METHOD = 0x15
    AUTHENTICATION_DATA = 0x16
    REQUEST_PROBLEM_INFORMATION = 0x17
    WILL_DELAY_INTERVAL = 0x18
    REQUEST_RESPONSE_INFORMATION = 0x19
    RESPONSE_INFORMATION = 0x1A
    SERVER_REFERENCE = 0x1C
    REASON_STRING = 0x1F
    RECEIVE_MAXIMUM = 0x21
    TOPIC_ALIAS_MAXIMUM = 0x22
    TOPIC_ALIAS = 0x23
    MAXIMUM_QOS = 0x24
    RETAIN_AVAILABLE = 0x25
    USER_PROPERTY = 0x26
    MAXIMUM_PACKET_SIZE = 0x27
    WILDCARD_SUBSCRIPTION_AVAILABLE = 0x28
    SUBSCRIPTION_IDENTIFIER_AVAILABLE = 0x29
    SHARED_SUBSCRIPTION_AVAILABLE = 0x2A


class ValueType(IntEnum):
    BYTE = 1
    UINT16 = 2
    UINT32 = 3
    VARIABLE_BYTE_INTEGER = 4
    STRING = 5
    BINARY = 6
    STRING_PAIR = 7


P = PropertyId
T = PacketType
V = ValueType

# Property -> (value type, packet types allowed to carry it). MQTT 5 section 2.2.2.2.
PROPERTY_SPECS: dict[int, tuple[ValueType, frozenset[int]]] = {
    P.PAYLOAD_FORMAT_INDICATOR: (V.BYTE, frozenset({T.PUBLISH, WILL})),
    P.MESSAGE_EXPIRY_INTERVAL: (V.UINT32, frozenset({T.PUBLISH, WILL})),
    P.CONTENT_TYPE: (V.STRING, frozenset({T.PUBLISH, WILL})),
    P.RESPONSE_TOPIC: (V.STRING, frozenset({T.PUBLISH, WILL})),
    P.CORRELATION_DATA: (V.BINARY, frozenset({T.PUBLISH, WILL})),
    P.SUBSCRIPTION_IDENTIFIER: (V.VARIABLE_BYTE_INTEGER, frozenset({T.PUBLISH, T.SUBSCRIBE})),
    P.SESSION_EXPIRY_INTERVAL: (V.UINT32, frozenset({T.CONNECT, T.CONNACK, T.DISCONNECT})),
    P.ASSIGNED_CLIENT_IDENTIFIER: (V.STRING, frozenset({T.CONNACK})),
    P.SERVER_KEEP_ALIVE: (V.UINT16, frozenset({T.CONNACK})),
    P.AUTHENTICATION_METHOD: (V.STRING, frozenset({T.CONNECT, T.CONNACK, T.AUTH})),
    P.AUTHENTICATION_DATA: (V.BINARY, frozenset({T.CONNECT, T.CONNACK, T.AUTH})),
    P.REQUEST_PROBLEM_INFORMATION: (V.BYTE, frozenset({T.CONNECT})),
    P.WILL_DELAY_INTERVAL: (V.UINT32, frozenset({WILL})),
    P.REQUEST_RESPONSE_INFORMATION: (V.BYTE, frozenset({T.CONNECT})),
    P.RESPONSE_INFORMATION: (V.STRING, frozenset({T.CONNACK})),
    P.SERVER_REFERENCE: (V.STRING, frozenset({T.CONNACK, T.DISCONNECT})),
    P.REASON_STRING: (
        V.STRING,
        frozenset({
            T.CONNACK, T.PUBACK, T.PUBREC, T.PUBREL, T.PUBCOMP, T.SUBACK, T.UNSUBACK,
            T.DISCONNECT, T.AUTH,
        }),
    ),
    P.RECEIVE_MAXIMUM: (V.UINT16, frozenset({T.CONNECT, T.CONNACK})),
    P.TOPIC_ALIAS_MAXIMUM: (V.UINT16, frozenset({T.CONNECT, T.CONNACK})),
    P.TOPIC_ALIAS: (V.UINT16, frozenset({T.PUBLISH})),
    P.MAXIMUM_QOS: (V.BYTE, frozenset({T.CONNACK})),
    P.RETAIN_AVAILABLE: (V.BYTE, frozenset({T.CONNACK})),
    P.USER_PROPERTY: (
        V.STRING_PAIR,
        frozenset({
            T.CONNECT, T.CONNACK, T.PUBLISH, WILL, T.PUBACK, T.PUBREC, T.PUBREL, T.PUBCOMP,
            T.SUBSCRIBE, T.SUBACK, T.UNSUBSCRIBE, T.UNSUBACK, T.DISCONNECT, T.AUTH,
        }),
    ),
    P.MAXIMUM_PACKET_SIZE: (V.UINT32, frozenset({T.CONNECT, T.CONNACK})),
    P.WILDCARD_SUBSCRIPTION_AVAILABLE: (V.BYTE, frozenset({T.CONNACK})),
    P.SUBSCRIPTION_IDENTIFIER_AVAILABLE: (V.BYTE, frozenset({T.CONNACK})),
    P.SHARED_SUBSCRIPTION_AVAILABLE: (V.BYTE, frozenset({T.CONNACK})),
}

# Byte properties whose only legal values are 0 and 1.
_BOOLEAN_BYTES = frozenset({
    P.PAYLOAD_FORMAT_INDICATOR, P.REQUEST_PROBLEM_INFORMATION, P.REQUEST_RESPONSE_INFORMATION,
    P.MAXIMUM_QOS, P.RETAIN_AVAILABLE, P.WILDCARD_SUBSCRIPTION_AVAILABLE,
    P.SUBSCRIPTION_IDENTIFIER_AVAILABLE, P.SHARED_SUBSCRIPTION_AVAILABLE,
})
# Properties that a peer may repeat: they decode to lists.
REPEATABLE = frozenset({P.USER_PROPERTY, P.SUBSCRIPTION_IDENTIFIER})

del P, T, V

EMPTY_PROPERTIES_BYTES = b"\x00"


def _check_value(prop: PropertyId, value: int) -> None:
    if prop in _BOOLEAN_BYTES and value > 1:
        raise protocol_error(f"property {prop.name} must be 0 or 1, got {value}")
    if value == 0 and prop == PropertyId.TOPIC_ALIAS:
        raise MQTTProtocolError(ReasonCode.TOPIC_ALIAS_INVALID, "topic alias 0 is not allowed")
    if value == 0 and prop in (
        PropertyId.RECEIVE_MAXIMUM,
        PropertyId.MAXIMUM_PACKET_SIZE,
        PropertyId.SUBSCRIPTION_IDENTIFIER,
    ):
        raise protocol_error(f"property {prop.name} must not be 0")


def decode_properties(
    buffer: bytes | bytearray, pos: int, end: int, packet_type: int
) -> tuple[Properties, int]:
    """Decode a property list that starts with its length, for ``packet_type`` (or ``WILL``)."""
    length, pos = decode_vbi(buffer, pos, end)
    stop = pos + length
    if stop > end:
        raise malformed(f"property length {length} runs past the end of the packet")
    properties: Properties = {}
    if not length:
        return properties, pos
    while pos < stop:
        ident, pos = decode_vbi(buffer, pos, stop)
        spec = PROPERTY_SPECS.get(ident)
        if spec is None:
            raise malformed(f"unknown property identifier 0x{ident:02X}")
        prop = PropertyId(ident)
        value_type, allowed = spec
        if packet_type not in allowed:
            where = "will properties" if packet_type == WILL else PacketType(packet_type).name
            raise protocol_error(f"property {prop.name} is not allowed in {where}")
        value: Any
        if value_type == ValueType.BYTE:
            if pos >= stop:
                raise malformed(f"property {prop.name} runs past the end of its list")
            value = buffer[pos]
            pos += 1
        elif value_type == ValueType.UINT16:
            value, pos = decode_uint16(buffer, pos, stop)
        elif value_type == ValueType.UINT32:
            value, pos = decode_uint32(buffer, pos, stop)
        elif value_type == ValueType.VARIABLE_BYTE_INTEGER:
            value, pos = decode_vbi(buffer, pos, stop)
        elif value_type == ValueType.STRING:
            value, pos = decode_string(buffer, pos, stop)
        elif value_type == ValueType.BINARY:
            value, pos = decode_binary(buffer, pos, stop)
        else:
            name, pos = decode_string(buffer, pos, stop)
            text, pos = decode_string(buffer, pos, stop)
            value = (name, text)
        if isinstance(value, int):
            _check_value(prop, value)
        if prop in REPEATABLE:
            if prop == PropertyId.SUBSCRIPTION_IDENTIFIER and prop in properties and (
                packet_type == PacketType.SUBSCRIBE
            ):
                raise protocol_error("SUBSCRIBE carries more than one Subscription Identifier")
            properties.setdefault(prop, []).append(value)
        elif prop in properties:
            raise protocol_error(f"property {prop.name} appears more than once")
        else:
            properties[prop] = value
    return properties, pos


def _encode_value(value_type: ValueType, value: Any) -> bytes:
    if value_type == ValueType.BYTE:
        return bytes((value,))
    if value_type == ValueType.UINT16:
        return value.to_bytes(2, "big")
    if value_type == ValueType.UINT32:
        return value.to_bytes(4, "big")
    if value_type == ValueType.VARIABLE_BYTE_INTEGER:
        if not 0 < value <= MAX_SUBSCRIPTION_ID:
            raise ValueError(f"subscription identifier {value} is outside 1..{MAX_SUBSCRIPTION_ID}")
        return encode_vbi(value)
    if value_type == ValueType.STRING:
        return encode_string(value)
    if value_type == ValueType.BINARY:
        return encode_binary(value)
    name, text = value
    return encode_string(name) + encode_string(text)


def encode_properties(properties: Properties | None) -> bytes:
    """Encode a property list with its length prefix."""
    if not properties:
        return EMPTY_PROPERTIES_BYTES
    parts: list[bytes] = []
    for ident, value in properties.items():
        value_type = PROPERTY_SPECS[ident][0]
        prefix = encode_vbi(ident)
        if ident in REPEATABLE:
            for item in value:
                parts.append(prefix)
                parts.append(_encode_value(value_type, item))
        else:
            parts.append(prefix)
            parts.append(_encode_value(value_type, value))
    body = b"".join(parts)
    return encode_vbi(len(body)) + body
