"""The embedded hot store: round trips, restarts, torn tails, compaction and a real kill -9."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from ironshadow.storage.base import HistoryRow, ShadowWrite, StoreUnavailable
from ironshadow.storage.embedded import HISTORY_BATCH_SIZE, LOAD_BATCH_SIZE, EmbeddedHotStore

HERE = Path(__file__).parent


def doc(**fields: Any) -> bytes:
    return orjson.dumps(fields)


def row(version: int, thing: str = "dev", name: str = "") -> HistoryRow:
    return HistoryRow(1000.0 + version, thing, name, version, doc(v=version), None)


def with_store(
    data_dir: Path, body: Callable[[EmbeddedHotStore], Awaitable[Any]], **options: Any
) -> Any:
    """Open a store, run ``body`` on it, close it, all in a fresh event loop."""

    async def run() -> Any:
        store = EmbeddedHotStore(data_dir, **options)
        await store.open()
        try:
            return await body(store)
        finally:
            await store.close()

    return asyncio.run(run())


async def shadows_of(store: EmbeddedHotStore) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    async for batch in store.load_shadows():
        found.update(batch)
    return found


async def pending_of(store: EmbeddedHotStore) -> list[tuple[str, HistoryRow]]:
    found = []
    async for batch in store.pending_history():
        found.extend(batch)
    return found


def reopen(data_dir: Path) -> tuple[dict[str, bytes], list[tuple[str, HistoryRow]]]:
    async def read(store: EmbeddedHotStore) -> Any:
        return await shadows_of(store), await pending_of(store)

    return with_store(data_dir, read)


def journal_files(data_dir: Path) -> list[Path]:
    return sorted(data_dir.glob("journal-*.isj"))


def test_embedded_round_trip(tmp_path):
    async def body(store: EmbeddedHotStore) -> None:
        await store.write(
            [ShadowWrite("a", doc(n=1)), ShadowWrite("b~config", doc(n=2))],
            [row(1), HistoryRow(5.5, "b", "config", 7, None, b'{"mode":"eco"}')],
        )
        await store.write([ShadowWrite("a", doc(n=3)), ShadowWrite("b~config", None)], [])
        await store.write([], [])
        assert await shadows_of(store) == {"a": doc(n=3)}
        pending = await pending_of(store)
        assert [found for _, found in pending] == [
            row(1),
            HistoryRow(5.5, "b", "config", 7, None, b'{"mode":"eco"}'),
        ]

    with_store(tmp_path / "data", body)


def test_embedded_restart_keeps_state(tmp_path):
    data = tmp_path / "data"

    async def body(store: EmbeddedHotStore) -> None:
        await store.write([ShadowWrite("a", doc(n=1)), ShadowWrite("b", doc(n=1))], [row(1)])
        await store.write([ShadowWrite("a", doc(n=2)), ShadowWrite("b", None)], [row(2)])

    with_store(data, body)
    shadows, pending = reopen(data)
    assert shadows == {"a": doc(n=2)}
    assert [found.version for _, found in pending] == [1, 2]


def test_embedded_committed_rows_stay_gone(tmp_path):
    data = tmp_path / "data"

    async def body(store: EmbeddedHotStore) -> list[str]:
        await store.write([], [row(1), row(2), row(3), row(4)])
        positions = [position for position, _ in await pending_of(store)]
        await store.history_committed([positions[0], positions[2]])
        await store.history_committed([positions[0]])  # committing twice is harmless
        assert [found.version for _, found in await pending_of(store)] == [2, 4]
        return positions

    first_positions = with_store(data, body)
    _, pending = reopen(data)
    assert [found.version for _, found in pending] == [2, 4]

    async def write_more(store: EmbeddedHotStore) -> list[str]:
        await store.write([], [row(5)])
        return [position for position, _ in await pending_of(store)]

    positions = with_store(data, write_more)
    assert int(positions[-1]) > max(int(position) for position in first_positions)


def test_embedded_commit_rejects_bad_position(tmp_path):
    async def body(store: EmbeddedHotStore) -> None:
        with pytest.raises(ValueError, match="'abc'"):
            await store.history_committed(["abc"])

    with_store(tmp_path / "data", body)


def test_embedded_history_batches_bounded_and_ordered(tmp_path):
    count = HISTORY_BATCH_SIZE * 2 + 5

    async def body(store: EmbeddedHotStore) -> None:
        await store.write([], [row(version) for version in range(count)])
        batches = [batch async for batch in store.pending_history()]
        assert [len(batch) for batch in batches] == [HISTORY_BATCH_SIZE, HISTORY_BATCH_SIZE, 5]
        versions = [entry.version for batch in batches for _, entry in batch]
        assert versions == list(range(count))

    with_store(tmp_path / "data", body)


def test_embedded_load_batches_bounded(tmp_path):
    count = LOAD_BATCH_SIZE * 2 + 5

    async def body(store: EmbeddedHotStore) -> None:
        await store.write([ShadowWrite(f"k{i}", doc(i=i)) for i in range(count)], [])
        sizes = [len(batch) async for batch in store.load_shadows()]
        assert sum(sizes) == count
        assert max(sizes) == LOAD_BATCH_SIZE

    with_store(tmp_path / "data", body)


def test_embedded_concurrent_writes_keep_order(tmp_path):
    async def body(store: EmbeddedHotStore) -> None:
        writes = [store.write([ShadowWrite("k", doc(i=i))], [row(i)]) for i in range(50)]
        await asyncio.gather(*writes)
        assert await shadows_of(store) == {"k": doc(i=49)}
        assert [found.version for _, found in await pending_of(store)] == list(range(50))

    with_store(tmp_path / "data", body)


def test_embedded_cancelled_write_keeps_order(tmp_path):
    data = tmp_path / "data"

    async def body(store: EmbeddedHotStore) -> None:
        first = asyncio.ensure_future(store.write([ShadowWrite("k", doc(i=1))], []))
        await asyncio.sleep(0)  # let the write reach the worker thread
        first.cancel()
        await store.write([ShadowWrite("k", doc(i=2))], [])
        assert await shadows_of(store) == {"k": doc(i=2)}

    with_store(data, body)
    shadows, _ = reopen(data)
    assert shadows == {"k": doc(i=2)}


def test_embedded_second_open_rejected(tmp_path):
    data = tmp_path / "data"

    async def body(store: EmbeddedHotStore) -> None:
        other = EmbeddedHotStore(data)
        with pytest.raises(StoreUnavailable, match="in use by another process"):
            await other.open()

    with_store(data, body)


def write_three_batches(data: Path) -> Path:
    async def body(store: EmbeddedHotStore) -> None:
        for i in (1, 2, 3):
            await store.write([ShadowWrite(f"k{i}", doc(i=i))], [row(i)])

    with_store(data, body)
    [journal] = journal_files(data)
    return journal


def last_record_size(data: Path) -> int:
    """Size of the third batch's record: measured by writing it alone into a fresh store."""

    async def body(store: EmbeddedHotStore) -> int:
        [journal] = journal_files(store.data_dir)
        before = journal.stat().st_size
        await store.write([ShadowWrite("k3", doc(i=3))], [row(3)])
        return journal.stat().st_size - before

    return with_store(data, body)


