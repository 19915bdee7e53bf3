"""The PostgreSQL history store, with TimescaleDB hypertables when the extension is available.

Schema, created on first open in the first schema of the connection's ``search_path``
(``public`` by default) and documented for analysts in docs/storage.md:

``shadow_updates(time, thing, shadow_name, version, reported, desired)``
    One row per accepted update. ``reported`` and ``desired`` are the sections of the request
    as ``jsonb`` (NULL when the request had no such section).
``shadow_values(time, thing, shadow_name, field, value)``
    One row per numeric leaf of ``reported``: ``field`` is the dotted path of the leaf and
    ``value`` its number as ``double precision``. Booleans and array elements are left out.

Both tables are partitioned by ``time``. With the ``timescaledb`` extension they are
hypertables with one-day chunks, a compression policy and a retention policy. Without it they
are native range-partitioned tables with one partition per UTC day, named
``shadow_updates_pYYYYMMDD``, and :meth:`PostgresHistoryStore.enforce_retention` creates the
coming days' partitions and drops those older than the retention period.

Rows go in with binary ``COPY``, both tables of one batch in one transaction.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg

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

# Seconds to wait for a connection to PostgreSQL before the store reports it unreachable.
CONNECT_TIMEOUT_SECONDS = 10.0

# Seconds a readiness check waits for a connection and for SELECT 1.
CHECK_TIMEOUT_SECONDS = 2.0
# Connections in the pool: one writer, plus room for retention and history queries so that a
# long query never delays a write.
POOL_MAX_SIZE = 4

# Daily partitions created beyond the current day, so that the write path rarely has to
# create one (creating a partition locks the parent table).
PARTITIONS_AHEAD_DAYS = 2

# TimescaleDB compresses chunks older than this. History older than a week rarely receives
# rows, except when the outbox drains after a long outage, which compressed chunks accept.
COMPRESS_AFTER = timedelta(days=7)

# Rows returned by query() when the caller gives no limit.
DEFAULT_QUERY_LIMIT = 1000

# Oldest server version supported: date_bin() appeared in PostgreSQL 14.
MIN_SERVER_VERSION = 14

# Bucket origin shared by date_bin() and TimescaleDB's time_bucket(), whose default origin for
# timestamptz is Monday 2000-01-03 UTC, so both backends return the same buckets.
BUCKET_ORIGIN = "2000-01-03 00:00:00+00"

# Serialises schema changes (tables, partitions) between engines sharing one database.
SCHEMA_LOCK_ID = 0x1A0_5AD0

UPDATE_COLUMNS = ("time", "thing", "shadow_name", "version", "reported", "desired")
VALUE_COLUMNS = ("time", "thing", "shadow_name", "field", "value")
TABLES = ("shadow_updates", "shadow_values")

CREATE_TABLES = """
CREATE TABLE IF NOT EXISTS shadow_updates (
    time timestamptz NOT NULL,
    thing text NOT NULL,
    shadow_name text NOT NULL,
    version bigint NOT NULL,
    reported jsonb,
    desired jsonb
) {partitioning};
CREATE INDEX IF NOT EXISTS shadow_updates_thing_time_idx
    ON shadow_updates (thing, shadow_name, time);
CREATE TABLE IF NOT EXISTS shadow_values (
    time timestamptz NOT NULL,
    thing text NOT NULL,
    shadow_name text NOT NULL,
    field text NOT NULL,
    value double precision NOT NULL
) {partitioning};
CREATE INDEX IF NOT EXISTS shadow_values_thing_field_time_idx
    ON shadow_values (thing, shadow_name, field, time);
