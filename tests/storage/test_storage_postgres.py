"""PostgresHistoryStore against a private PostgreSQL cluster started for this module.

Each test gets a schema of its own, named first in its DSN's search_path (which asyncpg
sends as a server setting), so tables, partitions and retention do not leak between tests.
A schema is much faster to create than a database.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Coroutine, Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
import orjson
import pytest
from servers import PostgresServer, free_port

from ironshadow.storage.base import HistoryRow, StoreUnavailable
from ironshadow.storage.postgres import (
    HistoryBucket,
    HistoryPoint,
    PostgresHistoryStore,
    numeric_leaves,
    redact_dsn,
)

_schemas = itertools.count()

DAY = 86_400.0
# 2024-03-10 00:00:00 UTC
BASE_TIME = 1_710_028_800.0


def run(coroutine: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coroutine)


@pytest.fixture(scope="module")
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer.start()
    yield server
    server.stop()


@pytest.fixture
def dsn(postgres_server: PostgresServer) -> str:
    """Create an empty schema for one test and return a DSN that uses it."""
    name = f"history_{next(_schemas)}"

    async def create() -> None:
        connection = await asyncpg.connect(postgres_server.dsn())
        try:
            await connection.execute(f"CREATE SCHEMA {name}")
        finally:
            await connection.close()

    run(create())
    return postgres_server.dsn() + f"?search_path={name}"


async def fetch(dsn: str, sql: str, *arguments: Any) -> list[asyncpg.Record]:
    connection = await asyncpg.connect(dsn)
    try:
        return await connection.fetch(sql, *arguments)
    finally:
        await connection.close()


async def partition_names(dsn: str, table: str) -> list[str]:
    records = await fetch(
        dsn,
        "SELECT child.relname FROM pg_inherits "
        "JOIN pg_class child ON child.oid = pg_inherits.inhrelid "
        "WHERE pg_inherits.inhparent = $1::regclass ORDER BY 1",
        table,
    )
    return [record[0] for record in records]


def row(
    time: float, version: int, reported: Any = None, desired: Any = None, **fields: Any
) -> HistoryRow:
    return HistoryRow(
        time=time,
        thing=fields.get("thing", "oven-1"),
        shadow_name=fields.get("shadow_name", ""),
        version=version,
        reported=None if reported is None else orjson.dumps(reported),
        desired=None if desired is None else orjson.dumps(desired),
    )


def test_numeric_leaves() -> None:
    document = {
        "temperature": 21.5,
        "count": 3,
        "on": True,
        "label": "north",
        "nothing": None,
        "axes": {"x": 1, "y": {"z": -2.5}, "enabled": False},
        "samples": [1, 2, 3],
        "huge": 10**400,
    }

    leaves = dict(numeric_leaves(document))

    assert leaves == {"temperature": 21.5, "count": 3.0, "axes.x": 1.0, "axes.y.z": -2.5}


def test_numeric_leaves_of_non_object() -> None:
    assert list(numeric_leaves(None)) == []
    assert list(numeric_leaves([1, 2])) == []
    assert list(numeric_leaves(7)) == []


def test_batch_copy_round_trip(dsn: str) -> None:
    rows = [
        row(BASE_TIME + 1.5, 1, reported={"temperature": 180, "door": {"open": True}}),
        row(BASE_TIME + 2.0, 2, desired={"temperature": 200}),
        row(BASE_TIME + 3.0, 1, reported={"rpm": 900.5}, thing="fan-2", shadow_name="motor"),
        row(BASE_TIME + 4.0, 3, reported=None, desired=None),
    ]

    async def scenario() -> tuple[list[asyncpg.Record], list[asyncpg.Record]]:
        store = PostgresHistoryStore(dsn)
        await store.open()
        await store.write(rows)
        await store.close()
        updates = await fetch(
            dsn,
            "SELECT extract(epoch FROM time)::float8, thing, shadow_name, version, "
            "reported::text, desired::text FROM shadow_updates ORDER BY time",
        )
        values = await fetch(
            dsn,
            "SELECT extract(epoch FROM time)::float8, thing, shadow_name, field, value "
            "FROM shadow_values ORDER BY time, field",
        )
        return updates, values

    updates, values = run(scenario())

    assert [tuple(record) for record in updates] == [
        (BASE_TIME + 1.5, "oven-1", "", 1, '{"door": {"open": true}, "temperature": 180}', None),
        (BASE_TIME + 2.0, "oven-1", "", 2, None, '{"temperature": 200}'),
        (BASE_TIME + 3.0, "fan-2", "motor", 1, '{"rpm": 900.5}', None),
        (BASE_TIME + 4.0, "oven-1", "", 3, None, None),
    ]
    assert [tuple(record) for record in values] == [
        (BASE_TIME + 1.5, "oven-1", "", "temperature", 180.0),
        (BASE_TIME + 3.0, "fan-2", "motor", "rpm", 900.5),
    ]


def test_large_batch_in_one_transaction(dsn: str) -> None:
    count = 5000
    rows = [
        row(BASE_TIME + i * 0.01, i, reported={"a": i, "b": {"c": i * 2}}) for i in range(count)
    ]

    async def scenario() -> tuple[int, int]:
        store = PostgresHistoryStore(dsn)
        await store.open()
        await store.write(rows)
        await store.close()
        updates = await fetch(dsn, "SELECT count(*) FROM shadow_updates")
        values = await fetch(dsn, "SELECT count(*) FROM shadow_values")
        return updates[0][0], values[0][0]

    assert run(scenario()) == (count, 2 * count)


def test_failed_batch_writes_nothing(dsn: str) -> None:
    """A row that PostgreSQL rejects aborts the whole batch, leaf rows included."""
    rows = [
        row(BASE_TIME + 1, 1, reported={"ok": 1}),
        # jsonb cannot store the NUL character.
        HistoryRow(BASE_TIME + 2, "oven-1", "", 2, b'{"text": "\\u0000"}', None),
    ]

    async def scenario() -> tuple[int, int]:
        store = PostgresHistoryStore(dsn)
        await store.open()
        try:
            with pytest.raises(asyncpg.PostgresError):
                await store.write(rows)
        finally:
            await store.close()
        updates = await fetch(dsn, "SELECT count(*) FROM shadow_updates")
        values = await fetch(dsn, "SELECT count(*) FROM shadow_values")
        return updates[0][0], values[0][0]

    assert run(scenario()) == (0, 0)


def release_then_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make pools raise when a connection goes back to them, as asyncpg 0.32 does when the
    server closes the connection during the reset (a fast shutdown, for example)."""
    release = asyncpg.pool.Pool.release

    async def failing(pool: asyncpg.Pool, connection: Any, **options: Any) -> None:
        await release(pool, connection, **options)
        raise asyncpg.InternalClientError("cannot switch to state 15; another operation (2)")

    monkeypatch.setattr(asyncpg.pool.Pool, "release", failing)


