"""Abuse limits: connections and CONNECT rate per source address, subscriptions per client,
PUBLISH rate per client, and topic levels and length. Each limit trips for one client while
the broker keeps serving the others."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable

import pytest

from conftest import scaled
from ironshadow.mqtt import (
    MQTT_3_1_1,
    MQTT_5,
    Connack,
    Connect,
    Disconnect,
    Puback,
    Publish,
    ReasonCode,
    Subscribe,
    Subscription,
    Will,
)
from mqtt_client import V311, TestClient
from raw_client import RawClient

mosquitto_pub = pytest.mark.skipif(
    shutil.which("mosquitto_pub") is None, reason="mosquitto_pub is not installed"
)


def trips(broker, limit: str) -> int:
    """Return how often ``limit`` tripped, on all the engine's workers."""
    return sum(
        engine.call(lambda engine=engine: engine.broker.stats.limit_trips[limit])
        for engine in broker.engines
    )


def addresses(broker) -> int:
    """Return how many source addresses the engine keeps counts or a bucket for.

    The workers of a cluster share one table, so any of them can tell.
    """
    engine = broker.engines[0]
    return engine.call(lambda: engine.broker.limits.addresses())


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + scaled(timeout)
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.02)


def assert_still_served(broker, name: str) -> None:
    """Check that a new client pair can subscribe, publish and receive."""
    subscriber = TestClient(broker.port, f"{name}-sub")
    assert subscriber.subscribe(f"{name}/t", 1)[0].value == 1
    publisher = TestClient(broker.port, f"{name}-pub")
    publisher.publish(f"{name}/t", b"served", 1)
    assert subscriber.expect().payload == b"served"


def run_pub(broker, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    command = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), *args]
    return subprocess.run(
        command, input=stdin, capture_output=True, text=True, timeout=scaled(30), check=False
    )


# --- connections per source address ---------------------------------------------------


def test_extra_connection_closed_at_accept(make_broker):
    broker = make_broker(max_connections_per_address=2)
    subscriber = TestClient(broker.port, "sub")
    subscriber.subscribe("plant/t", 1)
    publisher = TestClient(broker.port, "pub")
    extra = RawClient(broker.port)
    # Closed before any CONNECT is sent: nothing is read from it.
    assert extra.wait_closed() == []
    assert trips(broker, "max_connections_per_address") == 1
    publisher.publish("plant/t", b"still served", 1)
    assert subscriber.expect().payload == b"still served"


def test_other_address_keeps_connecting(make_broker):
    broker = make_broker(max_connections_per_address=1)
    first = RawClient(broker.port)
    assert first.connect("first").reason_code == ReasonCode.SUCCESS
    assert RawClient(broker.port).wait_closed() == []
    other = RawClient(broker.port, source="127.0.0.2")
    assert other.connect("other").reason_code == ReasonCode.SUCCESS
    assert first.is_open()


def test_address_slot_freed_on_close(make_broker):
    broker = make_broker(max_connections_per_address=1)
    first = TestClient(broker.port, "first")
    first.disconnect()
    # The client closes its socket without waiting for the engine to see the close.
    engine = broker.engines[0]
    wait_for(lambda: engine.call(lambda: engine.broker.limits.connections_from("127.0.0.1")) == 0)
    second = TestClient(broker.port, "second")
    assert second.client.is_connected()
    second.disconnect()
    wait_for(lambda: addresses(broker) == 0)


# --- CONNECT rate per source address ----------------------------------------------------


