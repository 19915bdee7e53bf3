"""ApiServer's lifecycle on the caller's event loop: bind errors, signals, stop and logging.

These tests run the event loop on the test's own (main) thread, as the CLI does, so that
a signal handler installed by uvicorn would show.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import socket
import time
from collections.abc import Awaitable, Callable

import httpx
import pytest
import uvloop

from conftest import free_port, scaled
from ironshadow.api import ApiServer
from ironshadow.broker.config import BrokerConfig
from ironshadow.engine import Engine

HOST = "127.0.0.1"


def new_engine() -> Engine:
    return Engine(BrokerConfig(host=HOST, port=free_port(), sys_interval=0), None)


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    uvloop.run(asyncio.wait_for(scenario(), scaled(20)))


def connection_refused(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((HOST, port)) == errno.ECONNREFUSED


def test_busy_port_raises_oserror() -> None:
    with socket.socket() as blocker:
        blocker.bind((HOST, 0))
        blocker.listen()
        port = blocker.getsockname()[1]

        async def scenario() -> None:
            api = ApiServer(new_engine(), HOST, port)
            with pytest.raises(OSError) as raised:
                await api.start()
            assert raised.value.errno == errno.EADDRINUSE
            assert f"{HOST}:{port}" in str(raised.value)
            assert api.ports == []

        run(scenario)


def test_start_leaves_signal_handlers() -> None:
    signals = (signal.SIGINT, signal.SIGTERM)

    async def scenario() -> None:
        engine = new_engine()
        await engine.start()
        # asyncio.Runner has installed its own SIGINT handler by now.
        before = {signum: signal.getsignal(signum) for signum in signals}
        api = ApiServer(engine, HOST, 0)
        await api.start()
        async with httpx.AsyncClient(trust_env=False) as client:
            response = await client.get(f"http://{HOST}:{api.ports[0]}/things")
        during = {signum: signal.getsignal(signum) for signum in signals}
        await api.stop()
        after = {signum: signal.getsignal(signum) for signum in signals}
        await engine.shutdown()

        assert response.status_code == 200
        assert during == before
        assert after == before

    run(scenario)


def test_stop_closes_port() -> None:
    async def scenario() -> None:
        api = ApiServer(new_engine(), HOST, 0)
        await api.start()
        port = api.ports[0]
        assert not connection_refused(port)

        await api.stop()

        assert connection_refused(port)
        assert api.ports == []
        await api.stop()  # a second stop does nothing

    run(scenario)


def test_restart_on_same_port() -> None:
    async def scenario() -> None:
        engine = new_engine()
        first = ApiServer(engine, HOST, 0)
        await first.start()
        port = first.ports[0]
        await first.stop()

        second = ApiServer(engine, HOST, port)
        await second.start()
        assert second.ports == [port]
        await second.stop()

    run(scenario)


def test_stop_with_open_keep_alive_connection() -> None:
    async def scenario() -> None:
        engine = new_engine()
        await engine.start()
        api = ApiServer(engine, HOST, 0)
        await api.start()
        async with httpx.AsyncClient(trust_env=False) as client:
            response = await client.get(f"http://{HOST}:{api.ports[0]}/things")
            assert response.status_code == 200

            started = time.monotonic()
            await api.stop()
            elapsed = time.monotonic() - started

        await engine.shutdown()
        assert elapsed < scaled(2)

    run(scenario)


def test_start_twice_is_an_error() -> None:
    async def scenario() -> None:
        api = ApiServer(new_engine(), HOST, 0)
        await api.start()
        try:
            with pytest.raises(RuntimeError, match="already running"):
                await api.start()
        finally:
            await api.stop()

    run(scenario)


def test_localhost_binds_one_port() -> None:
    async def scenario() -> None:
        api = ApiServer(new_engine(), "localhost", 0)
        await api.start()
        try:
            ports = api.ports
            assert ports
            assert len(set(ports)) == 1
        finally:
            await api.stop()

    run(scenario)


def ipv6_loopback_available() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not ipv6_loopback_available(), reason="no IPv6 loopback on this machine")
def test_ipv6_loopback() -> None:
    async def scenario() -> None:
        engine = new_engine()
        await engine.start()
        api = ApiServer(engine, "::1", 0)
        await api.start()
        try:
            async with httpx.AsyncClient(trust_env=False) as client:
                response = await client.get(f"http://[::1]:{api.ports[0]}/things")
            assert response.status_code == 200
        finally:
            await api.stop()
            await engine.shutdown()

    run(scenario)


def test_logs_start_and_stop_not_requests(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)

    async def scenario() -> None:
        engine = new_engine()
        await engine.start()
        api = ApiServer(engine, HOST, 0)
        await api.start()
        async with httpx.AsyncClient(trust_env=False) as client:
            for _ in range(5):
                await client.get(f"http://{HOST}:{api.ports[0]}/things")
        await api.stop()
        await engine.shutdown()

    run(scenario)

    api_messages = [
        record.getMessage() for record in caplog.records if record.name == "ironshadow.api"
    ]
    assert len(api_messages) == 2
    assert api_messages[0].startswith("REST API listening on http://127.0.0.1:")
    assert api_messages[1] == "REST API stopped"
    assert not [record for record in caplog.records if record.name == "uvicorn.access"]


def test_unexpected_error_is_500_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="ironshadow.api")

    def broken_request(*args: object) -> None:
        raise RuntimeError("store exploded")

    async def scenario() -> None:
        engine = new_engine()
        await engine.start()
        engine.shadows.http_request = broken_request  # type: ignore[method-assign]
        api = ApiServer(engine, HOST, 0)
        await api.start()
        async with httpx.AsyncClient(trust_env=False) as client:
            response = await client.get(f"http://{HOST}:{api.ports[0]}/things/t/shadow")
        await api.stop()
        await engine.shutdown()

        assert response.status_code == 500
        assert response.headers["content-type"] == "application/json"
        assert response.json()["message"] == "Internal service failure"

    run(scenario)

    errors = [record for record in caplog.records if record.name == "ironshadow.api"]
    assert len(errors) == 1
    assert "GET /things/t/shadow" in errors[0].getMessage()
    assert errors[0].exc_info is not None
