"""The engine's storage behaviour on every backend: restart, history, tombstones and kill -9.

Each test runs three times: on the embedded stores (journal and SQLite, the default), on a
Redis hot store with SQLite history, and on Redis with PostgreSQL history. The Redis and
PostgreSQL servers are private ones from ``tests/storage/servers.py``, started once for this
module on free loopback ports. Every test gets a Redis database number and a PostgreSQL schema
of its own, so no test reads another's shadows or history.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
import redis

from conftest import BrokerThread, free_port, open_clients, scaled
from ironshadow.broker.config import BrokerConfig
from ironshadow.engine import Engine, StorageConfig
from ironshadow.storage.base import HistoryRow
from mqtt_client import V311, TestClient

# servers.py sits beside the storage tests, which import it by module name. Appending its
# folder (not prepending) keeps every other import resolving as before.
_STORAGE_TESTS = str(Path(__file__).resolve().parents[1] / "storage")
if _STORAGE_TESTS not in sys.path:
    sys.path.append(_STORAGE_TESTS)

from servers import PostgresServer, RedisServer, fresh_redis_url  # noqa: E402

THING = "kiln-3"
PREFIX = f"$aws/things/{THING}/shadow"
NAMED_PREFIX = f"{PREFIX}/name/config"

# Updates that the kill -9 test publishes before it kills the engine.
KILL_TEST_UPDATES = 200

BACKENDS = ["embedded", "redis-sqlite", "redis-postgres"]

_postgres_schemas = itertools.count()


def run(coroutine: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coroutine)


@dataclass(frozen=True)
class HistoryUpdate:
    """One row of the history store's ``shadow_updates``, with the JSON columns parsed."""

    shadow_name: str
    version: int
    reported: Any
    desired: Any


# --- servers and per-test stores --------------------------------------------------------


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


def fresh_postgres_dsn(server: PostgresServer) -> str:
    """Create an empty schema and return a DSN whose search_path starts with it."""
    name = f"engine_{next(_postgres_schemas)}"

    async def create() -> None:
        connection = await asyncpg.connect(server.dsn())
        try:
            await connection.execute(f"CREATE SCHEMA {name}")
        finally:
            await connection.close()

    run(create())
    return server.dsn() + f"?search_path={name}"


@pytest.fixture(params=BACKENDS)
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> StorageConfig:
    """Return a StorageConfig for the backend of this run, with stores of its own.

    The servers start only for the backends that need them, so the embedded runs need
    neither redis-server nor PostgreSQL installed.
    """
    if request.param == "embedded":
        return StorageConfig(tmp_path)
    redis_url = fresh_redis_url(request.getfixturevalue("redis_server"))
    if request.param == "redis-sqlite":
        return StorageConfig(tmp_path, redis_url=redis_url)
    postgres_dsn = fresh_postgres_dsn(request.getfixturevalue("postgres_server"))
    return StorageConfig(tmp_path, redis_url=redis_url, postgres_dsn=postgres_dsn)


@pytest.fixture
def start_engine() -> Iterator[Callable[[StorageConfig], BrokerThread]]:
    """Return a function that starts an engine on the given stores, stopped after the test.

    Clients close before the engines stop, so that no paho thread outlives the test.
    """
    started: list[BrokerThread] = []

    def start(storage: StorageConfig) -> BrokerThread:
        config = BrokerConfig(port=free_port(), sys_interval=0)
        thread = BrokerThread(config, Engine(config, storage=storage))
        started.append(thread)
        thread.start()
        return thread

    yield start
    while open_clients:
        open_clients.pop().close()
    for thread in started:
        thread.stop()


# --- reading the stores -----------------------------------------------------------------


def history_updates(storage: StorageConfig, thing: str) -> list[HistoryUpdate]:
    """Return the thing's rows of ``shadow_updates``, ordered by shadow name and version."""
    if storage.postgres_dsn is None:
        connection = sqlite3.connect(storage.data_dir / "history.sqlite3")
        try:
            records = connection.execute(
                "SELECT shadow_name, version, reported, desired FROM shadow_updates "
                "WHERE thing = ? ORDER BY shadow_name, version",
                (thing,),
            ).fetchall()
        finally:
            connection.close()
    else:
        records = run(
            fetch_postgres(
                storage.postgres_dsn,
                "SELECT shadow_name, version, reported, desired FROM shadow_updates "
                "WHERE thing = $1 ORDER BY shadow_name, version",
                thing,
            )
        )
    return [
        HistoryUpdate(
            shadow_name,
            version,
            None if reported is None else orjson.loads(reported),
            None if desired is None else orjson.loads(desired),
        )
        for shadow_name, version, reported, desired in records
    ]