def test_connect_rate_v5_gets_0x9f(make_broker):
    broker = make_broker(connect_rate_per_address=0.5, connect_burst_per_address=2)
    first = RawClient(broker.port)
    assert first.connect("first").reason_code == ReasonCode.SUCCESS
    second = RawClient(broker.port)
    assert second.connect("second").reason_code == ReasonCode.SUCCESS
    third = RawClient(broker.port)
    third.send(Connect("third", MQTT_5))
    packets = third.wait_closed()
    assert len(packets) == 1
    assert isinstance(packets[0], Connack)
    assert packets[0].reason_code == ReasonCode.CONNECTION_RATE_EXCEEDED
    assert trips(broker, "connect_rate_per_address") == 1
    # Another address has its own bucket, and connected clients are not affected.
    other = RawClient(broker.port, source="127.0.0.2")
    assert other.connect("other").reason_code == ReasonCode.SUCCESS
    first.subscribe("plant/t", 1)
    second.send(Publish("plant/t", b"flowing", 1, packet_id=1))
    assert first.receive(Publish).payload == b"flowing"


def test_connect_rate_v311_gets_code_3(make_broker):
    broker = make_broker(connect_rate_per_address=0.5, connect_burst_per_address=1)
    assert RawClient(broker.port, MQTT_3_1_1).connect("first").reason_code == 0
    late = RawClient(broker.port, MQTT_3_1_1)
    late.send(Connect("late", MQTT_3_1_1))
    packets = late.wait_closed()
    assert len(packets) == 1
    assert isinstance(packets[0], Connack)
    assert packets[0].reason_code == 3  # Server unavailable


def test_connect_rate_paho_client(make_broker):
    broker = make_broker(connect_rate_per_address=0.5, connect_burst_per_address=1)
    TestClient(broker.port, "first")
    late = TestClient(broker.port, "late")
    _flags, reason, properties = late.connack
    assert reason.value == ReasonCode.CONNECTION_RATE_EXCEEDED
    assert "connection rate exceeded" in properties.ReasonString
    assert late.disconnected.wait(scaled(5))


@mosquitto_pub
@pytest.mark.parametrize(
    ("version", "error"),
    [("mqttv311", "unavailable"), ("mqttv5", "rate exceeded")],
)
def test_connect_rate_mosquitto_pub(make_broker, version, error):
    broker = make_broker(connect_rate_per_address=0.2, connect_burst_per_address=1)
    first = run_pub(broker, "-V", version, "-t", "plant/t", "-m", "first")
    assert first.returncode == 0, first.stderr
    second = run_pub(broker, "-V", version, "-t", "plant/t", "-m", "second")
    assert second.returncode != 0
    assert error in second.stderr.lower()


def test_connect_rate_refills(make_broker):
    broker = make_broker(connect_rate_per_address=5, connect_burst_per_address=1)
    assert RawClient(broker.port).connect("first").reason_code == ReasonCode.SUCCESS
    rejected = RawClient(broker.port)
    assert rejected.connect("second").reason_code == ReasonCode.CONNECTION_RATE_EXCEEDED
    # One token comes back within 0.2 s; a rejected CONNECT takes none.
    deadline = time.monotonic() + scaled(5)
    while True:
        code = RawClient(broker.port).connect("second").reason_code
        if code == ReasonCode.SUCCESS or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert code == ReasonCode.SUCCESS


def test_full_buckets_forgotten(make_broker):
    broker = make_broker(connect_rate_per_address=10, connect_burst_per_address=2)
    RawClient(broker.port).connect("first")
    assert addresses(broker) == 1
    # The bucket is full again after 0.1 s and removed by the next run of the shared timer.
    wait_for(lambda: addresses(broker) == 0)


# --- subscriptions per client -----------------------------------------------------------


