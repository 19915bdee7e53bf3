"""Hypothesis strategies for valid MQTT packets, and the spec tables the codec tests check against.

The tables here are written from the MQTT 5.0 specification: section 2.2.2.2 for properties and
section 3 for the reason codes of each packet. They are not imported from the codec, so a wrong
entry in the codec's own tables makes a test fail.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st

from ironshadow.mqtt import (
    MQTT_3_1_1,
    MQTT_5,
    Auth,
    Connack,
    Connect,
    Disconnect,
    MQTTProtocolError,
    Packet,
    PacketDecoder,
    PacketType,
    Pingreq,
    Pingresp,
    PropertyId,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Suback,
    Subscribe,
    Subscription,
    Unsuback,
    Unsubscribe,
    Will,
)

P = PropertyId

VERSIONS = [MQTT_3_1_1, MQTT_5]

# Example counts that keep the whole codec suite well under a minute on a 2-core machine.
# Deadlines are off because a loaded machine must not turn a slow example into a failure.
ROUND_TRIP_SETTINGS = settings(max_examples=40, deadline=None)
STREAM_SETTINGS = settings(max_examples=60, deadline=None)
FUZZ_SETTINGS = settings(max_examples=300, deadline=None)

MAX_VBI = 268_435_455
UINT16_MAX = 0xFFFF
UINT32_MAX = 0xFFFF_FFFF

# --- spec tables ----------------------------------------------------------------------------

# The key under which the will properties of CONNECT are listed.
WILL_KEY = "will"

_ACK_PROPERTIES = frozenset({P.REASON_STRING, P.USER_PROPERTY})

# Which properties each packet (and the will of CONNECT) may carry.
ALLOWED_PROPERTIES: dict[Any, frozenset[PropertyId]] = {
    PacketType.CONNECT: frozenset({
        P.SESSION_EXPIRY_INTERVAL, P.AUTHENTICATION_METHOD, P.AUTHENTICATION_DATA,
        P.REQUEST_PROBLEM_INFORMATION, P.REQUEST_RESPONSE_INFORMATION, P.RECEIVE_MAXIMUM,
        P.TOPIC_ALIAS_MAXIMUM, P.USER_PROPERTY, P.MAXIMUM_PACKET_SIZE,
    }),
    WILL_KEY: frozenset({
        P.PAYLOAD_FORMAT_INDICATOR, P.MESSAGE_EXPIRY_INTERVAL, P.CONTENT_TYPE,
        P.RESPONSE_TOPIC, P.CORRELATION_DATA, P.WILL_DELAY_INTERVAL, P.USER_PROPERTY,
    }),
    PacketType.CONNACK: frozenset({
        P.SESSION_EXPIRY_INTERVAL, P.ASSIGNED_CLIENT_IDENTIFIER, P.SERVER_KEEP_ALIVE,
        P.AUTHENTICATION_METHOD, P.AUTHENTICATION_DATA, P.RESPONSE_INFORMATION,
        P.SERVER_REFERENCE, P.REASON_STRING, P.RECEIVE_MAXIMUM, P.TOPIC_ALIAS_MAXIMUM,
        P.MAXIMUM_QOS, P.RETAIN_AVAILABLE, P.USER_PROPERTY, P.MAXIMUM_PACKET_SIZE,
        P.WILDCARD_SUBSCRIPTION_AVAILABLE, P.SUBSCRIPTION_IDENTIFIER_AVAILABLE,
        P.SHARED_SUBSCRIPTION_AVAILABLE,
    }),
    PacketType.PUBLISH: frozenset({
        P.PAYLOAD_FORMAT_INDICATOR, P.MESSAGE_EXPIRY_INTERVAL, P.CONTENT_TYPE,
        P.RESPONSE_TOPIC, P.CORRELATION_DATA, P.SUBSCRIPTION_IDENTIFIER, P.TOPIC_ALIAS,
        P.USER_PROPERTY,
    }),
    PacketType.PUBACK: _ACK_PROPERTIES,
    PacketType.PUBREC: _ACK_PROPERTIES,
    PacketType.PUBREL: _ACK_PROPERTIES,
    PacketType.PUBCOMP: _ACK_PROPERTIES,
    PacketType.SUBSCRIBE: frozenset({P.SUBSCRIPTION_IDENTIFIER, P.USER_PROPERTY}),
    PacketType.SUBACK: _ACK_PROPERTIES,
    PacketType.UNSUBSCRIBE: frozenset({P.USER_PROPERTY}),
    PacketType.UNSUBACK: _ACK_PROPERTIES,
    PacketType.DISCONNECT: frozenset({
        P.SESSION_EXPIRY_INTERVAL, P.SERVER_REFERENCE, P.REASON_STRING, P.USER_PROPERTY,
    }),
    PacketType.AUTH: frozenset({
        P.AUTHENTICATION_METHOD, P.AUTHENTICATION_DATA, P.REASON_STRING, P.USER_PROPERTY,
    }),
}

_PUBACK_CODES = frozenset({0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99})
_PUBREL_CODES = frozenset({0x00, 0x92})

# The reason codes that each MQTT 5 packet may carry.
ALLOWED_REASON_CODES: dict[PacketType, frozenset[int]] = {
    PacketType.CONNACK: frozenset({
        0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90,
        0x95, 0x97, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F,
    }),
    PacketType.PUBACK: _PUBACK_CODES,
    PacketType.PUBREC: _PUBACK_CODES,
    PacketType.PUBREL: _PUBREL_CODES,
    PacketType.PUBCOMP: _PUBREL_CODES,
    PacketType.SUBACK: frozenset({
        0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2,
    }),
    PacketType.UNSUBACK: frozenset({0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91}),
    PacketType.DISCONNECT: frozenset({
        0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93,
        0x94, 0x95, 0x96, 0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1,
        0xA2,
    }),
    PacketType.AUTH: frozenset({0x00, 0x18, 0x19}),
}

# MQTT 3.1.1: CONNACK return codes 0..5, SUBACK return codes are a granted QoS or 0x80.
CONNACK_RETURN_CODES_3_1_1 = frozenset(range(6))
SUBACK_RETURN_CODES_3_1_1 = frozenset({0x00, 0x01, 0x02, 0x80})

# --- primitive values -----------------------------------------------------------------------

# Any Unicode scalar value except U+0000. The "utf-8" codec setting leaves out the surrogates.
_CHARACTERS = st.characters(codec="utf-8", exclude_characters="\x00")

strings = st.text(_CHARACTERS, max_size=12)
binaries = st.binary(max_size=24)
uint16s = st.integers(0, UINT16_MAX)
uint32s = st.integers(0, UINT32_MAX)
packet_ids = st.integers(1, UINT16_MAX)
booleans = st.booleans()
qos_levels = st.integers(0, 2)

_level_text = st.text(
    st.characters(codec="utf-8", exclude_characters="\x00/+#"), max_size=6
)

# Topic names: one to four levels joined by "/", with no wildcard. A level may be empty, but the
# whole name never is.
topic_names = (
    st.lists(_level_text, min_size=1, max_size=4).map("/".join).filter(bool)
)


@st.composite
def topic_filters(draw: st.DrawFn) -> str:
    """Draw a valid topic filter: plain levels or ``+``, optionally ending in ``#``."""
    levels = draw(st.lists(st.one_of(_level_text, st.just("+")), max_size=4))
    if draw(st.booleans()):
        levels.append("#")
    topic_filter = "/".join(levels)
    return topic_filter or "#"


