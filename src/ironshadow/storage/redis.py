"""The Redis hot store: one key per shadow, and the history outbox as a Redis Stream.

Key schema, with ``{prefix}`` the configured prefix (``ironshadow`` by default):

``{prefix}:shadow:{thing}``
    A string holding the classic shadow's document as JSON, exactly as the engine stores it.
``{prefix}:shadow:{thing}~{name}``
    The same for the named shadow ``name`` of ``thing``. AWS thing and shadow names cannot
    contain ``~``, so the key splits back into thing and shadow name without ambiguity.
``{prefix}:history``
    A stream of accepted updates that the history store has not committed yet. Each entry has
    the fields ``time`` (epoch seconds as a decimal string), ``thing``, ``shadow_name`` (empty
    for the classic shadow), ``version``, and ``reported`` and ``desired`` (JSON, each absent
    when the request had no such section). Entries are deleted once committed.

Other services read a shadow with a plain ``GET``. One call to :meth:`RedisHotStore.write`
sends all its ``SET``, ``DEL`` and ``XADD`` commands in one ``MULTI``/``EXEC`` transaction, so
a batch costs one round trip and readers never see half of it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ironshadow.storage.base import HistoryRow, ShadowWrite, StoreUnavailable

logger = logging.getLogger("ironshadow.storage")

# Seconds to wait for a TCP connection to Redis before the store reports it unreachable.
CONNECT_TIMEOUT_SECONDS = 5.0

# Keys per SCAN call and per MGET during start-up. A thousand keeps each reply to a few
# hundred kilobytes for typical shadows while a million shadows still need only a thousand
# round trips of each kind.
LOAD_BATCH_SIZE = 1000

# Outbox entries per XRANGE call in pending_history(), and ids per XDEL call.
OUTBOX_BATCH_SIZE = 1000

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
        self._client: aioredis.Redis | None = None

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
        logger.info("opened the Redis hot store at %s", redact_url(self.url))

    async def close(self) -> None:
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
        """Store the shadows and append the rows to the outbox in one MULTI/EXEC transaction."""
        if not shadows and not history:
            return
        pipeline = self.client.pipeline(transaction=True)
        for shadow in shadows:
            key = self.shadow_key_prefix + shadow.key
            if shadow.document is None:
                pipeline.delete(key)
            else:
                pipeline.set(key, shadow.document)
        for row in history:
            pipeline.xadd(self.history_key, _encode_row(row))
        try:
            await pipeline.execute()
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise self._unavailable(exc) from exc
        finally:
            await pipeline.reset()

    async def pending_history(self) -> AsyncIterator[list[tuple[str, HistoryRow]]]:
        """Yield the outbox entries, oldest first, as ``(stream entry id, row)`` batches."""
        start = "-"
        try:
            while True:
                entries = await self.client.xrange(
                    self.history_key, min=start, max="+", count=OUTBOX_BATCH_SIZE
                )
                if not entries:
                    return
                batch = []
                for raw_id, fields in entries:
                    entry_id = raw_id.decode()
                    row = _decode_row(fields)
                    if row is None:
                        # Left in the stream for inspection; the engine cannot write it.
                        logger.error(
                            "skipped invalid history outbox entry %s in %s: %r",
                            entry_id,
                            self.history_key,
                            fields,
                        )
                        continue
                    batch.append((entry_id, row))
                if batch:
                    yield batch
                # "(" makes the next range start after the last id returned (Redis 6.2+).
                start = "(" + entries[-1][0].decode()
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise self._unavailable(exc) from exc

    async def history_committed(self, positions: Sequence[str]) -> None:
        """Delete these stream entries: the history store has committed their rows."""
        try:
            for first in range(0, len(positions), OUTBOX_BATCH_SIZE):
                chunk = positions[first : first + OUTBOX_BATCH_SIZE]
                await self.client.xdel(self.history_key, *chunk)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise self._unavailable(exc) from exc


def _encode_row(row: HistoryRow) -> dict[str, bytes | str | int]:
    fields: dict[str, bytes | str | int] = {
        "time": repr(row.time),
        "thing": row.thing,
        "shadow_name": row.shadow_name,
        "version": row.version,
    }
    if row.reported is not None:
        fields["reported"] = row.reported
    if row.desired is not None:
        fields["desired"] = row.desired
    return fields


def _decode_row(fields: dict[bytes, bytes]) -> HistoryRow | None:
    """Return the row of an outbox entry, or None when a field is missing or malformed."""
    try:
        return HistoryRow(
            time=float(fields[b"time"]),
            thing=fields[b"thing"].decode(),
            shadow_name=fields[b"shadow_name"].decode(),
            version=int(fields[b"version"]),
            reported=fields.get(b"reported"),
            desired=fields.get(b"desired"),
        )
    except (KeyError, ValueError, UnicodeDecodeError):
        return None