def test_subscription_quota_v5(make_broker):
    broker = make_broker(max_subscriptions=3)
    client = RawClient(broker.port)
    client.connect("app")
    for packet_id, topic_filter in enumerate(("a/1", "a/2", "a/3"), 1):
        assert client.subscribe(topic_filter, 1, packet_id).reason_codes == [1]
    assert client.subscribe("a/4", 1, 4).reason_codes == [ReasonCode.QUOTA_EXCEEDED]
    # Replacing an existing subscription does not count again.
    assert client.subscribe("a/2", 0, 5).reason_codes == [0]
    client.send(Subscribe(6, [Subscription("a/5", 1), Subscription("a/1", 1)]))
    assert client.receive().reason_codes == [ReasonCode.QUOTA_EXCEEDED, 1]
    assert trips(broker, "max_subscriptions") == 2
    # The client's own subscriptions still work, and so do other clients'.
    client.send(Publish("a/3", b"kept", 1, packet_id=7))
    replies = {type(client.receive()), type(client.receive())}
    assert replies == {Puback, Publish}
    other = TestClient(broker.port, "other")
    assert [code.value for code in other.subscribe("a/9", 1)] == [1]


def test_subscription_quota_v311(make_broker):
    broker = make_broker(max_subscriptions=1)
    client = TestClient(broker.port, "app-311", V311)
    assert [code.value for code in client.subscribe("a/1", 1)] == [1]
    assert [code.value for code in client.subscribe("a/2", 1)] == [0x80]
    assert client.client.is_connected()
    assert trips(broker, "max_subscriptions") == 1


def test_quota_counts_the_session(make_broker):
    broker = make_broker(max_subscriptions=1)
    client = RawClient(broker.port)
    client.connect("app", clean_start=False, properties={0x11: 60})
    assert client.subscribe("a/1", 1).reason_codes == [1]
    client.close()
    owner = broker.owner("app")
    wait_for(lambda: owner.call(lambda: owner.broker.sessions["app"].connection is None))
    resumed = RawClient(broker.port)
    assert resumed.connect("app", clean_start=False, properties={0x11: 60}).session_present
    assert resumed.subscribe("a/2", 1).reason_codes == [ReasonCode.QUOTA_EXCEEDED]


# --- topic levels and length --------------------------------------------------------------


def test_deep_publish_disconnects_v5(make_broker):
    broker = make_broker(max_topic_levels=4)
    watcher = TestClient(broker.port, "watcher")
    watcher.subscribe("#", 0)
    client = RawClient(broker.port)
    client.connect("deep")
    client.send(Publish("a/b/c/d", b"fits", 0))
    assert watcher.expect().topic == "a/b/c/d"
    client.send(Publish("a/b/c/d/e", b"too deep", 0))
    packets = client.wait_closed()
    assert len(packets) == 1
    assert isinstance(packets[0], Disconnect)
    assert packets[0].reason_code == ReasonCode.TOPIC_NAME_INVALID
    assert trips(broker, "max_topic_levels") == 1
    watcher.expect_none()
    assert_still_served(broker, "after")


def test_deep_publish_closes_v311(make_broker):
    broker = make_broker(max_topic_levels=2)
    client = RawClient(broker.port, MQTT_3_1_1)
    client.connect("deep-311")
    client.send(Publish("a/b/c", b"too deep", 1, packet_id=1))
    assert client.wait_closed() == []
    assert trips(broker, "max_topic_levels") == 1


def test_long_publish_disconnects(make_broker):
    broker = make_broker(max_topic_length=16)
    watcher = TestClient(broker.port, "watcher")
    watcher.subscribe("#", 0)
    client = RawClient(broker.port)
    client.connect("long")
    # Eight two-byte characters are 16 bytes: within the limit.
    client.send(Publish("é" * 8, b"fits", 0))
    assert watcher.expect().topic == "é" * 8
    client.send(Publish("é" * 9, b"18 bytes", 0))
    packets = client.wait_closed()
    assert [packet.reason_code for packet in packets] == [ReasonCode.TOPIC_NAME_INVALID]
    assert trips(broker, "max_topic_length") == 1
    watcher.expect_none()


