"""The embedded history store: a SQLite file in the data folder.

Schema (public: other tools may query the file while the engine runs, WAL mode allows that)::

    CREATE TABLE shadow_updates (
        time        REAL    NOT NULL,  -- epoch seconds of the accepted update
        thing       TEXT    NOT NULL,
        shadow_name TEXT    NOT NULL,  -- '' for the classic shadow
        version     INTEGER NOT NULL,  -- the shadow version after the update
        reported    TEXT,              -- state.reported of the request as JSON, NULL if absent
        desired     TEXT               -- state.desired of the request as JSON, NULL if absent
    );
    CREATE TABLE shadow_values (
        time        REAL    NOT NULL,
        thing       TEXT    NOT NULL,
        shadow_name TEXT    NOT NULL,
        field       TEXT    NOT NULL,  -- dotted path of a numeric leaf of reported: 'motor.rpm'
        value       REAL    NOT NULL
    );

with indexes on ``(thing, shadow_name, time)`` for the updates, ``(thing, shadow_name, field,
time)`` for the values, and ``(time)`` on both for retention.

``shadow_values`` holds one row per numeric leaf (JSON integer or float, not boolean) of the
reported part. Nested objects give dotted paths (``{"motor": {"rpm": 3}}`` is ``motor.rpm``).
Array elements are skipped: an update replaces an array whole, its length varies, and paths
such as ``a.0`` would make the set of fields grow without bound. The array stays in the
``reported`` JSON. A key that itself contains a dot gives an ambiguous path.

All database work runs on one dedicated thread, because a ``sqlite3`` connection must be used
from the thread that created it and the event loop must not wait on the disk.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from .base import (
    DEFAULT_RETENTION_DAYS,
    HistoryBucket,
    HistoryPoint,
    HistoryRow,
    StoreUnavailable,
    numeric_leaves,
    parse_reported,
)

logger = logging.getLogger("ironshadow.storage")

# Rows returned by query() when the caller sets no limit.
DEFAULT_QUERY_LIMIT = 10_000

_SECONDS_PER_DAY = 86_400

# Buckets start at multiples of their width after 2000-01-03 00:00:00 UTC (a Monday), the
# default origin of TimescaleDB's time_bucket, so that SQLite and PostgreSQL agree on bucket
# boundaries for every width, weeks included.
BUCKET_ORIGIN = 946_857_600.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS shadow_updates (
    time REAL NOT NULL,
    thing TEXT NOT NULL,
    shadow_name TEXT NOT NULL,
    version INTEGER NOT NULL,
    reported TEXT,
    desired TEXT
);
CREATE INDEX IF NOT EXISTS shadow_updates_thing_time
    ON shadow_updates (thing, shadow_name, time);
CREATE INDEX IF NOT EXISTS shadow_updates_time ON shadow_updates (time);
CREATE TABLE IF NOT EXISTS shadow_values (
    time REAL NOT NULL,
    thing TEXT NOT NULL,
    shadow_name TEXT NOT NULL,
    field TEXT NOT NULL,
    value REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS shadow_values_thing_field_time
    ON shadow_values (thing, shadow_name, field, time);
CREATE INDEX IF NOT EXISTS shadow_values_time ON shadow_values (time);
"""

_T = TypeVar("_T")


