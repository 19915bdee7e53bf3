"""Write numbered batches to an embedded hot store until killed (the crash test's subject).

Usage: ``python embedded_crash_writer.py DATA_DIR``. Batch ``i`` writes the shadow
``dev{i % KEYS}`` with ``{"seq": i}`` and one outbox row of version ``i``, then prints
``ack i`` once ``write()`` has returned. After batch ``i`` it commits the row of batch
``i - COMMIT_LAG`` and prints ``committed j`` once that has returned. Tiny compaction bounds
make compactions run all the time, so the kill also lands in the middle of them.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import orjson

from ironshadow.storage.base import HistoryRow, ShadowWrite
from ironshadow.storage.embedded import EmbeddedHotStore

KEYS = 20
COMMIT_LAG = 10


async def main(data_dir: Path) -> None:
    store = EmbeddedHotStore(data_dir, compact_min_journal_bytes=4096)
    await store.open()
    i = 0
    while True:
        i += 1
        key = f"dev{i % KEYS}"
        document = orjson.dumps({"seq": i, "padding": "x" * 100})
        row = HistoryRow(float(i), key, "", i, orjson.dumps({"seq": i}), None)
        await store.write([ShadowWrite(key, document)], [row])
        print(f"ack {i}", flush=True)
        if i > COMMIT_LAG:
            target = i - COMMIT_LAG
            async for batch in store.pending_history():
                positions = [position for position, pending in batch if pending.version == target]
                if positions:
                    await store.history_committed(positions)
                    print(f"committed {target}", flush=True)


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
