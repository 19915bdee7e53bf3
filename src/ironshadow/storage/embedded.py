"""The embedded hot store: shadows and the history outbox in a local data folder.

Files in the data folder (``gen`` is an 8-digit generation number):

- ``journal-{gen}.isj``: an append-only journal. Each ``write()`` call appends one record
  and fsyncs once (group commit: the caller batches).
- ``snapshot-{gen}.isnap``: the state folded from the previous snapshot and every journal
  with a lower generation: the latest document of each live shadow, the outbox rows not yet
  committed, and the next outbox sequence number.
- ``snapshot-{gen}.tmp``: a snapshot being written, deleted on open.
- ``lock``: held with ``flock`` while the store is open, so that two engines never share a folder.

Both file kinds start with an 8-byte magic and then contain framed records::

    u32 payload length | u32 CRC32 of (length bytes + payload) | payload

All integers are little-endian. A payload starts with a kind byte:

- ``BATCH``: ``u64 first_seq, u32 row count``, the outbox rows (numbered ``first_seq``,
  ``first_seq + 1``, ...), then ``u32 shadow count`` and the shadows. A shadow whose document
  length is -1 is deleted. One ``write()`` call is one record, so a batch is applied whole or
  not at all.
- ``COMMIT``: ``u32 range count`` and ``(u64 first_seq, u32 count)`` ranges of outbox rows that
  the history store has committed.
- ``META``: ``u64 next_seq``, written at the end of a snapshot.

Recovery on open: replay the newest snapshot, then every journal of the same or a higher
generation in order. A record whose length runs past the end of the newest journal, or whose
CRC does not match, is a torn tail from a crash or power loss. The journal is truncated to the
end of the last valid record before any new write, so a half-written batch is never applied.
A bad record anywhere else (a snapshot, an older journal) is corruption, and open() raises.

Compaction: when the active journal outgrows its bound, the writer thread starts a new
journal (the rotation) and a compaction thread folds the old snapshot and journals into a new
snapshot: it writes ``.tmp``, fsyncs it, renames it, fsyncs the folder, and only then deletes
the folded files. A crash at any step leaves either the old files or the new snapshot plus the
newer journals, and both replay to the same state.

Memory: the store keeps no shadow documents. ``load_shadows()`` and compaction read them from
disk. The outbox rows not yet committed are kept in memory, and their number is bounded by how
far the history store lags behind.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import struct
import threading
import zlib
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from ironshadow.storage.base import HistoryRow, ShadowWrite, StoreUnavailable

logger = logging.getLogger("ironshadow.storage")

# The journal may grow to this many bytes before compaction is considered. Replaying 64 MiB on
# start should take about a second (an estimate, not measured), so compacting sooner would
# spend disk bandwidth for little gain.
COMPACT_MIN_JOURNAL_BYTES = 64 * 1024 * 1024

# Past the minimum, compaction starts when the journal is this many times the size of the
# snapshot. With 1.0 a compaction writes at most the old snapshot plus the journal, which is
# at most two bytes per journaled byte, and a start replays at most twice the snapshot.
COMPACT_JOURNAL_RATIO = 1.0

# A snapshot is written in records of about this size, so that replay and compaction read it
# in bounded pieces.
SNAPSHOT_RECORD_BYTES = 1024 * 1024

# load_shadows() yields batches of at most this many items.
LOAD_BATCH_SIZE = 1000
# pending_history() yields batches of at most this many rows. Each batch is one transaction in
# the history store, and SQLite's CPU per row falls by a third from 1,000 rows to 10,000
# (benchmarks/history_batches.py).
HISTORY_BATCH_SIZE = 10_000

JOURNAL_MAGIC = b"ISHJRNL\x01"
SNAPSHOT_MAGIC = b"ISHSNAP\x01"
_MAGIC_SIZE = 8

_KIND_BATCH = 1
_KIND_COMMIT = 2
_KIND_META = 3

_U32 = struct.Struct("<I")
_FRAME = struct.Struct("<II")  # payload length, CRC32
_BATCH_HEAD = struct.Struct("<BQI")  # kind, first outbox sequence number, row count
# time, version, thing length, shadow name length, reported length, desired length (-1: None)
_ROW_HEAD = struct.Struct("<dqIIii")
_SHADOW_HEAD = struct.Struct("<Ii")  # key length, document length (-1: deleted)
_COMMIT_HEAD = struct.Struct("<BI")  # kind, range count
_RANGE = struct.Struct("<QI")  # first sequence number, count
_META = struct.Struct("<BQ")  # kind, next sequence number

_MAX_PAYLOAD = 2**32 - 1

_T = TypeVar("_T")


class CorruptStoreError(StoreUnavailable):
    """A snapshot or an older journal contains a record that fails its length or CRC check."""


# --- record encoding -------------------------------------------------------------------------


def _frame(payload: bytes) -> bytes:
    if len(payload) > _MAX_PAYLOAD:
        raise ValueError(
            f"journal record of {len(payload)} bytes exceeds the maximum of {_MAX_PAYLOAD}; "
            "write smaller batches"
        )
    length = _U32.pack(len(payload))
    crc = zlib.crc32(payload, zlib.crc32(length))
    return length + _U32.pack(crc) + payload


def _optional_length(data: bytes | None) -> int:
    return -1 if data is None else len(data)


def _encode_batch(
    first_seq: int, rows: Sequence[HistoryRow], shadows: Iterable[tuple[str, bytes | None]]
) -> bytes:
    parts = [_BATCH_HEAD.pack(_KIND_BATCH, first_seq, len(rows))]
    for row in rows:
        thing = row.thing.encode()
        name = row.shadow_name.encode()
        parts.append(
            _ROW_HEAD.pack(
                row.time,
                row.version,
                len(thing),
                len(name),
                _optional_length(row.reported),
                _optional_length(row.desired),
            )
        )
        parts.extend((thing, name, row.reported or b"", row.desired or b""))
    shadow_parts = []
    for key, document in shadows:
        encoded_key = key.encode()
        shadow_parts.append(_SHADOW_HEAD.pack(len(encoded_key), _optional_length(document)))
        shadow_parts.extend((encoded_key, document or b""))
    parts.append(_U32.pack(len(shadow_parts) // 3))
    parts.extend(shadow_parts)
    return b"".join(parts)


def _encode_commit(sequence_numbers: Sequence[int]) -> bytes:
    """Encode sorted sequence numbers as runs of consecutive numbers."""
    ranges: list[tuple[int, int]] = []
    for seq in sequence_numbers:
        if ranges and ranges[-1][0] + ranges[-1][1] == seq:
            ranges[-1] = (ranges[-1][0], ranges[-1][1] + 1)
        else:
            ranges.append((seq, 1))
    parts = [_COMMIT_HEAD.pack(_KIND_COMMIT, len(ranges))]
    parts.extend(_RANGE.pack(first, count) for first, count in ranges)
    return b"".join(parts)


def _take_optional(payload: bytes, offset: int, length: int) -> tuple[bytes | None, int]:
    if length < 0:
        return None, offset
    return payload[offset : offset + length], offset + length


def _decode_rows(payload: bytes) -> tuple[int, list[HistoryRow], int]:
    """Decode the rows of a BATCH payload: first sequence number, rows, offset of shadows."""
    _, first_seq, count = _BATCH_HEAD.unpack_from(payload, 0)
    offset = _BATCH_HEAD.size
    rows = []
    for _ in range(count):
        time, version, thing_len, name_len, reported_len, desired_len = _ROW_HEAD.unpack_from(
            payload, offset
        )
        offset += _ROW_HEAD.size
        thing = payload[offset : offset + thing_len].decode()
        offset += thing_len
        name = payload[offset : offset + name_len].decode()
        offset += name_len
        reported, offset = _take_optional(payload, offset, reported_len)
        desired, offset = _take_optional(payload, offset, desired_len)
        rows.append(HistoryRow(time, thing, name, version, reported, desired))
    return first_seq, rows, offset


def _skip_rows(payload: bytes) -> int:
    """Return the offset of the shadow section of a BATCH payload without decoding rows."""
    _, _, count = _BATCH_HEAD.unpack_from(payload, 0)
    offset = _BATCH_HEAD.size
    for _ in range(count):
        _, _, thing_len, name_len, reported_len, desired_len = _ROW_HEAD.unpack_from(
            payload, offset
        )
        offset += _ROW_HEAD.size + thing_len + name_len
        offset += max(reported_len, 0) + max(desired_len, 0)
    return offset


def _decode_shadows(payload: bytes, offset: int) -> dict[str, bytes | None]:
    """Decode the shadows of a BATCH payload; a key written twice in one batch keeps the last."""
    (count,) = _U32.unpack_from(payload, offset)
    offset += _U32.size
    shadows: dict[str, bytes | None] = {}
    for _ in range(count):
        key_len, document_len = _SHADOW_HEAD.unpack_from(payload, offset)
        offset += _SHADOW_HEAD.size
        key = payload[offset : offset + key_len].decode()
        offset += key_len
        shadows[key], offset = _take_optional(payload, offset, document_len)
    return shadows


def _decode_commit(payload: bytes) -> Iterator[int]:
    _, count = _COMMIT_HEAD.unpack_from(payload, 0)
    for index in range(count):
        first, run = _RANGE.unpack_from(payload, _COMMIT_HEAD.size + index * _RANGE.size)
        yield from range(first, first + run)


# --- files -----------------------------------------------------------------------------------


def _journal_path(data_dir: Path, generation: int) -> Path:
    return data_dir / f"journal-{generation:08d}.isj"


def _snapshot_path(data_dir: Path, generation: int) -> Path:
    return data_dir / f"snapshot-{generation:08d}.isnap"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _parse_generation(name: str, prefix: str, suffix: str) -> int | None:
    if not (name.startswith(prefix) and name.endswith(suffix)):
        return None
    digits = name[len(prefix) : len(name) - len(suffix)]
    return int(digits) if digits.isdigit() else None


class _RecordScan:
    """Iterate the valid records of a journal or snapshot file.

    Iteration stops at the first record that runs past ``end`` or fails its CRC check.
    Afterwards ``valid_end`` is the offset just past the last valid record, which equals
    ``end`` when the file is intact.
    """

    def __init__(self, handle: BinaryIO, end: int) -> None:
        self.handle = handle
        self.end = end
        self.valid_end = _MAGIC_SIZE

    def __iter__(self) -> Iterator[bytes]:
        self.handle.seek(_MAGIC_SIZE)
        offset = _MAGIC_SIZE
        while offset + _FRAME.size <= self.end:
            head = self.handle.read(_FRAME.size)
            length, crc = _FRAME.unpack(head)
            if length > self.end - offset - _FRAME.size:
                return
            payload = self.handle.read(length)
            if zlib.crc32(payload, zlib.crc32(head[:4])) != crc:
                return
            offset += _FRAME.size + length
            self.valid_end = offset
            yield payload


def _read_records(path: Path, magic: bytes, end: int | None = None) -> Iterator[bytes]:
    """Yield every record of a file that must be intact up to ``end`` (default: its size)."""
    with open(path, "rb") as handle:
        if handle.read(_MAGIC_SIZE) != magic:
            raise CorruptStoreError(f"{path} is not an IronShadow store file (wrong magic bytes)")
        size = os.fstat(handle.fileno()).st_size if end is None else end
        scan = _RecordScan(handle, size)
        yield from scan
        if scan.valid_end != size:
            raise CorruptStoreError(
                f"{path} is corrupt at offset {scan.valid_end} (a record fails its length or "
                "CRC check); restore the data folder from a backup or move this file away"
            )


class _SnapshotWriter:
    """Write a snapshot in records of about ``SNAPSHOT_RECORD_BYTES``."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle
        self.shadows: list[tuple[str, bytes | None]] = []
        self.buffered = 0
        handle.write(SNAPSHOT_MAGIC)

    def add_shadow(self, key: str, document: bytes) -> None:
        self.shadows.append((key, document))
        self.buffered += len(key) + len(document)
        if self.buffered >= SNAPSHOT_RECORD_BYTES:
            self.flush_shadows()

    def flush_shadows(self) -> None:
        if self.shadows:
            self.handle.write(_frame(_encode_batch(0, (), self.shadows)))
        self.shadows = []
        self.buffered = 0

    def add_rows(self, rows: Sequence[tuple[int, HistoryRow]]) -> None:
        """Write outbox rows, one record per run of consecutive sequence numbers."""
        run: list[HistoryRow] = []
        run_first = 0
        for seq, row in rows:
            if run and (run_first + len(run) != seq or len(run) >= LOAD_BATCH_SIZE):
                self.handle.write(_frame(_encode_batch(run_first, run, ())))
                run = []
            if not run:
                run_first = seq
            run.append(row)
        if run:
            self.handle.write(_frame(_encode_batch(run_first, run, ())))

    def finish(self, next_seq: int) -> None:
        self.flush_shadows()
        self.handle.write(_frame(_META.pack(_KIND_META, next_seq)))