def history_values(storage: StorageConfig, thing: str) -> list[tuple[str, str, float]]:
    """Return the thing's ``shadow_values`` as sorted ``(shadow name, field, value)``."""
    if storage.postgres_dsn is None:
        connection = sqlite3.connect(storage.data_dir / "history.sqlite3")
        try:
            records = connection.execute(
                "SELECT shadow_name, field, value FROM shadow_values WHERE thing = ?", (thing,)
            ).fetchall()
        finally:
            connection.close()
    else:
        records = run(
            fetch_postgres(
                storage.postgres_dsn,
                "SELECT shadow_name, field, value FROM shadow_values WHERE thing = $1",
                thing,
            )
        )
    return sorted((shadow_name, field, value) for shadow_name, field, value in records)


async def fetch_postgres(dsn: str, sql: str, *arguments: Any) -> list[tuple[Any, ...]]:
    connection = await asyncpg.connect(dsn)
    try:
        return [tuple(record) for record in await connection.fetch(sql, *arguments)]
    finally:
        await connection.close()


def outbox_rows(engine: BrokerThread) -> list[tuple[str, HistoryRow]]:
    """Return the rows waiting in the running engine's history outbox."""

    async def collect() -> list[tuple[str, HistoryRow]]:
        pipeline = engine.server.pipeline
        return [entry async for batch in pipeline.hot.pending_history() for entry in batch]

    return asyncio.run_coroutine_threadsafe(collect(), engine.loop).result(scaled(10))


def wait_for_history(engine: BrokerThread, rows: int) -> int:
    """Wait until the engine has committed ``rows`` history rows and return its count."""
    deadline = time.monotonic() + scaled(10)
    while True:
        committed = engine.call(lambda: engine.server.pipeline.history_rows_committed)
        if committed >= rows or time.monotonic() > deadline:
            return committed
        time.sleep(0.05)


# --- MQTT helpers -----------------------------------------------------------------------


def update(client: TestClient, prefix: str, state: dict[str, Any]) -> None:
    """Publish an update with QoS 1 and wait for the PUBACK, which follows the durable write."""
    info = client.publish(prefix + "/update", orjson.dumps({"state": state}), 1)
    assert info.is_published(), f"no PUBACK for the update {state} within 10 s"


def get_document(client: TestClient, prefix: str) -> tuple[str, dict[str, Any]]:
    """Request the shadow over MQTT and return the reply's topic and parsed payload."""
    client.publish(prefix + "/get", b"{}", 1)
    message = client.expect()
    return message.topic, orjson.loads(message.payload)


# --- tests ------------------------------------------------------------------------------


def test_shadows_survive_restart(storage, start_engine):
    engine = start_engine(storage)
    device = TestClient(engine.port, THING, V311)
    update(device, PREFIX, {"reported": {"temperature": 870, "door": "closed"}})
    update(device, PREFIX, {"reported": {"temperature": 905}, "desired": {"temperature": 900}})
    update(device, NAMED_PREFIX, {"reported": {"firmware": "2.1"}})
    device.close()
    engine.stop()

    restarted = start_engine(storage)
    shadows = restarted.server.shadows
    classic = restarted.call(shadows.shadows.get, THING)
    assert classic is not None
    assert classic.version == 2
    assert classic.state() == {
        "desired": {"temperature": 900},
        "reported": {"temperature": 905, "door": "closed"},
    }
    named = restarted.call(shadows.shadows.get, f"{THING}~config")
    assert named is not None
    assert named.version == 1
    assert restarted.call(shadows.named_shadow_names, THING) == ["config"]

    app = TestClient(restarted.port, "dashboard", V311)
    app.subscribe(PREFIX + "/get/accepted", 1)
    topic, document = get_document(app, PREFIX)
    assert topic == PREFIX + "/get/accepted"
    assert document["version"] == 2
    assert document["state"]["reported"] == {"temperature": 905, "door": "closed"}
    assert document["state"]["delta"] == {"temperature": 900}


def test_accepted_updates_have_history_rows(storage, start_engine):
    engine = start_engine(storage)
    device = TestClient(engine.port, THING, V311)
    device.subscribe(PREFIX + "/update/rejected", 1)
    update(device, PREFIX, {"reported": {"motor": {"rpm": 900}, "door": "closed"}})
    update(device, PREFIX, {"desired": {"temperature": 880}})
    update(device, NAMED_PREFIX, {"reported": {"build": 41}})
    # A version conflict is rejected with 409 and leaves no history row.
    device.publish(
        PREFIX + "/update", b'{"state": {"reported": {"rpm": 1}}, "version": 99}', 1
    )
    assert orjson.loads(device.expect().payload)["code"] == 409
    update(device, PREFIX, {"reported": {"motor": {"rpm": 950}}})

    assert wait_for_history(engine, 4) == 4
    assert outbox_rows(engine) == []
    assert history_updates(storage, THING) == [
        HistoryUpdate("", 1, {"motor": {"rpm": 900}, "door": "closed"}, None),
        HistoryUpdate("", 2, None, {"temperature": 880}),
        HistoryUpdate("", 3, {"motor": {"rpm": 950}}, None),
        HistoryUpdate("config", 1, {"build": 41}, None),
    ]
    assert history_values(storage, THING) == [
        ("", "motor.rpm", 900.0),
        ("", "motor.rpm", 950.0),
        ("config", "build", 41.0),
    ]