@pytest.mark.parametrize("cut", [1, 5, "frame"])
def test_embedded_torn_tail_cut(tmp_path, cut):
    data = tmp_path / "data"
    journal = write_three_batches(data)
    record = last_record_size(tmp_path / "measure")
    size = journal.stat().st_size
    # Cut inside the payload, or inside the 8-byte frame header of the last record.
    keep = size - record + 3 if cut == "frame" else size - cut
    os.truncate(journal, keep)

    shadows, pending = reopen(data)
    assert shadows == {"k1": doc(i=1), "k2": doc(i=2)}
    assert [found.version for _, found in pending] == [1, 2]
    assert journal.stat().st_size == size - record

    # New writes follow the last good record, so they survive the next restart.
    def write_fourth(store: EmbeddedHotStore) -> Awaitable[None]:
        return store.write([ShadowWrite("k4", doc(i=4))], [row(4)])

    with_store(data, write_fourth)
    shadows, pending = reopen(data)
    assert shadows == {"k1": doc(i=1), "k2": doc(i=2), "k4": doc(i=4)}
    assert [found.version for _, found in pending] == [1, 2, 4]


@pytest.mark.parametrize("from_end", [1, 20])
def test_embedded_flipped_byte_cut(tmp_path, from_end):
    data = tmp_path / "data"
    journal = write_three_batches(data)
    content = bytearray(journal.read_bytes())
    content[-from_end] ^= 0x40
    journal.write_bytes(bytes(content))

    shadows, pending = reopen(data)
    assert shadows == {"k1": doc(i=1), "k2": doc(i=2)}
    assert [found.version for _, found in pending] == [1, 2]