def test_write_ignores_failed_release(dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch that committed is reported written though returning its connection failed,
    so that the caller does not write it twice."""
    rows = [row(BASE_TIME + 1, 1, reported={"t": 1}), row(BASE_TIME + 2, 2, reported={"t": 2})]

    async def scenario() -> tuple[int, int]:
        store = PostgresHistoryStore(dsn)
        await store.open()
        try:
            # The first write creates the day's partitions, so the second only copies rows.
            await store.write(rows[:1])
            release_then_fail(monkeypatch)
            await store.write(rows[1:])
        finally:
            monkeypatch.undo()
            await store.close()
        updates = await fetch(dsn, "SELECT count(*) FROM shadow_updates")
        values = await fetch(dsn, "SELECT count(*) FROM shadow_values")
        return updates[0][0], values[0][0]

    assert run(scenario()) == (2, 2)


def test_batch_error_survives_failed_release(dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the batch fails, its error reaches the caller even if the release fails too."""
    rows = [
        row(BASE_TIME + 1, 1, reported={"ok": 1}),
        # jsonb cannot store the NUL character.
        HistoryRow(BASE_TIME + 2, "oven-1", "", 2, b'{"text": "\\u0000"}', None),
    ]

    async def scenario() -> int:
        store = PostgresHistoryStore(dsn)
        await store.open()
        try:
            # The first write creates the day's partitions, so the second only copies rows.
            await store.write(rows[:1])
            release_then_fail(monkeypatch)
            with pytest.raises(asyncpg.PostgresError):
                await store.write(rows[1:])
        finally:
            monkeypatch.undo()
            await store.close()
        updates = await fetch(dsn, "SELECT count(*) FROM shadow_updates")
        return updates[0][0]

    assert run(scenario()) == 1


def test_partitions_created_for_rows(dsn: str) -> None:
    rows = [row(BASE_TIME + 0.5 * DAY, 1, reported={"t": 1}), row(BASE_TIME + 3.2 * DAY, 2)]

    async def scenario() -> tuple[list[str], list[str], list[asyncpg.Record]]:
        store = PostgresHistoryStore(dsn)
        await store.open()
        assert not store.timescale
        await store.write(rows)
        await store.close()
        updates = await partition_names(dsn, "shadow_updates")
        values = await partition_names(dsn, "shadow_values")
        placed = await fetch(
            dsn, "SELECT tableoid::regclass::text, version FROM shadow_updates ORDER BY version"
        )
        return updates, values, placed

    updates, values, placed = run(scenario())

    for name in ("shadow_updates_p20240310", "shadow_updates_p20240313"):
        assert name in updates
    # Past days get partitions only where rows need them.
    assert "shadow_updates_p20240311" not in updates
    assert "shadow_updates_p20240315" not in updates
    assert [name.replace("shadow_updates", "shadow_values") for name in updates] == values
    assert [tuple(record) for record in placed] == [
        ("shadow_updates_p20240310", 1),
        ("shadow_updates_p20240313", 2),
    ]
    # The current day and the next two get partitions ahead of any row.
    today = datetime.now(UTC).date()
    for offset in range(3):
        assert f"shadow_updates_p{today + timedelta(days=offset):%Y%m%d}" in updates


def test_retention_drops_old_partitions(dsn: str) -> None:
    rows = [row(BASE_TIME + day * DAY + 60, day, reported={"t": day}) for day in range(6)]
    # Retention of 2 days at noon of 2024-03-15 keeps everything from 2024-03-13 12:00, so
    # the partitions of 03-10, 03-11 and 03-12 go and 03-13 (half expired) stays.
    now = BASE_TIME + 5.5 * DAY

    async def scenario() -> tuple[list[str], list[int], list[str]]:
        store = PostgresHistoryStore(dsn, retention_days=2)
        await store.open()
        await store.write(rows)
        await store.enforce_retention(now)
        # Rows for a dropped day still go in: the write recreates the partition.
        await store.write([row(BASE_TIME + 60, 99)])
        await store.close()
        names = await partition_names(dsn, "shadow_updates")
        versions = await fetch(dsn, "SELECT version FROM shadow_updates ORDER BY version")
        values = await partition_names(dsn, "shadow_values")
        return names, [record[0] for record in versions], values

    names, versions, values = run(scenario())

    for day in ("20240311", "20240312"):
        assert f"shadow_updates_p{day}" not in names
        assert f"shadow_values_p{day}" not in values
    for day in ("20240313", "20240314", "20240315", "20240316", "20240317"):
        assert f"shadow_updates_p{day}" in names
    assert versions == [3, 4, 5, 99]


def test_retention_setting_validated() -> None:
    with pytest.raises(ValueError, match="retention_days must be at least 1, got 0"):
        PostgresHistoryStore("postgresql://127.0.0.1/x", retention_days=0)


def test_reopen_keeps_schema_and_rows(dsn: str) -> None:
    async def scenario() -> int:
        for version in (1, 2):
            store = PostgresHistoryStore(dsn)
            await store.open()
            await store.write([row(BASE_TIME + version, version, reported={"v": version})])
            await store.close()
        records = await fetch(dsn, "SELECT count(*) FROM shadow_updates")
        return records[0][0]

    assert run(scenario()) == 2


def query_rows() -> list[HistoryRow]:
    """Readings every 10 s for one minute: temperature rises by 1, pressure falls by 2."""
    return [
        row(
            BASE_TIME + 10 * i,
            i,
            reported={"temperature": 20 + i, "pressure": {"inlet": 100 - 2 * i}, "on": True},
        )
        for i in range(6)
    ] + [row(BASE_TIME + 5, 50, reported={"temperature": 99}, thing="other")]


def test_query_raw_points(dsn: str) -> None:
    async def scenario() -> tuple[list[Any], list[Any]]:
        store = PostgresHistoryStore(dsn)
        await store.open()
        await store.write(query_rows())
        everything = await store.query("oven-1", "", BASE_TIME, BASE_TIME + 20)
        limited = await store.query(
            "oven-1", "", BASE_TIME, BASE_TIME + 60, fields=["temperature"], limit=2
        )
        await store.close()
        return everything, limited

    everything, limited = run(scenario())

    assert everything == [
        HistoryPoint(BASE_TIME, "pressure.inlet", 100.0),
        HistoryPoint(BASE_TIME, "temperature", 20.0),
        HistoryPoint(BASE_TIME + 10, "pressure.inlet", 98.0),
        HistoryPoint(BASE_TIME + 10, "temperature", 21.0),
    ]
    assert limited == [
        HistoryPoint(BASE_TIME, "temperature", 20.0),
        HistoryPoint(BASE_TIME + 10, "temperature", 21.0),
    ]


def test_query_buckets(dsn: str) -> None:
    async def scenario() -> list[Any]:
        store = PostgresHistoryStore(dsn)
        await store.open()
        await store.write(query_rows())
        buckets = await store.query(
            "oven-1", "", BASE_TIME, BASE_TIME + 60, fields=["temperature"], bucket_seconds=30
        )
        await store.close()
        return buckets

    assert run(scenario()) == [
        HistoryBucket(BASE_TIME, "temperature", 21.0, 20.0, 22.0, 22.0),
        HistoryBucket(BASE_TIME + 30, "temperature", 24.0, 23.0, 25.0, 25.0),
    ]


def test_query_buckets_all_fields(dsn: str) -> None:
    async def scenario() -> list[Any]:
        store = PostgresHistoryStore(dsn)
        await store.open()
        await store.write(query_rows())
        buckets = await store.query("oven-1", "", BASE_TIME, BASE_TIME + 60, bucket_seconds=60)
        await store.close()
        return buckets

    assert run(scenario()) == [
        HistoryBucket(BASE_TIME, "pressure.inlet", 95.0, 90.0, 100.0, 90.0),
        HistoryBucket(BASE_TIME, "temperature", 22.5, 20.0, 25.0, 25.0),
    ]


def test_query_arguments_validated(dsn: str) -> None:
    store = PostgresHistoryStore(dsn)

    with pytest.raises(ValueError, match="limit must be at least 1, got 0"):
        run(store.query("oven-1", "", BASE_TIME, BASE_TIME + 1, limit=0))
    with pytest.raises(ValueError, match="bucket_seconds must be positive, got -5"):
        run(store.query("oven-1", "", BASE_TIME, BASE_TIME + 1, bucket_seconds=-5))


def test_unreachable_dsn_message() -> None:
    port = free_port()
    store = PostgresHistoryStore(f"postgresql://analyst:hunter2@127.0.0.1:{port}/history")

    with pytest.raises(StoreUnavailable) as raised:
        run(store.open())

    message = str(raised.value)
    assert f"postgresql://analyst:***@127.0.0.1:{port}/history" in message
    assert "hunter2" not in message
    assert "Check that the server is running" in message


def test_missing_database_message(postgres_server: PostgresServer) -> None:
    store = PostgresHistoryStore(postgres_server.dsn("no_such_database"))

    with pytest.raises(StoreUnavailable) as raised:
        run(store.open())

    message = str(raised.value)
    assert "no_such_database" in message
    assert "Create the database" in message


def test_redact_dsn() -> None:
    assert redact_dsn("postgresql://u:secret@h:5/db") == "postgresql://u:***@h:5/db"
    assert redact_dsn("postgresql://h/db?password=secret&sslmode=disable") == (
        "postgresql://h/db?password=***&sslmode=disable"
    )
    assert redact_dsn("host=h password=secret dbname=x") == "host=h password=*** dbname=x"
    assert redact_dsn("postgresql://h/db") == "postgresql://h/db"


def test_partition_day_boundaries_are_utc(dsn: str) -> None:
    # One microsecond before and at midnight UTC land in different partitions.
    midnight = datetime(2024, 3, 11, tzinfo=UTC).timestamp()
    rows = [row(midnight - 0.000001, 1), row(midnight, 2)]

    async def scenario() -> list[asyncpg.Record]:
        store = PostgresHistoryStore(dsn)
        await store.open()
        await store.write(rows)
        await store.close()
        return await fetch(
            dsn, "SELECT tableoid::regclass::text, version FROM shadow_updates ORDER BY version"
        )

    placed = run(scenario())

    assert [tuple(record) for record in placed] == [
        (f"shadow_updates_p{date(2024, 3, 10):%Y%m%d}", 1),
        (f"shadow_updates_p{date(2024, 3, 11):%Y%m%d}", 2),
    ]
