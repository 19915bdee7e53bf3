"""The write-behind pipeline between the shadow service and the stores.

Accepted updates are submitted with a callback. The pipeline writes them to the hot store and
the history outbox together in one durable batch, then runs the callbacks, which send the
acknowledgements and replies. This is group commit: everything submitted while one batch is
being written goes into the next one. A second task moves outbox rows into the history store and
marks them committed.

Backpressure: the items submitted but not yet durable are counted. Above ``high_water`` the
pipeline calls ``on_pressure(True)``, which the engine turns into the broker's pause signal, so
TCP slows the devices down; below ``low_water`` it calls ``on_pressure(False)``. A store that
fails is retried with exponential backoff and every retry is logged; nothing submitted is
dropped, the callbacks wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import NamedTuple

from ironshadow.metrics import Histogram

from .base import HistoryRow, HistoryStore, HotStore, ShadowWrite

log = logging.getLogger("ironshadow.storage")

# Shadow writes waiting for durability above which the devices are slowed down, and below
# which they may go on. The byte marks do the same for large shadows, counting documents and
# history rows. Either high mark raises the pause, and it clears once all are below their low
# marks.
DEFAULT_HIGH_WATER = 20_000
DEFAULT_LOW_WATER = 10_000
DEFAULT_HIGH_WATER_BYTES = 64 * 1024 * 1024
DEFAULT_LOW_WATER_BYTES = 32 * 1024 * 1024
# History rows that a hot store keeps in the engine's memory until the history store commits
# them (the embedded store does; Redis keeps them in Redis). Above the high mark the devices
# are slowed down too, so a slow history store cannot exhaust memory. At about 370 bytes per
# small row (an estimate), the default bounds that memory to roughly 75 MB.
DEFAULT_OUTBOX_HIGH_WATER = 200_000
DEFAULT_OUTBOX_LOW_WATER = 100_000
# Bytes counted per history row on top of its JSON: the time, names and version.
ROW_OVERHEAD_BYTES = 64
# Group commit by time: a batch smaller than BATCH_TARGET_ITEMS waits up to BATCH_DELAY
# seconds for more submissions before it is written. Each write costs a thread handoff and an
# fsync however small it is, so at moderate rates gathering a few milliseconds of updates cuts
# the cost per update, at the price of that much added acknowledgement latency.
BATCH_DELAY = 0.010
BATCH_TARGET_ITEMS = 500
# Shadow writes per write at most, so that draining a backlog after a stall goes in steps of
# bounded size: the engine's memory for encoding a batch stays small.
BATCH_MAX_ITEMS = 2_000
# Histogram buckets for the metrics: items per batch, and seconds per write.
BATCH_ITEMS_BUCKETS = (1, 10, 50, 100, 500, 1_000, 2_000, 5_000)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
# Retry delays after a store error, in seconds: doubled from the first to the last.
RETRY_FIRST_DELAY = 0.1
RETRY_MAX_DELAY = 10.0
# Seconds the history task waits for new outbox rows before it looks again.
HISTORY_IDLE_WAIT = 1.0
# Seconds the history task lets new outbox rows gather before it moves them. Nobody waits on
# the history store, and each move costs a transaction there however few its rows.
HISTORY_BATCH_DELAY = 0.25


class _Submission(NamedTuple):
    shadows: Sequence[ShadowWrite]
    rows: Sequence[HistoryRow]
    done: Callable[[], None]
    size: int  # bytes counted against the byte marks


class WriteBehind:
    def __init__(
        self,
        hot: HotStore,
        history: HistoryStore | None,
        on_pressure: Callable[[bool], None] | None = None,
        high_water: int = DEFAULT_HIGH_WATER,
        low_water: int = DEFAULT_LOW_WATER,
        high_water_bytes: int = DEFAULT_HIGH_WATER_BYTES,
        low_water_bytes: int = DEFAULT_LOW_WATER_BYTES,
        outbox_high_water: int = DEFAULT_OUTBOX_HIGH_WATER,
        outbox_low_water: int = DEFAULT_OUTBOX_LOW_WATER,
    ) -> None:
        self.hot = hot
        self.history = history
        self.on_pressure = on_pressure
        self.high_water = high_water
        self.low_water = low_water
        self.high_water_bytes = high_water_bytes
        self.low_water_bytes = low_water_bytes
        self.outbox_high_water = outbox_high_water
        self.outbox_low_water = outbox_low_water
        self._queue: deque[_Submission] = deque()
        self.pending = 0  # shadow writes submitted and not yet durable
        self.pending_bytes = 0  # their documents and history rows, in bytes
        self.pressure = False
        self._pressure_since = 0.0
        self._wakeup = asyncio.Event()
        self._history_wakeup = asyncio.Event()
        self._stopping = False
        self._writer: asyncio.Task[None] | None = None
        self._historian: asyncio.Task[None] | None = None
        # Figures for metrics and benchmarks.
        self.batches_written = 0
        self.items_written = 0
        self.last_batch_seconds = 0.0
        self.history_rows_written = 0  # to the outbox
        self.history_rows_committed = 0
        self.pressure_seconds = 0.0  # time spent above the high mark, finished periods only
        self.batch_items = Histogram(BATCH_ITEMS_BUCKETS)
        self.write_seconds = Histogram(LATENCY_BUCKETS)
        self.history_batch_rows = Histogram(BATCH_ITEMS_BUCKETS)
        self.history_write_seconds = Histogram(LATENCY_BUCKETS)

    def start(self) -> None:
        self._writer = asyncio.get_running_loop().create_task(self._write_loop())
        if self.history is not None:
            self._historian = asyncio.get_running_loop().create_task(self._history_loop())

    def paused_seconds(self) -> float:
        """Return the total time the pipeline has slowed the devices down, up to now."""
        if self.pressure:
            return self.pressure_seconds + time.monotonic() - self._pressure_since
        return self.pressure_seconds

    def submit(
        self,
        shadows: Sequence[ShadowWrite],
        rows: Sequence[HistoryRow],
        done: Callable[[], None],
    ) -> None:
        """Queue writes; ``done`` runs once they are durable."""
        size = sum(len(shadow.key) + len(shadow.document or b"") for shadow in shadows)
        for row in rows:
            size += ROW_OVERHEAD_BYTES + len(row.reported or b"") + len(row.desired or b"")
        self._queue.append(_Submission(shadows, rows, done, size))
        self.pending += len(shadows)
        self.pending_bytes += size
        if not self.pressure and (
            self.pending >= self.high_water
            or self.pending_bytes >= self.high_water_bytes
            or self.hot.outbox_rows_in_memory() >= self.outbox_high_water
        ):
            self.pressure = True
            self._pressure_since = time.monotonic()
            log.warning(
                "%d shadow writes (%d bytes) wait for the hot store and %d history rows for "
                "the history store; slowing devices down",
                self.pending,
                self.pending_bytes,
                self.hot.outbox_rows_in_memory(),
            )
            if self.on_pressure is not None:
                self.on_pressure(True)
        self._wakeup.set()

    def _release_pressure_if_caught_up(self) -> None:
        if (
            self.pressure
            and self.pending <= self.low_water
            and self.pending_bytes <= self.low_water_bytes
            and self.hot.outbox_rows_in_memory() <= self.outbox_low_water
        ):
            self.pressure = False
            self.pressure_seconds += time.monotonic() - self._pressure_since
            log.warning("the stores caught up (%d writes waiting); devices resume", self.pending)
            if self.on_pressure is not None:
                self.on_pressure(False)

    async def _write_loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if not self._stopping and self.pending < BATCH_TARGET_ITEMS:
                await asyncio.sleep(BATCH_DELAY)
            while self._queue:
                await self._write_batch()
            if self._stopping:
                return

    def _take_batch(self) -> list[_Submission]:
        """Take the oldest submissions, up to BATCH_MAX_ITEMS shadow writes (at least one)."""
        batch = [self._queue.popleft()]
        items = len(batch[0].shadows)
        while self._queue and items + len(self._queue[0].shadows) <= BATCH_MAX_ITEMS:
            submission = self._queue.popleft()
            items += len(submission.shadows)
            batch.append(submission)
        return batch

    async def _write_batch(self) -> None:
        batch = self._take_batch()
        shadows = [shadow for submission in batch for shadow in submission.shadows]
        rows = [row for submission in batch for row in submission.rows]

        started = time.monotonic()
        delay = RETRY_FIRST_DELAY
        while True:
            try:
                await self.hot.write(shadows, rows)
                break
            except Exception as exc:  # any store error is retried: nothing submitted is lost
                log.warning(
                    "writing %d shadows to the hot store failed: %s; retrying in %.1f s",
                    len(shadows),
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_DELAY)

        self.last_batch_seconds = time.monotonic() - started
        self.write_seconds.observe(self.last_batch_seconds)
        self.batch_items.observe(len(shadows))
        self.batches_written += 1
        self.items_written += len(shadows)
        self.history_rows_written += len(rows)
        self.pending -= len(shadows)
        self.pending_bytes -= sum(submission.size for submission in batch)
        for submission in batch:
            try:
                submission.done()
            except Exception:
                log.exception("a callback after a durable write failed")

        self._release_pressure_if_caught_up()
        if rows:
            self._history_wakeup.set()

    async def _history_loop(self) -> None:
        assert self.history is not None
        delay = RETRY_FIRST_DELAY
        while True:
            moved = 0
            try:
                async for batch in self.hot.pending_history():
                    positions = [position for position, _ in batch]
                    started = time.monotonic()
                    await self.history.write([row for _, row in batch])
                    self.history_write_seconds.observe(time.monotonic() - started)
                    self.history_batch_rows.observe(len(batch))
                    await self.hot.history_committed(positions)
                    self._release_pressure_if_caught_up()
                    moved += len(batch)
                    self.history_rows_committed += len(batch)
                delay = RETRY_FIRST_DELAY
            except Exception as exc:  # the rows stay in the outbox and are retried
                log.warning("moving history rows failed: %s; retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_DELAY)
                continue
            if self._stopping and not moved:
                return
            if not moved:
                self._history_wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._history_wakeup.wait(), HISTORY_IDLE_WAIT)
            if not self._stopping:
                await asyncio.sleep(HISTORY_BATCH_DELAY)

    async def stop(self) -> None:
        """Write what was submitted, move the outbox to the history store, and stop."""
        self._stopping = True
        self._wakeup.set()
        if self._writer is not None:
            await self._writer
        self._history_wakeup.set()
        if self._historian is not None:
            await self._historian
