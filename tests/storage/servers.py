"""Private redis-server and PostgreSQL instances for the storage tests.

Each server runs as a child process on a free loopback port with its data in a temporary
directory, so test runs are hermetic and can run side by side. A server is stopped by its PID
and its directory removed. When the binaries are not installed, the fixture that needs them
skips with the package to install.

PostgreSQL refuses to run as root, so under root the cluster belongs to the ``postgres``
operating system user and its processes run as that user.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

# Seconds a server may take to accept connections after it was started.
START_TIMEOUT_SECONDS = 30.0 * float(os.environ.get("IRONSHADOW_TEST_TIMEOUT_SCALE", "1"))

# Seconds to wait after SIGTERM or SIGINT before the server is killed.
STOP_TIMEOUT_SECONDS = 10.0

# Starts to try when another process takes the chosen port between probe and bind.
START_ATTEMPTS = 3


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop_process(process: subprocess.Popen[bytes], stop_signal: int) -> None:
    if process.poll() is None:
        os.kill(process.pid, stop_signal)
        try:
            process.wait(STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()


def _read_log(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-4000:]
    except OSError:
        return "(no log)"


@dataclass
class RedisServer:
    """A redis-server listening on 127.0.0.1.

    Persistence is off unless the server is started ``durable``: then every write is in the
    append-only file, fsynced before Redis replies (``appendfsync always``), and a server
    killed with kill() and started again with restart() still has every acknowledged write.
    """

    port: int
    directory: Path
    process: subprocess.Popen[bytes]
    durable: bool = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @classmethod
    def start(cls, durable: bool = False) -> RedisServer:
        if shutil.which("redis-server") is None:
            pytest.skip("redis-server is not installed (Debian package redis-server)")
        directory = Path(tempfile.mkdtemp(prefix="ironshadow-redis-"))
        for _ in range(START_ATTEMPTS):
            port = free_port()
            process = _spawn_redis(port, directory, durable)
            if _wait_for_redis(port, process):
                return cls(port, directory, process, durable)
            _stop_process(process, signal.SIGTERM)
        log = _read_log(directory / "redis.log")
        shutil.rmtree(directory, ignore_errors=True)
        raise RuntimeError(f"redis-server did not start; its log ends with:\n{log}")

    def kill(self) -> None:
        """Kill the server with SIGKILL, as a crash would, and keep its directory."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def restart(self) -> None:
        """Start the server again on the same port and directory after kill().

        Raise RuntimeError when it does not accept connections, for example because another
        process took the port in the meantime.
        """
        if self.process.poll() is None:
            raise RuntimeError(f"redis-server {self.process.pid} is still running; kill() it first")
        process = _spawn_redis(self.port, self.directory, self.durable)
        if not _wait_for_redis(self.port, process):
            _stop_process(process, signal.SIGTERM)
            log = _read_log(self.directory / "redis.log")
            raise RuntimeError(f"redis-server did not restart; its log ends with:\n{log}")
        self.process = process

    def stop(self) -> None:
        _stop_process(self.process, signal.SIGTERM)
        shutil.rmtree(self.directory, ignore_errors=True)


def _spawn_redis(port: int, directory: Path, durable: bool) -> subprocess.Popen[bytes]:
    binary = shutil.which("redis-server")
    assert binary is not None, "redis-server is no longer on PATH"
    if durable:
        persistence = ["--appendonly", "yes", "--appendfsync", "always"]
    else:
        persistence = ["--appendonly", "no"]
    command = [
        binary,
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--save", "",
        *persistence,
        "--dir", str(directory),
        "--logfile", str(directory / "redis.log"),
    ]  # fmt: skip
    return subprocess.Popen(command, stdin=subprocess.DEVNULL)


def _wait_for_redis(port: int, process: subprocess.Popen[bytes]) -> bool:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return True
        except OSError:
            pass
        time.sleep(0.02)
    return False


