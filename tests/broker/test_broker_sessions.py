"""Sessions: clean session and clean start, session expiry, queues of offline clients with
their bound and policy, and session takeover."""

from __future__ import annotations

import logging
import re
import time

import pytest
from paho.mqtt.packettypes import PacketTypes

from conftest import scaled
from ironshadow.broker.core import INTERNAL_CLIENT_PREFIX, TAKEOVER_LOG_LINES
from ironshadow.mqtt import Disconnect, PropertyId, ReasonCode
from mqtt_client import V5, V311, TestClient, properties
from raw_client import RawClient


def expiry(seconds: int):
    return properties(PacketTypes.CONNECT, SessionExpiryInterval=seconds)


def has_session(broker, client_id: str) -> bool:
    owner = broker.owner(client_id)
    return owner.call(lambda: client_id in owner.broker.sessions)


def client_sessions(broker) -> list[str]:
    """Return the client ids of every session of the engine, on all its workers."""
    ids = []
    for engine in broker.engines:
        sessions = engine.call(lambda engine=engine: list(engine.broker.sessions))
        ids.extend(name for name in sessions if not name.startswith(INTERNAL_CLIENT_PREFIX))
    return ids


def publish_all(port: int, topic: str, payloads: list[bytes], qos: int = 1) -> None:
    publisher = TestClient(port, "pub")
    for payload in payloads:
        publisher.publish(topic, payload, qos)
    publisher.disconnect()


def received_payloads(client: TestClient, count: int) -> list[bytes]:
    return [client.expect().payload for _ in range(count)]


def test_v311_persistent_session_queues_offline(broker):
    subscriber = TestClient(broker.port, "dev", V311, clean=False)
    subscriber.subscribe("s/t", 1)
    subscriber.disconnect()
    publish_all(broker.port, "s/t", [b"while offline"])
    subscriber.connect()
    assert subscriber.connack[0].session_present
    assert subscriber.expect().payload == b"while offline"


def test_v311_clean_session_discards_state(broker):
    subscriber = TestClient(broker.port, "dev", V311, clean=False)
    subscriber.subscribe("s/t", 1)
    subscriber.disconnect()
    publish_all(broker.port, "s/t", [b"while offline"])
    clean = TestClient(broker.port, "dev", V311, clean=True)
    assert not clean.connack[0].session_present
    clean.expect_none()


def test_v311_clean_session_ends_at_disconnect(broker):
    subscriber = TestClient(broker.port, "dev", V311, clean=True)
    subscriber.subscribe("s/t", 1)
    subscriber.disconnect()
    assert not has_session(broker, "dev")


def test_v5_clean_start_discards_session(broker):
    subscriber = TestClient(broker.port, "dev", V5, clean=False, properties=expiry(60))
    subscriber.subscribe("s/t", 1)
    subscriber.disconnect()
    publish_all(broker.port, "s/t", [b"while offline"])
    fresh = TestClient(broker.port, "dev", V5, clean=True, properties=expiry(60))
    assert not fresh.connack[0].session_present
    fresh.expect_none()
    publish_all(broker.port, "s/t", [b"after clean start"])
    fresh.expect_none()


def test_v5_zero_expiry_ends_at_disconnect(broker):
    subscriber = TestClient(broker.port, "dev", V5, clean=False)
    subscriber.subscribe("s/t", 1)
    subscriber.disconnect()
    assert not has_session(broker, "dev")


def test_v5_session_kept_before_expiry(broker):
    subscriber = TestClient(broker.port, "dev", V5, clean=False, properties=expiry(60))
    subscriber.subscribe("s/t", 1)
    subscriber.drop()
    publish_all(broker.port, "s/t", [b"kept"])
    subscriber.connect()
    assert subscriber.connack[0].session_present
    assert subscriber.expect().payload == b"kept"


def test_v5_session_gone_after_expiry(broker):
    subscriber = TestClient(broker.port, "dev", V5, clean=False, properties=expiry(1))
    subscriber.subscribe("s/t", 1)
    subscriber.disconnect()
    assert has_session(broker, "dev")
    time.sleep(scaled(1.3))
    assert not has_session(broker, "dev")
    publish_all(broker.port, "s/t", [b"nobody"])
    subscriber.connect()
    assert not subscriber.connack[0].session_present
    subscriber.expect_none()


def test_disconnect_property_extends_expiry(broker):
    subscriber = TestClient(broker.port, "dev", V5, clean=False, properties=expiry(1))
    subscriber.subscribe("s/t", 1)
    subscriber.disconnect(properties(PacketTypes.DISCONNECT, SessionExpiryInterval=60))
    time.sleep(scaled(1.3))
    assert has_session(broker, "dev")


def test_disconnect_cannot_revive_zero_expiry(broker):
    client = RawClient(broker.port)
    client.connect("dev")
    client.send(Disconnect(properties={PropertyId.SESSION_EXPIRY_INTERVAL: 60}))
    assert client.wait_closed() == [Disconnect(ReasonCode.PROTOCOL_ERROR)]
    assert not has_session(broker, "dev")