user_properties = st.lists(st.tuples(strings, strings), min_size=1, max_size=3)
_boolean_bytes = st.integers(0, 1)

# Valid values for each property. Repeatable properties draw a list.
PROPERTY_VALUES: dict[PropertyId, st.SearchStrategy[Any]] = {
    P.PAYLOAD_FORMAT_INDICATOR: _boolean_bytes,
    P.MESSAGE_EXPIRY_INTERVAL: uint32s,
    P.CONTENT_TYPE: strings,
    P.RESPONSE_TOPIC: topic_names,
    P.CORRELATION_DATA: binaries,
    P.SUBSCRIPTION_IDENTIFIER: st.lists(st.integers(1, MAX_VBI), min_size=1, max_size=3),
    P.SESSION_EXPIRY_INTERVAL: uint32s,
    P.ASSIGNED_CLIENT_IDENTIFIER: strings,
    P.SERVER_KEEP_ALIVE: uint16s,
    P.AUTHENTICATION_METHOD: strings,
    P.AUTHENTICATION_DATA: binaries,
    P.REQUEST_PROBLEM_INFORMATION: _boolean_bytes,
    P.WILL_DELAY_INTERVAL: uint32s,
    P.REQUEST_RESPONSE_INFORMATION: _boolean_bytes,
    P.RESPONSE_INFORMATION: strings,
    P.SERVER_REFERENCE: strings,
    P.REASON_STRING: strings,
    P.RECEIVE_MAXIMUM: st.integers(1, UINT16_MAX),
    P.TOPIC_ALIAS_MAXIMUM: uint16s,
    P.TOPIC_ALIAS: st.integers(1, UINT16_MAX),
    P.MAXIMUM_QOS: _boolean_bytes,
    P.RETAIN_AVAILABLE: _boolean_bytes,
    P.USER_PROPERTY: user_properties,
    P.MAXIMUM_PACKET_SIZE: st.integers(1, UINT32_MAX),
    P.WILDCARD_SUBSCRIPTION_AVAILABLE: _boolean_bytes,
    P.SUBSCRIPTION_IDENTIFIER_AVAILABLE: _boolean_bytes,
    P.SHARED_SUBSCRIPTION_AVAILABLE: _boolean_bytes,
}

