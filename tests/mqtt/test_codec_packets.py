"""MQTT 3.1.1 and 5.0 packets: encode and decode round trips, and the rules decoders enforce."""

from __future__ import annotations

import pytest
from codec_strategies import (
    PACKET_KINDS,
    ROUND_TRIP_SETTINGS,
    decode,
    decode_error,
    packet_strategies,
)
from hypothesis import given
from hypothesis import strategies as st

from ironshadow.mqtt import (
    MQTT_3_1_1,
    MQTT_5,
    Auth,
    Connack,
    Connect,
    Disconnect,
    MQTTProtocolError,
    PacketType,
    Pingreq,
    Pingresp,
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
from ironshadow.mqtt.encoding import encode_string, encode_vbi

P = PropertyId


def frame(first_byte: int, body: bytes) -> bytes:
    return bytes((first_byte,)) + encode_vbi(len(body)) + body


def decode_one(data: bytes, version: int):
    packets = decode(data, version)
    assert len(packets) == 1
    return packets[0]


# --- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize(("version", "kind"), PACKET_KINDS)
@ROUND_TRIP_SETTINGS
@given(data=st.data())
def test_round_trip(version, kind, data):
    packet = data.draw(packet_strategies(version)[kind])
    assert decode_one(packet.encode(version), version) == packet


def test_publish_v5_many_subscription_ids():
    packet = Publish(
        "plant/line1/temp",
        b"21.5",
        qos=1,
        packet_id=9,
        properties={P.SUBSCRIPTION_IDENTIFIER: [1, 300, 268_435_455]},
    )
    assert decode_one(packet.encode(MQTT_5), MQTT_5) == packet


def test_publish_v5_all_properties():
    properties = {
        P.PAYLOAD_FORMAT_INDICATOR: 1,
        P.MESSAGE_EXPIRY_INTERVAL: 0xFFFF_FFFF,
        P.CONTENT_TYPE: "text/plain",
        P.RESPONSE_TOPIC: "reply/to",
        P.CORRELATION_DATA: b"\x00\xff",
        P.SUBSCRIPTION_IDENTIFIER: [4, 5],
        P.TOPIC_ALIAS: 3,
        P.USER_PROPERTY: [("a", "1"), ("a", "2"), ("b", "")],
    }
    packet = Publish("t", b"x", qos=2, dup=True, packet_id=65535, properties=properties)
    assert decode_one(packet.encode(MQTT_5), MQTT_5) == packet


def test_publish_v5_topic_alias_only():
    packet = Publish("", b"x", properties={P.TOPIC_ALIAS: 1})
    assert decode_one(packet.encode(MQTT_5), MQTT_5) == packet


def test_connect_v5_will_properties():
    will = Will(
        "status/dev1",
        b"offline",
        qos=1,
        retain=True,
        properties={
            P.WILL_DELAY_INTERVAL: 10,
            P.PAYLOAD_FORMAT_INDICATOR: 1,
            P.MESSAGE_EXPIRY_INTERVAL: 60,
            P.CONTENT_TYPE: "text/plain",
            P.RESPONSE_TOPIC: "r",
            P.CORRELATION_DATA: b"id",
            P.USER_PROPERTY: [("k", "v")],
        },
    )
    packet = Connect(
        "dev1",
        protocol_level=MQTT_5,
        clean_start=False,
        keep_alive=60,
        username="user",
        password=b"secret",
        will=will,
        properties={P.SESSION_EXPIRY_INTERVAL: 300, P.RECEIVE_MAXIMUM: 20},
    )
    assert decode_one(packet.encode(), MQTT_3_1_1) == packet


def test_connect_v311_bytes():
    packet = Connect("c1", keep_alive=60, username="u", password=b"p")
    expected = (
        b"\x10\x14"  # CONNECT, remaining length 20
        b"\x00\x04MQTT\x04"  # protocol name and level
        b"\xc2\x00\x3c"  # flags: user name, password and clean session, then keep alive 60
        b"\x00\x02c1\x00\x01u\x00\x01p"
    )
    assert packet.encode() == expected


def test_connect_v5_password_without_username():
    packet = Connect("c", protocol_level=MQTT_5, password=b"token")
    assert decode_one(packet.encode(), MQTT_5) == packet


@pytest.mark.parametrize(
    "packet",
    [
        Connack(properties={P.REASON_STRING: "x"}),
        Publish("t", b"p", properties={P.CONTENT_TYPE: "x"}),
        Puback(1, properties={P.REASON_STRING: "x"}),
        Subscribe(1, [Subscription("a")], properties={P.USER_PROPERTY: [("k", "v")]}),
        Suback(1, [0], properties={P.REASON_STRING: "x"}),
        Unsubscribe(1, ["a"], properties={P.USER_PROPERTY: [("k", "v")]}),
        Unsuback(1, [0], properties={P.REASON_STRING: "x"}),
        Disconnect(properties={P.REASON_STRING: "x"}),
    ],
    ids=lambda packet: type(packet).__name__,
)
def test_v311_encode_drops_properties(packet):
    decoded = decode_one(packet.encode(MQTT_3_1_1), MQTT_3_1_1)
    assert decoded.properties == {}


def test_v311_publish_bytes():
    packet = Publish("a/b", b"\x00\x01", qos=1, packet_id=10)
    assert packet.encode(MQTT_3_1_1) == b"\x32\x09\x00\x03a/b\x00\x0a\x00\x01"


def test_v311_publish_payload_starting_zero():
    # A 3.1.1 PUBLISH has no property length, so a leading 0x00 is payload.
    packet = Publish("t", b"\x00\x00\x05")
    assert decode_one(packet.encode(MQTT_3_1_1), MQTT_3_1_1).payload == b"\x00\x00\x05"


def test_v5_ack_short_forms():
    assert Puback(7).encode(MQTT_5) == b"\x40\x02\x00\x07"
    assert Puback(7, 0x10).encode(MQTT_5) == b"\x40\x03\x00\x07\x10"
    assert decode_one(b"\x40\x03\x00\x07\x10", MQTT_5) == Puback(7, 0x10)


def test_v5_disconnect_reason_only():
    assert decode_one(b"\xe0\x01\x8e", MQTT_5) == Disconnect(ReasonCode.SESSION_TAKEN_OVER)


def test_ping_bytes():
    assert Pingreq().encode(MQTT_3_1_1) == b"\xc0\x00"
    assert Pingresp().encode(MQTT_5) == b"\xd0\x00"


# --- fixed header -----------------------------------------------------------------------------

# A valid MQTT 5 encoding of each packet type. The flag tests vary its fixed-header flags.
_FLAG_SAMPLES = {
    PacketType.CONNECT: Connect("c", protocol_level=MQTT_5).encode(),
    PacketType.CONNACK: Connack().encode(MQTT_5),
    PacketType.PUBACK: Puback(1).encode(MQTT_5),
    PacketType.PUBREC: Pubrec(1).encode(MQTT_5),
    PacketType.PUBREL: Pubrel(1).encode(MQTT_5),
    PacketType.PUBCOMP: Pubcomp(1).encode(MQTT_5),
    PacketType.SUBSCRIBE: Subscribe(1, [Subscription("a")]).encode(MQTT_5),
    PacketType.SUBACK: Suback(1, [0]).encode(MQTT_5),
    PacketType.UNSUBSCRIBE: Unsubscribe(1, ["a"]).encode(MQTT_5),
    PacketType.UNSUBACK: Unsuback(1, [0]).encode(MQTT_5),
    PacketType.PINGREQ: Pingreq().encode(MQTT_5),
    PacketType.PINGRESP: Pingresp().encode(MQTT_5),
    PacketType.DISCONNECT: Disconnect().encode(MQTT_5),
    PacketType.AUTH: Auth().encode(MQTT_5),
}
_REQUIRED_FLAGS = {PacketType.PUBREL: 2, PacketType.SUBSCRIBE: 2, PacketType.UNSUBSCRIBE: 2}


@pytest.mark.parametrize("packet_type", list(_FLAG_SAMPLES), ids=lambda t: t.name)
def test_fixed_header_flags(packet_type):
    sample = _FLAG_SAMPLES[packet_type]
    accepted = set()
    rejections = set()
    for flags in range(16):
        data = bytes(((packet_type << 4) | flags,)) + sample[1:]
        error = decode_error(data, MQTT_5)
        if error is None:
            accepted.add(flags)
        else:
            rejections.add(error.reason_code)
    assert accepted == {_REQUIRED_FLAGS.get(packet_type, 0)}
    assert rejections == {ReasonCode.MALFORMED_PACKET}


@pytest.mark.parametrize("first_byte", [0x00, 0x02, 0x0F])
def test_reserved_type_zero(first_byte):
    with pytest.raises(MQTTProtocolError) as info:
        decode(bytes((first_byte, 0)), MQTT_5)
    assert info.value.reason_code == ReasonCode.MALFORMED_PACKET


@pytest.mark.parametrize("version", [MQTT_3_1_1, MQTT_5])
@pytest.mark.parametrize("first_byte", [0x36, 0x37, 0x3E, 0x3F])
def test_publish_qos3(version, first_byte):
    data = frame(first_byte, encode_string("t") + b"\x00\x01" + b"\x00")
    with pytest.raises(MQTTProtocolError) as info:
        decode(data, version)
    assert info.value.reason_code == ReasonCode.MALFORMED_PACKET


@pytest.mark.parametrize("version", [MQTT_3_1_1, MQTT_5])
@pytest.mark.parametrize("first_byte", [0x38, 0x39])
def test_publish_qos0_dup(version, first_byte):
    data = frame(first_byte, encode_string("t") + b"\x00")
    with pytest.raises(MQTTProtocolError) as info:
        decode(data, version)
    assert info.value.reason_code == ReasonCode.MALFORMED_PACKET


def test_publish_qos1_dup_accepted():
    packet = decode_one(frame(0x3A, encode_string("t") + b"\x00\x01\x00"), MQTT_5)
    assert packet == Publish("t", qos=1, dup=True, packet_id=1)


def test_publish_qos2_retain_flags():
    packet = decode_one(frame(0x35, encode_string("t") + b"\x00\x02"), MQTT_3_1_1)
    assert packet == Publish("t", qos=2, retain=True, packet_id=2)


# --- PUBLISH rules ----------------------------------------------------------------------------


@pytest.mark.parametrize("topic", ["a/+", "#", "a/#", "a+b", "x#"])
def test_publish_wildcard_topic(topic):
    data = Publish(topic).encode(MQTT_5)
    with pytest.raises(MQTTProtocolError) as info:
        decode(data, MQTT_5)
    assert info.value.reason_code == ReasonCode.TOPIC_NAME_INVALID


@pytest.mark.parametrize("version", [MQTT_3_1_1, MQTT_5])
def test_publish_empty_topic_no_alias(version):
    data = Publish("", b"x").encode(version)
    with pytest.raises(MQTTProtocolError) as info:
        decode(data, version)
    assert info.value.reason_code == ReasonCode.TOPIC_NAME_INVALID


def test_publish_v5_missing_property_length():
    data = frame(0x30, encode_string("t"))
    with pytest.raises(MQTTProtocolError) as info:
        decode(data, MQTT_5)
    assert info.value.reason_code == ReasonCode.MALFORMED_PACKET


def test_publish_truncated_packet_id():
    data = frame(0x32, encode_string("t") + b"\x00")
    with pytest.raises(MQTTProtocolError) as info:
        decode(data, MQTT_3_1_1)
    assert info.value.reason_code == ReasonCode.MALFORMED_PACKET


# --- packet identifiers -----------------------------------------------------------------------

# Packets whose packet identifier is 0, each otherwise valid for the version given.
_ZERO_PACKET_IDS = {
    "publish-qos1": (frame(0x32, encode_string("t") + b"\x00\x00"), MQTT_3_1_1),
    "publish-qos2": (frame(0x34, encode_string("t") + b"\x00\x00\x00"), MQTT_5),
    "puback": (b"\x40\x02\x00\x00", MQTT_3_1_1),
    "pubrec": (b"\x50\x02\x00\x00", MQTT_5),
    "pubrel": (b"\x62\x02\x00\x00", MQTT_5),
    "pubcomp": (b"\x70\x02\x00\x00", MQTT_3_1_1),
    "subscribe-v311": (frame(0x82, b"\x00\x00" + encode_string("a") + b"\x00"), MQTT_3_1_1),
    "subscribe-v5": (frame(0x82, b"\x00\x00\x00" + encode_string("a") + b"\x00"), MQTT_5),
    "suback-v311": (b"\x90\x03\x00\x00\x00", MQTT_3_1_1),
    "suback-v5": (b"\x90\x04\x00\x00\x00\x00", MQTT_5),
    "unsubscribe-v311": (frame(0xA2, b"\x00\x00" + encode_string("a")), MQTT_3_1_1),
    "unsubscribe-v5": (frame(0xA2, b"\x00\x00\x00" + encode_string("a")), MQTT_5),
    "unsuback-v311": (b"\xb0\x02\x00\x00", MQTT_3_1_1),
    "unsuback-v5": (b"\xb0\x04\x00\x00\x00\x00", MQTT_5),
}


@pytest.mark.parametrize("name", list(_ZERO_PACKET_IDS))
def test_packet_id_zero(name):
    data, version = _ZERO_PACKET_IDS[name]
    with pytest.raises(MQTTProtocolError) as info:
        decode(data, version)
    assert info.value.reason_code == ReasonCode.MALFORMED_PACKET


def test_publish_qos0_has_no_packet_id():
    # At QoS 0 the two bytes after the topic are payload, not a packet identifier.
    packet = decode_one(frame(0x30, encode_string("t") + b"\x00\x00"), MQTT_3_1_1)
    assert packet == Publish("t", b"\x00\x00")


# --- CONNECT rules ----------------------------------------------------------------------------


def connect_bytes(
    flags: int,
    payload: bytes = encode_string("c"),
    *,
    name: bytes = b"MQTT",
    level: int = MQTT_3_1_1,
) -> bytes:
    """Frame a CONNECT with the given flags byte and payload, with empty MQTT 5 properties."""
    body = encode_string(name.decode()) + bytes((level, flags)) + b"\x00\x3c"
    if level == MQTT_5:
        body += b"\x00"
    return frame(0x10, body + payload)


_WILL_PAYLOAD = encode_string("c") + encode_string("w/t") + b"\x00\x01x"


def test_connect_bytes_helper_valid():
    packet = decode_one(connect_bytes(0x02), MQTT_3_1_1)
    assert packet == Connect("c", keep_alive=60)


@pytest.mark.parametrize("level", [MQTT_3_1_1, MQTT_5])
def test_connect_reserved_flag(level):
    with pytest.raises(MQTTProtocolError) as info:
        decode(connect_bytes(0x03, level=level), MQTT_3_1_1)
    assert info.value.reason_code == ReasonCode.MALFORMED_PACKET


@pytest.mark.parametrize("level", [MQTT_3_1_1, MQTT_5])
@pytest.mark.parametrize("flags", [0x08, 0x10, 0x18, 0x20, 0x28])
def test_connect_will_bits_without_will(level, flags):
    with pytest.raises(MQTTProtocolError) as info:
        decode(connect_bytes(0x02 | flags, level=level), MQTT_3_1_1)
    assert info.value.reason_code == ReasonCode.MALFORMED_PACKET


@pytest.mark.parametrize("level", [MQTT_3_1_1, MQTT_5])
def test_connect_will_qos3(level):
    payload = _WILL_PAYLOAD
    if level == MQTT_5:
        payload = encode_string("c") + b"\x00" + encode_string("w/t") + b"\x00\x01x"
    with pytest.raises(MQTTProtocolError) as info:
        decode(connect_bytes(0x02 | 0x04 | 0x18, payload, level=level), MQTT_3_1_1)
    assert info.value.reason_code == ReasonCode.MALFORMED_PACKET


def test_connect_will_qos2_accepted():
    packet = decode_one(connect_bytes(0x02 | 0x04 | 0x10 | 0x20, _WILL_PAYLOAD), MQTT_3_1_1)
    assert packet.will == Will("w/t", b"x", qos=2, retain=True)


@pytest.mark.parametrize("level", [MQTT_3_1_1, MQTT_5])
@pytest.mark.parametrize("topic", ["", "a/+", "#", "a/#", "x+y"])
def test_connect_will_topic_invalid(level, topic):
    # The will topic is a topic name: at least one character and no wildcard.
    data = Connect("c", protocol_level=level, will=Will(topic, b"bye")).encode()
    with pytest.raises(MQTTProtocolError) as info:
        decode(data, MQTT_3_1_1)
    assert info.value.reason_code == ReasonCode.TOPIC_NAME_INVALID


def test_connect_v311_password_without_username():
    payload = encode_string("c") + b"\x00\x02pw"
    with pytest.raises(MQTTProtocolError) as info:
        decode(connect_bytes(0x02 | 0x40, payload), MQTT_3_1_1)
    assert info.value.reason_code == ReasonCode.MALFORMED_PACKET


@pytest.mark.parametrize(
    ("name", "level"),
    [(b"MQIsdp", 3), (b"MQTT", 3), (b"MQTT", 6), (b"MQTT", 0), (b"mqtt", 4), (b"MQTX", 5)],
)
def test_connect_unsupported_protocol(name, level):
    with pytest.raises(MQTTProtocolError) as info:
        decode(connect_bytes(0x02, name=name, level=level), MQTT_3_1_1)
    assert info.value.reason_code == ReasonCode.UNSUPPORTED_PROTOCOL_VERSION


def test_connect_trailing_bytes():
    with pytest.raises(MQTTProtocolError) as info:
        decode(connect_bytes(0x02, encode_string("c") + b"\x00"), MQTT_3_1_1)
    assert info.value.reason_code == ReasonCode.MALFORMED_PACKET


def test_connect_truncated_header():
    data = frame(0x10, encode_string("MQTT") + b"\x04\x02")
    with pytest.raises(MQTTProtocolError) as info:
        decode(data, MQTT_3_1_1)
    assert info.value.reason_code == ReasonCode.MALFORMED_PACKET


def test_connect_missing_username():
    with pytest.raises(MQTTProtocolError) as info:
        decode(connect_bytes(0x02 | 0x80), MQTT_3_1_1)
    assert info.value.reason_code == ReasonCode.MALFORMED_PACKET


# --- SUBSCRIBE and UNSUBSCRIBE rules ----------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "version"),
    [(b"\x82\x02\x00\x01", MQTT_3_1_1), (b"\x82\x03\x00\x01\x00", MQTT_5)],
)
def test_subscribe_no_filters(data, version):
    with pytest.raises(MQTTProtocolError) as info:
        decode(data, version)
    assert info.value.reason_code == ReasonCode.PROTOCOL_ERROR


