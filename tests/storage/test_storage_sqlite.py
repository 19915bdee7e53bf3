"""The SQLite history store: batches, numeric leaves, retention and time-bucket queries."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from ironshadow.storage.base import HistoryRow, StoreUnavailable
from ironshadow.storage.sqlite import (
    HistoryBucket,
    HistoryPoint,
    SQLiteHistoryStore,
    numeric_leaves,
)

DAY = 86_400.0


def with_store(
    path: Path, body: Callable[[SQLiteHistoryStore], Awaitable[Any]], **options: Any
) -> Any:
    async def run() -> Any:
        store = SQLiteHistoryStore(path, **options)
        await store.open()
        try:
            return await body(store)
        finally:
            await store.close()

    return asyncio.run(run())


def update(time: float, reported: Any, *, thing: str = "press", name: str = "") -> HistoryRow:
    return HistoryRow(time, thing, name, int(time), orjson.dumps(reported), None)


def select(path: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as db:
        rows = db.execute(sql).fetchall()
    db.close()
    return rows


def test_sqlite_numeric_leaves_paths():
    document = {
        "rpm": 1200,
        "temp": 21.5,
        "on": True,
        "mode": "eco",
        "none": None,
        "motor": {"current": {"a": 1.5, "b": 2}, "label": "m1", "empty": {}},
        "list": [1, 2, {"x": 3}],
    }
    assert dict(numeric_leaves(document)) == {
        "rpm": 1200.0,
        "temp": 21.5,
        "motor.current.a": 1.5,
        "motor.current.b": 2.0,
    }
    assert list(numeric_leaves([1, 2])) == []
    assert list(numeric_leaves(None)) == []


def test_sqlite_batch_round_trip(tmp_path):
    path = tmp_path / "data" / "history.sqlite"
    rows = [
        HistoryRow(10.0, "press", "", 3, b'{"rpm":5,"motor":{"amps":1.5}}', b'{"rpm":7}'),
        HistoryRow(11.0, "press", "config", 1, None, b'{"mode":"eco"}'),
        HistoryRow(12.0, "lathe", "", 9, b'{"on":true,"speed":2}', None),
    ]

    async def body(store: SQLiteHistoryStore) -> None:
        await store.write(rows)
        await store.write([])

    with_store(path, body)
    assert select(path, "SELECT * FROM shadow_updates ORDER BY time") == [
        (10.0, "press", "", 3, '{"rpm":5,"motor":{"amps":1.5}}', '{"rpm":7}'),
        (11.0, "press", "config", 1, None, '{"mode":"eco"}'),
        (12.0, "lathe", "", 9, '{"on":true,"speed":2}', None),
    ]
    assert select(path, "SELECT * FROM shadow_values ORDER BY time, field") == [
        (10.0, "press", "", "motor.amps", 1.5),
        (10.0, "press", "", "rpm", 5.0),
        (12.0, "lathe", "", "speed", 2.0),
    ]
    assert select(path, "PRAGMA journal_mode") == [("wal",)]


def test_sqlite_invalid_json_kept_without_values(tmp_path):
    path = tmp_path / "history.sqlite"

    async def body(store: SQLiteHistoryStore) -> None:
        await store.write([HistoryRow(1.0, "press", "", 1, b"{not json", None)])

    with_store(path, body)
    assert select(path, "SELECT reported FROM shadow_updates") == [("{not json",)]
    assert select(path, "SELECT count(*) FROM shadow_values") == [(0,)]


def test_sqlite_wide_integer_leaf(tmp_path):
    path = tmp_path / "history.sqlite"
    reported = b'{"big":123456789012345678901234567890,"huge":1' + b"0" * 400 + b"}"

    async def body(store: SQLiteHistoryStore) -> None:
        await store.write([HistoryRow(1.0, "press", "", 1, reported, None)])

    with_store(path, body)
    assert select(path, "SELECT field, value FROM shadow_values") == [
        ("big", 1.2345678901234568e29)
    ]


def test_sqlite_reopen_keeps_rows(tmp_path):
    path = tmp_path / "history.sqlite"

    def write_one(store: SQLiteHistoryStore) -> Awaitable[None]:
        return store.write([update(1.0, {"rpm": 1})])

    with_store(path, write_one)
    with_store(path, write_one)
    assert select(path, "SELECT count(*) FROM shadow_updates") == [(2,)]
    assert select(path, "SELECT count(*) FROM shadow_values") == [(2,)]


def test_sqlite_retention_deletes_old(tmp_path):
    path = tmp_path / "history.sqlite"
    now = 100 * DAY

    async def body(store: SQLiteHistoryStore) -> None:
        await store.write(
            [
                update(now - 8 * DAY, {"rpm": 1}),
                update(now - 7 * DAY + 1, {"rpm": 2}),
                update(now - 1, {"rpm": 3}),
            ]
        )
        await store.enforce_retention(now)

    with_store(path, body, retention_days=7)
    assert select(path, "SELECT version FROM shadow_updates ORDER BY time") == [
        (int(now - 7 * DAY + 1),),
        (int(now - 1),),
    ]
    assert select(path, "SELECT value FROM shadow_values ORDER BY time") == [(2.0,), (3.0,)]


def test_sqlite_retention_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="retention_days must be positive, got 0"):
        SQLiteHistoryStore(tmp_path / "history.sqlite", retention_days=0)


def test_sqlite_unusable_path_reported(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")

    async def body(store: SQLiteHistoryStore) -> None:
        raise AssertionError("open() should have failed")

    with pytest.raises(StoreUnavailable, match="cannot open the SQLite history file"):
        with_store(blocker / "history.sqlite", body)


def sample_rows() -> list[HistoryRow]:
    return [
        update(100.0, {"rpm": 10, "temp": 20.0}),
        update(105.0, {"rpm": 30}),
        update(109.0, {"rpm": 20, "temp": 22.0}),
        update(110.0, {"rpm": 50}),
        update(119.0, {"rpm": 40}),
        update(125.0, {"rpm": 99}),  # outside [100, 120)
        update(105.0, {"rpm": 7}, thing="lathe"),
        update(105.0, {"rpm": 8}, name="config"),
    ]


def test_sqlite_query_raw_points(tmp_path):
    async def body(store: SQLiteHistoryStore) -> None:
        await store.write(sample_rows())
        points = await store.query("press", "", 100.0, 120.0)
        assert points == [
            HistoryPoint(100.0, "rpm", 10.0),
            HistoryPoint(100.0, "temp", 20.0),
            HistoryPoint(105.0, "rpm", 30.0),
            HistoryPoint(109.0, "rpm", 20.0),
            HistoryPoint(109.0, "temp", 22.0),
            HistoryPoint(110.0, "rpm", 50.0),
            HistoryPoint(119.0, "rpm", 40.0),
        ]
        only_temp = await store.query("press", "", 100.0, 120.0, fields=["temp"])
        assert [point.value for point in only_temp] == [20.0, 22.0]
        limited = await store.query("press", "", 100.0, 120.0, limit=2)
        assert len(limited) == 2
        named = await store.query("press", "config", 0.0, 1000.0)
        assert named == [HistoryPoint(105.0, "rpm", 8.0)]

    with_store(tmp_path / "history.sqlite", body)


def test_sqlite_query_buckets(tmp_path):
    async def body(store: SQLiteHistoryStore) -> None:
        await store.write(sample_rows())
        buckets = await store.query("press", "", 100.0, 120.0, bucket_seconds=10)
        assert buckets == [
            HistoryBucket(100.0, "rpm", 20.0, 10.0, 30.0, 20.0),
            HistoryBucket(100.0, "temp", 21.0, 20.0, 22.0, 22.0),
            HistoryBucket(110.0, "rpm", 45.0, 40.0, 50.0, 40.0),
        ]
        rpm_only = await store.query(
            "press", "", 100.0, 120.0, fields=["rpm"], bucket_seconds=60, limit=5
        )
        assert rpm_only == [HistoryBucket(60.0, "rpm", 30.0, 10.0, 50.0, 40.0)]

    with_store(tmp_path / "history.sqlite", body)


def test_sqlite_week_buckets_start_monday(tmp_path):
    wednesday = 1_704_283_200.0  # 2024-01-03 12:00:00 UTC
    monday = 1_704_067_200.0  # 2024-01-01 00:00:00 UTC

    async def body(store: SQLiteHistoryStore) -> None:
        await store.write([update(wednesday, {"rpm": 1}), update(monday - 1, {"rpm": 2})])
        buckets = await store.query("press", "", 0.0, 2e9, bucket_seconds=7 * DAY)
        assert [bucket.time for bucket in buckets] == [monday - 7 * DAY, monday]

    with_store(tmp_path / "history.sqlite", body)


def test_sqlite_bucket_last_prefers_later_insert(tmp_path):
    async def body(store: SQLiteHistoryStore) -> None:
        await store.write([update(100.0, {"rpm": 1}), update(100.0, {"rpm": 2})])
        [bucket] = await store.query("press", "", 0.0, 200.0, bucket_seconds=60)
        assert bucket.last == 2.0

    with_store(tmp_path / "history.sqlite", body)


def test_sqlite_query_rejects_bad_arguments(tmp_path):
    async def body(store: SQLiteHistoryStore) -> None:
        with pytest.raises(ValueError, match="limit must be positive, got 0"):
            await store.query("press", "", 0.0, 1.0, limit=0)
        with pytest.raises(ValueError, match="bucket_seconds must be positive, got -5"):
            await store.query("press", "", 0.0, 1.0, bucket_seconds=-5)

    with_store(tmp_path / "history.sqlite", body)
