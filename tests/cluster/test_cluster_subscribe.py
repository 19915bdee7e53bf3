"""A subscription on one worker and a publish on another, as close together as a client can.

The cluster runs in this process (``ClusterThreads`` in conftest.py), with the same bus and
hand-off code as ``ironshadow serve --workers 3``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from conftest import ClusterThreads, free_port
from ironshadow.broker.config import BrokerConfig
from ironshadow.cluster import owner_of
from ironshadow.mqtt import MQTT_5, Publish, Suback, Subscribe, Subscription
from raw_client import RawClient

WORKERS = 3
ROUNDS = 50
LINK_DELAY_S = 0.2


def client_of(worker: int, prefix: str) -> str:
    number = 0
    while owner_of(f"{prefix}-{number}", WORKERS) != worker:
        number += 1
    return f"{prefix}-{number}"


@pytest.fixture
def cluster() -> Iterator[ClusterThreads]:
    threads = ClusterThreads(BrokerConfig(port=free_port(), sys_interval=0), WORKERS)
    yield threads
    threads.stop()


def test_publish_right_after_suback_arrives(cluster):
    """Each round subscribes to a new topic on worker 0 and publishes to it from worker 1
    as soon as the SUBACK is read. Every tenth round, worker 1 reads its bus link from
    worker 0 late. Without the SYNC round trip before the SUBACK, worker 1 would route the
    message before it has the new filter, and drop it."""
    subscriber = RawClient(cluster.port, MQTT_5)
    subscriber.connect(client_of(0, "listener"))
    publisher = RawClient(cluster.port, MQTT_5)
    publisher.connect(client_of(1, "sensor"))
    for number in range(ROUNDS):
        if number % 10 == 0:
            delay_bus_link(cluster.threads[1], 0, LINK_DELAY_S)
        topic = f"line/{number}/temperature"
        subscriber.send(Subscribe(number + 1, [Subscription(topic, 0)]))
        subscriber.receive(Suback)
        publisher.send(Publish(topic, b"%d" % number))
        message = subscriber.receive(Publish)
        assert (message.topic, message.payload) == (topic, b"%d" % number)
    subscriber.close()
    publisher.close()


def delay_bus_link(worker, peer: int, seconds: float) -> None:
    """Stop ``worker`` reading its bus link from ``peer`` for ``seconds``, as a busy worker
    would read it late."""

    def pause() -> None:
        transport = worker.server.worker._inbound_links[peer].transport
        transport.pause_reading()
        worker.loop.call_later(seconds, transport.resume_reading)

    worker.call(pause)
