"""Measure the RSS of ``ironshadow serve`` holding N shadows created over MQTT.

The script starts a fresh engine on free loopback ports in a temporary data folder, records
its resident set size (VmRSS from /proc/<pid>/status) once its HTTP API responds, and then
creates --shadows shadows over MQTT 3.1.1. --connections loader connections, with client ids
``loader-0``, ``loader-1``... that are not thing names, publish QoS 1 updates to
``$aws/things/device-NNNNNNN/shadow/update``. Each thing gets one update with five reported
numbers, the document of benchmarks/shadow_memory.py. With --desired it first gets an
update that sets that script's two desired values, so each shadow then has the same state
and metadata as there.

Each connection keeps at most 10 updates without PUBACK, because the engine rejects an
eleventh request in flight on one connection with 429, as AWS IoT does. The engine sends the
PUBACK only once the update is applied and, with its stores, durable. The loaders subscribe
to nothing, so the engine builds no reply.

When every update has its PUBACK, the script reads the engine's /metrics and checks that
``ironshadow_shadows`` and ``ironshadow_shadow_updates_total`` match what it sent. It reports
the time to create the shadows, the update rate, and the engine's RSS at the end and once
idle: with the loaders disconnected, the SQLite history caught up (embedded stores only) and
--idle seconds more. The growth per shadow is the RSS at the end (or idle) less the
baseline, divided by --shadows. The CPU seconds of the engine, of this script and of the
rest of the host during the load show how busy the machine was. A progress line goes to
stderr every 10 s.

Usage (from the repository root)::

    .venv/bin/python benchmarks/million_shadows.py                 # 1,000,000 shadows
    .venv/bin/python benchmarks/million_shadows.py --shadows 100000 --memory-only
    .venv/bin/python benchmarks/million_shadows.py --desired --json

The engine runs with its defaults (embedded journal and SQLite history in the temporary data
folder) unless --memory-only is given. All traffic goes to 127.0.0.1, to the engine that
this script starts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import cast

from shadow_memory import desired_payload, reported_payload, thing_name
from support import (
    BROKER_HOST,
    CLOCK_TICKS_PER_S,
    CONNACK,
    DISCONNECT_PACKET,
    MAX_PACKET_ID,
    PUBACK,
    BenchmarkError,
    ProtocolError,
    RunningBroker,
    add_ironshadow_cmd_argument,
    encode_connect,
    encode_publish,
    host_cpu_ticks,
    make_ironshadow_spec,
    positive_float,
    positive_int,
    process_memory_bytes,
    process_tree_cpu_seconds,
    split_evenly,
    split_packets,
    uvloop,
)

DEFAULT_SHADOWS = 1_000_000
DEFAULT_CONNECTIONS = 32
DEFAULT_IDLE_S = 5.0
# The engine's limit of shadow requests in flight on one connection (429 above it, as on
# AWS IoT). A PUBACK comes after the request is applied, so a loader that waits for PUBACKs
# never has more than this many in flight.
MAX_IN_FLIGHT = 10
KEEPALIVE_S = 60
PROGRESS_INTERVAL_S = 10.0
# The load fails when no PUBACK arrives for this long.
STALL_TIMEOUT_S = 120.0
CONNECT_TIMEOUT_S = 30.0
BROKER_START_TIMEOUT_S = 60.0
# Closing the embedded stores may fsync and compact a large journal.
BROKER_STOP_TIMEOUT_S = 120.0
HTTP_TIMEOUT_S = 30.0
# The engine's HTTP API opens a moment after its MQTT listener.
HTTP_READY_TIMEOUT_S = 30.0
# Time between the API's first response and the baseline RSS, for start-up work to settle.
BASELINE_SETTLE_S = 1.0
# With the embedded stores the SQLite history lags behind the updates, and the rows it has
# not committed yet wait in memory. The idle phase starts once they are committed.
HISTORY_DRAIN_TIMEOUT_S = 300.0
HISTORY_POLL_INTERVAL_S = 1.0
BYTES_PER_MIB = 1024 * 1024


# --- Loader connections --------------------------------------------------------------


@dataclass
class Tally:
    """Counts shared by all loader connections."""

    sent: int = 0
    acknowledged: int = 0


class LoaderConnection(asyncio.Protocol):
    """One loader's MQTT 3.1.1 connection: creates the shadows of a slice of the things.

    After CONNACK it publishes the updates of things first_thing.. in order, at QoS 1,
    with at most MAX_IN_FLIGHT of them waiting for their PUBACK. ``done`` completes when
    every update of the slice has its PUBACK, and fails when the engine rejects the
    connection, closes it or sends a packet that the loader did not expect.
    """

    def __init__(
        self, client_id: str, first_thing: int, things: int, with_desired: bool, tally: Tally
    ) -> None:
        self.client_id = client_id
        self.first_thing = first_thing
        self.updates_per_thing = 2 if with_desired else 1
        self.total = things * self.updates_per_thing
        self.tally = tally
        self.next_update = 0
        self.acknowledged = 0
        self.packet_id = 0
        self.unacknowledged: set[int] = set()
        self.transport: asyncio.Transport | None = None
        self.stopping = False
        self._partial = b""
        loop = asyncio.get_running_loop()
        self.connack: asyncio.Future[None] = loop.create_future()
        self.done: asyncio.Future[None] = loop.create_future()
        if self.total == 0:
            self.done.set_result(None)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transport implements asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(encode_connect(self.client_id, KEEPALIVE_S))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.stopping:
            self.fail(
                BenchmarkError(
                    f"{self.client_id}: the engine closed the connection after"
                    f" {self.acknowledged:,} of {self.total:,} PUBACKs:"
                    f" {exc or 'end of stream'}"
                )
            )

    def fail(self, error: Exception) -> None:
        for future in (self.connack, self.done):
            if not future.done():
                future.set_exception(error)

    def data_received(self, data: bytes) -> None:
        if self._partial:
            data = self._partial + data
        try:
            position = split_packets(data, self.handle_packet)
        except (BenchmarkError, ProtocolError) as error:
            self.fail(error)
            self.close()
            return
        self._partial = data[position:]
        if self.connack.done() and not self.done.done():
            self.send_allowed()

    def handle_packet(self, first_byte: int, data: bytes, body_start: int, body_end: int) -> None:
        packet_type = first_byte >> 4
        if packet_type == PUBACK:
            packet_id = int.from_bytes(data[body_start : body_start + 2], "big")
            if packet_id not in self.unacknowledged:
                raise ProtocolError(f"{self.client_id}: PUBACK for unknown packet id {packet_id}")
            self.unacknowledged.remove(packet_id)
            self.acknowledged += 1
            self.tally.acknowledged += 1
            if self.acknowledged == self.total:
                self.done.set_result(None)
        elif packet_type == CONNACK:
            return_code = data[body_start + 1]
            if return_code != 0:
                raise BenchmarkError(f"{self.client_id}: CONNACK return code {return_code}")
            self.connack.set_result(None)
        else:
            raise ProtocolError(f"{self.client_id}: unexpected packet of type {packet_type}")

    def send_allowed(self) -> None:
        """Publish the next updates while fewer than MAX_IN_FLIGHT wait for their PUBACK."""
        assert self.transport is not None
        packets = []
        while len(self.unacknowledged) < MAX_IN_FLIGHT and self.next_update < self.total:
            thing_number, step = divmod(self.next_update, self.updates_per_thing)
            thing_number += self.first_thing
            if step == 0 and self.updates_per_thing == 2:
                payload = desired_payload(thing_number)
            else:
                payload = reported_payload(thing_number)
            self.packet_id = self.packet_id % MAX_PACKET_ID + 1
            self.unacknowledged.add(self.packet_id)
            topic = f"$aws/things/{thing_name(thing_number)}/shadow/update"
            packets.append(encode_publish(topic, payload, 1, self.packet_id))
            self.next_update += 1
        if packets:
            self.transport.write(b"".join(packets))
            self.tally.sent += len(packets)

    def close(self) -> None:
        self.stopping = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(DISCONNECT_PACKET)
            self.transport.close()


async def create_shadows(
    port: int,
    shadows: int,
    connections: int,
    with_desired: bool,
    report_progress: Callable[[Tally, float], None],
) -> float:
    """Create the shadows over `connections` loader connections; return the seconds taken.

    The time runs from the first CONNECT to the last PUBACK. report_progress(tally, elapsed)
    is called every PROGRESS_INTERVAL_S, and may raise to end the load.
    """
    loop = asyncio.get_running_loop()
    tally = Tally()
    loaders = [
        LoaderConnection(f"loader-{index}", first, count, with_desired, tally)
        for index, (first, count) in enumerate(split_evenly(shadows, connections))
    ]
    started = time.perf_counter()
    try:
        for loader in loaders:
            await loop.create_connection(lambda loader=loader: loader, BROKER_HOST, port)
        try:
            await asyncio.wait_for(
                asyncio.gather(*(loader.connack for loader in loaders)), CONNECT_TIMEOUT_S
            )
        except TimeoutError:
            raise BenchmarkError(f"no CONNACK within {CONNECT_TIMEOUT_S:.0f} s") from None
        for loader in loaders:
            loader.send_allowed()

        everything = asyncio.gather(*(loader.done for loader in loaders))
        last_count = 0
        last_change = time.perf_counter()
        while True:
            finished, _ = await asyncio.wait({everything}, timeout=PROGRESS_INTERVAL_S)
            if finished:
                everything.result()  # raises the first loader's error
                return time.perf_counter() - started
            now = time.perf_counter()
            if tally.acknowledged != last_count:
                last_count, last_change = tally.acknowledged, now
            elif now - last_change > STALL_TIMEOUT_S:
                raise BenchmarkError(
                    f"no PUBACK for {STALL_TIMEOUT_S:.0f} s, after {tally.acknowledged:,}"
                    f" of {tally.sent:,} updates sent"
                )
            report_progress(tally, now - started)
    finally:
        for loader in loaders:
            loader.close()


def run_load(
    port: int,
    shadows: int,
    connections: int,
    with_desired: bool,
    report_progress: Callable[[Tally, float], None],
) -> float:
    load = create_shadows(port, shadows, connections, with_desired, report_progress)
    if uvloop is not None:
        return uvloop.run(load)
    return asyncio.run(load)


# --- Engine measurements -------------------------------------------------------------


def http_port_of(command: list[str]) -> int:
    """Return the value of --http-port in the engine's command line."""
    try:
        return int(command[command.index("--http-port") + 1])
    except (ValueError, IndexError):
        raise BenchmarkError(
            "the engine command has no --http-port PORT, so /metrics cannot be read:"
            " keep {http_port} in --ironshadow-cmd"
        ) from None