@dataclass
class _CompactionPlan:
    snapshot_generation: int | None
    journal_generations: list[int]
    new_generation: int
    pending: list[tuple[int, HistoryRow]]
    next_seq: int


class _Compaction(threading.Thread):
    def __init__(self, store: EmbeddedHotStore, plan: _CompactionPlan) -> None:
        super().__init__(name="ironshadow-compaction", daemon=True)
        self.store = store
        self.plan = plan
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.store._compact(self.plan)
        except Exception as exc:
            self.error = exc
            logger.exception(
                "compaction of %s into generation %d failed; the journals stay and are "
                "replayed on start",
                self.store.data_dir,
                self.plan.new_generation,
            )


# --- the store -------------------------------------------------------------------------------


class EmbeddedHotStore:
    """A :class:`~ironshadow.storage.base.HotStore` in a local data folder (see module doc).

    Writes, outbox commits and ``load_shadows()`` reads run in one worker thread, in the
    order they were called, so the event loop never waits on the disk and a write that is
    still in flight keeps its place before later calls. Compaction runs in its own thread.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        compact_min_journal_bytes: int = COMPACT_MIN_JOURNAL_BYTES,
        compact_journal_ratio: float = COMPACT_JOURNAL_RATIO,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.compact_min_journal_bytes = compact_min_journal_bytes
        self.compact_journal_ratio = compact_journal_ratio
        self._executor: ThreadPoolExecutor | None = None
        self._lock_fd: int | None = None
        self._journal_fd: int | None = None
        self._journal_end = 0  # bytes of the active journal that are written and fsynced
        self._snapshot_generation: int | None = None
        self._snapshot_bytes = 0
        self._journal_generations: list[int] = []  # every live journal; the last is active
        self._files_lock = threading.Lock()  # guards the two fields above and file deletion
        self._pending: dict[int, HistoryRow] = {}  # outbox rows by sequence number, ascending
        self._pending_lock = threading.Lock()
        self._next_seq = 1
        self._compaction: _Compaction | None = None
        self._failure: str | None = None  # set when the journal can no longer be trusted

    # --- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        if self._executor is not None:
            raise RuntimeError(f"the store in {self.data_dir} is already open")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ironshadow-hot")
        try:
            await self._run(self._open_files)
        except BaseException:
            self._executor.shutdown(wait=True)
            self._executor = None
            raise

    async def close(self) -> None:
        if self._executor is None:
            return
        compaction = self._compaction
        if compaction is not None:
            await asyncio.to_thread(compaction.join)
        await self._run(self._close_files)
        executor, self._executor = self._executor, None
        await asyncio.to_thread(executor.shutdown, wait=True)

    async def _run(self, function: Callable[..., _T], *args: Any) -> _T:
        if self._executor is None:
            raise RuntimeError(f"the store in {self.data_dir} is not open; call open() first")
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    def _open_files(self) -> None:
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self.data_dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreUnavailable(
                f"cannot open the data folder {self.data_dir}: {exc.strerror}; check that the "
                "path is a writable folder"
            ) from exc
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise StoreUnavailable(
                f"the data folder {self.data_dir} is in use by another process; stop it or "
                "choose another folder"
            ) from exc
        try:
            self._recover()
        except OSError as exc:
            self._close_files()
            raise StoreUnavailable(
                f"cannot read the data folder {self.data_dir}: {exc}; check its permissions "
                "and free space"
            ) from exc
        except BaseException:
            self._close_files()
            raise

    def _close_files(self) -> None:
        if self._journal_fd is not None:
            os.close(self._journal_fd)
            self._journal_fd = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def _recover(self) -> None:
        """Find the live files, rebuild the outbox, and cut a torn tail off the journal."""
        snapshots: list[int] = []
        journals: list[int] = []
        for entry in os.scandir(self.data_dir):
            if entry.name.endswith(".tmp"):
                os.unlink(entry.path)  # an unfinished snapshot from a crashed compaction
            elif (generation := _parse_generation(entry.name, "snapshot-", ".isnap")) is not None:
                snapshots.append(generation)
            elif (generation := _parse_generation(entry.name, "journal-", ".isj")) is not None:
                journals.append(generation)

        snapshot = max(snapshots, default=None)
        if snapshot is not None:
            # Files below the newest snapshot were folded into it before its rename.
            for old in snapshots:
                if old < snapshot:
                    os.unlink(_snapshot_path(self.data_dir, old))
            for old in journals:
                if old < snapshot:
                    os.unlink(_journal_path(self.data_dir, old))
            journals = [generation for generation in journals if generation >= snapshot]
            snapshot_path = _snapshot_path(self.data_dir, snapshot)
            for payload in _read_records(snapshot_path, SNAPSHOT_MAGIC):
                self._replay_outbox(payload)
            self._snapshot_bytes = snapshot_path.stat().st_size

        journals.sort()
        for generation in journals[:-1]:
            for payload in _read_records(_journal_path(self.data_dir, generation), JOURNAL_MAGIC):
                self._replay_outbox(payload)

        self._snapshot_generation = snapshot
        if journals:
            self._journal_generations = journals
            self._open_active_journal(journals[-1])
        else:
            first = snapshot if snapshot is not None else 1
            self._journal_generations = [first]
            self._journal_fd, self._journal_end = self._create_journal(first)
        _fsync_dir(self.data_dir)

        logger.info(
            "opened the hot store in %s: snapshot generation %s, %d journal(s), "
            "%d outbox row(s) pending",
            self.data_dir,
            snapshot,
            len(self._journal_generations),
            len(self._pending),
        )

    def _open_active_journal(self, generation: int) -> None:
        path = _journal_path(self.data_dir, generation)
        fd = os.open(path, os.O_RDWR)
        self._journal_fd = fd
        size = os.fstat(fd).st_size
        with os.fdopen(os.dup(fd), "rb") as handle:
            magic = handle.read(_MAGIC_SIZE)
            if len(magic) < _MAGIC_SIZE and JOURNAL_MAGIC.startswith(magic):
                # A crash interrupted the creation of this journal, so it contains no record.
                os.ftruncate(fd, 0)
                os.pwrite(fd, JOURNAL_MAGIC, 0)
                os.fsync(fd)
                self._journal_end = _MAGIC_SIZE
                return
            if magic != JOURNAL_MAGIC:
                raise CorruptStoreError(f"{path} is not an IronShadow journal (wrong magic bytes)")
            scan = _RecordScan(handle, size)
            for payload in scan:
                self._replay_outbox(payload)
        if scan.valid_end != size:
            logger.warning(
                "cutting a torn tail of %d bytes off %s at offset %d (a write interrupted by "
                "a crash or power loss, never acknowledged)",
                size - scan.valid_end,
                path,
                scan.valid_end,
            )
            os.ftruncate(fd, scan.valid_end)
            os.fsync(fd)
        self._journal_end = scan.valid_end

    def _create_journal(self, generation: int) -> tuple[int, int]:
        """Create an empty journal, durable with its folder entry; return its fd and size."""
        path = _journal_path(self.data_dir, generation)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.pwrite(fd, JOURNAL_MAGIC, 0)
            os.fsync(fd)
            _fsync_dir(self.data_dir)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        return fd, _MAGIC_SIZE

    def _replay_outbox(self, payload: bytes) -> None:
        kind = payload[0]
        if kind == _KIND_BATCH:
            first_seq, rows, _ = _decode_rows(payload)
            for index, row in enumerate(rows):
                self._pending[first_seq + index] = row
            self._next_seq = max(self._next_seq, first_seq + len(rows))
        elif kind == _KIND_COMMIT:
            for seq in _decode_commit(payload):
                self._pending.pop(seq, None)
        elif kind == _KIND_META:
            _, next_seq = _META.unpack(payload)
            self._next_seq = max(self._next_seq, next_seq)

    # --- writes ------------------------------------------------------------------------------

    async def write(self, shadows: Sequence[ShadowWrite], history: Sequence[HistoryRow]) -> None:
        """Append one record with the shadows and outbox rows; return once it is fsynced."""
        if not shadows and not history:
            return
        await self._run(self._append_batch, list(shadows), list(history))

    def outbox_rows_in_memory(self) -> int:
        """Return the uncommitted outbox rows: this store keeps every one of them in memory."""
        return len(self._pending)

    async def check(self) -> None:
        """Raise StoreUnavailable once a failed write has made the journal untrustworthy."""
        if self._failure is not None:
            raise StoreUnavailable(self._failure)

    async def history_committed(self, positions: Sequence[str]) -> None:
        """Append a durable COMMIT record for these outbox rows and drop them from memory."""
        sequence_numbers = []
        for position in positions:
            try:
                sequence_numbers.append(int(position))
            except ValueError:
                raise ValueError(
                    f"invalid outbox position {position!r}: expected a position that "
                    "pending_history() returned"
                ) from None
        if sequence_numbers:
            await self._run(self._append_commit, sequence_numbers)

    def _append_batch(self, shadows: list[ShadowWrite], history: list[HistoryRow]) -> None:
        first_seq = self._next_seq
        payload = _encode_batch(
            first_seq, history, ((shadow.key, shadow.document) for shadow in shadows)
        )
        self._append(payload)
        self._next_seq = first_seq + len(history)
        with self._pending_lock:
            for index, row in enumerate(history):
                self._pending[first_seq + index] = row
        self._maybe_start_compaction()

    def _append_commit(self, sequence_numbers: list[int]) -> None:
        with self._pending_lock:
            committed = sorted({seq for seq in sequence_numbers if seq in self._pending})
        if not committed:
            return
        self._append(_encode_commit(committed))
        with self._pending_lock:
            for seq in committed:
                del self._pending[seq]
        self._maybe_start_compaction()

    def _append(self, payload: bytes) -> None:
        """Write one framed record at the end of the active journal and fsync it."""
        if self._failure is not None:
            raise StoreUnavailable(self._failure)
        frame = _frame(payload)
        fd = self._journal_fd
        assert fd is not None
        try:
            written = 0
            while written < len(frame):
                written += os.pwrite(fd, frame[written:], self._journal_end + written)
        except OSError as exc:
            self._undo_partial_write(exc)
            raise StoreUnavailable(
                f"writing the journal in {self.data_dir} failed: {exc}; check free space "
                "and the disk"
            ) from exc
        try:
            os.fsync(fd)
        except OSError as exc:
            # After a failed fsync the kernel may have dropped the dirty pages, so the file's
            # contents are unknown. Only a reopen, which validates every record, is safe.
            self._failure = (
                f"fsync of the journal in {self.data_dir} failed ({exc}); the store accepts "
                "no more writes. Check the disk, then restart the engine"
            )
            logger.error("%s", self._failure)
            raise StoreUnavailable(self._failure) from exc
        self._journal_end += len(frame)

    def _undo_partial_write(self, error: OSError) -> None:
        """Cut a partly written record, so that the next record follows the last good one."""
        try:
            os.ftruncate(self._journal_fd, self._journal_end)  # type: ignore[arg-type]
        except OSError as exc:
            self._failure = (
                f"writing the journal in {self.data_dir} failed ({error}) and cutting the "
                f"partial record failed too ({exc}); the store accepts no more writes. Check "
                "the disk, then restart the engine"
            )
            logger.error("%s", self._failure)

    # --- compaction ----------------------------------------------------------------------------

    async def compact(self) -> None:
        """Fold the snapshot and journals into a new snapshot now, and wait for it."""
        running = self._compaction
        if running is not None:
            await asyncio.to_thread(running.join)
        compaction = await self._run(self._start_compaction)
        await asyncio.to_thread(compaction.join)
        if compaction.error is not None:
            raise StoreUnavailable(
                f"compaction in {self.data_dir} failed: {compaction.error}"
            ) from compaction.error

    def _maybe_start_compaction(self) -> None:
        # Called only after a record's effect on ``_pending`` is applied: the rotation copies
        # ``_pending`` into the snapshot, and that copy must match the folded journals.
        bound = max(
            self.compact_min_journal_bytes, self.compact_journal_ratio * self._snapshot_bytes
        )
        if self._journal_end <= bound:
            return
        if self._compaction is not None and self._compaction.is_alive():
            return
        try:
            self._start_compaction()
        except OSError:
            logger.exception("starting a new journal in %s failed", self.data_dir)

    def _start_compaction(self) -> _Compaction:
        """Start a new journal (runs in the writer thread) and fold the rest in a thread."""
        running = self._compaction
        if running is not None and running.is_alive():
            return running
        new_generation = self._journal_generations[-1] + 1
        fd, end = self._create_journal(new_generation)
        old_fd, self._journal_fd, self._journal_end = self._journal_fd, fd, end
        with self._files_lock:
            folded = list(self._journal_generations)
            self._journal_generations.append(new_generation)
            snapshot = self._snapshot_generation
        os.close(old_fd)  # type: ignore[arg-type]
        with self._pending_lock:
            pending = list(self._pending.items())
        plan = _CompactionPlan(snapshot, folded, new_generation, pending, self._next_seq)
        self._compaction = _Compaction(self, plan)
        self._compaction.start()
        return self._compaction

    def _compact(self, plan: _CompactionPlan) -> None:
        """Write the new snapshot and delete the files it replaces (compaction thread)."""
        journal_paths = [_journal_path(self.data_dir, gen) for gen in plan.journal_generations]

        # Pass 1: where each key was last written in the folded journals (keys only in memory).
        last_written: dict[str, tuple[int, int]] = {}
        for file_index, path in enumerate(journal_paths):
            for record_index, payload in enumerate(_read_records(path, JOURNAL_MAGIC)):
                if payload[0] == _KIND_BATCH:
                    for key in _decode_shadows(payload, _skip_rows(payload)):
                        last_written[key] = (file_index, record_index)

        tmp_path = self.data_dir / f"snapshot-{plan.new_generation:08d}.tmp"
        try:
            self._write_snapshot(plan, journal_paths, last_written, tmp_path)
        except BaseException:
            tmp_path.unlink(missing_ok=True)
            raise

        # The rename makes the snapshot live; the folder fsync makes the rename durable. Only
        # after that may the files it replaces go.
        snapshot_path = _snapshot_path(self.data_dir, plan.new_generation)
        os.rename(tmp_path, snapshot_path)
        _fsync_dir(self.data_dir)
        with self._files_lock:
            if plan.snapshot_generation is not None:
                os.unlink(_snapshot_path(self.data_dir, plan.snapshot_generation))
            for path in journal_paths:
                os.unlink(path)
            self._snapshot_generation = plan.new_generation
            self._snapshot_bytes = snapshot_path.stat().st_size
            self._journal_generations = [
                gen for gen in self._journal_generations if gen >= plan.new_generation
            ]
        _fsync_dir(self.data_dir)
        logger.info(
            "compacted %s into snapshot generation %d (%d bytes, %d outbox row(s))",
            self.data_dir,
            plan.new_generation,
            self._snapshot_bytes,
            len(plan.pending),
        )

    def _write_snapshot(
        self,
        plan: _CompactionPlan,
        journal_paths: list[Path],
        last_written: dict[str, tuple[int, int]],
        tmp_path: Path,
    ) -> None:
        with open(tmp_path, "wb") as handle:
            writer = _SnapshotWriter(handle)
            # The old snapshot's shadows that no folded journal wrote again.
            if plan.snapshot_generation is not None:
                old_path = _snapshot_path(self.data_dir, plan.snapshot_generation)
                for payload in _read_records(old_path, SNAPSHOT_MAGIC):
                    if payload[0] != _KIND_BATCH:
                        continue
                    for key, document in _decode_shadows(payload, _skip_rows(payload)).items():
                        if key not in last_written and document is not None:
                            writer.add_shadow(key, document)
            # Pass 2: each key's last write in the journals, unless that write deleted it.
            for file_index, path in enumerate(journal_paths):
                for record_index, payload in enumerate(_read_records(path, JOURNAL_MAGIC)):
                    if payload[0] != _KIND_BATCH:
                        continue
                    location = (file_index, record_index)
                    for key, document in _decode_shadows(payload, _skip_rows(payload)).items():
                        if document is not None and last_written[key] == location:
                            writer.add_shadow(key, document)
            writer.flush_shadows()
            writer.add_rows(plan.pending)
            writer.finish(plan.next_seq)
            handle.flush()
            os.fsync(handle.fileno())

    # --- reads -------------------------------------------------------------------------------

    async def load_shadows(self) -> AsyncIterator[list[tuple[str, bytes]]]:
        """Yield every live ``(key, document)`` by replaying the snapshot and the journals.

        The replay needs one dictionary of all documents. Batches are popped off it as they
        are yielded, so the documents move to the caller rather than being held twice.
        """
        state = await self._run(self._read_shadows)
        while state:
            yield [state.popitem() for _ in range(min(LOAD_BATCH_SIZE, len(state)))]

    def _read_shadows(self) -> dict[str, bytes]:
        state: dict[str, bytes] = {}

        def apply(payload: bytes) -> None:
            if payload[0] != _KIND_BATCH:
                return
            for key, document in _decode_shadows(payload, _skip_rows(payload)).items():
                if document is None:
                    state.pop(key, None)
                else:
                    state[key] = document

        # The files lock keeps compaction from deleting a file that this pass still reads.
        # Because this runs in the writer thread, the active journal does not grow meanwhile.
        with self._files_lock:
            if self._snapshot_generation is not None:
                path = _snapshot_path(self.data_dir, self._snapshot_generation)
                for payload in _read_records(path, SNAPSHOT_MAGIC):
                    apply(payload)
            *older, active = self._journal_generations
            for generation in older:
                for payload in _read_records(
                    _journal_path(self.data_dir, generation), JOURNAL_MAGIC
                ):
                    apply(payload)
            active_path = _journal_path(self.data_dir, active)
            for payload in _read_records(active_path, JOURNAL_MAGIC, self._journal_end):
                apply(payload)
        return state

    async def pending_history(self) -> AsyncIterator[list[tuple[str, HistoryRow]]]:
        """Yield the outbox rows not yet committed, oldest first, as ``(position, row)``.

        Positions are decimal outbox sequence numbers. They increase with every row written,
        also across restarts and compactions.
        """
        with self._pending_lock:
            pending = list(self._pending.items())
        for start in range(0, len(pending), HISTORY_BATCH_SIZE):
            yield [(str(seq), row) for seq, row in pending[start : start + HISTORY_BATCH_SIZE]]