def test_tombstone_survives_restart(storage, start_engine):
    engine = start_engine(storage)
    device = TestClient(engine.port, THING, V311)
    device.subscribe(PREFIX + "/delete/accepted", 1)
    update(device, PREFIX, {"reported": {"temperature": 870}})
    update(device, PREFIX, {"reported": {"temperature": 905}})
    device.publish(PREFIX + "/delete", b"{}", 1)
    assert orjson.loads(device.expect().payload)["version"] == 2
    device.close()
    engine.stop()

    restarted = start_engine(storage)
    tombstone = restarted.call(restarted.server.shadows.shadows.get, THING)
    assert tombstone is not None
    assert tombstone.deleted
    assert tombstone.version == 2

    device = TestClient(restarted.port, THING, V311)
    device.subscribe(PREFIX + "/get/rejected", 1)
    device.subscribe(PREFIX + "/update/accepted", 1)
    topic, reply = get_document(device, PREFIX)
    assert topic == PREFIX + "/get/rejected"
    assert reply["code"] == 404
    update(device, PREFIX, {"reported": {"temperature": 20}})
    accepted = orjson.loads(device.expect().payload)
    assert accepted["version"] == 3
    device.close()
    restarted.stop()

    final = start_engine(storage)
    shadow = final.call(final.server.shadows.shadows.get, THING)
    assert shadow is not None
    assert not shadow.deleted
    assert shadow.version == 3
    assert shadow.state() == {"reported": {"temperature": 20}}
    # A delete writes a tombstone to the hot store but no history row.
    assert [row.version for row in history_updates(storage, THING)] == [1, 2, 3]


# --- kill -9 ----------------------------------------------------------------------------


def wait_for_port(process: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + scaled(15)
    while True:
        status = process.poll()
        assert status is None, f"the engine exited with status {status}:\n{log.read_text()}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"the engine did not start:\n{log.read_text()}"
            time.sleep(0.05)


def test_redis_postgres_survive_kill(redis_server, postgres_server, tmp_path, start_engine):
    storage = StorageConfig(
        tmp_path / "data",
        redis_url=fresh_redis_url(redis_server),
        postgres_dsn=fresh_postgres_dsn(postgres_server),
    )
    assert storage.redis_url is not None and storage.postgres_dsn is not None
    mqtt_port = free_port()
    command = [
        # One process, so that SIGKILL of its PID is a crash of the whole engine.
        sys.executable, "-m", "ironshadow", "serve", "--workers", "1",
        "--redis", storage.redis_url, "--postgres", storage.postgres_dsn,
        "--mqtt-port", str(mqtt_port), "--http-port", str(free_port()),
        "--data-dir", str(storage.data_dir),
    ]  # fmt: skip
    log = tmp_path / "engine.log"
    with open(log, "wb") as log_file:
        engine = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT
        )
    acknowledged = 0
    try:
        wait_for_port(engine, mqtt_port, log)
        device = TestClient(mqtt_port, THING, V311)
        for sequence in range(1, KILL_TEST_UPDATES + 1):
            info = device.publish(
                PREFIX + "/update", orjson.dumps({"state": {"reported": {"seq": sequence}}}), 1
            )
            if not info.is_published():
                break
            acknowledged = sequence
        device.drop()
    finally:
        os.kill(engine.pid, signal.SIGKILL)
        engine.wait()
    assert acknowledged == KILL_TEST_UPDATES

    # The hot store has the last acknowledged update before any engine reads it again.
    client = redis.Redis.from_url(storage.redis_url)
    try:
        stored = client.get(f"ironshadow:shadow:{THING}")
    finally:
        client.close()
    assert stored is not None
    assert orjson.loads(stored)["state"]["reported"]["seq"] == acknowledged

    restarted = start_engine(storage)
    shadow = restarted.call(restarted.server.shadows.shadows.get, THING)
    assert shadow is not None
    assert shadow.version == acknowledged
    assert shadow.state()["reported"]["seq"] == acknowledged

    # The outbox moves every acknowledged update into PostgreSQL after the restart. A row
    # that PostgreSQL committed just before the kill, but whose outbox entry was not yet
    # deleted, is written again, so versions are compared as a set.
    deadline = time.monotonic() + scaled(10)
    while True:
        rows = history_updates(storage, THING)
        versions = {row.version for row in rows}
        if len(versions) >= acknowledged or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert versions == set(range(1, acknowledged + 1))
    assert {row.reported["seq"] for row in rows} == set(range(1, acknowledged + 1))
