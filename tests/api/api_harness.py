"""An engine with its REST API on a background uvloop thread, and an HTTP client for it.

Both listen on free loopback ports (the API binds port 0). The HTTP client ignores proxy
settings from the environment, so every request goes straight to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import uvloop

from conftest import free_port, open_clients, scaled
from ironshadow.api import ApiServer, create_app
from ironshadow.api.feed import FeedConfig
from ironshadow.broker.config import BrokerConfig
from ironshadow.engine import Engine, StorageConfig

HOST = "127.0.0.1"


class EngineApiThread:
    """An Engine and an ApiServer on their own event loop in a background thread."""

    def __init__(
        self,
        max_body_bytes: int | None = None,
        storage: StorageConfig | None = None,
        feed: FeedConfig | None = None,
        **broker_fields: Any,
    ) -> None:
        broker_fields.setdefault("host", HOST)
        broker_fields.setdefault("port", free_port())
        broker_fields.setdefault("sys_interval", 0)
        self.engine = Engine(BrokerConfig(**broker_fields), None, storage)
        app = create_app(self.engine, max_body_bytes=max_body_bytes, feed_config=feed)
        self.api = ApiServer(self.engine, HOST, 0, app=app)
        self.loop = uvloop.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="engine-api", daemon=True)

    @property
    def mqtt_port(self) -> int:
        return self.engine.broker.config.port

    @property
    def http_port(self) -> int:
        return self.api.ports[0]

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.engine.start())
            self.loop.run_until_complete(self.api.start())
        except BaseException as exc:  # reported to the test thread by start()
            self._error = exc
            self._ready.set()
            self.loop.run_until_complete(self.engine.shutdown())
            self.loop.close()
            return
        self._ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self.api.stop())
        self.loop.run_until_complete(self.engine.shutdown())
        self.loop.close()

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(scaled(10)):
            raise TimeoutError("the engine and its API did not start within 10 s")
        if self._error is not None:
            raise self._error

    def call(self, function: Callable[..., Any], *args: Any) -> Any:
        """Run ``function(*args)`` on the engine's loop and return its result."""
        future = asyncio.run_coroutine_threadsafe(_call_async(function, *args), self.loop)
        return future.result(scaled(10))

    def stop(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(scaled(10))


async def _call_async(function: Callable[..., Any], *args: Any) -> Any:
    return function(*args)


@contextlib.contextmanager
def running_engine(
    max_body_bytes: int | None = None,
    storage: StorageConfig | None = None,
    feed: FeedConfig | None = None,
    **broker_fields: Any,
) -> Iterator[EngineApiThread]:
    """Start an engine with its API, and stop it with every MQTT test client afterwards.

    Without ``storage`` the engine keeps shadows in memory only.
    """
    thread = EngineApiThread(max_body_bytes, storage, feed, **broker_fields)
    thread.start()
    try:
        yield thread
    finally:
        while open_clients:
            open_clients.pop().close()
        thread.stop()


@contextlib.contextmanager
def http_client(thread: EngineApiThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=thread.base_url, timeout=scaled(10), trust_env=False) as client:
        yield client
