"""Measure the engine's CPU per shadow update at a fixed offered rate, for each storage setup.

The same load runs against four engine configurations, each a fresh engine on a free
loopback port:

* ``memory``: ``--memory-only true``, no store and no history,
* ``embedded``: the default, a journal and SQLite history in the engine's data folder,
* ``redis``: ``--redis URL``, with the history in SQLite in the data folder,
* ``redis-postgres``: ``--redis URL --postgres DSN``.

Redis and PostgreSQL are private servers that the script starts for each configuration
that needs them, on free loopback ports with their data in temporary folders, and stops by
PID. They are started by the storage tests' helpers (tests/storage/servers.py), so
redis-server runs without persistence and PostgreSQL with ``fsync`` and
``synchronous_commit`` off. Under root, PostgreSQL runs as the ``postgres`` user.

--devices devices connect once, each with its thing name as client id, and subscribe to
their own ``update/accepted`` and ``update/rejected`` at QoS 1. Each publishes
reported-state updates at QoS 1 to its own ``$aws/things/{thing}/shadow/update``, together
--rate updates per second. A device sends every devices/rate seconds on average, each
interval drawn uniformly from 50 % to 150 % of that, starting at a random phase, so the
sends do not line up. The pacing is open loop: a slow engine does not slow the devices
down, until a device has MAX_IN_FLIGHT updates without a response. It then skips its
turn, and the skipped sends are reported.

An update counts as applied when its ``update/accepted`` response reaches the device, as
in shadow.py. The report has, per configuration, the offered and applied updates per
second in the measurement window, the engine's CPU (the engine process and all its
threads, utime + stime from /proc/<pid>/stat) as a percentage of one core and in µs per
applied update, the CPU of the store servers apart (redis-server; the PostgreSQL
postmaster and every backend and auxiliary process under it), the PUBACK latency p50 and
p99 seen by the devices, and each configuration's engine µs per update divided by that of
``memory``. The engine sends a PUBACK only after the update's batch is durable in the hot
store, so the PUBACK latency includes the store's write.

Usage (from the repository root)::

    .venv/bin/python benchmarks/storage.py
    .venv/bin/python benchmarks/storage.py --rate 2000 --duration 5 --only memory,redis
    .venv/bin/python benchmarks/storage.py --json

The configurations that need redis-server or PostgreSQL's initdb and postgres are skipped,
with the reason, when those are not installed (Debian packages redis-server and
postgresql). The exit status is 1 if any configuration failed.

All traffic goes to 127.0.0.1, and only to servers that this script starts itself.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import multiprocessing
import os
import random
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from support import (
    PUBACK,
    READY,
    RESULT,
    START,
    STOP,
    BenchmarkError,
    ControlChannel,
    RunningBroker,
    Worker,
    add_ironshadow_cmd_argument,
    add_window_arguments,
    format_table,
    host_cpu_ticks,
    make_ironshadow_spec,
    matching_log_lines,
    positive_float,
    positive_int,
    process_cpu_seconds,
    process_tree_cpu_seconds,
    receive_message,
    run_worker,
    send_command,
    start_worker,
    stop_workers,
)

from shadow import (
    DRAIN_S,
    LOG_ERROR_PATTERN,
    MICROSECONDS_PER_S,
    DevicePackets,
    DeviceProtocol,
    SharedCounters,
    Tally,
    connect_device,
    encode_device_packets,
    setup_timeout_s,
    thing_name,
)

TESTS_STORAGE_DIR = Path(__file__).resolve().parents[1] / "tests" / "storage"

# Configuration name -> engine flags, with {redis_url} and {postgres_dsn} filled in.
CONFIGURATIONS = {
    "memory": "--memory-only true",
    "embedded": "",
    "redis": "--redis {redis_url}",
    "redis-postgres": "--redis {redis_url} --postgres {postgres_dsn}",
}
CONFIGURATION_LABELS = {
    "memory": "memory only",
    "embedded": "journal + SQLite",
    "redis": "Redis + SQLite",
    "redis-postgres": "Redis + PostgreSQL",
}
BASELINE = "memory"
TARGET_CONFIGURATION = "redis-postgres"
TARGET_RATIO = 1.30  # engine µs per update, redis-postgres ÷ memory, at most

DEFAULT_RATE = 5000.0
DEFAULT_DEVICES = 500
DEFAULT_DURATION_S = 15.0
DEFAULT_WARMUP_S = 3.0
ENGINE_LOG_LEVEL = "WARNING"

# Each device cycles through this many pre-encoded updates; at QoS 1 update i carries packet
# id i + 1. A device sends no update while MAX_IN_FLIGHT of its own are without a response
# or without PUBACK, so a packet id is never reused before its PUBACK arrives.
UPDATES_PER_DEVICE = 64
MAX_IN_FLIGHT = UPDATES_PER_DEVICE // 2
JITTER = 0.5  # each send interval is uniform in (1 - JITTER, 1 + JITTER) times the mean interval
QOS = 1

BROKER_START_TIMEOUT_S = 30.0
BROKER_STOP_TIMEOUT_S = 10.0
WORKER_STOP_TIMEOUT_S = 10.0
WORKER_STOP_GRACE_S = 5.0  # added to warm-up + duration for the worker's own deadline
RESULT_TIMEOUT_S = DRAIN_S + 10.0  # from STOP to the worker's RESULT message
MAX_CONCURRENT_CONNECTS = 20

# Thresholds for the notes printed under the table.
GENERATOR_SATURATED_PERCENT = 90.0  # of one core
HOST_SATURATED_PERCENT = 95.0  # of all cores
APPLIED_SHORTFALL = 0.98  # applied below this share of the target rate gets a note


# --- Load generator ------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Return the nearest-rank percentile of values sorted in ascending order."""
    rank = max(1, round(fraction * len(sorted_values) + 0.5))
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass(frozen=True)
class PaceSettings:
    """Settings that the parent passes to the generator process."""

    port: int
    devices: int
    rate: float  # updates per second, all devices together
    run_limit_s: float  # the worker stops by itself this long after START


