"""Measure how IronShadow and Mosquitto take a reconnect storm of many MQTT clients at once.

For every selected broker the script starts a fresh broker on a free loopback port and
connects one "canary" client. The canary subscribes to its own topic with QoS 1 and then
publishes to it in a loop, and each round trip ends when both the broker's PUBACK and the
delivered message have arrived. Then N storm clients open TCP connections to the broker
at the same moment. Each sends an MQTT 3.1.1 CONNECT with its own client id and waits
for CONNACK. The script reports:

* the time from the release of the storm until each client had its CONNACK (p50, p90,
  p99 and max over all N clients, a client without CONNACK counting as slower than any),
  and how many clients had none within --timeout,
* errors by kind (for example ECONNREFUSED, ECONNRESET, a CONNACK return code, or the
  broker closing the connection before CONNACK),
* the change in the kernel's TcpExt counters ListenOverflows, ListenDrops and
  SyncookiesSent from /proc/net/netstat. These count for the whole host, not only for
  the broker under test, and show SYNs or handshakes dropped because the listen queue
  was full,
* broker CPU seconds during the storm (utime + stime of the broker and its descendants,
  from /proc/<pid>/stat) and the broker's peak resident memory (VmHWM in
  /proc/<pid>/status), plus its open file descriptors after the storm,
* the canary's round-trip latency (p50, p99, max) during the storm, which shows whether
  connected clients keep being served, and its p50 before the storm for comparison.

The storm clients run in --processes generator processes (multiprocessing with spawn),
because one process may hold at most RLIMIT_NOFILE open files. Each process creates and
binds its sockets first, then all processes wait on one event, and the parent releases
them together. Each client socket binds to one of several source addresses 127.0.0.2,
127.0.0.3, ... with IP_BIND_ADDRESS_NO_PORT, so that the ephemeral ports of a single
source address (net.ipv4.ip_local_port_range) do not run out. The CONNECT packets are
encoded before the release, and the clients parse only the 4-byte CONNACK.

Usage (from the repository root)::

    .venv/bin/python benchmarks/connect_storm.py
    .venv/bin/python benchmarks/connect_storm.py --clients 1000 --only ironshadow
    .venv/bin/python benchmarks/connect_storm.py --only ironshadow \\
        --ironshadow-args "--connect-rate 4000" --json

Each broker's output (stdout and stderr) is written to <log dir>/<broker>.log, which the
report names. The exit status is 1 if any run failed, for example because a broker did
not start or exited during the storm.

All traffic goes to 127.0.0.1, and only to brokers that this script starts itself. Every
process that the script starts is stopped by its PID before the script exits.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import ipaddress
import json
import math
import multiprocessing
import os
import re
import resource
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any, cast

from support import (
    BROKER_HOST,
    CONNACK,
    DISCONNECT_PACKET,
    MAX_PACKET_ID,
    PUBACK,
    PUBACK_HEADER,
    PUBLISH,
    READY,
    RESULT,
    STOP,
    SUBACK,
    BenchmarkError,
    BrokerSpec,
    ControlChannel,
    ProtocolError,
    RunningBroker,
    Worker,
    add_ironshadow_cmd_argument,
    add_mosquitto_argument,
    decode_remaining_length,
    encode_connect,
    encode_publish,
    encode_subscribe,
    host_cpu_ticks,
    make_ironshadow_spec,
    make_mosquitto_spec,
    matching_log_lines,
    mosquitto_config_lines,
    positive_float,
    positive_int,
    process_cpu_seconds,
    process_memory_bytes,
    process_tree_cpu_seconds,
    read_netstat_counters,
    receive_message,
    run_worker,
    send_command,
    split_evenly,
    start_worker,
    stop_workers,
)

# Storm clients bind to FIRST_SOURCE_ADDRESS and the addresses after it (all on loopback).
FIRST_SOURCE_ADDRESS = ipaddress.IPv4Address("127.0.0.2")
LAST_SOURCE_ADDRESS = ipaddress.IPv4Address("127.0.0.254")
# Maximum storm clients per source address. One source address has 28,232 ephemeral ports
# per destination here (net.ipv4.ip_local_port_range 32768-60999), so the margin leaves
# ports for other connections from the same address.
MAX_CLIENTS_PER_SOURCE_ADDRESS = 5_000

DEFAULT_CLIENTS = 19_000
DEFAULT_PROCESSES = 4
DEFAULT_TIMEOUT_S = 60.0

# The keep alive that storm clients send in CONNECT. A broker may close a client that
# sends nothing for 1.5 times its keep alive (MQTT 3.1.1 section 3.1.2.10), and storm
# clients send nothing after CONNECT, so the script raises it to --timeout when that is
# longer.
KEEPALIVE_S = 60
MAX_KEEPALIVE_S = 0xFFFF

# Open files that a generator process needs besides its client sockets (the pipe to the
# parent, the event loop's own descriptors, imported modules).
GENERATOR_FILE_RESERVE = 64

BROKER_START_TIMEOUT_S = 20.0
BROKER_STOP_TIMEOUT_S = 10.0
WORKER_READY_TIMEOUT_S = 60.0  # a generator creates and binds all its sockets in this time
RELEASE_WAIT_S = 120.0  # a generator that is not released within this time exits
RESULT_GRACE_S = 15.0  # the parent waits this long past --timeout for the generators' results
STOP_WAIT_S = 30.0  # a worker that gets no STOP within this time after its result exits
WORKER_STOP_TIMEOUT_S = 10.0
CLOSE_LINGER_S = 0.5  # time for the DISCONNECT packets to leave before a worker exits

CANARY_CLIENT_ID = "storm-canary"
CANARY_TOPIC = "storm/canary"
CANARY_SETUP_TIMEOUT_S = 10.0  # CONNACK, SUBACK and a first round trip before the storm
CANARY_INTERVAL_S = 0.01  # pause between two round trips
PRE_STORM_S = 1.0  # canary round trips before the release give the baseline latency

BYTES_PER_MIB = 1024 * 1024
MILLISECONDS_PER_S = 1000

# Kernel counters read from the TcpExt lines of /proc/net/netstat.
NETSTAT_COUNTERS = ("ListenOverflows", "ListenDrops", "SyncookiesSent")

# Broker log lines that the report quotes: warning and error levels and Python tracebacks.
# Plain words would also match logger names such as "uvicorn.error" in harmless INFO lines.
LOG_PROBLEM_PATTERN = re.compile(
    r"\b(WARNING|ERROR|CRITICAL)\b|\b(Error|Warning|error):|Traceback|\bException\b"
)
LOG_EXCERPT_LINES = 8

# Mosquitto 2.0.11 has no setting for its listen backlog (mosquitto.conf(5) lists none),
# and `ss -lnt` shows an accept queue of 100 for its listener. A max_connections of -1
# means no limit.
MOSQUITTO_SETTINGS = {"max_connections": "-1"}

# The 4-byte MQTT 3.1.1 CONNACK: first byte, remaining length 2, acknowledge flags, return code.
CONNACK_FIRST_BYTE = 0x20
CONNACK_REMAINING_LENGTH = 2
CONNACK_LENGTH = 4


def describe_os_error(error: OSError) -> str:
    """Return the errno name of an OSError (ECONNREFUSED), or its message if it has none."""
    if error.errno is not None and error.errno in errno.errorcode:
        return errno.errorcode[error.errno]
    return f"{type(error).__name__}: {error}"


# --- Storm clients -------------------------------------------------------------------


@dataclass(frozen=True)
class GeneratorSettings:
    """Settings that the parent passes to one generator process."""

    port: int
    first_index: int  # global index of this process's first client
    count: int
    source_addresses: tuple[str, ...]  # client i binds to source_addresses[i % len]
    keepalive_s: int
    timeout_s: float


@dataclass
class GeneratorResult:
    """Measurements of one generator process, with times in seconds after the release."""

    connack_s: list[float]  # one entry per client that had a CONNACK
    tcp_connected_s: list[float]  # one entry per client whose TCP handshake completed
    errors: dict[str, int]  # error kind -> clients
    closed_after_connack: int
    last_event_s: float  # time of the last CONNACK or error, or the timeout


class StormTracker:
    """Collects the outcome of every client in one generator process."""

    def __init__(self, count: int, release_time: float) -> None:
        self.count = count
        self.release_time = release_time
        self.connack_s: list[float] = []
        self.tcp_connected_s: list[float] = []
        self.errors: Counter[str] = Counter()
        self.closed_after_connack = 0
        self.finished = 0  # clients with a CONNACK or an error
        self.last_event_s = 0.0
        self.frozen = False  # set once the result is sent, so later events are not counted
        self.all_finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def tcp_connected(self) -> None:
        if not self.frozen:
            self.tcp_connected_s.append(time.monotonic() - self.release_time)

    def connack(self) -> None:
        if not self.frozen:
            elapsed_s = time.monotonic() - self.release_time
            self.connack_s.append(elapsed_s)
            self._finish(elapsed_s)

    def fail(self, kind: str) -> None:
        if not self.frozen:
            self.errors[kind] += 1
            self._finish(time.monotonic() - self.release_time)

    def lost_after_connack(self) -> None:
        if not self.frozen:
            self.closed_after_connack += 1

    def _finish(self, elapsed_s: float) -> None:
        self.finished += 1
        self.last_event_s = elapsed_s
        if self.finished == self.count and not self.all_finished.done():
            self.all_finished.set_result(None)

    def result(self, timed_out: bool, timeout_s: float) -> GeneratorResult:
        self.frozen = True
        return GeneratorResult(
            connack_s=self.connack_s,
            tcp_connected_s=self.tcp_connected_s,
            errors=dict(self.errors),
            closed_after_connack=self.closed_after_connack,
            last_event_s=timeout_s if timed_out else self.last_event_s,
        )


class StormClient(asyncio.Protocol):
    """Sends one pre-encoded CONNECT when the connection is made and waits for CONNACK."""

    def __init__(self, tracker: StormTracker, connect_packet: bytes) -> None:
        self.tracker = tracker
        self.connect_packet = connect_packet
        self.transport: asyncio.Transport | None = None
        self.received = b""
        self.connacked = False
        self.failed = False
        self.stopping = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transport implements asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.connect_packet)

    def data_received(self, data: bytes) -> None:
        if self.connacked or self.failed:
            return  # a storm client expects nothing after CONNACK
        self.received += data
        if len(self.received) < CONNACK_LENGTH:
            return
        first_byte, remaining_length, _flags, return_code = self.received[:CONNACK_LENGTH]
        if first_byte != CONNACK_FIRST_BYTE or remaining_length != CONNACK_REMAINING_LENGTH:
            self.fail(f"packet {first_byte:#04x} instead of CONNACK")
        elif return_code != 0:
            self.fail(f"CONNACK return code {return_code}")
        else:
            self.connacked = True
            self.tracker.connack()

    def fail(self, kind: str) -> None:
        self.failed = True
        self.tracker.fail(kind)
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.stopping or self.failed:
            return
        if self.connacked:
            self.tracker.lost_after_connack()
        else:
            reason = describe_os_error(exc) if isinstance(exc, OSError) else "end of stream"
            self.failed = True
            self.tracker.fail(f"closed before CONNACK ({reason})")

    def stop(self) -> None:
        self.stopping = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(DISCONNECT_PACKET)
            self.transport.close()


def create_client_sockets(settings: GeneratorSettings) -> list[socket.socket]:
    """Create one non-blocking TCP socket per client, bound to its source address.

    IP_BIND_ADDRESS_NO_PORT makes connect() pick the source port, so a port is unique
    per (source, destination) pair and not per source address alone.
    """
    addresses = settings.source_addresses
    sockets = []
    try:
        for index in range(settings.first_index, settings.first_index + settings.count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((addresses[index % len(addresses)], 0))
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


async def open_client(
    client: StormClient, sock: socket.socket, port: int, tracker: StormTracker
) -> None:
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_connect(sock, (BROKER_HOST, port))
    except OSError as error:
        sock.close()
        tracker.fail(describe_os_error(error))
        return
    tracker.tcp_connected()
    try:
        await loop.create_connection(lambda: client, sock=sock)
    except OSError as error:
        sock.close()
        tracker.fail(describe_os_error(error))


async def run_generator(
    settings: GeneratorSettings,
    control: ControlChannel,
    release: Event,
    release_time: Synchronized[float],
) -> None:
    sockets = create_client_sockets(settings)
    packets = [
        encode_connect(f"storm-{index}", settings.keepalive_s)
        for index in range(settings.first_index, settings.first_index + settings.count)
    ]
    control.send(READY)

    # Blocking here is fine: nothing else runs on this loop before the release.
    if not release.wait(RELEASE_WAIT_S):
        raise BenchmarkError(f"not released within {RELEASE_WAIT_S:.0f} s")
    start = release_time.value
    tracker = StormTracker(settings.count, start)
    clients = [StormClient(tracker, packet) for packet in packets]
    tasks = [
        asyncio.create_task(open_client(client, sock, settings.port, tracker))
        for client, sock in zip(clients, sockets, strict=True)
    ]
    remaining_s = start + settings.timeout_s - time.monotonic()
    timed_out = False
    try:
        await asyncio.wait_for(asyncio.shield(tracker.all_finished), max(0.0, remaining_s))
    except TimeoutError:
        timed_out = True
    control.send(RESULT, tracker.result(timed_out, settings.timeout_s))

    # Keep the connections open until every process has reported, so that clients
    # leaving do not add work to the broker while others still connect.
    await control.receive(STOP_WAIT_S)
    # Sockets whose handshake is still pending close when the process exits.
    for task in tasks:
        task.cancel()
    for client in clients:
        client.stop()


# --- Canary client -------------------------------------------------------------------


@dataclass
class CanaryResult:
    """The canary's round trips, as (start time, round-trip seconds) on CLOCK_MONOTONIC."""

    round_trips: list[tuple[float, float]]
    unfinished: tuple[float, float] | None  # a round trip still waiting at the stop
    error: str | None


