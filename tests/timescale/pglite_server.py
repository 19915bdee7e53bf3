"""PGlite with TimescaleDB, served by tools/pglite/server.mjs, as a child process for tests.

The server serves one client at a time, all in PGlite's one backend session, so a store under
test gets one pooled connection with no statement cache (POOL_OPTIONS).
"""

from __future__ import annotations

import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

# servers.py sits beside the storage tests, which import it by module name. Appending its
# folder (not prepending) keeps every other import resolving as before.
_STORAGE_TESTS = str(Path(__file__).resolve().parents[1] / "storage")
if _STORAGE_TESTS not in sys.path:
    sys.path.append(_STORAGE_TESTS)

from servers import START_TIMEOUT_SECONDS, _read_log, _stop_process  # noqa: E402

from ironshadow.storage.postgres import PostgresHistoryStore  # noqa: E402

PGLITE_DIR = Path(__file__).resolve().parents[2] / "tools" / "pglite"


async def reset_connection(connection: asyncpg.Connection) -> None:
    """Reset a pooled connection as asyncpg does, then restore PGlite's search_path.

    PGlite starts its backend with ``search_path=pg_catalog`` on the command line and then sets
    ``public`` for the session, so asyncpg's ``RESET ALL`` would hide the store's tables.
    """
    await connection.execute(connection.get_reset_query())
    await connection.execute("SET search_path TO public")


# One connection, because a second one would wait for the first to disconnect. No cache of
# prepared statements, so that no named statement outlives its query in the shared session.
POOL_OPTIONS: dict[str, Any] = {"max_size": 1, "statement_cache_size": 0, "reset": reset_connection}


@dataclass
class PGliteServer:
    """tools/pglite/server.mjs on a free loopback port, with its stderr in a log file."""

    port: int
    directory: Path
    process: subprocess.Popen[str]

    @property
    def dsn(self) -> str:
        # PGlite opens template1 as the user postgres, whatever the startup message names.
        return f"postgresql://postgres@127.0.0.1:{self.port}/template1?sslmode=disable"

    @classmethod
    def start(cls) -> PGliteServer:
        node = shutil.which("node")
        if node is None:
            pytest.fail("node is not installed: the TimescaleDB tier needs Node.js 20 or newer")
        if not (PGLITE_DIR / "node_modules" / "@unni-craftsman" / "pglite").is_dir():
            pytest.fail(f"PGlite is not installed: run `npm ci` in {PGLITE_DIR}")

        directory = Path(tempfile.mkdtemp(prefix="ironshadow-pglite-"))
        log = directory / "server.log"
        with open(log, "w") as log_file:
            # Port 0: the server binds a port that the kernel picks and prints it.
            process = subprocess.Popen(
                [node, "server.mjs", "--port", "0"],
                cwd=PGLITE_DIR,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log_file,
                text=True,
            )
        port = _read_port(process)
        if port is None:
            _stop_process(process, signal.SIGTERM)
            if process.stdout is not None:
                process.stdout.close()
            message = f"the PGlite server did not start; its log ends with:\n{_read_log(log)}"
            shutil.rmtree(directory, ignore_errors=True)
            pytest.fail(message)
        return cls(port, directory, process)

    def stop(self) -> None:
        _stop_process(self.process, signal.SIGTERM)
        if self.process.stdout is not None:
            self.process.stdout.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    def store(self, **options: Any) -> PostgresHistoryStore:
        return PostgresHistoryStore(self.dsn, pool_options=POOL_OPTIONS, **options)


def _read_port(process: subprocess.Popen[str]) -> int | None:
    """Return the port from the server's "listening on 127.0.0.1:PORT" line, or None."""
    assert process.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while (remaining := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([process.stdout], [], [], remaining)
        if not readable:
            return None
        line = process.stdout.readline()
        if not line:
            return None
        if line.startswith("listening on "):
            return int(line.rsplit(":", 1)[1])
    return None
