"""Measure the CPU cost of applying shadow updates with the pure shadow logic.

Each case applies a stream of pre-encoded update payloads to one typical small shadow,
feeding every result's shadow into the next update, as the engine does for a device that
keeps reporting. The cost includes parsing the request JSON, the checks, the merge, the
metadata, the delta check and building the new ``Shadow``. The columns to the right add
the reply payloads, which the engine builds only when a client subscribes to them. Every update
runs one second after the previous one, so metadata timestamps change on every update.

The typical shadow reports five numbers (temperature, humidity, pressure, voltage, rssi);
the cases with desired state also hold two desired values (mode, interval).

Cases:

* ``reported 5/5``: the device reports all five numbers, and the shadow has no desired.
* ``reported 5/5, desired``: the same with two desired values, so the delta is checked.
* ``reported 2/5, desired``: only two numbers change, so metadata holds two timestamps.
* ``desired -> delta``: an application changes a desired value that the device has not
  reported yet, so every update leaves a delta; the last column includes update/delta.

CPU time is ``time.process_time`` over the loop, divided by the number of updates; the
table shows the best and the median of ``--repeat`` runs. Garbage collection stays on.

Usage (from the repository root)::

    .venv/bin/python benchmarks/shadow_apply.py
    .venv/bin/python benchmarks/shadow_apply.py --updates 500000 --repeat 7
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import orjson

from ironshadow.shadow import Shadow, UpdateResult, apply_update

START_TIME = 1_700_000_000
PAYLOAD_VARIANTS = 256  # distinct payloads per case, cycled


@dataclass
class Case:
    name: str
    initial: dict
    payloads: list[bytes]


def reported_payloads(fields: int) -> list[bytes]:
    payloads = []
    for i in range(PAYLOAD_VARIANTS):
        reported = {
            "temperature": round(21.0 + i / 10, 2),
            "humidity": round(40.0 + i / 7, 2),
            "pressure": round(1013.0 + i / 3, 2),
            "voltage": round(3.3 - i / 1000, 3),
            "rssi": -60 - i % 20,
        }
        reported = dict(list(reported.items())[:fields])
        payloads.append(orjson.dumps({"state": {"reported": reported}}))
    return payloads


def desired_payloads() -> list[bytes]:
    return [
        orjson.dumps({"state": {"desired": {"interval": 10 + i}}, "clientToken": f"app-{i}"})
        for i in range(PAYLOAD_VARIANTS)
    ]


REPORTED = {"temperature": 21.0, "humidity": 40.0, "pressure": 1013.0, "voltage": 3.3, "rssi": -60}
DESIRED = {"mode": "eco", "interval": 30}

CASES = [
    Case("reported 5/5", {"reported": REPORTED}, reported_payloads(5)),
    Case("reported 5/5, desired", {"desired": DESIRED, "reported": REPORTED}, reported_payloads(5)),
    Case("reported 2/5, desired", {"desired": DESIRED, "reported": REPORTED}, reported_payloads(2)),
    Case("desired -> delta", {"desired": DESIRED, "reported": REPORTED}, desired_payloads()),
]


def apply_only(result: UpdateResult) -> None:
    pass


def with_accepted(result: UpdateResult) -> None:
    result.accepted_payload()


def with_all_replies(result: UpdateResult) -> None:
    result.accepted_payload()
    result.delta_payload()
    result.documents_payload()


def run_once(case: Case, updates: int, replies: Callable[[UpdateResult], None]) -> float:
    """Return the CPU microseconds per update of one run."""
    shadow = Shadow.from_state(case.initial, 1, timestamp=START_TIME)
    payloads = case.payloads
    mask = len(payloads) - 1
    start = time.process_time()
    for i in range(updates):
        result = apply_update(shadow, payloads[i & mask], START_TIME + i)
        replies(result)
        shadow = result.shadow
    return (time.process_time() - start) / updates * 1e6


def measure(case: Case, updates: int, repeat: int, replies: Callable) -> tuple[float, float]:
    run_once(case, updates // 10, replies)  # warm-up
    runs = [run_once(case, updates, replies) for _ in range(repeat)]
    return min(runs), statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--updates", type=int, default=200_000, help="updates per run")
    parser.add_argument("--repeat", type=int, default=5, help="runs per case and column")
    args = parser.parse_args()

    columns = [("apply_update", apply_only), ("+ accepted", with_accepted)]
    columns.append(("+ all replies", with_all_replies))
    header = ["case", *[f"{name} µs best / median" for name, _ in columns]]
    print(f"{args.updates:,} updates per run, {args.repeat} runs; CPU µs per update")
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for case in CASES:
        cells = [case.name]
        for _, replies in columns:
            best, median = measure(case, args.updates, args.repeat, replies)
            cells.append(f"{best:.2f} / {median:.2f}")
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