class CanaryClient(asyncio.Protocol):
    """MQTT 3.1.1 client that publishes to its own topic with QoS 1, one message at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.stopping = False
        self._partial = b""
        loop = asyncio.get_running_loop()
        self.connack: asyncio.Future[int] = loop.create_future()
        self.suback: asyncio.Future[int] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self._round_trip: asyncio.Future[None] | None = None
        self._packet_id = 0
        self._payload = b""
        self._acked = False
        self._delivered = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.stopping:
            return
        error = ConnectionError(f"broker closed the canary connection: {exc or 'end of stream'}")
        for future in (self.connack, self.suback, self._round_trip, self.closed):
            if future is not None and not future.done():
                future.set_exception(error)

    def data_received(self, data: bytes) -> None:
        if self._partial:
            data = self._partial + data
        position = 0
        try:
            while len(data) - position >= 2:
                decoded = decode_remaining_length(data, position + 1)
                if decoded is None:
                    break
                remaining_length, body_start = decoded
                body_end = body_start + remaining_length
                if body_end > len(data):
                    break
                self.handle_packet(data[position], data[body_start:body_end])
                position = body_end
        except ProtocolError as error:
            self._fail(error)
            return
        self._partial = data[position:]

    def handle_packet(self, first_byte: int, body: bytes) -> None:
        packet_type = first_byte >> 4
        if packet_type == CONNACK:
            self.connack.set_result(body[1])
        elif packet_type == SUBACK:
            self.suback.set_result(body[-1])
        elif packet_type == PUBACK:
            if int.from_bytes(body[:2], "big") == self._packet_id:
                self._acked = True
                self._complete_round_trip()
        elif packet_type == PUBLISH:
            topic_length = int.from_bytes(body[:2], "big")
            position = 2 + topic_length
            if (first_byte >> 1) & 0x03:  # QoS 1 or 2 carries a packet id
                self.write(PUBACK_HEADER + body[position : position + 2])
                position += 2
            if body[position:] == self._payload:
                self._delivered = True
                self._complete_round_trip()
        else:
            raise ProtocolError(f"unexpected packet type {packet_type} for the canary")

    def _complete_round_trip(self) -> None:
        future = self._round_trip
        if self._acked and self._delivered and future is not None and not future.done():
            future.set_result(None)

    def _fail(self, error: Exception) -> None:
        for future in (self.connack, self.suback, self._round_trip, self.closed):
            if future is not None and not future.done():
                future.set_exception(error)
        if self.transport is not None:
            self.transport.close()

    def write(self, data: bytes) -> None:
        if self.transport is None:
            raise ConnectionError("the canary connection is closed")
        self.transport.write(data)

    def start_round_trip(self, sequence: int) -> asyncio.Future[None]:
        """Publish message number `sequence` to the canary topic and return the round trip.

        The returned future completes when both the PUBACK and the message have arrived.
        """
        self._packet_id = sequence % MAX_PACKET_ID + 1
        self._payload = str(sequence).encode()
        self._acked = self._delivered = False
        self._round_trip = asyncio.get_running_loop().create_future()
        self.write(encode_publish(CANARY_TOPIC, self._payload, 1, self._packet_id))
        return self._round_trip

    def stop(self) -> None:
        self.stopping = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(DISCONNECT_PACKET)
            self.transport.close()


async def wait_for_reply(reply: asyncio.Future[Any], description: str) -> Any:
    try:
        return await asyncio.wait_for(asyncio.shield(reply), CANARY_SETUP_TIMEOUT_S)
    except TimeoutError:
        raise BenchmarkError(
            f"timed out after {CANARY_SETUP_TIMEOUT_S:.0f} s: {description}"
        ) from None


async def run_canary(port: int, run_limit_s: float, control: ControlChannel) -> None:
    loop = asyncio.get_running_loop()
    client = CanaryClient()
    await asyncio.wait_for(
        loop.create_connection(lambda: client, BROKER_HOST, port), CANARY_SETUP_TIMEOUT_S
    )
    client.write(encode_connect(CANARY_CLIENT_ID, KEEPALIVE_S))
    return_code = await wait_for_reply(client.connack, "CONNACK for the canary")
    if return_code != 0:
        raise BenchmarkError(f"broker rejected the canary's CONNECT with return code {return_code}")
    client.write(encode_subscribe(1, [CANARY_TOPIC], 1))
    granted_qos = await wait_for_reply(client.suback, f"SUBACK for {CANARY_TOPIC!r}")
    if granted_qos != 1:
        raise BenchmarkError(f"broker granted {granted_qos:#x} for {CANARY_TOPIC!r}, not QoS 1")
    await wait_for_reply(client.start_round_trip(0), "the canary's first round trip")
    control.send(READY)

    stop_requested = asyncio.ensure_future(control.receive(run_limit_s))
    round_trips: list[tuple[float, float]] = []
    unfinished = None
    error = None
    sequence = 0
    while not stop_requested.done():
        sequence += 1
        started = time.monotonic()
        try:
            round_trip = client.start_round_trip(sequence)
        except ConnectionError as exc:
            error = str(exc)
            break
        await asyncio.wait({round_trip, stop_requested}, return_when=asyncio.FIRST_COMPLETED)
        if not round_trip.done():
            unfinished = (started, time.monotonic() - started)
            break
        if round_trip.exception() is not None:
            error = str(round_trip.exception())
            break
        round_trips.append((started, time.monotonic() - started))
        await asyncio.wait({stop_requested}, timeout=CANARY_INTERVAL_S)
    control.send(RESULT, CanaryResult(round_trips, unfinished, error))
    if not stop_requested.done():
        await stop_requested
    client.stop()


# --- Worker processes ----------------------------------------------------------------


def raise_open_file_limit() -> None:
    """Raise this process's soft limit on open files to the hard limit."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def describe_worker_error(error: Exception) -> str:
    """Return the errno name of an OSError, or the message of any other error."""
    return describe_os_error(error) if isinstance(error, OSError) else str(error)


