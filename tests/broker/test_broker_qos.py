"""QoS 0, 1 and 2 flows through the broker: packet identifiers, in-flight windows in both
directions, redelivery on session resume and exactly-once delivery of QoS 2."""

from __future__ import annotations

import pytest

from ironshadow.mqtt import (
    MQTT_3_1_1,
    MQTT_5,
    Disconnect,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    ReasonCode,
)
from ironshadow.mqtt import PropertyId as P
from mqtt_client import V5, V311, TestClient
from raw_client import RawClient

PERSISTENT = {P.SESSION_EXPIRY_INTERVAL: 60}


def connect_persistent(port: int, version: int, client_id: str) -> RawClient:
    """Connect a raw client whose session outlives the connection, resuming any session
    the client id already has."""
    client = RawClient(port, version)
    properties = PERSISTENT if version == MQTT_5 else None
    connack = client.connect(client_id, clean_start=False, properties=properties)
    assert connack.reason_code == 0
    return client


@pytest.mark.parametrize("qos", [1, 2])
def test_paho_publish_completes_handshake(broker, qos):
    subscriber = TestClient(broker.port, "sub")
    subscriber.subscribe("q/t", qos)
    publisher = TestClient(broker.port, "pub", V311)
    info = publisher.publish("q/t", b"payload", qos)
    assert info.is_published()
    assert subscriber.expect().qos == qos


def test_publish_qos1_acknowledged_with_id(broker):
    client = RawClient(broker.port)
    client.connect("raw")
    client.send(Publish("q/t", b"x", qos=1, packet_id=4321))
    puback = client.receive(Puback)
    assert puback.packet_id == 4321


def test_publish_qos2_full_handshake(broker):
    subscriber = TestClient(broker.port, "sub")
    subscriber.subscribe("q/t", 2)
    client = RawClient(broker.port)
    client.connect("raw")
    client.send(Publish("q/t", b"x", qos=2, packet_id=77))
    pubrec = client.receive(Pubrec)
    assert pubrec.packet_id == 77
    assert pubrec.reason_code == ReasonCode.SUCCESS
    client.send(Pubrel(77))
    pubcomp = client.receive(Pubcomp)
    assert pubcomp.packet_id == 77
    assert subscriber.expect().payload == b"x"


def test_qos2_to_subscriber_handshake(broker):
    subscriber = RawClient(broker.port)
    subscriber.connect("raw-sub")
    subscriber.subscribe("q/t", 2)
    publisher = TestClient(broker.port, "pub")
    publisher.publish("q/t", b"x", 2)
    publish = subscriber.receive(Publish)
    assert publish.qos == 2
    assert publish.packet_id != 0
    subscriber.send(Pubrec(publish.packet_id))
    pubrel = subscriber.receive(Pubrel)
    assert pubrel.packet_id == publish.packet_id
    subscriber.send(Pubcomp(publish.packet_id))
    owner = broker.owner("raw-sub")
    assert owner.call(lambda: len(owner.broker.sessions["raw-sub"].inflight)) == 0


def test_unacked_messages_get_distinct_ids(broker):
    subscriber = RawClient(broker.port)
    subscriber.connect("raw-sub")
    subscriber.subscribe("q/t", 1)
    publisher = TestClient(broker.port, "pub")
    for index in range(5):
        publisher.publish("q/t", str(index).encode(), 1)
    ids = [publish.packet_id for publish in subscriber.receive_publishes(5)]
    assert 0 not in ids
    assert len(set(ids)) == 5


def test_client_receive_maximum_limits_inflight(broker):
    subscriber = RawClient(broker.port)
    subscriber.connect("raw-sub", properties={P.RECEIVE_MAXIMUM: 2})
    subscriber.subscribe("q/t", 1)
    publisher = TestClient(broker.port, "pub")
    for index in range(5):
        publisher.publish("q/t", str(index).encode(), 1)
    first, second = subscriber.receive_publishes(2)
    subscriber.receive_none()
    subscriber.send(Puback(first.packet_id))
    third = subscriber.receive(Publish)
    assert third.payload == b"2"
    subscriber.receive_none()
    subscriber.send(Puback(second.packet_id), Puback(third.packet_id))
    fourth, fifth = subscriber.receive_publishes(2)
    assert [fourth.payload, fifth.payload] == [b"3", b"4"]