class SQLiteHistoryStore:
    """A :class:`~ironshadow.storage.base.HistoryStore` in one SQLite file (see module doc)."""

    def __init__(self, path: Path, retention_days: float = DEFAULT_RETENTION_DAYS) -> None:
        if retention_days <= 0:
            raise ValueError(f"retention_days must be positive, got {retention_days}")
        self.path = Path(path)
        self.retention_days = retention_days
        self._executor: ThreadPoolExecutor | None = None
        self._connection: sqlite3.Connection | None = None

    async def _run(self, function: Callable[..., _T], *args: Any) -> _T:
        if self._executor is None:
            raise RuntimeError(f"the history store {self.path} is not open; call open() first")
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    async def open(self) -> None:
        if self._executor is not None:
            raise RuntimeError(f"the history store {self.path} is already open")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ironshadow-sqlite")
        try:
            await self._run(self._connect)
        except BaseException:
            self._executor.shutdown(wait=True)
            self._executor = None
            raise

    async def close(self) -> None:
        if self._executor is None:
            return
        await self._run(self._disconnect)
        executor, self._executor = self._executor, None
        await asyncio.to_thread(executor.shutdown, wait=True)

    def _connect(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(self.path, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise StoreUnavailable(
                f"cannot open the SQLite history file {self.path}: {exc}; check that its "
                "folder exists and is writable"
            ) from exc
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            # FULL, not NORMAL: once write() returns, the engine marks the rows committed and
            # the hot store drops them from its outbox. In WAL mode NORMAL may lose the last
            # transactions on power loss (the WAL is fsynced only at checkpoints), and those
            # rows would then be in neither place. FULL costs one fsync per batch.
            connection.execute("PRAGMA synchronous=FULL")
            connection.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            connection.close()
            raise StoreUnavailable(
                f"cannot set up the SQLite history file {self.path}: {exc}; check that it is "
                "an IronShadow history database and that the disk is not full"
            ) from exc
        self._connection = connection

    def _disconnect(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _db(self) -> sqlite3.Connection:
        assert self._connection is not None
        return self._connection

    # --- writes ------------------------------------------------------------------------------

    async def write(self, rows: Sequence[HistoryRow]) -> None:
        """Commit the rows and their numeric leaves in one transaction."""
        if rows:
            await self._run(self._insert, list(rows))

    def _insert(self, rows: list[HistoryRow]) -> None:
        updates = []
        values = []
        invalid = 0
        for row in rows:
            reported = None if row.reported is None else row.reported.decode(errors="replace")
            desired = None if row.desired is None else row.desired.decode(errors="replace")
            updates.append((row.time, row.thing, row.shadow_name, row.version, reported, desired))
            if row.reported is None:
                continue
            document = parse_reported(row.reported)
            if document is None and row.reported.strip() != b"null":
                invalid += 1  # the row is kept; only its numeric leaves are missing
                continue
            for field, value in numeric_leaves(document):
                values.append((row.time, row.thing, row.shadow_name, field, value))
        if invalid:
            logger.warning(
                "%d of %d history rows for %s have reported parts that are not valid JSON; "
                "they are stored without numeric values",
                invalid,
                len(rows),
                self.path,
            )
        db = self._db()
        try:
            db.execute("BEGIN")
            db.executemany(
                "INSERT INTO shadow_updates (time, thing, shadow_name, version, reported, desired)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                updates,
            )
            db.executemany(
                "INSERT INTO shadow_values (time, thing, shadow_name, field, value)"
                " VALUES (?, ?, ?, ?, ?)",
                values,
            )
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise StoreUnavailable(
                f"writing {len(rows)} history rows to {self.path} failed: {exc}; check free "
                "space and that no other process holds a write lock"
            ) from exc

    async def check(self) -> None:
        """Do nothing: the file is local, and a failing disk shows in the writes."""

    async def enforce_retention(self, now: float) -> None:
        """Delete updates and values older than ``retention_days`` before ``now``."""
        await self._run(self._delete_before, now - self.retention_days * _SECONDS_PER_DAY)

    def _delete_before(self, cutoff: float) -> None:
        db = self._db()
        try:
            db.execute("BEGIN")
            updates = db.execute("DELETE FROM shadow_updates WHERE time < ?", (cutoff,)).rowcount
            values = db.execute("DELETE FROM shadow_values WHERE time < ?", (cutoff,)).rowcount
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise StoreUnavailable(
                f"deleting expired history from {self.path} failed: {exc}"
            ) from exc
        if updates:
            logger.info(
                "retention deleted %d update(s) and %d value(s) older than %.0f from %s",
                updates,
                values,
                cutoff,
                self.path,
            )

    # --- reads -------------------------------------------------------------------------------

    async def query(
        self,
        thing: str,
        shadow_name: str,
        start: float,
        end: float,
        fields: Sequence[str] | None = None,
        bucket_seconds: float | None = None,
        limit: int = DEFAULT_QUERY_LIMIT,
    ) -> list[HistoryPoint] | list[HistoryBucket]:
        """Read the numeric history of one shadow in ``[start, end)`` (epoch seconds).

        Without ``bucket_seconds``, return the raw points ordered by time and field. With it,
        return per field and bucket the avg, min, max and last value, ordered the same way,
        with buckets aligned to ``BUCKET_ORIGIN``. ``fields`` limits the result to these
        dotted paths (default: every field). At most ``limit`` rows.
        """
        if limit <= 0:
            raise ValueError(f"limit must be positive, got {limit}")
        if bucket_seconds is not None and bucket_seconds <= 0:
            raise ValueError(f"bucket_seconds must be positive, got {bucket_seconds}")
        return await self._run(
            self._select, thing, shadow_name, start, end, fields, bucket_seconds, limit
        )

    def _select(
        self,
        thing: str,
        shadow_name: str,
        start: float,
        end: float,
        fields: Sequence[str] | None,
        bucket_seconds: float | None,
        limit: int,
    ) -> list[HistoryPoint] | list[HistoryBucket]:
        where = "thing = ? AND shadow_name = ? AND time >= ? AND time < ?"
        parameters: list[Any] = [thing, shadow_name, start, end]
        if fields is not None:
            where += f" AND field IN ({', '.join('?' * len(fields))})"
            parameters.extend(fields)
        db = self._db()
        if bucket_seconds is None:
            cursor = db.execute(
                f"SELECT time, field, value FROM shadow_values WHERE {where}"
                " ORDER BY time, field LIMIT ?",
                [*parameters, limit],
            )
            return [HistoryPoint(*row) for row in cursor]
        # ``slot`` is floor((time - origin) / width). CAST truncates toward zero, and the
        # comparison subtracts 1 for a negative fraction, because SQLite's floor() exists
        # only in builds with the math functions. ROW_NUMBER marks the latest point of each
        # bucket, and on equal times the later insert.
        cursor = db.execute(
            f"""
            WITH scaled AS (
                SELECT (time - ?) / ? AS position, time, field, value, rowid AS id
                FROM shadow_values WHERE {where}
            ), slotted AS (
                SELECT CAST(position AS INTEGER) - (position < CAST(position AS INTEGER)) AS slot,
                       time, field, value, id
                FROM scaled
            ), ranked AS (
                SELECT slot, field, value, ROW_NUMBER() OVER (
                    PARTITION BY slot, field ORDER BY time DESC, id DESC
                ) AS recency
                FROM slotted
            )
            SELECT ? + slot * ?, field, avg(value), min(value), max(value),
                   max(CASE WHEN recency = 1 THEN value END)
            FROM ranked GROUP BY slot, field ORDER BY slot, field LIMIT ?
            """,
            [
                BUCKET_ORIGIN,
                bucket_seconds,
                *parameters,
                BUCKET_ORIGIN,
                bucket_seconds,
                limit,
            ],
        )
        return [HistoryBucket(*row) for row in cursor]
