"""A worker at its connection limit leaves new connections to the other workers.

Every worker accepts from one shared listening socket, and connections wait there until a
worker accepts them. The cluster runs in this process (``ClusterThreads`` in conftest.py).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from conftest import ClusterThreads, free_port, scaled
from ironshadow.broker.config import BrokerConfig

WORKERS = 2
LIMIT = 3


@pytest.fixture
def cluster() -> Iterator[ClusterThreads]:
    # A long CONNECT timeout: the test's sockets send nothing.
    config = BrokerConfig(port=free_port(), sys_interval=0, connect_timeout=30)
    threads = ClusterThreads(config, WORKERS)
    # The connections one worker may hold, which its open-file limit sets in a real engine.
    # --max-connections limits the whole engine, so it would reject connections first.
    for thread in threads.threads:
        thread.call(lambda thread=thread: setattr(thread.broker, "max_connections", LIMIT))
    yield threads
    threads.stop()


def still_open(sock: socket.socket) -> bool:
    """Return whether the broker has left ``sock`` open: it neither closed nor reset it."""
    sock.setblocking(False)
    try:
        return sock.recv(1) != b""
    except BlockingIOError:
        return True
    except ConnectionError:
        return False


def open_connections(cluster: ClusterThreads) -> int:
    return sum(
        thread.call(lambda thread=thread: len(thread.broker.connections))
        for thread in cluster.threads
    )


def connect_one_by_one(port: int, count: int, cluster: ClusterThreads) -> list[socket.socket]:
    """Open ``count`` more connections, each once the workers hold the one before."""
    opened = open_connections(cluster)
    sockets = []
    for number in range(count):
        sockets.append(socket.create_connection(("127.0.0.1", port)))
        deadline = time.monotonic() + scaled(5)
        while open_connections(cluster) < opened + number + 1:
            assert time.monotonic() < deadline, f"connection {number + 1} was not accepted"
            time.sleep(0.01)
    return sockets


def per_worker(cluster: ClusterThreads) -> list[int]:
    return [
        thread.call(lambda thread=thread: len(thread.broker.connections))
        for thread in cluster.threads
    ]


def test_held_descriptors_count_toward_limit(cluster):
    """Descriptors that a worker holds outside its connections (copies of connections that
    wait to be handed off) count toward the share of its limit at which it stops accepting,
    and it accepts again once they are released."""
    first = cluster.threads[0]
    held = [LIMIT - 1]
    first.call(lambda: setattr(first.broker, "held_descriptors", lambda: held[0]))
    # Worker 0 stops at its first connection, and the second worker at its limit.
    sockets = connect_one_by_one(cluster.port, LIMIT + 1, cluster)
    try:
        # These wait in the listening socket's queue.
        for _ in range(LIMIT - 1):
            sockets.append(socket.create_connection(("127.0.0.1", cluster.port)))
        time.sleep(0.3)
        assert per_worker(cluster) == [1, LIMIT]
        held[0] = 0
        first.call(first.broker.descriptors_released)
        deadline = time.monotonic() + scaled(5)
        while open_connections(cluster) < WORKERS * LIMIT:
            assert time.monotonic() < deadline, "worker 0 did not accept again"
            time.sleep(0.01)
        assert per_worker(cluster) == [LIMIT, LIMIT]
        assert all(still_open(sock) for sock in sockets)
    finally:
        for sock in sockets:
            sock.close()


def test_full_worker_leaves_connections_to_others(cluster):
    sockets = connect_one_by_one(cluster.port, WORKERS * LIMIT, cluster)
    try:
        time.sleep(0.2)
        assert all(still_open(sock) for sock in sockets)
        assert per_worker(cluster) == [LIMIT] * WORKERS
        # A worker below its limit again accepts again.
        sockets.pop().close()
        sockets.append(socket.create_connection(("127.0.0.1", cluster.port)))
        deadline = time.monotonic() + scaled(5)
        while open_connections(cluster) < WORKERS * LIMIT:
            assert time.monotonic() < deadline, "no worker accepted after one closed"
            time.sleep(0.01)
        assert still_open(sockets[-1])
    finally:
        for sock in sockets:
            sock.close()