def test_receive_maximum_counts_until_pubcomp(broker):
    subscriber = RawClient(broker.port)
    subscriber.connect("raw-sub", properties={P.RECEIVE_MAXIMUM: 1})
    subscriber.subscribe("q/t", 2)
    publisher = TestClient(broker.port, "pub")
    publisher.publish("q/t", b"0", 2)
    publisher.publish("q/t", b"1", 2)
    first = subscriber.receive(Publish)
    subscriber.send(Pubrec(first.packet_id))
    subscriber.receive(Pubrel)
    subscriber.receive_none()
    subscriber.send(Pubcomp(first.packet_id))
    assert subscriber.receive(Publish).payload == b"1"


def test_v311_inflight_window_from_config(make_broker):
    broker = make_broker(max_inflight_v311=3)
    subscriber = RawClient(broker.port, MQTT_3_1_1)
    subscriber.connect("raw-sub")
    subscriber.subscribe("q/t", 1)
    publisher = TestClient(broker.port, "pub")
    for index in range(5):
        publisher.publish("q/t", str(index).encode(), 1)
    first = subscriber.receive_publishes(3)[0]
    subscriber.receive_none()
    subscriber.send(Puback(first.packet_id))
    assert subscriber.receive(Publish).payload == b"3"


def test_broker_announces_receive_maximum(make_broker):
    broker = make_broker(receive_maximum=7)
    client = RawClient(broker.port)
    connack = client.connect("raw")
    assert connack.properties[P.RECEIVE_MAXIMUM] == 7


def test_exceeding_broker_receive_maximum_disconnects(make_broker):
    broker = make_broker(receive_maximum=2)
    client = RawClient(broker.port)
    client.connect("raw")
    for packet_id in (1, 2):
        client.send(Publish("q/t", b"x", qos=2, packet_id=packet_id))
        assert client.receive(Pubrec).packet_id == packet_id
    client.send(Publish("q/t", b"x", qos=2, packet_id=3))
    packets = client.wait_closed()
    assert packets == [Disconnect(ReasonCode.RECEIVE_MAXIMUM_EXCEEDED)]


@pytest.mark.parametrize("version", [MQTT_3_1_1, MQTT_5])
def test_sys_publishes_count_against_receive_maximum(make_broker, version):
    # The broker discards a client's messages to $SYS topics, but a QoS 2 one still waits
    # for PUBREL, so it takes a slot like any other.
    broker = make_broker(receive_maximum=2)
    client = RawClient(broker.port, version)
    client.connect("raw")
    for packet_id in (1, 2):
        client.send(Publish("$SYS/x", b"x", qos=2, packet_id=packet_id))
        assert client.receive(Pubrec).packet_id == packet_id
    client.send(Publish("$SYS/x", b"x", qos=2, packet_id=3))
    packets = client.wait_closed()
    if version == MQTT_5:
        assert packets == [Disconnect(ReasonCode.RECEIVE_MAXIMUM_EXCEEDED)]
    else:
        assert packets == []


def test_pubrel_frees_inbound_qos2_slot(make_broker):
    broker = make_broker(receive_maximum=1)
    client = RawClient(broker.port)
    client.connect("raw")
    for packet_id in (1, 2, 3):
        client.send(Publish("q/t", b"x", qos=2, packet_id=packet_id))
        client.receive(Pubrec)
        client.send(Pubrel(packet_id))
        assert client.receive(Pubcomp).packet_id == packet_id


@pytest.mark.parametrize("version", [MQTT_3_1_1, MQTT_5])
def test_resumed_session_redelivers_with_dup(broker, version):
    subscriber = connect_persistent(broker.port, version, "raw-sub")
    subscriber.subscribe("q/t", 1)
    publisher = TestClient(broker.port, "pub")
    publisher.publish("q/t", b"unacked", 1)
    original = subscriber.receive(Publish)
    assert not original.dup
    subscriber.close()

    resumed = RawClient(broker.port, version)
    properties = PERSISTENT if version == MQTT_5 else None
    connack = resumed.connect("raw-sub", clean_start=False, properties=properties)
    assert connack.session_present
    again = resumed.receive(Publish)
    assert again.dup
    assert again.packet_id == original.packet_id
    assert again.payload == b"unacked"
    resumed.send(Puback(again.packet_id))
    resumed.receive_none()


