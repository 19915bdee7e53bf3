"""The engine under load while one of its stores stalls: PostgreSQL locked, or Redis paused.

Each test starts ``python -m ironshadow serve`` on private Redis and PostgreSQL servers (from
``tests/storage/servers.py``, on free loopback ports) and connects DEVICES raw MQTT 3.1.1
clients (``engine_harness.py``). Every device publishes numbered QoS 1 reported updates to its
own shadow as fast as they are acknowledged, with at most WINDOW unacknowledged, and sends
PINGREQ after KEEP_ALIVE seconds without sending anything, as a compliant device does. The load
runs for a bounded time around a stall of STALL_SECONDS, which ``IRONSHADOW_STALL_SECONDS``
overrides (default 20) so that CI can run it shorter.

The engine runs in a subprocess so that its resident set size (``VmRSS`` and ``VmHWM`` in
``/proc/<pid>/status``) contains the engine alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import asyncpg
import pytest
import redis.asyncio as aioredis
from engine_harness import (
    WINDOW,
    Device,
    EngineProcess,
    PostgresServer,
    RedisServer,
    hot_versions,
    outbox_length,
    running_engine,
    thing_name,
    wait_for_history,
)

from conftest import scaled
from ironshadow.storage.pipeline import DEFAULT_HIGH_WATER
from ironshadow.storage.redis import OUTBOX_MEMORY_ROWS

# Seconds a store stays stalled. The engine must ride out 20 s, and CI may set a shorter stall.
STALL_SECONDS = float(os.environ.get("IRONSHADOW_STALL_SECONDS", "20"))

# Seconds of load before the stall starts and after it ends.
WARMUP_SECONDS = 3.0
RECOVERY_SECONDS = 3.0

# Enough devices that DEVICES * WINDOW (21,000) exceeds the pipeline's high-water mark
# (20,000 items), so a stalled hot store makes the engine pause reading.
DEVICES = DEFAULT_HIGH_WATER // WINDOW + 100

# Estimated engine memory per update in flight: the decoded message, the parsed request, the
# shadow document and history row (about 250 bytes of JSON here), the PUBACK waiting in order,
# the accepted reply in the device's output buffer, and its share of the Redis transaction.
# The peak comes after the stall, when the backlog drains while every connection is read
# again at once: five runs at about 35,000 updates/s (2 CPUs, Python 3.11) peaked 2.8 to
# 4.4 KB per update above the RSS before the stall; this estimate leaves a margin above that.
BYTES_PER_UPDATE_IN_FLIGHT = 5 * 1024
# Estimated engine memory per history row that the Redis store keeps for the history task
# (a HistoryRow with these small reports measured about 270 bytes), with a margin.
BYTES_PER_OUTBOX_ROW = 512
# Headroom for the allocator, the Redis and PostgreSQL client buffers and the outbox batch
# being moved (1,000 rows).
RSS_HEADROOM_BYTES = 32 * 1024 * 1024

# Seconds between samples of the acknowledged count and the engine's RSS.
SAMPLE_INTERVAL = 0.25


def rss_bound(loaded: int) -> int:
    """Return the most RSS the engine may reach in and after the stall, in bytes.

    ``loaded`` is the RSS under load just before the stall, so it already contains the
    connections and the steady flow of updates. A stall adds at most the DEVICES * WINDOW
    updates that devices can have unacknowledged: each device waits for PUBACKs beyond its
    window, and the pipeline's high-water mark pauses reading first anyway. Updates that the
    hot store accepted live in Redis; the engine keeps a copy of at most OUTBOX_MEMORY_ROWS
    of their history rows, however far PostgreSQL falls behind.
    """
    return (
        loaded
        + DEVICES * WINDOW * BYTES_PER_UPDATE_IN_FLIGHT
        + OUTBOX_MEMORY_ROWS * BYTES_PER_OUTBOX_ROW
        + RSS_HEADROOM_BYTES
    )


# --- servers and the engine -------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer.start()
    yield server
    server.stop()


@pytest.fixture
def engine(redis_server, postgres_server, tmp_path) -> Iterator[EngineProcess]:
    with running_engine(redis_server, postgres_server, tmp_path) as running:
        yield running


# --- load -------------------------------------------------------------------------------


@dataclass
class Sample:
    time: float
    acknowledged: int
    rss: int


@dataclass
class LoadResult:
    devices: list[Device]
    samples: list[Sample]
    baseline_rss: int  # after the devices connected, before any update
    peak_rss: int  # VmHWM at the end of the load
    stall_started: float
    stall_ended: float

    @property
    def loaded_rss(self) -> int:
        """The largest RSS sampled in the second before the stall."""
        before = [
            s.rss for s in self.samples if self.stall_started - 1 <= s.time < self.stall_started
        ]
        assert before, "no RSS sample in the second before the stall"
        return max(before)

    def counts_from(self, start: float) -> list[int]:
        """Return the acknowledged count at each whole second from ``start`` to the stall's end,
        for a failure message that shows when the acknowledgements came."""
        counts = []
        for second in range(int(self.stall_ended - start) + 1):
            at = [s for s in self.samples if s.time >= start + second]
            if at:
                counts.append(at[0].acknowledged)
        return counts

    def acknowledged_between(self, start: float, end: float) -> float:
        """Return the PUBACKs per second between two moments, from the samples."""
        inside = [sample for sample in self.samples if start <= sample.time <= end]
        assert len(inside) >= 2, f"fewer than two samples between {start} and {end}"
        first, last = inside[0], inside[-1]
        return (last.acknowledged - first.acknowledged) / (last.time - first.time)


async def run_load(engine: EngineProcess, stall) -> LoadResult:
    """Connect the devices, run the load around ``stall(began)`` and return what was measured.

    ``stall`` calls ``began()`` once its command has taken effect, then waits STALL_SECONDS.
    """
    devices = await asyncio.gather(
        *(Device.connect(engine.mqtt_port, index) for index in range(DEVICES))
    )
    baseline_rss = engine.memory("VmRSS")
    samples: list[Sample] = []

    started = time.monotonic()
    stop_at = started + WARMUP_SECONDS + STALL_SECONDS + RECOVERY_SECONDS
    drain_deadline = stop_at + scaled(15)
    runs = [asyncio.create_task(device.run(stop_at, drain_deadline)) for device in devices]

    async def sample() -> None:
        while True:
            acknowledged = sum(device.acknowledged for device in devices)
            samples.append(Sample(time.monotonic(), acknowledged, engine.memory("VmRSS")))
            await asyncio.sleep(SAMPLE_INTERVAL)

    # The stall counts from the moment its command took effect, not from when it was due:
    # under load this client's event loop may run the sleep or the command a second late.
    stall_started = 0.0

    def stall_began() -> None:
        nonlocal stall_started
        stall_started = time.monotonic()

    sampling = asyncio.create_task(sample())
    await asyncio.sleep(WARMUP_SECONDS)
    await stall(stall_began)
    assert stall_started, "the stall did not say when it began"
    stall_ended = time.monotonic()
    await asyncio.gather(*runs)
    sampling.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await sampling
    return LoadResult(
        devices, samples, baseline_rss, engine.memory("VmHWM"), stall_started, stall_ended
    )


def report(name: str, result: LoadResult) -> str:
    """Return a one-line summary of the measurements, printed with ``pytest -s``."""
    before = result.acknowledged_between(result.stall_started - 2, result.stall_started)
    during = result.acknowledged_between(result.stall_started + 1, result.stall_ended)
    latencies = [latency for device in result.devices for latency in device.ping_latencies]
    return (
        f"{name}: stall {STALL_SECONDS:.0f} s, acknowledged {before:.0f}/s before and "
        f"{during:.0f}/s during, RSS {result.baseline_rss / 2**20:.1f} MiB idle, "
        f"{result.loaded_rss / 2**20:.1f} MiB loaded, peak {result.peak_rss / 2**20:.1f} MiB, "
        f"bound {rss_bound(result.loaded_rss) / 2**20:.1f} MiB, pings {len(latencies)}, "
        f"max PINGRESP delay {max(latencies, default=0):.1f} s"
    )


# --- tests ------------------------------------------------------------------------------


def test_history_stall_keeps_devices_going(engine):
    """PostgreSQL locked for STALL_SECONDS: Redis keeps accepting, so devices are not slowed.

    The outbox rows wait in Redis, so the engine's RSS stays under ``rss_bound()``, and after
    the unlock every acknowledged update reaches ``shadow_updates``.
    """

    async def lock_history(began) -> None:
        connection = await asyncpg.connect(engine.postgres_dsn)
        try:
            async with connection.transaction():
                await connection.execute(
                    f"LOCK TABLE {engine.schema}.shadow_updates IN ACCESS EXCLUSIVE MODE"
                )
                began()
                await asyncio.sleep(STALL_SECONDS)
        finally:
            await connection.close()

    async def scenario() -> tuple[LoadResult, int, dict[str, int]]:
        result = await run_load(engine, lock_history)
        backlog = outbox_length(engine)
        things = {thing_name(device.index): device.acknowledged for device in result.devices}
        return result, backlog, await wait_for_history(engine, things)

    result, backlog_after_stall, found = asyncio.run(scenario())
    print(report("history stall", result))

    for device in result.devices:
        assert device.closed_by_broker_at is None, f"the engine closed device {device.index}"
        assert not device.in_flight, f"device {device.index} has unacknowledged updates"
    before = result.acknowledged_between(result.stall_started - 2, result.stall_started)
    during = result.acknowledged_between(result.stall_started + 1, result.stall_ended)
    assert before > 0
    assert during > 0.5 * before, f"acknowledged {during:.0f}/s in the stall, {before:.0f}/s before"
    assert backlog_after_stall > 0, "the outbox was empty right after the stall"
    assert result.peak_rss < rss_bound(result.loaded_rss)
    assert "timed out" not in engine.log_text()

    things = {thing_name(device.index): device.acknowledged for device in result.devices}
    missing = {
        thing: (found.get(thing), count)
        for thing, count in things.items()
        if found.get(thing) != count
    }
    assert not missing, (
        f"{len(missing)} things lack history rows (found, acknowledged), for example "
        f"{list(missing.items())[:5]}; outbox length {outbox_length(engine)}"
    )
    assert engine.stop() == 0, engine.log_text()


def test_hot_store_stall_slows_devices(engine, redis_server):
    """Redis paused for STALL_SECONDS: the pipeline passes its high-water mark and the engine
    stops reading, so devices are slowed down by TCP.

    No connection is closed for keep alive, the engine's RSS stays under ``rss_bound()``, and
    every acknowledged update is in Redis after the pause and in PostgreSQL after the drain.
    """

    async def pause_redis(began) -> None:
        client = aioredis.Redis(host="127.0.0.1", port=redis_server.port)
        try:
            # The pause outlasts the sleep and UNPAUSE ends it, so that writes cannot resume
            # (and flood the devices with PUBACKs) before the stall window ends.
            timeout_ms = int((STALL_SECONDS + 30) * 1000)
            await client.execute_command("CLIENT", "PAUSE", timeout_ms, "WRITE")
            began()
            await asyncio.sleep(STALL_SECONDS)
            await client.execute_command("CLIENT", "UNPAUSE")
        finally:
            await client.aclose()

    async def scenario() -> tuple[LoadResult, dict[str, int]]:
        result = await run_load(engine, pause_redis)
        things = {thing_name(device.index): device.acknowledged for device in result.devices}
        return result, await wait_for_history(engine, things)

    result, found = asyncio.run(scenario())
    print(report("hot-store stall", result))

    for device in result.devices:
        assert device.closed_by_broker_at is None, f"the engine closed device {device.index}"
        assert not device.in_flight, f"device {device.index} has unacknowledged updates"
    before = result.acknowledged_between(result.stall_started - 2, result.stall_started)
    # The window ends half a second early: after UNPAUSE the backlog drains at once.
    during = result.acknowledged_between(result.stall_started + 1, result.stall_ended - 0.5)
    assert before > 0
    assert during < 0.01 * before, (
        f"acknowledged {during:.0f}/s in the pause, {before:.0f}/s before; acknowledged "
        f"count by second from the pause: {result.counts_from(result.stall_started)}"
    )
    log = engine.log_text()
    assert "slowing devices down" in log
    assert "reading from all" in log
    assert "timed out" not in log
    assert result.peak_rss < rss_bound(result.loaded_rss)

    things = {thing_name(device.index): device.acknowledged for device in result.devices}
    assert hot_versions(engine, list(things)) == things
    missing = {
        thing: (found.get(thing), count)
        for thing, count in things.items()
        if found.get(thing) != count
    }
    assert not missing, (
        f"{len(missing)} things lack history rows (found, acknowledged), for example "
        f"{list(missing.items())[:5]}; outbox length {outbox_length(engine)}"
    )
    assert outbox_length(engine) == 0
    assert engine.stop() == 0, log