def read_metrics(http_port: int) -> dict[str, float]:
    """Return the samples without labels from the engine's /metrics, by name."""
    url = f"http://{BROKER_HOST}:{http_port}/metrics"
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line.startswith("#") or "{" in line:
            continue
        name, _, value = line.partition(" ")
        if value:
            samples[name] = float(value)
    return samples


def wait_for_metrics(broker: RunningBroker, http_port: int) -> dict[str, float]:
    deadline = time.monotonic() + HTTP_READY_TIMEOUT_S
    while True:
        broker.check_running()
        try:
            return read_metrics(http_port)
        except (urllib.error.URLError, ConnectionError) as error:
            if time.monotonic() > deadline:
                raise BenchmarkError(
                    f"GET /metrics on port {http_port} failed for {HTTP_READY_TIMEOUT_S:.0f} s:"
                    f" {error}"
                ) from None
        time.sleep(0.2)


def wait_for_history(http_port: int) -> float:
    """Wait until the engine's history outbox is empty; return the seconds waited.

    Returns at once for an engine without stores, whose /metrics has no outbox gauge.
    """
    started = time.monotonic()
    while (rows := read_metrics(http_port).get("ironshadow_history_outbox_rows", 0)) > 0:
        if time.monotonic() - started > HISTORY_DRAIN_TIMEOUT_S:
            raise BenchmarkError(
                f"timed out after {HISTORY_DRAIN_TIMEOUT_S:.0f} s waiting for the history"
                f" outbox to empty: {rows:,.0f} rows remain"
            )
        time.sleep(HISTORY_POLL_INTERVAL_S)
    return time.monotonic() - started


