"""Keeps the broker's retained messages and persistent sessions in an MQTT state store.

On start the saver loads the store into the broker, before the MQTT listener opens. Then it
writes what changed every ``SAVE_INTERVAL`` seconds, in one write (write-behind with
coalescing, see :mod:`ironshadow.broker.persistence`), and once more at shutdown, after the
broker has closed its connections and before the store closes.

Durability. Unlike a shadow update, which is durable before its PUBACK, an MQTT state change
is saved up to ``SAVE_INTERVAL`` later, so a crash or ``kill -9`` loses about the last 100 ms
of changes, or more when the store is slow or unreachable. A message queued in that time may
be missing after the restart, and one acknowledged in that time may be delivered again. A
retained message or a subscription set in that time may be missing too. The trade-off is
deliberate. Session state changes on every delivery and acknowledgement, and a durable write
before each of them would cost a store write per message. A graceful stop (SIGTERM, Ctrl-C)
loses nothing unless the store fails then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

from ..broker.persistence import StatePersistence

if TYPE_CHECKING:
    from ..broker.core import Broker
    from ..storage.mqtt_state import MqttStateStore

log = logging.getLogger("ironshadow.storage")

# Seconds between two saves. Changes within one interval cost one write together, and a
# crash loses about this much of the latest changes while the store keeps up.
SAVE_INTERVAL = 0.1
# Bytes of serialized entries in one write, exceeded by at most one entry. A backlog (a burst
# of changes to sessions with long queues, or a store that was down) is written in steps of
# this size, so one write never blocks the event loop or occupies the store for long. The rest
# waits for the next interval.
MAX_SAVE_BYTES = 4 * 1024 * 1024
# Seconds to wait after a failed write, doubling after each failure up to the maximum.
RETRY_MIN_SECONDS = 0.1
RETRY_MAX_SECONDS = 10.0
# Writes tried at shutdown before the rest of the changes are given up.
SHUTDOWN_ATTEMPTS = 3


class MqttStateSaver:
    """Loads, saves and finally flushes the MQTT state of one broker."""

    def __init__(self, broker: Broker, store: MqttStateStore) -> None:
        self.broker = broker
        self.store = store
        self.persistence = StatePersistence(broker)
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._retry_delay = RETRY_MIN_SECONDS

    async def start(self) -> None:
        """Open the store, put its state into the broker, and start saving changes."""
        started = time.monotonic()
        await self.store.open()
        try:
            stored = await self.store.load()
            report = self.persistence.restore(stored.retained, stored.sessions)
        except BaseException:
            await self.store.close()
            raise
        log.info(
            "restored %d retained messages and %d MQTT sessions in %.1f s; dropped %d expired "
            "retained messages, %d expired sessions and %d queued messages over the queue "
            "limit; skipped %d entries that could not be decoded",
            report.retained,
            report.sessions,
            time.monotonic() - started,
            report.expired_retained,
            report.expired_sessions,
            report.queue_dropped,
            report.undecodable,
        )
        self._stopping.clear()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        delay = SAVE_INTERVAL
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            if self._stopping.is_set():
                return
            try:
                await self.save()
            except Exception as exc:  # logged, and the changes are retried
                log.warning(
                    "saving the MQTT state failed: %s; %d changes wait, retrying in %.1f s",
                    exc,
                    self.persistence.pending,
                    self._retry_delay,
                )
                delay = self._retry_delay
                self._retry_delay = min(self._retry_delay * 2, RETRY_MAX_SECONDS)
                continue
            if self._retry_delay > RETRY_MIN_SECONDS:
                log.info("saving the MQTT state succeeded again after failures")
            self._retry_delay = RETRY_MIN_SECONDS
            delay = SAVE_INTERVAL

    async def save(self) -> None:
        """Write one batch of the changes, if there are any."""
        batch = self.persistence.collect(MAX_SAVE_BYTES)
        if not batch:
            return
        try:
            await self.store.write(batch.retained, batch.sessions)
        except BaseException:
            self.persistence.save_failed(batch)
            raise
        self.persistence.saved(batch)

    async def stop(self) -> None:
        """Stop the periodic saves, write every change left, and close the store.

        Call it after the broker has shut down, so that the sessions of the clients it
        disconnected are saved offline with their expiry time.
        """
        self._stopping.set()
        task, self._task = self._task, None
        if task is None:
            return  # never started, and start() closes the store when it fails
        await task
        try:
            await self._flush()
        finally:
            await self.store.close()

    async def _flush(self) -> None:
        failures = 0
        while self.persistence.pending:
            try:
                await self.save()
            except Exception as exc:  # logged; shutdown goes on
                failures += 1
                if failures >= SHUTDOWN_ATTEMPTS:
                    log.error(
                        "saving the MQTT state at shutdown failed %d times, last with: %s; "
                        "%d changes to retained messages and sessions are lost",
                        failures,
                        exc,
                        self.persistence.pending,
                    )
                    return
                await asyncio.sleep(RETRY_MIN_SECONDS * failures)