@pytest.mark.parametrize(
    ("data", "version"),
    [(b"\xa2\x02\x00\x01", MQTT_3_1_1), (b"\xa2\x03\x00\x01\x00", MQTT_5)],
)
def test_unsubscribe_no_filters(data, version):
    with pytest.raises(MQTTProtocolError) as info:
        decode(data, version)
    assert info.value.reason_code == ReasonCode.PROTOCOL_ERROR


def subscribe_bytes(options: int, version: int) -> bytes:
    properties = b"\x00" if version == MQTT_5 else b""
    return frame(0x82, b"\x00\x01" + properties + encode_string("a/b") + bytes((options,)))


@pytest.mark.parametrize("options", [0x40, 0x80, 0xC0, 0x41])
def test_subscribe_v5_reserved_option_bits(options):
    with pytest.raises(MQTTProtocolError) as info:
        decode(subscribe_bytes(options, MQTT_5), MQTT_5)
    assert info.value.reason_code == ReasonCode.MALFORMED_PACKET


@pytest.mark.parametrize("options", [0x04, 0x08, 0x10, 0x20, 0x80])
def test_subscribe_v311_reserved_option_bits(options):
    with pytest.raises(MQTTProtocolError) as info:
        decode(subscribe_bytes(options, MQTT_3_1_1), MQTT_3_1_1)
    assert info.value.reason_code == ReasonCode.MALFORMED_PACKET


