"""Moving the embedded stores of a data folder to another number of workers.

Each worker keeps the shadows, history rows and persistent sessions of the names it owns
(see :func:`~.ownership.owner_of`), so a start with another worker count first moves every
record to the folder of its new owner. :func:`prepare_data_dir` runs before any engine opens
the folder.

The move is safe to interrupt. Every record is copied into a staging folder, ``.reshard``,
laid out as the new count expects, and a ``complete.json`` file is written last. Then the
old folders are renamed into ``.reshard-old``, the new ones out of ``.reshard``, the worker
count is recorded, and both staging folders are deleted. A start that finds ``.reshard``
without ``complete.json`` deletes it (the old folders are still whole) and copies again; one
that finds ``complete.json`` finishes the renames.

What moves, from each old folder that contains it:

- ``shadows`` (the embedded hot store): each shadow document, and each history row still
  waiting in its outbox, to the owner of its thing.
- ``history.sqlite3``: each row to the owner of its thing.
- ``mqtt-state.sqlite3``: each persistent session to the owner of its client id. Retained
  messages are kept by every worker, so each new folder gets all of them. When old folders
  disagree on a topic, the lowest-numbered worker's message is kept.

Stores outside the data folder (Redis, PostgreSQL) are shared by all workers and need no
move.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import sqlite3
from collections import defaultdict
from pathlib import Path

from ..shadow.names import NAMED_SHADOW_SEPARATOR
from ..storage.base import HistoryRow, ShadowWrite
from ..storage.embedded import EmbeddedHotStore
from ..storage.mqtt_state import SQLITE_FILE_NAME, SQLiteMqttStateStore
from ..storage.sqlite import SQLiteHistoryStore
from .datadir import (
    RECORD_NAME,
    SINGLE_PROCESS_ENTRIES,
    record_worker_count,
    recorded_workers,
    worker_data_dir,
)
from .ownership import owner_of

log = logging.getLogger("ironshadow.cluster")

STAGING_NAME = ".reshard"
OLD_NAME = ".reshard-old"
COMPLETE_NAME = "complete.json"
HOT_STORE_NAME = "shadows"
HISTORY_NAME = "history.sqlite3"
# Shadows and outbox rows written to a new hot store in one call.
WRITE_BATCH = 5000
# Files that SQLite keeps beside a database file while it is open or after a crash.
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")


def stored_workers(data_dir: Path) -> int | None:
    """Return the worker count that ``data_dir`` is laid out for: the recorded count, 1 for
    the stores of a single-process engine, or None when it contains no store."""
    recorded = recorded_workers(data_dir)
    if recorded is not None:
        return recorded
    if any((data_dir / name).exists() for name in SINGLE_PROCESS_ENTRIES):
        return 1
    return None


def prepare_data_dir(data_dir: Path, workers: int) -> int | None:
    """Make ``data_dir`` ready for ``workers`` workers, moving its stores if needed.

    Return the previous worker count when the stores were moved, else None. Raises OSError,
    sqlite3.Error or StoreUnavailable when a store cannot be read or written; the old
    folders are then left as they were.
    """
    _finish_interrupted(data_dir)
    previous = stored_workers(data_dir)
    if previous is not None and previous != workers:
        log.info(
            "moving the stores in %s from %d worker(s) to %d; a start with a large history "
            "takes a while",
            data_dir,
            previous,
            workers,
        )
        move_stores(data_dir, previous, workers)
    elif workers > 1:
        record_worker_count(data_dir, workers)
    return previous if previous is not None and previous != workers else None


def folders(data_dir: Path, workers: int) -> list[Path]:
    """Return the folder of each worker's embedded stores for ``workers`` workers."""
    if workers == 1:
        return [data_dir]
    return [worker_data_dir(data_dir, index) for index in range(workers)]