class PacedDevice(DeviceProtocol):
    """A device that stays connected and sends one update every mean_interval_s on average.

    It records the PUBACK latency of every update whose PUBACK arrives while the parent's
    measuring flag is set.
    """

    def __init__(
        self,
        tally: Tally,
        packets: DevicePackets,
        mean_interval_s: float,
        measuring: ctypes.Array[ctypes.c_int],
        latencies_s: list[float],
    ) -> None:
        super().__init__(tally)
        self.packets = packets
        self.mean_interval_s = mean_interval_s
        self.measuring = measuring
        self.latencies_s = latencies_s
        self.sent = 0
        self.responses = 0
        self.pubacks = 0
        self.skipped = 0
        self.sent_at = [0.0] * UPDATES_PER_DEVICE  # perf_counter() per packet index
        self.next_at = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def start(self, first_at: float) -> None:
        """Schedule the first send at loop time first_at and each later one from there."""
        self.next_at = first_at
        self._timer = asyncio.get_running_loop().call_at(first_at, self._send_due)

    def stop_sending(self) -> None:
        self.stopping = True
        if self._timer is not None:
            self._timer.cancel()

    def _send_due(self) -> None:
        if self.stopping:
            return
        in_flight = max(self.sent - self.responses, self.sent - self.pubacks)
        if in_flight < MAX_IN_FLIGHT:
            index = self.sent % UPDATES_PER_DEVICE
            self.sent_at[index] = time.perf_counter()
            self.write(self.packets.updates[index])
            self.sent += 1
            self.tally.offered += 1
        else:
            self.skipped += 1
        # The schedule is absolute, so a late callback is followed by an early one and the
        # mean rate holds.
        self.next_at += self.mean_interval_s * random.uniform(1 - JITTER, 1 + JITTER)
        self._timer = asyncio.get_running_loop().call_at(self.next_at, self._send_due)

    def handle_packet(self, first_byte: int, data: bytes, body_start: int, body_end: int) -> None:
        if first_byte >> 4 == PUBACK:
            packet_id = (data[body_start] << 8) | data[body_start + 1]
            if self.measuring[0]:
                sent_at = self.sent_at[(packet_id - 1) % UPDATES_PER_DEVICE]
                self.latencies_s.append(time.perf_counter() - sent_at)
        super().handle_packet(first_byte, data, body_start, body_end)

    def on_response(self) -> None:
        self.responses += 1

    def on_puback(self) -> None:
        self.pubacks += 1

    def unanswered(self) -> int:
        return self.sent - self.responses


