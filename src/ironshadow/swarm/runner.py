"""The swarm's coordinator: starts the generator processes, runs a scenario, reports.

The achieved rate comes from the broker's own ``$SYS/broker/publish/messages/received``
counter, so the figure is what the broker took in, not what the generator sent, and the same
run works against any broker that publishes it (Mosquitto does). CPU and memory of the
engine come from /proc when ``--engine-pid`` names a local process.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import multiprocessing
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import orjson

from ironshadow.mqtt import (
    MQTT_3_1_1,
    Connack,
    Connect,
    PacketDecoder,
    Puback,
    Publish,
    Subscribe,
    Subscription,
)

from .discard import run_discard_server
from .options import SwarmOptions, SwarmUsageError, check, default_source_addresses
from .worker import PINGREQ_PACKET, STATS_INTERVAL, run_worker, shadow_topic, thing_name

SYS_RECEIVED = "$SYS/broker/publish/messages/received"
# Keep alive of the observer connections, in seconds; they send PINGREQ at half of it.
OBSERVER_KEEP_ALIVE = 60
# Seconds to wait for a shadow reply when probing whether the broker serves shadows.
SHADOW_PROBE_TIMEOUT = 3.0
# Seconds allowed for a worker to finish a command that does not connect devices.
COMMAND_TIMEOUT = 30.0
# Seconds the load goes on after the window for the broker's next $SYS counter sample.
SYS_WAIT_AFTER_WINDOW = 15.0
# QoS 1 messages the observer leaves unacknowledged at most when it sets desired state.
OBSERVER_WINDOW = 10
# Seconds between progress lines when standard error is not a terminal.
PROGRESS_LOG_INTERVAL = 5.0
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class SwarmError(Exception):
    """The run could not go on: the message names what happened and what to check."""


# --- /proc ---------------------------------------------------------------------------------


def process_cpu_seconds(pid: int) -> float | None:
    """Return user plus system CPU of a process and all its threads, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            fields = stat_file.read().rpartition(b")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def process_tree(pid: int) -> list[int]:
    """Return ``pid`` and the PIDs of its live descendants, such as the workers of
    ``ironshadow serve`` under their supervisor."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat_file:
                parent = int(stat_file.read().rpartition(b")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # the process ended meanwhile
        children.setdefault(parent, []).append(int(entry))
    tree = [pid]
    for member in tree:
        tree.extend(children.get(member, ()))
    return tree


def engine_cpu_seconds(pid: int) -> float | None:
    """Return the CPU seconds of the engine process ``pid`` and its live descendants, or
    None if it is gone."""
    own = process_cpu_seconds(pid)
    if own is None:
        return None
    return own + sum(process_cpu_seconds(child) or 0.0 for child in process_tree(pid)[1:])


def engine_rss_bytes(pid: int) -> int | None:
    """Return the RSS of the engine process ``pid`` and its live descendants, or None."""
    own = process_rss_bytes(pid)
    if own is None:
        return None
    return own + sum(process_rss_bytes(child) or 0 for child in process_tree(pid)[1:])


def process_rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", "rb") as status_file:
            for line in status_file:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# --- a small MQTT client for $SYS and for the application side -----------------------------


class Observer(asyncio.Protocol):
    """One MQTT connection that records $SYS counters and publishes desired state."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.decoder = PacketDecoder(version=MQTT_3_1_1)
        self.connack: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.received: list[tuple[float, int]] = []  # (monotonic time, counter value)
        self.replies: asyncio.Queue[str] = asyncio.Queue()
        self.next_packet_id = 1
        self.unacknowledged = 0
        self.acknowledged = asyncio.Event()
        self._pinger: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, though they implement it.
        self.transport = transport  # type: ignore[assignment]
        self._pinger = asyncio.get_running_loop().call_later(OBSERVER_KEEP_ALIVE / 2, self._ping)

    def _ping(self) -> None:
        """Send PINGREQ: an observer only listens, and the broker would close it as idle."""
        if self.transport is None:
            return
        self.transport.write(PINGREQ_PACKET)
        self._pinger = asyncio.get_running_loop().call_later(OBSERVER_KEEP_ALIVE / 2, self._ping)

    def data_received(self, data: bytes) -> None:
        for packet in self.decoder.feed(data):
            if isinstance(packet, Connack) and not self.connack.done():
                self.connack.set_result(packet.reason_code)
            elif isinstance(packet, Puback):
                self.unacknowledged -= 1
                self.acknowledged.set()
            elif isinstance(packet, Publish):
                if packet.topic == SYS_RECEIVED:
                    with contextlib.suppress(ValueError):
                        self.received.append((time.monotonic(), int(packet.payload)))
                else:
                    self.replies.put_nowait(packet.topic)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self._pinger is not None:
            self._pinger.cancel()
        if not self.connack.done():
            self.connack.set_exception(ConnectionError("closed before CONNACK"))

    def send(self, packet: bytes) -> None:
        if self.transport is None:
            raise SwarmError("the observer's connection to the broker was closed")
        self.transport.write(packet)

    def packet_id(self) -> int:
        packet_id = self.next_packet_id
        self.next_packet_id = packet_id % 65535 + 1
        return packet_id

    def subscribe(self, topic_filter: str, qos: int = 0) -> None:
        self.send(Subscribe(self.packet_id(), [Subscription(topic_filter, qos)]).encode(3))

    def publish(self, topic: str, payload: bytes) -> None:
        self.send(Publish(topic, payload, 1, packet_id=self.packet_id()).encode(MQTT_3_1_1))
        self.unacknowledged += 1

    async def publish_paced(self, messages: list[tuple[str, bytes]], timeout: float) -> None:
        """Publish at QoS 1 with at most OBSERVER_WINDOW messages unacknowledged.

        A shadow service limits the requests in flight per connection (AWS IoT rejects the
        eleventh with 429), so an application that sets many shadows paces itself.
        """
        deadline = time.monotonic() + timeout
        for topic, payload in messages:
            while self.unacknowledged >= OBSERVER_WINDOW:
                self.acknowledged.clear()
                left = deadline - time.monotonic()
                try:
                    await asyncio.wait_for(self.acknowledged.wait(), max(0.0, left))
                except TimeoutError:
                    raise SwarmError(
                        f"the broker acknowledged no desired-state update for {timeout:g} s"
                    ) from None
            self.publish(topic, payload)

    def rate_between(
        self, load_start: float, start: float, end: float
    ) -> tuple[float | None, float]:
        """Return the counter's rate over the window and the span it was measured over.

        The span runs from the last sample before ``start`` (but not before ``load_start``,
        when the load began) to the first sample at or after ``end``, so it covers the window
        as closely as the broker's $SYS interval allows.
        """
        before = [sample for sample in self.received if load_start <= sample[0] <= start]
        after_start = [sample for sample in self.received if sample[0] > start]
        if before:
            first = before[-1]
        elif after_start:
            first = after_start[0]
        else:
            return None, 0.0
        after_end = [sample for sample in self.received if sample[0] >= end]
        if not after_end:
            return None, 0.0
        last = after_end[0]
        span = last[0] - first[0]
        if span <= 0:
            return None, 0.0
        return (last[1] - first[1]) / span, span

    async def wait_sample_after(self, moment: float, timeout: float) -> None:
        """Wait until a $SYS counter sample newer than ``moment`` arrives, or the timeout."""
        deadline = time.monotonic() + timeout
        while not (self.received and self.received[-1][0] >= moment):
            if time.monotonic() >= deadline:
                return
            await asyncio.sleep(0.05)


# --- results -------------------------------------------------------------------------------


@dataclass
class SwarmResult:
    scenario: str
    devices: int
    processes: int
    qos: int
    frequency_s: float
    window_s: float
    offered_per_s: float | None
    sent_per_s: float
    sent_total: int  # messages the devices sent, in the window and outside it
    achieved_per_s: float | None
    achieved_note: str
    ack_latency_ms: dict[str, float | None]
    connack_latency_ms: dict[str, float | None]
    connect_s: float | None
    engine_cpu_percent_core: float | None
    engine_cpu_percent_machine: float | None
    engine_us_per_message: float | None
    engine_rss_mb: float | None
    generator_cpu_percent_core: float
    generator_us_per_message: float | None
    errors: int
    disconnects: int
    skipped: int
    scenario_figures: dict[str, Any] = field(default_factory=dict)
    # Local addresses the devices connected from; empty when the kernel chose.
    source_addresses: list[str] = field(default_factory=list)
    # Wall-clock times (Unix seconds) of the window, to line up figures measured elsewhere.
    window_start_unix: float = 0.0
    window_end_unix: float = 0.0


def percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))
    return ordered[index]