@mosquitto_pub
def test_long_topic_mosquitto_pub(make_broker):
    broker = make_broker(max_topic_length=32)
    watcher = TestClient(broker.port, "watcher")
    watcher.subscribe("#", 0)
    result = run_pub(broker, "-V", "mqttv5", "-q", "1", "-t", "x" * 33, "-m", "long")
    assert result.returncode != 0
    assert trips(broker, "max_topic_length") == 1
    watcher.expect_none()
    result = run_pub(broker, "-V", "mqttv5", "-q", "1", "-t", "x" * 32, "-m", "fits")
    assert result.returncode == 0, result.stderr
    assert watcher.expect().payload == b"fits"


def test_filter_limits_in_suback(make_broker):
    broker = make_broker(max_topic_levels=3, max_topic_length=20)
    client = RawClient(broker.port)
    client.connect("app")
    assert client.subscribe("a/+/c", 1, 1).reason_codes == [1]
    assert client.subscribe("a/+/c/#", 1, 2).reason_codes == [ReasonCode.TOPIC_FILTER_INVALID]
    assert client.subscribe("x" * 21, 1, 3).reason_codes == [ReasonCode.TOPIC_FILTER_INVALID]
    # The whole filter counts, $share/GROUP/ included.
    shared = client.subscribe("$share/g/a/b", 1, 4).reason_codes
    assert shared == [ReasonCode.TOPIC_FILTER_INVALID]
    assert trips(broker, "max_topic_levels") == 2
    assert trips(broker, "max_topic_length") == 1
    assert client.is_open()


def test_filter_limits_v311_stay_connected(make_broker):
    broker = make_broker(max_topic_levels=2)
    client = TestClient(broker.port, "app-311", V311)
    assert [code.value for code in client.subscribe("a/b/c", 1)] == [0x80]
    assert client.client.is_connected()
    assert [code.value for code in client.subscribe("a/b", 1)] == [1]


def test_deep_will_topic_rejected(make_broker):
    broker = make_broker(max_topic_levels=3)
    client = RawClient(broker.port)
    connack = client.connect("willing", will=Will("a/b/c/d", b"gone"))
    assert connack.reason_code == ReasonCode.TOPIC_NAME_INVALID
    assert client.wait_closed() == []
    old = RawClient(broker.port, MQTT_3_1_1)
    old.send(Connect("willing-311", MQTT_3_1_1, will=Will("a/b/c/d", b"gone")))
    assert old.wait_closed() == []
    assert trips(broker, "max_topic_levels") == 2
    fits = RawClient(broker.port)
    assert fits.connect("fits", will=Will("a/b/c", b"gone")).reason_code == ReasonCode.SUCCESS


# --- PUBLISH rate per client --------------------------------------------------------------


def test_fast_publisher_slowed_not_dropped(make_broker):
    rate, burst, count = 25.0, 5, 50
    broker = make_broker(max_publish_rate=rate, publish_burst=burst)
    subscriber = TestClient(broker.port, "sub")
    subscriber.subscribe("fast/t", 1)
    subscriber.subscribe("calm/t", 1)
    fast = TestClient(broker.port, "fast")
    calm = TestClient(broker.port, "calm")

    started = time.monotonic()
    for number in range(count):
        fast.publish("fast/t", str(number), 0, wait=False)
    first = subscriber.expect()
    assert first.topic == "fast/t"
    # The calm client publishes while the fast one is held back.
    for number in range(10):
        calm.publish("calm/t", str(number), 1)

    fast_payloads = [first.payload]
    calm_payloads: list[bytes] = []
    while len(fast_payloads) < count:
        message = subscriber.expect(timeout=10)
        if message.topic == "fast/t":
            fast_payloads.append(message.payload)
        else:
            calm_payloads.append(message.payload)
    finished = time.monotonic()

    assert fast_payloads == [str(number).encode() for number in range(count)]
    # Every calm message arrived before the last fast one.
    assert calm_payloads == [str(number).encode() for number in range(10)]
    # At most `burst` messages plus `rate` per second pass: the last one is processed at
    # least (count - burst) / rate seconds after the first. The millisecond covers float
    # rounding in the broker's arithmetic.
    assert finished - started >= (count - burst) / rate - 0.001
    assert trips(broker, "max_publish_rate") >= 1
    for engine in broker.engines:
        assert engine.call(lambda engine=engine: engine.broker.stats.publish_dropped) == 0


