"""The engine while one of its stores is down: Redis killed, or PostgreSQL shut down.

Each test runs ``python -m ironshadow serve`` on a private Redis and a private PostgreSQL
cluster of its own (``tests/storage/servers.py``) and connects DEVICES raw MQTT 3.1.1 devices
(``engine_harness.py``) that publish numbered QoS 1 updates with WINDOW of them in flight. After
WARMUP_SECONDS of load one store goes down for OUTAGE_SECONDS, which
``IRONSHADOW_OUTAGE_SECONDS`` overrides (default 10), and is then started again on the same
port and data. The devices go on for RECOVERY_SECONDS, then wait for their last PUBACKs.

Redis runs with ``appendfsync always``, so a write it acknowledged survives its SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from engine_harness import (
    WINDOW,
    Device,
    EngineProcess,
    PostgresServer,
    RedisServer,
    hot_versions,
    outbox_length,
    running_engine,
    thing_name,
)

from conftest import scaled
from ironshadow.mqtt import (
    MQTT_3_1_1,
    Connack,
    Connect,
    Disconnect,
    PacketDecoder,
    Publish,
    Suback,
    Subscribe,
    Subscription,
)
from ironshadow.storage.pipeline import DEFAULT_HIGH_WATER, RETRY_FIRST_DELAY, RETRY_MAX_DELAY

# Seconds a store stays down. CI may set a shorter outage.
OUTAGE_SECONDS = float(os.environ.get("IRONSHADOW_OUTAGE_SECONDS", "10"))

# Seconds of load before the outage starts and after the store is back.
WARMUP_SECONDS = 3.0
RECOVERY_SECONDS = 3.0

# Seconds after Redis is killed for the PUBACKs that the engine sent before to arrive. The
# acknowledged count is taken after this, and must not grow until Redis is back.
SETTLE_SECONDS = 1.0

# Few enough devices that all their updates in flight (500) stay far below the pipeline's
# high-water mark: the engine keeps reading every connection while Redis is down, so reads
# and QoS 0 updates are served from memory.
DEVICES = 50
assert DEVICES * WINDOW < DEFAULT_HIGH_WATER

# Seconds the devices wait for their last PUBACKs once they stop publishing: the longest
# retry delay, because the engine may have just begun one when the store came back, plus
# time for the backlog.
DRAIN_SECONDS = RETRY_MAX_DELAY + 15.0

# A client that reads shadows while Redis is down, and the thing it updates with QoS 0.
OBSERVER_ID = "outage-observer"
OBSERVER_THING = "outage-observer"


# --- servers and the engine -------------------------------------------------------------


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer.start(durable=True)
    yield server
    server.stop()


@pytest.fixture
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer.start()
    yield server
    server.stop()


@pytest.fixture
def engine(redis_server, postgres_server, tmp_path) -> Iterator[EngineProcess]:
    with running_engine(redis_server, postgres_server, tmp_path) as running:
        yield running


# --- load around an outage --------------------------------------------------------------


@dataclass
class OutageResult:
    devices: list[Device]
    observations: dict[str, Any] = field(default_factory=dict)

    def acknowledged(self) -> dict[str, int]:
        return {thing_name(device.index): device.acknowledged for device in self.devices}


async def run_outage(
    engine: EngineProcess, outage: Callable[[list[Device], dict[str, Any]], Awaitable[None]]
) -> OutageResult:
    """Load the engine with the devices around ``outage()`` and wait for their last PUBACKs.

    ``outage(devices, observations)`` takes the store down, records what it observes in
    ``observations`` and returns once the store is back.
    """
    devices = await asyncio.gather(
        *(Device.connect(engine.mqtt_port, index) for index in range(DEVICES))
    )
    result = OutageResult(devices)
    stop_at = time.monotonic() + WARMUP_SECONDS + OUTAGE_SECONDS + RECOVERY_SECONDS
    drain_deadline = stop_at + scaled(DRAIN_SECONDS)
    runs = [asyncio.create_task(device.run(stop_at, drain_deadline)) for device in devices]
    try:
        await asyncio.sleep(WARMUP_SECONDS)
        await outage(devices, result.observations)
    finally:
        await asyncio.gather(*runs)
    return result


def total_acknowledged(devices: list[Device]) -> int:
    return sum(device.acknowledged for device in devices)


# --- an MQTT client that reads shadows --------------------------------------------------


class Observer:
    """An MQTT 3.1.1 client without keep alive that sends QoS 0 requests and reads replies."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = PacketDecoder(version=MQTT_3_1_1)
        self.received: list[object] = []

    @classmethod
    async def connect(cls, port: int, client_id: str) -> Observer:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        observer = cls(reader, writer)
        writer.write(Connect(client_id, MQTT_3_1_1, True, 0).encode())
        connack = await observer.expect(Connack)
        assert connack.reason_code == 0, f"{client_id} was refused: {connack!r}"
        return observer

    async def expect(self, packet_type: type, topic: str | None = None) -> Any:
        """Return the next packet of this type (and topic, for PUBLISH), skipping others."""
        deadline = time.monotonic() + scaled(10)
        while True:
            for index, packet in enumerate(self.received):
                if isinstance(packet, packet_type) and (topic is None or packet.topic == topic):
                    del self.received[index]
                    return packet
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {packet_type.__name__} {topic or ''} in {scaled(10):.0f} s"
            try:
                data = await asyncio.wait_for(self.reader.read(65536), remaining)
            except TimeoutError:
                continue
            assert data, f"the engine closed the connection while waiting for {topic}"
            self.received.extend(self.decoder.feed(data))

    async def subscribe(self, topic: str) -> None:
        self.writer.write(Subscribe(1, [Subscription(topic, 0)]).encode(MQTT_3_1_1))
        suback = await self.expect(Suback)
        assert suback.reason_codes == [0], f"SUBSCRIBE {topic} failed: {suback!r}"

    def publish(self, topic: str, payload: dict[str, Any]) -> None:
        self.writer.write(Publish(topic, orjson.dumps(payload), 0).encode(MQTT_3_1_1))

    async def close(self) -> None:
        self.writer.write(Disconnect().encode(MQTT_3_1_1))
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


