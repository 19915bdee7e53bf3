"""Measure the resident memory per stored shadow, as the engine keeps them.

The script fills a dict with ``--count`` typical small shadows keyed as the engine keys
them (``shadow_key``: the thing name for a classic shadow). Each shadow is built the way
the engine builds it: an application sets two desired values, then the device reports five
numbers a second later. So each shadow has its own objects, and metadata with two
timestamps. It reports the growth of the process's resident set size (VmRSS from
/proc/self/status, after ``gc.collect()``) divided by the number of shadows. The map's own
entries and keys are included.

``--compare`` also runs the same load with plain nested dicts in place of ``Shadow``
objects: the get/accepted document without delta (state, metadata and version), decoded by
orjson, which is what a straightforward engine would keep. Each variant runs in a fresh
interpreter so that neither inherits the other's freed memory.

Usage (from the repository root; about 10 s per million shadows on a 2-core machine)::

    .venv/bin/python benchmarks/shadow_memory.py
    .venv/bin/python benchmarks/shadow_memory.py --count 1000000 --compare
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from typing import Any

import orjson

from ironshadow.shadow import Shadow, apply_update, shadow_key

START_TIME = 1_700_000_000


def resident_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


def thing_name(i: int) -> str:
    return f"device-{i:07d}"


def desired_payload(i: int) -> bytes:
    return orjson.dumps({"state": {"desired": {"mode": "eco", "interval": 10 + i % 50}}})


def reported_payload(i: int) -> bytes:
    reported = {
        "temperature": 18.0 + (i % 997) / 10,
        "humidity": 30.0 + (i % 991) / 20,
        "pressure": 990.0 + (i % 983) / 10,
        "voltage": 3.0 + (i % 701) / 1000,
        "rssi": -40 - i % 60,
    }
    return orjson.dumps({"state": {"reported": reported}})


def load_shadows(count: int) -> dict[str, Shadow]:
    shadows: dict[str, Shadow] = {}
    for i in range(count):
        key = shadow_key(thing_name(i))
        shadow = apply_update(None, desired_payload(i), START_TIME + i % 1000).shadow
        shadow = apply_update(shadow, reported_payload(i), START_TIME + 1 + i % 1000).shadow
        shadows[key] = shadow
    return shadows


def load_dicts(count: int) -> dict[str, Any]:
    documents: dict[str, Any] = {}
    for i in range(count):
        shadow = apply_update(None, desired_payload(i), START_TIME + i % 1000).shadow
        shadow = apply_update(shadow, reported_payload(i), START_TIME + 1 + i % 1000).shadow
        document = shadow.document(START_TIME)
        del document["timestamp"]
        del document["state"]["delta"]
        del document["metadata"]["delta"]
        documents[thing_name(i)] = orjson.loads(orjson.dumps(document))
    return documents


def measure(mode: str, count: int) -> dict[str, Any]:
    loader = load_shadows if mode == "shadow" else load_dicts
    gc.collect()
    before = resident_bytes()
    started = time.perf_counter()
    stored = loader(count)
    elapsed = time.perf_counter() - started
    gc.collect()
    after = resident_bytes()
    assert len(stored) == count
    return {
        "mode": mode,
        "count": count,
        "bytes_per_shadow": (after - before) / count,
        "load_seconds": elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1_000_000, help="shadows to load")
    parser.add_argument(
        "--compare", action="store_true", help="also measure plain nested dicts, for comparison"
    )
    parser.add_argument("--mode", choices=["shadow", "dict"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.mode is not None:
        print(json.dumps(measure(args.mode, args.count)))
        return

    modes = ["shadow", "dict"] if args.compare else ["shadow"]
    rows = []
    for mode in modes:
        command = [sys.executable, __file__, "--mode", mode, "--count", str(args.count)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(output))

    print(f"{args.count:,} shadows: 5 reported numbers, 2 desired values, metadata, map entry")
    print("| storage | RSS bytes per shadow | load time s |")
    print("| --- | --- | --- |")
    labels = {"shadow": "Shadow (compact)", "dict": "plain nested dicts"}
    for row in rows:
        print(
            f"| {labels[row['mode']]} | {row['bytes_per_shadow']:.0f} | {row['load_seconds']:.1f} |"
        )


if __name__ == "__main__":
    main()