async def run_paced_devices(
    settings: PaceSettings,
    tally: Tally,
    control: ControlChannel,
    measuring: ctypes.Array[ctypes.c_int],
) -> None:
    """Connect the devices, pace their updates from START to STOP, then send a RESULT."""
    loop = asyncio.get_running_loop()
    mean_interval_s = settings.devices / settings.rate
    latencies_s: list[float] = []
    devices = []
    limit = asyncio.Semaphore(MAX_CONCURRENT_CONNECTS)

    async def connect(index: int) -> None:
        packets = encode_device_packets("ironshadow", thing_name(index), QOS, UPDATES_PER_DEVICE)
        device = PacedDevice(tally, packets, mean_interval_s, measuring, latencies_s)
        devices.append(device)
        async with limit:
            try:
                await connect_device(device, settings.port, packets)
            except (OSError, TimeoutError) as error:
                raise BenchmarkError(f"device {thing_name(index)}: {error}") from error

    await asyncio.gather(*(connect(index) for index in range(settings.devices)))
    control.send(READY)
    if await control.receive(setup_timeout_s(settings.devices)) != START:
        raise BenchmarkError("timed out waiting for the start command from the parent process")

    tally.start_syncing()
    started_at = loop.time()
    for device in devices:
        device.start(started_at + random.uniform(0, mean_interval_s))
    await control.receive(settings.run_limit_s)

    for device in devices:
        device.stop_sending()
    await asyncio.sleep(DRAIN_S)
    tally.unanswered = sum(device.unanswered() for device in devices)
    tally.stop_syncing()
    # The pipe is non-blocking while the event loop watches it, so the message must fit in
    # the pipe's buffer: the worker sends percentiles, not the samples.
    latencies_s.sort()
    control.send(
        RESULT,
        {
            "puback_p50_s": percentile(latencies_s, 0.50) if latencies_s else None,
            "puback_p99_s": percentile(latencies_s, 0.99) if latencies_s else None,
            "puback_samples": len(latencies_s),
            "skipped": sum(device.skipped for device in devices),
        },
    )
    for device in devices:
        device.close()


def worker_main(
    connection: Connection,
    settings: PaceSettings,
    counters: SharedCounters,
    measuring: ctypes.Array[ctypes.c_int],
) -> None:
    """Run the generator's devices and report failures to the parent."""
    control = ControlChannel(connection)

    async def run() -> None:
        tally = Tally(counters, 0)
        await run_paced_devices(settings, tally, control, measuring)
        await asyncio.sleep(0.1)  # let the DISCONNECT packets reach the engine
        tally.raise_protocol_error()

    run_worker(control, run)


# --- Store servers -------------------------------------------------------------------


@dataclass
class StoreServers:
    """The private store servers of one configuration, and the PIDs to read their CPU from."""

    redis_url: str = ""
    postgres_dsn: str = ""
    redis_pid: int | None = None
    postgres_pid: int | None = None  # the postmaster


class StoreUnavailable(Exception):
    """A store server that a configuration needs is not installed."""


@contextmanager
def start_store_servers(configuration: str) -> Iterator[StoreServers]:
    """Start the Redis and PostgreSQL servers that a configuration needs, and stop them after.

    Raises StoreUnavailable when one is not installed.
    """
    flags = CONFIGURATIONS[configuration]
    servers = StoreServers()
    if "{redis_url}" not in flags and "{postgres_dsn}" not in flags:
        yield servers
        return

    # The storage tests' helpers import pytest and call pytest.skip() when a server binary
    # is missing, so they are imported only when a store server is needed.
    sys.path.insert(0, str(TESTS_STORAGE_DIR))
    import pytest
    from servers import PostgresServer, RedisServer

    with ExitStack() as stack:
        try:
            if "{redis_url}" in flags:
                redis = RedisServer.start()
                stack.callback(redis.stop)
                servers.redis_url = redis.url
                servers.redis_pid = redis.process.pid
            if "{postgres_dsn}" in flags:
                postgres = PostgresServer.start()
                stack.callback(postgres.stop)
                servers.postgres_dsn = postgres.dsn()
                servers.postgres_pid = postgres.process.pid
        except pytest.skip.Exception as skip:
            raise StoreUnavailable(str(skip.msg)) from None
        except RuntimeError as error:
            raise BenchmarkError(str(error)) from error
        yield servers