async def read_while_redis_is_down(engine: EngineProcess, device: Device) -> dict[str, Any]:
    """Update a shadow with QoS 0, then read it and a device's shadow over REST and MQTT.

    Return the documents: ``observer_rest`` (the QoS 0 update's shadow over REST),
    ``device_rest`` and ``device_mqtt`` (the device's shadow over REST and MQTT ``get``).
    """
    observer = await Observer.connect(engine.mqtt_port, OBSERVER_ID)
    base_url = f"http://127.0.0.1:{engine.http_port}"
    # trust_env=False: no proxy from the environment, so requests go straight to loopback.
    async with httpx.AsyncClient(base_url=base_url, trust_env=False, timeout=scaled(10)) as http:
        try:
            update = {"state": {"reported": {"during_outage": 1}}}
            observer.publish(f"$aws/things/{OBSERVER_THING}/shadow/update", update)
            # The update is applied in memory at once, but its write waits for Redis.
            deadline = time.monotonic() + scaled(10)
            while True:
                response = await http.get(f"/things/{OBSERVER_THING}/shadow")
                if response.status_code != 404 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            assert response.status_code == 200, response.text
            observer_rest = response.json()

            response = await http.get(f"/things/{thing_name(device.index)}/shadow")
            assert response.status_code == 200, response.text
            device_rest = response.json()

            prefix = f"$aws/things/{thing_name(device.index)}/shadow/get"
            await observer.subscribe(prefix + "/accepted")
            observer.publish(prefix, {"clientToken": "outage-get"})
            reply = await observer.expect(Publish, prefix + "/accepted")
            device_mqtt = orjson.loads(reply.payload)
        finally:
            await observer.close()
    return {"observer_rest": observer_rest, "device_rest": device_rest, "device_mqtt": device_mqtt}


