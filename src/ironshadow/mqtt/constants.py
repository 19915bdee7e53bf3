"""Packet types, protocol levels and the limits that the MQTT specifications fix."""

from __future__ import annotations

from enum import IntEnum


class PacketType(IntEnum):
    CONNECT = 1
    CONNACK = 2
    PUBLISH = 3
    PUBACK = 4
    PUBREC = 5
    PUBREL = 6
    PUBCOMP = 7
    SUBSCRIBE = 8
    SUBACK = 9
    UNSUBSCRIBE = 10
    UNSUBACK = 11
    PINGREQ = 12
    PINGRESP = 13
    DISCONNECT = 14
    AUTH = 15  # MQTT 5 only


# The protocol level byte of CONNECT.
MQTT_3_1_1 = 4
MQTT_5 = 5
SUPPORTED_PROTOCOL_LEVELS = frozenset({MQTT_3_1_1, MQTT_5})

# A variable byte integer has at most 4 bytes of 7 bits each [MQTT-1.5.5].
MAX_VARIABLE_BYTE_INTEGER = 268_435_455
# Fixed header byte, then at most 4 bytes of remaining length.
MAX_PACKET_SIZE = 1 + 4 + MAX_VARIABLE_BYTE_INTEGER
MAX_PACKET_ID = 65_535
MAX_STRING_LENGTH = 65_535
# The largest Subscription Identifier that a variable byte integer can hold.
MAX_SUBSCRIPTION_ID = MAX_VARIABLE_BYTE_INTEGER
