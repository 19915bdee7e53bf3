"""The workers' shared table of connection counts (cluster/limits.py), used directly."""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from ironshadow.broker.config import BrokerConfig
from ironshadow.cluster.limits import (
    ADDRESS_CONNECTIONS,
    ENGINE_CONNECTIONS,
    MAX_SLOTS,
    MIN_SLOTS,
    SharedLimits,
    create_table,
    table_slots,
)

WORKERS = 3


@pytest.fixture
def table_fd() -> Iterator[int]:
    fd = create_table(WORKERS, 16)
    yield fd
    os.close(fd)


def view(fd: int, index: int, slots: int = 16, **limits: float) -> SharedLimits:
    settings = {"max_connections": 0, "max_per_address": 0, "connect_rate": 0.0}
    settings.update(limits)
    return SharedLimits(
        fd,
        WORKERS,
        slots,
        index,
        max_connections=int(settings["max_connections"]),
        max_per_address=int(settings["max_per_address"]),
        connect_rate=settings["connect_rate"],
        connect_burst=int(limits.get("connect_burst", 1)),
    )


def test_counts_follow_a_model_through_collisions(table_fd: int) -> None:
    """Random opens and closes on three workers, with 12 addresses in 16 slots (many share
    a home slot), leave every address with the count a plain dictionary has."""
    views = [view(table_fd, index, max_per_address=1_000) for index in range(WORKERS)]
    addresses = [f"10.0.0.{number}" for number in range(12)]
    held: Counter[tuple[int, str]] = Counter()
    rng = random.Random(7)
    for _ in range(5_000):
        worker = rng.randrange(WORKERS)
        address = rng.choice(addresses)
        if held[worker, address] and rng.random() < 0.5:
            views[worker].close_connection(address)
            held[worker, address] -= 1
        else:
            assert views[worker].open(address) is None
            held[worker, address] += 1
        if rng.random() < 0.01:
            for address in addresses:
                expected = sum(held[index, address] for index in range(WORKERS))
                assert views[0].connections_from(address) == expected, address
    for (worker, address), count in held.items():
        for _ in range(count):
            views[worker].close_connection(address)
    assert all(views[1].connections_from(address) == 0 for address in addresses)
    assert views[2].addresses() == 0
    assert views[0].connections() == 0


def test_limits_refuse_across_workers(table_fd: int) -> None:
    first, second, third = (
        view(table_fd, index, max_connections=3, max_per_address=2) for index in range(WORKERS)
    )
    assert first.open("10.0.0.1") is None
    assert second.open("10.0.0.1") is None
    assert third.open("10.0.0.1") == (ADDRESS_CONNECTIONS, 2)
    assert third.open("10.0.0.2") is None
    assert first.open("10.0.0.3") == (ENGINE_CONNECTIONS, 3)
    # A connection that the second worker passes to the third moves between their counts
    # in one step, and is not checked again.
    second.move("10.0.0.1", second.index, third.index)
    assert first.connections_from("10.0.0.1") == 2
    assert first.connections() == 3
    assert first.open("10.0.0.1") == (ENGINE_CONNECTIONS, 3)
    third.close_connection("10.0.0.1")
    assert first.connections_from("10.0.0.1") == 1
    assert first.connections() == 2


def test_restarted_worker_clears_its_counts(table_fd: int) -> None:
    first = view(table_fd, 0, max_connections=4, max_per_address=2)
    dead = view(table_fd, 1, max_connections=4, max_per_address=2)
    assert first.open("10.0.0.1") is None
    assert dead.open("10.0.0.1") is None
    assert dead.open("10.0.0.2") is None
    restarted = view(table_fd, 1, max_connections=4, max_per_address=2)
    restarted.reset()
    assert first.connections() == 1
    assert first.connections_from("10.0.0.1") == 1
    assert first.addresses() == 1


def test_buckets_are_shared_and_forgotten_when_full(table_fd: int) -> None:
    first, second = (view(table_fd, index, connect_rate=20.0, connect_burst=2) for index in (0, 1))
    assert first.take_connect_token("10.0.0.1")
    assert second.take_connect_token("10.0.0.1")
    assert not first.take_connect_token("10.0.0.1")
    assert first.addresses() == 1
    time.sleep(0.15)
    assert not second.prune()
    assert first.addresses() == 0


def test_full_table_accepts_new_addresses_uncounted(table_fd: int) -> None:
    table = view(table_fd, 0, max_per_address=1)
    for number in range(12):
        assert table.open(f"10.0.0.{number}") is None
    assert table.addresses() == 12
    # Three quarters of the 16 slots are in use: a new address is not counted.
    assert table.open("10.0.1.1") is None
    assert table.open("10.0.1.1") is None
    assert table.connections_from("10.0.1.1") == 0
    assert table.open("10.0.0.3") == (ADDRESS_CONNECTIONS, 1)


def test_table_size_follows_the_limit() -> None:
    assert table_slots(BrokerConfig(max_connections=10), 3) == MIN_SLOTS
    assert table_slots(BrokerConfig(max_connections=5_000), 3) == 16_384
    # The open-file limits bound the connections, whatever the value of --max-connections.
    assert table_slots(BrokerConfig(max_connections=100_000_000), 3) <= MAX_SLOTS
