"""MQTT 5 features: topic aliases, maximum packet size, client identifiers, message expiry
and the properties a broker passes through unchanged."""

from __future__ import annotations

import time

from paho.mqtt.packettypes import PacketTypes

from conftest import scaled
from ironshadow.broker.access import AccessPolicy
from ironshadow.mqtt import (
    MQTT_3_1_1,
    ConnackReturnCode,
    Disconnect,
    PropertyId,
    Puback,
    Publish,
    ReasonCode,
)
from mqtt_client import V5, V311, TestClient, properties
from raw_client import RawClient

ALIAS = PropertyId.TOPIC_ALIAS


def publish_props(**values):
    return properties(PacketTypes.PUBLISH, **values)


# --- topic aliases ----------------------------------------------------------------------


def test_client_topic_alias_resolved(broker):
    subscriber = TestClient(broker.port, "sub")
    subscriber.subscribe("alias/#", 1)
    client = RawClient(broker.port)
    client.connect("raw")
    client.send(
        Publish("alias/long/topic", b"1", properties={ALIAS: 1}),
        Publish("", b"2", properties={ALIAS: 1}),
    )
    for payload in (b"1", b"2"):
        message = subscriber.expect()
        assert message.topic == "alias/long/topic"
        assert message.payload == payload


def test_client_topic_alias_remapped(broker):
    subscriber = TestClient(broker.port, "sub")
    subscriber.subscribe("alias/#", 1)
    client = RawClient(broker.port)
    client.connect("raw")
    client.send(
        Publish("alias/first", b"1", properties={ALIAS: 1}),
        Publish("alias/second", b"2", properties={ALIAS: 1}),
        Publish("", b"3", properties={ALIAS: 1}),
    )
    topics = [subscriber.expect().topic for _ in range(3)]
    assert topics == ["alias/first", "alias/second", "alias/second"]


def test_broker_announces_topic_alias_maximum(make_broker):
    broker = make_broker(topic_alias_maximum=3)
    client = RawClient(broker.port)
    connack = client.connect("raw")
    assert connack.properties[PropertyId.TOPIC_ALIAS_MAXIMUM] == 3


def test_alias_over_maximum_disconnects(make_broker):
    broker = make_broker(topic_alias_maximum=2)
    client = RawClient(broker.port)
    client.connect("raw")
    client.send(Publish("alias/t", b"x", properties={ALIAS: 3}))
    assert client.wait_closed() == [Disconnect(ReasonCode.TOPIC_ALIAS_INVALID)]


def test_unknown_alias_disconnects(broker):
    client = RawClient(broker.port)
    client.connect("raw")
    client.send(Publish("", b"x", properties={ALIAS: 1}))
    assert client.wait_closed() == [Disconnect(ReasonCode.PROTOCOL_ERROR)]


def test_alias_not_forwarded_to_subscriber(broker):
    subscriber = TestClient(broker.port, "sub")
    subscriber.subscribe("alias/#", 1)
    client = RawClient(broker.port)
    client.connect("raw")
    client.send(Publish("alias/t", b"x", properties={ALIAS: 1}))
    assert not hasattr(subscriber.expect().properties, "TopicAlias")


def test_broker_assigns_aliases_to_subscriber(broker):
    subscriber = RawClient(broker.port)
    subscriber.connect("raw", properties={PropertyId.TOPIC_ALIAS_MAXIMUM: 1})
    subscriber.subscribe("alias/#", 0)
    publisher = TestClient(broker.port, "pub")
    for topic in ("alias/a", "alias/a", "alias/b"):
        publisher.publish(topic, b"x", 1)
    first, second, third = subscriber.receive_publishes(3)
    assert first.topic == "alias/a"
    assert first.properties[ALIAS] == 1
    assert second.topic == ""
    assert second.properties[ALIAS] == 1
    # The only alias is taken, so another topic goes out in full and without an alias.
    assert third.topic == "alias/b"
    assert ALIAS not in third.properties


def test_no_aliases_without_client_maximum(broker):
    subscriber = RawClient(broker.port)
    subscriber.connect("raw")
    subscriber.subscribe("alias/#", 0)
    publisher = TestClient(broker.port, "pub")
    publisher.publish("alias/a", b"x", 1)
    publisher.publish("alias/a", b"x", 1)
    for publish in subscriber.receive_publishes(2):
        assert publish.topic == "alias/a"
        assert ALIAS not in publish.properties


# --- maximum packet size ----------------------------------------------------------------


