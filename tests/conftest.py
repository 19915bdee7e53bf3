"""Shared fixtures: a broker on a free loopback port, and the suite's time scale.

Timeouts in tests are multiplied by ``IRONSHADOW_TEST_TIMEOUT_SCALE`` (default 1) so that a
slow machine can run the suite without editing tests.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import uvloop

from ironshadow.broker.config import BrokerConfig
from ironshadow.broker.core import Broker

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
        self._thread.start()
        self._ready.wait(scaled(10))
        if self._error is not None:
            raise self._error

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

    def stop(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(scaled(10))


def _server_factory(
    make_server: Callable[[BrokerConfig], Any] | None,
) -> Iterator[Callable[..., BrokerThread]]:
    started: list[BrokerThread] = []

    def factory(**fields: Any) -> BrokerThread:
        fields.setdefault("port", free_port())
        fields.setdefault("sys_interval", 0)
        config = BrokerConfig(**fields)
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


@pytest.fixture
def make_broker() -> Iterator[Callable[..., BrokerThread]]:
    """Return a factory that starts brokers with the given config fields, stopped afterwards."""
    yield from _server_factory(None)


@pytest.fixture
def broker(make_broker: Callable[..., BrokerThread]) -> BrokerThread:
    return make_broker()


@pytest.fixture
def make_engine() -> Iterator[Callable[..., BrokerThread]]:
    """Return a factory that starts engines (broker and shadow service) on free ports.

    The returned thread's ``server`` is the :class:`~ironshadow.engine.Engine`.
    """
    from ironshadow.engine import Engine

    yield from _server_factory(Engine)


@pytest.fixture
def engine(make_engine: Callable[..., BrokerThread]) -> BrokerThread:
    return make_engine()
