"""Users, engines and clients for the authentication tests.

``add_user`` and ``remove_user`` run the real ``ironshadow auth`` command with the password on
standard input. ``serving`` runs ``ironshadow serve`` as a subprocess on free loopback ports,
with the engine harness's process handling. ``AuthEngine`` is an in-process engine (the
``make_engine`` fixture) with the same access policy that ``serve`` installs, so that a test
can read its counters.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from engine_harness import EngineProcess, wait_for_listener

from conftest import BrokerThread, free_port, scaled
from ironshadow.auth import AuthPolicy, AuthSettings
from mqtt_client import V5, TestClient

IRONSHADOW = [sys.executable, "-m", "ironshadow"]


def run_auth(*arguments: str, password: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``ironshadow auth ARGUMENTS`` with ``password`` on standard input."""
    return subprocess.run(
        [*IRONSHADOW, "auth", *arguments],
        input=password if password is not None else "",
        capture_output=True,
        text=True,
        timeout=scaled(60),
    )


def add_user(data_dir: Path, name: str, role: str, password: str) -> None:
    result = run_auth("add", name, "--role", role, "--data-dir", str(data_dir),
                      password=password + "\n")
    assert result.returncode == 0, result.stderr


def remove_user(data_dir: Path, name: str) -> None:
    result = run_auth("remove", name, "--data-dir", str(data_dir))
    assert result.returncode == 0, result.stderr


@contextlib.contextmanager
def serving(data_dir: Path, *arguments: str) -> Iterator[EngineProcess]:
    """Run ``ironshadow serve`` in memory-only mode on ``data_dir`` until the block ends."""
    mqtt_port = free_port()
    http_port = free_port()
    command = [
        *IRONSHADOW, "serve", "--memory-only", "true",
        "--host", "127.0.0.1", "--mqtt-port", str(mqtt_port), "--http-port", str(http_port),
        "--data-dir", str(data_dir), "--sys-interval", "0", *arguments,
    ]  # fmt: skip
    log = data_dir.parent / f"engine-{mqtt_port}.log"
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT
        )
    # No stores: the engine runs in memory only.
    engine = EngineProcess(process, mqtt_port, http_port, "", "", "", log)
    try:
        wait_for_listener(engine)
        yield engine
    finally:
        engine.stop()


def worker_count(engine: EngineProcess) -> int:
    """Return how many engine processes serve: the supervisor logs the count it starts."""
    match = re.search(r"starting (\d+) workers", engine.log_text())
    return int(match.group(1)) if match else 1


def wait_for_log(engine: EngineProcess, text: str, count: int = 1, timeout: float = 10) -> None:
    """Wait until ``text`` occurs ``count`` times in the engine's log."""
    deadline = time.monotonic() + scaled(timeout)
    while engine.log_text().count(text) < count:
        assert engine.process.poll() is None, f"the engine exited:\n{engine.log_text()}"
        assert time.monotonic() < deadline, f"{text!r} not logged in {timeout} s:\n" + (
            engine.log_text()
        )
        time.sleep(0.05)


class AuthEngine:
    """An in-process engine whose broker uses an ``AuthPolicy`` on ``data_dir``."""

    def __init__(
        self,
        make_engine: Callable[..., BrokerThread],
        settings: AuthSettings,
        broker_fields: dict[str, Any] | None = None,
    ) -> None:
        self.policy = AuthPolicy(settings)
        self.thread = make_engine(**(broker_fields or {}))
        self.thread.call(self.policy.attach, self.thread.broker)

    @property
    def port(self) -> int:
        return self.thread.port

    def call(self, function: Callable[..., Any], *args: Any) -> Any:
        return self.thread.call(function, *args)

    def verifications(self) -> int:
        return self.call(lambda: self.policy.credentials.verifications)

    def close(self) -> None:
        self.thread.call(self.policy.close)


def paho_client(
    port: int,
    client_id: str,
    username: str | None,
    password: str | None,
    protocol: int = V5,
    wait: bool = True,
    **options: Any,
) -> TestClient:
    """Return a paho-mqtt TestClient that sent CONNECT with these credentials."""
    client = TestClient(port, client_id, protocol=protocol, connect=False, **options)
    if username is not None:
        client.client.username_pw_set(username, password)
    client.connect(wait=wait)
    return client
