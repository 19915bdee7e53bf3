"""Measure how long the engine takes to load its shadows from the hot store at start.

Fills a fresh embedded hot store (or a Redis given with --redis) with N typical small shadows,
stored as the engine stores them: five reported numbers, two desired values and their
metadata. Then it loads them the way the engine does at start and reports the time and rate.

Usage::

    .venv/bin/python benchmarks/storage_load.py                      # 1,000,000 shadows
    .venv/bin/python benchmarks/storage_load.py --shadows 100000
    .venv/bin/python benchmarks/storage_load.py --redis redis://127.0.0.1:6400/0

Use a Redis server of your own: the run writes N keys under the prefix ``ironshadow``.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from ironshadow.broker.core import Broker
from ironshadow.engine.service import ShadowService, document_bytes
from ironshadow.shadow import Shadow
from ironshadow.storage.base import HotStore, ShadowWrite
from ironshadow.storage.embedded import EmbeddedHotStore
from ironshadow.storage.pipeline import WriteBehind

DEFAULT_SHADOWS = 1_000_000
# Shadows per write while filling the store.
FILL_BATCH = 10_000
NOW = 1_796_000_000  # a fixed epoch second, so every run stores the same documents


def typical_document(number: int) -> bytes:
    shadow = Shadow.from_state(
        {
            "desired": {"mode": "auto", "interval": 10},
            "reported": {
                "temperature": 20.5 + number % 7,
                "humidity": 40 + number % 11,
                "pressure": 1013.2,
                "voltage": 3.3,
                "rssi": -60 - number % 20,
            },
        },
        1 + number % 50,
        timestamp=NOW,
    )
    return document_bytes(shadow, NOW)


async def fill(store: HotStore, count: int) -> float:
    started = time.perf_counter()
    for first in range(0, count, FILL_BATCH):
        batch = [
            ShadowWrite(f"device-{number:07d}", typical_document(number))
            for number in range(first, min(first + FILL_BATCH, count))
        ]
        await store.write(batch, [])
    return time.perf_counter() - started


async def measure(count: int, redis_url: str | None, folder: Path) -> None:
    store: HotStore
    if redis_url:
        from ironshadow.storage.redis import RedisHotStore

        store = RedisHotStore(redis_url)
    else:
        store = EmbeddedHotStore(folder)
    await store.open()
    fill_seconds = await fill(store, count)
    await store.close()

    # Load as the engine does at start: a fresh store object, the shadow service's load().
    store = RedisHotStore(redis_url) if redis_url else EmbeddedHotStore(folder)
    started = time.perf_counter()
    await store.open()
    service = ShadowService(Broker(), pipeline=WriteBehind(store, None))
    loaded = await service.load()
    load_seconds = time.perf_counter() - started
    await store.close()

    backend = "redis" if redis_url else "embedded"
    print(f"backend {backend}: {count:,} shadows")
    print(f"fill: {fill_seconds:.1f} s ({count / fill_seconds:,.0f} shadows/s, batches of "
          f"{FILL_BATCH:,})")
    print(f"load: {load_seconds:.1f} s ({loaded / load_seconds:,.0f} shadows/s), "
          f"{loaded:,} loaded")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shadows", type=int, default=DEFAULT_SHADOWS,
                        help="shadows to store and load (default: %(default)s)")
    parser.add_argument("--redis", default=None, help="Redis URL instead of the embedded store")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ironshadow-load-") as folder:
        asyncio.run(measure(args.shadows, args.redis, Path(folder) / "shadows"))


if __name__ == "__main__":
    main()