# --- One measurement run -------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """Counters and CPU times read at one instant of a run."""

    wall_s: float
    offered: int
    applied: int
    rejected: int
    engine_cpu_s: float
    redis_cpu_s: float
    postgres_cpu_s: float
    generator_cpu_s: float
    host_busy_ticks: int
    host_total_ticks: int


def take_snapshot(
    engine: RunningBroker, stores: StoreServers, counters: SharedCounters, worker: Worker
) -> Snapshot:
    host_busy, host_total = host_cpu_ticks()
    redis_cpu_s = 0.0
    if stores.redis_pid is not None:
        redis_cpu_s = process_tree_cpu_seconds(stores.redis_pid)
    postgres_cpu_s = 0.0
    if stores.postgres_pid is not None:
        # The postmaster's descendants are every backend and auxiliary process of the cluster.
        postgres_cpu_s = process_tree_cpu_seconds(stores.postgres_pid)
    return Snapshot(
        wall_s=time.monotonic(),
        offered=counters.total("offered"),
        applied=counters.total("applied"),
        rejected=counters.total("rejected"),
        engine_cpu_s=process_tree_cpu_seconds(engine.pid),
        redis_cpu_s=redis_cpu_s,
        postgres_cpu_s=postgres_cpu_s,
        generator_cpu_s=process_cpu_seconds(worker.pid),
        host_busy_ticks=host_busy,
        host_total_ticks=host_total,
    )


@dataclass(frozen=True)
class RunOptions:
    """Command-line settings that apply to every configuration."""

    rate: float
    devices: int
    duration_s: float
    warmup_s: float
    ironshadow_cmd: str


@dataclass
class RunResult:
    """Rates, CPU costs and PUBACK latency of one engine configuration."""

    configuration: str
    engine_flags: str  # with the store URLs as placeholders
    window_s: float
    target_per_s: float
    offered_per_s: float
    applied_per_s: float
    rejected_per_s: float
    engine_cpu_percent: float  # of one core
    engine_us_per_update: float | None  # per applied update, None if none was applied
    redis_cpu_percent: float | None  # None when the configuration has no Redis
    redis_us_per_update: float | None
    postgres_cpu_percent: float | None  # None when the configuration has no PostgreSQL
    postgres_us_per_update: float | None
    puback_p50_ms: float | None
    puback_p99_ms: float | None
    puback_samples: int
    generator_cpu_percent: float  # of one core
    host_cpu_percent: float  # of all CPUs, including processes outside the benchmark
    skipped_sends: int  # over the whole run: sends skipped at MAX_IN_FLIGHT
    unanswered: int  # updates without a response DRAIN_S after the devices stopped
    disconnects: int
    engine_log_errors: int
    engine_first_log_error: str | None


def per_update(cpu_s: float, applied: int) -> float | None:
    return MICROSECONDS_PER_S * cpu_s / applied if applied else None


