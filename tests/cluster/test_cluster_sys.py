"""$SYS figures of a three-worker cluster: every worker publishes the engine's totals."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from test_cluster_subscribe import WORKERS, client_of

from conftest import ClusterThreads, free_port, open_clients, scaled
from ironshadow.broker.config import BrokerConfig
from mqtt_client import TestClient

SYS_INTERVAL_S = 0.2


@pytest.fixture
def cluster() -> Iterator[ClusterThreads]:
    config = BrokerConfig(port=free_port(), sys_interval=SYS_INTERVAL_S)
    threads = ClusterThreads(config, WORKERS)
    yield threads
    while open_clients:
        open_clients.pop().close()
    threads.stop()


def latest_figures(watcher: TestClient, expected: dict[str, int]) -> dict[str, int]:
    """Read $SYS messages until each topic of ``expected`` has reached its value, or 5 s
    have passed; return the latest value of each."""
    latest: dict[str, int] = {}
    deadline = time.monotonic() + scaled(5)
    while time.monotonic() < deadline:
        message = watcher.expect(timeout=2)
        if message.topic in expected:
            latest[message.topic] = int(message.payload)
        if all(latest.get(topic, -1) >= value for topic, value in expected.items()):
            break
    return latest


def test_every_worker_publishes_engine_totals(cluster):
    publishers = [TestClient(cluster.port, client_of(worker, "meter")) for worker in range(WORKERS)]
    for number in range(30):
        publishers[number % WORKERS].publish("plant/energy", b"%d" % number, 1)
    expected = {
        "$SYS/broker/publish/messages/received": 30,
        "$SYS/broker/clients/connected": WORKERS + 1,
    }
    for worker in range(WORKERS):
        watcher = TestClient(cluster.port, client_of(worker, "watcher"))
        watcher.subscribe("$SYS/broker/#", 0)
        latest = latest_figures(watcher, expected)
        # Each worker alone received a third of the messages and has at most two clients.
        assert latest["$SYS/broker/publish/messages/received"] == 30, (worker, latest)
        assert latest["$SYS/broker/clients/connected"] >= WORKERS + 1, (worker, latest)
        watcher.close()
