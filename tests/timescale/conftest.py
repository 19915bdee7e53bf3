"""Fixtures for the TimescaleDB tier: PGlite with TimescaleDB on a free loopback port.

The tier runs only when ``IRONSHADOW_TIMESCALE=1`` is set, and needs Node.js 20 or newer and
``npm ci`` in tools/pglite. Every check runs on the store's one pooled connection or after the
store is closed, because the server serves one client at a time.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import pytest

from .pglite_server import PGliteServer

TIER_DIR = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip every test of this folder unless IRONSHADOW_TIMESCALE=1 requests the tier."""
    if os.environ.get("IRONSHADOW_TIMESCALE") == "1":
        return
    skip = pytest.mark.skip(
        reason="the TimescaleDB tier runs only with IRONSHADOW_TIMESCALE=1 (docs/storage.md)"
    )
    for item in items:
        if item.path.is_relative_to(TIER_DIR):
            item.add_marker(skip)


@pytest.fixture
def make_pglite_server() -> Iterator[Callable[[], PGliteServer]]:
    """Return a factory of fresh PGlite servers, each stopped by its PID after the test."""
    started: list[PGliteServer] = []

    def factory() -> PGliteServer:
        server = PGliteServer.start()
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def shared_pglite_server() -> Iterator[PGliteServer]:
    server = PGliteServer.start()
    yield server
    server.stop()


@pytest.fixture
def pglite(shared_pglite_server: PGliteServer) -> PGliteServer:
    """Return the module's server with the store's tables dropped.

    The timescaledb extension stays installed: TimescaleDB cannot be created again in the
    backend session that loaded it, and PGlite has only that one session.
    """

    async def drop_tables() -> None:
        connection = await asyncpg.connect(shared_pglite_server.dsn, statement_cache_size=0)
        try:
            # TimescaleDB drops one hypertable per statement, together with its chunks and jobs.
            await connection.execute("DROP TABLE IF EXISTS shadow_updates CASCADE")
            await connection.execute("DROP TABLE IF EXISTS shadow_values CASCADE")
        finally:
            await connection.close()

    asyncio.run(drop_tables())
    return shared_pglite_server