def rss_bytes(pid: int) -> int:
    value = process_memory_bytes(pid, "VmRSS")
    if value is None:
        raise BenchmarkError(f"cannot read VmRSS of the engine (PID {pid})")
    return value


def folder_bytes(folder: Path) -> int:
    return sum(entry.stat().st_size for entry in folder.rglob("*") if entry.is_file())


@dataclass
class Result:
    stores: str
    shadows: int
    updates: int
    connections: int
    create_s: float
    updates_per_s: float
    rss_baseline_mib: float
    rss_end_mib: float
    rss_idle_mib: float
    rss_peak_mib: float
    rss_anon_idle_mib: float
    bytes_per_shadow_end: float
    bytes_per_shadow_idle: float
    engine_cpu_s: float
    engine_us_per_update: float
    generator_cpu_s: float
    other_cpu_s: float
    history_outbox_rows_end: float | None
    history_drain_s: float
    data_folder_mib: float


def measure(arguments: argparse.Namespace) -> Result:
    extra = "--log-level WARNING"
    if arguments.memory_only:
        extra += " --memory-only true"
    spec = make_ironshadow_spec(arguments.ironshadow_cmd, extra)
    shadows = arguments.shadows
    updates = shadows * (2 if arguments.desired else 1)
    with RunningBroker(
        spec,
        start_timeout_s=BROKER_START_TIMEOUT_S,
        stop_timeout_s=BROKER_STOP_TIMEOUT_S,
        tempdir_prefix="million-shadows",
    ) as broker:
        http_port = http_port_of(broker.command)
        wait_for_metrics(broker, http_port)
        time.sleep(BASELINE_SETTLE_S)
        baseline = rss_bytes(broker.pid)
        print(
            f"engine PID {broker.pid}, MQTT port {broker.port}, HTTP port {http_port}:"
            f" RSS {baseline / BYTES_PER_MIB:.1f} MiB after start",
            file=sys.stderr,
            flush=True,
        )

        def report_progress(tally: Tally, elapsed_s: float) -> None:
            broker.check_running()
            rss = process_memory_bytes(broker.pid, "VmRSS") or 0
            print(
                f"{elapsed_s:6.0f} s: {tally.acknowledged:,} of {updates:,} updates"
                f" acknowledged ({tally.acknowledged / elapsed_s:,.0f}/s),"
                f" engine RSS {rss / BYTES_PER_MIB:,.1f} MiB",
                file=sys.stderr,
                flush=True,
            )

        engine_cpu_before = process_tree_cpu_seconds(broker.pid)
        own_cpu_before = time.process_time()
        host_busy_before, _ = host_cpu_ticks()
        try:
            create_s = run_load(
                broker.port, shadows, arguments.connections, arguments.desired, report_progress
            )
        except (OSError, ProtocolError) as error:
            raise BenchmarkError(f"{error}. Engine output:\n{broker.log_tail()}") from error
        rss_end = rss_bytes(broker.pid)
        engine_cpu_s = process_tree_cpu_seconds(broker.pid) - engine_cpu_before
        generator_cpu_s = time.process_time() - own_cpu_before
        host_busy_after, _ = host_cpu_ticks()
        host_busy_s = (host_busy_after - host_busy_before) / CLOCK_TICKS_PER_S

        metrics_end = read_metrics(http_port)
        shadow_count = int(metrics_end.get("ironshadow_shadows", -1))
        updates_applied = int(metrics_end.get("ironshadow_shadow_updates_total", -1))
        if shadow_count != shadows or updates_applied != updates:
            raise BenchmarkError(
                f"expected {shadows:,} shadows and {updates:,} applied updates, but /metrics"
                f" shows {shadow_count:,} and {updates_applied:,} (-1: metric missing)"
            )
        print(
            f"{shadows:,} shadows created in {create_s:.1f} s; waiting for the history,"
            f" then idle for {arguments.idle:g} s",
            file=sys.stderr,
            flush=True,
        )
        history_drain_s = wait_for_history(http_port)
        time.sleep(arguments.idle)
        rss_idle = rss_bytes(broker.pid)
        return Result(
            stores="memory only" if arguments.memory_only else "embedded (default)",
            shadows=shadows,
            updates=updates,
            connections=arguments.connections,
            create_s=create_s,
            updates_per_s=updates / create_s,
            rss_baseline_mib=baseline / BYTES_PER_MIB,
            rss_end_mib=rss_end / BYTES_PER_MIB,
            rss_idle_mib=rss_idle / BYTES_PER_MIB,
            rss_peak_mib=(process_memory_bytes(broker.pid, "VmHWM") or 0) / BYTES_PER_MIB,
            rss_anon_idle_mib=(process_memory_bytes(broker.pid, "RssAnon") or 0) / BYTES_PER_MIB,
            bytes_per_shadow_end=(rss_end - baseline) / shadows,
            bytes_per_shadow_idle=(rss_idle - baseline) / shadows,
            engine_cpu_s=engine_cpu_s,
            engine_us_per_update=engine_cpu_s / updates * 1e6,
            generator_cpu_s=generator_cpu_s,
            other_cpu_s=host_busy_s - engine_cpu_s - generator_cpu_s,
            history_outbox_rows_end=metrics_end.get("ironshadow_history_outbox_rows"),
            history_drain_s=history_drain_s,
            data_folder_mib=folder_bytes(broker.workdir / "data") / BYTES_PER_MIB,
        )


