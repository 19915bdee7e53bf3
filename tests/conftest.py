"""Shared fixtures: a broker on a free loopback port, and the suite's time scale.

Timeouts in tests are multiplied by ``IRONSHADOW_TEST_TIMEOUT_SCALE`` (default 1) so that a
slow machine can run the suite without editing tests.

The broker suite (tests/broker) and the shadow suite over MQTT (the modules in
``CLUSTER_SUITES``) run each test twice: against one engine, and against a cluster of
``CLUSTER_WORKERS`` workers joined as ``ironshadow serve --workers 3`` joins them (one
listening socket, connections handed to their owner, the bus between the workers). The
cluster's workers are threads of the test process rather than processes, so that a test
starts one in milliseconds; the supervisor and the processes have their own tests under
tests/cluster. A test that inspects one engine's internals is marked ``one_process``.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import uvloop

from ironshadow.broker.config import BrokerConfig
from ironshadow.broker.core import Broker
from ironshadow.cluster import ClusterWorker, WorkerSpec, owner_of
from ironshadow.cluster.limits import create_table, needs_table, table_slots
from ironshadow.cluster.supervisor import bind_listener

TIMEOUT_SCALE = float(os.environ.get("IRONSHADOW_TEST_TIMEOUT_SCALE", "1"))


def scaled(seconds: float) -> float:
    return seconds * TIMEOUT_SCALE


# Test clients (paho wrappers and raw sockets) append themselves here. ``make_broker``
# closes them after each test, before it stops the brokers, so that no client thread
# outlives its test and reconnects to a later test's broker on a reused port.
open_clients: list[Any] = []


_ports_given: set[int] = set()


def free_port() -> int:
    """Return a loopback TCP port that is free now and that this process has not returned yet.

    The probe socket is closed before the caller binds, so the kernel may offer the same port
    again; two calls in a row (an MQTT and an HTTP port) must not get the same one.
    """
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _ports_given:
            _ports_given.add(port)
            return port


def name_owned_by(worker: int, workers: int, prefix: str) -> str:
    """Return the first name ``{prefix}-{n}`` that ``worker`` owns among ``workers``: a
    client id handed to that worker, or a thing whose shadow it keeps."""
    number = 0
    while owner_of(f"{prefix}-{number}", workers) != worker:
        number += 1
    return f"{prefix}-{number}"


def logged_worker_pids(log_text: str, worker: int) -> list[int]:
    """Return the PIDs of the processes of ``worker`` that the supervisor's log shows it
    started, oldest first."""
    return [int(pid) for pid in re.findall(rf"worker {worker} launched as pid (\d+)", log_text)]


def kill_worker_repeatedly(read_log: Callable[[], str], worker: int, kills: int) -> float:
    """Kill ``worker`` of ``ironshadow serve --workers N`` ``kills`` times: its running
    process, then each next one as soon as the supervisor logs its start.

    ``read_log`` returns the supervisor's log so far. Each exit in a row doubles the restart
    delay. Returns the delay that the last kill set, as the supervisor logged it.
    """
    deadline = time.monotonic() + scaled(30)
    running = len(logged_worker_pids(read_log(), worker)) - 1
    assert running >= 0, f"worker {worker} has not started"
    pid = 0
    for kill in range(kills):
        while len(starts := logged_worker_pids(read_log(), worker)) <= running + kill:
            assert time.monotonic() < deadline, f"worker {worker} did not start again"
            time.sleep(0.02)
        pid = starts[running + kill]
        os.kill(pid, signal.SIGKILL)
    restarting = re.compile(
        rf"worker {worker} \(pid {pid}\) was killed by SIGKILL; restarting it in ([0-9.]+) s"
    )
    while (found := restarting.search(read_log())) is None:
        assert time.monotonic() < deadline, f"the supervisor did not log the exit of {pid}"
        time.sleep(0.02)
    return float(found.group(1))


class BrokerThread:
    """A broker (or a whole engine) on its own uvloop event loop in a background thread.

    ``server`` is anything with ``start()`` and ``shutdown()`` coroutines and a ``broker``
    attribute, such as an :class:`~ironshadow.engine.Engine`; the default is a bare broker.
    """

    def __init__(self, config: BrokerConfig, server: Any = None) -> None:
        self.config = config
        self.server = server if server is not None else Broker(config)
        self.broker = self.server if isinstance(self.server, Broker) else self.server.broker
        self.loop = uvloop.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="broker", daemon=True)

    @property
    def port(self) -> int:
        return self.config.port

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.server.start())
        except BaseException as exc:  # reported to the test thread by start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self.server.shutdown())
        self.loop.close()

    def start(self) -> None:
        self.launch()
        self.wait_started()

    def launch(self) -> None:
        """Start the thread, and with it the server, without waiting."""
        self._thread.start()

    def wait_started(self) -> None:
        """Wait until the server has started, and raise its error if it failed to."""
        self._ready.wait(scaled(10))
        if self._error is not None:
            raise self._error

    @property
    def engines(self) -> list[BrokerThread]:
        """Return every engine of the server: this one."""
        return [self]

    def settled(self) -> bool:
        """Return True: one engine routes by a subscription as soon as it records it."""
        return True

    def call(self, function: Callable[..., Any], *args: Any) -> Any:
        """Run ``function(*args)`` on the broker's loop and return its result."""
        result: list[Any] = []
        done = threading.Event()

        def run() -> None:
            try:
                result.append(function(*args))
            finally:
                done.set()

        self.loop.call_soon_threadsafe(run)
        if not done.wait(scaled(10)):
            raise TimeoutError("the broker loop did not run the call within 10 s")
        return result[0] if result else None

    def pause_reading(self) -> None:
        """Stop the engine reading from its connections, as a store that falls behind does."""
        self.call(self.broker.pause_reading)

    def resume_reading(self) -> None:
        self.call(self.broker.resume_reading)

    def owner(self, name: str) -> BrokerThread:
        """Return the engine that serves the client id or thing ``name``: this one.

        A test that inspects the engine for a client or a thing calls this, so that it
        runs against a cluster too (see ClusterThreads.owner).
        """
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(scaled(10))


