"""MQTT 5 properties: which packets may carry each one, repetition, value checks, unknown ids."""

from __future__ import annotations

from typing import Any

import pytest
from codec_strategies import (
    ALLOWED_PROPERTIES,
    PROPERTY_VALUES,
    ROUND_TRIP_SETTINGS,
    SAMPLE_VALUES,
    WILL_KEY,
    decode,
    properties,
)
from hypothesis import given
from hypothesis import strategies as st

from ironshadow.mqtt import (
    MQTT_5,
    Auth,
    Connack,
    Connect,
    Disconnect,
    MQTTProtocolError,
    PacketType,
    PropertyId,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    ReasonCode,
    Suback,
    Subscribe,
    Subscription,
    Unsuback,
    Unsubscribe,
    Will,
)
from ironshadow.mqtt.encoding import decode_vbi, encode_vbi
from ironshadow.mqtt.properties import WILL, decode_properties, encode_properties

P = PropertyId
REPEATABLE = {P.USER_PROPERTY, P.SUBSCRIPTION_IDENTIFIER}


def test_tables_cover_every_property():
    assert set(PROPERTY_VALUES) == set(PropertyId)


# Build a valid MQTT 5 packet of each kind that carries the given properties.
_CARRIERS = {
    PacketType.CONNECT: lambda props: Connect("c", protocol_level=MQTT_5, properties=props),
    WILL_KEY: lambda props: Connect(
        "c", protocol_level=MQTT_5, will=Will("w", b"", properties=props)
    ),
    PacketType.CONNACK: lambda props: Connack(properties=props),
    PacketType.PUBLISH: lambda props: Publish("t", b"p", qos=1, packet_id=1, properties=props),
    PacketType.PUBACK: lambda props: Puback(1, properties=props),
    PacketType.PUBREC: lambda props: Pubrec(1, properties=props),
    PacketType.PUBREL: lambda props: Pubrel(1, properties=props),
    PacketType.PUBCOMP: lambda props: Pubcomp(1, properties=props),
    PacketType.SUBSCRIBE: lambda props: Subscribe(1, [Subscription("a")], properties=props),
    PacketType.SUBACK: lambda props: Suback(1, [0], properties=props),
    PacketType.UNSUBSCRIBE: lambda props: Unsubscribe(1, ["a"], properties=props),
    PacketType.UNSUBACK: lambda props: Unsuback(1, [0], properties=props),
    PacketType.DISCONNECT: lambda props: Disconnect(properties=props),
    PacketType.AUTH: lambda props: Auth(properties=props),
}


def _key_id(key: Any) -> str:
    return key if isinstance(key, str) else key.name


def _carried(key: Any, packet: Any) -> dict:
    return packet.will.properties if key == WILL_KEY else packet.properties


def _pairs(allowed: bool) -> list[tuple[Any, PropertyId]]:
    return [
        (key, prop)
        for key in _CARRIERS
        for prop in PropertyId
        if (prop in ALLOWED_PROPERTIES[key]) == allowed
    ]


def _pair_id(pair: Any) -> str:
    return _key_id(pair) if not isinstance(pair, PropertyId) else pair.name


def _encode_with(key: Any, prop: PropertyId, value: Any) -> bytes:
    props = {prop: value}
    if key == PacketType.CONNECT and prop == P.AUTHENTICATION_DATA:
        props[P.AUTHENTICATION_METHOD] = "m"  # data alone is a separate protocol error
    return _CARRIERS[key](props).encode(MQTT_5)


@pytest.mark.parametrize(("key", "prop"), _pairs(allowed=True), ids=_pair_id)
def test_allowed_property_decodes(key, prop):
    packets = decode(_encode_with(key, prop, SAMPLE_VALUES[prop]), MQTT_5)
    assert _carried(key, packets[0])[prop] == SAMPLE_VALUES[prop]


@pytest.mark.parametrize(("key", "prop"), _pairs(allowed=False), ids=_pair_id)
def test_forbidden_property_rejected(key, prop):
    with pytest.raises(MQTTProtocolError) as info:
        decode(_encode_with(key, prop, SAMPLE_VALUES[prop]), MQTT_5)
    assert info.value.reason_code == ReasonCode.PROTOCOL_ERROR


@pytest.mark.parametrize("key", list(_CARRIERS), ids=_key_id)
@ROUND_TRIP_SETTINGS
@given(data=st.data())
def test_property_sets_round_trip(key, data):
    single = key == PacketType.SUBSCRIBE
    props = data.draw(properties(ALLOWED_PROPERTIES[key], single_subscription_id=single))
    if key == PacketType.CONNECT and P.AUTHENTICATION_DATA in props:
        props[P.AUTHENTICATION_METHOD] = "m"
    packet = _CARRIERS[key](props)
    assert decode(packet.encode(MQTT_5), MQTT_5) == [packet]


