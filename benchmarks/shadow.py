"""Measure device shadow updates per second over MQTT: IronShadow against amqtt's shadow plugin.

For every selected broker, mode and QoS level the script starts a fresh broker on a free
loopback port and simulates devices. Each device has its own connection, its client id is
its thing name, and it publishes reported-state updates to its own shadow:

* IronShadow: ``$aws/things/{thing}/shadow/update`` (AWS IoT Device Shadow topics),
* amqtt 0.12.1 with ``amqtt.contrib.shadows.ShadowPlugin`` on SQLite:
  ``$shadow/{thing}/main/update``; the plugin stores one SQLAlchemy row per update and
  then publishes ``update/accepted``.

Each device subscribes to its own ``update/accepted`` and ``update/rejected`` topics, and
an update counts as applied when its ``update/accepted`` response reaches the device. So
the applied rate counts updates that the broker applied and confirmed, not messages that
it only read. The offered rate counts update PUBLISH packets sent by the devices.

Two modes:

* ``persistent``: each of --devices devices connects once and keeps --window updates in
  flight (sent, with no response yet), sending the next one when a response arrives. At
  QoS 1 it also keeps at most --window PUBLISH packets without PUBACK. This is the
  workload of a fleet, and the one that counts for IronShadow.
* ``one-shot``: each update comes from a new device. Each of --one-shot-devices device
  slots connects with a new client id and thing name, subscribes, publishes one update
  (which creates the thing's shadow), waits for the response (and its PUBACK at QoS 1),
  disconnects, and starts over with the next new thing. The engine CPU per update then
  includes a connection setup and teardown.

The one-shot mode exists because amqtt 0.12.1 cannot apply a stream of updates to one
shadow, for two reasons in its code:

* Its broker hands a PUBLISH to the plugins and then, because the topic starts with
  ``$``, logs a warning and leaves the client's message loop
  (``Broker._handle_message_delivery``). The connection stays open and later PUBLISH
  packets are still acknowledged at QoS 1, but nothing processes them. So a connection
  gets one update applied.
* The shadow plugin stores an update of an existing shadow as a new row whose primary key
  it sets to ``""`` (``convert_update_to_insert`` in ``amqtt/contrib/shadows/models.py``).
  The first such insert succeeds. Every later one fails with ``UNIQUE constraint failed:
  shadows_shadow.id``, and the device gets no response. So amqtt applies the first update
  of each shadow, and only one later update in the whole database.

In persistent mode amqtt therefore applies each device's first update and then none, and
the rate it shows there is its backlog of first updates from the warm-up. The
one-shot mode, where every update creates a shadow on a new connection, is the only
workload in which amqtt keeps applying updates, and it does the same work per update as
an update of an existing shadow: it looks up the latest version, inserts one row and
publishes the responses.

The report has, per run, the offered and applied updates per second in the measurement
window, the engine's CPU as a percentage of one core and in microseconds per applied
update (utime + stime of the broker process and its descendants, from /proc/<pid>/stat),
and the CPU of each load-generator process, so a reader can tell whether the generator
limited the rate. It ends with the ratio of IronShadow's applied rate to amqtt's for each
QoS level: both in one-shot mode (the same work), and IronShadow in persistent mode
against amqtt in one-shot mode (each broker in the mode in which it keeps applying
updates).

The load generator writes pre-encoded MQTT 3.1.1 packets through asyncio protocols on
uvloop and parses only what it needs of each response (fixed header, the last topic
level and, at QoS 1, the packet id to acknowledge). The devices run in
--generator-processes processes.

Usage (from the repository root)::

    .venv/bin/python benchmarks/shadow.py
    .venv/bin/python benchmarks/shadow.py --devices 200 --duration 5 --qos 1
    .venv/bin/python benchmarks/shadow.py --only amqtt --mode one-shot --json

amqtt runs from its own virtual environment, given by --amqtt-python. If that interpreter
is missing, or amqtt 0.12.1 with its contrib extra is not installed there, the script
skips amqtt and prints why. To install it::

    apt-get install -y libldap2-dev libsasl2-dev   # python-ldap in amqtt[contrib] builds on them
    python3 -m venv .amqtt-venv
    .amqtt-venv/bin/pip install 'amqtt[contrib]==0.12.1'

--ironshadow-cmd replaces the command that starts IronShadow, for example to measure
another build. The exit status is 1 if any run failed.

All traffic goes to 127.0.0.1, and only to brokers that this script starts itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import multiprocessing
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnContext
from pathlib import Path
from typing import Any, cast

from support import (
    BROKER_HOST,
    CONNACK,
    DISCONNECT_PACKET,
    PUBACK,
    PUBACK_HEADER,
    PUBLISH,
    READY,
    START,
    SUBACK,
    SUBACK_FAILURE,
    BenchmarkError,
    BrokerSpec,
    ControlChannel,
    ProtocolError,
    RunningBroker,
    Worker,
    add_ironshadow_cmd_argument,
    add_qos_argument,
    add_window_arguments,
    encode_connect,
    encode_publish,
    encode_subscribe,
    format_table,
    host_cpu_ticks,
    make_ironshadow_spec,
    matching_log_lines,
    positive_int,
    process_cpu_seconds,
    process_tree_cpu_seconds,
    read_netstat_counters,
    receive_message,
    run_worker,
    send_command,
    split_evenly,
    split_packets,
    start_worker,
    stop_workers,
)

DEFAULT_DEVICES = 1000
# One-shot device slots: each slot opens at most one connection at a time. amqtt 0.12.1
# listens with asyncio's default backlog of 100. With 1,000 slots (this script, 2-core
# machine) the kernel dropped 1,700 to 1,900 connections at its full listen queue in a
# 12 s run and about 400 cycles timed out, which measured the listen queue more than the
# shadow plugin.
DEFAULT_ONE_SHOT_DEVICES = 100
DEFAULT_DURATION_S = 10.0
DEFAULT_WARMUP_S = 2.0
DEFAULT_WINDOW = 1  # updates in flight per device in persistent mode
DEFAULT_GENERATOR_PROCESSES = 1
DEFAULT_AMQTT_PYTHON = ".amqtt-venv/bin/python"
MODES = ("persistent", "one-shot")

AMQTT_EXPECTED_VERSION = "0.12.1"
AMQTT_SHADOW_NAME = "main"  # amqtt has no unnamed shadow, so every device uses this name
AMQTT_PROBE_TIMEOUT_S = 30.0

# Each device cycles through this many pre-encoded update packets with different reported
# values. At QoS 1 packet i carries packet id i + 1, so an id comes back 16 updates later.
# With at most --window (half of 16) PUBLISH packets unacknowledged at any time, that id
# has been acknowledged by then, unless the broker sends PUBACKs far out of order.
PACKETS_PER_DEVICE = 16
MAX_WINDOW = PACKETS_PER_DEVICE // 2

BROKER_START_TIMEOUT_S = 30.0
BROKER_STOP_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 10.0  # TCP connect, CONNACK or SUBACK of one device
RESPONSE_TIMEOUT_S = 10.0  # response to one update in one-shot mode
SETUP_TIMEOUT_PER_DEVICE_S = 0.05  # added to CONNECT_TIMEOUT_S for all devices of a worker
WORKER_STOP_TIMEOUT_S = 10.0
WORKER_STOP_GRACE_S = 5.0  # added to warm-up + duration for the workers' own deadline
DRAIN_S = 1.0  # after STOP, devices wait this long for responses still in flight
COUNTER_SYNC_INTERVAL_S = 0.01  # how often a worker copies its counters to shared memory
RETRY_PAUSE_S = 0.1  # pause of a one-shot device slot after a failed cycle
MAX_CONCURRENT_CONNECTS = 20  # per worker, while persistent-mode devices connect

# A keep-alive of 0 turns the mechanism off (MQTT 3.1.1 section 3.1.2.10), so a device
# that waits for responses needs no PINGREQ.
KEEPALIVE_S = 0

WRITE_BUFFER_HIGH_BYTES = 64 * 1024
WRITE_BUFFER_LOW_BYTES = 16 * 1024

# Thresholds for the notes printed under the table.
GENERATOR_SATURATED_PERCENT = 90.0  # of one core, for a single generator process
HOST_SATURATED_PERCENT = 95.0  # of all cores
TARGET_RATIO = 20.0  # IronShadow applied rate ÷ amqtt applied rate

MICROSECONDS_PER_S = 1_000_000

# The last level of a response topic: "accepted" and "rejected" have the same length,
# so its first byte distinguishes them.
RESPONSE_LEVEL_LENGTH = len("accepted")
ACCEPTED_MARK = ord("a")
REJECTED_MARK = ord("r")

# Broker log lines counted as errors in the notes.
LOG_ERROR_PATTERN = re.compile(r"\bERROR\b|\bCRITICAL\b|Traceback")


# --- Shadow topics of each broker ----------------------------------------------------


def ironshadow_update_topic(thing: str) -> str:
    return f"$aws/things/{thing}/shadow/update"


def amqtt_update_topic(thing: str) -> str:
    return f"$shadow/{thing}/{AMQTT_SHADOW_NAME}/update"


def thing_name(index: int, cycle: int | None = None) -> str:
    """Name device `index`, or the one-shot device of slot `index` in its cycle `cycle`."""
    # Both brokers accept [a-zA-Z0-9_-] in thing names.
    if cycle is None:
        return f"bench-device-{index}"
    return f"bench-device-{index}-{cycle}"


def encode_update_payload(variant: int) -> bytes:
    """Encode a reported-state update; each variant reports a different temperature."""
    document = {"state": {"reported": {"temperature_c": 20 + variant / 10, "status": "running"}}}
    return json.dumps(document, separators=(",", ":")).encode()


@dataclass(frozen=True)
class DevicePackets:
    """The pre-encoded packets of one device."""

    connect: bytes
    subscribe: bytes  # update/accepted and update/rejected, in one SUBSCRIBE
    updates: tuple[bytes, ...]  # at QoS 1 update i has packet id i + 1


def encode_device_packets(broker: str, thing: str, qos: int, updates: int) -> DevicePackets:
    """Encode the packets of the device whose client id and thing name are `thing`."""
    if broker == "amqtt":
        update_topic = amqtt_update_topic(thing)
    else:
        update_topic = ironshadow_update_topic(thing)
    filters = [f"{update_topic}/accepted", f"{update_topic}/rejected"]
    return DevicePackets(
        connect=encode_connect(thing, KEEPALIVE_S),
        subscribe=encode_subscribe(1, filters, qos),
        updates=tuple(
            encode_publish(update_topic, encode_update_payload(variant), qos, variant + 1)
            for variant in range(updates)
        ),
    )


# --- Load generator: counters --------------------------------------------------------


COUNTER_NAMES = ("offered", "applied", "rejected", "disconnects", "failed_cycles", "unanswered")


@dataclass
class SharedCounters:
    """Counters in shared memory, one slot per generator process, each with a single writer.

    offered: update PUBLISH packets sent. applied: update/accepted responses received.
    rejected: update/rejected responses received. disconnects: connections that the
    broker closed while the device still expected something. failed_cycles: one-shot
    cycles that failed or timed out. unanswered: updates without a response when the
    worker stopped (written once, at the end).
    """

    arrays: dict[str, ctypes.Array[ctypes.c_longlong]]

    @classmethod
    def create(cls, context: SpawnContext, processes: int) -> SharedCounters:
        return cls({name: context.RawArray(ctypes.c_longlong, processes) for name in COUNTER_NAMES})

    def total(self, name: str) -> int:
        return sum(self.arrays[name])


class Tally:
    """A worker's counters as plain integers, copied to its shared slot every few ms.

    Adding to a plain attribute costs less than writing shared memory for every event.
    """

    def __init__(self, counters: SharedCounters, slot: int) -> None:
        self.counters = counters
        self.slot = slot
        self.offered = 0
        self.applied = 0
        self.rejected = 0
        self.disconnects = 0
        self.failed_cycles = 0
        self.unanswered = 0
        self.first_protocol_error: ProtocolError | None = None
        self._timer: asyncio.TimerHandle | None = None

    def record_protocol_error(self, error: ProtocolError) -> None:
        if self.first_protocol_error is None:
            self.first_protocol_error = error

    def raise_protocol_error(self) -> None:
        """Raise the first protocol error seen, because it makes the run's counts unreliable."""
        if self.first_protocol_error is not None:
            raise self.first_protocol_error

    def sync(self) -> None:
        for name in COUNTER_NAMES:
            self.counters.arrays[name][self.slot] = getattr(self, name)

    def start_syncing(self) -> None:
        self.sync()
        self._timer = asyncio.get_running_loop().call_later(
            COUNTER_SYNC_INTERVAL_S, self.start_syncing
        )

    def stop_syncing(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.sync()


# --- Load generator: device connections ----------------------------------------------


class DeviceProtocol(asyncio.Protocol):
    """One device's MQTT 3.1.1 connection: splits incoming bytes into packets.

    It handles CONNACK and SUBACK through futures, acknowledges QoS 1 responses, and
    passes responses and PUBACKs to on_response() and on_puback(). Replies for a whole
    read go out in one write from after_read().
    """

    def __init__(self, tally: Tally) -> None:
        self.tally = tally
        self.transport: asyncio.Transport | None = None
        self.stopping = False
        self._partial = b""
        self._acks = bytearray()
        loop = asyncio.get_running_loop()
        self.connack: asyncio.Future[None] = loop.create_future()
        self.suback: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transport implements asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(WRITE_BUFFER_HIGH_BYTES, WRITE_BUFFER_LOW_BYTES)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        if self.stopping:
            return
        self.tally.disconnects += 1
        self.fail(ConnectionError(f"broker closed the connection: {exc or 'end of stream'}"))

    def fail(self, error: Exception) -> None:
        """Fail the futures that still wait; subclasses add their own."""
        for future in (self.connack, self.suback):
            if not future.done():
                future.set_exception(error)

    def data_received(self, data: bytes) -> None:
        if self._partial:
            data = self._partial + data
        try:
            position = split_packets(data, self.handle_packet)
        except ProtocolError as error:
            self.tally.record_protocol_error(error)
            self.fail(error)
            self.close()
            return
        self._partial = data[position:]
        self.after_read()

    def handle_packet(self, first_byte: int, data: bytes, body_start: int, body_end: int) -> None:
        packet_type = first_byte >> 4
        if packet_type == PUBLISH:
            self._handle_response(first_byte, data, body_start, body_end)
        elif packet_type == PUBACK:
            self.on_puback()
        elif packet_type == CONNACK:
            return_code = data[body_start + 1]
            if return_code == 0:
                self.connack.set_result(None)
            else:
                error = ConnectionError(f"broker rejected CONNECT with return code {return_code}")
                self.connack.set_exception(error)
        elif packet_type == SUBACK:
            if SUBACK_FAILURE in data[body_start + 2 : body_end]:
                error = ConnectionError("broker rejected the subscription to the response topics")
                self.suback.set_exception(error)
            else:
                self.suback.set_result(None)
        else:
            raise ProtocolError(f"unexpected packet type {packet_type} for a device")

    def _handle_response(
        self, first_byte: int, data: bytes, body_start: int, body_end: int
    ) -> None:
        topic_length = (data[body_start] << 8) | data[body_start + 1]
        topic_end = body_start + 2 + topic_length
        if topic_end > body_end or topic_length < RESPONSE_LEVEL_LENGTH:
            raise ProtocolError(f"PUBLISH with a topic length of {topic_length} bytes")
        mark = data[topic_end - RESPONSE_LEVEL_LENGTH]
        if mark == ACCEPTED_MARK:
            self.tally.applied += 1
        elif mark == REJECTED_MARK:
            self.tally.rejected += 1
        else:
            topic = data[body_start + 2 : topic_end].decode(errors="replace")
            raise ProtocolError(
                f"unexpected PUBLISH on {topic!r}: expected update/accepted or update/rejected"
            )
        qos = (first_byte >> 1) & 0x03
        if qos == 1:
            self._acks += PUBACK_HEADER
            self._acks += data[topic_end : topic_end + 2]
        elif qos != 0:
            raise ProtocolError(f"received a QoS {qos} PUBLISH but subscribed with QoS 0 or 1")
        self.on_response()

    def on_response(self) -> None:
        """Handle one update/accepted or update/rejected response (already counted)."""

    def on_puback(self) -> None:
        """Handle the PUBACK of one update."""

    def after_read(self) -> None:
        """Send what handling one read produced: PUBACKs here, more in subclasses."""
        if self._acks:
            self.write(bytes(self._acks))
            self._acks.clear()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        """Send DISCONNECT and close the connection; the broker closing it is then no error."""
        self.stopping = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(DISCONNECT_PACKET)
            self.transport.close()


async def wait_for_reply(reply: asyncio.Future[Any], timeout_s: float, description: str) -> None:
    try:
        await asyncio.wait_for(reply, timeout_s)
    except TimeoutError:
        raise TimeoutError(f"timed out after {timeout_s:.0f} s: {description}") from None


async def connect_device(device: DeviceProtocol, port: int, packets: DevicePackets) -> None:
    """Open the TCP connection, then send CONNECT and SUBSCRIBE, each after the previous ack."""
    loop = asyncio.get_running_loop()
    connection = loop.create_connection(lambda: device, BROKER_HOST, port)
    await asyncio.wait_for(connection, CONNECT_TIMEOUT_S)
    device.write(packets.connect)
    await wait_for_reply(device.connack, CONNECT_TIMEOUT_S, "CONNACK")
    device.write(packets.subscribe)
    await wait_for_reply(device.suback, CONNECT_TIMEOUT_S, "SUBACK")


class PersistentDevice(DeviceProtocol):
    """A device that stays connected and keeps `window` updates in flight.

    An update is in flight from its PUBLISH until its response. At QoS 1 the device also
    keeps at most `window` PUBLISH packets without PUBACK.
    """

    def __init__(self, tally: Tally, packets: DevicePackets, qos: int, window: int) -> None:
        super().__init__(tally)
        self.packets = packets
        self.qos = qos
        self.window = window
        self.sent = 0
        self.responses = 0
        self.pubacks = 0
        self.started = False  # set by start(), after CONNACK and SUBACK

    def start(self) -> None:
        self.started = True
        self._send_allowed()

    def on_response(self) -> None:
        self.responses += 1

    def on_puback(self) -> None:
        self.pubacks += 1

    def after_read(self) -> None:
        super().after_read()
        if self.started and not self.stopping:
            self._send_allowed()

    def _send_allowed(self) -> None:
        batch = []
        while self.sent - self.responses < self.window and (
            self.qos == 0 or self.sent - self.pubacks < self.window
        ):
            batch.append(self.packets.updates[self.sent % PACKETS_PER_DEVICE])
            self.sent += 1
        if batch:
            self.write(b"".join(batch))
            self.tally.offered += len(batch)

    def unanswered(self) -> int:
        return self.sent - self.responses


class CycleDevice(DeviceProtocol):
    """One connection of a one-shot device: one update, then DISCONNECT."""

    def __init__(self, tally: Tally, qos: int) -> None:
        super().__init__(tally)
        loop = asyncio.get_running_loop()
        self.response: asyncio.Future[None] = loop.create_future()
        self.puback: asyncio.Future[None] = loop.create_future()
        if qos == 0:
            self.puback.set_result(None)

    def fail(self, error: Exception) -> None:
        super().fail(error)
        for future in (self.response, self.puback):
            if not future.done():
                future.set_exception(error)

    def on_response(self) -> None:
        if not self.response.done():
            self.response.set_result(None)

    def on_puback(self) -> None:
        if not self.puback.done():
            self.puback.set_result(None)


async def run_device_cycles(
    tally: Tally, settings: LoadSettings, slot_index: int, stop: asyncio.Event
) -> None:
    """Run one one-shot device slot until `stop` is set.

    Each cycle is a new device: connect, subscribe, send one update, wait for its
    response, disconnect.
    """
    cycle = 0
    while not stop.is_set():
        thing = thing_name(slot_index, cycle)
        cycle += 1
        packets = encode_device_packets(settings.broker, thing, settings.qos, updates=1)
        device = CycleDevice(tally, settings.qos)
        failed = False
        try:
            await connect_device(device, settings.port, packets)
            device.write(packets.updates[0])
            tally.offered += 1
            await wait_for_reply(device.response, RESPONSE_TIMEOUT_S, "update response")
            await wait_for_reply(device.puback, RESPONSE_TIMEOUT_S, "PUBACK")
        except (OSError, TimeoutError, ProtocolError):
            tally.failed_cycles += 1
            failed = True
        finally:
            device.close()
        if device.transport is not None:
            # Wait until the connection is closed, so that the open connections stay
            # at one per slot.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(device.closed, CONNECT_TIMEOUT_S)
        if failed and not stop.is_set():
            await asyncio.sleep(RETRY_PAUSE_S)


# --- Load generator: worker processes ------------------------------------------------


@dataclass(frozen=True)
class LoadSettings:
    """Settings that the parent passes to every worker process."""

    broker: str  # "ironshadow" or "amqtt": chooses the topic layout
    mode: str
    port: int
    qos: int
    window: int
    run_limit_s: float  # a worker stops by itself this long after START


def setup_timeout_s(devices: int) -> float:
    return CONNECT_TIMEOUT_S + SETUP_TIMEOUT_PER_DEVICE_S * devices


async def run_persistent_devices(
    settings: LoadSettings, tally: Tally, control: ControlChannel, first_index: int, count: int
) -> None:
    devices = []
    limit = asyncio.Semaphore(MAX_CONCURRENT_CONNECTS)

    async def connect(index: int) -> None:
        packets = encode_device_packets(
            settings.broker, thing_name(index), settings.qos, PACKETS_PER_DEVICE
        )
        device = PersistentDevice(tally, packets, settings.qos, settings.window)
        devices.append(device)
        async with limit:
            try:
                await connect_device(device, settings.port, packets)
            except (OSError, TimeoutError) as error:
                raise BenchmarkError(f"device {thing_name(index)}: {error}") from error

    await asyncio.gather(*(connect(index) for index in range(first_index, first_index + count)))
    control.send(READY)

    if await control.receive(setup_timeout_s(count)) != START:
        raise BenchmarkError("timed out waiting for the start command from the parent process")
    tally.start_syncing()
    for device in devices:
        device.start()
    await control.receive(settings.run_limit_s)

    for device in devices:
        device.stopping = True
    await asyncio.sleep(DRAIN_S)
    tally.unanswered = sum(device.unanswered() for device in devices)
    for device in devices:
        device.close()
    tally.stop_syncing()


async def run_one_shot_devices(
    settings: LoadSettings, tally: Tally, control: ControlChannel, first_index: int, count: int
) -> None:
    control.send(READY)
    if await control.receive(setup_timeout_s(count)) != START:
        raise BenchmarkError("timed out waiting for the start command from the parent process")

    tally.start_syncing()
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(run_device_cycles(tally, settings, index, stop))
        for index in range(first_index, first_index + count)
    ]
    await control.receive(settings.run_limit_s)
    stop.set()
    _, pending = await asyncio.wait(tasks, timeout=DRAIN_S)
    # A device still waiting after the drain has an update in flight or a connect pending.
    tally.unanswered = len(pending)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    tally.stop_syncing()


