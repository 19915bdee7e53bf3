"""The Redis hot store: one key per shadow, and the history outbox as a Redis Stream.

Key schema, with ``{prefix}`` the configured prefix (``ironshadow`` by default):

``{prefix}:shadow:{thing}``
    A string holding the classic shadow's document as JSON, exactly as the engine stores it.
``{prefix}:shadow:{thing}~{name}``
    The same for the named shadow ``name`` of ``thing``. AWS thing and shadow names cannot
    contain ``~``, so the key splits back into thing and shadow name without ambiguity.
``{prefix}:history``
    A stream of accepted updates that the history store has not committed yet: one entry per
    write batch, with one field ``rows``, a JSON array with an array per update of ``[time,
    thing, shadow_name, version, reported, desired]``. ``time`` is epoch seconds,
    ``shadow_name`` is empty for the classic shadow, and ``reported`` and ``desired`` are the
    request's sections, or null when it had none. An entry is deleted once all its rows are
    committed.

Other services read a shadow with a plain ``GET``. One call to :meth:`RedisHotStore.write`
sends a ``MULTI``, at most one ``MSET``, one ``DEL`` and one ``XADD``, and an ``EXEC`` in one
write, so a batch costs one round trip and readers never see half of it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import hiredis
import orjson
import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ironshadow.shadow.jsonbytes import dumps_exact
from ironshadow.storage.base import HistoryRow, ShadowWrite, StoreUnavailable

logger = logging.getLogger("ironshadow.storage")

# Seconds to wait for a TCP connection to Redis before the store reports it unreachable.
CONNECT_TIMEOUT_SECONDS = 5.0
# Seconds a readiness check waits for PING.
CHECK_TIMEOUT_SECONDS = 2.0

# Keys per SCAN call and per MGET during start-up. A thousand keeps each reply to a few
# hundred kilobytes for typical shadows while a million shadows still need only a thousand
# round trips of each kind.
LOAD_BATCH_SIZE = 1000

# Outbox entries per XRANGE call in pending_history(), ids per XDEL call, and the rows that a
# batch from memory reaches before it is yielded.
OUTBOX_BATCH_SIZE = 1000

# Outbox rows kept in memory for the history task. Past this, memory drops them and the task
# reads them back from the stream: a slow history store costs reads, not engine memory.
OUTBOX_MEMORY_ROWS = 20_000

# Seconds between two reads of the stream below the rows in memory, as a safety net.
STREAM_RECHECK_SECONDS = 10.0

_MULTI = hiredis.pack_command(("MULTI",))
_EXEC = hiredis.pack_command(("EXEC",))

# Characters that SCAN's MATCH pattern treats as glob syntax.
_GLOB_CHARACTERS = "\\*?[]"


def redact_url(url: str) -> str:
    """Return the URL with its password replaced by ``***``, for error messages and logs."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<invalid URL>"
    if not password:
        return url
    host = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _escape_glob(text: str) -> str:
    return "".join("\\" + char if char in _GLOB_CHARACTERS else char for char in text)


def _reason(exc: BaseException) -> str:
    """Return the error's text without a final period, to end a clause in a message."""
    return str(exc).rstrip(".")


