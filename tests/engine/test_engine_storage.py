"""Shadows and history kept by the engine's stores: restart, crash and backpressure."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time

import orjson
import pytest

from conftest import BrokerThread, free_port, scaled
from ironshadow.broker.config import BrokerConfig
from ironshadow.engine import Engine, StorageConfig
from ironshadow.storage.base import HistoryRow, ShadowWrite
from ironshadow.storage.embedded import EmbeddedHotStore
from ironshadow.storage.pipeline import WriteBehind
from ironshadow.storage.sqlite import SQLiteHistoryStore
from mqtt_client import V311, TestClient

PREFIX = "$aws/things/kiln-3/shadow"


def start_engine(data_dir) -> BrokerThread:
    config = BrokerConfig(port=free_port(), sys_interval=0)
    thread = BrokerThread(config, Engine(config, storage=StorageConfig(data_dir)))
    thread.start()
    return thread


def report(client: TestClient, **values: object) -> None:
    client.publish(PREFIX + "/update", orjson.dumps({"state": {"reported": values}}), 1)


def test_shadows_survive_restart(tmp_path):
    engine = start_engine(tmp_path)
    try:
        device = TestClient(engine.port, "kiln-3", V311)
        report(device, temperature=870, door="closed")
        report(device, temperature=905)
        device.disconnect()
    finally:
        engine.stop()
    engine = start_engine(tmp_path)
    try:
        shadow = engine.call(engine.server.shadows.shadows.get, "kiln-3")
        assert shadow is not None
        assert shadow.version == 2
        assert shadow.state() == {"reported": {"temperature": 905, "door": "closed"}}
    finally:
        engine.stop()
    history = sqlite3.connect(tmp_path / "history.sqlite3")
    rows = history.execute(
        "SELECT version, reported FROM shadow_updates WHERE thing = 'kiln-3' ORDER BY version"
    ).fetchall()
    assert [row[0] for row in rows] == [1, 2]
    assert orjson.loads(rows[1][1]) == {"temperature": 905}
    values = history.execute(
        "SELECT field, value FROM shadow_values WHERE thing = 'kiln-3' ORDER BY time, field"
    ).fetchall()
    assert ("temperature", 905.0) in values


def test_acknowledged_updates_survive_kill(tmp_path):
    mqtt_port = free_port()
    command = [
        # One process, so that SIGKILL of its PID is a crash of the whole engine.
        sys.executable, "-m", "ironshadow", "serve", "--workers", "1",
        "--data-dir", str(tmp_path),
        "--mqtt-port", str(mqtt_port), "--http-port", str(free_port()),
    ]
    engine = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + scaled(15)
        while True:
            try:
                socket.create_connection(("127.0.0.1", mqtt_port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the engine did not start"
                time.sleep(0.05)
        device = TestClient(mqtt_port, "kiln-3", V311)
        acknowledged = 0
        for sequence in range(1, 201):
            info = device.client.publish(
                PREFIX + "/update", orjson.dumps({"state": {"reported": {"seq": sequence}}}), 1
            )
            info.wait_for_publish(scaled(10))
            if info.is_published():
                acknowledged = sequence
        device.drop()
    finally:
        os.kill(engine.pid, signal.SIGKILL)
        engine.wait()
    assert acknowledged == 200

    restarted = start_engine(tmp_path)
    try:
        shadow = restarted.call(restarted.server.shadows.shadows.get, "kiln-3")
        assert shadow is not None
        assert shadow.state()["reported"]["seq"] >= acknowledged
        # The outbox moves every acknowledged update into the history store after restart.
        deadline = time.monotonic() + scaled(10)
        while True:
            history = sqlite3.connect(tmp_path / "history.sqlite3")
            count = history.execute(
                "SELECT count(DISTINCT version) FROM shadow_updates WHERE thing = 'kiln-3'"
            ).fetchone()[0]
            history.close()
            if count >= acknowledged or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert count >= acknowledged
    finally:
        restarted.stop()


def test_tombstone_expires_after_48_hours(tmp_path):
    """A deleted shadow keeps its version across a restart; 48 hours after the delete it is
    forgotten, in memory and in the store, and the next update starts at version 1."""
    engine = start_engine(tmp_path)
    try:
        device = TestClient(engine.port, "kiln-3", V311)
        report(device, temperature=870)
        report(device, temperature=905)
        device.publish(PREFIX + "/delete", b"", 1)
        device.disconnect()
    finally:
        engine.stop()

    engine = start_engine(tmp_path)
    try:
        service = engine.server.shadows
        deleted_at = engine.call(lambda: service.tombstones.get("kiln-3"))
        assert deleted_at is not None and abs(deleted_at - time.time()) < 60
        assert engine.call(service.expire_tombstones, deleted_at + 47 * 3600) == 0
        assert engine.call(service.expire_tombstones, deleted_at + 48 * 3600) == 1
        assert engine.call(lambda: "kiln-3" in service.shadows) is False
    finally:
        engine.stop()

    engine = start_engine(tmp_path)
    try:
        assert engine.call(lambda: "kiln-3" in engine.server.shadows.shadows) is False
        device = TestClient(engine.port, "kiln-3", V311)
        report(device, temperature=20)
        device.disconnect()
        shadow = engine.call(engine.server.shadows.shadows.get, "kiln-3")
        assert shadow is not None and shadow.version == 1
    finally:
        engine.stop()


class GatedStore(EmbeddedHotStore):
    """An embedded store whose writes wait until the test opens the gate."""

    def __init__(self, path) -> None:
        super().__init__(path)
        self.gate = asyncio.Event()

    async def write(self, shadows, history) -> None:
        await self.gate.wait()
        await super().write(shadows, history)


def test_slow_store_raises_and_clears_pressure(tmp_path):
    async def scenario() -> list[object]:
        store = GatedStore(tmp_path / "shadows")
        await store.open()
        events: list[object] = []
        pipeline = WriteBehind(store, None, events.append, high_water=10, low_water=5)
        pipeline.start()
        done: list[int] = []
        for number in range(12):
            write = ShadowWrite(f"thing-{number}", b'{"version": 1}')
            row = HistoryRow(1.0, f"thing-{number}", "", 1, b"{}", None)
            pipeline.submit([write], [row], lambda number=number: done.append(number))
        await asyncio.sleep(0.05)
        events.append(("durable before the gate opens", len(done)))
        store.gate.set()
        await pipeline.stop()
        events.append(("durable after", sorted(done)))
        await store.close()
        return events

    events = asyncio.run(scenario())
    assert events[0] is True
    assert events[1] == ("durable before the gate opens", 0)
    assert events[2] is False
    assert events[3] == ("durable after", list(range(12)))


class RecordingStore(GatedStore):
    """A gated store that records the number of shadows in each write."""

    def __init__(self, path) -> None:
        super().__init__(path)
        self.batch_sizes: list[int] = []

    async def write(self, shadows, history) -> None:
        await super().write(shadows, history)
        self.batch_sizes.append(len(shadows))


def test_large_documents_raise_pressure_by_bytes(tmp_path):
    """Few writes of large documents pass the byte mark long before the item mark."""

    async def scenario() -> tuple[list[object], int, float]:
        store = RecordingStore(tmp_path / "shadows")
        await store.open()
        events: list[object] = []
        pipeline = WriteBehind(
            store, None, events.append, high_water_bytes=100_000, low_water_bytes=50_000
        )
        pipeline.start()
        document = b'{"state": {"reported": {"blob": "' + b"x" * 20_000 + b'"}}}'
        for number in range(6):
            pipeline.submit([ShadowWrite(f"camera-{number}", document)], [], lambda: None)
            events.append(pipeline.pressure)
        await asyncio.sleep(0.05)
        paused = pipeline.paused_seconds()
        store.gate.set()
        await pipeline.stop()
        await store.close()
        return events, pipeline.pending_bytes, paused

    events, pending_bytes, paused = asyncio.run(scenario())
    # The fifth document passes 100,000 bytes: on_pressure(True) is called, pressure stays
    # raised for the sixth, and on_pressure(False) comes once the writes are durable.
    assert events == [False, False, False, False, True, True, True, False]
    assert pending_bytes == 0
    assert paused >= 0.05


def test_backlog_drains_in_bounded_batches(tmp_path):
    """After a stall the backlog is written in batches of at most BATCH_MAX_ITEMS, whole
    submissions each, and the metrics count every batch."""

    async def scenario() -> tuple[list[int], list[int], WriteBehind]:
        store = RecordingStore(tmp_path / "shadows")
        await store.open()
        pipeline = WriteBehind(store, None)
        pipeline.start()
        done: list[int] = []
        for number in range(9):  # 9 submissions of 700 writes: 6,300 in all
            writes = [ShadowWrite(f"m-{number}-{i}", b"{}") for i in range(700)]
            pipeline.submit(writes, [], lambda number=number: done.append(number))
        store.gate.set()
        await pipeline.stop()
        await store.close()
        return store.batch_sizes, done, pipeline

    sizes, done, pipeline = asyncio.run(scenario())
    assert sizes == [1400, 1400, 1400, 1400, 700]
    assert done == list(range(9))
    assert pipeline.batch_items.count == 5
    assert pipeline.batch_items.sum == 6300
    assert pipeline.write_seconds.count == 5


class GatedHistory(SQLiteHistoryStore):
    """A SQLite history store whose writes wait until the test opens the gate."""

    def __init__(self, path) -> None:
        super().__init__(path)
        self.gate = asyncio.Event()

    async def write(self, rows) -> None:
        await self.gate.wait()
        await super().write(rows)


def test_history_backlog_raises_pressure(tmp_path):
    """A stuck history store fills the journal's outbox in memory: past its high mark the
    devices are slowed down, and once the history store moves the rows they go on."""

    async def scenario() -> tuple[list[object], int]:
        store = EmbeddedHotStore(tmp_path / "shadows")
        history = GatedHistory(tmp_path / "history.sqlite3")
        await store.open()
        await history.open()
        events: list[object] = []
        pipeline = WriteBehind(
            store, history, events.append, outbox_high_water=50, outbox_low_water=20
        )
        pipeline.start()
        for number in range(60):
            write = ShadowWrite(f"drill-{number}", b'{"version": 1}')
            row = HistoryRow(1.0, f"drill-{number}", "", 1, b'{"depth": 1}', None)
            pipeline.submit([write], [row], lambda: None)
            await asyncio.sleep(0.005)
        deadline = time.monotonic() + scaled(10)
        while store.outbox_rows_in_memory() < 60 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        events.append(("outbox rows before the gate opens", store.outbox_rows_in_memory()))
        history.gate.set()
        await pipeline.stop()
        left = store.outbox_rows_in_memory()
        await history.close()
        await store.close()
        return events, left

    events, left = asyncio.run(scenario())
    assert events[0] is True
    assert events[1] == ("outbox rows before the gate opens", 60)
    assert events[2] is False
    assert len(events) == 3
    assert left == 0


@pytest.mark.parametrize("rest", [False, True])
def test_replies_follow_durable_write(tmp_path, rest):
    engine = start_engine(tmp_path)
    try:
        app = TestClient(engine.port, "dashboard")
        app.subscribe(PREFIX + "/update/accepted", 1)
        service = engine.server.shadows
        if rest:
            payload = b'{"state": {"desired": {"temperature": 900}}}'
            reply = asyncio.run_coroutine_threadsafe(
                service.http_request("update", "kiln-3", None, payload), engine.loop
            ).result(scaled(10))
            assert reply.status == 200
        else:
            app.publish(PREFIX + "/update", b'{"state": {"desired": {"temperature": 900}}}', 1)
            app.expect()
        written = engine.call(lambda: service.pipeline.items_written)
        assert written == 1
    finally:
        engine.stop()
