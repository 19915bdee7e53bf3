"""The worker count recorded in the data folder, and moving the stores to another count."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from ironshadow.cluster import WorkerCountError, owner_of, record_worker_count, worker_data_dir
from ironshadow.cluster.datadir import recorded_workers
from ironshadow.cluster.reshard import COMPLETE_NAME, STAGING_NAME, folders, prepare_data_dir
from ironshadow.storage.base import HistoryRow, ShadowWrite
from ironshadow.storage.embedded import EmbeddedHotStore
from ironshadow.storage.mqtt_state import SQLiteMqttStateStore
from ironshadow.storage.sqlite import SQLiteHistoryStore


def test_record_then_same_count_passes(tmp_path: Path) -> None:
    record_worker_count(tmp_path, 3)
    assert recorded_workers(tmp_path) == 3
    assert prepare_data_dir(tmp_path, 3) is None
    assert recorded_workers(tmp_path) == 3


def test_invalid_record_is_reported(tmp_path: Path) -> None:
    (tmp_path / "workers.json").write_text('{"workers": "three"}')
    with pytest.raises(WorkerCountError, match="does not contain a worker count"):
        prepare_data_dir(tmp_path, 3)
    (tmp_path / "workers.json").write_text("not json")
    with pytest.raises(WorkerCountError, match="cannot read"):
        prepare_data_dir(tmp_path, 3)


def test_worker_folders_are_apart(tmp_path: Path) -> None:
    folders = {worker_data_dir(tmp_path, index) for index in range(4)}
    assert len(folders) == 4
    assert all(folder.parent == tmp_path for folder in folders)


# --- moving the stores ------------------------------------------------------------------

THINGS = [f"press-{number}" for number in range(40)]
# A named shadow's key is the thing name, "~", then the shadow name.
KEYS = [*THINGS, "press-3~tooling", "press-17~tooling"]
CLIENTS = [f"plc-{number}" for number in range(20)]
RETAINED = {f"plant/line{number}/mode": b"retained-%d" % number for number in range(5)}


def document(key: str) -> bytes:
    return b'{"state":{"reported":{"key":"%s"}},"version":1}' % key.encode()


def history_row(thing: str, version: int) -> HistoryRow:
    return HistoryRow(1_700_000_000.0 + version, thing, "", version, b'{"a":1}', None)


async def fill_single_process(data_dir: Path) -> None:
    """Write shadows, outbox rows, history rows, sessions and retained messages through
    the engine's own stores, as a single-process engine leaves them."""
    hot = EmbeddedHotStore(data_dir / "shadows")
    await hot.open()
    await hot.write([ShadowWrite(key, document(key)) for key in KEYS], [])
    # Rows still in the outbox, not yet in the history file.
    await hot.write([], [history_row(thing, 2) for thing in THINGS])
    await hot.close()
    history = SQLiteHistoryStore(data_dir / "history.sqlite3")
    await history.open()
    await history.write([history_row(thing, 1) for thing in THINGS])
    await history.close()
    state = SQLiteMqttStateStore(data_dir / "mqtt-state.sqlite3")
    await state.open()
    await state.write(RETAINED, {client: b"session-" + client.encode() for client in CLIENTS})
    await state.close()


async def read_folder(folder: Path) -> dict[str, object]:
    """Return what the engine would load from one worker folder."""
    hot = EmbeddedHotStore(folder / "shadows")
    await hot.open()
    shadows = {}
    async for batch in hot.load_shadows():
        shadows.update(batch)
    outbox = []
    async for pending in hot.pending_history():
        outbox.extend((row.thing, row.version) for _key, row in pending)
    await hot.close()
    connection = sqlite3.connect(folder / "history.sqlite3")
    try:
        history = connection.execute("SELECT thing, version FROM shadow_updates").fetchall()
    finally:
        connection.close()
    state = SQLiteMqttStateStore(folder / "mqtt-state.sqlite3")
    await state.open()
    stored = await state.load()
    await state.close()
    return {
        "shadows": shadows,
        "outbox": sorted(outbox),
        "history": sorted(history),
        "retained": stored.retained,
        "sessions": stored.sessions,
    }


def check_layout(data_dir: Path, workers: int) -> None:
    """Check that each record is in the folder of its owner among ``workers``, and that
    nothing was lost or added."""
    contents = [asyncio.run(read_folder(folder)) for folder in folders(data_dir, workers)]
    for index, found in enumerate(contents):
        assert set(found["shadows"]) == {
            key for key in KEYS if owner_of(key.split("~")[0], workers) == index
        }
        assert all(found["shadows"][key] == document(key) for key in found["shadows"])
        owned = sorted(thing for thing in THINGS if owner_of(thing, workers) == index)
        assert found["outbox"] == [(thing, 2) for thing in owned]
        assert found["history"] == [(thing, 1) for thing in owned]
        assert set(found["sessions"]) == {
            client for client in CLIENTS if owner_of(client, workers) == index
        }
        assert found["retained"] == RETAINED
    assert recorded_workers(data_dir) == (workers if workers > 1 else None)
    assert not (data_dir / STAGING_NAME).exists()


def test_stores_move_between_worker_counts(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "users.json").write_text("{}")  # not a store: stays where it is
    asyncio.run(fill_single_process(data_dir))
    for previous, workers in ((1, 3), (3, 2), (2, 4), (4, 1)):
        assert prepare_data_dir(data_dir, workers) == previous
        check_layout(data_dir, workers)
    assert sorted(path.name for path in data_dir.iterdir()) == [
        "history.sqlite3",
        "mqtt-state.sqlite3",
        "shadows",
        "users.json",
    ]


def test_unfinished_copy_is_discarded(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    asyncio.run(fill_single_process(data_dir))
    # A copy that stopped before complete.json was written: the old folders are whole.
    (data_dir / STAGING_NAME / "worker-0").mkdir(parents=True)
    (data_dir / STAGING_NAME / "worker-0" / "junk").write_text("half a copy")
    assert prepare_data_dir(data_dir, 2) == 1
    check_layout(data_dir, 2)


def test_interrupted_switch_is_finished(tmp_path: Path, monkeypatch) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    asyncio.run(fill_single_process(data_dir))
    prepare_data_dir(data_dir, 3)
    # Stop the switch to 2 workers after its first rename, as a kill would.
    from ironshadow.cluster import reshard

    renames = 0
    real_rename = reshard._rename

    def rename_once(source: Path, target: Path) -> None:
        nonlocal renames
        renames += 1
        if renames > 1:
            raise KeyboardInterrupt
        real_rename(source, target)

    monkeypatch.setattr(reshard, "_rename", rename_once)
    with pytest.raises(KeyboardInterrupt):
        prepare_data_dir(data_dir, 2)
    assert (data_dir / STAGING_NAME / COMPLETE_NAME).exists()
    monkeypatch.setattr(reshard, "_rename", real_rename)
    assert prepare_data_dir(data_dir, 2) is None
    check_layout(data_dir, 2)