def move_stores(data_dir: Path, old: int, new: int) -> None:
    """Copy every store of the ``old`` layout into the ``new`` one, then switch to it."""
    staging = data_dir / STAGING_NAME
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    targets = folders(staging, new)
    for target in targets:
        target.mkdir(exist_ok=True)
    sources = folders(data_dir, old)
    asyncio.run(_move_hot_stores(sources, targets))
    for name in SQLITE_MOVES:
        _move_sqlite(sources, targets, name)
    complete = staging / COMPLETE_NAME
    with complete.open("w") as handle:
        json.dump({"from": old, "to": new}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    _switch(data_dir)


def _thing_of_key(key: str) -> str:
    return key.split(NAMED_SHADOW_SEPARATOR, 1)[0]


async def _move_hot_stores(sources: list[Path], targets: list[Path]) -> None:
    stores: dict[int, EmbeddedHotStore] = {}
    try:
        for source in sources:
            if (source / HOT_STORE_NAME).is_dir():
                await _move_hot_store(source / HOT_STORE_NAME, targets, stores)
    finally:
        for store in stores.values():
            await store.close()


async def _move_hot_store(
    path: Path, targets: list[Path], stores: dict[int, EmbeddedHotStore]
) -> None:
    async def target(index: int) -> EmbeddedHotStore:
        store = stores.get(index)
        if store is None:
            store = stores[index] = EmbeddedHotStore(targets[index] / HOT_STORE_NAME)
            await store.open()
        return store

    source = EmbeddedHotStore(path)
    await source.open()
    try:
        async for batch in source.load_shadows():
            writes: dict[int, list[ShadowWrite]] = defaultdict(list)
            for key, document in batch:
                owner = owner_of(_thing_of_key(key), len(targets))
                writes[owner].append(ShadowWrite(key, document))
            for index, shadows in writes.items():
                for start in range(0, len(shadows), WRITE_BATCH):
                    await (await target(index)).write(shadows[start : start + WRITE_BATCH], [])
        async for pending in source.pending_history():
            rows: dict[int, list[HistoryRow]] = defaultdict(list)
            for _key, row in pending:
                rows[owner_of(row.thing, len(targets))].append(row)
            for index, owned in rows.items():
                for start in range(0, len(owned), WRITE_BATCH):
                    await (await target(index)).write([], owned[start : start + WRITE_BATCH])
    finally:
        await source.close()


# The statements that copy each SQLite file's rows to the owner ``:owner``, by file name.
# Retained messages go to every worker, and the first copy of a topic wins.
SQLITE_MOVES = {
    HISTORY_NAME: (
        "INSERT INTO main.shadow_updates SELECT * FROM old.shadow_updates"
        " WHERE owner_of(thing) = :owner",
        "INSERT INTO main.shadow_values SELECT * FROM old.shadow_values"
        " WHERE owner_of(thing) = :owner",
    ),
    SQLITE_FILE_NAME: (
        "INSERT OR IGNORE INTO main.retained SELECT * FROM old.retained",
        "INSERT OR IGNORE INTO main.sessions SELECT * FROM old.sessions"
        " WHERE owner_of(client_id) = :owner",
    ),
}


def _move_sqlite(sources: list[Path], targets: list[Path], name: str) -> None:
    """Copy the rows of every source folder's SQLite file ``name`` to the new owners."""
    paths = [source / name for source in sources if (source / name).exists()]
    if not paths:
        return
    for index, target in enumerate(targets):
        # The engine's own store creates the file, so that it has the engine's schema.
        if name == HISTORY_NAME:
            store: SQLiteHistoryStore | SQLiteMqttStateStore = SQLiteHistoryStore(target / name)
        else:
            store = SQLiteMqttStateStore(target / name)
        asyncio.run(_open_and_close(store))
        _copy_rows(target / name, paths, index, len(targets), SQLITE_MOVES[name])


async def _open_and_close(store: SQLiteHistoryStore | SQLiteMqttStateStore) -> None:
    """Create the file and its tables as the engine would."""
    await store.open()
    await store.close()


def _copy_rows(
    target: Path, sources: list[Path], index: int, workers: int, statements: tuple[str, ...]
) -> None:
    """Run the INSERT ``statements`` from each source file into ``target``, one transaction
    per source. In them ``owner_of(name)`` is the owner among ``workers`` and ``:owner`` is
    ``index``."""
    connection = sqlite3.connect(target, isolation_level=None)
    try:
        connection.create_function(
            "owner_of", 1, lambda name: owner_of(name, workers), deterministic=True
        )
        for source in sources:
            connection.execute("ATTACH DATABASE ? AS old", (str(source),))
            connection.execute("BEGIN")
            for statement in statements:
                connection.execute(statement, {"owner": index})
            connection.execute("COMMIT")
            connection.execute("DETACH DATABASE old")
    finally:
        connection.close()


def _finish_interrupted(data_dir: Path) -> None:
    """Complete or undo a move that a crash or a kill interrupted."""
    staging = data_dir / STAGING_NAME
    if (staging / COMPLETE_NAME).exists():
        log.info("finishing the move of the stores in %s that was interrupted", data_dir)
        _switch(data_dir)
    elif staging.exists():
        log.info("discarding an unfinished copy of the stores in %s", staging)
        shutil.rmtree(staging)
    old = data_dir / OLD_NAME
    if old.exists():
        shutil.rmtree(old)


def _switch(data_dir: Path) -> None:
    """Replace the old layout with the copy in the staging folder; safe to run again."""
    staging = data_dir / STAGING_NAME
    plan = json.loads((staging / COMPLETE_NAME).read_text())
    old_count, new_count = int(plan["from"]), int(plan["to"])
    old = data_dir / OLD_NAME
    old.mkdir(exist_ok=True)

    if new_count == 1:
        new_names = {
            path.name
            for path in staging.iterdir()
            if path.name != COMPLETE_NAME and not path.name.endswith(SQLITE_SIDE_FILES)
        }
    else:
        new_names = {path.name for path in folders(staging, new_count)}
    for name in sorted(new_names):
        if not (staging / name).exists():
            continue  # moved by an earlier, interrupted switch
        if (data_dir / name).exists():
            _rename(data_dir / name, old / name)
        _rename(staging / name, data_dir / name)

    if old_count == 1:
        old_names = set(SINGLE_PROCESS_ENTRIES)
    else:
        old_names = {path.name for path in folders(data_dir, old_count)}
    for name in sorted(old_names - new_names):
        if (data_dir / name).exists():
            _rename(data_dir / name, old / name)

    if new_count > 1:
        record_worker_count(data_dir, new_count)
    else:
        (data_dir / RECORD_NAME).unlink(missing_ok=True)
    shutil.rmtree(old)
    shutil.rmtree(staging)
    log.info("the stores in %s are laid out for %d worker(s) now", data_dir, new_count)


def _rename(source: Path, target: Path) -> None:
    """Rename a store's file or folder, with the files SQLite keeps beside a database, so
    that a stale write-ahead log never meets another database."""
    source.rename(target)
    for suffix in SQLITE_SIDE_FILES:
        side = source.with_name(source.name + suffix)
        if side.exists():
            side.rename(target.with_name(target.name + suffix))