def compute_result(
    configuration: str,
    stores: StoreServers,
    options: RunOptions,
    before: Snapshot,
    after: Snapshot,
    generator_report: dict[str, Any],
) -> RunResult:
    window_s = after.wall_s - before.wall_s
    applied = after.applied - before.applied
    engine_cpu_s = after.engine_cpu_s - before.engine_cpu_s
    redis_cpu_s = after.redis_cpu_s - before.redis_cpu_s
    postgres_cpu_s = after.postgres_cpu_s - before.postgres_cpu_s
    host_total = after.host_total_ticks - before.host_total_ticks
    host_busy = after.host_busy_ticks - before.host_busy_ticks
    has_redis = stores.redis_pid is not None
    has_postgres = stores.postgres_pid is not None

    p50_s = generator_report["puback_p50_s"]
    p99_s = generator_report["puback_p99_s"]
    return RunResult(
        configuration=configuration,
        engine_flags=CONFIGURATIONS[configuration],
        window_s=window_s,
        target_per_s=options.rate,
        offered_per_s=(after.offered - before.offered) / window_s,
        applied_per_s=applied / window_s,
        rejected_per_s=(after.rejected - before.rejected) / window_s,
        engine_cpu_percent=100 * engine_cpu_s / window_s,
        engine_us_per_update=per_update(engine_cpu_s, applied),
        redis_cpu_percent=100 * redis_cpu_s / window_s if has_redis else None,
        redis_us_per_update=per_update(redis_cpu_s, applied) if has_redis else None,
        postgres_cpu_percent=100 * postgres_cpu_s / window_s if has_postgres else None,
        postgres_us_per_update=per_update(postgres_cpu_s, applied) if has_postgres else None,
        puback_p50_ms=None if p50_s is None else 1000 * p50_s,
        puback_p99_ms=None if p99_s is None else 1000 * p99_s,
        puback_samples=generator_report["puback_samples"],
        generator_cpu_percent=100 * (after.generator_cpu_s - before.generator_cpu_s) / window_s,
        host_cpu_percent=100 * host_busy / host_total if host_total else 0.0,
        skipped_sends=0,
        unanswered=0,
        disconnects=0,
        engine_log_errors=0,
        engine_first_log_error=None,
    )


def measure_window(
    engine: RunningBroker,
    stores: StoreServers,
    counters: SharedCounters,
    measuring: ctypes.Array[ctypes.c_int],
    worker: Worker,
    options: RunOptions,
) -> tuple[Snapshot, Snapshot]:
    """Start the devices, wait out the warm-up, and return snapshots around the window."""
    timeout_s = setup_timeout_s(options.devices) + BROKER_START_TIMEOUT_S
    receive_message(worker, READY, timeout_s, task="connect its devices")
    send_command(worker, START)
    time.sleep(options.warmup_s)
    measuring[0] = 1
    before = take_snapshot(engine, stores, counters, worker)
    time.sleep(options.duration_s)
    after = take_snapshot(engine, stores, counters, worker)
    measuring[0] = 0
    engine.check_running()
    return before, after


def measure(configuration: str, options: RunOptions) -> RunResult:
    """Start the stores, the engine and the devices, measure one window, and stop everything."""
    context = multiprocessing.get_context("spawn")
    with start_store_servers(configuration) as stores:
        flags = CONFIGURATIONS[configuration].format(
            redis_url=stores.redis_url, postgres_dsn=stores.postgres_dsn
        )
        spec = make_ironshadow_spec(
            options.ironshadow_cmd, f"--log-level {ENGINE_LOG_LEVEL} {flags}"
        )
        with RunningBroker(
            spec,
            start_timeout_s=BROKER_START_TIMEOUT_S,
            stop_timeout_s=BROKER_STOP_TIMEOUT_S,
            tempdir_prefix=f"bench-storage-{configuration}",
        ) as engine:
            settings = PaceSettings(
                port=engine.port,
                devices=options.devices,
                rate=options.rate,
                run_limit_s=options.warmup_s + options.duration_s + WORKER_STOP_GRACE_S,
            )
            counters = SharedCounters.create(context, 1)
            measuring = context.RawArray(ctypes.c_int, 1)
            worker = start_worker(context, "generator", worker_main, settings, counters, measuring)
            errors: list[str] = []
            report: dict[str, Any] = {}
            try:
                before, after = measure_window(engine, stores, counters, measuring, worker, options)
                send_command(worker, STOP)
                report = receive_message(worker, RESULT, RESULT_TIMEOUT_S, "report its results")
            except BenchmarkError as error:
                errors.append(str(error))
            finally:
                errors.extend(stop_workers([worker], WORKER_STOP_TIMEOUT_S))
                engine.stop()
            if errors:
                raise BenchmarkError("; ".join(errors))

            result = compute_result(configuration, stores, options, before, after, report)
            log_errors = matching_log_lines(engine.log_path, LOG_ERROR_PATTERN)
            result.engine_log_errors = len(log_errors)
            result.engine_first_log_error = log_errors[0].strip() if log_errors else None

    result.skipped_sends = report["skipped"]
    result.unanswered = counters.total("unanswered")
    result.disconnects = counters.total("disconnects")
    return result