def print_report(result: Result) -> None:
    shape = "5 reported numbers"
    if result.updates > result.shadows:
        shape += " and 2 desired values"
    print(
        f"stores {result.stores}: {result.shadows:,} shadows ({shape}),"
        f" {result.updates:,} QoS 1 updates over {result.connections} connections"
    )
    print(f"create: {result.create_s:.1f} s ({result.updates_per_s:,.0f} updates/s)")
    print(
        f"engine RSS: {result.rss_baseline_mib:,.1f} MiB after start,"
        f" {result.rss_end_mib:,.1f} MiB at the end, {result.rss_idle_mib:,.1f} MiB idle"
        f" (RssAnon {result.rss_anon_idle_mib:,.1f} MiB),"
        f" peak {result.rss_peak_mib:,.1f} MiB"
    )
    print(
        f"bytes per shadow: {result.bytes_per_shadow_end:,.0f} at the end,"
        f" {result.bytes_per_shadow_idle:,.0f} idle"
    )
    print(
        f"CPU during the load: engine {result.engine_cpu_s:.1f} s"
        f" ({result.engine_us_per_update:.1f} µs per update), this script"
        f" {result.generator_cpu_s:.1f} s, rest of the host {result.other_cpu_s:.1f} s"
    )
    if result.history_outbox_rows_end is not None:
        print(
            f"history outbox: {result.history_outbox_rows_end:,.0f} rows at the end,"
            f" committed {result.history_drain_s:.1f} s later"
        )
    print(f"data folder: {result.data_folder_mib:,.1f} MiB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shadows",
        type=positive_int,
        default=DEFAULT_SHADOWS,
        help="shadows to create (default %(default)s)",
    )
    parser.add_argument(
        "--connections",
        type=positive_int,
        default=DEFAULT_CONNECTIONS,
        help="loader connections, each with at most 10 updates in flight (default %(default)s)",
    )
    parser.add_argument(
        "--desired",
        action="store_true",
        help="also set two desired values per shadow, with one more update before the reported"
        " one, as benchmarks/shadow_memory.py does",
    )
    parser.add_argument(
        "--memory-only",
        action="store_true",
        help="start the engine with --memory-only true (default: its embedded stores)",
    )
    parser.add_argument(
        "--idle",
        type=positive_float,
        default=DEFAULT_IDLE_S,
        help="seconds to wait, after the load and the history, before the idle RSS reading"
        " (default %(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line")
    add_ironshadow_cmd_argument(parser)
    arguments = parser.parse_args(argv)

    try:
        result = measure(arguments)
    except BenchmarkError as error:
        print(f"million_shadows: error: {error}", file=sys.stderr)
        return 1
    if arguments.json:
        print(json.dumps(asdict(result)))
    else:
        print_report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
