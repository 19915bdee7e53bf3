"""Measure MQTT routing throughput and broker CPU cost for IronShadow and Mosquitto.

For every selected broker and QoS level the script starts a fresh broker on a free
loopback port. It connects N publishers (one topic each, ``bench/{i}``) and one subscriber
on ``#``. The publishers send as fast as the broker accepts, first for a warm-up period
and then for the measurement window, and then the script stops the broker again. The
publishers pause once --max-backlog messages are published but not yet delivered, so that
a broker cannot take in messages much faster than it routes them. It reports:

* published and delivered messages per second during the window,
* broker CPU as a percentage of one core, and broker CPU microseconds per delivered
  message, from utime + stime in /proc/<pid>/stat of the broker and its descendants,
* the CPU used by the load generator's own processes, so a reader can tell whether the
  generator, not the broker, limited the rate.

At QoS 1 each publisher connection keeps a window of unacknowledged PUBLISH packets and
sends the next one when the broker's PUBACK arrives. The subscriber subscribes with QoS 1
and acknowledges every delivery.

The load generator writes pre-encoded MQTT 3.1.1 packets through asyncio protocols on
uvloop and counts deliveries by parsing only the fixed header (and, at QoS 1, the packet
id to acknowledge), so it costs little CPU per message. The subscriber runs in its own
process, and the publishers in one or more other processes.

Usage (from the repository root)::

    .venv/bin/python benchmarks/broker.py
    .venv/bin/python benchmarks/broker.py --only mosquitto --duration 5
    .venv/bin/python benchmarks/broker.py --qos 1 --publishers 50 --json

--ironshadow-cmd replaces the command that starts IronShadow, for example to measure
another build. The exit status is 1 if any run failed.

All traffic goes to 127.0.0.1, and only to brokers that this script starts itself.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnContext
from typing import Any, TypeVar, cast

from support import (
    BROKER_HOST,
    CONNACK,
    DISCONNECT_PACKET,
    MAX_PACKET_ID,
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
    add_mosquitto_argument,
    add_qos_argument,
    add_window_arguments,
    encode_connect,
    encode_publish,
    encode_subscribe,
    format_table,
    host_cpu_ticks,
    make_ironshadow_spec,
    make_mosquitto_spec,
    positive_int,
    process_cpu_seconds,
    process_tree_cpu_seconds,
    receive_message,
    run_worker,
    send_command,
    split_evenly,
    split_packets,
    start_worker,
    stop_workers,
)

T = TypeVar("T")

DEFAULT_DURATION_S = 10.0
DEFAULT_WARMUP_S = 2.0
DEFAULT_PUBLISHERS = 100
DEFAULT_PUBLISHER_PROCESSES = 1
DEFAULT_QOS1_WINDOW = 20  # unacknowledged PUBLISH packets per publisher connection
DEFAULT_PAYLOAD_BYTES = 64

BROKER_START_TIMEOUT_S = 20.0
BROKER_STOP_TIMEOUT_S = 5.0
WORKER_SETUP_TIMEOUT_S = 30.0  # connect, CONNACK and SUBACK for all connections
WORKER_STOP_TIMEOUT_S = 5.0
WORKER_STOP_GRACE_S = 5.0  # added to warm-up + duration for the workers' own deadline
CONNECT_TIMEOUT_S = 10.0
MAX_CONCURRENT_CONNECTS = 20

# A keep-alive of 0 turns the mechanism off (MQTT 3.1.1 section 3.1.2.10), so the
# subscriber, which sends nothing at QoS 0, needs no PINGREQ.
KEEPALIVE_S = 0

# Publishers pause once this many messages are published but not yet delivered, and
# resume below half of it. Without a limit, a broker that accepts messages faster
# than it delivers them queues them without bound, and its CPU per delivered message
# then includes receiving messages that are not delivered in the window. The default
# equals the QoS 1 messages that 100 publishers with a window of 20 may have unacknowledged.
# With 64-byte payloads it is about 160 kB of packets, below the 256 kB of buffered data
# at which IronShadow 0.1.0 starts to drop QoS 0 messages to a slow subscriber (its
# write_high_water setting).
DEFAULT_MAX_BACKLOG = 2_000
BACKLOG_POLL_INTERVAL_S = 0.001
BACKLOG_STALL_S = 0.1  # no delivery for this long means the broker dropped the backlog

QOS0_PACKETS_PER_WRITE = 32
QOS0_WRITES_PER_CALLBACK = 8  # then yield to the event loop so other connections run

# At QoS 0 the subscriber stops reading for this long after a read shorter than
# SHORT_READ_BYTES, so that each read returns many messages. Without the pause, a
# subscriber that keeps up reads one or two packets per call, and the fixed cost of each
# read dominates its CPU time. The kernel buffers the messages meanwhile, and at QoS 0 no
# PUBACK waits.
# On a 2-CPU machine against Mosquitto 2.0.11, the pause cut the subscriber's CPU from 66% to
# 8% of a core and raised the delivered rate from 160k to 240k msg/s.
SUBSCRIBER_READ_PAUSE_S = 0.001
SHORT_READ_BYTES = 16 * 1024

WRITE_BUFFER_HIGH_BYTES = 256 * 1024
WRITE_BUFFER_LOW_BYTES = 64 * 1024

# By default Mosquitto 2.0.11 keeps 20 QoS 1 messages in flight per client, queues 1000
# more and silently drops the rest (mosquitto.conf(5)), so the subscriber would lose
# deliveries whenever it falls behind.
MOSQUITTO_MAX_INFLIGHT_MESSAGES = 1000
MOSQUITTO_MAX_QUEUED_MESSAGES = 0  # 0 means no limit

# Thresholds for the notes printed under the table.
GENERATOR_SATURATED_PERCENT = 90.0  # of one core, for a single generator process
HOST_SATURATED_PERCENT = 95.0  # of all cores
MIN_DELIVERED_FRACTION = 0.95  # of published messages

MICROSECONDS_PER_S = 1_000_000


# --- Load generator: asyncio protocols -----------------------------------------------


SUBSCRIBER_SLOT = 0


@dataclass
class SharedCounters:
    """Counters in shared memory that all processes of a run read without locks.

    Each slot has a single writer. Slot 0 belongs to the subscriber and slot 1 + n to
    publisher process n.
    """

    messages: ctypes.Array[ctypes.c_longlong]  # deliveries (slot 0) or PUBLISH packets sent
    disconnects: ctypes.Array[ctypes.c_longlong]  # connections closed before the stop

    @classmethod
    def create(cls, context: SpawnContext, publisher_processes: int) -> SharedCounters:
        slots = 1 + publisher_processes
        return cls(
            messages=context.RawArray(ctypes.c_longlong, slots),
            disconnects=context.RawArray(ctypes.c_longlong, slots),
        )

    def delivered(self) -> int:
        return self.messages[SUBSCRIBER_SLOT]

    def published(self) -> int:
        return sum(self.messages[SUBSCRIBER_SLOT + 1 :])


class BacklogGate:
    """Holds back a publisher process while too many published messages are undelivered.

    A max_backlog of 0 disables the limit. A broker may drop messages, for example QoS 0
    messages to a subscriber that reads too slowly, and those never count as delivered.
    So when nothing is delivered for BACKLOG_STALL_S while the gate is closed, the gate
    writes the backlog off as dropped and opens again.
    NOTE: each publisher process writes off the whole backlog, so with several processes
    the backlog can exceed max_backlog after drops.
    """

    def __init__(self, counters: SharedCounters, max_backlog: int) -> None:
        self.counters = counters
        self.max_backlog = max_backlog
        self._resume_below = max_backlog // 2
        self._written_off = 0  # messages assumed dropped by the broker
        self._waiting: list[Callable[[], None]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._last_delivered = 0
        self._last_delivery_time = 0.0

    def backlog(self) -> int:
        return self.counters.published() - self.counters.delivered() - self._written_off

    def is_open(self) -> bool:
        return not self.max_backlog or self.backlog() < self.max_backlog

    def wait(self, callback: Callable[[], None]) -> None:
        """Call callback once the backlog has fallen below half of max_backlog."""
        self._waiting.append(callback)
        if self._timer is None:
            loop = asyncio.get_running_loop()
            self._last_delivered = self.counters.delivered()
            self._last_delivery_time = loop.time()
            self._timer = loop.call_later(BACKLOG_POLL_INTERVAL_S, self._poll)

    def _poll(self) -> None:
        loop = asyncio.get_running_loop()
        if self.backlog() >= self._resume_below and not self._write_off_if_stalled(loop.time()):
            self._timer = loop.call_later(BACKLOG_POLL_INTERVAL_S, self._poll)
            return
        self._timer = None
        waiting, self._waiting = self._waiting, []
        for callback in waiting:
            callback()

    def _write_off_if_stalled(self, now: float) -> bool:
        """Write the backlog off after BACKLOG_STALL_S without a delivery, and return True if so."""
        delivered = self.counters.delivered()
        if delivered != self._last_delivered:
            self._last_delivered = delivered
            self._last_delivery_time = now
            return False
        if now - self._last_delivery_time < BACKLOG_STALL_S:
            return False
        self._written_off += self.backlog()
        return True

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


class BenchClient(asyncio.Protocol):
    """MQTT 3.1.1 client connection that splits incoming bytes into packets.

    It handles CONNACK and SUBACK. Subclasses handle PUBLISH or PUBACK in
    handle_packet() and write their replies for a whole read in flush().
    """

    def __init__(self, counters: SharedCounters, slot: int) -> None:
        self.counters = counters
        self.slot = slot
        self.transport: asyncio.Transport | None = None
        self.stopping = False
        self.read_pause_s = 0.0  # seconds of pause after a short read, 0 for none
        self._partial = b""
        loop = asyncio.get_running_loop()
        self.connack: asyncio.Future[None] = loop.create_future()
        self.suback: asyncio.Future[int] = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transport implements asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(WRITE_BUFFER_HIGH_BYTES, WRITE_BUFFER_LOW_BYTES)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.stopping:
            return
        self.counters.disconnects[self.slot] += 1
        error = ConnectionError(f"broker closed the connection: {exc or 'end of stream'}")
        for future in (self.connack, self.suback):
            if not future.done():
                future.set_exception(error)

    def data_received(self, data: bytes) -> None:
        if self._partial:
            data = self._partial + data
        position = split_packets(data, self.handle_packet)
        self._partial = data[position:]
        self.flush()
        if self.read_pause_s and len(data) < SHORT_READ_BYTES and self.transport is not None:
            self.transport.pause_reading()
            asyncio.get_running_loop().call_later(self.read_pause_s, self._resume_reading)

    def _resume_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def handle_packet(self, first_byte: int, data: bytes, body_start: int, body_end: int) -> None:
        packet_type = first_byte >> 4
        if packet_type == CONNACK:
            return_code = data[body_start + 1]
            if return_code == 0:
                self.connack.set_result(None)
            else:
                self.connack.set_exception(
                    ConnectionError(f"broker rejected CONNECT with return code {return_code}")
                )
        elif packet_type == SUBACK:
            self.suback.set_result(data[body_end - 1])
        else:
            raise ProtocolError(f"unexpected packet type {packet_type} for this client")

    def flush(self) -> None:
        """Send the replies collected while handling one read and update the counters."""

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def stop(self) -> None:
        self.stopping = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(DISCONNECT_PACKET)
            self.transport.close()


class SubscriberClient(BenchClient):
    """Counts PUBLISH deliveries and acknowledges the QoS 1 ones."""

    def __init__(self, counters: SharedCounters, qos: int) -> None:
        super().__init__(counters, SUBSCRIBER_SLOT)
        if qos == 0:
            self.read_pause_s = SUBSCRIBER_READ_PAUSE_S
        self._received = 0
        self._pubacks = bytearray()

    def handle_packet(self, first_byte: int, data: bytes, body_start: int, body_end: int) -> None:
        if first_byte >> 4 != PUBLISH:
            super().handle_packet(first_byte, data, body_start, body_end)
            return
        self._received += 1
        qos = (first_byte >> 1) & 0x03
        if qos == 1:
            # The packet id follows the topic name, whose length is in the first two bytes.
            topic_length = (data[body_start] << 8) | data[body_start + 1]
            packet_id_start = body_start + 2 + topic_length
            self._pubacks += PUBACK_HEADER
            self._pubacks += data[packet_id_start : packet_id_start + 2]
        elif qos != 0:
            raise ProtocolError(f"received a QoS {qos} PUBLISH but subscribed with QoS 0 or 1")

    def flush(self) -> None:
        if self._pubacks:
            self.write(bytes(self._pubacks))
            self._pubacks.clear()
        if self._received:
            self.counters.messages[self.slot] += self._received
            self._received = 0


class PublisherClient(BenchClient):
    """Publishes pre-encoded packets to one topic as fast as the broker takes them.

    At QoS 0 it writes batches until the transport's write buffer passes its high-water
    mark and resumes when the buffer drains. At QoS 1 it keeps `window` packets in
    flight and, for each PUBACK, resends the pre-encoded packet with the freed packet id.
    At both levels it also waits while the backlog gate is closed.
    """

    def __init__(
        self,
        counters: SharedCounters,
        slot: int,
        gate: BacklogGate,
        topic: str,
        payload: bytes,
        qos: int,
        window: int,
    ) -> None:
        super().__init__(counters, slot)
        self.gate = gate
        self.qos = qos
        self._paused = False
        self._qos0_write_scheduled = False
        self._refills: list[bytes] = []
        self._refills_waiting = False
        if qos == 0:
            self._qos0_batch = encode_publish(topic, payload, 0) * QOS0_PACKETS_PER_WRITE
            self._packets_by_id: list[bytes] = []
        else:
            self._qos0_batch = b""
            # Index 0 is unused because packet id 0 is not allowed.
            self._packets_by_id = [b""] + [
                encode_publish(topic, payload, 1, packet_id) for packet_id in range(1, window + 1)
            ]

    def start(self) -> None:
        if self.qos == 0:
            self._schedule_qos0_write()
        else:
            self.write(b"".join(self._packets_by_id[1:]))
            self.counters.messages[self.slot] += len(self._packets_by_id) - 1

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self.qos == 0:
            self._schedule_qos0_write()

    def _schedule_qos0_write(self) -> None:
        # The flag keeps one chain of write callbacks per connection, whichever of
        # start(), resume_writing() and the gate restarts it.
        if not self._qos0_write_scheduled:
            self._qos0_write_scheduled = True
            asyncio.get_running_loop().call_soon(self._write_qos0_batches)

    def _write_qos0_batches(self) -> None:
        self._qos0_write_scheduled = False
        for _ in range(QOS0_WRITES_PER_CALLBACK):
            if self._paused or self.stopping:
                return
            if not self.gate.is_open():
                self.gate.wait(self._schedule_qos0_write)
                return
            self.write(self._qos0_batch)
            self.counters.messages[self.slot] += QOS0_PACKETS_PER_WRITE
        self._schedule_qos0_write()

    def handle_packet(self, first_byte: int, data: bytes, body_start: int, body_end: int) -> None:
        if first_byte >> 4 != PUBACK:
            super().handle_packet(first_byte, data, body_start, body_end)
            return
        packet_id = (data[body_start] << 8) | data[body_start + 1]
        if not 0 < packet_id < len(self._packets_by_id):
            raise ProtocolError(f"PUBACK for packet id {packet_id}, which was never sent")
        self._refills.append(self._packets_by_id[packet_id])

    def flush(self) -> None:
        if self._refills and not self._refills_waiting:
            self._send_refills()

    def _send_refills(self) -> None:
        self._refills_waiting = False
        if self.stopping:
            self._refills.clear()
            return
        if not self.gate.is_open():
            self._refills_waiting = True
            self.gate.wait(self._send_refills)
            return
        self.write(b"".join(self._refills))
        self.counters.messages[self.slot] += len(self._refills)
        self._refills.clear()


# --- Load generator: worker processes ------------------------------------------------


@dataclass(frozen=True)
class LoadSettings:
    """Settings that the parent passes to every worker process."""

    port: int
    qos: int
    payload_bytes: int
    qos1_window: int
    max_backlog: int  # messages, 0 for no limit
    run_limit_s: float  # a worker stops by itself this long after START


async def wait_for_reply(reply: Awaitable[T], description: str) -> T:
    try:
        return await asyncio.wait_for(reply, CONNECT_TIMEOUT_S)
    except TimeoutError:
        raise BenchmarkError(f"timed out after {CONNECT_TIMEOUT_S:.0f} s: {description}") from None


async def connect_client(client: BenchClient, port: int, client_id: str) -> None:
    loop = asyncio.get_running_loop()
    connection = loop.create_connection(lambda: client, BROKER_HOST, port)
    await wait_for_reply(connection, f"TCP connect to {BROKER_HOST}:{port}")
    client.write(encode_connect(client_id, KEEPALIVE_S))
    await wait_for_reply(client.connack, f"CONNACK for client {client_id}")


async def run_subscriber(
    settings: LoadSettings, counters: SharedCounters, slot: int, control: ControlChannel
) -> None:
    assert slot == SUBSCRIBER_SLOT
    client = SubscriberClient(counters, settings.qos)
    await connect_client(client, settings.port, "bench-subscriber")
    client.write(encode_subscribe(1, ["#"], settings.qos))
    granted_qos = await wait_for_reply(client.suback, "SUBACK for '#'")
    if granted_qos == SUBACK_FAILURE:
        raise BenchmarkError("broker rejected the subscription to '#'")
    if granted_qos != settings.qos:
        raise BenchmarkError(
            f"broker granted QoS {granted_qos:#x} for '#', but QoS {settings.qos} was requested"
        )
    control.send(READY)

    # The subscriber needs no START because it only receives.
    await control.receive(WORKER_SETUP_TIMEOUT_S + settings.run_limit_s)
    client.stop()


async def run_publishers(
    settings: LoadSettings,
    counters: SharedCounters,
    slot: int,
    control: ControlChannel,
    first_index: int,
    count: int,
) -> None:
    payload = b"x" * settings.payload_bytes
    gate = BacklogGate(counters, settings.max_backlog)
    clients = [
        PublisherClient(
            counters, slot, gate, f"bench/{index}", payload, settings.qos, settings.qos1_window
        )
        for index in range(first_index, first_index + count)
    ]
    limit = asyncio.Semaphore(MAX_CONCURRENT_CONNECTS)

    async def connect(index: int, client: PublisherClient) -> None:
        async with limit:
            await connect_client(client, settings.port, f"bench-publisher-{index}")

    await asyncio.gather(
        *(connect(first_index + offset, client) for offset, client in enumerate(clients))
    )
    control.send(READY)

    if await control.receive(WORKER_SETUP_TIMEOUT_S) != START:
        raise BenchmarkError("timed out waiting for the start command from the parent process")
    for client in clients:
        client.start()
    await control.receive(settings.run_limit_s)
    gate.cancel()
    for client in clients:
        client.stop()


def worker_main(
    connection: Connection,
    role: Callable[..., Any],
    settings: LoadSettings,
    counters: SharedCounters,
    slot: int,
    *role_args: int,
) -> None:
    """Run one load-generator role in this process and report failures to the parent."""
    control = ControlChannel(connection)

    async def run() -> None:
        await role(settings, counters, slot, control, *role_args)
        await asyncio.sleep(0.1)  # let the DISCONNECT packets reach the broker

    run_worker(control, run)


# --- Brokers -------------------------------------------------------------------------


def mosquitto_tuning(tcp_nodelay: bool) -> dict[str, str]:
    """Return the Mosquitto settings that affect the results, as config file values."""
    return {
        "max_inflight_messages": str(MOSQUITTO_MAX_INFLIGHT_MESSAGES),
        "max_queued_messages": str(MOSQUITTO_MAX_QUEUED_MESSAGES),
        "set_tcp_nodelay": "true" if tcp_nodelay else "false",
    }


def mosquitto_settings_note(tcp_nodelay: bool) -> str:
    settings = ", ".join(f"{name} {value}" for name, value in mosquitto_tuning(tcp_nodelay).items())
    return (
        f"Mosquitto runs with {settings}. A max_queued_messages of 0 means no limit, so QoS 1"
        " messages are queued, not dropped."
    )


# --- One measurement run -------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """Counters and CPU times read at one instant of a run."""

    wall_s: float
    published: int
    delivered: int
    broker_cpu_s: float
    subscriber_cpu_s: float
    publishers_cpu_s: tuple[float, ...]
    host_busy_ticks: int
    host_total_ticks: int


@dataclass
class RunResult:
    """Rates and CPU costs of one broker at one QoS level over the measurement window."""

    broker: str
    qos: int
    window_s: float
    published_per_s: float
    delivered_per_s: float
    broker_cpu_percent: float  # of one core
    broker_us_per_message: float | None  # per delivered message, None if none was delivered
    generator_cpu_s: float
    subscriber_cpu_percent: float  # of one core
    publisher_cpu_percent: list[float]  # of one core, one entry per publisher process
    host_cpu_percent: float  # of all CPUs, including processes outside the benchmark
    disconnects: int


def take_snapshot(
    broker: RunningBroker,
    counters: SharedCounters,
    subscriber: Worker,
    publishers: Sequence[Worker],
) -> Snapshot:
    host_busy, host_total = host_cpu_ticks()
    return Snapshot(
        wall_s=time.monotonic(),
        published=counters.published(),
        delivered=counters.delivered(),
        broker_cpu_s=process_tree_cpu_seconds(broker.pid),
        subscriber_cpu_s=process_cpu_seconds(subscriber.pid),
        publishers_cpu_s=tuple(process_cpu_seconds(worker.pid) for worker in publishers),
        host_busy_ticks=host_busy,
        host_total_ticks=host_total,
    )


def compute_result(
    broker_name: str, qos: int, before: Snapshot, after: Snapshot, disconnects: int
) -> RunResult:
    window_s = after.wall_s - before.wall_s
    delivered = after.delivered - before.delivered
    broker_cpu_s = after.broker_cpu_s - before.broker_cpu_s
    subscriber_cpu_s = after.subscriber_cpu_s - before.subscriber_cpu_s
    publisher_cpu_s = [
        a - b for a, b in zip(after.publishers_cpu_s, before.publishers_cpu_s, strict=True)
    ]
    host_total = after.host_total_ticks - before.host_total_ticks
    host_busy = after.host_busy_ticks - before.host_busy_ticks
    return RunResult(
        broker=broker_name,
        qos=qos,
        window_s=window_s,
        published_per_s=(after.published - before.published) / window_s,
        delivered_per_s=delivered / window_s,
        broker_cpu_percent=100 * broker_cpu_s / window_s,
        broker_us_per_message=(
            MICROSECONDS_PER_S * broker_cpu_s / delivered if delivered else None
        ),
        generator_cpu_s=subscriber_cpu_s + sum(publisher_cpu_s),
        subscriber_cpu_percent=100 * subscriber_cpu_s / window_s,
        publisher_cpu_percent=[100 * seconds / window_s for seconds in publisher_cpu_s],
        host_cpu_percent=100 * host_busy / host_total if host_total else 0.0,
        disconnects=disconnects,
    )


@dataclass(frozen=True)
class RunOptions:
    """Command-line settings that apply to every run."""

    duration_s: float
    warmup_s: float
    publishers: int
    publisher_processes: int
    payload_bytes: int
    qos1_window: int
    max_backlog: int
    mosquitto_tcp_nodelay: bool


def measure(spec: BrokerSpec, qos: int, options: RunOptions) -> RunResult:
    """Start the broker and the load generator, measure one window, and stop everything."""
    context = multiprocessing.get_context("spawn")
    with RunningBroker(
        spec,
        start_timeout_s=BROKER_START_TIMEOUT_S,
        stop_timeout_s=BROKER_STOP_TIMEOUT_S,
        tempdir_prefix="bench",
    ) as broker:
        settings = LoadSettings(
            port=broker.port,
            qos=qos,
            payload_bytes=options.payload_bytes,
            qos1_window=options.qos1_window,
            max_backlog=options.max_backlog,
            run_limit_s=options.warmup_s + options.duration_s + WORKER_STOP_GRACE_S,
        )
        counters = SharedCounters.create(context, options.publisher_processes)
        workers: list[Worker] = []
        errors: list[str] = []
        try:
            subscriber = start_worker(
                context,
                "subscriber",
                worker_main,
                run_subscriber,
                settings,
                counters,
                SUBSCRIBER_SLOT,
            )
            workers.append(subscriber)
            receive_message(subscriber, READY, WORKER_SETUP_TIMEOUT_S, task="connect")

            publishers = [
                start_worker(
                    context,
                    f"publishers-{number}",
                    worker_main,
                    run_publishers,
                    settings,
                    counters,
                    SUBSCRIBER_SLOT + 1 + number,
                    start,
                    count,
                )
                for number, (start, count) in enumerate(
                    split_evenly(options.publishers, options.publisher_processes)
                )
            ]
            workers.extend(publishers)
            for worker in publishers:
                receive_message(worker, READY, WORKER_SETUP_TIMEOUT_S, task="connect")

            for worker in publishers:
                send_command(worker, START)
            time.sleep(options.warmup_s)
            before = take_snapshot(broker, counters, subscriber, publishers)
            time.sleep(options.duration_s)
            after = take_snapshot(broker, counters, subscriber, publishers)
            broker.check_running()
        except BenchmarkError as error:
            errors.append(str(error))
        finally:
            errors.extend(stop_workers(workers, WORKER_STOP_TIMEOUT_S))
    if errors:
        raise BenchmarkError("; ".join(errors))

    disconnects = sum(counters.disconnects)
    return compute_result(spec.name, qos, before, after, disconnects)


# --- Report --------------------------------------------------------------------------

TABLE_COLUMNS = [  # (heading, width)
    ("broker", 10),
    ("QoS", 3),
    ("published msg/s", 15),
    ("delivered msg/s", 15),
    ("broker CPU %", 12),
    ("broker µs/msg", 13),
    ("gen CPU s", 9),
    ("sub CPU %", 9),
    ("pub CPU %", 9),
    ("host CPU %", 10),
]


def format_row(result: RunResult) -> list[str]:
    us_per_message = result.broker_us_per_message
    return [
        result.broker,
        str(result.qos),
        f"{result.published_per_s:,.0f}",
        f"{result.delivered_per_s:,.0f}",
        f"{result.broker_cpu_percent:.1f}",
        "n/a" if us_per_message is None else f"{us_per_message:.2f}",
        f"{result.generator_cpu_s:.2f}",
        f"{result.subscriber_cpu_percent:.1f}",
        "+".join(f"{percent:.1f}" for percent in result.publisher_cpu_percent),
        f"{result.host_cpu_percent:.1f}",
    ]


def compute_ratios(results: Sequence[RunResult]) -> dict[int, float]:
    """Return IronShadow µs/msg divided by Mosquitto µs/msg for each QoS measured on both."""
    cost = {(result.broker, result.qos): result.broker_us_per_message for result in results}
    ratios = {}
    for qos in sorted({result.qos for result in results}):
        ironshadow, mosquitto = cost.get(("ironshadow", qos)), cost.get(("mosquitto", qos))
        if ironshadow is not None and mosquitto is not None:
            ratios[qos] = ironshadow / mosquitto
    return ratios


def describe_bottlenecks(result: RunResult) -> list[str]:
    """Return notes on what may have limited a run other than the broker itself."""
    label = f"{result.broker} QoS {result.qos}"
    notes = []
    generator_percents = [("subscriber", result.subscriber_cpu_percent)] + [
        (f"publisher process {number}", percent)
        for number, percent in enumerate(result.publisher_cpu_percent)
    ]
    for name, percent in generator_percents:
        if percent >= GENERATOR_SATURATED_PERCENT:
            notes.append(
                f"{label}: the {name} used {percent:.0f}% of a core, so the load generator"
                " may have limited the rate."
            )
    if result.host_cpu_percent >= HOST_SATURATED_PERCENT:
        notes.append(
            f"{label}: all {os.cpu_count()} CPUs were {result.host_cpu_percent:.0f}% busy, so the"
            " broker and the generator competed for CPU time."
        )
    if (
        result.published_per_s
        and result.delivered_per_s < MIN_DELIVERED_FRACTION * result.published_per_s
    ):
        notes.append(
            f"{label}: {result.delivered_per_s / result.published_per_s:.0%} of the published"
            " messages were delivered in the window. The rest were queued in the broker or"
            " dropped, and broker µs/msg includes the work of receiving them."
        )
    if result.disconnects:
        notes.append(
            f"{label}: {result.disconnects} connections closed before the end of the run, so"
            " the rates understate the broker. The generator's stderr shows any protocol errors."
        )
    return notes


def print_header(options: RunOptions, show_mosquitto_settings: bool) -> None:
    print(
        f"{options.publishers} publishers in {options.publisher_processes} process(es) and 1"
        f" subscriber on '#', {options.payload_bytes}-byte payloads, QoS 1 window"
        f" {options.qos1_window} per publisher, {options.warmup_s:g} s warm-up +"
        f" {options.duration_s:g} s window, {os.cpu_count()} CPUs."
    )
    if options.max_backlog:
        print(
            f"Publishers pause once {options.max_backlog} messages are published but not yet"
            " delivered (--max-backlog)."
        )
    print(
        "CPU % is of one core. Broker CPU counts the broker process and its descendants, and"
        " broker µs/msg is that CPU time per delivered message. Gen CPU s is the load"
        " generator's CPU time in the window, split into sub (subscriber) and pub (one figure"
        " per publisher process)."
    )
    if show_mosquitto_settings:
        print(mosquitto_settings_note(options.mosquitto_tcp_nodelay))


def print_report(
    results: Sequence[RunResult], failures: Sequence[str], options: RunOptions
) -> None:
    print_header(options, any(result.broker == "mosquitto" for result in results))
    print()
    if results:
        print(format_table(TABLE_COLUMNS, [format_row(result) for result in results]))
        print()

    ratios = compute_ratios(results)
    if ratios:
        parts = [f"QoS {qos}: {ratio:.2f}x" for qos, ratio in ratios.items()]
        print("broker µs/msg, IronShadow ÷ Mosquitto: " + ", ".join(parts))
    else:
        print("broker µs/msg, IronShadow ÷ Mosquitto: not available (needs both brokers)")

    for result in results:
        for note in describe_bottlenecks(result):
            print(f"note: {note}")
    for failure in failures:
        print(f"failed: {failure}")


def build_json_report(
    results: Sequence[RunResult], failures: Sequence[str], options: RunOptions
) -> dict[str, Any]:
    return {
        "options": asdict(options),
        "cpus": os.cpu_count(),
        "mosquitto_config": mosquitto_tuning(options.mosquitto_tcp_nodelay),
        "results": [asdict(result) for result in results],
        "us_per_message_ratio_ironshadow_to_mosquitto": {
            str(qos): ratio for qos, ratio in compute_ratios(results).items()
        },
        "failures": list(failures),
    }


# --- Command line --------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Measure MQTT routing throughput and broker CPU per message for"
        " IronShadow and Mosquitto on loopback."
    )

    # Workload
    add_window_arguments(parser, DEFAULT_DURATION_S, DEFAULT_WARMUP_S)
    parser.add_argument(
        "--publishers",
        type=positive_int,
        default=DEFAULT_PUBLISHERS,
        help=f"publisher connections (default {DEFAULT_PUBLISHERS})",
    )
    parser.add_argument(
        "--publisher-processes",
        type=positive_int,
        default=DEFAULT_PUBLISHER_PROCESSES,
        help="processes that share the publisher connections"
        f" (default {DEFAULT_PUBLISHER_PROCESSES})",
    )
    add_qos_argument(parser)
    parser.add_argument(
        "--window",
        type=positive_int,
        default=DEFAULT_QOS1_WINDOW,
        help="QoS 1 PUBLISH packets in flight per publisher connection"
        f" (default {DEFAULT_QOS1_WINDOW}, at most {MAX_PACKET_ID})",
    )
    parser.add_argument(
        "--payload-bytes",
        type=int,
        default=DEFAULT_PAYLOAD_BYTES,
        help=f"payload size in bytes (default {DEFAULT_PAYLOAD_BYTES})",
    )
    parser.add_argument(
        "--max-backlog",
        type=int,
        default=DEFAULT_MAX_BACKLOG,
        help="pause the publishers once this many messages are published but not yet"
        f" delivered; 0 for no limit (default {DEFAULT_MAX_BACKLOG} messages)",
    )

    # Brokers
    parser.add_argument(
        "--only", choices=["ironshadow", "mosquitto"], help="measure one broker only"
    )
    add_mosquitto_argument(parser)
    parser.add_argument(
        "--mosquitto-tcp-nodelay",
        action="store_true",
        help="set set_tcp_nodelay true in the Mosquitto config. Mosquitto's default is false,"
        " which lets Nagle's algorithm merge its small writes to the subscriber.",
    )
    add_ironshadow_cmd_argument(parser)

    parser.add_argument("--json", action="store_true", help="print a JSON report as the last line")
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    options = parser.parse_args(argv)
    if options.window > MAX_PACKET_ID:
        parser.error(f"--window {options.window} is larger than the {MAX_PACKET_ID} packet ids")
    if options.warmup < 0 or options.payload_bytes < 0 or options.max_backlog < 0:
        parser.error("--warmup, --payload-bytes and --max-backlog must not be negative")
    if options.publisher_processes > options.publishers:
        parser.error("--publisher-processes must not exceed --publishers")
    return options


def selected_brokers(options: argparse.Namespace) -> list[BrokerSpec]:
    brokers = {
        "ironshadow": make_ironshadow_spec(options.ironshadow_cmd),
        "mosquitto": make_mosquitto_spec(
            options.mosquitto, mosquitto_tuning(options.mosquitto_tcp_nodelay)
        ),
    }
    if options.only:
        return [brokers[options.only]]
    return list(brokers.values())


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parse_args(argv)
    options = RunOptions(
        duration_s=arguments.duration,
        warmup_s=arguments.warmup,
        publishers=arguments.publishers,
        publisher_processes=arguments.publisher_processes,
        payload_bytes=arguments.payload_bytes,
        qos1_window=arguments.window,
        max_backlog=arguments.max_backlog,
        mosquitto_tcp_nodelay=arguments.mosquitto_tcp_nodelay,
    )
    results: list[RunResult] = []
    failures: list[str] = []
    for spec in selected_brokers(arguments):
        for qos in arguments.qos:
            print(
                f"running {spec.name} QoS {qos}: {options.warmup_s:g} s warm-up +"
                f" {options.duration_s:g} s ...",
                file=sys.stderr,
                flush=True,
            )
            try:
                results.append(measure(spec, qos, options))
            except BenchmarkError as error:
                failures.append(f"{spec.name} QoS {qos}: {error}")

    print_report(results, failures, options)
    if arguments.json:
        print(json.dumps(build_json_report(results, failures, options)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
