"""Flow control: a subscriber that stops reading, the write high-water mark, and the
broker-wide pause of reading."""

from __future__ import annotations

import time

from conftest import scaled
from ironshadow.mqtt import Pingreq, Pingresp, Puback, Publish
from mqtt_client import TestClient
from raw_client import RawClient

HIGH_WATER = 64 * 1024
LOW_WATER = 16 * 1024
PAYLOAD = b"x" * 16 * 1024
# Enough 16 KiB messages to fill the kernel's socket buffers on both ends of a loopback
# connection whose receiver reads nothing.
FLOOD = 600




def flow_broker(make_broker, **fields):
    return make_broker(write_high_water=HIGH_WATER, write_low_water=LOW_WATER, **fields)


def stalled_subscriber(port: int, qos: int) -> RawClient:
    """Subscribe a raw client with a tiny receive buffer that then reads nothing."""
    subscriber = RawClient(port, receive_buffer=4096)
    subscriber.connect("slow")
    subscriber.subscribe("flow/t", qos)
    return subscriber


def flood(port: int, qos: int, count: int = FLOOD) -> None:
    """Publish ``count`` messages in one burst and return once the broker has read them."""
    publisher = RawClient(port)
    publisher.connect("pub")
    packets = [
        Publish("flow/t", PAYLOAD, qos=qos, packet_id=index + 1 if qos else 0)
        for index in range(count)
    ]
    publisher.send(*packets, Pingreq())
    # The broker handles packets in order, so PINGRESP is sent after every PUBLISH.
    while not isinstance(publisher.receive(timeout=10), Pingresp):
        pass


def write_buffer_size(engine, client_id: str) -> int:
    connection = engine.broker.sessions[client_id].connection
    return connection.transport.get_write_buffer_size() + connection.out_size


def routed_to_slow(broker, count: int):
    """Wait until the engine that serves "slow" has sent, queued or dropped ``count``
    messages, and return that engine.

    With several workers, flood() returns before the subscriber's worker has every message.
    """
    engine = broker.owner("slow")

    def accounted() -> int:
        stats = engine.broker.stats
        queued = len(engine.broker.sessions["slow"].queue)
        return stats.publish_sent + stats.publish_dropped + queued + stats.queue_dropped

    deadline = time.monotonic() + scaled(10)
    while engine.call(accounted) < count:
        assert time.monotonic() < deadline, f"{engine.call(accounted)} of {count} messages routed"
        time.sleep(0.02)
    return engine


def test_stalled_subscriber_qos0_dropped(make_broker):
    broker = flow_broker(make_broker)
    stalled_subscriber(broker.port, qos=0)
    flood(broker.port, qos=0)
    engine = routed_to_slow(broker, FLOOD)
    stats = engine.broker.stats
    assert engine.call(lambda: stats.publish_dropped) > 0
    assert engine.call(lambda: stats.publish_sent + stats.publish_dropped) == FLOOD


def test_stalled_subscriber_buffer_bounded(make_broker):
    broker = flow_broker(make_broker)
    stalled_subscriber(broker.port, qos=0)
    flood(broker.port, qos=0)
    engine = routed_to_slow(broker, FLOOD)
    # At most one loop iteration's output goes over the high-water mark.
    assert engine.call(write_buffer_size, engine, "slow") < 2 * HIGH_WATER + len(PAYLOAD)


def test_stalled_subscriber_qos1_queue_bounded(make_broker):
    broker = flow_broker(make_broker, max_queued_messages=20)
    stalled_subscriber(broker.port, qos=1)
    flood(broker.port, qos=1, count=300)
    engine = routed_to_slow(broker, 300)
    session = engine.broker.sessions["slow"]
    stats = engine.broker.stats
    assert engine.call(lambda: stats.queue_dropped) > 0
    assert engine.call(lambda: len(session.queue)) <= 20
    # Every message was sent, is queued or was dropped.
    accounted = engine.call(lambda: stats.publish_sent + len(session.queue) + stats.queue_dropped)
    assert accounted == 300
    assert engine.call(write_buffer_size, engine, "slow") < 2 * HIGH_WATER + len(PAYLOAD)