# --- repetition -------------------------------------------------------------------------------

# A packet type that may carry each property, for the decode_properties tests below.
_HOME = {
    prop: next(key for key in _CARRIERS if prop in ALLOWED_PROPERTIES[key])
    for prop in PropertyId
}


def _home_type(prop: PropertyId) -> int:
    home = _HOME[prop]
    return WILL if home == WILL_KEY else home


def _property_bytes(prop: PropertyId, value: Any) -> bytes:
    """Encode one property without the length prefix of its list."""
    block = encode_properties({prop: value})
    _, start = decode_vbi(block, 0, len(block))
    return block[start:]


def _with_length(body: bytes) -> bytes:
    return encode_vbi(len(body)) + body


@pytest.mark.parametrize(
    "prop", sorted(set(PropertyId) - REPEATABLE), ids=lambda prop: prop.name
)
def test_duplicate_property(prop):
    one = _property_bytes(prop, SAMPLE_VALUES[prop])
    data = _with_length(one + one)
    with pytest.raises(MQTTProtocolError) as info:
        decode_properties(data, 0, len(data), _home_type(prop))
    assert info.value.reason_code == ReasonCode.PROTOCOL_ERROR


def test_duplicate_property_in_publish():
    body = b"\x00\x01t" + _with_length(_property_bytes(P.CONTENT_TYPE, "a") * 2)
    data = b"\x30" + encode_vbi(len(body)) + body
    with pytest.raises(MQTTProtocolError) as info:
        decode(data, MQTT_5)
    assert info.value.reason_code == ReasonCode.PROTOCOL_ERROR


def test_user_property_repeats_in_order():
    pairs = [("b", "2"), ("a", "1"), ("b", "2"), ("", "")]
    data = encode_properties({P.USER_PROPERTY: pairs})
    decoded, _ = decode_properties(data, 0, len(data), PacketType.PUBLISH)
    assert decoded[P.USER_PROPERTY] == pairs


def test_subscription_ids_repeat_in_publish():
    data = encode_properties({P.SUBSCRIPTION_IDENTIFIER: [3, 1, 3]})
    decoded, _ = decode_properties(data, 0, len(data), PacketType.PUBLISH)
    assert decoded[P.SUBSCRIPTION_IDENTIFIER] == [3, 1, 3]


def test_subscription_id_twice_in_subscribe():
    data = encode_properties({P.SUBSCRIPTION_IDENTIFIER: [1, 2]})
    with pytest.raises(MQTTProtocolError) as info:
        decode_properties(data, 0, len(data), PacketType.SUBSCRIBE)
    assert info.value.reason_code == ReasonCode.PROTOCOL_ERROR


# --- values -----------------------------------------------------------------------------------

_INVALID_VALUES = [
    (P.RECEIVE_MAXIMUM, b"\x21\x00\x00"),
    (P.MAXIMUM_PACKET_SIZE, b"\x27\x00\x00\x00\x00"),
    (P.SUBSCRIPTION_IDENTIFIER, b"\x0b\x00"),
    (P.PAYLOAD_FORMAT_INDICATOR, b"\x01\x02"),
    (P.PAYLOAD_FORMAT_INDICATOR, b"\x01\xff"),
    (P.REQUEST_PROBLEM_INFORMATION, b"\x17\x02"),
    (P.REQUEST_RESPONSE_INFORMATION, b"\x19\x02"),
    (P.MAXIMUM_QOS, b"\x24\x02"),
    (P.RETAIN_AVAILABLE, b"\x25\x02"),
    (P.WILDCARD_SUBSCRIPTION_AVAILABLE, b"\x28\x02"),
    (P.SUBSCRIPTION_IDENTIFIER_AVAILABLE, b"\x29\x02"),
    (P.SHARED_SUBSCRIPTION_AVAILABLE, b"\x2a\x02"),
]


@pytest.mark.parametrize(
    ("prop", "raw"), _INVALID_VALUES, ids=[f"{p.name}-{r.hex()}" for p, r in _INVALID_VALUES]
)
def test_invalid_value(prop, raw):
    data = _with_length(raw)
    with pytest.raises(MQTTProtocolError) as info:
        decode_properties(data, 0, len(data), _home_type(prop))
    assert info.value.reason_code == ReasonCode.PROTOCOL_ERROR


