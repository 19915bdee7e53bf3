"""The engine under load while one of its stores stalls: PostgreSQL locked, or Redis paused.

Each test starts ``python -m ironshadow serve`` on private Redis and PostgreSQL servers (from
``tests/storage/servers.py``, on free loopback ports) and connects DEVICES raw MQTT 3.1.1
clients. Every device publishes numbered QoS 1 reported updates to its own shadow as fast as
they are acknowledged, with at most WINDOW unacknowledged, and sends PINGREQ after KEEP_ALIVE
seconds without sending anything, as a compliant device does. The load runs for a bounded time
around a stall of STALL_SECONDS, which ``IRONSHADOW_STALL_SECONDS`` overrides (default 20) so
that CI can run it shorter.

The engine runs in a subprocess so that its resident set size (``VmRSS`` and ``VmHWM`` in
``/proc/<pid>/status``) contains the engine alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import orjson
import pytest
import redis
import redis.asyncio as aioredis

from conftest import free_port, scaled
from ironshadow.engine.service import MAX_INFLIGHT_REQUESTS
from ironshadow.mqtt import (
    MQTT_3_1_1,
    Connack,
    Connect,
    Disconnect,
    PacketDecoder,
    Pingreq,
    Pingresp,
    Puback,
    Publish,
)
from ironshadow.storage.pipeline import DEFAULT_HIGH_WATER
from ironshadow.storage.redis import OUTBOX_MEMORY_ROWS

# servers.py sits beside the storage tests, which import it by module name. Appending its
# folder (not prepending) keeps every other import resolving as before.
_STORAGE_TESTS = str(Path(__file__).resolve().parents[1] / "storage")
if _STORAGE_TESTS not in sys.path:
    sys.path.append(_STORAGE_TESTS)

from servers import PostgresServer, RedisServer, fresh_redis_url  # noqa: E402

# Seconds a store stays stalled. The engine must ride out 20 s, and CI may set a shorter stall.
STALL_SECONDS = float(os.environ.get("IRONSHADOW_STALL_SECONDS", "20"))

# Seconds of load before the stall starts and after it ends.
WARMUP_SECONDS = 3.0
RECOVERY_SECONDS = 3.0

# Unacknowledged updates per device: the engine's limit of requests waiting to be applied per
# connection. A device with more in flight may get 429 for the surplus, PUBACKed though not
# applied, and its acknowledged count would no longer match the shadow's version.
WINDOW = MAX_INFLIGHT_REQUESTS
# Enough devices that DEVICES * WINDOW (21,000) exceeds the pipeline's high-water mark
# (20,000 items), so a stalled hot store makes the engine pause reading.
DEVICES = DEFAULT_HIGH_WATER // WINDOW + 100
# Seconds of keep alive, short so that a connection left unread during the stall would expire.
# NOTE: while the engine pauses reading, a PINGREQ waits unread too, so its PINGRESP comes only
# after the pause (about 17 s late in a 20 s stall). These devices wait for it, but a client
# that closes the connection when PINGRESP is late (paho-mqtt does after one keep alive) would
# disconnect itself.
KEEP_ALIVE = 5

# Estimated engine memory per update in flight: the decoded message, the parsed request, the
# shadow document and history row (about 250 bytes of JSON here), the PUBACK waiting in order,
# the accepted reply in the device's output buffer, and its share of the Redis transaction.
# The peak comes after the stall, when the backlog drains while every connection is read
# again at once: five runs at about 35,000 updates/s (2 CPUs, Python 3.11) peaked 2.8 to
# 4.4 KB per update above the RSS before the stall; this estimate leaves a margin above that.
BYTES_PER_UPDATE_IN_FLIGHT = 5 * 1024
# Estimated engine memory per history row that the Redis store keeps for the history task
# (a HistoryRow with these small reports measured about 270 bytes), with a margin.
BYTES_PER_OUTBOX_ROW = 512
# Headroom for the allocator, the Redis and PostgreSQL client buffers and the outbox batch
# being moved (1,000 rows).
RSS_HEADROOM_BYTES = 32 * 1024 * 1024

# Seconds between samples of the acknowledged count and the engine's RSS.
SAMPLE_INTERVAL = 0.25

_postgres_schemas = itertools.count()


def rss_bound(loaded: int) -> int:
    """Return the most RSS the engine may reach in and after the stall, in bytes.

    ``loaded`` is the RSS under load just before the stall, so it already contains the
    connections and the steady flow of updates. A stall adds at most the DEVICES * WINDOW
    updates that devices can have unacknowledged: each device waits for PUBACKs beyond its
    window, and the pipeline's high-water mark pauses reading first anyway. Updates that the
    hot store accepted live in Redis; the engine keeps a copy of at most OUTBOX_MEMORY_ROWS
    of their history rows, however far PostgreSQL falls behind.
    """
    return (
        loaded
        + DEVICES * WINDOW * BYTES_PER_UPDATE_IN_FLIGHT
        + OUTBOX_MEMORY_ROWS * BYTES_PER_OUTBOX_ROW
        + RSS_HEADROOM_BYTES
    )


# --- servers and the engine -------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer.start()
    yield server
    server.stop()


async def create_schema(server: PostgresServer) -> str:
    name = f"stall_{next(_postgres_schemas)}"
    connection = await asyncpg.connect(server.dsn())
    try:
        await connection.execute(f"CREATE SCHEMA {name}")
    finally:
        await connection.close()
    return name


@dataclass
class EngineProcess:
    process: subprocess.Popen[bytes]
    mqtt_port: int
    redis_url: str
    postgres_dsn: str
    schema: str
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def memory(self, field_name: str) -> int:
        """Return a memory figure of /proc/<pid>/status, such as VmRSS or VmHWM, in bytes."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        match = re.search(rf"^{field_name}:\s+(\d+) kB$", status, re.MULTILINE)
        assert match is not None, f"{field_name} is missing from /proc/{self.process.pid}/status"
        return int(match.group(1)) * 1024

    def stop(self) -> int:
        """Stop the engine with SIGTERM and return its exit status."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(scaled(30))
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode


@pytest.fixture
def engine(redis_server, postgres_server, tmp_path) -> Iterator[EngineProcess]:
    """Start an engine on a fresh Redis database and PostgreSQL schema; stop it afterwards."""
    redis_url = fresh_redis_url(redis_server)
    schema = asyncio.run(create_schema(postgres_server))
    postgres_dsn = postgres_server.dsn() + f"?search_path={schema}"
    mqtt_port = free_port()
    command = [
        sys.executable, "-m", "ironshadow", "serve",
        "--redis", redis_url, "--postgres", postgres_dsn,
        "--mqtt-port", str(mqtt_port), "--http-port", str(free_port()),
        "--data-dir", str(tmp_path / "data"),
        "--sys-interval", "0",
    ]  # fmt: skip
    log = tmp_path / "engine.log"
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT
        )
    running = EngineProcess(process, mqtt_port, redis_url, postgres_dsn, schema, log)
    try:
        wait_for_listener(running)
        yield running
    finally:
        running.stop()


def wait_for_listener(engine: EngineProcess) -> None:
    deadline = time.monotonic() + scaled(15)
    while True:
        status = engine.process.poll()
        assert status is None, f"the engine exited with status {status}:\n{engine.log_text()}"
        try:
            socket.create_connection(("127.0.0.1", engine.mqtt_port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"the engine did not start:\n{engine.log_text()}"
            time.sleep(0.05)


# --- devices ----------------------------------------------------------------------------


def thing_name(index: int) -> str:
    return f"stall-{index:03d}"


@dataclass
class Device:
    """One MQTT 3.1.1 connection publishing numbered updates with a bounded window."""

    index: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    sent: int = 0
    acknowledged: int = 0
    in_flight: dict[int, int] = field(default_factory=dict)  # packet id to sequence number
    last_sent: float = 0.0
    ping_sent_at: float | None = None
    ping_latencies: list[float] = field(default_factory=list)
    closed_by_broker_at: float | None = None
    disconnecting: bool = False
    progress: asyncio.Event = field(default_factory=asyncio.Event)
    decoder: PacketDecoder = field(default_factory=lambda: PacketDecoder(version=MQTT_3_1_1))

    @property
    def topic(self) -> str:
        return f"$aws/things/{thing_name(self.index)}/shadow/update"

    @classmethod
    async def connect(cls, port: int, index: int) -> Device:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(Connect(thing_name(index), MQTT_3_1_1, True, KEEP_ALIVE).encode())
        await writer.drain()
        decoder = PacketDecoder(version=MQTT_3_1_1)
        packets: list[object] = []
        while not packets:
            data = await asyncio.wait_for(reader.read(65536), scaled(10))
            assert data, f"the engine closed the connection of device {index} before CONNACK"
            packets = decoder.feed(data)
        assert isinstance(packets[0], Connack), f"expected CONNACK, received {packets[0]!r}"
        assert packets[0].reason_code == 0, f"device {index} was refused: {packets[0]!r}"
        return cls(index, reader, writer, last_sent=time.monotonic(), decoder=decoder)

    def _send(self, data: bytes) -> None:
        self.writer.write(data)
        self.last_sent = time.monotonic()

    async def _read(self) -> None:
        while True:
            try:
                data = await self.reader.read(65536)
            except ConnectionError:
                data = b""
            if not data:
                if not self.disconnecting:
                    self.closed_by_broker_at = time.monotonic()
                self.progress.set()
                return
            for packet in self.decoder.feed(data):
                if isinstance(packet, Puback):
                    sequence = self.in_flight.pop(packet.packet_id)
                    assert sequence == self.acknowledged + 1, "PUBACKs arrived out of order"
                    self.acknowledged = sequence
                elif isinstance(packet, Pingresp) and self.ping_sent_at is not None:
                    self.ping_latencies.append(time.monotonic() - self.ping_sent_at)
                    self.ping_sent_at = None
            self.progress.set()

    async def run(self, stop_at: float, drain_deadline: float) -> None:
        """Publish until ``stop_at``, then wait for the PUBACKs in flight until the deadline."""
        reading = asyncio.create_task(self._read())
        try:
            while self.closed_by_broker_at is None:
                now = time.monotonic()
                publishing = now < stop_at
                if not publishing and (not self.in_flight or now >= drain_deadline):
                    break
                if publishing and len(self.in_flight) < WINDOW:
                    self._publish(WINDOW - len(self.in_flight))
                if now - self.last_sent >= KEEP_ALIVE and self.ping_sent_at is None:
                    self._send(Pingreq().encode(MQTT_3_1_1))
                    self.ping_sent_at = time.monotonic()
                await self.writer.drain()
                self.progress.clear()
                until = min(self.last_sent + KEEP_ALIVE, stop_at if publishing else drain_deadline)
                wait = max(0.01, until - time.monotonic())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.progress.wait(), wait)
            if self.closed_by_broker_at is None:
                self.disconnecting = True
                self._send(Disconnect().encode(MQTT_3_1_1))
                await self.writer.drain()
        finally:
            self.writer.close()
            with contextlib.suppress(ConnectionError):
                await self.writer.wait_closed()
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reading

    def _publish(self, count: int) -> None:
        packets = []
        for _ in range(count):
            self.sent += 1
            packet_id = (self.sent - 1) % 65535 + 1
            self.in_flight[packet_id] = self.sent
            payload = orjson.dumps({"state": {"reported": {"seq": self.sent, "temperature": 20.5}}})
            packets.append(Publish(self.topic, payload, 1, packet_id=packet_id).encode(3))
        self._send(b"".join(packets))


@dataclass
class Sample:
    time: float
    acknowledged: int
    rss: int


@dataclass
class LoadResult:
    devices: list[Device]
    samples: list[Sample]
    baseline_rss: int  # after the devices connected, before any update
    peak_rss: int  # VmHWM at the end of the load
    stall_started: float
    stall_ended: float

    @property
    def loaded_rss(self) -> int:
        """The largest RSS sampled in the second before the stall."""
        before = [
            s.rss for s in self.samples if self.stall_started - 1 <= s.time < self.stall_started
        ]
        assert before, "no RSS sample in the second before the stall"
        return max(before)

    def acknowledged_between(self, start: float, end: float) -> float:
        """Return the PUBACKs per second between two moments, from the samples."""
        inside = [sample for sample in self.samples if start <= sample.time <= end]
        assert len(inside) >= 2, f"fewer than two samples between {start} and {end}"
        first, last = inside[0], inside[-1]
        return (last.acknowledged - first.acknowledged) / (last.time - first.time)


async def run_load(engine: EngineProcess, stall) -> LoadResult:
    """Connect the devices, run the load around ``stall()`` and return what was measured."""
    devices = await asyncio.gather(
        *(Device.connect(engine.mqtt_port, index) for index in range(DEVICES))
    )
    baseline_rss = engine.memory("VmRSS")
    samples: list[Sample] = []

    started = time.monotonic()
    stall_started = started + WARMUP_SECONDS
    stop_at = stall_started + STALL_SECONDS + RECOVERY_SECONDS
    drain_deadline = stop_at + scaled(15)
    runs = [asyncio.create_task(device.run(stop_at, drain_deadline)) for device in devices]

    async def sample() -> None:
        while True:
            acknowledged = sum(device.acknowledged for device in devices)
            samples.append(Sample(time.monotonic(), acknowledged, engine.memory("VmRSS")))
            await asyncio.sleep(SAMPLE_INTERVAL)

    sampling = asyncio.create_task(sample())
    await asyncio.sleep(WARMUP_SECONDS)
    await stall()
    stall_ended = time.monotonic()
    await asyncio.gather(*runs)
    sampling.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await sampling
    return LoadResult(
        devices, samples, baseline_rss, engine.memory("VmHWM"), stall_started, stall_ended
    )


# --- reading the stores -----------------------------------------------------------------


async def history_versions(engine: EngineProcess, things: dict[str, int]) -> dict[str, int]:
    """Return, per thing, how many distinct versions from 1 to its acknowledged count
    ``shadow_updates`` contains."""
    connection = await asyncpg.connect(engine.postgres_dsn)
    try:
        records = await connection.fetch(
            "SELECT t.thing, (SELECT count(DISTINCT u.version) FROM shadow_updates u "
            "WHERE u.thing = t.thing AND u.shadow_name = '' "
            "AND u.version BETWEEN 1 AND t.acknowledged) AS versions "
            "FROM unnest($1::text[], $2::bigint[]) AS t(thing, acknowledged)",
            list(things),
            list(things.values()),
        )
        return {record["thing"]: record["versions"] for record in records}
    finally:
        await connection.close()


async def wait_for_history(engine: EngineProcess, things: dict[str, int]) -> dict[str, int]:
    """Wait until PostgreSQL contains every acknowledged version, or time out; return the counts."""
    deadline = time.monotonic() + scaled(60)
    while True:
        found = await history_versions(engine, things)
        if found == things or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.25)


def outbox_length(engine: EngineProcess) -> int:
    client = redis.Redis.from_url(engine.redis_url)
    try:
        return client.xlen("ironshadow:history")
    finally:
        client.close()


def hot_versions(engine: EngineProcess, things: list[str]) -> dict[str, int]:
    """Return each thing's shadow version in Redis, 0 for a missing shadow."""
    client = redis.Redis.from_url(engine.redis_url)
    try:
        documents = client.mget([f"ironshadow:shadow:{thing}" for thing in things])
    finally:
        client.close()
    return {
        thing: orjson.loads(document)["version"] if document is not None else 0
        for thing, document in zip(things, documents, strict=True)
    }