# One valid value of each property, for tests that need a single fixed example.
SAMPLE_VALUES: dict[PropertyId, Any] = {
    P.PAYLOAD_FORMAT_INDICATOR: 1,
    P.MESSAGE_EXPIRY_INTERVAL: 3600,
    P.CONTENT_TYPE: "application/json",
    P.RESPONSE_TOPIC: "reply/here",
    P.CORRELATION_DATA: b"\x01\x02",
    P.SUBSCRIPTION_IDENTIFIER: [7],
    P.SESSION_EXPIRY_INTERVAL: 60,
    P.ASSIGNED_CLIENT_IDENTIFIER: "auto-1",
    P.SERVER_KEEP_ALIVE: 30,
    P.AUTHENTICATION_METHOD: "SCRAM-SHA-1",
    P.AUTHENTICATION_DATA: b"nonce",
    P.REQUEST_PROBLEM_INFORMATION: 0,
    P.WILL_DELAY_INTERVAL: 5,
    P.REQUEST_RESPONSE_INFORMATION: 1,
    P.RESPONSE_INFORMATION: "resp/",
    P.SERVER_REFERENCE: "other.example",
    P.REASON_STRING: "because",
    P.RECEIVE_MAXIMUM: 10,
    P.TOPIC_ALIAS_MAXIMUM: 4,
    P.TOPIC_ALIAS: 2,
    P.MAXIMUM_QOS: 1,
    P.RETAIN_AVAILABLE: 0,
    P.USER_PROPERTY: [("key", "value")],
    P.MAXIMUM_PACKET_SIZE: 1024,
    P.WILDCARD_SUBSCRIPTION_AVAILABLE: 1,
    P.SUBSCRIPTION_IDENTIFIER_AVAILABLE: 1,
    P.SHARED_SUBSCRIPTION_AVAILABLE: 0,
}


def properties(
    allowed: frozenset[PropertyId], *, single_subscription_id: bool = False
) -> st.SearchStrategy[dict[int, Any]]:
    """Draw property dicts whose keys are any subset of ``allowed``, each with a valid value."""
    optional = {prop: PROPERTY_VALUES[prop] for prop in sorted(allowed)}
    if single_subscription_id and P.SUBSCRIPTION_IDENTIFIER in optional:
        optional[P.SUBSCRIPTION_IDENTIFIER] = st.lists(
            st.integers(1, MAX_VBI), min_size=1, max_size=1
        )
    return st.fixed_dictionaries({}, optional=optional)


def _properties_for(key: Any, version: int, **options: bool) -> st.SearchStrategy[dict]:
    if version != MQTT_5:
        return st.just({})
    return properties(ALLOWED_PROPERTIES[key], **options)