class RedisHotStore:
    """A :class:`~ironshadow.storage.base.HotStore` on a standalone Redis server.

    An acknowledged write survives an engine crash. It survives a Redis restart only as far as
    the server's own persistence (RDB snapshots, AOF and its ``appendfsync`` setting) keeps it.
    """

    def __init__(self, url: str, prefix: str = "ironshadow") -> None:
        self.url = url
        self.prefix = prefix
        self.shadow_key_prefix = f"{prefix}:shadow:"
        self.history_key = f"{prefix}:history"
        self._outbox = _Outbox(OUTBOX_MEMORY_ROWS)
        self._client: aioredis.Redis | None = None
        self._write_connection: AbstractConnection | None = None
        # The encoded outbox rows of the last write if it failed, because Redis may have
        # applied it all the same.
        self._unconfirmed_rows: bytes | None = None

    def _unavailable(self, exc: BaseException) -> StoreUnavailable:
        return StoreUnavailable(
            f"Redis at {redact_url(self.url)} is unreachable: {_reason(exc)}. "
            "Check that redis-server is running and that the host, port and database number "
            "in the URL are right."
        )

    @property
    def client(self) -> aioredis.Redis:
        if self._client is None:
            raise RuntimeError("RedisHotStore is not open: call open() first")
        return self._client

    async def open(self) -> None:
        """Connect and check the server with a PING. Raise StoreUnavailable when either fails."""
        try:
            client = aioredis.Redis.from_url(
                self.url,
                socket_connect_timeout=CONNECT_TIMEOUT_SECONDS,
                # The engine retries with its own backoff. A retry in here could send a
                # transaction twice and duplicate its outbox entries.
                retry=Retry(NoBackoff(), 0),
            )
        except ValueError as exc:
            raise StoreUnavailable(
                f"invalid Redis URL {redact_url(self.url)}: {_reason(exc)}. Use the form "
                "redis://[[user]:password@]host[:port][/db] or rediss:// for TLS."
            ) from exc

        try:
            await client.ping()
        except AuthenticationError as exc:
            await client.aclose()
            raise StoreUnavailable(
                f"Redis at {redact_url(self.url)} rejected the credentials: {_reason(exc)}. "
                "Check the user name and password in the URL."
            ) from exc
        except ResponseError as exc:
            await client.aclose()
            raise StoreUnavailable(
                f"Redis at {redact_url(self.url)} rejected PING: {_reason(exc)}. "
                "Check that the URL contains the password that the server requires."
            ) from exc
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            await client.aclose()
            raise self._unavailable(exc) from exc

        self._client = client
        pool = client.connection_pool
        self._write_connection = pool.connection_class(**pool.connection_kwargs)
        self._outbox = _Outbox(OUTBOX_MEMORY_ROWS)
        logger.info("opened the Redis hot store at %s", redact_url(self.url))

    def outbox_rows_in_memory(self) -> int:
        """Return the outbox rows kept in memory, at most OUTBOX_MEMORY_ROWS: the rest wait
        in Redis."""
        return self._outbox.cached_rows

    async def check(self) -> None:
        """Raise StoreUnavailable unless Redis replies to PING within CHECK_TIMEOUT_SECONDS."""
        try:
            await asyncio.wait_for(self.client.ping(), CHECK_TIMEOUT_SECONDS)
        except (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError) as exc:
            raise self._unavailable(exc) from exc

    async def close(self) -> None:
        if self._write_connection is not None:
            await self._write_connection.disconnect()
            self._write_connection = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None
            logger.info("closed the Redis hot store at %s", redact_url(self.url))

    async def load_shadows(self) -> AsyncIterator[list[tuple[str, bytes]]]:
        """Yield every stored ``(key, document)`` in batches of up to LOAD_BATCH_SIZE.

        SCAN may return a key twice when Redis resizes its hash table during the scan. Both
        copies then carry a current document, so a caller that keeps the last one is right.
        """
        pattern = _escape_glob(self.shadow_key_prefix) + "*"
        prefix_length = len(self.shadow_key_prefix)
        cursor = 0
        try:
            while True:
                cursor, keys = await self.client.scan(cursor, match=pattern, count=LOAD_BATCH_SIZE)
                if keys:
                    documents = await self.client.mget(keys)
                    batch = [
                        (key[prefix_length:].decode(), document)
                        for key, document in zip(keys, documents, strict=True)
                        # None: the shadow was deleted between SCAN and MGET.
                        if document is not None
                    ]
                    if batch:
                        yield batch
                if cursor == 0:
                    return
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise self._unavailable(exc) from exc

    async def write(self, shadows: Sequence[ShadowWrite], history: Sequence[HistoryRow]) -> None:
        """Store the shadows and append the rows to the outbox in one MULTI/EXEC transaction.

        The transaction contains at most one ``MSET``, one ``DEL`` and one ``XADD`` whatever the
        batch size: the cost of a batch in the engine grows with the data, not the commands.

        A transaction can fail after Redis applied it, when the connection breaks before the
        reply arrives. So when a write fails, the next write of the same rows first looks for
        them in the newest outbox entry and, if they are there, keeps that entry instead of
        adding a second copy.
        """
        if not shadows and not history:
            return
        rows = _encode_rows(history) if history else None
        if self._unconfirmed_rows is not None:
            if rows == self._unconfirmed_rows:
                entry_id = await self._newest_entry_holding(rows)
                if entry_id is not None:
                    logger.info(
                        "Redis had applied the failed write of %d history rows; kept its "
                        "outbox entry %s instead of adding another",
                        len(history),
                        entry_id,
                    )
                    self._unconfirmed_rows = None
                    self._outbox.remember(entry_id, list(history))
                    return
            else:
                # The caller moved on from the failed batch. If Redis applied it, its entry
                # is read back from the stream.
                self._unconfirmed_rows = None
                self._outbox.complete = False
        # The last write to a key wins, as it would with one command per write in order.
        latest: dict[str, bytes | None] = {}
        for shadow in shadows:
            latest[self.shadow_key_prefix + shadow.key] = shadow.document
        stored = {key: document for key, document in latest.items() if document is not None}
        deleted = [key for key, document in latest.items() if document is None]

        # The transaction is packed here and sent on a connection of its own: redis-py's
        # pipeline object costs more per batch than the commands themselves.
        commands = [_MULTI]
        if stored:
            commands.append(hiredis.pack_command(("MSET", *itertools.chain(*stored.items()))))
        if deleted:
            commands.append(hiredis.pack_command(("DEL", *deleted)))
        if rows is not None:
            commands.append(hiredis.pack_command(("XADD", self.history_key, "*", "rows", rows)))
        commands.append(_EXEC)
        try:
            results = await self._transaction(commands)
        except BaseException:
            self._unconfirmed_rows = rows
            raise
        self._unconfirmed_rows = None
        if history:
            self._outbox.remember(results[-1].decode(), list(history))

    async def _newest_entry_holding(self, rows: bytes) -> str | None:
        """Return the id of the newest outbox entry if its rows are ``rows``, else None."""
        try:
            entries = await self.client.xrevrange(self.history_key, count=1)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise self._unavailable(exc) from exc
        if entries and entries[0][1].get(b"rows") == rows:
            return entries[0][0].decode()
        return None

    async def _transaction(self, commands: list[bytes]) -> list[Any]:
        """Send MULTI, the commands and EXEC in one write; return EXEC's replies."""
        connection = self._write_connection
        if connection is None:
            raise RuntimeError("RedisHotStore is not open: call open() first")
        try:
            await connection.send_packed_command(commands, check_health=False)
            for _ in range(len(commands) - 1):  # +OK for MULTI, +QUEUED for each command
                await connection.read_response()
            results: list[Any] = await connection.read_response()
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            await connection.disconnect(nowait=True)
            raise self._unavailable(exc) from exc
        except BaseException:
            # An error reply or a cancellation leaves replies unread: start afresh next time.
            await connection.disconnect(nowait=True)
            raise
        return results

    async def pending_history(self) -> AsyncIterator[list[tuple[str, HistoryRow]]]:
        """Yield the outbox rows, oldest first, as ``(position, row)`` batches.

        A position is ``{stream entry id}/{index of the row in the entry}``. Rows written by
        this store since it opened come from memory; the stream is read only for what an
        earlier run left behind, or after more than OUTBOX_MEMORY_ROWS rows waited at once.
        Batches hold up to OUTBOX_BATCH_SIZE rows; a large entry spans several. Nothing is
        yielded while the outcome of a failed write is unknown: its entry may be in the stream,
        and only the retry of that write can tell it from a new one.
        """
        if self._unconfirmed_rows is not None:
            return
        outbox = self._outbox
        # Entries whose XDEL failed must go before the stream is read, or their rows would
        # be yielded again.
        await self._delete_committed()
        outbox.begin_pass()
        start = "-"
        # Entries hold a write batch each, from one row to thousands: the count of entries
        # per XRANGE follows the rows per entry seen so far, to keep replies near
        # OUTBOX_BATCH_SIZE rows.
        count = 1
        try:
            while not outbox.complete:
                # Stop short of the rows that memory holds, so none is yielded twice.
                first_cached = outbox.first_id()
                end = "+" if first_cached is None else "(" + first_cached
                overflows = outbox.overflows
                entries = await self.client.xrange(
                    self.history_key, min=start, max=end, count=count
                )
                if not entries:
                    if outbox.overflows != overflows:
                        # Memory dropped rows during the read, so read on to the new end.
                        continue
                    outbox.complete = True
                    outbox.last_stream_pass = time.monotonic()
                    break
                batch: list[tuple[str, HistoryRow]] = []
                for raw_id, fields in entries:
                    entry_id = raw_id.decode()
                    rows = _decode_rows(fields)
                    if rows is None:
                        # Left in the stream for inspection; the engine cannot write it.
                        logger.error(
                            "skipped invalid history outbox entry %s in %s: %r",
                            entry_id,
                            self.history_key,
                            fields,
                        )
                        continue
                    outbox.read_from_stream(entry_id, len(rows))
                    batch.extend(outbox.positioned(entry_id, rows))
                count = max(
                    1,
                    min(OUTBOX_BATCH_SIZE, OUTBOX_BATCH_SIZE * len(entries) // max(1, len(batch))),
                )
                for first in range(0, len(batch), OUTBOX_BATCH_SIZE):
                    yield batch[first : first + OUTBOX_BATCH_SIZE]
                # "(" makes the next range start after the last id returned (Redis 6.2+).
                start = "(" + entries[-1][0].decode()
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise self._unavailable(exc) from exc
        for batch in outbox.cached_batches(OUTBOX_BATCH_SIZE):
            yield batch

    async def history_committed(self, positions: Sequence[str]) -> None:
        """Drop these rows from the outbox: the history store has committed them.

        An entry is deleted from the stream (``XDEL``) once all its rows are committed. When
        the XDEL fails, the entry is deleted by the next call here or to pending_history().
        """
        self._outbox.undeleted.update(self._outbox.commit(positions))
        await self._delete_committed()

    async def _delete_committed(self) -> None:
        undeleted = self._outbox.undeleted
        entries = list(undeleted)
        try:
            for first in range(0, len(entries), OUTBOX_BATCH_SIZE):
                chunk = entries[first : first + OUTBOX_BATCH_SIZE]
                await self.client.xdel(self.history_key, *chunk)
                undeleted.difference_update(chunk)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise self._unavailable(exc) from exc


def _stream_id(entry_id: str) -> tuple[int, int]:
    milliseconds, _, sequence = entry_id.partition("-")
    return int(milliseconds), int(sequence)


class _Outbox:
    """The engine's view of the history stream: which rows wait, and which are in memory.

    The rows of every entry this store writes are kept in memory until they are committed, so
    moving them to the history store does not read them back from Redis. Memory holds the newest
    entries only; ``complete`` says whether it also holds every older uncommitted one. It is
    False after opening (an earlier run may have left entries), after memory overflowed, and
    while rows read from the stream wait uncommitted (a failed history write leaves them so);
    pending_history() then reads the stream up to the first entry in memory, and sets it True
    when nothing is left below that.
    """

    def __init__(self, memory_rows: int) -> None:
        self.memory_rows = memory_rows
        self.complete = False
        self._cached: dict[str, list[HistoryRow]] = {}
        self._cached_rows = 0
        self._sizes: dict[str, int] = {}  # rows per yielded or cached entry
        self._committed: dict[str, set[int]] = {}  # rows committed of unfinished entries
        self._newest_read: tuple[int, int] = (0, 0)  # newest entry read from the stream
        self._read_uncommitted: set[str] = set()  # entries read from the stream, not finished
        # Entries whose rows are all committed but that XDEL has not deleted yet.
        self.undeleted: set[str] = set()
        self.overflows = 0  # times memory dropped its rows
        self.last_stream_pass = 0.0  # monotonic time the stream was last read to its end

    def begin_pass(self) -> None:
        if self._read_uncommitted:
            self.complete = False
        # Now and then the stream below memory is read again even when memory should hold
        # every waiting row, so that rows left there by a case this bookkeeping misses are
        # moved within seconds rather than at the next start.
        if time.monotonic() - self.last_stream_pass >= STREAM_RECHECK_SECONDS:
            self.complete = False

    @property
    def cached_rows(self) -> int:
        return self._cached_rows

    def first_id(self) -> str | None:
        return next(iter(self._cached), None)

    def remember(self, entry_id: str, rows: list[HistoryRow]) -> None:
        if _stream_id(entry_id) <= self._newest_read:
            return  # pending_history() read it from the stream already
        self._cached[entry_id] = rows
        self._sizes[entry_id] = len(rows)
        self._cached_rows += len(rows)
        if self._cached_rows > self.memory_rows:
            # The history store is far behind. Memory holds nothing; the stream holds it all.
            # Every entry keeps its size, so that it is deleted only once all its rows are
            # committed: a pass under way may still move rows of entries dropped here.
            self._cached.clear()
            self._cached_rows = 0
            self.complete = False
            self.overflows += 1

    def read_from_stream(self, entry_id: str, size: int) -> None:
        self._sizes[entry_id] = size
        self._read_uncommitted.add(entry_id)
        self._newest_read = max(self._newest_read, _stream_id(entry_id))
        rows = self._cached.pop(entry_id, None)
        if rows is not None:
            self._cached_rows -= len(rows)

    def positioned(self, entry_id: str, rows: list[HistoryRow]) -> list[tuple[str, HistoryRow]]:
        done = self._committed.get(entry_id, ())
        return [(f"{entry_id}/{index}", row) for index, row in enumerate(rows) if index not in done]

    def cached_batches(self, size: int) -> Iterator[list[tuple[str, HistoryRow]]]:
        batch: list[tuple[str, HistoryRow]] = []
        for entry_id, rows in list(self._cached.items()):
            batch.extend(self.positioned(entry_id, rows))
            while len(batch) >= size:
                yield batch[:size]
                batch = batch[size:]
        if batch:
            yield batch

    def commit(self, positions: Sequence[str]) -> list[str]:
        """Record committed rows; return the ids of the entries now committed entirely."""
        finished = []
        for position in positions:
            entry_id, _, index = position.partition("/")
            try:
                _stream_id(entry_id)
                row_index = int(index)
            except ValueError:
                raise ValueError(
                    f"invalid outbox position {position!r}: expected a position that "
                    "pending_history() returned"
                ) from None
            done = self._committed.setdefault(entry_id, set())
            done.add(row_index)
            size = self._sizes.get(entry_id)
            # An entry of unknown size is never taken as finished: deleting it would lose its
            # other rows. The stream read sets its size again.
            if size is not None and len(done) >= size and entry_id not in finished:
                finished.append(entry_id)
        for entry_id in finished:
            self._read_uncommitted.discard(entry_id)
            self._committed.pop(entry_id, None)
            self._sizes.pop(entry_id, None)
            rows = self._cached.pop(entry_id, None)
            if rows is not None:
                self._cached_rows -= len(rows)
        return finished


def _encode_rows(rows: Sequence[HistoryRow]) -> bytes:
    return orjson.dumps(
        [
            [
                row.time,
                row.thing,
                row.shadow_name,
                row.version,
                None if row.reported is None else orjson.Fragment(row.reported),
                None if row.desired is None else orjson.Fragment(row.desired),
            ]
            for row in rows
        ]
    )


def _decode_rows(fields: dict[bytes, bytes]) -> list[HistoryRow] | None:
    """Return the rows of an outbox entry, or None when the entry is malformed."""
    try:
        return [
            HistoryRow(
                time=float(time),
                thing=thing,
                shadow_name=shadow_name,
                version=version,
                reported=None if reported is None else dumps_exact(reported),
                desired=None if desired is None else dumps_exact(desired),
            )
            for time, thing, shadow_name, version, reported, desired in orjson.loads(
                fields[b"rows"]
            )
        ]
    except (KeyError, ValueError, TypeError, orjson.JSONDecodeError):
        return None
