"""Retained messages: storage, deletion, expiry, the retain flag on delivery and the v5
Retain Handling and Retain As Published options."""

from __future__ import annotations

import time

import pytest
from paho.mqtt.packettypes import PacketTypes

from conftest import scaled
from ironshadow.mqtt import ReasonCode
from mqtt_client import V5, V311, TestClient, properties


def retain(port: int, topic: str, payload: bytes, qos: int = 1, expiry: int | None = None):
    publisher = TestClient(port, "retainer")
    props = None
    if expiry is not None:
        props = properties(PacketTypes.PUBLISH, MessageExpiryInterval=expiry)
    publisher.publish(topic, payload, qos, retain=True, properties=props)
    publisher.disconnect()


@pytest.mark.parametrize("protocol", [V311, V5])
def test_retained_sent_on_subscribe(broker, protocol):
    retain(broker.port, "r/t", b"last value")
    subscriber = TestClient(broker.port, "sub", protocol)
    subscriber.subscribe("r/t", 1)
    message = subscriber.expect()
    assert message.payload == b"last value"
    assert message.retain


def test_retained_matched_by_wildcards(broker):
    retain(broker.port, "r/a/x", b"1")
    retain(broker.port, "r/b/x", b"2")
    retain(broker.port, "r/b/y", b"3")
    subscriber = TestClient(broker.port, "sub")
    subscriber.subscribe("r/+/x", 0)
    payloads = {subscriber.expect().payload for _ in range(2)}
    assert payloads == {b"1", b"2"}
    subscriber.expect_none()


def test_newer_retained_replaces_older(broker):
    retain(broker.port, "r/t", b"old")
    retain(broker.port, "r/t", b"new")
    subscriber = TestClient(broker.port, "sub")
    subscriber.subscribe("r/t", 1)
    assert subscriber.expect().payload == b"new"
    subscriber.expect_none()


def test_empty_payload_deletes_retained(broker):
    retain(broker.port, "r/t", b"value")
    retain(broker.port, "r/t", b"")
    subscriber = TestClient(broker.port, "sub")
    subscriber.subscribe("r/t", 1)
    subscriber.expect_none()
    for engine in broker.engines:
        assert engine.call(lambda engine=engine: engine.broker.retained.count) == 0


def test_empty_retained_still_forwarded(broker):
    subscriber = TestClient(broker.port, "sub")
    subscriber.subscribe("r/t", 1)
    retain(broker.port, "r/t", b"")
    assert subscriber.expect().payload == b""


def test_expired_retained_not_sent(broker):
    retain(broker.port, "r/t", b"short-lived", expiry=1)
    time.sleep(scaled(1.2))
    subscriber = TestClient(broker.port, "sub")
    subscriber.subscribe("r/t", 1)
    subscriber.expect_none()


def test_retained_expiry_counts_down(broker):
    retain(broker.port, "r/t", b"value", expiry=10)
    time.sleep(scaled(1.1))
    subscriber = TestClient(broker.port, "sub")
    subscriber.subscribe("r/t", 1)
    message = subscriber.expect()
    assert message.properties.MessageExpiryInterval <= 9


@pytest.mark.parametrize("protocol", [V311, V5])
def test_live_forwarding_clears_retain_flag(broker, protocol):
    subscriber = TestClient(broker.port, "sub", protocol)
    subscriber.subscribe("r/t", 1)
    retain(broker.port, "r/t", b"value")
    assert not subscriber.expect().retain


def test_retain_as_published_keeps_flag(broker):
    subscriber = TestClient(broker.port, "sub")
    subscriber.subscribe("r/t", 1, retainAsPublished=True)
    retain(broker.port, "r/t", b"value")
    assert subscriber.expect().retain


def test_retain_as_published_plain_message(broker):
    subscriber = TestClient(broker.port, "sub")
    subscriber.subscribe("r/t", 1, retainAsPublished=True)
    publisher = TestClient(broker.port, "pub")
    publisher.publish("r/t", b"not retained", 1)
    assert not subscriber.expect().retain


def test_retain_handling_0_every_subscribe(broker):
    retain(broker.port, "r/t", b"value")
    subscriber = TestClient(broker.port, "sub")
    subscriber.subscribe("r/t", 1, retainHandling=0)
    assert subscriber.expect().payload == b"value"
    subscriber.subscribe("r/t", 1, retainHandling=0)
    assert subscriber.expect().payload == b"value"


def test_retain_handling_1_new_only(broker):
    retain(broker.port, "r/t", b"value")
    subscriber = TestClient(broker.port, "sub")
    subscriber.subscribe("r/t", 1, retainHandling=1)
    assert subscriber.expect().payload == b"value"
    subscriber.subscribe("r/t", 1, retainHandling=1)
    subscriber.expect_none()


def test_retain_handling_2_never(broker):
    retain(broker.port, "r/t", b"value")
    subscriber = TestClient(broker.port, "sub")
    subscriber.subscribe("r/t", 1, retainHandling=2)
    subscriber.expect_none()


def test_retained_qos_capped_by_subscription(broker):
    retain(broker.port, "r/t", b"value", qos=2)
    subscriber = TestClient(broker.port, "sub")
    subscriber.subscribe("r/t", 1)
    assert subscriber.expect().qos == 1


def test_retained_not_sent_to_shared(broker):
    retain(broker.port, "r/t", b"value")
    subscriber = TestClient(broker.port, "sub")
    subscriber.subscribe("$share/g/r/t", 1)
    subscriber.expect_none()


def test_retain_unavailable_rejects_retained(make_broker):
    broker = make_broker(retain_available=False)
    publisher = TestClient(broker.port, "pub")
    assert publisher.connack[2].RetainAvailable == 0
    publisher.publish("r/t", b"value", 0, retain=True)
    assert publisher.disconnected.wait(scaled(5))
    assert publisher.disconnect_reason == ReasonCode.RETAIN_NOT_SUPPORTED
