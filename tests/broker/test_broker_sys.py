"""$SYS statistics topics: published periodically, increasing, and kept away from `#`."""

from __future__ import annotations

from mqtt_client import TestClient

SYS_INTERVAL = 0.2


def sys_values(client: TestClient, topic: str, count: int) -> list[int]:
    """Return the next ``count`` integer payloads on ``topic``, skipping other topics."""
    values: list[int] = []
    while len(values) < count:
        message = client.expect(timeout=2)
        if message.topic == topic:
            values.append(int(message.payload))
    return values


def test_sys_topics_published(make_broker):
    broker = make_broker(sys_interval=SYS_INTERVAL)
    watcher = TestClient(broker.port, "watcher")
    watcher.subscribe("$SYS/#", 0)
    expected = {
        "$SYS/broker/version",
        "$SYS/broker/uptime",
        "$SYS/broker/clients/connected",
        "$SYS/broker/publish/messages/received",
        "$SYS/broker/publish/messages/sent",
        "$SYS/broker/messages/received",
        "$SYS/broker/bytes/received",
    }
    # A cluster's workers also publish their own figures under $SYS/broker/workers/, so
    # the number of messages before every expected topic came depends on the workers.
    topics = set()
    for _ in range(400):
        topics.add(watcher.expect(timeout=2).topic)
        if expected <= topics:
            break
    assert expected - topics == set()


def test_received_counter_increases(make_broker):
    broker = make_broker(sys_interval=SYS_INTERVAL)
    topic = "$SYS/broker/publish/messages/received"
    watcher = TestClient(broker.port, "watcher")
    watcher.subscribe(topic, 0)
    before = sys_values(watcher, topic, 1)[0]
    publisher = TestClient(broker.port, "pub")
    for _ in range(5):
        publisher.publish("data/t", b"x", 1)
    # The value published right after the five messages may predate them, so take two more.
    after = sys_values(watcher, topic, 2)[-1]
    assert after >= before + 5


def test_connected_clients_counted(make_broker):
    broker = make_broker(sys_interval=SYS_INTERVAL)
    topic = "$SYS/broker/clients/connected"
    watcher = TestClient(broker.port, "watcher")
    TestClient(broker.port, "other")
    watcher.subscribe(topic, 0)
    assert sys_values(watcher, topic, 2)[-1] == 2


def test_sys_values_retained(make_broker):
    broker = make_broker(sys_interval=SYS_INTERVAL)
    TestClient(broker.port, "first").expect_none(wait=2 * SYS_INTERVAL)
    late = TestClient(broker.port, "late")
    late.subscribe("$SYS/broker/version", 0)
    message = late.expect()
    assert message.retain
    assert message.payload.startswith(b"IronShadow")


def test_hash_does_not_receive_sys(make_broker):
    broker = make_broker(sys_interval=SYS_INTERVAL)
    everything = TestClient(broker.port, "everything")
    everything.subscribe("#", 0)
    everything.expect_none(wait=3 * SYS_INTERVAL)
    publisher = TestClient(broker.port, "pub")
    publisher.publish("data/t", b"x", 1)
    assert everything.expect().topic == "data/t"
    everything.expect_none(wait=3 * SYS_INTERVAL)


def test_client_publish_to_sys_discarded(make_broker):
    broker = make_broker(sys_interval=0)
    watcher = TestClient(broker.port, "watcher")
    watcher.subscribe("$SYS/#", 0)
    impostor = TestClient(broker.port, "impostor")
    info = impostor.publish("$SYS/broker/version", b"fake", 1)
    assert info.is_published()
    watcher.expect_none()
