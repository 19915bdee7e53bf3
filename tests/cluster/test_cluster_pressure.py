"""Backpressure over the whole engine: while one worker's store has fallen behind, every
worker pauses reading, as one engine pauses all its connections.

Without that, the clients of the other workers would go on sending requests for the slow
worker's things, and those would pile up in its memory. The cluster runs in this process
(``ClusterThreads`` in conftest.py). Its engines keep no stores, so the test raises and
clears worker 0's store pressure itself, as a write-behind pipeline does (``on_pressure``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from conftest import ClusterThreads, name_owned_by, run_cluster, scaled
from mqtt_client import TestClient

WORKERS = 2
# Seconds during which a paused worker must not acknowledge the test's request.
PAUSED_S = 0.5


def client_of(worker: int, prefix: str) -> str:
    return name_owned_by(worker, WORKERS, prefix)


@pytest.fixture
def cluster() -> Iterator[ClusterThreads]:
    yield from run_cluster(WORKERS)


def set_store_pressure(cluster: ClusterThreads, worker: int, raised: bool) -> None:
    thread = cluster.threads[worker]
    thread.call(lambda: thread.server.worker.store_pressure(raised))


def reading_paused(cluster: ClusterThreads, worker: int) -> bool:
    thread = cluster.threads[worker]
    return bool(thread.call(lambda: thread.broker.reading_paused))


def test_slow_store_pauses_every_worker(cluster):
    # The device is served by worker 1, and the thing that it reports for belongs to worker 0.
    device = TestClient(cluster.port, client_of(1, "press"))
    thing = client_of(0, "press")
    report = json.dumps({"state": {"reported": {"force": 3}}}).encode()

    set_store_pressure(cluster, 0, True)
    deadline = time.monotonic() + scaled(5)
    while not reading_paused(cluster, 1):
        assert time.monotonic() < deadline, "worker 1 did not pause"
        time.sleep(0.01)
    assert reading_paused(cluster, 0)
    info = device.publish(f"$aws/things/{thing}/shadow/update", report, qos=1, wait=False)
    time.sleep(PAUSED_S)
    assert not info.is_published(), "a paused worker acknowledged the request"

    set_store_pressure(cluster, 0, False)
    info.wait_for_publish(scaled(5))
    assert info.is_published()
    assert not reading_paused(cluster, 0)
    assert not reading_paused(cluster, 1)


def test_pressure_of_stopped_worker_is_forgotten(cluster):
    """A worker whose link closes while its store is behind no longer pauses the others."""
    set_store_pressure(cluster, 0, True)
    deadline = time.monotonic() + scaled(5)
    while not reading_paused(cluster, 1):
        assert time.monotonic() < deadline, "worker 1 did not pause"
        time.sleep(0.01)
    cluster.threads[0].stop()
    deadline = time.monotonic() + scaled(5)
    while reading_paused(cluster, 1):
        assert time.monotonic() < deadline, "worker 1 stayed paused"
        time.sleep(0.01)