"""

# Compression groups rows of one shadow (and field) together, which is how queries read them.
TIMESCALE_SEGMENT_BY = {
    "shadow_updates": "thing, shadow_name",
    "shadow_values": "thing, shadow_name, field",
}

# Connection-level failures: the caller keeps the rows and retries later.
_CONNECTION_ERRORS = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
)


def redact_dsn(dsn: str) -> str:
    """Return the DSN with any password replaced by ``***``, for error messages and logs."""
    try:
        parts = urlsplit(dsn)
        password = parts.password
    except ValueError:
        return "<invalid DSN>"
    if not parts.scheme:
        # A key=value connection string.
        return re.sub(r"(password\s*=\s*)('[^']*'|\S+)", r"\1***", dsn)
    netloc = parts.netloc
    if password:
        netloc = f"{parts.username or ''}:***@{netloc.rpartition('@')[2]}"
    query = parts.query
    if "password" in query:
        pairs = [(k, "***" if k == "password" else v) for k, v in parse_qsl(query)]
        query = urlencode(pairs, safe="*")
    return urlunsplit(parts._replace(netloc=netloc, query=query))





def _to_datetime(epoch_seconds: float) -> datetime:
    return datetime.fromtimestamp(epoch_seconds, UTC)


def _partition_name(table: str, day: date) -> str:
    return f"{table}_p{day:%Y%m%d}"


async def _is_hypertable(connection: asyncpg.Connection, table: str) -> bool:
    # The table name resolves through search_path, so a hypertable of the same name in another
    # schema does not count.
    return await connection.fetchval(
        "SELECT EXISTS (SELECT 1 FROM timescaledb_information.hypertables "
        "WHERE (hypertable_schema, hypertable_name) = ("
        "SELECT namespace.nspname, class.relname FROM pg_class class "
        "JOIN pg_namespace namespace ON namespace.oid = class.relnamespace "
        "WHERE class.oid = to_regclass($1)))",
        table,
    )


async def _init_connection(connection: asyncpg.Connection) -> None:
    # Binary jsonb is a version byte (1) followed by the JSON text, so this codec passes the
    # engine's JSON bytes to COPY without decoding them to str and back.
    await connection.set_type_codec(
        "jsonb",
        schema="pg_catalog",
        encoder=lambda data: b"\x01" + data,
        decoder=lambda data: data[1:],
        format="binary",
    )


class PostgresHistoryStore:
    """A :class:`~ironshadow.storage.base.HistoryStore` on PostgreSQL 14 or newer.

    ``pool_options`` are extra keyword arguments for :func:`asyncpg.create_pool`, such as
    ``max_size``, ``statement_cache_size`` or ``reset``, and override the store's defaults
    (``init`` is the store's own and cannot be given).
    A server that serves one client at a time in one shared session, such as PGlite behind
    tools/pglite/server.mjs, needs ``max_size=1`` and ``statement_cache_size=0``.
    """

    def __init__(
        self,
        dsn: str,
        retention_days: int = DEFAULT_RETENTION_DAYS,
        *,
        pool_options: Mapping[str, Any] | None = None,
    ) -> None:
        if retention_days < 1:
            raise ValueError(f"retention_days must be at least 1, got {retention_days}")
        self.dsn = dsn
        self.retention_days = retention_days
        self.pool_options = dict(pool_options or {})
        self.timescale = False
        self._pool: asyncpg.Pool | None = None
        # UTC days that have partitions, in native partitioning mode.
        self._partition_days: set[date] = set()

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("PostgresHistoryStore is not open: call open() first")
        return self._pool

    def _unavailable(self, exc: BaseException, hint: str) -> StoreUnavailable:
        # TimeoutError has an empty message, so its type name stands in for it.
        reason = str(exc) or type(exc).__name__
        return StoreUnavailable(f"PostgreSQL at {redact_dsn(self.dsn)}: {reason}. {hint}")

    async def open(self) -> None:
        """Connect, then create the schema if needed. Raise StoreUnavailable on failure."""
        options = {
            "min_size": 1,
            "max_size": POOL_MAX_SIZE,
            "timeout": CONNECT_TIMEOUT_SECONDS,
            **self.pool_options,
        }
        try:
            pool = await asyncpg.create_pool(self.dsn, init=_init_connection, **options)
        except asyncpg.InvalidAuthorizationSpecificationError as exc:
            raise self._unavailable(
                exc, "Check the user name and password in the DSN and the server's pg_hba.conf."
            ) from exc
        except asyncpg.InvalidCatalogNameError as exc:
            raise self._unavailable(
                exc, "Create the database (createdb) or fix its name in the DSN."
            ) from exc
        except (asyncpg.ClientConfigurationError, ValueError) as exc:
            raise self._unavailable(
                exc, "Use the form postgresql://user[:password]@host[:port]/database."
            ) from exc
        except (*_CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
            raise self._unavailable(
                exc,
                "Check that the server is running and accepts TCP connections, and that the "
                "host and port in the DSN are right.",
            ) from exc

        self._pool = pool
        try:
            await self._create_schema()
        except BaseException:
            self._pool = None
            await pool.close()
            raise
        mode = "TimescaleDB hypertables" if self.timescale else "native daily partitions"
        logger.info("opened the PostgreSQL history store at %s (%s)", redact_dsn(self.dsn), mode)

    async def check(self) -> None:
        """Raise StoreUnavailable unless the server returns a query's result within two seconds."""
        try:
            async with self.pool.acquire(timeout=CHECK_TIMEOUT_SECONDS) as connection:
                await connection.fetchval("SELECT 1", timeout=CHECK_TIMEOUT_SECONDS)
        except _CONNECTION_ERRORS as exc:
            raise self._unavailable(exc, "Check that the server is running.") from exc

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
            logger.info("closed the PostgreSQL history store at %s", redact_dsn(self.dsn))

    async def _create_schema(self) -> None:
        async with self.pool.acquire() as connection:
            version = connection.get_server_version()
            if version.major < MIN_SERVER_VERSION:
                raise StoreUnavailable(
                    f"PostgreSQL at {redact_dsn(self.dsn)} is version {version.major}, but the "
                    f"history store needs {MIN_SERVER_VERSION} or newer (for date_bin)."
                )
            async with connection.transaction():
                await connection.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK_ID)
                self.timescale = await self._choose_timescale(connection)
                if self.timescale:
                    await self._create_hypertables(connection)
                else:
                    await connection.execute(
                        CREATE_TABLES.format(partitioning="PARTITION BY RANGE (time)")
                    )
        if not self.timescale:
            await self._load_partition_days()
            today = datetime.now(UTC).date()
            await self._create_partitions(
                today + timedelta(days=offset) for offset in range(PARTITIONS_AHEAD_DAYS + 1)
            )

    async def _choose_timescale(self, connection: asyncpg.Connection) -> bool:
        """Return whether to use TimescaleDB, installing the extension when it can."""
        existing = await connection.fetchval("SELECT to_regclass('shadow_updates')")
        if existing is not None:
            partitioned = await connection.fetchval(
                "SELECT EXISTS (SELECT 1 FROM pg_partitioned_table "
                "WHERE partrelid = 'shadow_updates'::regclass)"
            )
            if partitioned:
                return False
            installed = await connection.fetchval(
                "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')"
            )
            if installed and await _is_hypertable(connection, "shadow_updates"):
                return True
            raise StoreUnavailable(
                f"table shadow_updates in {redact_dsn(self.dsn)} is neither partitioned nor a "
                "TimescaleDB hypertable. Rename or drop it, or point the DSN at another database."
            )

        available = await connection.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb')"
        )
        if not available:
            return False
        try:
            async with connection.transaction():  # a savepoint, so failure keeps the outer one
                await connection.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
        except asyncpg.PostgresError as exc:
            logger.warning(
                "TimescaleDB is available but cannot be enabled (%s); using native partitions",
                exc,
            )
            return False
        return True

    async def _create_hypertables(self, connection: asyncpg.Connection) -> None:
        # NOTE: the TimescaleDB branches here, in enforce_retention() and in query() run only in
        # the opt-in tier tests/timescale (PGlite with TimescaleDB 2.23), not in the default
        # suite. TimescaleDB's functions are called unqualified, so the schema that contains the
        # extension (public by default) must be on the connection's search_path.
        await connection.execute(CREATE_TABLES.format(partitioning=""))
        retention = timedelta(days=self.retention_days)
        for table in TABLES:
            if not await _is_hypertable(connection, table):
                # by_range() is the interface of TimescaleDB 2.13 and newer.
                await connection.execute(
                    "SELECT create_hypertable($1::regclass, by_range('time', INTERVAL '1 day'))",
                    table,
                )
                await connection.execute(
                    f"ALTER TABLE {table} SET (timescaledb.compress, "
                    f"timescaledb.compress_segmentby = '{TIMESCALE_SEGMENT_BY[table]}', "
                    "timescaledb.compress_orderby = 'time DESC')"
                )
                await connection.execute(
                    "SELECT add_compression_policy($1::regclass, $2::interval, "
                    "if_not_exists => TRUE)",
                    table,
                    COMPRESS_AFTER,
                )
            # Replaced on every open so that a changed retention setting takes effect.
            await connection.execute(
                "SELECT remove_retention_policy($1::regclass, if_exists => TRUE)", table
            )
            await connection.execute(
                "SELECT add_retention_policy($1::regclass, $2::interval)", table, retention
            )

    async def _load_partition_days(self) -> None:
        pattern = re.compile(r"shadow_updates_p(\d{8})")
        async with self.pool.acquire() as connection:
            names = await connection.fetch(
                "SELECT child.relname FROM pg_inherits "
                "JOIN pg_class child ON child.oid = pg_inherits.inhrelid "
                "WHERE pg_inherits.inhparent = 'shadow_updates'::regclass"
            )
        days = set()
        for (name,) in names:
            match = pattern.fullmatch(name)
            if match:
                days.add(datetime.strptime(match.group(1), "%Y%m%d").date())
        self._partition_days = days

    async def _create_partitions(self, days: Iterable[date]) -> None:
        missing = sorted(set(days) - self._partition_days)
        if not missing:
            return
        async with self.pool.acquire() as connection, connection.transaction():
            await connection.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK_ID)
            for day in missing:
                next_day = day + timedelta(days=1)
                for table in TABLES:
                    # Identifiers and bounds come from dates, never from input text.
                    await connection.execute(
                        f"CREATE TABLE IF NOT EXISTS {_partition_name(table, day)} "
                        f"PARTITION OF {table} FOR VALUES "
                        f"FROM ('{day.isoformat()} 00:00:00+00') "
                        f"TO ('{next_day.isoformat()} 00:00:00+00')"
                    )
        self._partition_days.update(missing)
        logger.info("created history partitions for %s", ", ".join(map(str, missing)))

    async def write(self, rows: Sequence[HistoryRow]) -> None:
        """Commit the rows and their numeric leaves with COPY, in one transaction."""
        # NOTE: a row that PostgreSQL rejects, such as jsonb with a \u0000 escape, fails its
        # whole batch with asyncpg.PostgresError on every retry. The caller must set it aside.
        if not rows:
            return
        updates = []
        values = []
        for row in rows:
            time = _to_datetime(row.time)
            updates.append(
                (time, row.thing, row.shadow_name, row.version, row.reported, row.desired)
            )
            if row.reported is not None:
                for path, value in numeric_leaves(parse_reported(row.reported)):
                    values.append((time, row.thing, row.shadow_name, path, value))

        try:
            if not self.timescale:
                await self._create_partitions(
                    self._days_with_margin(update[0] for update in updates)
                )
            try:
                await self._copy(updates, values)
            except asyncpg.CheckViolationError:
                if self.timescale:
                    raise
                # No partition for a row: another engine's retention run dropped it after
                # this one cached it. Reread the catalog and try once more.
                await self._load_partition_days()
                await self._create_partitions(
                    self._days_with_margin(update[0] for update in updates)
                )
                await self._copy(updates, values)
        except _CONNECTION_ERRORS as exc:
            raise self._unavailable(
                exc, "Check that the server is running; the rows stay in the outbox."
            ) from exc

    def _days_with_margin(self, times: Iterable[datetime]) -> set[date]:
        """Return the days of the rows plus the days ahead of the newest one.

        Days ahead that are already past are left out, so that a late batch of old rows
        does not recreate empty partitions that retention has dropped.
        """
        days = {time.date() for time in times}
        latest = max(days)
        today = datetime.now(UTC).date()
        for offset in range(1, PARTITIONS_AHEAD_DAYS + 1):
            day = latest + timedelta(days=offset)
            if day >= today:
                days.add(day)
        return days

    async def _copy(self, updates: list[tuple[Any, ...]], values: list[tuple[Any, ...]]) -> None:
        connection = await self.pool.acquire()
        try:
            async with connection.transaction():
                await connection.copy_records_to_table(
                    "shadow_updates", records=updates, columns=UPDATE_COLUMNS
                )
                if values:
                    await connection.copy_records_to_table(
                        "shadow_values", records=values, columns=VALUE_COLUMNS
                    )
        finally:
            await self._release(connection)

    async def _release(self, connection: asyncpg.Connection) -> None:
        """Return a connection to the pool, logging a failure instead of raising it.

        asyncpg 0.32 resets a connection on release and raises when the server closes it
        meanwhile, as a fast shutdown does. The transaction has ended by then, so raising would
        report a committed batch as failed and the caller would write it twice. asyncpg has
        terminated the connection already, and the pool opens a new one when needed.
        """
        try:
            await self.pool.release(connection)
        except (
            asyncpg.InterfaceError,
            asyncpg.InternalClientError,
            asyncpg.PostgresError,
            OSError,
            TimeoutError,
        ) as exc:
            logger.warning(
                "returning a connection to the PostgreSQL pool at %s failed: %s; the pool "
                "opens a new one",
                redact_dsn(self.dsn),
                exc,
            )

    async def enforce_retention(self, now: float) -> None:
        """Drop history older than the retention period, and create the coming partitions.

        With native partitions, a day's partition is dropped once all of that day is older
        than ``now`` minus the retention, so up to one more day of rows stays than the
        retention names. TimescaleDB drops whole chunks the same way.
        """
        cutoff = _to_datetime(now) - timedelta(days=self.retention_days)
        try:
            if self.timescale:
                async with self.pool.acquire() as connection:
                    for table in TABLES:
                        await connection.execute(
                            "SELECT drop_chunks($1::regclass, older_than => $2::timestamptz)",
                            table,
                            cutoff,
                        )
                return

            today = _to_datetime(now).date()
            await self._create_partitions(
                today + timedelta(days=offset) for offset in range(PARTITIONS_AHEAD_DAYS + 1)
            )
            await self._drop_partitions_before(cutoff)
        except _CONNECTION_ERRORS as exc:
            raise self._unavailable(exc, "Check that the server is running.") from exc

    async def _drop_partitions_before(self, cutoff: datetime) -> None:
        await self._load_partition_days()
        # A partition for day D holds [D, D + 1 day), so it is expired when D + 1 <= cutoff.
        expired = sorted(
            day
            for day in self._partition_days
            if datetime.combine(day + timedelta(days=1), datetime.min.time(), UTC) <= cutoff
        )
        if not expired:
            return
        async with self.pool.acquire() as connection, connection.transaction():
            await connection.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK_ID)
            for day in expired:
                for table in TABLES:
                    await connection.execute(f"DROP TABLE IF EXISTS {_partition_name(table, day)}")
        self._partition_days.difference_update(expired)
        logger.info(
            "dropped history partitions older than %s: %s",
            cutoff.isoformat(),
            ", ".join(map(str, expired)),
        )

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
        """Return the numeric history of one shadow in ``[start, end)`` (epoch seconds).

        Without ``bucket_seconds`` the result is the raw points, ordered by time and field.
        With it, each field's avg, min, max and last value per bucket, ordered the same way.
        ``fields`` (dotted paths) restricts the result to those fields; None means all.
        """
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        if bucket_seconds is not None and bucket_seconds <= 0:
            raise ValueError(f"bucket_seconds must be positive, got {bucket_seconds}")

        conditions = "thing = $1 AND shadow_name = $2 AND time >= $3 AND time < $4"
        arguments: list[Any] = [thing, shadow_name, _to_datetime(start), _to_datetime(end)]
        if fields is not None:
            arguments.append(list(fields))
            conditions += f" AND field = ANY(${len(arguments)}::text[])"

        if bucket_seconds is None:
            arguments.append(limit)
            sql = (
                f"SELECT time, field, value FROM shadow_values WHERE {conditions} "
                f"ORDER BY time, field LIMIT ${len(arguments)}"
            )
        else:
            arguments.append(timedelta(seconds=bucket_seconds))
            width = f"${len(arguments)}::interval"
            if self.timescale:
                bucket = f"time_bucket({width}, time)"
                last = "last(value, time)"
            else:
                bucket = f"date_bin({width}, time, TIMESTAMPTZ '{BUCKET_ORIGIN}')"
                last = "(array_agg(value ORDER BY time DESC))[1]"
            arguments.append(limit)
            sql = (
                f"SELECT {bucket} AS bucket, field, avg(value), min(value), max(value), {last} "
                f"FROM shadow_values WHERE {conditions} "
                f"GROUP BY bucket, field ORDER BY bucket, field LIMIT ${len(arguments)}"
            )

        try:
            records = await self.pool.fetch(sql, *arguments)
        except _CONNECTION_ERRORS as exc:
            raise self._unavailable(exc, "Check that the server is running.") from exc

        if bucket_seconds is None:
            return [HistoryPoint(r[0].timestamp(), r[1], r[2]) for r in records]
        return [HistoryBucket(r[0].timestamp(), r[1], r[2], r[3], r[4], r[5]) for r in records]