def worker_main(connection: Connection, role: Callable[..., Any], *role_args: Any) -> None:
    """Run one role (generator or canary) in this process and report failures to the parent."""
    control = ControlChannel(connection)

    async def run() -> None:
        raise_open_file_limit()
        await role(*role_args, control)
        await asyncio.sleep(CLOSE_LINGER_S)  # let the DISCONNECT packets reach the broker

    run_worker(control, run, describe_worker_error)


async def generator_entry(
    settings: GeneratorSettings,
    release: Event,
    release_time: Synchronized[float],
    control: ControlChannel,
) -> None:
    await run_generator(settings, control, release, release_time)


async def canary_entry(port: int, run_limit_s: float, control: ControlChannel) -> None:
    await run_canary(port, run_limit_s, control)


# --- Measurements from /proc ---------------------------------------------------------


def open_file_count(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None


def read_sysctl(name: str) -> str | None:
    try:
        return Path("/proc/sys", *name.split(".")).read_text().strip()
    except OSError:
        return None


def ephemeral_port_count() -> int | None:
    """Return the size of net.ipv4.ip_local_port_range, or None if it cannot be read."""
    text = read_sysctl("net.ipv4.ip_local_port_range")
    if text is None:
        return None
    low, high = (int(part) for part in text.split())
    return high - low + 1


def listen_backlog(port: int) -> int | None:
    """Return the accept-queue length of the loopback listener on port, as `ss` shows it.

    For a listening socket, the Send-Q column of `ss -lnt` is the backlog given to
    listen(2), after the kernel capped it at net.core.somaxconn.
    """
    ss = shutil.which("ss")
    if ss is None:
        return None
    try:
        output = subprocess.run(
            [ss, "-H", "-l", "-n", "-t", "sport", "=", f":{port}"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in output.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[3] == f"{BROKER_HOST}:{port}":
            return int(fields[2])
    return None


# --- Broker log ----------------------------------------------------------------------


def log_problem_lines(log_path: Path) -> tuple[int, list[str]]:
    """Return the number of warning or error lines in a broker log, and the first few."""
    problems = matching_log_lines(log_path, LOG_PROBLEM_PATTERN)
    return len(problems), problems[:LOG_EXCERPT_LINES]


# --- One storm -----------------------------------------------------------------------


@dataclass(frozen=True)
class StormOptions:
    """Command-line settings that apply to every run."""

    clients: int
    processes: int
    timeout_s: float
    keepalive_s: int
    source_addresses: tuple[str, ...]
    ironshadow_args: str


@dataclass(frozen=True)
class Snapshot:
    """Counters read just before the release and just after the last result."""

    wall_s: float
    netstat: dict[str, int]
    broker_cpu_s: float
    generator_cpu_s: float
    host_busy_ticks: int
    host_total_ticks: int
    broker_rss_bytes: int | None


def take_snapshot(broker: RunningBroker, workers: Sequence[Worker]) -> Snapshot:
    host_busy, host_total = host_cpu_ticks()
    return Snapshot(
        wall_s=time.monotonic(),
        netstat=read_netstat_counters(NETSTAT_COUNTERS),
        broker_cpu_s=process_tree_cpu_seconds(broker.pid),
        generator_cpu_s=sum(process_cpu_seconds(worker.pid) for worker in workers),
        host_busy_ticks=host_busy,
        host_total_ticks=host_total,
        broker_rss_bytes=process_memory_bytes(broker.pid, "VmRSS"),
    )


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Return the nearest-rank percentile of sorted values (math.inf marks a missing value)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


def finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


@dataclass
class StormResult:
    """Everything measured in one storm against one broker. Times are in seconds."""

    broker: str
    broker_command: str
    log_path: str
    clients: int
    connacks: int
    no_connack: int  # clients without CONNACK when the timeout passed, errors included
    errors: dict[str, int]
    closed_after_connack: int
    # Percentiles over all clients. None means that this share of clients had no CONNACK.
    connack_s: dict[str, float | None]
    tcp_connected_s: dict[str, float | None]  # same, for the TCP handshake alone
    connacks_per_s: float | None  # CONNACKs divided by the time of the last one
    storm_s: float  # from the release to the last CONNACK or error, or the timeout
    netstat_delta: dict[str, int]
    listen_backlog: int | None
    broker_cpu_s: float
    broker_rss_before_mib: float | None
    broker_peak_rss_mib: float | None  # VmHWM: peak since the broker started
    broker_open_files_after: int | None
    broker_exit_code: int | None  # None while the broker still runs after the storm
    canary_round_trips: int  # completed during the storm
    canary_ms: dict[str, float | None]  # p50, p99, max during the storm
    canary_baseline_p50_ms: float | None  # before the release
    canary_unfinished_ms: float | None  # a round trip still waiting when the canary stopped
    canary_error: str | None
    generator_cpu_s: float
    host_cpu_percent: float
    log_problem_lines: int
    log_excerpt: list[str]


def summarize_percentiles(values: list[float], total: int) -> dict[str, float | None]:
    """Return p50, p90, p99 and max over `total` clients, of which only `values` finished."""
    padded = sorted(values) + [math.inf] * (total - len(values))
    return {
        "p50": finite_or_none(percentile(padded, 0.50)),
        "p90": finite_or_none(percentile(padded, 0.90)),
        "p99": finite_or_none(percentile(padded, 0.99)),
        "max": finite_or_none(padded[-1]) if padded else None,
    }


def summarize_canary(
    canary: CanaryResult | None, release_time: float, storm_end: float
) -> dict[str, Any]:
    if canary is None:
        return {
            "canary_round_trips": 0,
            "canary_ms": {"p50": None, "p99": None, "max": None},
            "canary_baseline_p50_ms": None,
            "canary_unfinished_ms": None,
            "canary_error": "the canary sent no result",
        }
    during = sorted(
        seconds * MILLISECONDS_PER_S
        for started, seconds in canary.round_trips
        if release_time <= started <= storm_end
    )
    before = sorted(
        seconds * MILLISECONDS_PER_S
        for started, seconds in canary.round_trips
        if started < release_time
    )
    unfinished_ms = None
    if canary.unfinished is not None and canary.unfinished[0] <= storm_end:
        unfinished_ms = canary.unfinished[1] * MILLISECONDS_PER_S
    # A round trip that never finished lasted at least unfinished_ms, so it counts in max.
    longest = [*during, *([unfinished_ms] if unfinished_ms is not None else [])]
    maximum = max(longest) if longest else None
    return {
        "canary_round_trips": len(during),
        "canary_ms": {
            "p50": finite_or_none(percentile(during, 0.50)),
            "p99": finite_or_none(percentile(during, 0.99)),
            "max": maximum,
        },
        "canary_baseline_p50_ms": finite_or_none(percentile(before, 0.50)),
        "canary_unfinished_ms": unfinished_ms,
        "canary_error": canary.error,
    }


def measure(spec: BrokerSpec, options: StormOptions, log_path: Path) -> StormResult:
    """Start the broker, the canary and the generators, run one storm, and stop everything."""
    context = multiprocessing.get_context("spawn")
    release = context.Event()
    release_time = cast("Synchronized[float]", context.Value("d", 0.0))
    with RunningBroker(
        spec,
        start_timeout_s=BROKER_START_TIMEOUT_S,
        stop_timeout_s=BROKER_STOP_TIMEOUT_S,
        tempdir_prefix="storm",
        log_path=log_path,
    ) as broker:
        backlog = listen_backlog(broker.port)
        workers: list[Worker] = []
        generators: list[Worker] = []
        results: list[GeneratorResult] = []
        canary_result: CanaryResult | None = None
        errors: list[str] = []
        try:
            canary_limit_s = (
                WORKER_READY_TIMEOUT_S + PRE_STORM_S + options.timeout_s + RESULT_GRACE_S
            )
            canary = start_worker(
                context, "canary", worker_main, canary_entry, broker.port, canary_limit_s
            )
            workers.append(canary)
            receive_message(canary, READY, CANARY_SETUP_TIMEOUT_S + WORKER_READY_TIMEOUT_S)

            for number, (first_index, count) in enumerate(
                split_evenly(options.clients, options.processes)
            ):
                settings = GeneratorSettings(
                    port=broker.port,
                    first_index=first_index,
                    count=count,
                    source_addresses=options.source_addresses,
                    keepalive_s=options.keepalive_s,
                    timeout_s=options.timeout_s,
                )
                generators.append(
                    start_worker(
                        context,
                        f"generator-{number}",
                        worker_main,
                        generator_entry,
                        settings,
                        release,
                        release_time,
                    )
                )
            workers.extend(generators)
            for worker in generators:
                receive_message(worker, READY, WORKER_READY_TIMEOUT_S)
            time.sleep(PRE_STORM_S)

            before = take_snapshot(broker, generators)
            start = time.monotonic()
            release_time.value = start
            release.set()
            deadline = start + options.timeout_s + RESULT_GRACE_S
            for worker in generators:
                results.append(receive_message(worker, RESULT, deadline - time.monotonic()))
            after = take_snapshot(broker, generators)
            peak_rss = process_memory_bytes(broker.pid, "VmHWM")
            open_files = open_file_count(broker.pid)
            send_command(canary, STOP)
            canary_result = receive_message(canary, RESULT, CANARY_SETUP_TIMEOUT_S)
        except BenchmarkError as error:
            errors.append(str(error))
        finally:
            errors.extend(stop_workers(workers, WORKER_STOP_TIMEOUT_S))
        # A broker that exited during the storm still gets a result if the generators
        # reported, because the clients' errors show how it failed.
        exit_code = broker.exit_code()
        if exit_code is not None:
            errors.append(
                f"{spec.name} exited with code {exit_code} during the storm."
                f" Output:\n{broker.log_tail()}"
            )
        broker_command = shlex.join(broker.command)
    if errors and (len(results) < options.processes or exit_code is None):
        raise BenchmarkError("; ".join(errors))

    connack_s = [seconds for result in results for seconds in result.connack_s]
    tcp_connected_s = [seconds for result in results for seconds in result.tcp_connected_s]
    error_counts: Counter[str] = Counter()
    for result in results:
        error_counts.update(result.errors)
    storm_s = max(result.last_event_s for result in results)
    last_connack_s = max(connack_s, default=0.0)
    host_total = after.host_total_ticks - before.host_total_ticks
    problem_count, excerpt = log_problem_lines(log_path)
    return StormResult(
        broker=spec.name,
        broker_command=broker_command,
        log_path=str(log_path),
        clients=options.clients,
        connacks=len(connack_s),
        no_connack=options.clients - len(connack_s),
        errors=dict(error_counts.most_common()),
        closed_after_connack=sum(result.closed_after_connack for result in results),
        connack_s=summarize_percentiles(connack_s, options.clients),
        tcp_connected_s=summarize_percentiles(tcp_connected_s, options.clients),
        connacks_per_s=len(connack_s) / last_connack_s if last_connack_s else None,
        storm_s=storm_s,
        netstat_delta={
            name: after.netstat[name] - before.netstat[name]
            for name in after.netstat
            if name in before.netstat
        },
        listen_backlog=backlog,
        broker_cpu_s=after.broker_cpu_s - before.broker_cpu_s,
        broker_rss_before_mib=(
            before.broker_rss_bytes / BYTES_PER_MIB if before.broker_rss_bytes else None
        ),
        broker_peak_rss_mib=peak_rss / BYTES_PER_MIB if peak_rss else None,
        broker_open_files_after=open_files,
        broker_exit_code=exit_code,
        **summarize_canary(canary_result, start, start + storm_s),
        generator_cpu_s=after.generator_cpu_s - before.generator_cpu_s,
        host_cpu_percent=(
            100 * (after.host_busy_ticks - before.host_busy_ticks) / host_total
            if host_total
            else 0.0
        ),
        log_problem_lines=problem_count,
        log_excerpt=excerpt,
    )


# --- Report --------------------------------------------------------------------------


def format_seconds(value: float | None, timeout_s: float) -> str:
    return f"> {timeout_s:g}" if value is None else f"{value:.3f}"


def format_optional(value: float | None, template: str) -> str:
    return "n/a" if value is None else template.format(value)


def table_rows(result: StormResult, timeout_s: float) -> list[tuple[str, str]]:
    netstat = result.netstat_delta
    return [
        ("clients", f"{result.clients:,}"),
        ("got CONNACK", f"{result.connacks:,}"),
        (f"no CONNACK within {timeout_s:g} s", f"{result.no_connack:,}"),
        ("  of which errors", f"{sum(result.errors.values()):,}"),
        ("closed after CONNACK", f"{result.closed_after_connack:,}"),
        ("CONNACK p50 s", format_seconds(result.connack_s["p50"], timeout_s)),
        ("CONNACK p90 s", format_seconds(result.connack_s["p90"], timeout_s)),
        ("CONNACK p99 s", format_seconds(result.connack_s["p99"], timeout_s)),
        ("CONNACK max s", format_seconds(result.connack_s["max"], timeout_s)),
        ("TCP connected p99 s", format_seconds(result.tcp_connected_s["p99"], timeout_s)),
        ("CONNACKs per s", format_optional(result.connacks_per_s, "{:,.0f}")),
        ("ListenOverflows", f"{netstat.get('ListenOverflows', 0):,}"),
        ("ListenDrops", f"{netstat.get('ListenDrops', 0):,}"),
        ("SyncookiesSent", f"{netstat.get('SyncookiesSent', 0):,}"),
        ("listen backlog (ss)", format_optional(result.listen_backlog, "{}")),
        ("broker CPU s", f"{result.broker_cpu_s:.2f}"),
        ("broker RSS before MiB", format_optional(result.broker_rss_before_mib, "{:.1f}")),
        ("broker peak RSS MiB", format_optional(result.broker_peak_rss_mib, "{:.1f}")),
        ("broker open files after", format_optional(result.broker_open_files_after, "{:,}")),
        ("canary round trips", f"{result.canary_round_trips:,}"),
        ("canary p50 ms", format_optional(result.canary_ms["p50"], "{:.1f}")),
        ("canary p99 ms", format_optional(result.canary_ms["p99"], "{:.1f}")),
        ("canary max ms", format_optional(result.canary_ms["max"], "{:.1f}")),
        ("canary p50 before ms", format_optional(result.canary_baseline_p50_ms, "{:.1f}")),
        ("generator CPU s", f"{result.generator_cpu_s:.2f}"),
        ("host CPU %", f"{result.host_cpu_percent:.0f}"),
        ("broker log warnings/errors", f"{result.log_problem_lines:,}"),
    ]


def format_table(results: Sequence[StormResult], timeout_s: float) -> str:
    rows_by_broker = [table_rows(result, timeout_s) for result in results]
    labels = [label for label, _ in rows_by_broker[0]]
    label_width = max(len(label) for label in labels)
    column_width = max(12, *(len(result.broker) for result in results))
    header = f"{'':<{label_width}}" + "".join(
        f"  {result.broker:>{column_width}}" for result in results
    )
    lines = [header, "-" * len(header)]
    for row, label in enumerate(labels):
        cells = "".join(f"  {rows[row][1]:>{column_width}}" for rows in rows_by_broker)
        lines.append(f"{label:<{label_width}}{cells}")
    return "\n".join(lines)


def describe_result(result: StormResult, timeout_s: float) -> list[str]:
    """Return notes on errors, lost clients, the canary and the broker log of one run."""
    label = result.broker
    notes = []
    for kind, count in result.errors.items():
        notes.append(f"{label}: {count:,} clients failed with {kind}")
    pending = result.no_connack - sum(result.errors.values())
    if pending:
        notes.append(
            f"{label}: {pending:,} clients were still waiting for CONNACK (or for the TCP"
            f" handshake) after {timeout_s:g} s"
        )
    if result.closed_after_connack:
        notes.append(
            f"{label}: the broker closed {result.closed_after_connack:,} connections after"
            " their CONNACK, before the end of the storm"
        )
    if result.canary_error:
        notes.append(f"{label}: canary failed: {result.canary_error}")
    if result.canary_unfinished_ms is not None:
        notes.append(
            f"{label}: a canary round trip was still waiting after"
            f" {result.canary_unfinished_ms:.0f} ms when the storm ended, and counts in its max"
        )
    if result.broker_exit_code is not None:
        notes.append(f"{label}: the broker exited with code {result.broker_exit_code}")
    if result.log_excerpt:
        notes.append(f"{label}: {result.log_problem_lines} warning/error lines in its log, first:")
        notes.extend(f"    {line}" for line in result.log_excerpt)
    return notes


def print_header(options: StormOptions, log_dir: Path) -> None:
    print(
        f"{options.clients:,} clients in {options.processes} generator processes connect at"
        f" once from {len(options.source_addresses)} source addresses"
        f" ({options.source_addresses[0]}..{options.source_addresses[-1]}), MQTT 3.1.1"
        f" CONNECT with keep alive {options.keepalive_s} s, timeout {options.timeout_s:g} s,"
        f" {os.cpu_count()} CPUs."
    )
    print(
        f"Kernel: net.core.somaxconn {read_sysctl('net.core.somaxconn')},"
        f" net.ipv4.tcp_max_syn_backlog {read_sysctl('net.ipv4.tcp_max_syn_backlog')},"
        f" net.ipv4.tcp_syncookies {read_sysctl('net.ipv4.tcp_syncookies')}."
        " The netstat counters count for the whole host."
    )
    print(
        "CONNACK percentiles are over all clients, timed from the release of the storm, and a"
        " client without CONNACK counts as slower than the timeout. The canary does one QoS 1"
        " publish round trip to its own topic at a time during the storm. Broker CPU counts"
        " the broker and its descendants, and peak RSS is VmHWM since the broker started."
    )
    if options.ironshadow_args:
        print(f"IronShadow extra flags: {options.ironshadow_args}")
    # Port 0 is a placeholder for the port of each run, and [1:] drops the listener line.
    mosquitto_config = "; ".join(mosquitto_config_lines(0, MOSQUITTO_SETTINGS)[1:])
    print(
        f"Mosquitto runs with {mosquitto_config}. Mosquitto 2.0.11 has no setting for its"
        " listen backlog."
    )
    print(f"Broker logs: {log_dir}")


def print_report(
    results: Sequence[StormResult],
    failures: Sequence[str],
    options: StormOptions,
    log_dir: Path,
) -> None:
    print_header(options, log_dir)
    print()
    if results:
        print(format_table(results, options.timeout_s))
        print()
    for result in results:
        for note in describe_result(result, options.timeout_s):
            print(f"note: {note}")
    for failure in failures:
        print(f"failed: {failure}")


def build_json_report(
    results: Sequence[StormResult],
    failures: Sequence[str],
    options: StormOptions,
    log_dir: Path,
) -> dict[str, Any]:
    return {
        "options": asdict(options),
        "cpus": os.cpu_count(),
        "sysctl": {
            name: read_sysctl(name)
            for name in (
                "net.core.somaxconn",
                "net.ipv4.tcp_max_syn_backlog",
                "net.ipv4.tcp_syncookies",
                "net.ipv4.ip_local_port_range",
            )
        },
        "mosquitto_config": mosquitto_config_lines(0, MOSQUITTO_SETTINGS)[1:],
        "log_dir": str(log_dir),
        "results": [asdict(result) for result in results],
        "failures": list(failures),
    }


# --- Command line --------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Connect many MQTT clients at once to IronShadow and Mosquitto on"
        " loopback, and measure the time to CONNACK, listen-queue drops, broker CPU and"
        " memory, and the latency of a connected client during the storm."
    )
    parser.add_argument(
        "--clients",
        type=positive_int,
        default=DEFAULT_CLIENTS,
        help=f"storm clients (default {DEFAULT_CLIENTS})",
    )
    parser.add_argument(
        "--processes",
        type=positive_int,
        default=DEFAULT_PROCESSES,
        help=f"generator processes that share the clients (default {DEFAULT_PROCESSES})",
    )
    parser.add_argument(
        "--timeout",
        type=positive_float,
        default=DEFAULT_TIMEOUT_S,
        help="seconds after the release within which a client must have its CONNACK"
        f" (default {DEFAULT_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--only", choices=["ironshadow", "mosquitto"], help="measure one broker only"
    )
    parser.add_argument(
        "--ironshadow-args",
        default="",
        help='extra flags for `ironshadow serve`, for example "--connect-rate 5000"',
    )
    add_ironshadow_cmd_argument(parser)
    add_mosquitto_argument(parser)
    parser.add_argument(
        "--log-dir",
        type=Path,
        help="folder for the broker logs (default: a new folder under the system's"
        " temporary folder, named in the report)",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON report as the last line")
    return parser


def choose_source_addresses(clients: int, processes: int) -> tuple[str, ...]:
    """Return enough loopback source addresses for the clients, at least one per process."""
    count = max(processes, math.ceil(clients / MAX_CLIENTS_PER_SOURCE_ADDRESS))
    return tuple(str(FIRST_SOURCE_ADDRESS + offset) for offset in range(count))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    options = parser.parse_args(argv)
    if options.processes > options.clients:
        parser.error("--processes must not exceed --clients")

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    per_process = math.ceil(options.clients / options.processes)
    if hard != resource.RLIM_INFINITY and per_process + GENERATOR_FILE_RESERVE > hard:
        parser.error(
            f"{per_process} clients per process exceed the open-file limit of {hard}"
            f" (less {GENERATOR_FILE_RESERVE} for the process itself): raise --processes"
        )

    source_count = max(
        options.processes, math.ceil(options.clients / MAX_CLIENTS_PER_SOURCE_ADDRESS)
    )
    available = int(LAST_SOURCE_ADDRESS) - int(FIRST_SOURCE_ADDRESS) + 1
    if source_count > available:
        parser.error(
            f"{options.clients} clients need {source_count} source addresses, but only"
            f" {available} are available: lower --clients or --processes"
        )

    ports = ephemeral_port_count()
    if ports is not None and ports < MAX_CLIENTS_PER_SOURCE_ADDRESS:
        parser.error(
            f"net.ipv4.ip_local_port_range has {ports} ports, fewer than the"
            f" {MAX_CLIENTS_PER_SOURCE_ADDRESS} clients per source address"
        )

    try:
        shlex.split(options.ironshadow_args)
    except ValueError as error:
        parser.error(f"--ironshadow-args: {error}")
    return options


def selected_brokers(options: argparse.Namespace) -> list[BrokerSpec]:
    brokers = {
        "ironshadow": make_ironshadow_spec(options.ironshadow_cmd, options.ironshadow_args),
        "mosquitto": make_mosquitto_spec(options.mosquitto, MOSQUITTO_SETTINGS),
    }
    if options.only:
        return [brokers[options.only]]
    return list(brokers.values())


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parse_args(argv)
    options = StormOptions(
        clients=arguments.clients,
        processes=arguments.processes,
        timeout_s=arguments.timeout,
        keepalive_s=min(MAX_KEEPALIVE_S, max(KEEPALIVE_S, math.ceil(arguments.timeout))),
        source_addresses=choose_source_addresses(arguments.clients, arguments.processes),
        ironshadow_args=arguments.ironshadow_args,
    )
    if arguments.log_dir is None:
        log_dir = Path(tempfile.mkdtemp(prefix="connect-storm-"))
    else:
        log_dir = arguments.log_dir
        log_dir.mkdir(parents=True, exist_ok=True)

    results: list[StormResult] = []
    failures: list[str] = []
    for spec in selected_brokers(arguments):
        print(
            f"running {spec.name}: {options.clients:,} clients, up to {options.timeout_s:g} s ...",
            file=sys.stderr,
            flush=True,
        )
        try:
            result = measure(spec, options, log_dir / f"{spec.name}.log")
        except BenchmarkError as error:
            failures.append(f"{spec.name}: {error}")
            continue
        results.append(result)
        if result.broker_exit_code is not None:
            failures.append(f"{spec.name}: exited with code {result.broker_exit_code}")

    print_report(results, failures, options, log_dir)
    if arguments.json:
        print(json.dumps(build_json_report(results, failures, options, log_dir)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