# --- packets --------------------------------------------------------------------------------


@st.composite
def wills(draw: st.DrawFn, version: int) -> Will:
    return Will(
        topic=draw(topic_names),
        payload=draw(binaries),
        qos=draw(qos_levels),
        retain=draw(booleans),
        properties=draw(_properties_for(WILL_KEY, version)),
    )


@st.composite
def connects(draw: st.DrawFn, version: int) -> Connect:
    props = draw(_properties_for(PacketType.CONNECT, version))
    if P.AUTHENTICATION_DATA in props and P.AUTHENTICATION_METHOD not in props:
        # Authentication Data without a method is a protocol error in CONNECT.
        del props[P.AUTHENTICATION_DATA]
    username = draw(st.none() | strings)
    password = draw(st.none() | binaries)
    if version == MQTT_3_1_1 and username is None:
        password = None  # MQTT 3.1.1 forbids a password without a user name
    return Connect(
        client_id=draw(strings),
        protocol_level=version,
        clean_start=draw(booleans),
        keep_alive=draw(uint16s),
        username=username,
        password=password,
        will=draw(st.none() | wills(version)),
        properties=props,
    )


@st.composite
def connacks(draw: st.DrawFn, version: int) -> Connack:
    if version == MQTT_5:
        code = draw(st.sampled_from(sorted(ALLOWED_REASON_CODES[PacketType.CONNACK])))
    else:
        code = draw(st.sampled_from(sorted(CONNACK_RETURN_CODES_3_1_1)))
    return Connack(
        reason_code=code,
        session_present=draw(booleans),
        properties=draw(_properties_for(PacketType.CONNACK, version)),
    )


@st.composite
def publishes(draw: st.DrawFn, version: int) -> Publish:
    qos = draw(qos_levels)
    props = draw(_properties_for(PacketType.PUBLISH, version))
    topic = draw(topic_names)
    if P.TOPIC_ALIAS in props and draw(booleans):
        topic = ""  # an MQTT 5 PUBLISH may name its topic by alias alone
    return Publish(
        topic=topic,
        payload=draw(binaries),
        qos=qos,
        retain=draw(booleans),
        dup=draw(booleans) if qos else False,
        packet_id=draw(packet_ids) if qos else 0,
        properties=props,
    )


def _acks(packet_class: type, version: int) -> st.SearchStrategy[Packet]:
    if version != MQTT_5:
        return st.builds(packet_class, packet_ids)
    packet_type = packet_class.packet_type
    return st.builds(
        packet_class,
        packet_ids,
        st.sampled_from(sorted(ALLOWED_REASON_CODES[packet_type])),
        _properties_for(packet_type, version),
    )


@st.composite
def subscriptions(draw: st.DrawFn, version: int) -> Subscription:
    if version != MQTT_5:
        return Subscription(draw(topic_filters()), draw(qos_levels))
    return Subscription(
        topic_filter=draw(topic_filters()),
        qos=draw(qos_levels),
        no_local=draw(booleans),
        retain_as_published=draw(booleans),
        retain_handling=draw(st.integers(0, 2)),
    )


def subscribes(version: int) -> st.SearchStrategy[Subscribe]:
    return st.builds(
        Subscribe,
        packet_ids,
        st.lists(subscriptions(version), min_size=1, max_size=4),
        _properties_for(PacketType.SUBSCRIBE, version, single_subscription_id=True),
    )


def subacks(version: int) -> st.SearchStrategy[Suback]:
    if version == MQTT_5:
        codes = ALLOWED_REASON_CODES[PacketType.SUBACK]
    else:
        codes = SUBACK_RETURN_CODES_3_1_1
    return st.builds(
        Suback,
        packet_ids,
        st.lists(st.sampled_from(sorted(codes)), min_size=1, max_size=4),
        _properties_for(PacketType.SUBACK, version),
    )


def unsubscribes(version: int) -> st.SearchStrategy[Unsubscribe]:
    return st.builds(
        Unsubscribe,
        packet_ids,
        st.lists(topic_filters(), min_size=1, max_size=4),
        _properties_for(PacketType.UNSUBSCRIBE, version),
    )