def report(name: str, result: LoadResult) -> str:
    """Return a one-line summary of the measurements, printed with ``pytest -s``."""
    before = result.acknowledged_between(result.stall_started - 2, result.stall_started)
    during = result.acknowledged_between(result.stall_started + 1, result.stall_ended)
    latencies = [latency for device in result.devices for latency in device.ping_latencies]
    return (
        f"{name}: stall {STALL_SECONDS:.0f} s, acknowledged {before:.0f}/s before and "
        f"{during:.0f}/s during, RSS {result.baseline_rss / 2**20:.1f} MiB idle, "
        f"{result.loaded_rss / 2**20:.1f} MiB loaded, peak {result.peak_rss / 2**20:.1f} MiB, "
        f"bound {rss_bound(result.loaded_rss) / 2**20:.1f} MiB, pings {len(latencies)}, "
        f"max PINGRESP delay {max(latencies, default=0):.1f} s"
    )


# --- tests ------------------------------------------------------------------------------


def test_history_stall_keeps_devices_going(engine):
    """PostgreSQL locked for STALL_SECONDS: Redis keeps accepting, so devices are not slowed.

    The outbox rows wait in Redis, so the engine's RSS stays under ``rss_bound()``, and after
    the unlock every acknowledged update reaches ``shadow_updates``.
    """

    async def lock_history() -> None:
        connection = await asyncpg.connect(engine.postgres_dsn)
        try:
            async with connection.transaction():
                await connection.execute(
                    f"LOCK TABLE {engine.schema}.shadow_updates IN ACCESS EXCLUSIVE MODE"
                )
                await asyncio.sleep(STALL_SECONDS)
        finally:
            await connection.close()

    async def scenario() -> tuple[LoadResult, int, dict[str, int]]:
        result = await run_load(engine, lock_history)
        backlog = outbox_length(engine)
        things = {thing_name(device.index): device.acknowledged for device in result.devices}
        return result, backlog, await wait_for_history(engine, things)

    result, backlog_after_stall, found = asyncio.run(scenario())
    print(report("history stall", result))

    for device in result.devices:
        assert device.closed_by_broker_at is None, f"the engine closed device {device.index}"
        assert not device.in_flight, f"device {device.index} has unacknowledged updates"
    before = result.acknowledged_between(result.stall_started - 2, result.stall_started)
    during = result.acknowledged_between(result.stall_started + 1, result.stall_ended)
    assert before > 0
    assert during > 0.5 * before, f"acknowledged {during:.0f}/s in the stall, {before:.0f}/s before"
    assert backlog_after_stall > 0, "the outbox was empty right after the stall"
    assert result.peak_rss < rss_bound(result.loaded_rss)
    assert "timed out" not in engine.log_text()

    things = {thing_name(device.index): device.acknowledged for device in result.devices}
    assert found == things
    assert engine.stop() == 0, engine.log_text()