# --- reading the stores and the log -----------------------------------------------------


async def history_row_counts(
    engine: EngineProcess, things: list[str]
) -> dict[str, tuple[int, int]]:
    """Return, per thing, its rows in ``shadow_updates`` and the distinct versions among them."""
    connection = await asyncpg.connect(engine.postgres_dsn)
    try:
        records = await connection.fetch(
            "SELECT t.thing, count(u.version) AS rows, count(DISTINCT u.version) AS versions "
            "FROM unnest($1::text[]) AS t(thing) LEFT JOIN shadow_updates u "
            "ON u.thing = t.thing AND u.shadow_name = '' GROUP BY t.thing",
            things,
        )
        return {record["thing"]: (record["rows"], record["versions"]) for record in records}
    finally:
        await connection.close()


async def wait_for_exact_history(
    engine: EngineProcess, things: dict[str, int]
) -> dict[str, tuple[int, int]]:
    """Wait until each thing has exactly one row per acknowledged version, or time out;
    return ``(rows, distinct versions)`` per thing."""
    expected = {thing: (count, count) for thing, count in things.items()}
    deadline = time.monotonic() + scaled(60)
    while True:
        found = await history_row_counts(engine, list(things))
        if found == expected or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.25)


def wait_for_empty_outbox(engine: EngineProcess) -> int:
    """Wait until the history outbox in Redis is empty, or time out; return its length."""
    deadline = time.monotonic() + scaled(30)
    while True:
        length = outbox_length(engine)
        if length == 0 or time.monotonic() > deadline:
            return length
        time.sleep(0.25)


def retry_delays(log: str, failure: str) -> list[float]:
    """Return the delays of the log lines ``{failure} ...; retrying in {delay} s``, in order."""
    pattern = re.escape(failure) + r".*; retrying in ([0-9.]+) s$"
    return [float(match) for match in re.findall(pattern, log, re.MULTILINE)]


def check_backoff(delays: list[float]) -> None:
    """Check that the delays start at RETRY_FIRST_DELAY and double up to RETRY_MAX_DELAY."""
    assert len(delays) >= 2, f"expected at least two retries, the log has {delays}"
    assert delays[0] == RETRY_FIRST_DELAY
    for previous, delay in itertools.pairwise(delays):
        # After a success the next failure starts again at the first delay.
        assert delay in (min(previous * 2, RETRY_MAX_DELAY), RETRY_FIRST_DELAY), delays


# --- tests ------------------------------------------------------------------------------


def test_redis_killed_holds_acknowledgements(engine, redis_server):
    """Redis killed for OUTAGE_SECONDS: PUBACKs wait, reads are served from memory, and the
    engine reconnects by itself once Redis is back on the same port and data.

    Every acknowledged update is then in Redis and has exactly one history row in PostgreSQL,
    although Redis may have died after applying a write but before replying to it.
    """

    async def kill_redis(devices: list[Device], observations: dict[str, Any]) -> None:
        killed_at = time.monotonic()
        redis_server.kill()
        try:
            await asyncio.sleep(SETTLE_SECONDS)
            observations["acknowledged_after_kill"] = total_acknowledged(devices)
            observations["sent_by_device_0"] = devices[0].sent
            observations.update(await read_while_redis_is_down(engine, devices[0]))
            await asyncio.sleep(max(0.0, killed_at + OUTAGE_SECONDS - time.monotonic()))
            observations["acknowledged_before_restart"] = total_acknowledged(devices)
            observations["in_flight_before_restart"] = [len(d.in_flight) for d in devices]
        finally:
            await asyncio.to_thread(redis_server.restart)

    result = asyncio.run(run_outage(engine, kill_redis))
    seen = result.observations

    for device in result.devices:
        assert device.closed_by_broker_at is None, f"the engine closed device {device.index}"
        assert not device.in_flight, f"device {device.index} has unacknowledged updates"
    assert seen["acknowledged_after_kill"] > 0
    assert seen["acknowledged_before_restart"] == seen["acknowledged_after_kill"]
    assert seen["in_flight_before_restart"] == [WINDOW] * DEVICES

    # Reads while Redis is down: the shadows in memory, including the updates not yet
    # acknowledged.
    assert seen["observer_rest"]["state"]["reported"] == {"during_outage": 1}
    assert seen["observer_rest"]["version"] == 1
    assert seen["device_rest"]["version"] == seen["sent_by_device_0"]
    assert seen["device_rest"]["state"]["reported"]["seq"] == seen["sent_by_device_0"]
    assert seen["device_mqtt"]["version"] == seen["sent_by_device_0"]
    assert seen["device_mqtt"]["clientToken"] == "outage-get"

    things = {**result.acknowledged(), OBSERVER_THING: 1}
    assert hot_versions(engine, list(things)) == things
    expected = {thing: (count, count) for thing, count in things.items()}
    assert asyncio.run(wait_for_exact_history(engine, things)) == expected
    assert wait_for_empty_outbox(engine) == 0

    log = engine.log_text()
    assert f"to the hot store failed: Redis at {engine.redis_url} is unreachable" in log
    check_backoff(retry_delays(log, "shadows to the hot store failed: "))
    assert "timed out" not in log
    assert engine.stop() == 0, log


