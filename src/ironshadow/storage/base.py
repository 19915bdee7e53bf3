"""The storage interfaces that the engine's write-behind pipeline talks to.

Two roles, one interface each, so that backends are chosen by configuration:

- a hot store keeps the latest document of every shadow under its key (``shadow_key``: the
  thing name, or ``thing~name`` for a named shadow) and survives restarts;
- a history store keeps one row per accepted update and the numeric leaves of its reported
  state, for analytics.

Between the two sits the history outbox: rows of acknowledged updates wait there durably until
the history store has committed them, so an engine crash loses none. The embedded backend keeps
the outbox in its journal; the Redis backend in a Redis Stream.

Retained messages and persistent sessions have a store interface of their own, in
``mqtt_state``.

Every write method returns only when the data is durable (written and fsynced, acknowledged
by Redis, or committed by the database). Backends raise :class:`StoreUnavailable` when the
store cannot be reached, with a message that names the URL or path and what to check.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import orjson

# Days of history kept when no retention is configured.
DEFAULT_RETENTION_DAYS = 30


class StoreUnavailable(Exception):
    """A store cannot be reached or used; the message names which and what to check."""


@dataclass(frozen=True, slots=True)
class ShadowWrite:
    """The new document of one shadow, or None when the shadow is removed."""

    key: str
    document: bytes | None


@dataclass(frozen=True, slots=True)
class HistoryRow:
    """One accepted shadow update as the history keeps it.

    ``reported`` and ``desired`` are the parts of the request as JSON bytes (None when the
    request did not contain that section), so that desired changes leave an audit trail.
    """

    time: float  # epoch seconds
    thing: str
    shadow_name: str  # "" for the classic shadow
    version: int
    reported: bytes | None
    desired: bytes | None


class HotStore(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    def load_shadows(self) -> AsyncIterator[list[tuple[str, bytes]]]:
        """Yield every stored ``(key, document)`` in batches, for the engine's start-up."""
        ...

    async def write(self, shadows: Sequence[ShadowWrite], history: Sequence[HistoryRow]) -> None:
        """Store the shadows and append the rows to the history outbox, durably, together."""
        ...

    def pending_history(self) -> AsyncIterator[list[tuple[str, HistoryRow]]]:
        """Yield the outbox rows not yet committed by the history store, oldest first, in
        batches of ``(position, row)``. A position is opaque to the caller: a journal
        offset for the embedded store, a stream entry id for Redis."""
        ...

    async def history_committed(self, positions: Sequence[str]) -> None:
        """Drop these outbox rows: the history store has committed them."""
        ...

    async def check(self) -> None:
        """Raise StoreUnavailable unless the store can take writes now, for readiness probes."""
        ...

    def outbox_rows_in_memory(self) -> int:
        """Return how many outbox rows this store keeps in the engine's memory."""
        ...


class HistoryStore(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def write(self, rows: Sequence[HistoryRow]) -> None:
        """Commit the rows and their numeric leaves."""
        ...

    async def check(self) -> None:
        """Raise StoreUnavailable unless the store can take writes now, for readiness probes."""
        ...

    async def enforce_retention(self, now: float) -> None:
        """Delete or drop history older than the retention period."""
        ...

    async def query(
        self,
        thing: str,
        shadow_name: str,
        start: float,
        end: float,
        fields: Sequence[str] | None = None,
        bucket_seconds: float | None = None,
        limit: int = 1000,
    ) -> list[HistoryPoint] | list[HistoryBucket]:
        """Return raw points in ``[start, end)``, or per-bucket aggregates with a bucket."""
        ...


class HistoryPoint(NamedTuple):
    """One numeric leaf of one update, as history queries return it."""

    time: float  # epoch seconds
    field: str
    value: float


class HistoryBucket(NamedTuple):
    """Aggregates of one numeric field over one time bucket, as history queries return it."""

    time: float  # start of the bucket, epoch seconds
    field: str
    avg: float
    min: float
    max: float
    last: float  # the value of the latest point in the bucket


# A tuple rather than ``int | float``, which would build a union object on every call.
_NUMBERS = (int, float)


def numeric_leaves(document: Any, prefix: str = "") -> Iterator[tuple[str, float]]:
    """Yield ``(dotted path, value)`` for every number in the objects of a JSON document.

    Booleans are not numbers here, and arrays are not descended into because a shadow update
    replaces an array as a whole.
    """
    if not isinstance(document, dict):
        return
    for key, value in document.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(value, bool):
            continue
        if isinstance(value, _NUMBERS):
            try:
                yield path, float(value)
            except OverflowError:  # an integer beyond the range of a double
                continue
        elif isinstance(value, dict):
            yield from numeric_leaves(value, path)


def parse_reported(data: bytes) -> Any:
    """Parse the reported part of a history row, or return None when it is invalid JSON."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        # orjson rejects integers wider than 64 bits, which JSON allows.
        try:
            return json.loads(data)
        except ValueError:
            return None
