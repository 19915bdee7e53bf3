"""The supervisor's restarts, with stand-in worker processes that record what they were
given and sleep."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from conftest import free_port, scaled
from ironshadow.cluster.supervisor import Supervisor, bind_listener
from ironshadow.cluster.worker import WORKER_ENVIRONMENT

# Writes the worker's spec to {folder}/spec-{index}-{pid}.json (renamed into place once
# written), then waits to be killed.
STAND_IN = (
    "import json, os, sys, time\n"
    f"spec = json.loads(os.environ[{WORKER_ENVIRONMENT!r}])\n"
    "path = os.path.join(sys.argv[1], f\"spec-{spec['index']}-{os.getpid()}.json\")\n"
    "with open(path + '.part', 'w') as file:\n"
    "    json.dump(spec, file)\n"
    "os.rename(path + '.part', path)\n"
    "time.sleep(600)\n"
)


def wait_dead(pid: int) -> None:
    """Wait until ``pid`` has exited (a zombie until the supervisor reaps it)."""
    deadline = time.monotonic() + scaled(10)
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as stat:
            if stat.read().rsplit(")", 1)[1].split()[0] == "Z":
                return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} did not exit")


def test_restart_skips_just_dead_peer(tmp_path: Path) -> None:
    listener = bind_listener("127.0.0.1", free_port(), 16)
    supervisor = Supervisor([sys.executable, "-c", STAND_IN, str(tmp_path)], 3, listener)
    supervisor.directory = str(tmp_path)
    try:
        for worker in supervisor.workers:
            supervisor._start(worker)
        first, second = supervisor.workers[0], supervisor.workers[1]
        assert first.process is not None and second.process is not None
        os.kill(first.process.pid, signal.SIGKILL)
        wait_dead(first.process.pid)
        supervisor._check_workers()
        assert first.restart_at is not None
        # Worker 1 dies while worker 0 waits for its restart, and one check notes both.
        os.kill(second.process.pid, signal.SIGKILL)
        wait_dead(second.process.pid)
        time.sleep(max(0.0, first.restart_at - time.monotonic()))
        supervisor._check_workers()
        assert first.process is not None
        assert second.process is None
        spec_path = tmp_path / f"spec-0-{first.process.pid}.json"
        deadline = time.monotonic() + scaled(10)
        while not spec_path.exists():
            assert time.monotonic() < deadline, "the restarted worker wrote no spec"
            time.sleep(0.01)
        assert json.loads(spec_path.read_text())["awaited_peers"] == [2]
    finally:
        for worker in supervisor.workers:
            if worker.process is not None:
                worker.process.kill()
                worker.process.wait()
        listener.close()
