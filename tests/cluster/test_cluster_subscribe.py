"""Subscriptions on one worker and publishes on another: timing and shared groups.

The cluster runs in this process (``ClusterThreads`` in conftest.py), with the same bus and
hand-off code as ``ironshadow serve --workers 3``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from conftest import ClusterThreads, name_owned_by, run_cluster
from ironshadow.mqtt import MQTT_5, Publish, Suback, Subscribe, Subscription
from mqtt_client import TestClient
from raw_client import RawClient

WORKERS = 3
ROUNDS = 50
LINK_DELAY_S = 0.2


def client_of(worker: int, prefix: str) -> str:
    return name_owned_by(worker, WORKERS, prefix)


@pytest.fixture
def cluster() -> Iterator[ClusterThreads]:
    yield from run_cluster(WORKERS)


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


def test_shared_group_gets_each_message_once(cluster):
    """Each message reaches exactly one member of a group, with members and publishers on
    every worker (two members on worker 2). A plain subscriber to the same filter on every
    worker makes the messages travel as PUBLISH copies as well, and gets them all."""
    members = [
        TestClient(cluster.port, client_of(worker, f"member{index}"))
        for index, worker in enumerate((0, 1, 2, 2))
    ]
    for member in members:
        member.subscribe("$share/line/jobs/+", 1)
    watchers = [TestClient(cluster.port, client_of(worker, "watcher")) for worker in range(3)]
    for watcher in watchers:
        watcher.subscribe("jobs/+", 1)
    publishers = [TestClient(cluster.port, client_of(worker, "planner")) for worker in range(3)]
    sent = []
    for number in range(60):
        payload = b"%02d" % number
        publishers[number % 3].publish("jobs/new", payload, 1)
        sent.append(payload)
    received = [member.payloads_until_quiet() for member in members]
    everything = sorted(payload for payloads in received for payload in payloads)
    assert everything == sent
    assert all(received), [len(payloads) for payloads in received]
    for watcher in watchers:
        assert sorted(watcher.payloads_until_quiet()) == sent


def test_unsubscribed_member_gets_no_more(cluster):
    stays = TestClient(cluster.port, client_of(0, "stays"))
    leaves = TestClient(cluster.port, client_of(1, "leaves"))
    for member in (stays, leaves):
        member.subscribe("$share/line/jobs/+", 1)
    leaves.unsubscribe("$share/line/jobs/+")
    publisher = TestClient(cluster.port, client_of(2, "planner"))
    for number in range(10):
        publisher.publish("jobs/new", b"%d" % number, 1)
    assert len(stays.payloads_until_quiet()) == 10
    assert leaves.payloads_until_quiet() == []


def test_subacks_keep_subscribe_order(cluster):
    """A SUBACK for a filter that the peers already have waits behind the SUBACK that waits
    for the peers, so the client gets them in the order of its SUBSCRIBEs."""
    other = RawClient(cluster.port, MQTT_5)
    other.connect(client_of(0, "early"))
    other.subscribe("known/topic", 0)
    client = RawClient(cluster.port, MQTT_5)
    client.connect(client_of(0, "ordered"))
    client.send(
        Subscribe(1, [Subscription("new/topic", 0)]),
        Subscribe(2, [Subscription("known/topic", 0)]),
    )
    assert client.receive(Suback).packet_id == 1
    assert client.receive(Suback).packet_id == 2
    other.close()
    client.close()