def worker_main(
    connection: Connection,
    settings: LoadSettings,
    counters: SharedCounters,
    slot: int,
    first_index: int,
    count: int,
) -> None:
    """Run one generator process's devices and report failures to the parent."""
    control = ControlChannel(connection)
    role = run_persistent_devices if settings.mode == "persistent" else run_one_shot_devices

    async def run() -> None:
        tally = Tally(counters, slot)
        await role(settings, tally, control, first_index, count)
        await asyncio.sleep(0.1)  # let the DISCONNECT packets reach the broker
        tally.raise_protocol_error()

    run_worker(control, run)


# --- Kernel counters from /proc ------------------------------------------------------


def listen_overflows() -> int:
    """Return the host's TcpExt ListenOverflows counter from /proc/net/netstat (0 if absent).

    It counts connections dropped because a listen queue was full, on every listener of
    the host, which costs the client a SYN retransmission of at least 1 s.
    """
    return read_netstat_counters(["ListenOverflows"]).get("ListenOverflows", 0)


# --- Brokers -------------------------------------------------------------------------


AMQTT_PROBE_SCRIPT = (
    "import amqtt, amqtt.contrib.shadows, aiosqlite, amqtt.scripts.broker_script;"
    " print(amqtt.__version__)"
)


def probe_amqtt(python: str) -> tuple[str | None, str]:
    """Return (amqtt version, "") if `python` can run amqtt's shadow plugin, else (None, reason)."""
    if not Path(python).exists():
        return None, f"{python} does not exist"
    try:
        completed = subprocess.run(
            [python, "-c", AMQTT_PROBE_SCRIPT],
            capture_output=True,
            text=True,
            timeout=AMQTT_PROBE_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return None, f"cannot run {python}: {error}"
    if completed.returncode != 0:
        last_line = (completed.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"{python} cannot import amqtt's shadow plugin: {last_line}"
    return completed.stdout.strip(), ""


def amqtt_config(port: int, database: Path) -> dict[str, Any]:
    """Return amqtt's broker configuration: anonymous clients and the shadow plugin on SQLite.

    Naming the plugins replaces amqtt's default list, so its packet and event logger
    plugins and its $SYS plugin do not run.
    """
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{BROKER_HOST}:{port}"}},
        "plugins": {
            "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
            "amqtt.contrib.shadows.ShadowPlugin": {"connection": f"sqlite+aiosqlite:///{database}"},
        },
    }


def count_amqtt_rows(workdir: Path) -> int | None:
    database = workdir / "shadows.db"
    if not database.exists():
        return None
    try:
        with contextlib.closing(sqlite3.connect(database)) as connection:
            return connection.execute("SELECT COUNT(*) FROM shadows_shadow").fetchone()[0]
    except sqlite3.Error:
        return None


def make_amqtt_spec(python: str) -> BrokerSpec:
    def build(port: int, workdir: Path) -> list[str]:
        config_path = workdir / "amqtt.yaml"
        # JSON is valid YAML, and amqtt reads its config file with a YAML parser.
        config_path.write_text(json.dumps(amqtt_config(port, workdir / "shadows.db"), indent=2))
        return [python, "-m", "amqtt.scripts.broker_script", "-c", str(config_path)]

    return BrokerSpec("amqtt", build, count_store_rows=count_amqtt_rows)


def count_log_errors(log_path: Path) -> tuple[int, str | None]:
    """Return the number of error lines in the broker's output, and the first of them."""
    errors = matching_log_lines(log_path, LOG_ERROR_PATTERN)
    return len(errors), errors[0].strip() if errors else None


# --- One measurement run -------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """Counters and CPU times read at one instant of a run."""

    wall_s: float
    offered: int
    applied: int
    rejected: int
    engine_cpu_s: float
    generator_cpu_s: tuple[float, ...]
    host_busy_ticks: int
    host_total_ticks: int


@dataclass
class RunResult:
    """Rates and CPU costs of one broker in one mode at one QoS level."""

    broker: str
    mode: str
    qos: int
    devices: int
    window_s: float
    offered_per_s: float
    applied_per_s: float
    rejected_per_s: float
    engine_cpu_percent: float  # of one core
    engine_us_per_update: float | None  # per applied update, None if none was applied
    generator_cpu_percent: list[float]  # of one core, one entry per generator process
    host_cpu_percent: float  # of all CPUs, including processes outside the benchmark
    offered_total: int  # over the whole run: warm-up, window and drain
    applied_total: int
    disconnects: int
    failed_cycles: int
    unanswered: int  # updates (persistent) or device slots (one-shot) waiting at the end
    listen_overflows: int  # growth of the host's TcpExt ListenOverflows over the run
    engine_log_errors: int
    engine_first_log_error: str | None
    store_rows: int | None  # shadow rows in the broker's database after the run, if known


def take_snapshot(
    broker: RunningBroker, counters: SharedCounters, workers: Sequence[Worker]
) -> Snapshot:
    host_busy, host_total = host_cpu_ticks()
    return Snapshot(
        wall_s=time.monotonic(),
        offered=counters.total("offered"),
        applied=counters.total("applied"),
        rejected=counters.total("rejected"),
        engine_cpu_s=process_tree_cpu_seconds(broker.pid),
        generator_cpu_s=tuple(process_cpu_seconds(worker.pid) for worker in workers),
        host_busy_ticks=host_busy,
        host_total_ticks=host_total,
    )


@dataclass(frozen=True)
class RunOptions:
    """Command-line settings that apply to every run."""

    devices: int
    one_shot_devices: int
    duration_s: float
    warmup_s: float
    window: int
    generator_processes: int
    log_dir: str | None  # folder that receives a copy of each run's broker output


def devices_in_mode(options: RunOptions, mode: str) -> int:
    return options.devices if mode == "persistent" else options.one_shot_devices


def compute_result(
    spec: BrokerSpec, mode: str, qos: int, options: RunOptions, before: Snapshot, after: Snapshot
) -> RunResult:
    window_s = after.wall_s - before.wall_s
    applied = after.applied - before.applied
    engine_cpu_s = after.engine_cpu_s - before.engine_cpu_s
    generator_cpu_s = [
        a - b for a, b in zip(after.generator_cpu_s, before.generator_cpu_s, strict=True)
    ]
    host_total = after.host_total_ticks - before.host_total_ticks
    host_busy = after.host_busy_ticks - before.host_busy_ticks
    return RunResult(
        broker=spec.name,
        mode=mode,
        qos=qos,
        devices=devices_in_mode(options, mode),
        window_s=window_s,
        offered_per_s=(after.offered - before.offered) / window_s,
        applied_per_s=applied / window_s,
        rejected_per_s=(after.rejected - before.rejected) / window_s,
        engine_cpu_percent=100 * engine_cpu_s / window_s,
        engine_us_per_update=MICROSECONDS_PER_S * engine_cpu_s / applied if applied else None,
        generator_cpu_percent=[100 * seconds / window_s for seconds in generator_cpu_s],
        host_cpu_percent=100 * host_busy / host_total if host_total else 0.0,
        offered_total=0,
        applied_total=0,
        disconnects=0,
        failed_cycles=0,
        unanswered=0,
        listen_overflows=0,
        engine_log_errors=0,
        engine_first_log_error=None,
        store_rows=None,
    )


def measure(spec: BrokerSpec, mode: str, qos: int, options: RunOptions) -> RunResult:
    """Start the broker and the devices, measure one window, and stop everything."""
    context = multiprocessing.get_context("spawn")
    overflows_before = listen_overflows()
    with RunningBroker(
        spec,
        start_timeout_s=BROKER_START_TIMEOUT_S,
        stop_timeout_s=BROKER_STOP_TIMEOUT_S,
        tempdir_prefix="bench-shadow",
    ) as broker:
        settings = LoadSettings(
            broker=spec.name,
            mode=mode,
            port=broker.port,
            qos=qos,
            window=options.window,
            run_limit_s=options.warmup_s + options.duration_s + WORKER_STOP_GRACE_S,
        )
        counters = SharedCounters.create(context, options.generator_processes)
        workers: list[Worker] = []
        errors: list[str] = []
        try:
            slices = split_evenly(devices_in_mode(options, mode), options.generator_processes)
            for slot, (start, count) in enumerate(slices):
                workers.append(
                    start_worker(
                        context,
                        f"generator-{slot}",
                        worker_main,
                        settings,
                        counters,
                        slot,
                        start,
                        count,
                    )
                )
            for worker, (_, count) in zip(workers, slices, strict=True):
                timeout_s = setup_timeout_s(count) + BROKER_START_TIMEOUT_S
                receive_message(worker, READY, timeout_s, task="connect its devices")

            for worker in workers:
                send_command(worker, START)
            time.sleep(options.warmup_s)
            before = take_snapshot(broker, counters, workers)
            time.sleep(options.duration_s)
            after = take_snapshot(broker, counters, workers)
            broker.check_running()
        except BenchmarkError as error:
            errors.append(str(error))
        finally:
            errors.extend(stop_workers(workers, WORKER_STOP_TIMEOUT_S))
            broker.stop()
        if errors:
            raise BenchmarkError("; ".join(errors))

        result = compute_result(spec, mode, qos, options, before, after)
        result.engine_log_errors, result.engine_first_log_error = count_log_errors(broker.log_path)
        if options.log_dir is not None:
            log_copy = Path(options.log_dir) / f"{spec.name}-{mode}-qos{qos}.log"
            shutil.copyfile(broker.log_path, log_copy)
        result.store_rows = broker.store_rows()

    result.offered_total = counters.total("offered")
    result.applied_total = counters.total("applied")
    result.disconnects = counters.total("disconnects")
    result.failed_cycles = counters.total("failed_cycles")
    result.unanswered = counters.total("unanswered")
    result.listen_overflows = listen_overflows() - overflows_before
    return result


# --- Report --------------------------------------------------------------------------

TABLE_COLUMNS = [  # (heading, width)
    ("broker", 10),
    ("mode", 10),
    ("QoS", 3),
    ("devices", 7),
    ("offered upd/s", 13),
    ("applied upd/s", 13),
    ("engine CPU %", 12),
    ("engine µs/upd", 13),
    ("gen CPU %", 11),
    ("host CPU %", 10),
]


def format_row(result: RunResult) -> list[str]:
    us_per_update = result.engine_us_per_update
    return [
        result.broker,
        result.mode,
        str(result.qos),
        str(result.devices),
        f"{result.offered_per_s:,.0f}",
        f"{result.applied_per_s:,.0f}",
        f"{result.engine_cpu_percent:.1f}",
        "n/a" if us_per_update is None else f"{us_per_update:,.1f}",
        "+".join(f"{percent:.0f}" for percent in result.generator_cpu_percent),
        f"{result.host_cpu_percent:.1f}",
    ]


# The ratios of applied rates, IronShadow's mode first: (key, IronShadow mode, amqtt mode).
RATIO_PAIRS = [
    ("one-shot", "one-shot", "one-shot"),  # the same work on both sides
    ("persistent vs one-shot", "persistent", "one-shot"),  # each in its sustained mode
    ("persistent", "persistent", "persistent"),  # amqtt: first update of each device only
]


def compute_ratios(results: Sequence[RunResult]) -> dict[str, float]:
    """Return IronShadow's applied rate divided by amqtt's, keyed "qos 0, one-shot" and so on."""
    rate = {(result.broker, result.mode, result.qos): result.applied_per_s for result in results}
    ratios = {}
    for qos in sorted({result.qos for result in results}):
        for key, ironshadow_mode, amqtt_mode in RATIO_PAIRS:
            ironshadow = rate.get(("ironshadow", ironshadow_mode, qos))
            amqtt = rate.get(("amqtt", amqtt_mode, qos))
            if ironshadow is not None and amqtt:
                ratios[f"qos {qos}, {key}"] = ironshadow / amqtt
    return ratios


def describe_load_problems(result: RunResult, label: str) -> list[str]:
    """Return notes on what besides the broker may have limited a run's rate."""
    notes = []
    for number, percent in enumerate(result.generator_cpu_percent):
        if percent >= GENERATOR_SATURATED_PERCENT:
            notes.append(
                f"{label}: generator process {number} used {percent:.0f}% of a core, so the"
                " load generator may have limited the rate."
            )

    if result.host_cpu_percent >= HOST_SATURATED_PERCENT:
        notes.append(
            f"{label}: all {os.cpu_count()} CPUs were {result.host_cpu_percent:.0f}% busy, so the"
            " broker and the generator competed for CPU time."
        )

    if result.listen_overflows:
        notes.append(
            f"{label}: the kernel's ListenOverflows counter grew by {result.listen_overflows}"
            " (connections dropped at a full listen queue, each retried after 1 s or more)."
        )
    return notes


def describe_lost_updates(result: RunResult, label: str) -> list[str]:
    """Return notes on updates that were rejected, unanswered or failed, and broker errors."""
    notes = []
    if result.rejected_per_s:
        notes.append(f"{label}: {result.rejected_per_s:,.1f} updates/s were rejected.")

    if result.unanswered:
        unit = "updates" if result.mode == "persistent" else "devices still waiting"
        notes.append(
            f"{label}: {result.unanswered} {unit} had no response {DRAIN_S:g} s after the"
            f" devices stopped (of {result.offered_total:,} updates sent in the whole run)."
        )

    if result.failed_cycles:
        notes.append(
            f"{label}: {result.failed_cycles} connect-update-disconnect cycles failed or timed out."
        )

    if result.disconnects:
        notes.append(f"{label}: the broker closed {result.disconnects} device connections.")

    if result.engine_log_errors:
        notes.append(
            f"{label}: the broker logged {result.engine_log_errors} error lines, the first:"
            f" {result.engine_first_log_error}"
        )

    if result.store_rows is not None:
        notes.append(
            f"{label}: {result.store_rows:,} shadow rows stored for {result.applied_total:,}"
            " update/accepted responses in the whole run."
        )
    return notes


def describe_problems(result: RunResult) -> list[str]:
    """Return notes on what may have limited or distorted a run."""
    label = f"{result.broker} {result.mode} QoS {result.qos}"
    return describe_load_problems(result, label) + describe_lost_updates(result, label)


def print_header(options: RunOptions, modes: Sequence[str]) -> None:
    print(
        f"Modes {', '.join(modes)}: {options.devices} persistent devices with a window of"
        f" {options.window} update(s) each, or {options.one_shot_devices} one-shot device slots,"
        f" in {options.generator_processes} generator process(es); {options.warmup_s:g} s"
        f" warm-up + {options.duration_s:g} s window; {os.cpu_count()} CPUs."
    )
    print(
        "Applied upd/s counts update/accepted responses received by the devices (each device"
        " subscribes to its own update/accepted and update/rejected). Offered upd/s counts"
        " update PUBLISH packets sent. Engine CPU counts the broker process and its"
        " descendants, as % of one core and in µs per applied update; gen CPU % is one figure"
        " per generator process. In one-shot mode every update comes from a new device and"
        " includes a connection setup."
    )


def print_report(
    results: Sequence[RunResult],
    failures: Sequence[str],
    skipped: Sequence[str],
    options: RunOptions,
    modes: Sequence[str],
) -> None:
    print_header(options, modes)
    for reason in skipped:
        print(f"skipped: {reason}")
    print()
    if results:
        print(format_table(TABLE_COLUMNS, [format_row(result) for result in results]))
        print()

    ratios = compute_ratios(results)
    if ratios:
        print(f"applied updates/s, IronShadow ÷ amqtt (target at least {TARGET_RATIO:g}x):")
        for key, ratio in ratios.items():
            print(f"  {key}: {ratio:,.1f}x")
        print(
            "  (one-shot: the same work on both sides; persistent vs one-shot: each broker in"
            " the mode in which it keeps applying updates; persistent: amqtt applies only the"
            " first update of each device, so that ratio is not a throughput comparison)"
        )
    else:
        print("applied updates/s, IronShadow ÷ amqtt: not available (needs both brokers)")

    for result in results:
        for note in describe_problems(result):
            print(f"note: {note}")
    if any(result.broker == "amqtt" and result.mode == "persistent" for result in results):
        print(
            "note: amqtt 0.12.1 stops processing a client's messages after the client publishes"
            " to a topic that starts with '$', and its shadow plugin fails to store any but one"
            " update of an existing shadow, so in persistent mode it applies only the first"
            " update of each device (see the module docstring)."
        )
    for failure in failures:
        print(f"failed: {failure}")


def build_json_report(
    results: Sequence[RunResult],
    failures: Sequence[str],
    skipped: Sequence[str],
    options: RunOptions,
    amqtt_version: str | None,
) -> dict[str, Any]:
    return {
        "options": asdict(options),
        "cpus": os.cpu_count(),
        "applied_measured_by": "update/accepted responses received by the devices",
        "amqtt_version": amqtt_version,
        "results": [asdict(result) for result in results],
        "applied_ratio_ironshadow_to_amqtt": compute_ratios(results),
        "skipped": list(skipped),
        "failures": list(failures),
    }


# --- Command line --------------------------------------------------------------------


def parse_mode_list(text: str) -> list[str]:
    modes = [part.strip() for part in text.split(",") if part.strip()]
    if not modes or any(mode not in MODES for mode in modes):
        raise argparse.ArgumentTypeError(
            f"invalid mode list {text!r}: use persistent, one-shot or persistent,one-shot"
        )
    return list(dict.fromkeys(modes))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Measure shadow updates per second over MQTT, and engine CPU per update,"
        " for IronShadow and amqtt's shadow plugin on loopback."
    )

    # Workload
    parser.add_argument(
        "--devices",
        type=positive_int,
        default=DEFAULT_DEVICES,
        help="simulated devices in persistent mode, one connection each"
        f" (default {DEFAULT_DEVICES})",
    )
    parser.add_argument(
        "--one-shot-devices",
        type=positive_int,
        default=DEFAULT_ONE_SHOT_DEVICES,
        help="device slots in one-shot mode, each connecting, sending one update and"
        f" disconnecting, over and over (default {DEFAULT_ONE_SHOT_DEVICES})",
    )
    add_window_arguments(parser, DEFAULT_DURATION_S, DEFAULT_WARMUP_S)
    add_qos_argument(parser)
    parser.add_argument(
        "--mode",
        type=parse_mode_list,
        default=list(MODES),
        help="comma-separated modes to run: persistent (one connection per device) and"
        " one-shot (a new device and connection per update) (default persistent,one-shot)",
    )
    parser.add_argument(
        "--window",
        type=positive_int,
        default=DEFAULT_WINDOW,
        help="updates in flight per device in persistent mode"
        f" (default {DEFAULT_WINDOW}, at most {MAX_WINDOW})",
    )
    parser.add_argument(
        "--generator-processes",
        type=positive_int,
        default=DEFAULT_GENERATOR_PROCESSES,
        help=f"processes that share the devices (default {DEFAULT_GENERATOR_PROCESSES})",
    )

    # Brokers
    parser.add_argument("--only", choices=["ironshadow", "amqtt"], help="measure one broker only")
    add_ironshadow_cmd_argument(parser)
    parser.add_argument(
        "--amqtt-python",
        default=DEFAULT_AMQTT_PYTHON,
        help="Python interpreter of a virtual environment with 'amqtt[contrib]=="
        f"{AMQTT_EXPECTED_VERSION}' installed (default {DEFAULT_AMQTT_PYTHON})",
    )

    parser.add_argument(
        "--log-dir",
        help="existing folder to copy each run's broker output into, as"
        " {broker}-{mode}-qos{qos}.log (default: the output is deleted with the run)",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON report as the last line")
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    options = parser.parse_args(argv)
    if options.window > MAX_WINDOW:
        parser.error(f"--window {options.window} is larger than the maximum of {MAX_WINDOW}")
    if options.warmup < 0:
        parser.error("--warmup must not be negative")
    if options.log_dir is not None and not Path(options.log_dir).is_dir():
        parser.error(f"--log-dir {options.log_dir} is not an existing folder")
    if options.generator_processes > min(options.devices, options.one_shot_devices):
        parser.error("--generator-processes must not exceed --devices or --one-shot-devices")
    return options


def select_brokers(
    arguments: argparse.Namespace,
) -> tuple[list[BrokerSpec], list[str], str | None]:
    """Return the brokers to measure, the reasons for skipping others, and amqtt's version."""
    brokers = []
    skipped = []
    amqtt_version = None
    if arguments.only in (None, "ironshadow"):
        brokers.append(make_ironshadow_spec(arguments.ironshadow_cmd))
    if arguments.only in (None, "amqtt"):
        amqtt_version, reason = probe_amqtt(arguments.amqtt_python)
        if amqtt_version is None:
            skipped.append(f"amqtt: {reason}. Install it as the module docstring shows.")
        else:
            if amqtt_version != AMQTT_EXPECTED_VERSION:
                print(
                    f"warning: {arguments.amqtt_python} has amqtt {amqtt_version}; this"
                    f" benchmark was written for {AMQTT_EXPECTED_VERSION}",
                    file=sys.stderr,
                )
            brokers.append(make_amqtt_spec(arguments.amqtt_python))
    return brokers, skipped, amqtt_version


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parse_args(argv)
    options = RunOptions(
        devices=arguments.devices,
        one_shot_devices=arguments.one_shot_devices,
        duration_s=arguments.duration,
        warmup_s=arguments.warmup,
        window=arguments.window,
        generator_processes=arguments.generator_processes,
        log_dir=arguments.log_dir,
    )
    brokers, skipped, amqtt_version = select_brokers(arguments)
    for reason in skipped:
        print(f"skipping {reason}", file=sys.stderr)

    results: list[RunResult] = []
    failures: list[str] = []
    for spec in brokers:
        for mode in arguments.mode:
            for qos in arguments.qos:
                print(
                    f"running {spec.name} {mode} QoS {qos}:"
                    f" {devices_in_mode(options, mode)} devices,"
                    f" {options.warmup_s:g} s warm-up + {options.duration_s:g} s ...",
                    file=sys.stderr,
                    flush=True,
                )
                try:
                    results.append(measure(spec, mode, qos, options))
                except BenchmarkError as error:
                    failures.append(f"{spec.name} {mode} QoS {qos}: {error}")

    print_report(results, failures, skipped, options, arguments.mode)
    if arguments.json:
        report = build_json_report(results, failures, skipped, options, amqtt_version)
        print(json.dumps(report))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
