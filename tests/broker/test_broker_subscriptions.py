"""Subscriptions: wildcards, $ topics, shared subscriptions, subscription identifiers,
No Local, overlapping filters, unsubscribe and denied filters."""

from __future__ import annotations

import pytest
from paho.mqtt.packettypes import PacketTypes

from ironshadow.mqtt import MQTT_3_1_1, Disconnect, ReasonCode, Subscribe, Subscription
from mqtt_client import V5, V311, TestClient, properties
from raw_client import RawClient


@pytest.mark.parametrize(
    ("topic_filter", "topic", "matches"),
    [
        ("a/b/c", "a/b/c", True),
        ("a/b/c", "a/b", False),
        ("a/+/c", "a/x/c", True),
        ("a/+/c", "a/x/y/c", False),
        ("a/+", "a/", True),
        ("+/+", "/x", True),
        ("a/#", "a", True),
        ("a/#", "a/b/c/d", True),
        ("a/#", "ab/c", False),
        ("#", "any/topic/at/all", True),
        ("+", "a/b", False),
        ("a/+/#", "a/b", True),
        ("A/b", "a/b", False),
    ],
)
def test_wildcard_matching(broker, topic_filter, topic, matches):
    subscriber = TestClient(broker.port, "sub")
    subscriber.subscribe(topic_filter, 0)
    publisher = TestClient(broker.port, "pub")
    publisher.publish(topic, b"x", 1)
    if matches:
        assert subscriber.expect().topic == topic
    else:
        subscriber.expect_none()


@pytest.mark.parametrize("topic_filter", ["#", "+/status", "+/+"])
def test_leading_wildcard_skips_dollar_topics(broker, topic_filter):
    subscriber = TestClient(broker.port, "sub")
    subscriber.subscribe(topic_filter, 0)
    publisher = TestClient(broker.port, "pub")
    publisher.publish("$app/status", b"x", 1)
    subscriber.expect_none()


def test_explicit_dollar_filter_matches(broker):
    subscriber = TestClient(broker.port, "sub")
    subscriber.subscribe("$app/#", 0)
    publisher = TestClient(broker.port, "pub")
    publisher.publish("$app/status", b"x", 1)
    assert subscriber.expect().topic == "$app/status"


def share_among_three(port: int, qos: int) -> list[list[bytes]]:
    """Send 30 messages to a shared subscription of three members and return what each got."""
    members = [TestClient(port, f"member{index}") for index in range(3)]
    for member in members:
        member.subscribe("$share/workers/jobs/+", qos)
    publisher = TestClient(port, "pub")
    for index in range(30):
        publisher.publish("jobs/new", b"%02d" % index, 1)
    return [member.payloads_until_quiet() for member in members]


def test_shared_subscription_one_member_each(broker):
    received = share_among_three(broker.port, qos=1)
    everything = sorted(payload for payloads in received for payload in payloads)
    assert everything == [b"%02d" % index for index in range(30)]


def test_shared_subscription_balanced(broker):
    counts = [len(payloads) for payloads in share_among_three(broker.port, qos=0)]
    assert max(counts) - min(counts) <= 1


def test_shared_groups_each_get_copy(broker):
    first = TestClient(broker.port, "first")
    first.subscribe("$share/g1/jobs/#", 1)
    second = TestClient(broker.port, "second")
    second.subscribe("$share/g2/jobs/#", 1)
    plain = TestClient(broker.port, "plain")
    plain.subscribe("jobs/#", 1)
    publisher = TestClient(broker.port, "pub")
    publisher.publish("jobs/a", b"x", 1)
    for subscriber in (first, second, plain):
        assert subscriber.expect().payload == b"x"


def test_shared_skips_disconnected_member(broker):
    online = TestClient(broker.port, "online", V5)
    online.subscribe("$share/g/jobs", 1)
    offline = TestClient(
        broker.port,
        "offline",
        V5,
        clean=False,
        properties=properties(PacketTypes.CONNECT, SessionExpiryInterval=60),
    )
    offline.subscribe("$share/g/jobs", 1)
    offline.disconnect()
    publisher = TestClient(broker.port, "pub")
    for index in range(4):
        publisher.publish("jobs", str(index).encode(), 1)
    payloads = [online.expect().payload for _ in range(4)]
    assert payloads == [b"0", b"1", b"2", b"3"]


def test_shared_no_local_is_protocol_error(broker):
    client = RawClient(broker.port)
    client.connect("raw")
    client.send(Subscribe(1, [Subscription("$share/g/jobs", 1, no_local=True)]))
    assert client.wait_closed() == [Disconnect(ReasonCode.PROTOCOL_ERROR)]


def test_subscription_identifier_delivered(broker):
    subscriber = TestClient(broker.port, "sub")
    subscriber.subscribe(
        "s/+", 1, properties=properties(PacketTypes.SUBSCRIBE, SubscriptionIdentifier=42)
    )
    publisher = TestClient(broker.port, "pub")
    publisher.publish("s/t", b"x", 1)
    assert subscriber.expect().properties.SubscriptionIdentifier == [42]


