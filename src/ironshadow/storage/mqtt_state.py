"""Stores for the MQTT state that survives a restart: retained messages and persistent sessions.

The broker serializes each retained message and each persistent session to bytes of its own
versioned format (:mod:`ironshadow.broker.persistence`). The stores here keep those bytes by
topic and by client id and know nothing about what is inside them. Two backends implement
:class:`MqttStateStore`:

- :class:`SQLiteMqttStateStore`, the embedded default: ``mqtt-state.sqlite3`` in the data
  folder, WAL mode, ``synchronous=FULL``, one transaction per write, so a returned write
  survives a crash and power loss;
- :class:`RedisMqttStateStore`, beside the Redis hot store: two hashes, ``{prefix}:retained``
  (topic -> message) and ``{prefix}:sessions`` (client id -> session), written in one
  ``MULTI``/``EXEC`` per write, so readers never see half of a write.

A write carries the latest bytes of every entry that changed since the previous write, and
None for an entry to delete. Entries are replaced whole, so a write that failed can simply be
repeated with newer bytes.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .base import StoreUnavailable
from .redis import CONNECT_TIMEOUT_SECONDS, redact_url

logger = logging.getLogger("ironshadow.storage")

# Name of the SQLite file in the data folder.
SQLITE_FILE_NAME = "mqtt-state.sqlite3"

# Schema version in the SQLite file's user_version. A file with a higher version was written by
# a newer IronShadow, whose layout this one cannot know.
SQLITE_SCHEMA_VERSION = 1

# Fields per HSCAN call when the Redis store is loaded. A thousand sessions of a few kilobytes
# each keep one reply to a few megabytes.
REDIS_SCAN_COUNT = 1000

_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS retained (
    topic TEXT PRIMARY KEY,
    message BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sessions (
    client_id TEXT PRIMARY KEY,
    session BLOB NOT NULL
) WITHOUT ROWID;
"""

_T = TypeVar("_T")


@dataclass(slots=True)
class StoredMqttState:
    """The contents of an MQTT state store: serialized retained messages by topic and
    serialized sessions by client id."""

    retained: dict[str, bytes] = field(default_factory=dict)
    sessions: dict[str, bytes] = field(default_factory=dict)


class MqttStateStore(Protocol):
    async def open(self) -> None:
        """Connect or open the file. Raise StoreUnavailable with what to check when that fails."""
        ...

    async def close(self) -> None: ...

    async def load(self) -> StoredMqttState:
        """Return every stored retained message and session, for the engine's start-up."""
        ...

    async def write(
        self, retained: Mapping[str, bytes | None], sessions: Mapping[str, bytes | None]
    ) -> None:
        """Store or, for None, delete these entries together; return once they are durable."""
        ...


