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
from collections.abc import Callable, Sequence

from .base import HistoryRow, HistoryStore, HotStore, ShadowWrite

log = logging.getLogger("ironshadow.storage")

# Items (shadow writes) waiting for durability above which the devices are slowed down, and
# below which they may go on. For small shadow documents of a few hundred bytes, the default
# bounds what a slow store makes the engine hold to roughly 10 MB (an estimate, not measured).
DEFAULT_HIGH_WATER = 20_000
DEFAULT_LOW_WATER = 10_000
# Group commit by time: a batch smaller than BATCH_TARGET_ITEMS waits up to BATCH_DELAY
# seconds for more submissions before it is written. Each write costs a thread handoff and an
# fsync however small it is, so at moderate rates gathering a few milliseconds of updates cuts
# the cost per update, at the price of that much added acknowledgement latency.
BATCH_DELAY = 0.005
BATCH_TARGET_ITEMS = 500
# Retry delays after a store error, in seconds: doubled from the first to the last.
RETRY_FIRST_DELAY = 0.1
RETRY_MAX_DELAY = 10.0
# Seconds the history task waits for new outbox rows before it looks again.
HISTORY_IDLE_WAIT = 1.0


class WriteBehind:
    def __init__(
        self,
        hot: HotStore,
        history: HistoryStore | None,
        on_pressure: Callable[[bool], None] | None = None,
        high_water: int = DEFAULT_HIGH_WATER,
        low_water: int = DEFAULT_LOW_WATER,
    ) -> None:
        self.hot = hot
        self.history = history
        self.on_pressure = on_pressure
        self.high_water = high_water
        self.low_water = low_water
        self._shadows: list[ShadowWrite] = []
        self._rows: list[HistoryRow] = []
        self._callbacks: list[Callable[[], None]] = []
        self.pending = 0  # items submitted and not yet durable
        self.pressure = False
        self._wakeup = asyncio.Event()
        self._history_wakeup = asyncio.Event()
        self._stopping = False
        self._writer: asyncio.Task[None] | None = None
        self._historian: asyncio.Task[None] | None = None
        # Figures for metrics and benchmarks.
        self.batches_written = 0
        self.items_written = 0
        self.last_batch_seconds = 0.0
        self.history_rows_committed = 0

    def start(self) -> None:
        self._writer = asyncio.get_running_loop().create_task(self._write_loop())
        if self.history is not None:
            self._historian = asyncio.get_running_loop().create_task(self._history_loop())

    def submit(
        self,
        shadows: Sequence[ShadowWrite],
        rows: Sequence[HistoryRow],
        done: Callable[[], None],
    ) -> None:
        """Queue writes; ``done`` runs once they are durable."""
        self._shadows.extend(shadows)
        self._rows.extend(rows)
        self._callbacks.append(done)
        self.pending += len(shadows)
        if not self.pressure and self.pending >= self.high_water:
            self.pressure = True
            log.warning(
                "%d shadow writes wait for the hot store; slowing devices down", self.pending
            )
            if self.on_pressure is not None:
                self.on_pressure(True)
        self._wakeup.set()

    async def _write_loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if not self._stopping and len(self._shadows) < BATCH_TARGET_ITEMS:
                await asyncio.sleep(BATCH_DELAY)
            while self._callbacks:
                await self._write_batch()
            if self._stopping:
                return

    async def _write_batch(self) -> None:
        # Everything submitted since the last batch goes into this one; its size is bounded
        # by the high-water mark, past which devices are slowed down.
        shadows, self._shadows = self._shadows, []
        rows, self._rows = self._rows, []
        callbacks, self._callbacks = self._callbacks, []

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
        self.batches_written += 1
        self.items_written += len(shadows)
        self.pending -= len(shadows)
        for callback in callbacks:
            try:
                callback()
            except Exception:
                log.exception("a callback after a durable write failed")

        if self.pressure and self.pending <= self.low_water:
            self.pressure = False
            log.warning("hot store caught up (%d writes waiting); devices resume", self.pending)
            if self.on_pressure is not None:
                self.on_pressure(False)
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
                    await self.history.write([row for _, row in batch])
                    await self.hot.history_committed(positions)
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

    async def stop(self) -> None:
        """Write what was submitted, move the outbox to the history store, and stop."""
        self._stopping = True
        self._wakeup.set()
        if self._writer is not None:
            await self._writer
        self._history_wakeup.set()
        if self._historian is not None:
            await self._historian
