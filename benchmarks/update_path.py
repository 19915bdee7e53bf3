"""Measure the engine's Python work per shadow update, from the bytes read to the update applied.

A swarm run measures the whole engine process, whose CPU per update on this 2-core machine
varies by 5 to 10 % from run to run with the rest of the machine. To compare two versions
of the message path, this script runs only the path, in this process and without sockets:
a memory-only engine on uvloop, whose devices are ``MQTTConnection`` objects on transports
that count the bytes written and send nothing. Each round gives every device one PUBLISH
of a reported-state update to its own shadow topic, ``--per-iteration`` devices per event-loop
iteration, as a loaded engine reads several connections per iteration. The time is
``time.process_time`` over the rounds, divided by the updates applied, so it leaves out
the kernel's socket work and the event loop's polling, which a change of the path does not
touch. The table shows the best and the median of ``--repeat`` runs.

Usage (from the repository root)::

    .venv/bin/python benchmarks/update_path.py
    .venv/bin/python benchmarks/update_path.py --devices 2000 --rounds 20 --qos 1

Run it against another checkout with ``PYTHONPATH=/path/to/checkout/src``; the first line
printed names the package that was measured.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from typing import Any

import orjson
import uvloop

import ironshadow
from ironshadow.broker.config import BrokerConfig
from ironshadow.broker.connection import MQTTConnection
from ironshadow.engine import Engine
from ironshadow.mqtt.constants import MQTT_3_1_1
from ironshadow.mqtt.packets import Connect, Publish

# Seconds that the engine gets to admit every device before the run starts.
ADMIT_SECONDS = 30.0


class CountingTransport(asyncio.Transport):
    """A transport that counts what the engine writes and sends nothing."""

    def __init__(self, port: int) -> None:
        super().__init__()
        self.peer = ("127.0.0.1", port)
        self.written = 0
        self.closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += len(data)

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.written += len(data)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True


def update_packets(thing: str, qos: int, count: int) -> list[bytes]:
    """Return ``count`` encoded PUBLISH packets of reported updates for ``thing``, each with
    five numbers of which the first changes."""
    packets = []
    for number in range(count):
        state = {
            "temperature": 20.0 + number / 10,
            "humidity": 41.5,
            "pressure": 1013.2,
            "voltage": 3.29,
            "rssi": -61,
        }
        payload = orjson.dumps({"state": {"reported": state}})
        packet = Publish(
            f"$aws/things/{thing}/shadow/update", payload, qos, packet_id=(number % 65535) + 1
        )
        packets.append(packet.encode(MQTT_3_1_1))
    return packets


async def run_once(devices: int, rounds: int, per_iteration: int, qos: int) -> float:
    """Return the CPU seconds per applied update of one run."""
    engine = Engine(BrokerConfig(port=0, sys_interval=0))
    await engine.start()
    try:
        connections = []
        for number in range(devices):
            connection = MQTTConnection(engine.broker)
            connection.connection_made(CountingTransport(40000 + number))
            connection.data_received(Connect(f"sensor-{number}").encode())
            connections.append(connection)
        # Let the engine admit every CONNECT. The shadow service's own session is one more.
        deadline = time.monotonic() + ADMIT_SECONDS
        while len(engine.broker.sessions) < devices + 1:
            if time.monotonic() > deadline:
                raise SystemExit(
                    f"only {len(engine.broker.sessions) - 1} of {devices} devices were admitted "
                    f"within {ADMIT_SECONDS:g} s; the engine's log lines above say why"
                )
            await asyncio.sleep(0)
        packets = [update_packets(f"sensor-{number}", qos, rounds) for number in range(devices)]
        applied_before = engine.shadows.updates_applied
        started = time.process_time()
        for round_number in range(rounds):
            for first in range(0, devices, per_iteration):
                for number in range(first, min(first + per_iteration, devices)):
                    connections[number].data_received(packets[number][round_number])
                # The shadow service applies what arrived at the next loop iteration.
                await asyncio.sleep(0)
        await asyncio.sleep(0)
        elapsed = time.process_time() - started
        applied = engine.shadows.updates_applied - applied_before
        if applied != devices * rounds:
            raise SystemExit(
                f"only {applied} of {devices * rounds} updates were applied, so the figure "
                "would be wrong; the engine's log lines above say what it rejected"
            )
        return elapsed / applied
    finally:
        await engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=10, help="updates per device per run")
    parser.add_argument("--per-iteration", type=int, default=30, help="updates per loop iteration")
    parser.add_argument("--qos", type=int, choices=(0, 1), default=0)
    parser.add_argument("--repeat", type=int, default=7, help="runs, each with a new engine")
    args = parser.parse_args()
    print(f"ironshadow from {ironshadow.__file__}, Python {sys.version.split()[0]}")
    results = [
        uvloop.run(run_once(args.devices, args.rounds, args.per_iteration, args.qos))
        for _ in range(args.repeat)
    ]
    microseconds = [seconds * 1e6 for seconds in results]
    print(
        f"{args.devices} devices, {args.rounds} rounds, {args.per_iteration} updates per "
        f"iteration, QoS {args.qos}: µs per update best {min(microseconds):.2f}, "
        f"median {statistics.median(microseconds):.2f}"
    )


if __name__ == "__main__":
    main()