# --- Report --------------------------------------------------------------------------

TABLE_COLUMNS = [  # (heading, width)
    ("configuration", 18),
    ("offered/s", 9),
    ("applied/s", 9),
    ("engine CPU %", 12),
    ("engine µs/upd", 13),
    ("÷ memory", 8),
    ("Redis µs/upd", 12),
    ("PG µs/upd", 9),
    ("PUBACK p50 ms", 13),
    ("p99 ms", 7),
    ("gen CPU %", 9),
    ("host CPU %", 10),
]


def format_optional(value: float | None, pattern: str) -> str:
    return "-" if value is None else format(value, pattern)


def compute_ratios(results: Sequence[RunResult]) -> dict[str, float]:
    """Return each configuration's engine µs per update divided by that of memory only."""
    costs = {result.configuration: result.engine_us_per_update for result in results}
    baseline = costs.get(BASELINE)
    if not baseline:
        return {}
    return {name: cost / baseline for name, cost in costs.items() if cost is not None}


def format_row(result: RunResult, ratios: dict[str, float]) -> list[str]:
    return [
        CONFIGURATION_LABELS[result.configuration],
        f"{result.offered_per_s:,.0f}",
        f"{result.applied_per_s:,.0f}",
        f"{result.engine_cpu_percent:.1f}",
        format_optional(result.engine_us_per_update, ",.1f"),
        format_optional(ratios.get(result.configuration), ".2f"),
        format_optional(result.redis_us_per_update, ",.1f"),
        format_optional(result.postgres_us_per_update, ",.1f"),
        format_optional(result.puback_p50_ms, ".2f"),
        format_optional(result.puback_p99_ms, ".2f"),
        f"{result.generator_cpu_percent:.0f}",
        f"{result.host_cpu_percent:.0f}",
    ]


def describe_problems(result: RunResult) -> list[str]:
    """Return notes on what may have limited or distorted a run."""
    label = CONFIGURATION_LABELS[result.configuration]
    notes = []
    if result.applied_per_s < APPLIED_SHORTFALL * result.target_per_s:
        notes.append(
            f"{label}: applied {result.applied_per_s:,.0f} updates/s of the"
            f" {result.target_per_s:,.0f} offered, so the engine or the generator fell behind."
        )

    if result.skipped_sends:
        notes.append(
            f"{label}: devices skipped {result.skipped_sends:,} sends because {MAX_IN_FLIGHT}"
            " of their updates were without a response."
        )

    if result.generator_cpu_percent >= GENERATOR_SATURATED_PERCENT:
        notes.append(
            f"{label}: the generator used {result.generator_cpu_percent:.0f}% of a core, so it"
            " may have limited the rate."
        )

    if result.host_cpu_percent >= HOST_SATURATED_PERCENT:
        notes.append(
            f"{label}: all {os.cpu_count()} CPUs were {result.host_cpu_percent:.0f}% busy, so the"
            " engine, the stores and the generator competed for CPU time."
        )

    if result.rejected_per_s:
        notes.append(f"{label}: {result.rejected_per_s:,.1f} updates/s were rejected.")

    if result.unanswered:
        notes.append(
            f"{label}: {result.unanswered} updates had no response {DRAIN_S:g} s after the"
            " devices stopped."
        )

    if result.disconnects:
        notes.append(f"{label}: the engine closed {result.disconnects} device connections.")

    if result.engine_log_errors:
        notes.append(
            f"{label}: the engine logged {result.engine_log_errors} error lines, the first:"
            f" {result.engine_first_log_error}"
        )
    return notes