def latency_summary(values: list[float]) -> dict[str, float | None]:
    def ms(value: float | None) -> float | None:
        return None if value is None else round(value * 1000, 2)

    return {
        "p50": ms(percentile(values, 0.50)),
        "p99": ms(percentile(values, 0.99)),
        "max": ms(max(values) if values else None),
    }


# --- the coordinator -----------------------------------------------------------------------


class Coordinator:
    def __init__(self, options: SwarmOptions) -> None:
        self.options = options
        self.loop = asyncio.get_running_loop()
        self.processes: list[multiprocessing.process.BaseProcess] = []
        self.pipes: list[Connection] = []
        self.stats: list[dict[str, Any]] = []
        self.replies: asyncio.Queue[tuple[int, str, Any]] = asyncio.Queue()
        self.ack_latencies: list[float] = []
        self.connack_latencies: list[float] = []
        self.observer: Observer | None = None

    # --- workers --------------------------------------------------------------------------

    def start_workers(self) -> None:
        options = self.options
        count = options.process_count()
        context = multiprocessing.get_context("spawn")
        base, extra = divmod(options.devices, count)
        first = 0
        for number in range(count):
            share = base + (1 if number < extra else 0)
            ours, theirs = context.Pipe()
            process = context.Process(
                target=run_worker,
                args=(options, first, share, number + 1, theirs),
                name=f"swarm-worker-{number}",
                daemon=True,
            )
            process.start()
            theirs.close()
            self.processes.append(process)
            self.pipes.append(ours)
            self.stats.append({})
            self.loop.add_reader(ours.fileno(), self._receive, number)
            # uvloop makes a watched descriptor non-blocking, and then recv() of a message that
            # has partly arrived raises BlockingIOError. Blocking, it waits for the rest.
            os.set_blocking(ours.fileno(), True)
            first += share

    def _receive(self, number: int) -> None:
        pipe = self.pipes[number]
        try:
            message = pipe.recv()
        except (EOFError, OSError):
            self.loop.remove_reader(pipe.fileno())
            self.replies.put_nowait((number, "exited", None))
            return
        if message[0] == "stats":
            counters = message[1]
            self.ack_latencies.extend(counters.pop("ack_latencies"))
            self.connack_latencies.extend(counters.pop("connack_latencies"))
            self.stats[number] = counters
        elif message[0] == "failed":
            self.replies.put_nowait((number, "failed", message[1]))
        else:
            self.replies.put_nowait((number, message[1], message[2]))

    async def command(self, name: str, *arguments: Any, timeout: float = COMMAND_TIMEOUT) -> list:
        """Send a command to every worker and return their results, in worker order."""
        for pipe in self.pipes:
            # A worker that has exited cannot take the command; its pipe reports "exited".
            with contextlib.suppress(OSError):
                pipe.send((name, *arguments))
        results: list[Any] = [None] * len(self.pipes)
        waiting = set(range(len(self.pipes)))
        deadline = time.monotonic() + timeout
        while waiting:
            try:
                number, command, result = await asyncio.wait_for(
                    self.replies.get(), max(0.0, deadline - time.monotonic())
                )
            except TimeoutError:
                raise SwarmError(
                    f"generator processes {sorted(waiting)} did not finish {name!r} within "
                    f"{timeout:g} s"
                ) from None
            if command == "exited":
                raise SwarmError(f"generator process {number} exited during {name!r}")
            if command == "failed":
                raise SwarmError(f"generator process {number}: {result}")
            if command == name:
                results[number] = result
                waiting.discard(number)
        return results

    def total(self, key: str) -> int:
        return sum(stats.get(key, 0) for stats in self.stats)

    def generator_cpu_seconds(self) -> float:
        return sum(process_cpu_seconds(p.pid) or 0.0 for p in self.processes if p.pid)

    async def stop_workers(self) -> None:
        with contextlib.suppress(SwarmError):
            await self.command("stop", timeout=10)
        for process in self.processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
        for pipe in self.pipes:
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(pipe.fileno())
            pipe.close()

    # --- the observer ---------------------------------------------------------------------

    async def open_observer(self) -> Observer:
        """Connect the observer, which reads the broker's $SYS counter, sets desired state
        and probes for shadows."""
        options = self.options
        client_id = f"{options.client_prefix}observer"
        try:
            _, observer = await asyncio.wait_for(
                self.loop.create_connection(Observer, options.host, options.port), 10
            )
            username, password = options.credentials(client_id)
            connect = Connect(client_id, MQTT_3_1_1, True, OBSERVER_KEEP_ALIVE, username, password)
            observer.send(connect.encode())
            code = await asyncio.wait_for(observer.connack, 10)
        except (OSError, TimeoutError, ConnectionError) as exc:
            raise SwarmError(
                f"cannot connect to the MQTT broker at {options.host}:{options.port}: {exc}. "
                "Check that the engine runs (ironshadow serve) and that --host and --port are right"
            ) from exc
        if code != 0:
            raise SwarmError(
                f"the broker rejected the swarm's observer connection (CONNACK code {code}); "
                "check the broker's authentication settings"
            )
        observer.subscribe(SYS_RECEIVED)
        self.observer = observer
        return observer

    async def serves_shadows(self) -> bool:
        """Return whether the broker replies to a shadow get, that is, serves device shadows."""
        assert self.observer is not None
        thing = f"{self.options.client_prefix}probe"
        self.observer.subscribe(shadow_topic(thing, "get/+"))
        await asyncio.sleep(0.2)
        self.observer.publish(shadow_topic(thing, "get"), b"")
        try:
            await asyncio.wait_for(self.observer.replies.get(), SHADOW_PROBE_TIMEOUT)
        except TimeoutError:
            return False
        return True

    # --- scenarios ------------------------------------------------------------------------

    async def connect_all(self, rate: float | None, subscribe_delta: bool) -> float:
        options = self.options
        per_worker = None if rate is None else rate / len(self.pipes)
        results = await self.command(
            "connect", per_worker, subscribe_delta, timeout=options.connect_timeout + 30
        )
        connected = sum(result["connected"] for result in results)
        if connected < options.devices:
            raise SwarmError(
                f"only {connected} of {options.devices} devices connected to "
                f"{options.host}:{options.port}; check the broker's connection limit (the "
                "swarm's observer takes one connection more than the devices) and log"
            )
        return max(result["seconds"] for result in results)

    async def measure(self, figures: dict[str, Any], connect_s: float | None) -> SwarmResult:
        """Run the publishing load through the warm-up and the window; return the result."""
        options = self.options
        assert self.observer is not None
        await self.command("publish")
        load_start = time.monotonic()
        await self.progress(options.warmup, "warm-up")
        self.ack_latencies.clear()
        started = time.monotonic()
        started_unix = time.time()
        sent_before = self.total("sent")
        engine_before = engine_cpu_seconds(options.engine_pid) if options.engine_pid else None
        generator_before = self.generator_cpu_seconds()
        await self.progress(options.duration, "window")
        window = time.monotonic() - started
        sent = self.total("sent") - sent_before
        engine_after = engine_cpu_seconds(options.engine_pid) if options.engine_pid else None
        generator_cpu = self.generator_cpu_seconds() - generator_before
        latencies = list(self.ack_latencies)
        end = time.monotonic()
        end_unix = time.time()
        # The load goes on until the broker publishes its counter once more after the window.
        await self.observer.wait_sample_after(end, SYS_WAIT_AFTER_WINDOW)
        await self.command("pause")
        achieved, span = self.observer.rate_between(load_start, started, end)
        note = ""
        if achieved is None:
            note = (
                f"no rate: fewer than two {SYS_RECEIVED} messages arrived in the window; run "
                "the broker with a $SYS interval well below --duration (ironshadow serve "
                "--sys-interval 1, or sys_interval 1 in mosquitto.conf)"
            )
        elif not 0.5 * window <= span <= 2 * window:
            note = (
                f"achieved rate measured over {span:.1f} s around the {window:.1f} s window: "
                "the broker's $SYS interval is long for this window"
            )

        engine_cpu = None
        engine_rss = None
        if engine_before is not None and engine_after is not None:
            engine_cpu = engine_after - engine_before
            rss = engine_rss_bytes(options.engine_pid)  # type: ignore[arg-type]
            engine_rss = None if rss is None else rss / 2**20
        cpus = os.cpu_count() or 1
        counted = achieved * window if achieved else None
        return SwarmResult(
            scenario=options.scenario,
            devices=options.devices,
            processes=len(self.pipes),
            qos=options.qos,
            frequency_s=options.frequency,
            window_s=round(window, 3),
            offered_per_s=None if options.frequency == 0 else options.offered_rate,
            sent_per_s=sent / window,
            sent_total=0,  # set once the workers have stopped
            achieved_per_s=achieved,
            achieved_note=note,
            ack_latency_ms=latency_summary(latencies),
            connack_latency_ms=latency_summary(self.connack_latencies),
            connect_s=connect_s,
            engine_cpu_percent_core=None if engine_cpu is None else 100 * engine_cpu / window,
            engine_cpu_percent_machine=(
                None if engine_cpu is None else 100 * engine_cpu / window / cpus
            ),
            engine_us_per_message=(
                None if engine_cpu is None or not counted else 1e6 * engine_cpu / counted
            ),
            engine_rss_mb=engine_rss,
            generator_cpu_percent_core=100 * generator_cpu / window,
            generator_us_per_message=1e6 * generator_cpu / sent if sent else None,
            errors=self.total("errors"),
            disconnects=self.total("disconnects"),
            skipped=self.total("skipped"),
            scenario_figures=figures,
            source_addresses=list(options.source_addresses),
            window_start_unix=started_unix,
            window_end_unix=end_unix,
        )

    async def progress(self, seconds: float, phase: str) -> None:
        """Wait, showing a live line on standard error: rewritten each second on a terminal,
        a new line every PROGRESS_LOG_INTERVAL seconds otherwise."""
        terminal = sys.stderr.isatty()
        every = 1.0 if terminal else PROGRESS_LOG_INTERVAL
        end = time.monotonic() + seconds
        last_sent = self.total("sent")
        last_time = time.monotonic()
        while (left := end - time.monotonic()) > 0.05:
            await asyncio.sleep(min(every, left))
            now = time.monotonic()
            sent = self.total("sent")
            rate = (sent - last_sent) / max(now - last_time, 1e-9)
            last_sent, last_time = sent, now
            line = (
                f"{phase}: {max(0.0, end - now):5.1f} s left, {self.total('connected'):,} "
                f"connected, sending {rate:,.0f}/s, {self.total('acknowledged'):,} acknowledged, "
                f"{self.total('errors')} errors, {self.total('disconnects')} disconnects"
            )
            if terminal:
                print("\r" + line, end="", file=sys.stderr, flush=True)
            else:
                print(line, file=sys.stderr, flush=True)
        if terminal:
            print(file=sys.stderr, flush=True)

    async def storm(self, shadows: bool) -> dict[str, Any]:
        """Drop every connection at once, then reconnect them all at once."""
        options = self.options
        assert self.observer is not None
        await self.command("pause")
        if options.abrupt:
            mode = "abrupt"
        elif options.silent:
            mode = "silent"
        else:
            mode = "disconnect"
        await self.command("drop", mode)
        await asyncio.sleep(0.5)
        if shadows:
            # Desired state set while the devices are away: each has a delta waiting.
            stamp = int(time.time())
            payload = orjson.dumps({"state": {"desired": {"storm": stamp}}})
            await self.observer.publish_paced(
                [
                    (shadow_topic(thing_name(options, index), "update"), payload)
                    for index in range(options.devices)
                ],
                options.connect_timeout,
            )
            await self.command("expect_deltas")
        self.connack_latencies.clear()
        started = time.monotonic()
        reconnect_s = await self.connect_all(None, shadows)
        figures: dict[str, Any] = {
            "storm_reconnect_s": round(reconnect_s, 3),
            "storm_abrupt": options.abrupt,
            "storm_silent": options.silent,
        }
        if shadows:
            results = await self.command(
                "wait_deltas", options.connect_timeout, timeout=options.connect_timeout + 30
            )
            missing = sum(result["missing"] for result in results)
            figures["storm_all_deltas_s"] = round(time.monotonic() - started, 3)
            figures["storm_missing_deltas"] = missing
        await asyncio.sleep(2 * STATS_INTERVAL)  # the workers' CONNACK latencies arrive
        figures["storm_connack_ms"] = latency_summary(self.connack_latencies)
        return figures

    async def desired(self) -> dict[str, Any]:
        """Change desired state for a share of devices; time until all reported it."""
        options = self.options
        assert self.observer is not None
        targets = max(1, round(options.devices * options.share))
        await self.command("follow_desired")
        started = time.time()
        await self.observer.publish_paced(
            [
                (
                    shadow_topic(thing_name(options, index), "update"),
                    orjson.dumps({"state": {"desired": {"target": index + 1}}}),
                )
                for index in range(targets)
            ],
            options.connect_timeout,
        )
        converged: list[float] = []
        deadline = time.monotonic() + options.connect_timeout
        while len(converged) < targets and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            for result in await self.command("converged"):
                converged.extend(result)
        return {
            "desired_devices": targets,
            "desired_converged": len(converged),
            "desired_convergence_s": (
                round(max(converged) - started, 3) if len(converged) >= targets else None
            ),
            "desired_p50_s": (
                round(percentile(converged, 0.5) - started, 3) if converged else None  # type: ignore[operator]
            ),
        }


