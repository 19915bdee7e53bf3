"""The engine: the embedded MQTT broker, the shadow service and their stores, wired together."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..broker.config import BrokerConfig
from ..broker.core import Broker
from ..shadow import ShadowLimits, shadow_key
from ..storage.base import DEFAULT_RETENTION_DAYS, HistoryStore, HotStore, StoreUnavailable
from ..storage.pipeline import WriteBehind
from .mqtt_state import MqttStateSaver
from .service import ShadowService

if TYPE_CHECKING:
    from ..storage.mqtt_state import MqttStateStore

__all__ = ["Engine", "ShadowService", "StorageConfig", "shadow_key"]

log = logging.getLogger("ironshadow.storage")

# Seconds between two runs of the history retention job.
RETENTION_INTERVAL = 3600.0
# Seconds between two sweeps for shadow tombstones past their retention time.
TOMBSTONE_SWEEP_INTERVAL = 600


@dataclass(frozen=True, slots=True)
class StorageConfig:
    """Storage locations for shadows and history.

    The defaults need nothing installed: a journal in ``data_dir`` for the shadows and a
    SQLite file beside it for the history. ``redis_url`` and ``postgres_dsn`` select the
    production stores instead.
    """

    data_dir: Path
    redis_url: str | None = None
    postgres_dsn: str | None = None
    retention_days: float = DEFAULT_RETENTION_DAYS
    # Keep retained messages and persistent sessions in ``data_dir`` even with ``redis_url``:
    # each worker of several keeps its own, because each would restore every saved one.
    mqtt_state_in_data_dir: bool = False


def open_hot_store(config: StorageConfig) -> HotStore:
    if config.redis_url:
        from ..storage.redis import RedisHotStore

        return RedisHotStore(config.redis_url)
    from ..storage.embedded import EmbeddedHotStore

    return EmbeddedHotStore(config.data_dir / "shadows")


def open_mqtt_state_store(config: StorageConfig) -> MqttStateStore:
    """Return the store for retained messages and persistent sessions, beside the hot store."""
    from ..storage.mqtt_state import (
        SQLITE_FILE_NAME,
        RedisMqttStateStore,
        SQLiteMqttStateStore,
    )

    if config.redis_url and not config.mqtt_state_in_data_dir:
        return RedisMqttStateStore(config.redis_url)
    return SQLiteMqttStateStore(config.data_dir / SQLITE_FILE_NAME)


def open_history_store(config: StorageConfig) -> HistoryStore:
    if config.postgres_dsn:
        from ..storage.postgres import PostgresHistoryStore

        return PostgresHistoryStore(config.postgres_dsn, retention_days=config.retention_days)
    from ..storage.sqlite import SQLiteHistoryStore

    return SQLiteHistoryStore(config.data_dir / "history.sqlite3", config.retention_days)


class Engine:
    """The broker and the shadow service; with a ``StorageConfig``, also their stores.

    Without one, shadows live in memory only, which the tests of the MQTT side use.
    """

    def __init__(
        self,
        broker_config: BrokerConfig | None = None,
        shadow_limits: ShadowLimits | None = None,
        storage: StorageConfig | None = None,
    ) -> None:
        self.broker = Broker(broker_config)
        self.storage = storage
        self.pipeline: WriteBehind | None = None
        self._hot: HotStore | None = None
        self._history: HistoryStore | None = None
        if storage is not None:
            self._hot = open_hot_store(storage)
            self._history = open_history_store(storage)
            self.pipeline = WriteBehind(self._hot, self._history, self._on_pressure)
        self.shadows = ShadowService(self.broker, shadow_limits, self.pipeline)
        self._mqtt_state: MqttStateSaver | None = None
        if storage is not None:
            self._mqtt_state = MqttStateSaver(self.broker, open_mqtt_state_store(storage))
        self._retention_task: asyncio.Task[None] | None = None
        self._tombstone_task: asyncio.Task[None] | None = None

    @property
    def history_store(self) -> HistoryStore | None:
        """The history store, or None when the engine keeps no history."""
        return self._history

    def _on_pressure(self, raised: bool) -> None:
        if raised:
            self.broker.pause_reading()
        else:
            self.broker.resume_reading()

    async def start(self) -> None:
        """Open the stores, load every shadow, retained message and persistent session, then
        open the MQTT listener."""
        await self.open()
        await self.serve()

    async def open(self) -> None:
        """Open the stores and load every shadow, retained message and persistent session.

        A cluster worker calls this before it links to its peers, so that no request of theirs
        reaches a shadow that is not loaded yet, and :meth:`serve` once it is linked.
        """
        if self.pipeline is not None:
            assert self._hot is not None and self._history is not None
            await self._hot.open()
            try:
                await self._history.open()
            except BaseException:
                await self._hot.close()
                raise
            started = time.monotonic()
            count = await self.shadows.load()
            log.info("loaded %d shadows in %.1f s", count, time.monotonic() - started)
            self.pipeline.start()
            self._retention_task = asyncio.get_running_loop().create_task(self._retention_loop())
        if self._mqtt_state is not None:
            try:
                await self._mqtt_state.start()
            except BaseException:
                await self._close_stores()
                raise

    async def serve(self) -> None:
        """Open the MQTT listener, after :meth:`open`."""
        try:
            await self.broker.start()
        except BaseException:
            await self._close_stores()
            raise
        self._tombstone_task = asyncio.get_running_loop().create_task(self._tombstone_loop())

    async def _tombstone_loop(self) -> None:
        while True:
            expired = self.shadows.expire_tombstones(time.time())
            if expired:
                log.info("forgot %d shadows deleted more than 48 hours ago", expired)
            await asyncio.sleep(TOMBSTONE_SWEEP_INTERVAL)

    async def _retention_loop(self) -> None:
        assert self._history is not None
        while True:
            try:
                await self._history.enforce_retention(time.time())
            except Exception as exc:  # logged and retried at the next interval
                log.warning(
                    "history retention failed: %s; retrying in %.0f s", exc, RETENTION_INTERVAL
                )
            await asyncio.sleep(RETENTION_INTERVAL)

    async def readiness_problems(self) -> list[str]:
        """Return what keeps the engine from serving: closed listeners, unreachable stores."""
        problems = []
        if not self.broker.listening():
            problems.append("the MQTT listener is not open")
        stores: list[tuple[str, HotStore | HistoryStore | None]] = [
            ("hot store", self._hot),
            ("history store", self._history),
        ]
        for name, store in stores:
            if store is None:
                continue
            try:
                await store.check()
            except StoreUnavailable as exc:
                problems.append(f"{name}: {exc}")
        return problems

    async def shutdown(self) -> None:
        """Stop the broker, write what is pending, and close the stores."""
        if self._tombstone_task is not None:
            self._tombstone_task.cancel()
            self._tombstone_task = None
        await self.broker.shutdown()
        await self._close_stores()

    async def _close_stores(self) -> None:
        if self._mqtt_state is not None:
            await self._mqtt_state.stop()
        if self._retention_task is not None:
            self._retention_task.cancel()
            self._retention_task = None
        if self.pipeline is not None:
            assert self._hot is not None and self._history is not None
            await self.pipeline.stop()
            await self._history.close()
            await self._hot.close()
