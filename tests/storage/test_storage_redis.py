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
    assert list(entries[0][1]) == [b"rows"]
    assert orjson.loads(entries[0][1][b"rows"]) == [
        [1_700_000_005.25, "drill-3", "", 5, {"temperature": 25}, None]
    ]


def test_batch_is_one_mset_and_one_xadd(
    redis_server: RedisServer, prefix: str, plain_client: redis.Redis
) -> None:
    """The last write to a key in a batch wins, and a batch's rows share one stream entry."""

    async def scenario() -> list[tuple[str, HistoryRow]]:
        store = RedisHotStore(redis_server.url, prefix=prefix)
        await store.open()
        await store.write([ShadowWrite("press-1", document(1, p=1))], [])
        await store.write(
            [
                ShadowWrite("press-1", None),
                ShadowWrite("press-2", document(1, p=2)),
                ShadowWrite("press-2", document(2, p=3)),
                ShadowWrite("press-3", document(1, p=4)),
                ShadowWrite("press-3", None),
                ShadowWrite("press-1", document(1, p=5)),
            ],
            [history_row("press-2", 1), history_row("press-2", 2)],
        )
        entries = await pending(store)
        await store.close()
        return entries

    entries = run(scenario())
    assert plain_client.get(f"{prefix}:shadow:press-1") == document(1, p=5)
    assert plain_client.get(f"{prefix}:shadow:press-2") == document(2, p=3)
    assert plain_client.get(f"{prefix}:shadow:press-3") is None
    assert plain_client.xlen(f"{prefix}:history") == 1
    assert [row for _, row in entries] == [history_row("press-2", 1), history_row("press-2", 2)]


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
    """Rows come in batches of OUTBOX_BATCH_SIZE, from memory and after a reopen alike."""
    writes = 7
    rows_per_write = 300  # 2,100 rows: more than two batches of OUTBOX_BATCH_SIZE

    async def batch_sizes(store: RedisHotStore) -> list[list[int]]:
        return [[row.version for _, row in batch] async for batch in store.pending_history()]

    async def scenario() -> tuple[list[list[int]], list[list[int]]]:
        store = RedisHotStore(redis_server.url, prefix=prefix)
        await store.open()
        for write in range(writes):
            first = write * rows_per_write
            await store.write(
                [], [history_row("conveyor", v) for v in range(first, first + rows_per_write)]
            )
        from_memory = await batch_sizes(store)
        await store.close()
        await store.open()
        from_stream = await batch_sizes(store)
        await store.close()
        return from_memory, from_stream

    from_memory, from_stream = run(scenario())
    everything = list(range(writes * rows_per_write))
    assert [v for batch in from_memory for v in batch] == everything
    assert [len(batch) for batch in from_memory] == [1000, 1000, 100]
    assert [v for batch in from_stream for v in batch] == everything
    # XRANGE requests one entry, then as many as make about 1,000 rows.
    assert [len(batch) for batch in from_stream] == [300, 900, 900]


def test_outbox_read_back_after_memory_overflow(
    redis_server: RedisServer, prefix: str, plain_client: redis.Redis
) -> None:
    """Past its memory bound the store drops its copies and reads the stream instead."""

    async def scenario() -> tuple[list[int], list[int], int]:
        store = RedisHotStore(redis_server.url, prefix=prefix)
        await store.open()
        store._outbox.memory_rows = 10
        for version in range(1, 13):  # the twelfth row overflows memory
            await store.write([], [history_row("oven", version)])
        first = await pending(store)
        await store.history_committed([position for position, _ in first[:5]])
        # Back in memory mode now; this row comes from memory, the rest from the stream.
        await store.write([], [history_row("oven", 13)])
        second = await pending(store)
        await store.history_committed([position for position, _ in second])
        left = await pending(store)
        await store.close()
        return [row.version for _, row in first], [row.version for _, row in second], len(left)

    first, second, left = run(scenario())
    assert first == list(range(1, 13))
    assert second == list(range(6, 14))
    assert left == 0
    assert plain_client.xlen(f"{prefix}:history") == 0