def test_postgres_down_keeps_devices_going(engine, postgres_server):
    """PostgreSQL shut down for OUTAGE_SECONDS: PUBACKs go on and the outbox grows in Redis.

    After the restart every acknowledged update reaches ``shadow_updates`` exactly once.
    """

    async def stop_postgres(devices: list[Device], observations: dict[str, Any]) -> None:
        observations["outbox_at_stop"] = outbox_length(engine)
        await asyncio.to_thread(postgres_server.shut_down_fast)
        try:
            stopped_at = time.monotonic()
            observations["acknowledged_at_stop"] = [device.acknowledged for device in devices]
            await asyncio.sleep(OUTAGE_SECONDS)
            observations["acknowledged_at_restart"] = [d.acknowledged for d in devices]
            observations["outbox_at_restart"] = outbox_length(engine)
            observations["outage_seconds"] = time.monotonic() - stopped_at
        finally:
            await asyncio.to_thread(postgres_server.restart)

    result = asyncio.run(run_outage(engine, stop_postgres))
    seen = result.observations
    acknowledged_in_outage = [
        after - before
        for before, after in zip(
            seen["acknowledged_at_stop"], seen["acknowledged_at_restart"], strict=True
        )
    ]
    print(
        f"PostgreSQL down {seen['outage_seconds']:.1f} s: acknowledged "
        f"{sum(acknowledged_in_outage) / seen['outage_seconds']:.0f}/s, outbox "
        f"{seen['outbox_at_stop']} to {seen['outbox_at_restart']} entries"
    )

    for device in result.devices:
        assert device.closed_by_broker_at is None, f"the engine closed device {device.index}"
        assert not device.in_flight, f"device {device.index} has unacknowledged updates"
    # More than one window each: the devices were acknowledged all through the outage.
    for index, count in enumerate(acknowledged_in_outage):
        assert count > WINDOW, f"device {index} had {count} updates acknowledged in the outage"
    assert seen["outbox_at_restart"] > seen["outbox_at_stop"]

    things = result.acknowledged()
    expected = {thing: (count, count) for thing, count in things.items()}
    assert asyncio.run(wait_for_exact_history(engine, things)) == expected
    assert wait_for_empty_outbox(engine) == 0

    log = engine.log_text()
    # The first failure may be the server's own message, such as "terminating connection due
    # to administrator command"; later ones name the server.
    assert f"moving history rows failed: PostgreSQL at {engine.postgres_dsn}" in log
    check_backoff(retry_delays(log, "moving history rows failed: "))
    assert "timed out" not in log
    assert engine.stop() == 0, log
