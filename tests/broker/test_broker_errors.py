"""Malformed and forbidden packets: v5 clients get DISCONNECT or CONNACK with the reason
code, 3.1.1 sockets are closed, and the other clients keep working."""

from __future__ import annotations

import pytest

from ironshadow.mqtt import (
    MQTT_3_1_1,
    MQTT_5,
    Auth,
    Connack,
    ConnackReturnCode,
    Connect,
    Disconnect,
    Pingreq,
    PropertyId,
    Publish,
    ReasonCode,
    Will,
)
from mqtt_client import V311, TestClient
from raw_client import RawClient

QOS1_PUBLISH = Publish("e/t", b"x", qos=1, packet_id=1).encode(MQTT_5)

# (case, bytes sent after a successful v5 CONNECT, reason code in the DISCONNECT)
BAD_V5_PACKETS = [
    ("reserved type 0", b"\x00\x00", ReasonCode.MALFORMED_PACKET),
    ("publish qos 3", bytes((0x36,)) + QOS1_PUBLISH[1:], ReasonCode.MALFORMED_PACKET),
    ("qos 0 with dup", b"\x38\x04\x00\x01ax", ReasonCode.MALFORMED_PACKET),
    ("length over 4 bytes", b"\x30\xff\xff\xff\xff\x01", ReasonCode.MALFORMED_PACKET),
    ("pubrel flags", b"\x60\x02\x00\x01", ReasonCode.MALFORMED_PACKET),
    ("packet id 0", b"\x32\x06\x00\x01a\x00\x00\x00", ReasonCode.MALFORMED_PACKET),
    ("unknown property", b"\x30\x06\x00\x01a\x02\x7f\x00", ReasonCode.MALFORMED_PACKET),
    ("invalid utf-8 topic", b"\x30\x05\x00\x02\xc3\x28\x00", ReasonCode.MALFORMED_PACKET),
    ("wildcard topic", b"\x30\x05\x00\x02a#\x00", ReasonCode.TOPIC_NAME_INVALID),
    ("second connect", Connect("again", MQTT_5).encode(), ReasonCode.PROTOCOL_ERROR),
    # Unsupported Protocol Version is a CONNACK code, not valid in DISCONNECT.
    ("second connect, level 3", Connect("again", 3).encode(), ReasonCode.PROTOCOL_ERROR),
    ("auth", Auth().encode(), ReasonCode.PROTOCOL_ERROR),
    ("connack from client", Connack().encode(MQTT_5), ReasonCode.PROTOCOL_ERROR),
]


@pytest.mark.parametrize(
    ("data", "reason"),
    [case[1:] for case in BAD_V5_PACKETS],
    ids=[case[0] for case in BAD_V5_PACKETS],
)
def test_v5_bad_packet_disconnect_reason(broker, data, reason):
    client = RawClient(broker.port)
    client.connect("raw")
    client.send(data)
    assert client.wait_closed() == [Disconnect(reason)]


@pytest.mark.parametrize(
    "data",
    [b"\x00\x00", bytes((0x36,)) + QOS1_PUBLISH[1:], b"\x30\xff\xff\xff\xff\x01"],
    ids=["reserved type 0", "publish qos 3", "length over 4 bytes"],
)
def test_v311_malformed_closes_socket(broker, data):
    client = RawClient(broker.port, MQTT_3_1_1)
    client.connect("raw")
    client.send(data)
    assert client.wait_closed() == []


def test_others_unaffected_by_malformed(broker):
    subscriber = TestClient(broker.port, "sub", V311)
    subscriber.subscribe("e/t", 1)
    publisher = TestClient(broker.port, "pub")
    bad = RawClient(broker.port)
    bad.connect("bad")
    bad.send(b"\x00\x00")
    bad.wait_closed()
    publisher.publish("e/t", b"after", 1)
    assert subscriber.expect().payload == b"after"


def test_malformed_counted_in_stats(broker):
    client = RawClient(broker.port)
    client.connect("raw")
    client.send(b"\x00\x00")
    client.wait_closed()
    owner = broker.owner("raw")
    assert owner.call(lambda: owner.broker.stats.protocol_errors) == 1


def test_malformed_publishes_will(broker):
    watcher = TestClient(broker.port, "watcher")
    watcher.subscribe("wills/#", 1)
    client = RawClient(broker.port)
    client.connect("raw", will=Will("wills/raw", b"broken", 1))
    client.send(b"\x00\x00")
    assert watcher.expect().payload == b"broken"


def test_packet_before_connect_closed(broker):
    client = RawClient(broker.port)
    client.send(Pingreq())
    assert client.wait_closed() == []


def test_unsupported_protocol_level_rejected(broker):
    client = RawClient(broker.port, MQTT_3_1_1)
    client.send(Connect("raw", 6))
    packets = client.wait_closed()
    assert packets == [Connack(ConnackReturnCode.UNACCEPTABLE_PROTOCOL_VERSION)]


def test_v5_bad_connect_gets_connack_reason(broker):
    client = RawClient(broker.port)
    # CONNECT with a Topic Alias property, which CONNECT may not carry.
    client.send(Connect("raw", MQTT_5, properties={PropertyId.TOPIC_ALIAS: 1}))
    packets = client.wait_closed()
    assert len(packets) == 1
    assert isinstance(packets[0], Connack)
    assert packets[0].reason_code == ReasonCode.PROTOCOL_ERROR


def test_v5_auth_method_rejected(broker):
    client = RawClient(broker.port)
    connack = client.connect("raw", properties={PropertyId.AUTHENTICATION_METHOD: "SCRAM-SHA-1"})
    assert connack.reason_code == ReasonCode.BAD_AUTHENTICATION_METHOD


def test_internal_client_id_rejected(broker):
    client = RawClient(broker.port, MQTT_5)
    connack = client.connect("$internal/shadow")
    assert connack.reason_code == ReasonCode.CLIENT_IDENTIFIER_NOT_VALID
    assert "reserved" in connack.properties[PropertyId.REASON_STRING]