class _WorkerServer:
    """One cluster worker as a BrokerThread server: the engine with its cluster links."""

    def __init__(self, engine: Any, worker: ClusterWorker) -> None:
        self.engine = engine
        self.worker = worker
        self.broker = engine.broker
        self.shadows = engine.shadows

    async def start(self) -> None:
        await self.worker.start()

    async def shutdown(self) -> None:
        await self.worker.stop()
        await self.engine.shutdown()


class ClusterThreads:
    """``workers`` engines joined into one cluster, each on its own BrokerThread.

    Clients connect to ``port`` like to one engine. A test that needs the engine that serves
    a client or a thing gets it from :meth:`owner`.
    """

    def __init__(self, config: BrokerConfig, workers: int) -> None:
        from ironshadow.engine import Engine

        self.config = config
        self.port = config.port
        listener = bind_listener(config.host, config.port, config.listen_backlog)
        # Unix socket paths are limited to 107 bytes, so the folder stays short.
        self.directory = tempfile.mkdtemp(prefix="ironshadow-test-", dir="/tmp")
        self.threads: list[BrokerThread] = []
        # The table of connection counts, as the supervisor creates it.
        self.limits_table = (-1, 0)
        if needs_table(config):
            slots = table_slots(config, workers)
            self.limits_table = (create_table(workers, slots), slots)
        try:
            for index in range(workers):
                engine = Engine(config)
                spec = WorkerSpec(
                    index,
                    workers,
                    os.dup(listener.fileno()),
                    self.directory,
                    os.getppid(),
                    limits_fd=self.limits_table[0],
                    limits_slots=self.limits_table[1],
                )
                worker = ClusterWorker(engine, spec, lambda: None)
                thread = BrokerThread(config, _WorkerServer(engine, worker))
                self.threads.append(thread)
                # Each worker waits for its links to the others before it starts serving,
                # so they all start at once.
                thread.launch()
            for thread in self.threads:
                thread.wait_started()
            self._wait_until_linked()
        except BaseException:
            self.stop()
            raise
        finally:
            listener.close()

    def _wait_until_linked(self) -> None:
        deadline = time.monotonic() + scaled(10)
        peers = len(self.threads) - 1
        for thread in self.threads:
            while thread.call(lambda t=thread: t.server.worker.linked_peers()) < peers:
                if time.monotonic() > deadline:
                    raise TimeoutError("the cluster's bus links did not open within 10 s")
                time.sleep(0.01)

    def owner(self, name: str) -> BrokerThread:
        """Return the worker that owns the client id or thing ``name``.

        A plain TCP client with that id is handed to it at CONNECT.
        """
        return self.threads[owner_of(name, len(self.threads))]

    @property
    def engines(self) -> list[BrokerThread]:
        """Return every worker."""
        return self.threads

    def pause_reading(self) -> None:
        """Stop every worker reading from its connections, as when the store of one falls
        behind: worker 0 reports pressure, and the others pause on its PRESSURE frame.
        Return once all of them are paused."""
        worker = self.threads[0].server.worker
        self.threads[0].call(worker.store_pressure, True)
        self._wait_for_pause(True)

    def resume_reading(self) -> None:
        worker = self.threads[0].server.worker
        self.threads[0].call(worker.store_pressure, False)
        self._wait_for_pause(False)

    def _wait_for_pause(self, paused: bool) -> None:
        deadline = time.monotonic() + scaled(10)
        for thread in self.threads:
            broker = thread.broker
            while thread.call(lambda broker=broker: broker.reading_paused) != paused:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"worker reading_paused did not become {paused} in 10 s")
                time.sleep(0.01)

    def settled(self) -> bool:
        """Return whether no worker is waiting to send a SUBACK, so that every worker
        routes by every subscription made so far."""
        return all(
            thread.call(thread.server.worker.waiting_subacks) == 0 for thread in self.threads
        )

    def stop(self) -> None:
        for thread in self.threads:
            thread.stop()
        shutil.rmtree(self.directory, ignore_errors=True)
        if self.limits_table[0] >= 0:
            os.close(self.limits_table[0])
            self.limits_table = (-1, 0)