def test_embedded_torn_journal_header(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "journal-00000001.isj").write_bytes(b"ISH")
    shadows, pending = reopen(data)
    assert shadows == {}
    assert pending == []

    def write_one(store: EmbeddedHotStore) -> Awaitable[None]:
        return store.write([ShadowWrite("k", doc(i=1))], [])

    with_store(data, write_one)
    shadows, _ = reopen(data)
    assert shadows == {"k": doc(i=1)}


def test_embedded_compaction_keeps_everything(tmp_path):
    data = tmp_path / "data"

    async def body(store: EmbeddedHotStore) -> list[str]:
        await store.write(
            [ShadowWrite("a", doc(n=1)), ShadowWrite("b", doc(n=1)), ShadowWrite("c", doc(n=1))],
            [row(1), row(2), row(3)],
        )
        await store.compact()
        await store.write([ShadowWrite("b", None), ShadowWrite("a", doc(n=2))], [row(4)])
        positions = [position for position, _ in await pending_of(store)]
        await store.history_committed([positions[1], positions[3]])
        await store.compact()
        await store.write([ShadowWrite("d", doc(n=1))], [row(5)])
        assert await shadows_of(store) == {"a": doc(n=2), "c": doc(n=1), "d": doc(n=1)}
        return positions

    positions = with_store(data, body)
    assert [path.name for path in sorted(data.glob("snapshot-*"))] == ["snapshot-00000003.isnap"]
    assert [path.name for path in journal_files(data)] == ["journal-00000003.isj"]

    shadows, pending = reopen(data)
    assert shadows == {"a": doc(n=2), "c": doc(n=1), "d": doc(n=1)}
    assert [found.version for _, found in pending] == [1, 3, 5]
    assert [position for position, _ in pending][:2] == [positions[0], positions[2]]


def test_embedded_commit_after_rotation(tmp_path):
    """A row folded into a snapshot and committed afterwards stays gone after restart."""
    data = tmp_path / "data"

    async def body(store: EmbeddedHotStore) -> None:
        await store.write([], [row(1), row(2)])
        await store.compact()
        [(position, _), _] = await pending_of(store)
        await store.history_committed([position])

    with_store(data, body)
    _, pending = reopen(data)
    assert [found.version for _, found in pending] == [2]


def test_embedded_positions_survive_compaction(tmp_path):
    data = tmp_path / "data"

    async def body(store: EmbeddedHotStore) -> str:
        await store.write([], [row(1)])
        [(position, _)] = await pending_of(store)
        await store.history_committed([position])
        await store.compact()
        return position

    committed = with_store(data, body)

    async def write_more(store: EmbeddedHotStore) -> str:
        await store.write([], [row(2)])
        [(position, _)] = await pending_of(store)
        return position

    assert int(with_store(data, write_more)) > int(committed)