async def run_swarm(options: SwarmOptions) -> SwarmResult:
    """Run the scenario that ``options`` name and return its result."""
    check(options)
    if options.ceiling:
        return await _run_against_discard_server(options)
    options = dataclasses.replace(options, source_addresses=default_source_addresses(options))
    coordinator = Coordinator(options)
    await coordinator.open_observer()
    coordinator.start_workers()
    try:
        shadows = options.scenario in ("storm", "desired") and await coordinator.serves_shadows()
        if options.scenario == "desired" and not shadows:
            raise SwarmError(
                f"the broker at {options.host}:{options.port} does not reply to shadow requests; "
                "the desired scenario needs IronShadow (or another AWS-compatible shadow service)"
            )
        ramp = options.ramp_rate if options.scenario == "ramp" else None
        connect_s = await coordinator.connect_all(ramp, shadows)
        figures: dict[str, Any] = {}
        if options.scenario == "desired":
            figures.update(await coordinator.desired())
        result = await coordinator.measure(figures, connect_s)
        if options.scenario == "storm":
            result.scenario_figures.update(await coordinator.storm(shadows))
            if not shadows:
                result.scenario_figures["storm_note"] = "the broker serves no shadows: no deltas"
    finally:
        await coordinator.stop_workers()
        observer = coordinator.observer
        if observer is not None and observer.transport is not None:
            observer.transport.close()
    result.sent_total = coordinator.total("sent")
    return result