def run_cluster(workers: int) -> Iterator[ClusterThreads]:
    """Yield a cluster of ``workers`` in-process workers on a free port, for a fixture to
    yield from. Afterwards, close the test's clients, then stop the cluster."""
    threads = ClusterThreads(BrokerConfig(port=free_port(), sys_interval=0), workers)
    yield threads
    while open_clients:
        open_clients.pop().close()
    threads.stop()


def _server_factory(
    make_server: Callable[[BrokerConfig], Any] | None, workers: int = 1
) -> Iterator[Callable[..., Any]]:
    started: list[Any] = []

    def factory(**fields: Any) -> Any:
        fields.setdefault("port", free_port())
        fields.setdefault("sys_interval", 0)
        config = BrokerConfig(**fields)
        if workers > 1:
            cluster = ClusterThreads(config, workers)
            started.append(cluster)
            return cluster
        server = make_server(config) if make_server is not None else None
        thread = BrokerThread(config, server)
        thread.start()
        started.append(thread)
        return thread

    yield factory
    while open_clients:
        open_clients.pop().close()
    for thread in started:
        thread.stop()


# Test modules that run against one engine and against a cluster, by path under tests/.
CLUSTER_SUITES = (
    "broker/",
    "engine/test_engine_shadow_service.py",
    "engine/test_engine_vectors.py",
    "shadow/test_shadow_delta.py",
    "shadow/test_shadow_vectors.py",
)
CLUSTER_WORKERS = 3
# Marks a test of --connect-rate, of which each worker admits its share.
CONNECT_RATE_SHARE = pytest.mark.one_process("each worker admits its share of the CONNECT rate")
_SERVER_FIXTURES = {"make_broker", "broker", "make_engine", "engine"}
TESTS_FOLDER = os.path.dirname(os.path.abspath(__file__))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if _SERVER_FIXTURES.isdisjoint(metafunc.fixturenames):
        return
    path = os.path.relpath(str(metafunc.definition.path), TESTS_FOLDER)
    if not path.startswith(CLUSTER_SUITES):
        return
    counts = [1]
    if metafunc.definition.get_closest_marker("one_process") is None:
        counts.append(CLUSTER_WORKERS)
    metafunc.parametrize(
        "workers", counts, indirect=True, ids=[f"workers{count}" for count in counts]
    )


@pytest.fixture
def workers(request: pytest.FixtureRequest) -> int:
    """Workers of the engine that the server fixtures start: 1 unless parametrized."""
    return getattr(request, "param", 1)


@pytest.fixture
def make_broker(workers: int) -> Iterator[Callable[..., Any]]:
    """Return a factory that starts brokers with the given config fields, stopped afterwards.

    With more than one worker the factory starts a cluster of engines (a worker is always a
    whole engine).
    """
    yield from _server_factory(None, workers)


@pytest.fixture
def broker(make_broker: Callable[..., BrokerThread]) -> BrokerThread:
    return make_broker()


@pytest.fixture
def make_engine(workers: int) -> Iterator[Callable[..., Any]]:
    """Return a factory that starts engines (broker and shadow service) on free ports.

    The returned thread's ``server`` is the :class:`~ironshadow.engine.Engine`.
    """
    from ironshadow.engine import Engine

    yield from _server_factory(Engine, workers)


@pytest.fixture
def engine(make_engine: Callable[..., BrokerThread]) -> BrokerThread:
    return make_engine()