def test_stalled_subscriber_gets_queue_later(make_broker):
    broker = flow_broker(make_broker, max_queued_messages=20)
    subscriber = stalled_subscriber(broker.port, qos=1)
    flood(broker.port, qos=1, count=300)
    engine = routed_to_slow(broker, 300)
    session = engine.broker.sessions["slow"]
    kept = engine.call(lambda: len(session.inflight) + len(session.queue))
    received = 0
    while received < kept:
        publish = subscriber.receive(Publish)
        subscriber.send(Puback(publish.packet_id))
        received += 1
    subscriber.receive_none()
    assert engine.call(lambda: len(session.queue)) == 0


def test_queue_drains_after_qos0_burst(make_broker):
    # A QoS 0 burst above the high-water mark queues the QoS 1 message behind it. That
    # message must go out once the burst is written, without waiting for another event.
    broker = flow_broker(make_broker)
    subscriber = RawClient(broker.port)
    subscriber.connect("sub")
    subscriber.subscribe("flow/#", 1)
    publisher = RawClient(broker.port)
    publisher.connect("pub")
    burst = [Publish("flow/t", PAYLOAD) for _ in range(30)]
    publisher.send(*burst, Publish("flow/t", b"important", qos=1, packet_id=1))
    while True:
        publish = subscriber.receive(Publish)
        if publish.qos:
            break
    assert publish.payload == b"important"


def test_fast_subscriber_unaffected_by_stalled(make_broker):
    broker = flow_broker(make_broker)
    stalled_subscriber(broker.port, qos=1)
    fast = TestClient(broker.port, "fast")
    fast.subscribe("flow/t", 1)
    flood(broker.port, qos=1, count=100)
    for _ in range(100):
        assert len(fast.expect().payload) == len(PAYLOAD)


def test_pause_stops_routing(broker):
    subscriber = TestClient(broker.port, "sub")
    subscriber.subscribe("p/t", 0)
    publisher = TestClient(broker.port, "pub")
    broker.pause_reading()
    publisher.publish("p/t", b"held", 0)
    subscriber.expect_none()
    broker.resume_reading()
    assert subscriber.expect().payload == b"held"


def test_pause_holds_new_connect(broker):
    broker.pause_reading()
    client = TestClient(broker.port, "late", connect=False)
    client.connect(wait=False)
    assert not client.connected.wait(scaled(0.5))
    broker.resume_reading()
    assert client.connected.wait(scaled(5))


def test_keep_alive_frozen_while_paused(broker):
    client = RawClient(broker.port)
    client.connect("dev", keep_alive=1)
    broker.pause_reading()
    # Longer than 1.5 keep-alive periods plus one sweep interval.
    time.sleep(2.5)
    assert client.is_open()
    broker.resume_reading()
    client.send(Pingreq())
    assert isinstance(client.receive(), Pingresp)


def test_keep_alive_enforced_after_resume(broker):
    client = RawClient(broker.port)
    client.connect("dev", keep_alive=1)
    broker.pause_reading()
    time.sleep(0.5)
    broker.resume_reading()
    client.wait_closed(timeout=3)


def reading_paused(server) -> list[bool]:
    """Return each engine's ``reading_paused`` flag."""
    return [
        engine.call(lambda engine=engine: engine.broker.reading_paused)
        for engine in server.engines
    ]


def test_pause_flag_and_idempotence(broker):
    broker.pause_reading()
    broker.pause_reading()
    assert all(reading_paused(broker))
    broker.resume_reading()
    assert not any(reading_paused(broker))
    broker.resume_reading()
    client = TestClient(broker.port, "after")
    assert client.client.is_connected()
