"""PostgresHistoryStore in TimescaleDB mode, against PGlite 0.3.14 with TimescaleDB 2.23.

These tests check the SQL of the TimescaleDB path: hypertables, compression and retention
policies, time_bucket queries and drop_chunks. They do not measure speed, because PGlite is
PostgreSQL in WebAssembly with one client at a time. Batches stay under 1,000 rows.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from test_storage_postgres import BASE_TIME, DAY, fetch, query_rows, row, run

from ironshadow.storage.base import HistoryBucket, HistoryPoint, StoreUnavailable
from ironshadow.storage.postgres import TABLES

from .pglite_server import PGliteServer

# Rows per write(): the tier keeps its batches under 1,000 rows.
BATCH_ROWS = 999


async def records(store: Any, sql: str, *arguments: Any) -> list[tuple[Any, ...]]:
    """Run a query on the store's one pooled connection and return plain tuples."""
    return [tuple(record) for record in await store.pool.fetch(sql, *arguments)]


async def chunk_ranges(store: Any) -> list[tuple[Any, ...]]:
    return await records(
        store,
        "SELECT hypertable_name::text, range_start, range_end, is_compressed "
        "FROM timescaledb_information.chunks ORDER BY 1, 2",
    )


def test_open_installs_extension_and_chooses_timescale(
    make_pglite_server: Callable[[], PGliteServer],
) -> None:
    server = make_pglite_server()
    extension_sql = (
        "SELECT default_version, installed_version FROM pg_available_extensions "
        "WHERE name = 'timescaledb'"
    )

    async def scenario() -> tuple[list[Any], bool, list[Any], bool]:
        before = await fetch(server.dsn, extension_sql)
        store = server.store()
        await store.open()
        first = store.timescale
        await store.close()
        after = await fetch(server.dsn, extension_sql)
        # The second open finds the hypertables and keeps TimescaleDB mode.
        store = server.store()
        await store.open()
        second = store.timescale
        await store.close()
        return before, first, after, second

    before, first, after, second = run(scenario())

    assert [tuple(record) for record in before] == [("2.23.0-dev", None)]
    assert first is True
    assert [tuple(record) for record in after] == [("2.23.0-dev", "2.23.0-dev")]
    assert second is True


def test_hypertables_compression_and_policies(pglite: PGliteServer) -> None:
    async def scenario() -> dict[str, Any]:
        store = pglite.store(retention_days=10)
        await store.open()
        found = {
            "hypertables": await records(
                store,
                "SELECT hypertable_name::text, compression_enabled "
                "FROM timescaledb_information.hypertables ORDER BY 1",
            ),
            "dimensions": await records(
                store,
                "SELECT hypertable_name::text, column_name::text, time_interval "
                "FROM timescaledb_information.dimensions ORDER BY 1",
            ),
            "compression": await records(
                store,
                "SELECT hypertable::text, segmentby, orderby "
                "FROM timescaledb_information.hypertable_compression_settings ORDER BY 1",
            ),
        }
        jobs_sql = (
            "SELECT hypertable_name::text, proc_name::text, config->>'compress_after', "
            "config->>'drop_after' FROM timescaledb_information.jobs "
            "WHERE hypertable_name IS NOT NULL ORDER BY 1, 2"
        )
        found["jobs"] = await records(store, jobs_sql)
        await store.close()

        # Reopening with another retention replaces the retention policy.
        store = pglite.store(retention_days=20)
        await store.open()
        found["jobs_after_reopen"] = await records(store, jobs_sql)
        await store.close()
        return found

    found = run(scenario())

    assert found["hypertables"] == [("shadow_updates", True), ("shadow_values", True)]
    assert found["dimensions"] == [
        ("shadow_updates", "time", timedelta(days=1)),
        ("shadow_values", "time", timedelta(days=1)),
    ]
    assert found["compression"] == [
        ("shadow_updates", "thing,shadow_name", '"time" DESC'),
        ("shadow_values", "thing,shadow_name,field", '"time" DESC'),
    ]
    assert found["jobs"] == [
        ("shadow_updates", "policy_compression", "7 days", None),
        ("shadow_updates", "policy_retention", None, "10 days"),
        ("shadow_values", "policy_compression", "7 days", None),
        ("shadow_values", "policy_retention", None, "10 days"),
    ]
    assert found["jobs_after_reopen"] == [
        ("shadow_updates", "policy_compression", "7 days", None),
        ("shadow_updates", "policy_retention", None, "20 days"),
        ("shadow_values", "policy_compression", "7 days", None),
        ("shadow_values", "policy_retention", None, "20 days"),
    ]


