"""RedisHotStore against a private redis-server started for this module."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Coroutine, Iterator
from typing import Any

import orjson
import pytest
import redis
from servers import RedisServer, free_port

from ironshadow.storage.base import HistoryRow, ShadowWrite, StoreUnavailable
from ironshadow.storage.redis import RedisHotStore, redact_url

_prefixes = itertools.count()


def run(coroutine: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coroutine)


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer.start()
    yield server
    server.stop()


@pytest.fixture
def prefix() -> str:
    """Return a key prefix of its own for each test, so tests share the server safely."""
    return f"test{next(_prefixes)}"


@pytest.fixture
def plain_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis(port=redis_server.port)
    yield client
    client.close()


def document(version: int, **reported: Any) -> bytes:
    return orjson.dumps({"state": {"reported": reported}, "version": version})


def history_row(thing: str, version: int, shadow_name: str = "") -> HistoryRow:
    return HistoryRow(
        time=1_700_000_000.25 + version,
        thing=thing,
        shadow_name=shadow_name,
        version=version,
        reported=orjson.dumps({"temperature": 20 + version}),
        desired=None,
    )


async def load_all(store: RedisHotStore) -> dict[str, bytes]:
    loaded: dict[str, bytes] = {}
    async for batch in store.load_shadows():
        loaded.update(batch)
    return loaded


async def pending(store: RedisHotStore) -> list[tuple[str, HistoryRow]]:
    return [entry async for batch in store.pending_history() for entry in batch]


def test_write_then_load(redis_server: RedisServer, prefix: str) -> None:
    async def scenario() -> dict[str, bytes]:
        store = RedisHotStore(redis_server.url, prefix=prefix)
        await store.open()
        await store.write(
            [
                ShadowWrite("pump-1", document(1, rpm=1200)),
                ShadowWrite("pump-1~config", document(4, mode="eco")),
            ],
            [],
        )
        loaded = await load_all(store)
        await store.close()
        return loaded

    loaded = run(scenario())
    assert loaded == {
        "pump-1": document(1, rpm=1200),
        "pump-1~config": document(4, mode="eco"),
    }


def test_load_after_reopen(redis_server: RedisServer, prefix: str) -> None:
    async def write_then_close() -> None:
        store = RedisHotStore(redis_server.url, prefix=prefix)
        await store.open()
        await store.write([ShadowWrite("press-7", document(3, force=9.5))], [])
        await store.close()

    async def reopen_and_load() -> dict[str, bytes]:
        store = RedisHotStore(redis_server.url, prefix=prefix)
        await store.open()
        loaded = await load_all(store)
        await store.close()
        return loaded

    run(write_then_close())
    assert run(reopen_and_load()) == {"press-7": document(3, force=9.5)}


def test_delete_removes_key(
    redis_server: RedisServer, prefix: str, plain_client: redis.Redis
) -> None:
    async def scenario() -> dict[str, bytes]:
        store = RedisHotStore(redis_server.url, prefix=prefix)
        await store.open()
        await store.write([ShadowWrite("valve-2", document(1, open=True))], [])
        await store.write([ShadowWrite("valve-2", None)], [])
        loaded = await load_all(store)
        await store.close()
        return loaded

    assert run(scenario()) == {}
    assert plain_client.exists(f"{prefix}:shadow:valve-2") == 0


def test_load_many_in_batches(redis_server: RedisServer, prefix: str) -> None:
    count = 2500  # more than two SCAN/MGET batches

    async def scenario() -> tuple[int, dict[str, bytes]]:
        store = RedisHotStore(redis_server.url, prefix=prefix)
        await store.open()
        await store.write(
            [ShadowWrite(f"sensor-{i}", document(1, value=i)) for i in range(count)], []
        )
        batches = 0
        loaded: dict[str, bytes] = {}
        async for batch in store.load_shadows():
            batches += 1
            loaded.update(batch)
        await store.close()
        return batches, loaded

    batches, loaded = run(scenario())
    assert len(loaded) == count
    assert loaded["sensor-1234"] == document(1, value=1234)
    assert batches > 1


def test_load_ignores_other_prefixes(redis_server: RedisServer, prefix: str) -> None:
    async def scenario() -> dict[str, bytes]:
        other = RedisHotStore(redis_server.url, prefix=prefix + "-other")
        store = RedisHotStore(redis_server.url, prefix=prefix)
        await other.open()
        await store.open()
        await other.write([ShadowWrite("robot", document(1, x=1))], [])
        await store.write([ShadowWrite("robot", document(2, x=2))], [])
        loaded = await load_all(store)
        await other.close()
        await store.close()
        return loaded

    assert run(scenario()) == {"robot": document(2, x=2)}


def test_key_schema_readable_by_plain_client(
    redis_server: RedisServer, prefix: str, plain_client: redis.Redis
) -> None:
    async def scenario() -> None:
        store = RedisHotStore(redis_server.url, prefix=prefix)
        await store.open()
        await store.write(
            [
                ShadowWrite("drill-3", document(5, depth=12.5)),
                ShadowWrite("drill-3~firmware", document(1, build="a1")),
            ],
            [history_row("drill-3", 5)],
        )
        await store.close()

    run(scenario())

    assert orjson.loads(plain_client.get(f"{prefix}:shadow:drill-3")) == {
        "state": {"reported": {"depth": 12.5}},
        "version": 5,
    }
    assert plain_client.get(f"{prefix}:shadow:drill-3~firmware") == document(1, build="a1")
    entries = plain_client.xrange(f"{prefix}:history")
    assert len(entries) == 1
    fields = entries[0][1]
    assert fields[b"thing"] == b"drill-3"
    assert fields[b"shadow_name"] == b""
    assert fields[b"version"] == b"5"
    assert float(fields[b"time"]) == 1_700_000_005.25
    assert fields[b"reported"] == b'{"temperature":25}'
    assert b"desired" not in fields


def test_outbox_pending_then_committed(redis_server: RedisServer, prefix: str) -> None:
    rows = [history_row("lathe-1", version) for version in range(1, 4)]
    rows.append(
        HistoryRow(
            time=1_700_000_100.0,
            thing="lathe-1",
            shadow_name="config",
            version=1,
            reported=None,
            desired=b'{"speed":3}',
        )
    )

    async def scenario() -> tuple[list[tuple[str, HistoryRow]], list[tuple[str, HistoryRow]]]:
        store = RedisHotStore(redis_server.url, prefix=prefix)
        await store.open()
        await store.write([ShadowWrite("lathe-1", document(3, t=1))], rows[:3])
        await store.write([], rows[3:])
        before = await pending(store)
        await store.history_committed([position for position, _ in before[:2]])
        after = await pending(store)
        await store.close()
        return before, after

    before, after = run(scenario())
    assert [row for _, row in before] == rows
    assert [row for _, row in after] == rows[2:]
    assert [position for position, _ in after] == [position for position, _ in before[2:]]


def test_outbox_survives_reopen(redis_server: RedisServer, prefix: str) -> None:
    async def write_then_close() -> None:
        store = RedisHotStore(redis_server.url, prefix=prefix)
        await store.open()
        await store.write([], [history_row("mixer-9", 1)])
        await store.close()

    async def reopen_and_read() -> list[tuple[str, HistoryRow]]:
        store = RedisHotStore(redis_server.url, prefix=prefix)
        await store.open()
        entries = await pending(store)
        await store.close()
        return entries

    run(write_then_close())
    assert [row for _, row in run(reopen_and_read())] == [history_row("mixer-9", 1)]


def test_outbox_pages_through_batches(redis_server: RedisServer, prefix: str) -> None:
    count = 2100  # more than two XRANGE batches

    async def scenario() -> tuple[int, list[int]]:
        store = RedisHotStore(redis_server.url, prefix=prefix)
        await store.open()
        await store.write([], [history_row("conveyor", version) for version in range(count)])
        batches = 0
        versions = []
        async for batch in store.pending_history():
            batches += 1
            versions.extend(row.version for _, row in batch)
        await store.history_committed([])
        await store.close()
        return batches, versions

    batches, versions = run(scenario())
    assert versions == list(range(count))
    assert batches == 3


def test_invalid_outbox_entry_skipped(
    redis_server: RedisServer, prefix: str, plain_client: redis.Redis
) -> None:
    plain_client.xadd(f"{prefix}:history", {"thing": "no-version"})

    async def scenario() -> list[tuple[str, HistoryRow]]:
        store = RedisHotStore(redis_server.url, prefix=prefix)
        await store.open()
        await store.write([], [history_row("kiln", 1)])
        entries = await pending(store)
        await store.close()
        return entries

    assert [row for _, row in run(scenario())] == [history_row("kiln", 1)]


def test_write_is_one_transaction(
    redis_server: RedisServer, prefix: str, plain_client: redis.Redis
) -> None:
    """A batch of SETs and XADDs reaches Redis as one MULTI/EXEC."""
    before = plain_client.info("commandstats").get("cmdstat_exec", {}).get("calls", 0)

    async def scenario() -> None:
        store = RedisHotStore(redis_server.url, prefix=prefix)
        await store.open()
        await store.write(
            [ShadowWrite(f"cell-{i}", document(1, i=i)) for i in range(10)],
            [history_row(f"cell-{i}", 1) for i in range(10)],
        )
        await store.close()

    run(scenario())
    after = plain_client.info("commandstats")["cmdstat_exec"]["calls"]
    assert after - before == 1


def test_unreachable_url_message() -> None:
    url = f"redis://operator:hunter2@127.0.0.1:{free_port()}/0"
    store = RedisHotStore(url)

    with pytest.raises(StoreUnavailable) as raised:
        run(store.open())

    message = str(raised.value)
    assert f"redis://operator:***@127.0.0.1:{url.rsplit(':', 1)[1]}" in message
    assert "hunter2" not in message
    assert "Check that redis-server is running" in message


def test_wrong_password_message(redis_server: RedisServer) -> None:
    # The private server has only the default user, so AUTH as another user fails.
    store = RedisHotStore(f"redis://nobody:hunter2@127.0.0.1:{redis_server.port}/0")

    with pytest.raises(StoreUnavailable) as raised:
        run(store.open())

    message = str(raised.value)
    assert "hunter2" not in message
    assert "password" in message


def test_redact_url() -> None:
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert redact_url("redis://u:secret@host:1/2") == "redis://u:***@host:1/2"
    assert redact_url("rediss://:secret@host") == "rediss://:***@host"
