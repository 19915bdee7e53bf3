"""Measure the SQLite history store's CPU per row for several transaction sizes.

Writes the same number of history rows to a fresh embedded history file (the engine's
``SQLiteHistoryStore``) in transactions of each given size, and reports the writer thread's
CPU time per row. The rows look like the swarm's: things picked at random among
``--things``, four numeric reported fields each, so every row also adds four rows of numeric
values. The engine's history task moves rows from the outbox in batches of
``HISTORY_BATCH_SIZE`` (src/ironshadow/storage/embedded.py); this is the figure behind that
constant.

Usage::

    .venv/bin/python benchmarks/history_batches.py
    .venv/bin/python benchmarks/history_batches.py --rows 120000 --sizes 1000,10000
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from pathlib import Path

import orjson

from ironshadow.storage.base import HistoryRow
from ironshadow.storage.sqlite import SQLiteHistoryStore

START_TIME = 1_796_000_000.0  # a fixed epoch second, so every run writes the same rows


def make_rows(count: int, things: int, seed: int) -> list[HistoryRow]:
    rng = random.Random(seed)
    rows = []
    for number in range(count):
        reported = orjson.dumps(
            {"temperature": rng.uniform(20, 30), "rpm": rng.randrange(3000), "load": 0.5, "on": 1}
        )
        thing = f"swarm-{rng.randrange(things)}"
        rows.append(HistoryRow(START_TIME + number * 1e-4, thing, "", number + 1, reported, None))
    return rows


async def cpu_per_row(rows: list[HistoryRow], size: int, folder: Path) -> float:
    """Write ``rows`` in transactions of ``size`` rows; return writer CPU microseconds per row."""
    store = SQLiteHistoryStore(folder / f"history-{size}.sqlite3")
    await store.open()
    try:
        # thread_time() read on the store's own thread, before and after each transaction.
        spent = 0.0
        for start in range(0, len(rows), size):
            batch = rows[start : start + size]

            def timed_insert(batch: list[HistoryRow] = batch) -> float:
                begin = time.thread_time()
                store._insert(batch)
                return time.thread_time() - begin

            spent += await store._run(timed_insert)
    finally:
        await store.close()
    return spent / len(rows) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=60_000, help="rows per size (default 60,000)")
    parser.add_argument("--things", type=int, default=2_000, help="distinct things (default 2,000)")
    parser.add_argument(
        "--sizes",
        default="1000,3000,10000,30000",
        help="rows per transaction, comma-separated (default 1000,3000,10000,30000)",
    )
    parser.add_argument("--seed", type=int, default=1)
    arguments = parser.parse_args()
    sizes = [int(size) for size in arguments.sizes.split(",")]
    rows = make_rows(arguments.rows, arguments.things, arguments.seed)
    print(f"{arguments.rows:,} rows of 4 numeric fields over {arguments.things:,} things")
    print(f"{'rows per transaction':>22} {'writer CPU, µs per row':>24}")
    with tempfile.TemporaryDirectory(prefix="history-batches") as folder:
        for size in sizes:
            micros = asyncio.run(cpu_per_row(rows, size, Path(folder)))
            print(f"{size:>22,} {micros:>24.2f}")


if __name__ == "__main__":
    main()