def test_outbox_overflow_during_stream_read(
    redis_server: RedisServer, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows that memory drops while the stream is being read are read from the stream."""

    async def scenario() -> tuple[list[int], list[int]]:
        store = RedisHotStore(redis_server.url, prefix=prefix)
        await store.open()
        store._outbox.memory_rows = 10
        await store.write([], [history_row("kiln", 1)])
        read_stream = store.client.xrange

        async def read_then_overflow(*args: Any, **kwargs: Any) -> Any:
            entries = await read_stream(*args, **kwargs)
            monkeypatch.undo()
            # Ten rows written during the read overflow memory, which drops all its rows.
            await store.write([], [history_row("kiln", version) for version in range(2, 12)])
            return entries

        monkeypatch.setattr(store.client, "xrange", read_then_overflow)
        first_pass = await pending(store)
        await store.history_committed([position for position, _ in first_pass])
        second_pass = await pending(store)
        await store.close()
        return [row.version for _, row in first_pass], [row.version for _, row in second_pass]

    first_pass, second_pass = run(scenario())
    assert first_pass == list(range(1, 12))
    assert second_pass == []


def test_outbox_overflow_while_batch_in_flight(
    redis_server: RedisServer, prefix: str, plain_client: redis.Redis
) -> None:
    """An entry split over two batches stays in the stream until both are committed, even
    when memory overflows while the first batch is being moved."""

    async def scenario() -> tuple[int, list[int]]:
        store = RedisHotStore(redis_server.url, prefix=prefix)
        await store.open()
        store._outbox.memory_rows = 1500
        await store.write([], [history_row("kiln", version) for version in range(1, 1201)])
        history_pass = store.pending_history()
        first_batch = await anext(history_pass)  # 1,000 of the entry's 1,200 rows
        await store.write([], [history_row("kiln", version) for version in range(1201, 1601)])
        await store.history_committed([position for position, _ in first_batch])
        in_stream = plain_client.xlen(f"{prefix}:history")
        # The pass ends early, as it does when moving the next batch fails.
        await history_pass.aclose()
        rest = await pending(store)
        await store.close()
        return in_stream, [row.version for _, row in rest]

    in_stream, rest = run(scenario())
    assert in_stream == 2
    assert rest == list(range(1001, 1601))


def test_outbox_overflow_before_entry_is_reached(
    redis_server: RedisServer, prefix: str, plain_client: redis.Redis
) -> None:
    """Memory overflows while a pass moves one entry, before it reaches the next one. That
    next entry, moved in part when the pass ends, stays in the stream with its other rows."""

    async def scenario() -> list[int]:
        store = RedisHotStore(redis_server.url, prefix=prefix)
        await store.open()
        store._outbox.memory_rows = 3000
        await store.write([], [history_row("oven", version) for version in range(1, 1001)])
        await store.write([], [history_row("oven", version) for version in range(1001, 2501)])
        history_pass = store.pending_history()
        first_batch = await anext(history_pass)  # the first entry, whole
        # 600 more rows overflow memory while the first batch is being moved.
        await store.write([], [history_row("oven", version) for version in range(2501, 3101)])
        await store.history_committed([position for position, _ in first_batch])
        second_batch = await anext(history_pass)  # 1,000 of the second entry's 1,500 rows
        await store.history_committed([position for position, _ in second_batch])
        # The pass ends early, as it does when moving the next batch fails.
        await history_pass.aclose()
        rest = await pending(store)
        await store.close()
        return [row.version for _, row in rest]

    assert run(scenario()) == list(range(2001, 3101))


def test_outbox_partly_committed_entry(
    redis_server: RedisServer, prefix: str, plain_client: redis.Redis
) -> None:
    """An entry leaves the stream only when every one of its rows is committed."""
    rows = [history_row("saw", version) for version in range(1, 4)]

    async def scenario() -> tuple[list[int], list[int], int]:
        store = RedisHotStore(redis_server.url, prefix=prefix)
        await store.open()
        await store.write([], rows)
        positions = [position for position, _ in await pending(store)]
        await store.history_committed(positions[:2])
        still_in_stream = plain_client.xlen(f"{prefix}:history")
        remaining = [row.version for _, row in await pending(store)]
        await store.history_committed(positions[2:])
        after = [row.version for _, row in await pending(store)]
        await store.close()
        return remaining, after, still_in_stream

    remaining, after, still_in_stream = run(scenario())
    assert remaining == [3]
    assert after == []
    assert still_in_stream == 1
    assert plain_client.xlen(f"{prefix}:history") == 0


def test_outbox_deleted_after_failed_xdel() -> None:
    """Rows committed while Redis was down leave the stream once it is back, and are not
    yielded again: neither by this store nor by one opened later, as after an engine restart.
    """
    server = RedisServer.start(durable=True)
    rows = [history_row("press", version) for version in range(1, 4)]

    async def scenario() -> tuple[list[tuple[str, HistoryRow]], list[tuple[str, HistoryRow]]]:
        store = RedisHotStore(server.url, prefix="xdel")
        await store.open()
        await store.write([], rows)
        positions = [position for position, _ in await pending(store)]
        server.kill()
        with pytest.raises(StoreUnavailable):
            await store.history_committed(positions)
        server.restart()
        again = await pending(store)
        await store.close()

        reopened = RedisHotStore(server.url, prefix="xdel")
        await reopened.open()
        after_reopen = await pending(reopened)
        await reopened.close()
        return again, after_reopen

    try:
        again, after_reopen = run(scenario())
        client = redis.Redis(port=server.port)
        try:
            length = client.xlen("xdel:history")
        finally:
            client.close()
    finally:
        server.stop()
    assert again == []
    assert after_reopen == []
    assert length == 0


def lose_reply(store: RedisHotStore, monkeypatch: pytest.MonkeyPatch, applied: bool) -> None:
    """Make the store's next transactions fail as if the connection broke before the reply,
    after Redis applied them when ``applied`` is true."""
    transaction = store._transaction

    async def failing(commands: list[bytes]) -> list[Any]:
        if applied:
            await transaction(commands)
        raise StoreUnavailable("the connection broke before the reply")

    monkeypatch.setattr(store, "_transaction", failing)


@pytest.mark.parametrize("applied", [True, False], ids=["applied", "not-applied"])
def test_write_retried_after_lost_reply(
    redis_server: RedisServer,
    prefix: str,
    plain_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    applied: bool,
) -> None:
    """The retry of a write whose reply was lost adds its outbox entry once, whether or not
    Redis applied the first attempt, and the history waits until the retry."""
    rows = [history_row("drill", version) for version in range(1, 4)]
    shadows = [ShadowWrite("drill", document(3, depth=12))]

    async def scenario() -> tuple[list[tuple[str, HistoryRow]], list[tuple[str, HistoryRow]]]:
        store = RedisHotStore(redis_server.url, prefix=prefix)
        await store.open()
        lose_reply(store, monkeypatch, applied)
        with pytest.raises(StoreUnavailable):
            await store.write(shadows, rows)
        while_unknown = await pending(store)
        monkeypatch.undo()
        await store.write(shadows, rows)
        after_retry = await pending(store)
        await store.close()
        return while_unknown, after_retry

    while_unknown, after_retry = run(scenario())
    assert while_unknown == []
    assert [row for _, row in after_retry] == rows
    assert plain_client.xlen(f"{prefix}:history") == 1
    assert plain_client.get(f"{prefix}:shadow:drill") == document(3, depth=12)


def test_write_after_abandoned_lost_reply(
    redis_server: RedisServer,
    prefix: str,
    plain_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When the caller writes other rows after a lost reply, the entry that Redis applied
    is read back from the stream, so its rows still reach the history once."""
    first = [history_row("lathe", 1)]
    second = [history_row("lathe", 2)]

    async def scenario() -> list[tuple[str, HistoryRow]]:
        store = RedisHotStore(redis_server.url, prefix=prefix)
        await store.open()
        await pending(store)  # a first pass finds the stream empty and reads memory only
        lose_reply(store, monkeypatch, applied=True)
        with pytest.raises(StoreUnavailable):
            await store.write([], first)
        monkeypatch.undo()
        await store.write([], second)
        entries = await pending(store)
        await store.close()
        return entries

    assert [row for _, row in run(scenario())] == first + second
    assert plain_client.xlen(f"{prefix}:history") == 2


def test_commit_rejects_foreign_position(redis_server: RedisServer, prefix: str) -> None:
    async def scenario() -> None:
        store = RedisHotStore(redis_server.url, prefix=prefix)
        await store.open()
        try:
            await store.history_committed(["17"])
        finally:
            await store.close()

    with pytest.raises(ValueError, match="invalid outbox position '17'"):
        run(scenario())


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
    """A batch of shadows and history rows reaches Redis as one MULTI/EXEC."""
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


def test_outbox_rows_missing_from_memory_are_found(
    redis_server: RedisServer, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A periodic read of the stream moves rows that memory lost track of."""
    monkeypatch.setattr("ironshadow.storage.redis.STREAM_RECHECK_SECONDS", 0.0)

    async def scenario() -> list[int]:
        store = RedisHotStore(redis_server.url, prefix=prefix)
        await store.open()
        await pending(store)  # the first pass reads the empty stream
        await store.write([], [history_row("lathe", 1)])
        await store.write([], [history_row("lathe", 2)])
        # Lose the first entry from memory, as a bookkeeping gap would.
        outbox = store._outbox
        first_id = outbox.first_id()
        outbox._cached_rows -= len(outbox._cached.pop(first_id))
        outbox.complete = True
        versions = [row.version for _, row in await pending(store)]
        await store.close()
        return versions

    assert run(scenario()) == [1, 2]