@mosquitto_pub
def test_mosquitto_pub_lines_slowed(make_broker):
    rate, count = 20.0, 30
    broker = make_broker(max_publish_rate=rate, publish_burst=1)
    subscriber = TestClient(broker.port, "sub")
    subscriber.subscribe("lines/t", 1)
    lines = "".join(f"{number}\n" for number in range(count))
    started = time.monotonic()
    result = run_pub(broker, "-V", "mqttv311", "-q", "1", "-t", "lines/t", "-l", stdin=lines)
    assert result.returncode == 0, result.stderr
    received = [subscriber.expect().payload for _ in range(count)]
    finished = time.monotonic()
    assert received == [str(number).encode() for number in range(count)]
    assert finished - started >= (count - 1) / rate - 0.001


def test_rate_hold_respects_broker_pause(make_broker):
    broker = make_broker(max_publish_rate=10, publish_burst=1)
    subscriber = TestClient(broker.port, "sub")
    subscriber.subscribe("t", 0)
    client = RawClient(broker.port)
    client.connect("fast")
    client.send(*[Publish("t", str(number).encode(), 0) for number in range(5)])
    assert subscriber.expect().payload == b"0"
    broker.pause_reading()
    # The rate would release a message every 0.1 s, but the broker-wide pause wins.
    subscriber.expect_none(0.5)
    broker.resume_reading()
    assert [subscriber.expect().payload for _ in range(4)] == [b"1", b"2", b"3", b"4"]


def test_rate_hold_respects_ack_pause(make_broker):
    # A 3.1.1 client with 4 unacknowledged messages is paused until their consumer releases
    # them; the rate's timer must not resume reading meanwhile.
    broker = make_broker(receive_maximum=4, max_publish_rate=4, publish_burst=4)
    held: list = []

    def consume(message) -> None:
        message.hold()
        held.append(message)

    # The client's own worker routes its messages to this consumer.
    engine = broker.owner("plc")
    engine.call(engine.broker.add_consumer, "store", ["stored/#"], consume)

    def release() -> None:
        while held:
            held.pop(0).release()

    client = RawClient(broker.port, MQTT_3_1_1)
    client.connect("plc")
    # Four fit the burst and pause the client; the fifth is kept by the broker, and the
    # rate's timer (0.25 s) must leave it kept.
    client.send(*[Publish("stored/a", b"x", 1, packet_id=n) for n in range(1, 6)])
    wait_for(lambda: engine.call(len, held) == 4)
    # A sixth waits too, until the acknowledgements are out.
    client.send(Publish("stored/a", b"x", 1, packet_id=6))
    client.receive_none(0.8)
    assert engine.call(len, held) == 4
    engine.call(release)
    assert [client.receive(Puback).packet_id for _ in range(4)] == [1, 2, 3, 4]
    wait_for(lambda: engine.call(len, held) == 2)
    engine.call(release)
    assert [client.receive(Puback).packet_id for _ in range(2)] == [5, 6]


def test_held_client_keeps_keep_alive(make_broker):
    # One message every 2 s and a 1 s keep alive: the client is held longer than 1.5 keep
    # alive periods, which must not count as silence.
    broker = make_broker(max_publish_rate=0.5, publish_burst=1)
    subscriber = TestClient(broker.port, "sub")
    subscriber.subscribe("t", 0)
    client = RawClient(broker.port)
    client.connect("slow", keep_alive=1)
    client.send(Publish("t", b"0", 0), Publish("t", b"1", 0))
    assert subscriber.expect().payload == b"0"
    assert subscriber.expect(timeout=5).payload == b"1"
    assert client.is_open()
