"""The spread of new connections over the workers of ``ironshadow serve --workers N``.

Every worker accepts from the same listening socket, and a TLS or WebSocket client stays on
the worker that accepted it, so this spread decides how those clients are balanced. The
script starts an engine (``--memory-only true --sys-interval 0.5``) and opens MQTT
connections with empty client ids, which are never handed to another worker: first
``--sequential`` of them one after another, then ``--burst`` more from 4 threads at once. After
each step a new reader connection reads ``$SYS/broker/workers/+/clients/connected`` and the
script prints each worker's count. The reader itself counts on the worker that accepted it,
so each step's total is one more than its connections.

Usage (from the repository root)::

    .venv/bin/python benchmarks/accept_spread.py
    .venv/bin/python benchmarks/accept_spread.py --workers 3 --sequential 150 --burst 200

All traffic goes to 127.0.0.0/8, to the engine this script starts.
"""

from __future__ import annotations

import argparse
import socket
import threading
import time
from collections.abc import Sequence

import paho.mqtt.client as paho
from support import (
    BenchmarkError,
    RunningBroker,
    add_ironshadow_cmd_argument,
    encode_connect,
    make_ironshadow_spec,
)
from workers import wait_for_workers

BROKER_START_TIMEOUT_S = 60.0
BROKER_STOP_TIMEOUT_S = 60.0
SYS_INTERVAL_S = 0.5
# Threads that open the burst's connections at once.
BURST_THREADS = 4
# Keep alive of the connections, in seconds: longer than the run.
KEEPALIVE_S = 600
# Seconds that the reader listens to the per-worker figures: several intervals, then until
# every worker's figure has come, up to the timeout.
READ_WINDOW_S = 4 * SYS_INTERVAL_S
READ_TIMEOUT_S = 20.0


def connect(port: int) -> socket.socket:
    """Open an MQTT 3.1.1 connection with an empty client id and wait for its CONNACK."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(encode_connect("", KEEPALIVE_S))
    connack = sock.recv(4)
    if len(connack) < 4 or connack[0] != 0x20 or connack[3] != 0:
        sock.close()
        raise BenchmarkError(f"the engine did not accept a connection: CONNACK {connack!r}")
    return sock


def connected_per_worker(port: int, workers: int) -> list[int]:
    """Return the latest clients/connected figure of each worker, which counts the reader
    on one of them."""
    figures: dict[int, int] = {}

    def received(_client: paho.Client, _userdata: object, message: paho.MQTTMessage) -> None:
        figures[int(message.topic.split("/")[3])] = int(message.payload)

    reader = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="", protocol=paho.MQTTv5)
    reader.on_message = received
    reader.connect("127.0.0.1", port)
    reader.loop_start()
    reader.subscribe("$SYS/broker/workers/+/clients/connected")
    time.sleep(READ_WINDOW_S)
    deadline = time.monotonic() + READ_TIMEOUT_S
    while len(figures) < workers and time.monotonic() < deadline:
        time.sleep(0.1)
    counts = [figures.get(worker, 0) for worker in range(workers)]
    reader.disconnect()
    reader.loop_stop()
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=3, help="engine workers (default 3)")
    parser.add_argument(
        "--sequential", type=int, default=150, help="connections opened one after another"
    )
    parser.add_argument("--burst", type=int, default=200, help="connections opened at once")
    add_ironshadow_cmd_argument(parser)
    args = parser.parse_args(argv)

    extra = f"--workers {args.workers} --sys-interval {SYS_INTERVAL_S} --memory-only true"
    spec = make_ironshadow_spec(args.ironshadow_cmd, extra)
    clients: list[socket.socket] = []
    with RunningBroker(
        spec,
        start_timeout_s=BROKER_START_TIMEOUT_S,
        stop_timeout_s=BROKER_STOP_TIMEOUT_S,
        tempdir_prefix="accept-spread",
    ) as broker:
        wait_for_workers(broker, args.workers)
        try:
            for _ in range(args.sequential):
                clients.append(connect(broker.port))
            after_sequential = connected_per_worker(broker.port, args.workers)

            def burst(count: int) -> None:
                for _ in range(count):
                    clients.append(connect(broker.port))

            threads = [
                threading.Thread(target=burst, args=(args.burst // BURST_THREADS,))
                for _ in range(BURST_THREADS)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            after_burst = connected_per_worker(broker.port, args.workers)
        finally:
            for client in clients:
                client.close()
    burst_count = BURST_THREADS * (args.burst // BURST_THREADS)
    print(f"{args.sequential} one after another, and a reader: {after_sequential} per worker")
    print(f"{burst_count} more at once, and a reader: {after_burst} per worker")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