def unsubacks(version: int) -> st.SearchStrategy[Unsuback]:
    if version != MQTT_5:
        return st.builds(Unsuback, packet_ids)
    codes = sorted(ALLOWED_REASON_CODES[PacketType.UNSUBACK])
    return st.builds(
        Unsuback,
        packet_ids,
        st.lists(st.sampled_from(codes), min_size=1, max_size=4),
        _properties_for(PacketType.UNSUBACK, version),
    )


def _reason_and_properties(packet_class: type, version: int) -> st.SearchStrategy[Packet]:
    if version != MQTT_5:
        return st.builds(packet_class)
    packet_type = packet_class.packet_type
    return st.builds(
        packet_class,
        st.sampled_from(sorted(ALLOWED_REASON_CODES[packet_type])),
        _properties_for(packet_type, version),
    )


@functools.cache
def packet_strategies(version: int) -> dict[str, st.SearchStrategy[Packet]]:
    """Return a strategy for each packet type that exists in ``version``, keyed by name.

    The result is cached, because Hypothesis validates a strategy object the first time it
    draws from it: building these again in every example made test_mutated_packets about
    three times slower. Callers must not change the returned dict.
    """
    strategies: dict[str, st.SearchStrategy[Packet]] = {
        "connect": connects(version),
        "connack": connacks(version),
        "publish": publishes(version),
        "puback": _acks(Puback, version),
        "pubrec": _acks(Pubrec, version),
        "pubrel": _acks(Pubrel, version),
        "pubcomp": _acks(Pubcomp, version),
        "subscribe": subscribes(version),
        "suback": subacks(version),
        "unsubscribe": unsubscribes(version),
        "unsuback": unsubacks(version),
        "pingreq": st.just(Pingreq()),
        "pingresp": st.just(Pingresp()),
        "disconnect": _reason_and_properties(Disconnect, version),
    }
    if version == MQTT_5:
        strategies["auth"] = _reason_and_properties(Auth, version)
    return strategies


@functools.cache
def packets(version: int) -> st.SearchStrategy[Packet]:
    """Draw any valid packet of ``version``. A CONNECT drawn here has that protocol level."""
    return st.one_of(*packet_strategies(version).values())


PACKET_KINDS = [
    (version, kind) for version in VERSIONS for kind in packet_strategies(version)
]

# --- damaged input --------------------------------------------------------------------------


def mutate(data: bytes, mutations: list[tuple[str, int, int]]) -> bytes:
    """Apply bit flips, truncations, insertions, deletions and byte swaps to ``data``."""
    buffer = bytearray(data)
    for kind, position, value in mutations:
        at = position % (len(buffer) + 1)
        if kind == "flip" and buffer:
            buffer[at % len(buffer)] ^= 1 << (value % 8)
        elif kind == "truncate":
            del buffer[at:]
        elif kind == "insert":
            buffer[at:at] = bytes((value,)) * (1 + value % 4)
        elif kind == "delete":
            del buffer[at : at + 1 + value % 4]
        elif kind == "replace" and buffer:
            buffer[at % len(buffer)] = value
    return bytes(buffer)


mutations = st.lists(
    st.tuples(
        st.sampled_from(["flip", "truncate", "insert", "delete", "replace"]),
        st.integers(0, 10_000),
        st.integers(0, 255),
    ),
    min_size=1,
    max_size=4,
)
cut_lists = st.lists(st.integers(0, 10_000), max_size=8)


def split_chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    """Split ``data`` at the offsets ``cuts`` (taken modulo its length plus one)."""
    bounds = [0, *sorted({cut % (len(data) + 1) for cut in cuts}), len(data)]
    return [data[start:stop] for start, stop in itertools.pairwise(bounds)]


# --- helpers --------------------------------------------------------------------------------


def decode(data: bytes, version: int) -> list[Packet]:
    """Feed ``data`` to a new decoder in one chunk and return the packets it decodes."""
    return PacketDecoder(version=version).feed(data)


def decode_error(data: bytes, version: int) -> MQTTProtocolError | None:
    """Return the error that decoding ``data`` raises, or None when it decodes."""
    try:
        decode(data, version)
    except MQTTProtocolError as exc:
        return exc
    return None
