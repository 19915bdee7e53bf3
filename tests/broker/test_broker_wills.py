"""Will messages and keep alive: when a will is sent and when it is not, the v5 will delay,
keep-alive enforcement and the server keep alive."""

from __future__ import annotations

import time

import pytest
from paho.mqtt.packettypes import PacketTypes

from conftest import scaled
from ironshadow.mqtt import (
    MQTT_3_1_1,
    Disconnect,
    Pingreq,
    Pingresp,
    PropertyId,
    Publish,
    ReasonCode,
    Will,
)
from mqtt_client import V5, V311, TestClient, properties
from raw_client import RawClient

WILL = ("wills/dev", b"dev is gone", 1, False)


def watch(port: int) -> TestClient:
    watcher = TestClient(port, "watcher")
    watcher.subscribe("wills/#", 1)
    return watcher


def delayed_will_client(port: int, delay: int, session_expiry: int) -> TestClient:
    return TestClient(
        port,
        "dev",
        V5,
        clean=False,
        properties=properties(PacketTypes.CONNECT, SessionExpiryInterval=session_expiry),
        will=WILL,
        will_properties=properties(PacketTypes.WILLMESSAGE, WillDelayInterval=delay),
    )


@pytest.mark.parametrize("protocol", [V311, V5])
def test_will_sent_on_dropped_socket(broker, protocol):
    watcher = watch(broker.port)
    client = TestClient(broker.port, "dev", protocol, will=WILL)
    client.drop()
    message = watcher.expect()
    assert message.topic == "wills/dev"
    assert message.payload == b"dev is gone"


@pytest.mark.parametrize("protocol", [V311, V5])
def test_no_will_after_normal_disconnect(broker, protocol):
    watcher = watch(broker.port)
    client = TestClient(broker.port, "dev", protocol, will=WILL)
    client.disconnect()
    watcher.expect_none()


def test_disconnect_with_will_sends_it(broker):
    watcher = watch(broker.port)
    client = TestClient(broker.port, "dev", V5, will=WILL)
    client.disconnect(reason=ReasonCode.DISCONNECT_WITH_WILL_MESSAGE)
    assert watcher.expect().payload == b"dev is gone"


def test_retained_will_stored(broker):
    watcher = watch(broker.port)
    client = TestClient(broker.port, "dev", V311, will=("wills/dev", b"offline", 1, True))
    client.drop()
    assert watcher.expect().payload == b"offline"
    late = TestClient(broker.port, "late")
    late.subscribe("wills/dev", 1)
    message = late.expect()
    assert message.payload == b"offline"
    assert message.retain


def test_will_properties_forwarded(broker):
    watcher = watch(broker.port)
    client = TestClient(
        broker.port,
        "dev",
        V5,
        will=WILL,
        will_properties=properties(
            PacketTypes.WILLMESSAGE, ContentType="text/plain", UserProperty=[("site", "A")]
        ),
    )
    client.drop()
    message = watcher.expect()
    assert message.properties.ContentType == "text/plain"
    assert message.properties.UserProperty == [("site", "A")]


def test_will_sent_on_keep_alive_timeout(broker):
    watcher = watch(broker.port)
    client = RawClient(broker.port, MQTT_3_1_1)
    client.connect("dev", keep_alive=1, will=Will("wills/dev", b"timed out", 1))
    assert watcher.expect(timeout=3).payload == b"timed out"


def test_keep_alive_timeout_disconnect_reason(broker):
    client = RawClient(broker.port)
    client.connect("dev", keep_alive=1)
    assert client.wait_closed(timeout=3) == [Disconnect(ReasonCode.KEEP_ALIVE_TIMEOUT)]


def test_keep_alive_enforced_at_one_and_half(broker):
    client = RawClient(broker.port)
    started = time.monotonic()
    client.connect("dev", keep_alive=1)
    client.wait_closed(timeout=4)
    elapsed = time.monotonic() - started
    # Closed after 1.5 keep-alive periods, within one sweep interval (0.5 s) after that.
    assert elapsed > 1.5
    assert elapsed < 1.5 + scaled(1.0)


def test_pingreq_keeps_connection_alive(broker):
    client = RawClient(broker.port)
    client.connect("dev", keep_alive=1)
    for _ in range(5):
        time.sleep(0.5)
        client.send(Pingreq())
        client.receive(Pingresp)
    assert client.is_open()


def test_server_keep_alive_in_connack(make_broker):
    broker = make_broker(max_keep_alive=2)
    client = TestClient(broker.port, "dev", V5, keepalive=60)
    assert client.connack[2].ServerKeepAlive == 2


def test_server_keep_alive_replaces_zero(make_broker):
    broker = make_broker(max_keep_alive=1)
    client = RawClient(broker.port)
    connack = client.connect("dev", keep_alive=0)
    assert connack.properties[PropertyId.SERVER_KEEP_ALIVE] == 1
    assert client.wait_closed(timeout=3) == [Disconnect(ReasonCode.KEEP_ALIVE_TIMEOUT)]


def test_keep_alive_below_maximum_kept(make_broker):
    broker = make_broker(max_keep_alive=60)
    client = TestClient(broker.port, "dev", V5, keepalive=30)
    assert not hasattr(client.connack[2], "ServerKeepAlive")


def test_delayed_will_sent_after_delay(broker):
    watcher = watch(broker.port)
    client = delayed_will_client(broker.port, delay=1, session_expiry=60)
    client.drop()
    watcher.expect_none(wait=0.7)
    assert watcher.expect(timeout=2).payload == b"dev is gone"


def test_delayed_will_publish_is_valid(broker):
    watcher = RawClient(broker.port)
    watcher.connect("watcher")
    watcher.subscribe("wills/#", 0)
    client = delayed_will_client(broker.port, delay=1, session_expiry=60)
    client.drop()
    # The raw client's decoder rejects a PUBLISH that carries Will Delay Interval.
    publish = watcher.receive(Publish, timeout=3)
    assert publish.payload == b"dev is gone"


def test_delayed_will_cancelled_by_reconnect(broker):
    watcher = watch(broker.port)
    client = delayed_will_client(broker.port, delay=1, session_expiry=60)
    client.drop()
    client.connect()
    watcher.expect_none(wait=1.5)


def test_delayed_will_capped_by_session_expiry(broker):
    watcher = watch(broker.port)
    client = delayed_will_client(broker.port, delay=3600, session_expiry=1)
    client.drop()
    assert watcher.expect(timeout=3).payload == b"dev is gone"


def test_delayed_will_sent_on_clean_start(broker):
    watcher = watch(broker.port)
    client = delayed_will_client(broker.port, delay=3600, session_expiry=3600)
    client.drop()
    TestClient(broker.port, "dev", V5, clean=True)
    assert watcher.expect(timeout=2).payload == b"dev is gone"
