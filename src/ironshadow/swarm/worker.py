"""A generator process: a share of the simulated devices, each its own MQTT connection.

The coordinator (runner.py) drives a worker over a pipe with commands, each answered by one
``("done", command, result)`` message, and the worker sends ``("stats", counters)`` twice a
second. Publishing costs as little as the generator can make it: every device's PUBLISH
packets are encoded once, at start, in a few variants with different values, and one timer
per process walks a wheel of time slots instead of a timer per device.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import resource
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import orjson

from ironshadow.mqtt import (
    MQTT_3_1_1,
    Connack,
    Connect,
    Disconnect,
    PacketDecoder,
    Puback,
    Publish,
    Suback,
    Subscribe,
    Subscription,
)

from .options import FD_RESERVE, SwarmOptions, devices_per_process, open_file_limit

# Seconds per slot of the publishing wheel: the timer's resolution.
TICK = 0.005
# Payload variants encoded per device; publishes cycle through them.
VARIANTS = 4
# Seconds between two stats messages to the coordinator.
STATS_INTERVAL = 0.5
# PINGREQ, which a device sends when it may otherwise be silent for half its keep alive.
PINGREQ_PACKET = b"\xc0\x00"
# Latency samples kept per kind between two stats messages, to bound the pipe's load.
SAMPLES_PER_REPORT = 2_000

_PUBACK_QOS1 = 0x40


def thing_name(options: SwarmOptions, index: int) -> str:
    return f"{options.client_prefix}{index}"


def shadow_topic(thing: str, suffix: str) -> str:
    return f"$aws/things/{thing}/shadow/{suffix}"


def encode_report(options: SwarmOptions, rng: random.Random) -> bytes:
    """Return one reported-state update with the configured number and size of fields."""
    if options.field_bytes:
        alphabet = "abcdefghijklmnopqrstuvwxyz"
        reported: dict[str, Any] = {
            f"f{n}": "".join(rng.choices(alphabet, k=options.field_bytes))
            for n in range(options.fields)
        }
    else:
        reported = {f"f{n}": round(rng.uniform(0, 1000), 2) for n in range(options.fields)}
    return orjson.dumps({"state": {"reported": reported}})


@dataclass
class Counters:
    sent: int = 0
    acknowledged: int = 0
    skipped: int = 0  # sends not made because the QoS 1 window was full
    errors: int = 0  # connections refused or failed
    disconnects: int = 0  # connections closed by the server or the network
    connected: int = 0
    deltas: int = 0
    ack_latencies: list[float] = field(default_factory=list)
    connack_latencies: list[float] = field(default_factory=list)

    def snapshot(self) -> dict[str, Any]:
        state = {
            "sent": self.sent,
            "acknowledged": self.acknowledged,
            "skipped": self.skipped,
            "errors": self.errors,
            "disconnects": self.disconnects,
            "connected": self.connected,
            "deltas": self.deltas,
            "ack_latencies": self.ack_latencies,
            "connack_latencies": self.connack_latencies,
        }
        self.ack_latencies = []
        self.connack_latencies = []
        return state


def _sample(samples: list[float], value: float) -> None:
    if len(samples) < SAMPLES_PER_REPORT:
        samples.append(value)


class Device(asyncio.Protocol):
    """One simulated device: a connection, its pre-encoded packets and its in-flight window."""

    def __init__(self, worker: Worker, index: int, rng: random.Random) -> None:
        options = worker.options
        self.worker = worker
        self.index = index
        self.thing = thing_name(options, index)
        addresses = options.source_addresses
        # The local address to bind before connecting; port 0 lets the kernel pick the port.
        self.source = (addresses[index % len(addresses)], 0) if addresses else None
        self.qos = options.qos
        self.transport: asyncio.Transport | None = None
        self.decoder = PacketDecoder(version=MQTT_3_1_1)
        self.connack_at = 0.0
        self.connected = False
        self.closing = False
        self.subscribed = asyncio.Event()
        self.got_delta: asyncio.Future[None] | None = None
        self.on_delta: Callable[[Device, dict[str, Any]], None] | None = None
        username, password = options.credentials(self.thing)
        self.connect_packet = Connect(
            self.thing, MQTT_3_1_1, True, options.keep_alive, username, password
        ).encode()
        topic = shadow_topic(self.thing, "update")
        self.variants = [
            Publish(topic, encode_report(options, rng), self.qos, packet_id=1).encode(MQTT_3_1_1)
            for _ in range(VARIANTS)
        ]
        # Offset of the packet id in each variant: after the fixed header and the topic.
        topic_size = 2 + len(topic.encode())
        self.id_offsets = [
            1 + _remaining_length_size(packet) + topic_size for packet in self.variants
        ]
        self.report_ids: set[int] = set()  # QoS 1 reports sent in reply to a delta
        self.variant = rng.randrange(VARIANTS)
        self.next_packet_id = 1
        self.in_flight: dict[int, float] = {}
        self.connected_future: asyncio.Future[bool] | None = None

    # --- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, though they implement it.
        self.transport = transport  # type: ignore[assignment]
        self.connack_at = time.monotonic()
        transport.write(self.connect_packet)

    def data_received(self, data: bytes) -> None:
        try:
            packets = self.decoder.feed(data)
        except Exception:
            self.worker.counters.errors += 1
            self.abort()
            return
        counters = self.worker.counters
        for packet in packets:
            if isinstance(packet, Puback):
                sent_at = self.in_flight.pop(packet.packet_id, None)
                if sent_at is not None:
                    counters.acknowledged += 1
                    _sample(counters.ack_latencies, time.monotonic() - sent_at)
                if self.report_ids and packet.packet_id in self.report_ids:
                    self.report_ids.discard(packet.packet_id)
                    self.worker.converged.append(time.time())
            elif isinstance(packet, Publish):
                if packet.qos == 1:
                    self.transport.write(  # type: ignore[union-attr]
                        struct.pack(">BBH", _PUBACK_QOS1, 2, packet.packet_id)
                    )
                if packet.topic.endswith("/update/delta"):
                    counters.deltas += 1
                    if self.got_delta is not None and not self.got_delta.done():
                        self.got_delta.set_result(None)
                    if self.on_delta is not None:
                        self.on_delta(self, orjson.loads(packet.payload))
            elif isinstance(packet, Connack):
                accepted = packet.reason_code == 0
                if accepted:
                    self.connected = True
                    counters.connected += 1
                    _sample(counters.connack_latencies, time.monotonic() - self.connack_at)
                else:
                    counters.errors += 1
                if self.connected_future is not None and not self.connected_future.done():
                    self.connected_future.set_result(accepted)
            elif isinstance(packet, Suback):
                self.subscribed.set()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.connected:
            self.worker.counters.connected -= 1
            if not self.closing:
                self.worker.counters.disconnects += 1
        self.connected = False
        self.transport = None
        self.in_flight.clear()
        if self.connected_future is not None and not self.connected_future.done():
            self.connected_future.set_result(False)
        if self.got_delta is not None and not self.got_delta.done():
            self.got_delta.cancel()

    # --- actions ------------------------------------------------------------------------

    def publish(self) -> None:
        """Send the next update, unless the QoS 1 window is full."""
        transport = self.transport
        if transport is None or not self.connected:
            return
        counters = self.worker.counters
        packet = self.variants[self.variant]
        offset = self.id_offsets[self.variant]
        self.variant = (self.variant + 1) % VARIANTS
        if self.qos == 1:
            if len(self.in_flight) >= self.worker.options.max_in_flight:
                counters.skipped += 1
                return
            packet_id = self.next_packet_id
            self.next_packet_id = packet_id % 65535 + 1
            packet = packet[:offset] + packet_id.to_bytes(2, "big") + packet[offset + 2 :]
            self.in_flight[packet_id] = time.monotonic()
        transport.write(packet)
        counters.sent += 1

    def send(self, packet: bytes) -> None:
        if self.transport is not None:
            self.transport.write(packet)

    def close(self, abrupt: bool) -> None:
        transport = self.transport
        if transport is None:
            return
        self.closing = True
        if abrupt:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                # Linger 0: close sends RST instead of FIN, as a dropped network looks later.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        else:
            transport.write(Disconnect().encode(MQTT_3_1_1))
            transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


def _remaining_length_size(packet: bytes) -> int:
    size = 1
    while packet[size] & 0x80:
        size += 1
    return size


class Worker:
    """The devices of one generator process and the commands that drive them."""

    def __init__(self, options: SwarmOptions, first: int, count: int, seed: int) -> None:
        self.options = options
        self.counters = Counters()
        # Wall-clock times at which a device's report of a desired value was acknowledged.
        self.converged: list[float] = []
        rng = random.Random(seed)
        self.rng = rng
        self.devices = [Device(self, index, rng) for index in range(first, first + count)]
        self.loop = asyncio.get_running_loop()
        self._publishing = False
        self._wheel: list[list[Device]] = []
        self._slot = 0
        self._ticker: asyncio.TimerHandle | None = None
        self._pinger: asyncio.TimerHandle | None = None
        # The broker's address per address family, resolved once for the bound sockets.
        self._targets: dict[int, Any] = {}
        # Connections left open by a silent drop, closed with the devices at the end.
        self.stale: list[asyncio.BaseTransport] = []

    # --- connecting ---------------------------------------------------------------------

    async def connect(self, rate: float | None, subscribe_delta: bool) -> dict[str, Any]:
        """Connect every device, ``rate`` per second (None: all at once); return timings."""
        started = time.monotonic()
        tasks = []
        for number, device in enumerate(self.devices):
            if rate:
                delay = started + number / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            tasks.append(self.loop.create_task(self._connect_one(device, subscribe_delta)))
        results = await asyncio.gather(*tasks)
        if self._pinger is None and self.options.keep_alive:
            self._pinger = self.loop.call_later(self.options.keep_alive / 2, self._ping)
        return {
            "connected": sum(results),
            "failed": len(results) - sum(results),
            "seconds": time.monotonic() - started,
        }

    async def _connect_one(self, device: Device, subscribe_delta: bool) -> bool:
        options = self.options
        device.closing = False
        device.connected_future = self.loop.create_future()
        device.subscribed.clear()
        try:
            await asyncio.wait_for(self._open_connection(device), options.connect_timeout)
            accepted = await asyncio.wait_for(device.connected_future, options.connect_timeout)
        except (OSError, TimeoutError):
            self.counters.errors += 1
            device.abort()
            return False
        if accepted and subscribe_delta:
            topic = shadow_topic(device.thing, "update/delta")
            device.send(Subscribe(1, [Subscription(topic, 1)]).encode(MQTT_3_1_1))
        return accepted

    async def _open_connection(self, device: Device) -> None:
        options = self.options
        if device.source is None:
            await self.loop.create_connection(lambda: device, options.host, options.port)
            return
        family = socket.AF_INET6 if ":" in device.source[0] else socket.AF_INET
        target = self._targets.get(family)
        if target is None:
            infos = await self.loop.getaddrinfo(
                options.host, options.port, family=family, type=socket.SOCK_STREAM
            )
            target = self._targets[family] = infos[0][4]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            # Without IP_BIND_ADDRESS_NO_PORT, bind() picks the local port and scans the
            # ephemeral range for one that no socket on the address uses. That scan grows
            # with the sockets bound: at 17,000 devices per process it kept each generator
            # busy in the kernel for over 20 s, and the broker closed connections whose
            # CONNECT came too late. With the option, connect() picks the port, as it does for
            # an unbound socket.
            if family == socket.AF_INET:
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind(device.source)
            sock.setblocking(False)
            await self.loop.sock_connect(sock, target)
            await self.loop.create_connection(lambda: device, sock=sock)
        except BaseException:
            sock.close()
            raise

    async def wait_deltas(self, timeout: float) -> dict[str, Any]:
        """Wait until every connected device has a delta; return how long that took."""
        started = time.monotonic()
        for device in self.devices:
            if device.got_delta is None:
                device.got_delta = self.loop.create_future()
        pending = [d.got_delta for d in self.devices if d.got_delta is not None]
        done, not_done = await asyncio.wait(pending, timeout=timeout)
        for device in self.devices:
            device.got_delta = None
        return {
            "with_delta": sum(1 for future in done if not future.cancelled()),
            "missing": len(not_done) + sum(1 for future in done if future.cancelled()),
            "seconds": time.monotonic() - started,
        }

    def expect_deltas(self) -> None:
        for device in self.devices:
            device.got_delta = self.loop.create_future()

    def drop(self, mode: str) -> dict[str, Any]:
        """Drop every device's connection: "disconnect" sends DISCONNECT and closes it,
        "abrupt" resets it, and "silent" leaves it open and unused (see ``stale``)."""
        self.stop_publishing()
        for device in self.devices:
            if mode == "silent":
                self._leave_open(device)
            else:
                device.close(mode == "abrupt")
        return {"dropped": len(self.devices)}

    def _leave_open(self, device: Device) -> None:
        transport = device.transport
        if transport is None:
            return
        if device.connected:
            self.counters.connected -= 1
        device.connected = False
        device.transport = None
        device.in_flight.clear()
        # A plain protocol reads and discards what the broker still sends, such as the
        # DISCONNECT of a session takeover, and does nothing when the broker closes it.
        transport.set_protocol(asyncio.Protocol())
        self.stale.append(transport)

    # --- desired: devices report the value their delta requests -------------------------

    def follow_desired(self) -> None:
        """Make every device report each delta's ``target`` value at QoS 1, once."""

        def report(device: Device, delta: dict[str, Any]) -> None:
            target = delta.get("state", {}).get("target")
            if target is None:
                return
            payload = orjson.dumps({"state": {"reported": {"target": target}}})
            packet_id = device.next_packet_id
            device.next_packet_id = packet_id % 65535 + 1
            device.in_flight[packet_id] = time.monotonic()
            device.report_ids.add(packet_id)
            device.send(
                Publish(
                    shadow_topic(device.thing, "update"), payload, 1, packet_id=packet_id
                ).encode(MQTT_3_1_1)
            )
            self.counters.sent += 1

        for device in self.devices:
            device.on_delta = report

    # --- publishing ---------------------------------------------------------------------

    def start_publishing(self) -> None:
        options = self.options
        self._publishing = True
        if options.frequency == 0:
            self._ticker = self.loop.call_soon(self._flat_out)
            return
        slots = max(1, round(options.frequency / TICK))
        # Jitter of up to a tenth of the interval either way keeps devices from falling into
        # lock step. The wheel has room for the longest jittered interval.
        self._jitter = slots // 10
        self._interval_slots = slots
        self._wheel = [[] for _ in range(slots + self._jitter + 1)]
        for device in self.devices:
            # A random phase spreads the devices over the interval.
            self._wheel[self.rng.randrange(slots)].append(device)
        self._slot = 0
        self._next_tick = time.monotonic()
        self._tick()

    def _tick(self) -> None:
        if not self._publishing:
            return
        wheel = self._wheel
        size = len(wheel)
        interval = self._interval_slots
        jitter = self._jitter
        randint = self.rng.randint
        now = time.monotonic()
        # Catch up on the slots whose time has come, so a late timer does not lower the rate.
        # Stop after one turn of the wheel, because a generator that cannot keep up would
        # otherwise fall further behind with each call and ignore the coordinator's commands.
        turns = 0
        while self._next_tick <= now and turns < size:
            due, wheel[self._slot] = wheel[self._slot], []
            for device in due:
                device.publish()
                delay = interval + randint(-jitter, jitter) if jitter else interval
                wheel[(self._slot + delay) % size].append(device)
            self._slot = (self._slot + 1) % size
            self._next_tick += TICK
            turns += 1
        if self._next_tick <= now:
            # Saturated: go on from now, so the rate sent falls below the offered rate.
            self._next_tick = now
        self._ticker = self.loop.call_at(
            self.loop.time() + max(0.0, self._next_tick - time.monotonic()), self._tick
        )

    def _flat_out(self) -> None:
        """Publish once per device per loop iteration, as fast as the sockets take it."""
        if not self._publishing:
            return
        for device in self.devices:
            transport = device.transport
            if transport is not None and transport.get_write_buffer_size() < 65536:
                device.publish()
        self._ticker = self.loop.call_soon(self._flat_out)

    def stop_publishing(self) -> None:
        self._publishing = False
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None

    def _ping(self) -> None:
        """Send PINGREQ from every connected device unless they publish often enough.

        Without it a broker closes devices that wait, silent, for longer than one and a half
        times their keep alive: in a storm's wait for deltas, or between slow reports.
        """
        interval = self.options.keep_alive / 2
        self._pinger = self.loop.call_later(interval, self._ping)
        if self._publishing and self.options.frequency < interval:
            return
        for device in self.devices:
            if device.connected:
                device.send(PINGREQ_PACKET)

    def close_all(self) -> None:
        self.stop_publishing()
        if self._pinger is not None:
            self._pinger.cancel()
            self._pinger = None
        for device in self.devices:
            device.close(abrupt=False)
        for transport in self.stale:
            transport.abort()
        self.stale.clear()


