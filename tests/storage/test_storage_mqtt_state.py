"""The MQTT state stores: SQLite in the data folder, and Redis on a private redis-server."""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from servers import RedisServer, free_port

from ironshadow.storage.base import StoreUnavailable
from ironshadow.storage.mqtt_state import (
    SQLITE_SCHEMA_VERSION,
    MqttStateStore,
    RedisMqttStateStore,
    SQLiteMqttStateStore,
)

_prefixes = itertools.count()


def run(coroutine: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coroutine)


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer.start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "redis"])
def make_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Callable[[], MqttStateStore]:
    """Return a function that creates a store on this test's file or Redis key prefix."""
    if request.param == "sqlite":
        return lambda: SQLiteMqttStateStore(tmp_path / "mqtt-state.sqlite3")
    server = request.getfixturevalue("redis_server")
    prefix = f"test{next(_prefixes)}"
    return lambda: RedisMqttStateStore(f"redis://127.0.0.1:{server.port}/0", prefix)


async def write_then_load(
    store: MqttStateStore,
    *writes: tuple[dict[str, bytes | None], dict[str, bytes | None]],
) -> Any:
    await store.open()
    try:
        for retained, sessions in writes:
            await store.write(retained, sessions)
        return await store.load()
    finally:
        await store.close()


def test_empty_store_loads_nothing(make_store):
    state = run(write_then_load(make_store()))
    assert state.retained == {}
    assert state.sessions == {}


def test_write_replace_and_delete(make_store):
    state = run(
        write_then_load(
            make_store(),
            ({"a/b": b"one", "c": b"two"}, {"dev-1": b"\x00s1", "dev-2": b"s2"}),
            ({"a/b": b"three", "c": None}, {"dev-2": None, "dev-3": b"s3"}),
            ({"never/stored": None}, {"never-stored": None}),
        )
    )
    assert state.retained == {"a/b": b"three"}
    assert state.sessions == {"dev-1": b"\x00s1", "dev-3": b"s3"}


def test_state_survives_reopen(make_store):
    run(write_then_load(make_store(), ({"t/ü": b"retained"}, {"dev-ä": b"session"})))
    state = run(write_then_load(make_store()))
    assert state.retained == {"t/ü": b"retained"}
    assert state.sessions == {"dev-ä": b"session"}


def test_many_entries_load_in_full(make_store):
    sessions: dict[str, bytes | None] = {f"dev-{n}": b"%d" % n for n in range(2500)}
    state = run(write_then_load(make_store(), ({}, sessions)))
    assert state.sessions == sessions


def test_sqlite_file_uses_wal_and_schema_version(tmp_path):
    path = tmp_path / "mqtt-state.sqlite3"
    run(write_then_load(SQLiteMqttStateStore(path), ({"t": b"x"}, {})))
    connection = sqlite3.connect(path)
    try:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert connection.execute("PRAGMA user_version").fetchone()[0] == SQLITE_SCHEMA_VERSION
        assert connection.execute("SELECT topic, message FROM retained").fetchall() == [
            ("t", b"x")
        ]
    finally:
        connection.close()


def test_sqlite_file_of_newer_schema_rejected(tmp_path):
    path = tmp_path / "mqtt-state.sqlite3"
    connection = sqlite3.connect(path)
    connection.execute(f"PRAGMA user_version={SQLITE_SCHEMA_VERSION + 1}")
    connection.close()
    with pytest.raises(StoreUnavailable, match="schema version 2"):
        run(SQLiteMqttStateStore(path).open())


def test_sqlite_file_that_is_not_a_database(tmp_path):
    path = tmp_path / "mqtt-state.sqlite3"
    path.write_bytes(b"not a database" * 100)
    with pytest.raises(StoreUnavailable, match="MQTT state"):
        run(SQLiteMqttStateStore(path).open())


def test_redis_keys_follow_schema(redis_server):
    store = RedisMqttStateStore(f"redis://127.0.0.1:{redis_server.port}/0", "schema")
    run(write_then_load(store, ({"plant/state": b"m"}, {"kiln-3": b"s"})))
    client = redis.Redis(port=redis_server.port)
    try:
        assert client.hgetall("schema:retained") == {b"plant/state": b"m"}
        assert client.hgetall("schema:sessions") == {b"kiln-3": b"s"}
    finally:
        client.close()


def test_redis_unreachable_names_url():
    store = RedisMqttStateStore(f"redis://:secret@127.0.0.1:{free_port()}/0")
    with pytest.raises(StoreUnavailable) as raised:
        run(store.open())
    assert "redis://:***@127.0.0.1" in str(raised.value)
    assert "secret" not in str(raised.value)
    assert "Check that redis-server is running" in str(raised.value)