def test_large_message_skips_limited_subscriber(broker):
    limited = TestClient(
        broker.port, "limited", properties=properties(PacketTypes.CONNECT, MaximumPacketSize=100)
    )
    limited.subscribe("big/t", 1)
    unlimited = TestClient(broker.port, "unlimited")
    unlimited.subscribe("big/t", 1)
    publisher = TestClient(broker.port, "pub")
    publisher.publish("big/t", b"x" * 500, 1)
    publisher.publish("big/t", b"small", 1)
    assert unlimited.expect().payload == b"x" * 500
    assert unlimited.expect().payload == b"small"
    assert limited.expect().payload == b"small"
    limited.expect_none()


def test_oversized_message_counted_dropped(broker):
    limited = TestClient(
        broker.port, "limited", properties=properties(PacketTypes.CONNECT, MaximumPacketSize=100)
    )
    limited.subscribe("big/t", 0)
    publisher = TestClient(broker.port, "pub")
    publisher.publish("big/t", b"x" * 500, 1)
    owner = broker.owner("limited")
    assert owner.call(lambda: owner.broker.stats.publish_dropped) == 1


def test_rejecting_connack_fits_max_packet_size(broker):
    # [MQTT-3.2.2-19] The reason string is left out when it would make CONNACK too large.
    unlimited = RawClient(broker.port).connect("$internal/x")
    assert PropertyId.REASON_STRING in unlimited.properties
    limited = RawClient(broker.port).connect(
        "$internal/x", properties={PropertyId.MAXIMUM_PACKET_SIZE: 20}
    )
    assert limited.reason_code == ReasonCode.CLIENT_IDENTIFIER_NOT_VALID
    assert limited.properties == {}


def test_rate_limit_connack_fits_max_packet_size(make_broker):
    broker = make_broker(connect_rate_per_address=0.001, connect_burst_per_address=1)
    RawClient(broker.port).connect("first")
    unlimited = RawClient(broker.port).connect("second")
    assert unlimited.reason_code == ReasonCode.CONNECTION_RATE_EXCEEDED
    assert PropertyId.REASON_STRING in unlimited.properties
    limited = RawClient(broker.port).connect(
        "third", properties={PropertyId.MAXIMUM_PACKET_SIZE: 20}
    )
    assert limited.reason_code == ReasonCode.CONNECTION_RATE_EXCEEDED
    assert limited.properties == {}


class _NoPublishing(AccessPolicy):
    def restricts(self, principal):
        return True

    def may_publish(self, principal, client_id, topic):
        return False


def test_denied_puback_fits_max_packet_size(broker):
    # [MQTT-3.4.2-2] The reason string is left out when it would make PUBACK too large.
    owner = broker.owner("limited")
    owner.call(setattr, owner.broker, "access", _NoPublishing())
    client = RawClient(broker.port)
    client.connect("limited", properties={PropertyId.MAXIMUM_PACKET_SIZE: 16})
    client.send(Publish("a/b", b"x", 1, packet_id=1))
    puback = client.receive(Puback)
    assert puback.reason_code == ReasonCode.NOT_AUTHORIZED
    assert puback.properties == {}


def test_broker_announces_max_packet_size(make_broker):
    broker = make_broker(max_packet_size=4096)
    client = TestClient(broker.port, "dev")
    assert client.connack[2].MaximumPacketSize == 4096


def test_oversized_packet_disconnects_v5(make_broker):
    broker = make_broker(max_packet_size=256)
    client = RawClient(broker.port)
    client.connect("raw")
    client.send(Publish("big/t", b"x" * 300))
    assert client.wait_closed() == [Disconnect(ReasonCode.PACKET_TOO_LARGE)]


def test_oversized_packet_closes_v311(make_broker):
    broker = make_broker(max_packet_size=256)
    client = RawClient(broker.port, MQTT_3_1_1)
    client.connect("raw")
    client.send(Publish("big/t", b"x" * 300))
    assert client.wait_closed() == []


def test_packet_at_max_size_accepted(make_broker):
    broker = make_broker(max_packet_size=256)
    subscriber = TestClient(broker.port, "sub")
    subscriber.subscribe("big/t", 0)
    client = RawClient(broker.port)
    client.connect("raw")
    empty = len(Publish("big/t", b"").encode(5))
    client.send(Publish("big/t", b"x" * (256 - empty - 1)))
    assert len(subscriber.expect().payload) == 256 - empty - 1


# --- client identifiers -----------------------------------------------------------------


def test_empty_client_id_gets_assigned(broker):
    first = TestClient(broker.port, "", V5)
    second = TestClient(broker.port, "", V5)
    first_id = first.connack[2].AssignedClientIdentifier
    second_id = second.connack[2].AssignedClientIdentifier
    assert first_id
    assert second_id != first_id