@pytest.mark.parametrize("version", [MQTT_3_1_1, MQTT_5])
def test_resumed_session_resends_pubrel(broker, version):
    subscriber = connect_persistent(broker.port, version, "raw-sub")
    subscriber.subscribe("q/t", 2)
    publisher = TestClient(broker.port, "pub")
    publisher.publish("q/t", b"past pubrec", 2)
    publish = subscriber.receive(Publish)
    subscriber.send(Pubrec(publish.packet_id))
    subscriber.receive(Pubrel)
    subscriber.close()

    resumed = connect_persistent(broker.port, version, "raw-sub")
    pubrel = resumed.receive(Pubrel)
    assert pubrel.packet_id == publish.packet_id
    resumed.send(Pubcomp(pubrel.packet_id))
    resumed.receive_none()


def test_redelivery_keeps_original_order(broker):
    subscriber = connect_persistent(broker.port, MQTT_5, "raw-sub")
    subscriber.subscribe("q/t", 1)
    publisher = TestClient(broker.port, "pub")
    for index in range(3):
        publisher.publish("q/t", str(index).encode(), 1)
    first_ids = [publish.packet_id for publish in subscriber.receive_publishes(3)]
    subscriber.close()

    resumed = connect_persistent(broker.port, MQTT_5, "raw-sub")
    again = resumed.receive_publishes(3)
    assert [publish.packet_id for publish in again] == first_ids
    assert [publish.payload for publish in again] == [b"0", b"1", b"2"]


def test_retransmitted_qos2_delivered_once(broker):
    subscriber = TestClient(broker.port, "sub")
    subscriber.subscribe("q/t", 2)
    client = RawClient(broker.port)
    client.connect("raw")
    client.send(Publish("q/t", b"once", qos=2, packet_id=9))
    client.receive(Pubrec)
    client.send(Publish("q/t", b"once", qos=2, dup=True, packet_id=9))
    assert client.receive(Pubrec).packet_id == 9
    client.send(Pubrel(9))
    client.receive(Pubcomp)
    assert subscriber.expect().payload == b"once"
    subscriber.expect_none()


def test_qos2_retransmit_after_reconnect_once(broker):
    subscriber = TestClient(broker.port, "sub")
    subscriber.subscribe("q/t", 2)
    client = connect_persistent(broker.port, MQTT_5, "raw")
    client.send(Publish("q/t", b"once", qos=2, packet_id=9))
    client.receive(Pubrec)
    client.close()

    resumed = connect_persistent(broker.port, MQTT_5, "raw")
    resumed.send(Publish("q/t", b"once", qos=2, dup=True, packet_id=9))
    assert resumed.receive(Pubrec).packet_id == 9
    resumed.send(Pubrel(9))
    resumed.receive(Pubcomp)
    assert subscriber.expect().payload == b"once"
    subscriber.expect_none()


def test_packet_id_reused_after_pubrel(broker):
    subscriber = TestClient(broker.port, "sub")
    subscriber.subscribe("q/t", 2)
    client = RawClient(broker.port)
    client.connect("raw")
    for payload in (b"first", b"second"):
        client.send(Publish("q/t", payload, qos=2, packet_id=5))
        client.receive(Pubrec)
        client.send(Pubrel(5))
        client.receive(Pubcomp)
    assert subscriber.expect().payload == b"first"
    assert subscriber.expect().payload == b"second"


def test_qos1_without_subscribers_reason_code(broker):
    client = RawClient(broker.port)
    client.connect("raw")
    client.send(Publish("nobody/listens", b"x", qos=1, packet_id=1))
    puback = client.receive(Puback)
    assert puback.reason_code == ReasonCode.NO_MATCHING_SUBSCRIBERS


@pytest.mark.parametrize("protocol", [V311, V5])
def test_qos0_subscriber_gets_qos0(broker, protocol):
    subscriber = TestClient(broker.port, "sub", protocol)
    subscriber.subscribe("q/t", 0)
    publisher = TestClient(broker.port, "pub", protocol)
    publisher.publish("q/t", b"x", 2)
    assert subscriber.expect().qos == 0