def test_max_session_expiry_caps_request(make_broker):
    broker = make_broker(max_session_expiry=5)
    client = TestClient(broker.port, "dev", V5, clean=False, properties=expiry(3600))
    assert client.connack[2].SessionExpiryInterval == 5


def test_queued_messages_keep_order(broker):
    subscriber = TestClient(broker.port, "dev", V311, clean=False)
    subscriber.subscribe("s/t", 2)
    subscriber.disconnect()
    payloads = [str(index).encode() for index in range(10)]
    publish_all(broker.port, "s/t", payloads, qos=2)
    subscriber.connect()
    assert received_payloads(subscriber, 10) == payloads


def test_offline_qos0_not_queued_by_default(broker):
    subscriber = TestClient(broker.port, "dev", V311, clean=False)
    subscriber.subscribe("s/t", 1)
    subscriber.disconnect()
    publish_all(broker.port, "s/t", [b"qos0"], qos=0)
    subscriber.connect()
    subscriber.expect_none()


def test_offline_qos0_queued_when_configured(make_broker):
    broker = make_broker(queue_qos0_offline=True)
    subscriber = TestClient(broker.port, "dev", V311, clean=False)
    subscriber.subscribe("s/t", 1)
    subscriber.disconnect()
    publish_all(broker.port, "s/t", [b"qos0"], qos=0)
    subscriber.connect()
    assert subscriber.expect().payload == b"qos0"


@pytest.mark.parametrize(
    ("policy", "kept"),
    [("drop-new", [b"0", b"1", b"2"]), ("drop-oldest", [b"2", b"3", b"4"])],
)
def test_full_queue_applies_policy(make_broker, policy, kept):
    broker = make_broker(max_queued_messages=3, queue_full_policy=policy)
    subscriber = TestClient(broker.port, "dev", V311, clean=False)
    subscriber.subscribe("s/t", 1)
    subscriber.disconnect()
    publish_all(broker.port, "s/t", [str(index).encode() for index in range(5)])
    owner = broker.owner("dev")
    assert owner.call(lambda: owner.broker.stats.queue_dropped) == 2
    subscriber.connect()
    assert received_payloads(subscriber, 3) == kept
    subscriber.expect_none()


def test_session_counts_its_dropped_messages(make_broker):
    broker = make_broker(max_queued_messages=2)
    subscriber = TestClient(broker.port, "dev", V311, clean=False)
    subscriber.subscribe("s/t", 1)
    subscriber.disconnect()
    publish_all(broker.port, "s/t", [b"a", b"b", b"c", b"d", b"e"])
    owner = broker.owner("dev")
    assert owner.call(lambda: owner.broker.sessions["dev"].queue_dropped) == 3


def test_v5_takeover_sends_session_taken_over(broker):
    first = TestClient(broker.port, "dev", V5)
    second = TestClient(broker.port, "dev", V5)
    assert first.disconnected.wait(scaled(5))
    assert first.disconnect_reason == ReasonCode.SESSION_TAKEN_OVER
    assert second.client.is_connected()


def test_v311_takeover_closes_old_socket(broker):
    first = TestClient(broker.port, "dev", V311)
    TestClient(broker.port, "dev", V311)
    assert first.disconnected.wait(scaled(5))


def test_takeover_keeps_persistent_session(broker):
    first = TestClient(broker.port, "dev", V5, clean=False, properties=expiry(60))
    first.subscribe("s/t", 1)
    second = TestClient(broker.port, "dev", V5, clean=False, properties=expiry(60))
    assert second.connack[0].session_present
    publish_all(broker.port, "s/t", [b"to the new connection"])
    assert second.expect().payload == b"to the new connection"
    first.expect_none()


def test_takeover_publishes_old_will(broker):
    watcher = TestClient(broker.port, "watcher")
    watcher.subscribe("wills/#")
    TestClient(broker.port, "dev", V5, will=("wills/dev", b"gone", 0, False))
    TestClient(broker.port, "dev", V5)
    assert watcher.expect().payload == b"gone"


def test_takeover_counts_one_session(broker):
    TestClient(broker.port, "dev", V311)
    TestClient(broker.port, "dev", V311)
    assert client_sessions(broker) == ["dev"]


def test_takeover_log_counts_past_its_budget(broker, caplog):
    """A storm of takeovers names TAKEOVER_LOG_LINES clients and counts the others in one
    line, which the broker writes at shutdown if the minute has not ended."""
    extra = 5
    first = broker.engines[0]
    ids = [f"dev{n}" for n in range(1000) if broker.owner(f"dev{n}") is first]
    ids = ids[: TAKEOVER_LOG_LINES + extra]
    with caplog.at_level(logging.INFO, logger="ironshadow.broker"):
        old = [TestClient(broker.port, client_id, V311) for client_id in ids]
        for client_id in ids:
            TestClient(broker.port, client_id, V311)
        for client in old:
            assert client.disconnected.wait(scaled(5))
        named = caplog.text.count("takes over its session from")
        assert named == TAKEOVER_LOG_LINES
        assert "more clients took over" not in caplog.text
        broker.stop()
    assert re.search(
        f"{extra} more clients took over their sessions in the last \\d+ s", caplog.text
    )