class SQLiteMqttStateStore:
    """An :class:`MqttStateStore` in one SQLite file, with two tables::

        retained (topic TEXT PRIMARY KEY, message BLOB NOT NULL)
        sessions (client_id TEXT PRIMARY KEY, session BLOB NOT NULL)

    All database work runs on one dedicated thread, because a ``sqlite3`` connection must be
    used from the thread that created it and the event loop must not wait on the disk.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._executor: ThreadPoolExecutor | None = None
        self._connection: sqlite3.Connection | None = None

    async def _run(self, function: Callable[..., _T], *args: Any) -> _T:
        if self._executor is None:
            raise RuntimeError(f"the MQTT state store {self.path} is not open; call open() first")
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    async def open(self) -> None:
        if self._executor is not None:
            raise RuntimeError(f"the MQTT state store {self.path} is already open")
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="ironshadow-mqtt-state"
        )
        try:
            await self._run(self._connect)
        except BaseException:
            self._executor.shutdown(wait=True)
            self._executor = None
            raise
        logger.info("opened the MQTT state file %s", self.path)

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
                f"cannot open the MQTT state file {self.path}: {exc}; check that its folder "
                "exists and is writable"
            ) from exc
        try:
            version = connection.execute("PRAGMA user_version").fetchone()[0]
            if version > SQLITE_SCHEMA_VERSION:
                raise StoreUnavailable(
                    f"the MQTT state file {self.path} has schema version {version}, but this "
                    f"IronShadow reads version {SQLITE_SCHEMA_VERSION} at most; upgrade "
                    "IronShadow or move the file away to start without retained messages "
                    "and sessions"
                )
            connection.execute("PRAGMA journal_mode=WAL")
            # FULL, not NORMAL: in WAL mode NORMAL may lose the last transactions on power
            # loss, because the WAL is fsynced only at checkpoints. FULL costs one fsync per
            # write, and the engine writes at most about ten times a second.
            connection.execute("PRAGMA synchronous=FULL")
            connection.executescript(_SQLITE_SCHEMA)
            connection.execute(f"PRAGMA user_version={SQLITE_SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            connection.close()
            raise StoreUnavailable(
                f"cannot set up the MQTT state file {self.path}: {exc}; check that it is an "
                "IronShadow MQTT state database and that the disk is not full"
            ) from exc
        except StoreUnavailable:
            connection.close()
            raise
        self._connection = connection

    def _disconnect(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _db(self) -> sqlite3.Connection:
        assert self._connection is not None
        return self._connection

    async def load(self) -> StoredMqttState:
        return await self._run(self._load)

    def _load(self) -> StoredMqttState:
        db = self._db()
        try:
            retained = dict(db.execute("SELECT topic, message FROM retained"))
            sessions = dict(db.execute("SELECT client_id, session FROM sessions"))
        except sqlite3.Error as exc:
            raise StoreUnavailable(
                f"cannot read the MQTT state file {self.path}: {exc}; check that it is an "
                "IronShadow MQTT state database"
            ) from exc
        return StoredMqttState(retained, sessions)

    async def write(
        self, retained: Mapping[str, bytes | None], sessions: Mapping[str, bytes | None]
    ) -> None:
        """Apply the changes in one transaction."""
        if retained or sessions:
            await self._run(self._write, dict(retained), dict(sessions))

    def _write(
        self, retained: dict[str, bytes | None], sessions: dict[str, bytes | None]
    ) -> None:
        db = self._db()
        try:
            db.execute("BEGIN")
            _apply(db, "retained", "topic", "message", retained)
            _apply(db, "sessions", "client_id", "session", sessions)
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise StoreUnavailable(
                f"cannot write the MQTT state file {self.path}: {exc}; check that the disk "
                "is not full"
            ) from exc


def _apply(
    db: sqlite3.Connection, table: str, key: str, column: str, changes: dict[str, bytes | None]
) -> None:
    stored = [(name, blob) for name, blob in changes.items() if blob is not None]
    deleted = [(name,) for name, blob in changes.items() if blob is None]
    if stored:
        db.executemany(f"INSERT OR REPLACE INTO {table} ({key}, {column}) VALUES (?, ?)", stored)
    if deleted:
        db.executemany(f"DELETE FROM {table} WHERE {key} = ?", deleted)


class RedisMqttStateStore:
    """An :class:`MqttStateStore` in two Redis hashes, ``{prefix}:retained`` and
    ``{prefix}:sessions``, on a client of its own.

    The client does not retry on its own. Writes are idempotent, and the caller retries a
    failed write with newer bytes anyway.
    """

    def __init__(self, url: str, prefix: str = "ironshadow") -> None:
        self.url = url
        self.prefix = prefix
        self.retained_key = f"{prefix}:retained"
        self.sessions_key = f"{prefix}:sessions"
        self._client: aioredis.Redis | None = None

    def _unavailable(self, exc: BaseException) -> StoreUnavailable:
        return StoreUnavailable(
            f"Redis at {redact_url(self.url)} is unreachable for the MQTT state: "
            f"{str(exc).rstrip('.')}. Check that redis-server is running and that the host, "
            "port and database number in the URL are right."
        )

    @property
    def client(self) -> aioredis.Redis:
        if self._client is None:
            raise RuntimeError("RedisMqttStateStore is not open: call open() first")
        return self._client

    async def open(self) -> None:
        """Connect and check the server with a PING. Raise StoreUnavailable when either fails."""
        try:
            client = aioredis.Redis.from_url(
                self.url,
                socket_connect_timeout=CONNECT_TIMEOUT_SECONDS,
                retry=Retry(NoBackoff(), 0),
            )
        except ValueError as exc:
            raise StoreUnavailable(
                f"invalid Redis URL {redact_url(self.url)}: {str(exc).rstrip('.')}. Use the "
                "form redis://[[user]:password@]host[:port][/db] or rediss:// for TLS."
            ) from exc
        try:
            await client.ping()
        except (AuthenticationError, ResponseError) as exc:
            await client.aclose()
            raise StoreUnavailable(
                f"Redis at {redact_url(self.url)} rejected the connection for the MQTT state: "
                f"{str(exc).rstrip('.')}. Check the user name and password in the URL."
            ) from exc
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            await client.aclose()
            raise self._unavailable(exc) from exc
        self._client = client
        logger.info("opened the MQTT state in Redis at %s", redact_url(self.url))

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def load(self) -> StoredMqttState:
        """Read both hashes with HSCAN, REDIS_SCAN_COUNT fields per call."""
        try:
            retained = await self._scan(self.retained_key)
            sessions = await self._scan(self.sessions_key)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise self._unavailable(exc) from exc
        return StoredMqttState(retained, sessions)

    async def _scan(self, key: str) -> dict[str, bytes]:
        entries: dict[str, bytes] = {}
        async for name, blob in self.client.hscan_iter(key, count=REDIS_SCAN_COUNT):
            entries[name.decode()] = blob
        return entries

    async def write(
        self, retained: Mapping[str, bytes | None], sessions: Mapping[str, bytes | None]
    ) -> None:
        """Apply the changes in one MULTI/EXEC: at most one HSET and one HDEL per hash."""
        if not retained and not sessions:
            return
        pipeline = self.client.pipeline(transaction=True)
        for key, changes in ((self.retained_key, retained), (self.sessions_key, sessions)):
            stored = {name: blob for name, blob in changes.items() if blob is not None}
            deleted = [name for name, blob in changes.items() if blob is None]
            if stored:
                pipeline.hset(key, mapping=stored)  # type: ignore[arg-type]
            if deleted:
                pipeline.hdel(key, *deleted)
        try:
            await pipeline.execute()
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise self._unavailable(exc) from exc
