"""Publish and subscribe through the broker with real paho-mqtt clients, both versions."""

from __future__ import annotations

import pytest

from mqtt_client import V5, V311, TestClient


@pytest.mark.parametrize("protocol", [V311, V5])
@pytest.mark.parametrize("qos", [0, 1, 2])
def test_publish_reaches_subscriber(broker, protocol, qos):
    subscriber = TestClient(broker.port, "sub", protocol)
    assert subscriber.subscribe("plant/+/temp", qos)[0] == qos
    publisher = TestClient(broker.port, "pub", protocol)
    publisher.publish("plant/line1/temp", b"21.5", qos)
    message = subscriber.expect()
    assert message.topic == "plant/line1/temp"
    assert message.payload == b"21.5"
    assert message.qos == qos
    subscriber.expect_none()
    publisher.disconnect()
    subscriber.disconnect()


def test_qos_downgraded_to_subscription(broker):
    subscriber = TestClient(broker.port, "sub")
    subscriber.subscribe("a/b", 1)
    publisher = TestClient(broker.port, "pub")
    publisher.publish("a/b", b"x", 2)
    assert subscriber.expect().qos == 1