def print_report(
    results: Sequence[RunResult],
    failures: Sequence[str],
    skipped: Sequence[str],
    options: RunOptions,
) -> None:
    print(
        f"{options.devices} devices offering {options.rate:,.0f} updates/s in total at QoS"
        f" {QOS}; {options.warmup_s:g} s warm-up + {options.duration_s:g} s window per"
        f" configuration; {os.cpu_count()} CPUs."
    )
    print(
        "Applied counts update/accepted responses received by the devices. Engine CPU is the"
        " engine process with its threads; Redis and PG (PostgreSQL, every process of the"
        " private cluster) are the store servers' own CPU, in µs per applied update."
        " ÷ memory is engine µs/upd divided by that of memory only. PUBACK latency is from"
        " the device's PUBLISH to its PUBACK, in the window."
    )
    for reason in skipped:
        print(f"skipped: {reason}")
    print()

    ratios = compute_ratios(results)
    if results:
        print(format_table(TABLE_COLUMNS, [format_row(result, ratios) for result in results]))
        print()
    if TARGET_CONFIGURATION in ratios:
        ratio = ratios[TARGET_CONFIGURATION]
        verdict = "met" if ratio <= TARGET_RATIO else "missed"
        print(
            f"engine µs per update, {CONFIGURATION_LABELS[TARGET_CONFIGURATION]} ÷"
            f" {CONFIGURATION_LABELS[BASELINE]}: {ratio:.2f}x (target at most"
            f" {TARGET_RATIO:.2f}x: {verdict})"
        )
    for result in results:
        for note in describe_problems(result):
            print(f"note: {note}")
    for failure in failures:
        print(f"failed: {failure}")


def build_json_report(
    results: Sequence[RunResult],
    failures: Sequence[str],
    skipped: Sequence[str],
    options: RunOptions,
) -> dict[str, Any]:
    return {
        "options": asdict(options),
        "qos": QOS,
        "cpus": os.cpu_count(),
        "applied_measured_by": "update/accepted responses received by the devices",
        "results": [asdict(result) for result in results],
        "engine_us_ratio_to_memory": compute_ratios(results),
        "target_ratio": {"configuration": TARGET_CONFIGURATION, "at_most": TARGET_RATIO},
        "skipped": list(skipped),
        "failures": list(failures),
    }


# --- Command line --------------------------------------------------------------------


def parse_configuration_list(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in CONFIGURATIONS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"invalid configuration list {text!r}: use a comma-separated subset of"
            f" {','.join(CONFIGURATIONS)}"
        )
    return list(dict.fromkeys(names))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Measure the engine's CPU per shadow update at a fixed offered rate, with"
        " memory only, the embedded stores, Redis, and Redis with PostgreSQL."
    )
    parser.add_argument(
        "--rate",
        type=positive_float,
        default=DEFAULT_RATE,
        help=f"updates per second offered by all devices together (default {DEFAULT_RATE:g})",
    )
    parser.add_argument(
        "--devices",
        type=positive_int,
        default=DEFAULT_DEVICES,
        help=f"simulated devices, one connection each (default {DEFAULT_DEVICES})",
    )
    add_window_arguments(parser, DEFAULT_DURATION_S, DEFAULT_WARMUP_S)
    parser.add_argument(
        "--only",
        type=parse_configuration_list,
        default=list(CONFIGURATIONS),
        help="comma-separated configurations to run, in this order"
        f" (default {','.join(CONFIGURATIONS)})",
    )
    add_ironshadow_cmd_argument(parser)
    parser.add_argument("--json", action="store_true", help="print a JSON report as the last line")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    arguments = parser.parse_args(argv)
    if arguments.warmup < 0:
        parser.error("--warmup must not be negative")
    options = RunOptions(
        rate=arguments.rate,
        devices=arguments.devices,
        duration_s=arguments.duration,
        warmup_s=arguments.warmup,
        ironshadow_cmd=arguments.ironshadow_cmd,
    )

    results: list[RunResult] = []
    failures: list[str] = []
    skipped: list[str] = []
    for configuration in arguments.only:
        print(
            f"running {configuration}: {options.devices} devices at {options.rate:,.0f}"
            f" updates/s, {options.warmup_s:g} s warm-up + {options.duration_s:g} s ...",
            file=sys.stderr,
            flush=True,
        )
        try:
            results.append(measure(configuration, options))
        except StoreUnavailable as error:
            skipped.append(f"{configuration}: {error}")
        except BenchmarkError as error:
            failures.append(f"{configuration}: {error}")

    print_report(results, failures, skipped, options)
    if arguments.json:
        print(json.dumps(build_json_report(results, failures, skipped, options)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