def test_batch_copy_round_trip(pglite: PGliteServer) -> None:
    rows = [
        row(BASE_TIME + 1.5, 1, reported={"temperature": 180, "door": {"open": True}}),
        row(BASE_TIME + 2.0, 2, desired={"temperature": 200}),
        row(BASE_TIME + 3.0, 1, reported={"rpm": 900.5}, thing="fan-2", shadow_name="motor"),
        row(BASE_TIME + 4.0, 3, reported=None, desired=None),
    ]

    async def scenario() -> tuple[list[Any], list[Any]]:
        store = pglite.store()
        await store.open()
        assert store.timescale
        await store.write(rows)
        await store.close()
        updates = await fetch(
            pglite.dsn,
            "SELECT extract(epoch FROM time)::float8, thing, shadow_name, version, "
            "reported::text, desired::text FROM shadow_updates ORDER BY time",
        )
        values = await fetch(
            pglite.dsn,
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


def test_batches_fill_daily_chunks(pglite: PGliteServer) -> None:
    # One batch per day for three days, every 10 s from midnight.
    batches = [
        [
            row(BASE_TIME + day * DAY + 10 * i, i, reported={"a": i, "b": {"c": -i}})
            for i in range(BATCH_ROWS)
        ]
        for day in range(3)
    ]

    async def scenario() -> tuple[list[Any], list[Any]]:
        store = pglite.store()
        await store.open()
        for batch in batches:
            await store.write(batch)
        counts = await records(
            store,
            "SELECT (SELECT count(*) FROM shadow_updates), (SELECT count(*) FROM shadow_values), "
            "(SELECT sum(value) FROM shadow_values WHERE field = 'b.c')",
        )
        chunks = await chunk_ranges(store)
        await store.close()
        return counts, chunks

    counts, chunks = run(scenario())

    per_day_sum = sum(range(BATCH_ROWS))
    assert counts == [(3 * BATCH_ROWS, 6 * BATCH_ROWS, -3.0 * per_day_sum)]
    days = [datetime(2024, 3, 10 + offset, tzinfo=UTC) for offset in range(4)]
    expected = [
        (table, days[offset], days[offset + 1], False) for table in TABLES for offset in range(3)
    ]
    assert chunks == expected


def test_query_raw_points(pglite: PGliteServer) -> None:
    async def scenario() -> tuple[list[Any], list[Any]]:
        store = pglite.store()
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


def test_query_time_buckets(pglite: PGliteServer) -> None:
    async def scenario() -> tuple[list[Any], list[Any], list[Any]]:
        store = pglite.store()
        await store.open()
        await store.write(query_rows())
        half_minutes = await store.query(
            "oven-1", "", BASE_TIME, BASE_TIME + 60, fields=["temperature"], bucket_seconds=30
        )
        minute = await store.query("oven-1", "", BASE_TIME, BASE_TIME + 60, bucket_seconds=60)
        week = await store.query(
            "oven-1", "", BASE_TIME, BASE_TIME + 60, fields=["temperature"], bucket_seconds=7 * DAY
        )
        await store.close()
        return half_minutes, minute, week

    half_minutes, minute, week = run(scenario())

    assert half_minutes == [
        HistoryBucket(BASE_TIME, "temperature", 21.0, 20.0, 22.0, 22.0),
        HistoryBucket(BASE_TIME + 30, "temperature", 24.0, 23.0, 25.0, 25.0),
    ]
    assert minute == [
        HistoryBucket(BASE_TIME, "pressure.inlet", 95.0, 90.0, 100.0, 90.0),
        HistoryBucket(BASE_TIME, "temperature", 22.5, 20.0, 25.0, 25.0),
    ]
    # Weeks start on Mondays, as counted from the origin 2000-01-03: the rows of Sunday
    # 2024-03-10 fall in the week of Monday 2024-03-04, as with date_bin on plain PostgreSQL.
    monday = datetime(2024, 3, 4, tzinfo=UTC).timestamp()
    assert week == [HistoryBucket(monday, "temperature", 22.5, 20.0, 25.0, 25.0)]


def test_retention_drops_old_chunks(pglite: PGliteServer) -> None:
    rows = [row(BASE_TIME + day * DAY + 60, day, reported={"t": day}) for day in range(6)]
    # Retention of 2 days at noon of 2024-03-15 keeps everything from 2024-03-13 12:00, so
    # the chunks of 03-10, 03-11 and 03-12 go and 03-13 (half expired) stays.
    now = BASE_TIME + 5.5 * DAY

    async def scenario() -> tuple[list[Any], list[Any], list[Any]]:
        store = pglite.store(retention_days=2)
        await store.open()
        await store.write(rows)
        await store.enforce_retention(now)
        chunks = await chunk_ranges(store)
        # Rows for a dropped day still go in: TimescaleDB creates the chunk again.
        await store.write([row(BASE_TIME + 60, 99, reported={"t": 99})])
        versions = await records(store, "SELECT version FROM shadow_updates ORDER BY time")
        values = await records(store, "SELECT value FROM shadow_values ORDER BY time")
        await store.close()
        return chunks, versions, values

    chunks, versions, values = run(scenario())

    days = [datetime(2024, 3, 13 + offset, tzinfo=UTC) for offset in range(4)]
    assert chunks == [
        (table, days[offset], days[offset + 1], False) for table in TABLES for offset in range(3)
    ]
    assert versions == [(99,), (3,), (4,), (5,)]
    assert values == [(99.0,), (3.0,), (4.0,), (5.0,)]


def test_compressed_chunks_take_rows_and_expire(pglite: PGliteServer) -> None:
    first = [row(BASE_TIME + 10 * i, i, reported={"t": i}) for i in range(0, 6, 2)]
    late = [row(BASE_TIME + 10 * i, i, reported={"t": i}) for i in range(1, 6, 2)]

    async def scenario() -> dict[str, Any]:
        store = pglite.store(retention_days=1)
        await store.open()
        await store.write(first)
        for table in TABLES:
            await store.pool.execute(
                f"SELECT compress_chunk(chunk) FROM show_chunks('{table}') AS chunk"
            )
        found: dict[str, Any] = {"compressed": await chunk_ranges(store)}
        # A late batch, as when the outbox drains after an outage, goes into compressed chunks.
        await store.write(late)
        found["points"] = await store.query("oven-1", "", BASE_TIME, BASE_TIME + 60)
        found["buckets"] = await store.query(
            "oven-1", "", BASE_TIME, BASE_TIME + 60, bucket_seconds=60
        )
        await store.enforce_retention(BASE_TIME + 2 * DAY)
        found["after_retention"] = await chunk_ranges(store)
        await store.close()
        return found

    found = run(scenario())

    start = datetime(2024, 3, 10, tzinfo=UTC)
    assert found["compressed"] == [
        (table, start, start + timedelta(days=1), True) for table in TABLES
    ]
    assert found["points"] == [HistoryPoint(BASE_TIME + 10 * i, "t", float(i)) for i in range(6)]
    assert found["buckets"] == [HistoryBucket(BASE_TIME, "t", 2.5, 0.0, 5.0, 5.0)]
    assert found["after_retention"] == []


def test_plain_table_rejected(pglite: PGliteServer) -> None:
    async def scenario() -> None:
        connection = await asyncpg.connect(pglite.dsn, statement_cache_size=0)
        try:
            await connection.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
            await connection.execute(
                "CREATE TABLE shadow_updates (time timestamptz NOT NULL, thing text NOT NULL, "
                "shadow_name text NOT NULL, version bigint NOT NULL, reported jsonb, "
                "desired jsonb)"
            )
            await connection.execute(
                "INSERT INTO shadow_updates VALUES (now(), 'oven-1', '', 1, NULL, NULL)"
            )
        finally:
            await connection.close()
        store = pglite.store()
        await store.open()

    with pytest.raises(StoreUnavailable) as raised:
        run(scenario())

    message = str(raised.value)
    assert "table shadow_updates" in message
    assert "neither partitioned nor a TimescaleDB hypertable" in message


def test_message_longer_than_one_socket_read(pglite: PGliteServer) -> None:
    # A 4 MiB parameter arrives in many reads, and the server hands PGlite one whole message.
    text = "x" * (4 << 20)

    async def scenario() -> int:
        connection = await asyncpg.connect(pglite.dsn, statement_cache_size=0)
        try:
            return await connection.fetchval("SELECT length($1::text)", text)
        finally:
            await connection.close()

    assert run(scenario()) == len(text)


def test_next_client_starts_clean(pglite: PGliteServer) -> None:
    """The server rolls back and resets the shared session when a client goes away."""

    async def scenario() -> tuple[Any, Any]:
        leaving = await asyncpg.connect(pglite.dsn, statement_cache_size=0)
        await leaving.execute("BEGIN")
        await leaving.execute("CREATE TABLE left_behind (x int)")
        await leaving.execute("SET search_path TO pg_catalog")
        # Drop the socket without a Terminate message, as a crashed client would.
        leaving.terminate()

        connection = await asyncpg.connect(pglite.dsn, statement_cache_size=0)
        try:
            return (
                await connection.fetchval("SELECT to_regclass('public.left_behind')"),
                await connection.fetchval("SHOW search_path"),
            )
        finally:
            await connection.close()

    table, search_path = run(scenario())

    assert table is None
    assert search_path == "public"