def find_postgres_bindir() -> Path | None:
    """Return the directory with initdb and postgres, newest installed version first."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda path: int(Path(path).parent.name) if Path(path).parent.name.isdigit() else 0,
        reverse=True,
    )
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        result = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        if result.returncode == 0:
            candidates.append(result.stdout.strip())
    initdb = shutil.which("initdb")
    if initdb is not None:
        candidates.append(str(Path(initdb).parent))
    for candidate in candidates:
        path = Path(candidate)
        if (path / "initdb").is_file() and (path / "postgres").is_file():
            return path
    return None


@dataclass
class PostgresServer:
    """A throwaway PostgreSQL cluster with trust authentication for the user ``postgres``."""

    port: int
    directory: Path
    bindir: Path
    process: subprocess.Popen[bytes]
    databases: list[str] = field(default_factory=list)

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    @classmethod
    def start(cls) -> PostgresServer:
        bindir = find_postgres_bindir()
        if bindir is None:
            pytest.skip("PostgreSQL is not installed (Debian package postgresql)")
        user = _postgres_os_user()
        # Under root, TMPDIR may point into a directory that the postgres user cannot enter.
        parent = "/tmp" if user is not None and os.path.isdir("/tmp") else None
        directory = Path(tempfile.mkdtemp(prefix="ironshadow-postgres-", dir=parent))
        data = directory / "data"
        log = directory / "postgres.log"
        if user is not None:
            os.chown(directory, user.pw_uid, user.pw_gid)
        as_user = _run_as(user)

        initdb = subprocess.run(
            [
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            **as_user,
        )
        if initdb.returncode != 0:
            shutil.rmtree(directory, ignore_errors=True)
            raise RuntimeError(f"initdb failed with status {initdb.returncode}:\n{initdb.stderr}")

        for _ in range(START_ATTEMPTS):
            port = free_port()
            process = _spawn_postgres(bindir, directory, port, as_user)
            if _wait_for_postgres(bindir, port, process):
                return cls(port, directory, bindir, process)
            # SIGINT is PostgreSQL's fast shutdown.
            _stop_process(process, signal.SIGINT)
        shutil.rmtree(directory, ignore_errors=True)
        raise RuntimeError(f"PostgreSQL did not start; its log ends with:\n{_read_log(log)}")

    def shut_down_fast(self) -> None:
        """Stop the server with a fast shutdown (SIGINT) and keep its data directory.

        PostgreSQL rolls back the open transactions and closes every client connection.
        """
        _stop_process(self.process, signal.SIGINT)

    def restart(self) -> None:
        """Start the server again on the same port and data directory after shut_down_fast().

        Raise RuntimeError when it does not accept connections, for example because another
        process took the port in the meantime.
        """
        if self.process.poll() is None:
            raise RuntimeError(
                f"PostgreSQL {self.process.pid} is still running; call shut_down_fast() first"
            )
        as_user = _run_as(_postgres_os_user())
        process = _spawn_postgres(self.bindir, self.directory, self.port, as_user)
        if not _wait_for_postgres(self.bindir, self.port, process):
            _stop_process(process, signal.SIGINT)
            log = _read_log(self.directory / "postgres.log")
            raise RuntimeError(f"PostgreSQL did not restart; its log ends with:\n{log}")
        self.process = process

    def stop(self) -> None:
        _stop_process(self.process, signal.SIGINT)
        shutil.rmtree(self.directory, ignore_errors=True)


def _spawn_postgres(
    bindir: Path, directory: Path, port: int, as_user: dict[str, object]
) -> subprocess.Popen[bytes]:
    """Start postgres on the cluster in ``directory / "data"``, logging to postgres.log."""
    # Durability is off for speed: the cluster is deleted after the tests. A fast shutdown
    # still writes a checkpoint, so a cluster restarted after shut_down_fast() keeps every
    # committed transaction.
    command = [
        str(bindir / "postgres"),
        "-D", str(directory / "data"),
        "-p", str(port),
        "-k", str(directory),
        "-c", "listen_addresses=127.0.0.1",
        "-c", "fsync=off",
        "-c", "synchronous_commit=off",
        "-c", "full_page_writes=off",
    ]  # fmt: skip
    with open(directory / "postgres.log", "ab") as log_file:
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            **as_user,
        )


def _postgres_os_user() -> pwd.struct_passwd | None:
    """Return the user to run PostgreSQL as, or None to run it as the current user."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root and there is no postgres user to run PostgreSQL as")


def _run_as(user: pwd.struct_passwd | None) -> dict[str, object]:
    if user is None:
        return {}
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": [], "cwd": "/"}


def _wait_for_postgres(bindir: Path, port: int, process: subprocess.Popen[bytes]) -> bool:
    pg_isready = bindir / "pg_isready"
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        result = subprocess.run(
            [str(pg_isready), "-q", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres"],
            stdin=subprocess.DEVNULL,
        )
        if result.returncode == 0:
            return True
        time.sleep(0.05)
    return False


# redis-server's default number of databases (its `databases` setting). Database 0 is never
# handed out by fresh_redis_url().
REDIS_DATABASES = 16
_redis_databases = itertools.count(1)


def fresh_redis_url(server: RedisServer) -> str:
    """Flush a Redis database (1 to 15 in turn, never 0) for one test and return its URL.

    After database 15 the numbers start again at 1, which is safe because each database is
    flushed before it is handed out.
    """
    number = (next(_redis_databases) - 1) % (REDIS_DATABASES - 1) + 1
    url = f"redis://127.0.0.1:{server.port}/{number}"
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()
    return url
