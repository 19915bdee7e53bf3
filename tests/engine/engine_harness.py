"""An engine subprocess on private Redis and PostgreSQL servers, and devices that load it.

``start_engine()`` runs ``python -m ironshadow serve`` on free loopback ports, so that the
engine's resident set size (``VmRSS`` and ``VmHWM`` in ``/proc/<pid>/status``) contains the
engine alone and a test can stop or kill its stores under it.

A :class:`Device` is a raw MQTT 3.1.1 client that publishes numbered QoS 1 reported updates to
its own shadow as fast as they are acknowledged, with at most WINDOW unacknowledged. It sends
PINGREQ after KEEP_ALIVE seconds without sending anything, as a compliant device does. The
functions at the end read what the engine stored in Redis and PostgreSQL.
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
import redis

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

# servers.py sits beside the storage tests, which import it by module name. Appending its
# folder (not prepending) keeps every other import resolving as before.
_STORAGE_TESTS = str(Path(__file__).resolve().parents[1] / "storage")
if _STORAGE_TESTS not in sys.path:
    sys.path.append(_STORAGE_TESTS)

# The test modules import the server classes from here, after the path is set.
from servers import PostgresServer, RedisServer, fresh_redis_url  # noqa: E402

# Unacknowledged updates per device: the engine's limit of requests waiting to be applied per
# connection. A device with more in flight may get 429 for the surplus, PUBACKed though not
# applied, and its acknowledged count would no longer match the shadow's version.
WINDOW = MAX_INFLIGHT_REQUESTS
# Seconds of keep alive, short so that a connection left unread during a stall would expire.
# NOTE: while the engine pauses reading, a PINGREQ waits unread too, so its PINGRESP comes only
# after the pause (about 17 s late in a 20 s stall). These devices wait for it, but a client
# that closes the connection when PINGRESP is late (paho-mqtt does after one keep alive) would
# disconnect itself.
KEEP_ALIVE = 5

_postgres_schemas = itertools.count()


# --- the engine -------------------------------------------------------------------------


async def create_schema(server: PostgresServer) -> str:
    name = f"engine_{next(_postgres_schemas)}"
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
    http_port: int
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


@contextlib.contextmanager
def running_engine(
    redis_server: RedisServer, postgres_server: PostgresServer, directory: Path
) -> Iterator[EngineProcess]:
    """Run an engine on a fresh Redis database and PostgreSQL schema of these servers.

    The engine logs to ``directory / "engine.log"`` and keeps its data directory there. It
    accepts MQTT connections when the block starts, and is stopped with SIGTERM when it ends.
    """
    redis_url = fresh_redis_url(redis_server)
    schema = asyncio.run(create_schema(postgres_server))
    postgres_dsn = postgres_server.dsn() + f"?search_path={schema}"
    mqtt_port = free_port()
    http_port = free_port()
    command = [
        # One process: /proc/<pid> of the engine's PID is then the whole engine.
        sys.executable, "-m", "ironshadow", "serve", "--workers", "1",
        "--redis", redis_url, "--postgres", postgres_dsn,
        "--host", "127.0.0.1",
        "--mqtt-port", str(mqtt_port), "--http-port", str(http_port),
        "--data-dir", str(directory / "data"),
        "--sys-interval", "0",
    ]  # fmt: skip
    log = directory / "engine.log"
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT
        )
    running = EngineProcess(process, mqtt_port, http_port, redis_url, postgres_dsn, schema, log)
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
    return f"device-{index:03d}"


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
