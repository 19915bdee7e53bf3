"""Retained messages and persistent sessions across engine restarts, with real MQTT clients.

Each test runs on the embedded store (``mqtt-state.sqlite3`` in the data folder) and on Redis
(a private redis-server from ``tests/storage/servers.py``, started once for this module, with
a database number of its own per test).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.packettypes import PacketTypes

from conftest import BrokerThread, free_port, open_clients, scaled
from ironshadow.broker.config import BrokerConfig
from ironshadow.broker.persistence import decode_session
from ironshadow.engine import Engine, StorageConfig, open_mqtt_state_store
from ironshadow.mqtt import (
    MQTT_5,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
)
from ironshadow.storage.mqtt_state import SQLITE_FILE_NAME, SQLiteMqttStateStore, StoredMqttState
from mqtt_client import V5, V311, TestClient, properties
from raw_client import RawClient

_STORAGE_TESTS = str(Path(__file__).resolve().parents[1] / "storage")
if _STORAGE_TESTS not in sys.path:
    sys.path.append(_STORAGE_TESTS)

from servers import RedisServer, fresh_redis_url  # noqa: E402

# Session Expiry Interval of the MQTT 5 persistent sessions in these tests, in seconds.
LONG_EXPIRY = 3600


def expiry(seconds: int) -> Any:
    return properties(PacketTypes.CONNECT, SessionExpiryInterval=seconds)


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer.start()
    yield server
    server.stop()


@pytest.fixture(params=["embedded", "redis"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> StorageConfig:
    if request.param == "embedded":
        return StorageConfig(tmp_path)
    redis_url = fresh_redis_url(request.getfixturevalue("redis_server"))
    return StorageConfig(tmp_path, redis_url=redis_url)


@pytest.fixture
def start_engine() -> Iterator[Callable[..., BrokerThread]]:
    """Return a function that starts an engine on the given stores, stopped after the test."""
    started: list[BrokerThread] = []

    def start(storage: StorageConfig, **fields: Any) -> BrokerThread:
        config = BrokerConfig(port=free_port(), sys_interval=0, **fields)
        thread = BrokerThread(config, Engine(config, storage=storage))
        started.append(thread)
        thread.start()
        return thread

    yield start
    while open_clients:
        open_clients.pop().close()
    for thread in started:
        thread.stop()


def stored_state(storage: StorageConfig) -> StoredMqttState:
    """Return what the MQTT state store holds; call it while no engine runs."""

    async def load() -> StoredMqttState:
        store = open_mqtt_state_store(storage)
        await store.open()
        try:
            return await store.load()
        finally:
            await store.close()

    return asyncio.run(load())


def reconnect(client: TestClient, engine: BrokerThread) -> None:
    client.port = engine.port
    client.connect()


def persistent_client(port: int, client_id: str, protocol: int) -> TestClient:
    if protocol == V311:
        return TestClient(port, client_id, V311, clean=False)
    return TestClient(port, client_id, V5, clean=False, properties=expiry(LONG_EXPIRY))


def publish(port: int, *messages: tuple[str, bytes, int, bool]) -> None:
    publisher = TestClient(port, "publisher", V311)
    for topic, payload, qos, retain in messages:
        publisher.publish(topic, payload, qos, retain)
    publisher.disconnect()


# --- retained messages --------------------------------------------------------------------


def test_retained_survives_restart(storage, start_engine):
    engine = start_engine(storage)
    publish(
        engine.port,
        ("plant/line-1/state", b"running", 1, True),
        ("plant/line-2/state", b"stopped", 0, True),
        ("plant/line-3/state", b"idle", 1, True),
        ("plant/line-3/state", b"", 1, True),  # clears line-3
    )
    engine.stop()

    assert set(stored_state(storage).retained) == {"plant/line-1/state", "plant/line-2/state"}

    engine = start_engine(storage)
    subscriber = TestClient(engine.port, "viewer", V5)
    subscriber.subscribe("plant/+/state", 1)
    received = {}
    for _ in range(2):
        message = subscriber.expect()
        received[message.topic] = (message.payload, message.retain, message.qos)
    subscriber.expect_none()
    assert received == {
        "plant/line-1/state": (b"running", True, 1),
        "plant/line-2/state": (b"stopped", True, 0),
    }


def test_retained_cleared_after_restart_stays_cleared(storage, start_engine):
    engine = start_engine(storage)
    publish(engine.port, ("plant/line-1/state", b"running", 1, True))
    engine.stop()

    engine = start_engine(storage)
    publish(engine.port, ("plant/line-1/state", b"", 1, True))
    engine.stop()

    assert stored_state(storage).retained == {}
    engine = start_engine(storage)
    subscriber = TestClient(engine.port, "viewer", V5)
    subscriber.subscribe("plant/#", 1)
    subscriber.expect_none()


# --- persistent sessions ------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [V311, V5])
def test_session_receives_queued_messages_once(storage, start_engine, protocol):
    engine = start_engine(storage)
    device = persistent_client(engine.port, "kiln-3", protocol)
    device.subscribe("jobs/kiln-3/#", 2)
    device.disconnect()
    publish(
        engine.port, ("jobs/kiln-3/a", b"job a", 1, False), ("jobs/kiln-3/b", b"job b", 2, False)
    )
    engine.stop()

    engine = start_engine(storage)
    reconnect(device, engine)
    assert device.connack[0].session_present
    first = device.expect()
    second = device.expect()
    assert (first.topic, first.payload, first.qos) == ("jobs/kiln-3/a", b"job a", 1)
    assert (second.topic, second.payload, second.qos) == ("jobs/kiln-3/b", b"job b", 2)
    device.expect_none()
    device.disconnect()
    engine.stop()

    # Delivered and acknowledged before the second restart: not sent again.
    engine = start_engine(storage)
    reconnect(device, engine)
    assert device.connack[0].session_present
    device.expect_none()
    # The subscription itself is still there.
    publish(engine.port, ("jobs/kiln-3/c", b"job c", 1, False))
    assert device.expect().payload == b"job c"


def test_subscription_options_survive_restart(storage, start_engine):
    engine = start_engine(storage)
    device = persistent_client(engine.port, "kiln-3", V5)
    device.subscribe(
        "alarms/#",
        1,
        noLocal=True,
        retainAsPublished=True,
        properties=properties(PacketTypes.SUBSCRIBE, SubscriptionIdentifier=42),
    )
    device.disconnect()
    engine.stop()

    engine = start_engine(storage)
    reconnect(device, engine)
    device.publish("alarms/own", b"from itself", 1)
    publish(engine.port, ("alarms/kiln-3", b"overheat", 1, True))
    message = device.expect()
    assert message.payload == b"overheat"
    assert message.retain  # Retain As Published
    assert message.properties.SubscriptionIdentifier == [42]
    device.expect_none()  # No Local


@pytest.mark.parametrize("protocol", [V311, V5])
def test_clean_session_leaves_nothing_stored(storage, start_engine, protocol):
    engine = start_engine(storage)
    device = TestClient(engine.port, "clean-device", protocol, clean=True)
    device.subscribe("jobs/#", 1)
    publish(engine.port, ("jobs/1", b"job", 1, False))
    assert device.expect().payload == b"job"
    device.disconnect()
    engine.stop()

    assert stored_state(storage).sessions == {}


def test_clean_start_deletes_stored_session(storage, start_engine):
    engine = start_engine(storage)
    device = persistent_client(engine.port, "kiln-3", V311)
    device.subscribe("jobs/#", 1)
    device.disconnect()
    engine.stop()
    assert set(stored_state(storage).sessions) == {"kiln-3"}

    engine = start_engine(storage)
    clean = TestClient(engine.port, "kiln-3", V311, clean=True)
    assert not clean.connack[0].session_present
    clean.disconnect()
    engine.stop()

    assert stored_state(storage).sessions == {}


def test_session_expiry_honoured_across_restart(storage, start_engine):
    engine = start_engine(storage)
    short = TestClient(engine.port, "short", V5, clean=False, properties=expiry(1))
    short.subscribe("jobs/#", 1)
    short.disconnect()
    long = persistent_client(engine.port, "long", V5)
    long.subscribe("jobs/#", 1)
    long.disconnect()
    engine.stop()

    stored = stored_state(storage)
    ends_at = decode_session("short", stored.sessions["short"], 0.0).ends_at
    assert ends_at is not None
    # Wait out the one-second expiry while the engine is down.
    time.sleep(max(0.0, ends_at - time.time()) + 0.2)

    engine = start_engine(storage)
    assert engine.call(lambda: sorted(engine.broker.sessions)) == ["$internal/shadow", "long"]
    engine.stop()
    # The expired session is deleted from the store too.
    assert set(stored_state(storage).sessions) == {"long"}

    engine = start_engine(storage)
    reconnect(short, engine)
    assert not short.connack[0].session_present
    reconnect(long, engine)
    assert long.connack[0].session_present


def test_queue_bound_counts_drops_across_restart(storage, start_engine):
    engine = start_engine(storage, max_queued_messages=3)
    device = persistent_client(engine.port, "kiln-3", V311)
    device.subscribe("jobs/#", 1)
    device.disconnect()
    publish(engine.port, *((f"jobs/{n}", b"%d" % n, 1, False) for n in range(5)))
    assert engine.call(lambda: engine.broker.stats.queue_dropped) == 2
    engine.stop()

    engine = start_engine(storage, max_queued_messages=3)
    session = engine.call(lambda: engine.broker.sessions["kiln-3"])
    assert engine.call(lambda: session.queue_dropped) == 2
    reconnect(device, engine)
    assert [device.expect().payload for _ in range(3)] == [b"0", b"1", b"2"]
    device.expect_none()


def test_lower_queue_bound_at_restart_counts_drops(storage, start_engine):
    engine = start_engine(storage, max_queued_messages=10)
    device = persistent_client(engine.port, "kiln-3", V311)
    device.subscribe("jobs/#", 1)
    device.disconnect()
    publish(engine.port, *((f"jobs/{n}", b"%d" % n, 1, False) for n in range(5)))
    engine.stop()

    engine = start_engine(storage, max_queued_messages=2)
    assert engine.call(lambda: engine.broker.stats.queue_dropped) == 3
    reconnect(device, engine)
    assert [device.expect().payload for _ in range(2)] == [b"0", b"1"]
    device.expect_none()


# --- in-flight QoS 1 and 2 flows ----------------------------------------------------------


def test_inflight_messages_resent_after_restart(storage, start_engine):
    engine = start_engine(storage)
    device = RawClient(engine.port, MQTT_5)
    device.connect("kiln-3", clean_start=False, properties={0x11: LONG_EXPIRY})
    device.subscribe("jobs/#", 2)
    publish(engine.port, ("jobs/a", b"qos 1", 1, False), ("jobs/b", b"qos 2", 2, False))
    first, second = device.receive_publishes(2)
    assert (first.qos, second.qos) == (1, 2)
    # No PUBACK for the QoS 1 message; PUBREC but no PUBCOMP for the QoS 2 one.
    device.send(Pubrec(second.packet_id))
    assert device.receive(Pubrel).packet_id == second.packet_id
    # An incoming QoS 2 message that waits for its PUBREL.
    device.send(Publish("telemetry/kiln-3", b"once", 2, packet_id=9))
    assert device.receive(Pubrec).packet_id == 9
    engine.stop()
    device.close()

    engine = start_engine(storage)
    watcher = TestClient(engine.port, "watcher", V5)
    watcher.subscribe("telemetry/#", 2)
    device = RawClient(engine.port, MQTT_5)
    connack = device.connect("kiln-3", clean_start=False, properties={0x11: LONG_EXPIRY})
    assert connack.session_present
    resent = device.receive(Publish)
    assert (resent.packet_id, resent.payload, resent.dup) == (first.packet_id, b"qos 1", True)
    assert device.receive(Pubrel).packet_id == second.packet_id
    # The retransmitted PUBLISH is acknowledged again but not routed a second time.
    device.send(Publish("telemetry/kiln-3", b"once", 2, dup=True, packet_id=9))
    assert device.receive(Pubrec).packet_id == 9
    device.send(Pubrel(9))
    assert device.receive(Pubcomp).packet_id == 9
    device.send(Puback(first.packet_id), Pubcomp(second.packet_id))
    device.receive_none()
    watcher.expect_none()


# --- crashes and damaged entries ----------------------------------------------------------


def test_session_saved_before_kill(tmp_path, start_engine):
    """A change older than the save interval survives kill -9, without a graceful stop."""
    mqtt_port = free_port()
    command = [
        # One process, so that SIGKILL of its PID is a crash of the whole engine.
        sys.executable, "-m", "ironshadow", "serve", "--workers", "1",
        "--data-dir", str(tmp_path),
        "--mqtt-port", str(mqtt_port), "--http-port", str(free_port()),
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + scaled(15)
        while True:
            try:
                socket.create_connection(("127.0.0.1", mqtt_port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the engine did not start"
                time.sleep(0.05)
        device = TestClient(mqtt_port, "kiln-3", V311, clean=False)
        device.subscribe("jobs/#", 1)
        store = SQLiteMqttStateStore(tmp_path / SQLITE_FILE_NAME)

        async def saved_subscriptions() -> dict[str, set[str]]:
            await store.open()
            try:
                sessions = (await store.load()).sessions
            finally:
                await store.close()
            return {
                client_id: set(decode_session(client_id, data, 0.0).subscriptions)
                for client_id, data in sessions.items()
            }

        # The session is saved at CONNECT and again with its subscription, one save interval
        # or more later: wait for the second.
        deadline = time.monotonic() + scaled(10)
        while asyncio.run(saved_subscriptions()) != {"kiln-3": {"jobs/#"}}:
            assert time.monotonic() < deadline, "the subscription was not saved within 10 s"
            time.sleep(0.05)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    device.drop()

    engine = start_engine(StorageConfig(tmp_path))
    reconnect(device, engine)
    assert device.connack[0].session_present
    publish(engine.port, ("jobs/1", b"after the crash", 1, False))
    assert device.expect().payload == b"after the crash"


def test_undecodable_entries_skipped_at_start(tmp_path, start_engine, caplog):
    async def seed() -> None:
        store = SQLiteMqttStateStore(tmp_path / SQLITE_FILE_NAME)
        await store.open()
        try:
            await store.write({"plant/state": b"\xff"}, {"kiln-3": b"S\x01\x00"})
        finally:
            await store.close()

    asyncio.run(seed())
    engine = start_engine(StorageConfig(tmp_path))
    device = TestClient(engine.port, "kiln-3", V311, clean=False)
    assert not device.connack[0].session_present
    assert "skipped the saved session of client kiln-3" in caplog.text
    assert "skipped the saved retained message on 'plant/state'" in caplog.text