def test_hot_store_stall_slows_devices(engine, redis_server):
    """Redis paused for STALL_SECONDS: the pipeline passes its high-water mark and the engine
    stops reading, so devices are slowed down by TCP.

    No connection is closed for keep alive, the engine's RSS stays under ``rss_bound()``, and
    every acknowledged update is in Redis after the pause and in PostgreSQL after the drain.
    """

    async def pause_redis() -> None:
        client = aioredis.Redis(host="127.0.0.1", port=redis_server.port)
        try:
            # The pause outlasts the sleep and UNPAUSE ends it, so that writes cannot resume
            # (and flood the devices with PUBACKs) before the stall window ends.
            timeout_ms = int((STALL_SECONDS + 30) * 1000)
            await client.execute_command("CLIENT", "PAUSE", timeout_ms, "WRITE")
            await asyncio.sleep(STALL_SECONDS)
            await client.execute_command("CLIENT", "UNPAUSE")
        finally:
            await client.aclose()

    async def scenario() -> tuple[LoadResult, dict[str, int]]:
        result = await run_load(engine, pause_redis)
        things = {thing_name(device.index): device.acknowledged for device in result.devices}
        return result, await wait_for_history(engine, things)

    result, found = asyncio.run(scenario())
    print(report("hot-store stall", result))

    for device in result.devices:
        assert device.closed_by_broker_at is None, f"the engine closed device {device.index}"
        assert not device.in_flight, f"device {device.index} has unacknowledged updates"
    before = result.acknowledged_between(result.stall_started - 2, result.stall_started)
    # The window ends half a second early: after UNPAUSE the backlog drains at once.
    during = result.acknowledged_between(result.stall_started + 1, result.stall_ended - 0.5)
    assert before > 0
    assert during < 0.01 * before, (
        f"acknowledged {during:.0f}/s in the pause, {before:.0f}/s before"
    )
    log = engine.log_text()
    assert "slowing devices down" in log
    assert "reading from all" in log
    assert "timed out" not in log
    assert result.peak_rss < rss_bound(result.loaded_rss)

    things = {thing_name(device.index): device.acknowledged for device in result.devices}
    assert hot_versions(engine, list(things)) == things
    assert found == things
    assert outbox_length(engine) == 0
    assert engine.stop() == 0, log