def test_embedded_compaction_starts_itself(tmp_path):
    data = tmp_path / "data"

    async def body(store: EmbeddedHotStore) -> None:
        for i in range(200):
            await store.write([ShadowWrite(f"k{i % 7}", doc(i=i, pad="x" * 50))], [row(i)])
            if i % 2:
                [(position, _), *_] = await pending_of(store)
                await store.history_committed([position])

    with_store(data, body, compact_min_journal_bytes=2048)
    assert list(data.glob("snapshot-*.isnap"))
    shadows, pending = reopen(data)
    assert shadows == {f"k{i % 7}": doc(i=i, pad="x" * 50) for i in range(193, 200)}
    assert [found.version for _, found in pending] == list(range(100, 200))


def test_embedded_corrupt_snapshot_rejected(tmp_path):
    data = tmp_path / "data"

    async def body(store: EmbeddedHotStore) -> None:
        await store.write([ShadowWrite("a", doc(n=1))], [])
        await store.compact()

    with_store(data, body)
    [snapshot] = data.glob("snapshot-*.isnap")
    content = bytearray(snapshot.read_bytes())
    content[12] ^= 0x01
    snapshot.write_bytes(bytes(content))
    with pytest.raises(StoreUnavailable, match="is corrupt at offset 8"):
        reopen(data)


def test_embedded_leftovers_cleaned(tmp_path):
    """Files of a compaction interrupted after its rename are deleted on open."""
    data = tmp_path / "data"

    async def body(store: EmbeddedHotStore) -> None:
        await store.write([ShadowWrite("a", doc(n=1))], [row(1)])
        await store.compact()

    with_store(data, body)
    (data / "journal-00000001.isj").write_bytes(b"stale journal folded into the snapshot")
    (data / "snapshot-00000004.tmp").write_bytes(b"unfinished snapshot")
    shadows, pending = reopen(data)
    assert shadows == {"a": doc(n=1)}
    assert [found.version for _, found in pending] == [1]
    assert sorted(path.name for path in data.iterdir()) == [
        "journal-00000002.isj",
        "lock",
        "snapshot-00000002.isnap",
    ]


def test_embedded_kill_keeps_acknowledged(tmp_path):
    data = tmp_path / "data"
    acknowledged: set[int] = set()
    committed: set[int] = set()
    command = [sys.executable, str(HERE / "embedded_crash_writer.py"), str(data)]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as writer:
        assert writer.stdout is not None
        assert writer.stderr is not None
        try:
            while len(acknowledged) < 400:
                line = writer.stdout.readline()
                assert line, f"the writer exited early: {writer.stderr.read()}"
                kind, number = line.split()
                (acknowledged if kind == "ack" else committed).add(int(number))
            os.kill(writer.pid, signal.SIGKILL)
            # Read through the same buffered file as readline(): communicate() would read
            # the raw pipe and miss the lines already buffered here.
            output = writer.stdout.read()
        finally:
            if writer.poll() is None:
                writer.kill()
    # Lines printed before the kill count; a last line cut off by the kill does not.
    for line in output.splitlines(keepends=True):
        if line.endswith("\n"):
            kind, number = line.split()
            (acknowledged if kind == "ack" else committed).add(int(number))

    assert list(data.glob("snapshot-*.isnap")), "the writer never compacted"
    shadows, pending = reopen(data)

    for key_index in range(20):
        acked_for_key = [i for i in acknowledged if i % 20 == key_index]
        assert orjson.loads(shadows[f"dev{key_index}"])["seq"] >= max(acked_for_key)
    pending_versions = {found.version for _, found in pending}
    for i in acknowledged:
        if i in committed:
            assert i not in pending_versions, f"committed row {i} came back"
        elif i + 10 not in acknowledged:
            # Its commit had not started when the writer was killed.
            assert i in pending_versions, f"acknowledged row {i} is missing"