@pytest.mark.parametrize("options", [0x30, 0x31, 0x3E])
def test_subscribe_retain_handling_3(options):
    with pytest.raises(MQTTProtocolError) as info:
        decode(subscribe_bytes(options, MQTT_5), MQTT_5)
    assert info.value.reason_code == ReasonCode.MALFORMED_PACKET


@pytest.mark.parametrize("version", [MQTT_3_1_1, MQTT_5])
def test_subscribe_qos3(version):
    with pytest.raises(MQTTProtocolError) as info:
        decode(subscribe_bytes(0x03, version), version)
    assert info.value.reason_code == ReasonCode.MALFORMED_PACKET


def test_subscribe_v5_options_decoded():
    packet = decode_one(subscribe_bytes(0x2E, MQTT_5), MQTT_5)
    expected = Subscription("a/b", 2, no_local=True, retain_as_published=True, retain_handling=2)
    assert packet.subscriptions == [expected]


def test_subscribe_filter_without_options():
    data = frame(0x82, b"\x00\x01" + encode_string("a/b"))
    with pytest.raises(MQTTProtocolError) as info:
        decode(data, MQTT_3_1_1)
    assert info.value.reason_code == ReasonCode.MALFORMED_PACKET


# --- lengths and bodies -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "version"),
    [
        (b"\x40\x01\x00", MQTT_5),  # PUBACK shorter than its packet identifier
        (b"\x40\x03\x00\x01\x00", MQTT_3_1_1),  # 3.1.1 PUBACK longer than 2 bytes
        (b"\x40\x05\x00\x01\x00\x00\x00", MQTT_5),  # bytes after the properties
        (b"\x40\x04\x00\x01\x00\x05", MQTT_5),  # property length past the end
        (b"\x20\x01\x00", MQTT_5),  # CONNACK shorter than 2 bytes
        (b"\x20\x02\x02\x00", MQTT_3_1_1),  # CONNACK reserved flag bits
        (b"\x20\x03\x00\x00\x00\x00", MQTT_3_1_1),  # 3.1.1 CONNACK longer than 2 bytes
        (b"\x20\x04\x00\x00\x00\x00", MQTT_5),  # bytes after the CONNACK properties
        (b"\xc0\x01\x00", MQTT_5),  # PINGREQ with a body
        (b"\xd0\x01\x00", MQTT_3_1_1),  # PINGRESP with a body
        (b"\xe0\x01\x00", MQTT_3_1_1),  # 3.1.1 DISCONNECT with a body
        (b"\xe0\x03\x00\x00\x00", MQTT_5),  # bytes after the DISCONNECT properties
        (b"\xb0\x03\x00\x01\x00", MQTT_3_1_1),  # 3.1.1 UNSUBACK longer than 2 bytes
        (b"\x90\x01\x00", MQTT_5),  # SUBACK shorter than its packet identifier
    ],
)
def test_bad_length_malformed(data, version):
    with pytest.raises(MQTTProtocolError) as info:
        decode(data, version)
    assert info.value.reason_code == ReasonCode.MALFORMED_PACKET


@pytest.mark.parametrize(
    ("data", "version"),
    [(b"\x90\x02\x00\x01", MQTT_3_1_1), (b"\x90\x03\x00\x01\x00", MQTT_5)],
)
def test_suback_no_codes(data, version):
    with pytest.raises(MQTTProtocolError) as info:
        decode(data, version)
    assert info.value.reason_code == ReasonCode.PROTOCOL_ERROR


def test_auth_in_v311():
    with pytest.raises(MQTTProtocolError) as info:
        decode(b"\xf0\x00", MQTT_3_1_1)
    assert info.value.reason_code == ReasonCode.PROTOCOL_ERROR


def test_auth_empty_body_v5():
    assert decode_one(b"\xf0\x00", MQTT_5) == Auth()