def test_assigned_id_names_the_session(broker):
    client = TestClient(broker.port, "", V5)
    assigned = client.connack[2].AssignedClientIdentifier
    # A client without an id stays on the worker that accepted its connection.
    assert any(
        engine.call(lambda engine=engine: assigned in engine.broker.sessions)
        for engine in broker.engines
    )


def test_v311_empty_id_persistent_rejected(broker):
    client = RawClient(broker.port, MQTT_3_1_1)
    connack = client.connect("", clean_start=False)
    assert connack.reason_code == ConnackReturnCode.IDENTIFIER_REJECTED
    assert client.wait_closed() == []


def test_v311_empty_id_clean_accepted(broker):
    client = RawClient(broker.port, MQTT_3_1_1)
    connack = client.connect("", clean_start=True)
    assert connack.reason_code == ConnackReturnCode.ACCEPTED


# --- message expiry ---------------------------------------------------------------------


def queue_for_offline(port: int, payload: bytes, expiry: int | None) -> TestClient:
    """Subscribe a persistent v5 client, disconnect it and publish one message to it."""
    subscriber = TestClient(
        port,
        "dev",
        V5,
        clean=False,
        properties=properties(PacketTypes.CONNECT, SessionExpiryInterval=60),
    )
    subscriber.subscribe("exp/t", 1)
    subscriber.disconnect()
    publisher = TestClient(port, "pub")
    props = None if expiry is None else publish_props(MessageExpiryInterval=expiry)
    publisher.publish("exp/t", payload, 1, properties=props)
    publisher.disconnect()
    return subscriber


def test_expired_queued_message_dropped(broker):
    subscriber = queue_for_offline(broker.port, b"stale", expiry=1)
    time.sleep(scaled(1.2))
    subscriber.connect()
    subscriber.expect_none()


def test_unexpired_queued_message_delivered(broker):
    subscriber = queue_for_offline(broker.port, b"fresh", expiry=60)
    subscriber.connect()
    assert subscriber.expect().payload == b"fresh"


def test_queued_expiry_interval_reduced(broker):
    subscriber = queue_for_offline(broker.port, b"aging", expiry=10)
    time.sleep(scaled(1.1))
    subscriber.connect()
    assert subscriber.expect().properties.MessageExpiryInterval <= 9


def test_message_without_expiry_has_none(broker):
    subscriber = queue_for_offline(broker.port, b"forever", expiry=None)
    subscriber.connect()
    assert not hasattr(subscriber.expect().properties, "MessageExpiryInterval")


# --- properties passed through ----------------------------------------------------------


def test_request_response_properties_forwarded(broker):
    subscriber = TestClient(broker.port, "sub")
    subscriber.subscribe("req/t", 1)
    publisher = TestClient(broker.port, "pub")
    publisher.publish(
        "req/t",
        b"{}",
        1,
        properties=publish_props(
            ResponseTopic="resp/pub",
            CorrelationData=b"\x00\x01corr",
            UserProperty=[("trace", "abc"), ("trace", "def")],
            ContentType="application/json",
            PayloadFormatIndicator=1,
        ),
    )
    received = subscriber.expect().properties
    assert received.ResponseTopic == "resp/pub"
    assert received.CorrelationData == b"\x00\x01corr"
    assert received.UserProperty == [("trace", "abc"), ("trace", "def")]
    assert received.ContentType == "application/json"
    assert received.PayloadFormatIndicator == 1


def test_v311_subscriber_gets_plain_message(broker):
    subscriber = TestClient(broker.port, "sub", V311)
    subscriber.subscribe("req/t", 1)
    publisher = TestClient(broker.port, "pub")
    publisher.publish(
        "req/t", b"body", 1, properties=publish_props(UserProperty=[("trace", "abc")])
    )
    assert subscriber.expect().payload == b"body"


def test_client_subscription_identifier_disconnects(broker):
    subscriber = RawClient(broker.port)
    subscriber.connect("listener")
    subscriber.subscribe("sid/t", 0)
    client = RawClient(broker.port)
    client.connect("raw")
    client.send(Publish("sid/t", b"x", properties={PropertyId.SUBSCRIPTION_IDENTIFIER: [5]}))
    assert client.wait_closed() == [Disconnect(ReasonCode.PROTOCOL_ERROR)]
    subscriber.receive_none()


def test_invalid_utf8_payload_disconnects(broker):
    client = RawClient(broker.port)
    client.connect("raw")
    client.send(
        Publish("fmt/t", b"\xff\xfe", properties={PropertyId.PAYLOAD_FORMAT_INDICATOR: 1})
    )
    assert client.wait_closed() == [Disconnect(ReasonCode.PAYLOAD_FORMAT_INVALID)]