async def _serve(
    options: SwarmOptions, first: int, count: int, seed: int, pipe: Connection
) -> None:
    worker = Worker(options, first, count, seed)
    loop = asyncio.get_running_loop()
    commands: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()

    def read_command() -> None:
        try:
            commands.put_nowait(pipe.recv())
        except EOFError:
            # The coordinator is gone (killed, or stopped by a signal): a worker left behind
            # would keep loading the broker.
            os._exit(1)

    loop.add_reader(pipe.fileno(), read_command)
    # uvloop made the descriptor non-blocking: a partly arrived command must be waited for.
    os.set_blocking(pipe.fileno(), True)

    async def report() -> None:
        while True:
            await asyncio.sleep(STATS_INTERVAL)
            pipe.send(("stats", worker.counters.snapshot()))

    reporter = loop.create_task(report())
    try:
        while True:
            command, *arguments = await commands.get()
            result: Any = None
            if command == "connect":
                result = await worker.connect(*arguments)
            elif command == "publish":
                worker.start_publishing()
            elif command == "pause":
                worker.stop_publishing()
            elif command == "drop":
                result = worker.drop(*arguments)
            elif command == "expect_deltas":
                worker.expect_deltas()
            elif command == "wait_deltas":
                result = await worker.wait_deltas(*arguments)
            elif command == "follow_desired":
                worker.follow_desired()
            elif command == "converged":
                result, worker.converged = worker.converged, []
            elif command == "stop":
                worker.close_all()
                await asyncio.sleep(0.1)
                pipe.send(("stats", worker.counters.snapshot()))
                pipe.send(("done", command, None))
                return
            pipe.send(("done", command, result))
    finally:
        reporter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reporter
        loop.remove_reader(pipe.fileno())


def run_worker(options: SwarmOptions, first: int, count: int, seed: int, pipe: Connection) -> None:
    """Process entry point: serve the coordinator's commands until ``stop``."""
    import uvloop

    # One socket per device: take the hard file limit, which options.check() compared.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # The coordinator checked its own limit; this process may have been given another.
    if count > devices_per_process():
        pipe.send(
            (
                "failed",
                f"{count} devices need {count + FD_RESERVE} open files in this process, but "
                f"its file limit is {open_file_limit()}; use more --processes or raise the "
                "hard limit (ulimit -Hn)",
            )
        )
        return

    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(_serve(options, first, count, seed, pipe))