def test_topic_alias_zero():
    data = _with_length(b"\x23\x00\x00")
    with pytest.raises(MQTTProtocolError) as info:
        decode_properties(data, 0, len(data), PacketType.PUBLISH)
    assert info.value.reason_code == ReasonCode.TOPIC_ALIAS_INVALID


def test_receive_maximum_zero_in_connect():
    packet = Connect("c", protocol_level=MQTT_5, properties={P.RECEIVE_MAXIMUM: 0})
    with pytest.raises(MQTTProtocolError) as info:
        decode(packet.encode(), MQTT_5)
    assert info.value.reason_code == ReasonCode.PROTOCOL_ERROR


@pytest.mark.parametrize(
    ("prop", "raw"),
    [
        (P.MAXIMUM_QOS, b"\x24\x00"),
        (P.TOPIC_ALIAS_MAXIMUM, b"\x22\x00\x00"),
        (P.SERVER_KEEP_ALIVE, b"\x13\x00\x00"),
        (P.SESSION_EXPIRY_INTERVAL, b"\x11\xff\xff\xff\xff"),
        (P.SUBSCRIPTION_IDENTIFIER, b"\x0b\xff\xff\xff\x7f"),
    ],
    ids=lambda value: value.name if isinstance(value, PropertyId) else value.hex(),
)
def test_edge_value_accepted(prop, raw):
    data = _with_length(raw)
    decoded, _ = decode_properties(data, 0, len(data), _home_type(prop))
    assert prop in decoded


def test_connect_auth_data_without_method():
    packet = Connect("c", protocol_level=MQTT_5, properties={P.AUTHENTICATION_DATA: b"x"})
    with pytest.raises(MQTTProtocolError) as info:
        decode(packet.encode(), MQTT_5)
    assert info.value.reason_code == ReasonCode.PROTOCOL_ERROR


@pytest.mark.parametrize("value", [0, 268_435_456])
def test_subscription_id_encode_out_of_range(value):
    with pytest.raises(ValueError):
        encode_properties({P.SUBSCRIPTION_IDENTIFIER: [value]})


# --- malformed lists --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ident", [b"\x00", b"\x04", b"\x05", b"\x0a", b"\x2b", b"\x7f", b"\x80\x01"]
)
def test_unknown_property_id(ident):
    data = _with_length(ident + b"\x00\x00\x00\x00")
    with pytest.raises(MQTTProtocolError) as info:
        decode_properties(data, 0, len(data), PacketType.PUBLISH)
    assert info.value.reason_code == ReasonCode.MALFORMED_PACKET


def test_unknown_property_id_in_packet():
    data = b"\x40\x06\x00\x01\x00\x02\x05\x00"
    with pytest.raises(MQTTProtocolError) as info:
        decode(data, MQTT_5)
    assert info.value.reason_code == ReasonCode.MALFORMED_PACKET


@pytest.mark.parametrize(
    "data",
    [
        b"\x05\x01",  # list length past the end
        b"\x01\x01",  # byte value missing
        b"\x02\x23\x00",  # two-byte value cut short
        b"\x03\x02\x00\x00",  # four-byte value cut short
        b"\x02\x0b\x80",  # variable byte integer cut short
        b"\x04\x03\x00\x05a",  # string longer than the list
        b"\x03\x09\x00\x02",  # binary data longer than the list
        b"\x06\x26\x00\x01k\x00\x01",  # user property value missing
        b"\x80\x80\x80\x80\x01",  # list length of five bytes
    ],
)
def test_truncated_list(data):
    with pytest.raises(MQTTProtocolError) as info:
        decode_properties(data, 0, len(data), PacketType.PUBLISH)
    assert info.value.reason_code == ReasonCode.MALFORMED_PACKET


def test_value_cannot_cross_list_end():
    # The list claims 2 bytes, so the Content Type's length prefix is cut off by the list end,
    # even though the packet itself goes on.
    data = b"\x02\x03\x00\x01a"
    with pytest.raises(MQTTProtocolError) as info:
        decode_properties(data, 0, len(data), PacketType.PUBLISH)
    assert info.value.reason_code == ReasonCode.MALFORMED_PACKET


def test_string_property_with_null():
    data = _with_length(b"\x1f\x00\x01\x00")
    with pytest.raises(MQTTProtocolError) as info:
        decode_properties(data, 0, len(data), PacketType.PUBACK)
    assert info.value.reason_code == ReasonCode.MALFORMED_PACKET


def test_empty_list():
    assert decode_properties(b"\x00rest", 0, 5, PacketType.PUBLISH) == ({}, 1)


def test_empty_properties_encode():
    assert encode_properties({}) == b"\x00"