def test_overlapping_filters_one_copy_all_ids(broker):
    subscriber = TestClient(broker.port, "sub")
    subscriber.subscribe(
        "s/+", 0, properties=properties(PacketTypes.SUBSCRIBE, SubscriptionIdentifier=1)
    )
    subscriber.subscribe(
        "s/#", 2, properties=properties(PacketTypes.SUBSCRIBE, SubscriptionIdentifier=2)
    )
    publisher = TestClient(broker.port, "pub")
    publisher.publish("s/t", b"x", 2)
    message = subscriber.expect()
    assert sorted(message.properties.SubscriptionIdentifier) == [1, 2]
    assert message.qos == 2
    subscriber.expect_none()


def test_no_identifier_without_subscription_id(broker):
    subscriber = TestClient(broker.port, "sub")
    subscriber.subscribe("s/t", 1)
    publisher = TestClient(broker.port, "pub")
    publisher.publish("s/t", b"x", 1)
    assert not hasattr(subscriber.expect().properties, "SubscriptionIdentifier")


def test_retained_carries_subscription_identifier(broker):
    publisher = TestClient(broker.port, "pub")
    publisher.publish("s/t", b"kept", 1, retain=True)
    subscriber = TestClient(broker.port, "sub")
    subscriber.subscribe(
        "s/#", 1, properties=properties(PacketTypes.SUBSCRIBE, SubscriptionIdentifier=7)
    )
    assert subscriber.expect().properties.SubscriptionIdentifier == [7]


def test_no_local_skips_own_messages(broker):
    client = TestClient(broker.port, "dev")
    client.subscribe("echo/t", 1, noLocal=True)
    other = TestClient(broker.port, "other")
    other.subscribe("echo/t", 1)
    client.publish("echo/t", b"mine", 1)
    assert other.expect().payload == b"mine"
    client.expect_none()


def test_no_local_allows_others_messages(broker):
    client = TestClient(broker.port, "dev")
    client.subscribe("echo/t", 1, noLocal=True)
    other = TestClient(broker.port, "other")
    other.publish("echo/t", b"theirs", 1)
    assert client.expect().payload == b"theirs"


def test_own_messages_delivered_without_no_local(broker):
    client = TestClient(broker.port, "dev")
    client.subscribe("echo/t", 1)
    client.publish("echo/t", b"mine", 1)
    assert client.expect().payload == b"mine"


@pytest.mark.parametrize("protocol", [V311, V5])
def test_unsubscribe_stops_delivery(broker, protocol):
    subscriber = TestClient(broker.port, "sub", protocol)
    subscriber.subscribe("u/t", 1)
    subscriber.unsubscribe("u/t")
    publisher = TestClient(broker.port, "pub")
    publisher.publish("u/t", b"x", 1)
    subscriber.expect_none()


def test_unsubscribe_unknown_filter_code(broker):
    subscriber = TestClient(broker.port, "sub")
    codes = subscriber.unsubscribe("never/subscribed")
    assert codes == [ReasonCode.NO_SUBSCRIPTION_EXISTED]


def test_resubscribe_replaces_qos(broker):
    subscriber = TestClient(broker.port, "sub")
    subscriber.subscribe("r/t", 0)
    subscriber.subscribe("r/t", 2)
    publisher = TestClient(broker.port, "pub")
    publisher.publish("r/t", b"x", 2)
    assert subscriber.expect().qos == 2
    subscriber.expect_none()


@pytest.mark.parametrize("protocol", [V311, V5])
def test_denied_filter_gets_0x80(make_broker, protocol):
    broker = make_broker(deny_subscriptions=("secret/#",))
    subscriber = TestClient(broker.port, "sub", protocol)
    for topic_filter in ("secret/#", "secret/keys", "secret/+/log"):
        codes = subscriber.subscribe(topic_filter, 1)
        assert codes == [ReasonCode.UNSPECIFIED_ERROR], topic_filter


def test_denied_filter_receives_nothing(make_broker):
    broker = make_broker(deny_subscriptions=("secret/#",))
    subscriber = TestClient(broker.port, "sub")
    subscriber.subscribe("secret/keys", 1)
    publisher = TestClient(broker.port, "pub")
    publisher.publish("secret/keys", b"x", 1)
    subscriber.expect_none()


def test_allowed_filter_beside_denied(make_broker):
    broker = make_broker(deny_subscriptions=("secret/#",))
    subscriber = TestClient(broker.port, "sub")
    assert subscriber.subscribe("public/#", 1) == [1]


def test_v5_invalid_filter_gets_0x8f(broker):
    client = RawClient(broker.port)
    client.connect("raw")
    suback = client.subscribe("a/#/b", 1)
    assert suback.reason_codes == [ReasonCode.TOPIC_FILTER_INVALID]
    assert client.is_open(wait=0.2)


def test_v311_invalid_filter_closes_connection(broker):
    client = RawClient(broker.port, MQTT_3_1_1)
    client.connect("raw")
    client.send(Subscribe(1, [Subscription("a/#/b", 1)]))
    assert client.wait_closed() == []