async def _run_against_discard_server(options: SwarmOptions) -> SwarmResult:
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    server = context.Process(
        target=run_discard_server, args=("127.0.0.1", theirs), name="swarm-discard", daemon=True
    )
    server.start()
    theirs.close()
    try:
        loop = asyncio.get_running_loop()
        if not await loop.run_in_executor(None, ours.poll, 30):
            raise SwarmError("the discard server did not start within 30 s")
        port = ours.recv()
        measured = dataclasses.replace(
            options, host="127.0.0.1", port=port, ceiling=False, engine_pid=server.pid
        )
        result = await run_swarm(measured)
        result.scenario_figures["target"] = "discard server (the generator's ceiling)"
        return result
    finally:
        server.kill()
        server.join(timeout=5)
        ours.close()


# --- output --------------------------------------------------------------------------------


def _format(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):
        return " / ".join(f"{key} {_format(item, digits)}" for key, item in value.items())
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def render(result: SwarmResult) -> str:
    ack = result.ack_latency_ms
    connack = result.connack_latency_ms
    rows = [
        ("scenario", result.scenario),
        ("devices / generator processes", f"{result.devices:,} / {result.processes}"),
        ("QoS, frequency", f"{result.qos}, {result.frequency_s * 1000:g} ms"),
        ("window", f"{result.window_s:.1f} s"),
        ("offered messages/s", _format(result.offered_per_s, 0)),
        ("sent messages/s", _format(result.sent_per_s, 0)),
        ("achieved messages/s ($SYS)", _format(result.achieved_per_s, 0)),
        (
            "QoS 1 ack latency p50 / p99 / max, ms",
            f"{_format(ack['p50'], 2)} / {_format(ack['p99'], 2)} / {_format(ack['max'], 2)}",
        ),
        (
            "CONNACK latency p50 / p99 / max, ms",
            f"{_format(connack['p50'], 2)} / {_format(connack['p99'], 2)} / "
            f"{_format(connack['max'], 2)}",
        ),
        ("time to connect all, s", _format(result.connect_s, 2)),
        (
            "engine CPU, % of one core / of machine",
            f"{_format(result.engine_cpu_percent_core)} / "
            f"{_format(result.engine_cpu_percent_machine)}",
        ),
        ("engine CPU per message, µs", _format(result.engine_us_per_message, 2)),
        ("engine RSS, MB", _format(result.engine_rss_mb)),
        ("generator CPU, % of one core", _format(result.generator_cpu_percent_core)),
        ("generator CPU per message, µs", _format(result.generator_us_per_message, 2)),
        (
            "errors / disconnects / skipped sends",
            f"{result.errors} / {result.disconnects} / {result.skipped}",
        ),
    ]
    if result.source_addresses:
        addresses = result.source_addresses
        shown = ", ".join(addresses) if len(addresses) <= 4 else f"{addresses[0]} … {addresses[-1]}"
        rows.append(("source addresses", f"{len(addresses)}: {shown}"))
    for key, value in result.scenario_figures.items():
        rows.append((key.replace("_", " "), _format(value, 3)))
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    if result.achieved_note:
        lines.append(f"note: {result.achieved_note}")
    return "\n".join(lines)


def main(options: SwarmOptions) -> int:
    """Run the swarm and print its report; return the process exit status."""
    import uvloop

    # SIGTERM ends the run as Ctrl-C does, so that the workers are stopped on the way out.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        result = uvloop.run(run_swarm(options))
    except (SwarmUsageError, SwarmError) as exc:
        print(f"ironshadow swarm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(render(result))
    if options.json:
        print(orjson.dumps(asdict(result)).decode())
    return 0
