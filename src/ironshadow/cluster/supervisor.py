"""The supervisor of ``ironshadow serve --workers N``: it binds, starts, restarts and stops.

The supervisor binds the MQTT TCP listening socket once and starts N worker processes that
inherit it, so every worker accepts from the same kernel queue. Each worker runs the same
``ironshadow serve`` command with :data:`~.worker.WORKER_ENVIRONMENT` set. The workers run in
their own session, so a Ctrl-C in a terminal reaches the supervisor only, and the supervisor
stops them in order.

A worker that exits while the supervisor is not stopping is restarted after a backoff that
doubles with each exit in a row, from ``RESTART_DELAY`` to ``MAX_RESTART_DELAY``, and starts
again from ``RESTART_DELAY`` once a worker has run for ``STABLE_SECONDS``. A worker that exits
with status 2, the engine's status for an invalid setting, would fail again the same way, so
the supervisor stops every worker and exits with 2 as well.
"""

from __future__ import annotations

import logging
import math
import os
import resource
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from types import FrameType

from ..broker.core import FILE_DESCRIPTOR_RESERVE
from .heartbeat import SILENT_SECONDS, Heartbeats, create_heartbeats, process_state
from .limits import SharedLimits
from .worker import WORKER_ENVIRONMENT, WorkerSpec

log = logging.getLogger("ironshadow.cluster")

# Seconds before the first restart of a worker that exited, doubled for each exit in a row.
RESTART_DELAY = 0.5
MAX_RESTART_DELAY = 10.0
# Seconds a worker must run before its next exit counts as the first in a row again.
STABLE_SECONDS = 30.0
# Seconds between two checks of the workers' state.
POLL_INTERVAL = 0.1
# Seconds the workers get to stop after SIGTERM before they are killed.
STOP_TIMEOUT = 30.0
# Maximum length in bytes of the temporary folder for the workers' Unix sockets. With the
# supervisor's own folder (28 bytes) and a socket name such as handoff-1023.sock (18 bytes),
# a path stays within the 107 bytes that Linux allows.
MAX_SOCKET_FOLDER_LENGTH = 56
# Exit status with which the engine reports an invalid setting.
SETTINGS_ERROR_STATUS = 2


@dataclass
class _Worker:
    index: int
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    exits_in_a_row: int = 0
    restart_at: float | None = None
    # The time of the last heartbeat before the worker fell silent, while it is silent.
    silent_since: float | None = None


# Share of a worker's connection limit that counts toward the fleet when ``--workers 0``
# picks the worker count. A worker also holds the connections that it accepted for its peers
# until they are handed off, and stops accepting at 90 % of its limit. With 50,000 devices
# connecting at once, 3 workers of 19,744 connections each held all but about 1,000 of them
# and 4 held them all (docs/benchmarks.md, "50,000 devices").
FLEET_SHARE_PER_WORKER = 0.75
# Maximum number of workers that --workers 0 starts for --max-connections: this many per
# CPU core, and at least MIN_AUTO_WORKERS_LIMIT. Each worker is a whole engine (about 65 MB
# when idle), so a huge --max-connections must not start thousands of them.
AUTO_WORKERS_PER_CORE = 4
MIN_AUTO_WORKERS_LIMIT = 8


def auto_workers(max_connections: int) -> int:
    """Return the worker count of ``--workers 0``: one per CPU core that this process may
    run on, or more when ``max_connections`` needs the open-file limits of more processes.

    Each worker raises its soft open-file limit to the hard limit, and keeps
    FILE_DESCRIPTOR_RESERVE descriptors for itself. FLEET_SHARE_PER_WORKER of the rest count
    toward ``max_connections``. Raise ValueError when that would take more than
    AUTO_WORKERS_PER_CORE workers per core (at least MIN_AUTO_WORKERS_LIMIT).
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    if max_connections <= 0:
        return cores
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        return cores
    per_worker = max(1, int((hard - FILE_DESCRIPTOR_RESERVE) * FLEET_SHARE_PER_WORKER))
    needed = math.ceil(max_connections / per_worker)
    maximum = max(AUTO_WORKERS_PER_CORE * cores, MIN_AUTO_WORKERS_LIMIT)
    if needed > maximum:
        raise ValueError(
            f"--max-connections {max_connections} needs {needed} workers of {per_worker} "
            f"connections each (three quarters of the open-file limit {hard}), more than the "
            f"{maximum} that --workers 0 starts on {cores} CPU cores; set --workers, lower "
            "--max-connections, or raise the open-file hard limit"
        )
    return max(cores, needed)


def bind_listener(host: str, port: int, backlog: int) -> socket.socket:
    """Bind and listen on the MQTT TCP port; raise OSError or socket.gaierror as bind does."""
    family, kind, protocol, _name, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, protocol)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class Supervisor:
    """Runs ``command`` as ``workers`` worker processes until SIGINT or SIGTERM."""

    def __init__(
        self,
        command: list[str],
        workers: int,
        listener: socket.socket,
        tls_listener: socket.socket | None = None,
        http_listeners: list[socket.socket] | None = None,
        limits_table: tuple[int, int] | None = None,
    ) -> None:
        self.command = command
        self.listener = listener
        # The MQTT TLS port's socket, which every worker serves too, or None without TLS.
        self.tls_listener = tls_listener
        # The HTTP port's sockets (one per address of the host), served by every worker.
        self.http_listeners = http_listeners or []
        # Descriptor and slot count of the workers' table of connection counts, if any.
        self.limits_table = limits_table
        # This process's view of each worker's counts in that table, made at its first exit.
        self._limit_views: dict[int, SharedLimits] = {}
        self.workers = [_Worker(index) for index in range(workers)]
        self._heartbeat_fd = -1
        self._heartbeats: Heartbeats | None = None
        self.directory = ""
        self._stopping = False
        self.status = 0

    def _request_stop(self, signum: int, _frame: FrameType | None) -> None:
        if not self._stopping:
            log.info("%s received; stopping the workers", signal.Signals(signum).name)
        self._stopping = True

    def run(self) -> int:
        """Start the workers and supervise them; return the exit status for the command."""
        previous = {
            signum: signal.signal(signum, self._request_stop)
            for signum in (signal.SIGINT, signal.SIGTERM)
        }
        # A Unix socket path may have at most 107 bytes on Linux, so a long TMPDIR is skipped.
        parent = None if len(tempfile.gettempdir()) <= MAX_SOCKET_FOLDER_LENGTH else "/tmp"
        self.directory = tempfile.mkdtemp(prefix="ironshadow-workers-", dir=parent)
        self._heartbeat_fd = create_heartbeats(len(self.workers))
        self._heartbeats = Heartbeats(self._heartbeat_fd, len(self.workers))
        try:
            for worker in self.workers:
                self._start(worker)
            while not self._stopping:
                time.sleep(POLL_INTERVAL)
                self._check_workers()
            self._stop_all()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            shutil.rmtree(self.directory, ignore_errors=True)
            self.listener.close()
            if self.tls_listener is not None:
                self.tls_listener.close()
            for sock in self.http_listeners:
                sock.close()
            if self.limits_table is not None:
                os.close(self.limits_table[0])
            self._heartbeats.close()
            os.close(self._heartbeat_fd)
        return self.status

    def _start(self, worker: _Worker, restart: bool = False) -> None:
        """Start ``worker``'s process. A restarted worker waits only for the bus links of
        the peers that run now, not for one in its own restart delay."""
        awaited = None
        if restart:
            awaited = tuple(
                peer.index
                for peer in self.workers
                if peer is not worker and peer.process is not None
            )
        tls_fd = self.tls_listener.fileno() if self.tls_listener is not None else -1
        http_fds = tuple(sock.fileno() for sock in self.http_listeners)
        limits_fd, limits_slots = self.limits_table or (-1, 0)
        spec = WorkerSpec(
            worker.index,
            len(self.workers),
            self.listener.fileno(),
            self.directory,
            os.getpid(),
            tls_fd,
            http_fds,
            limits_fd,
            limits_slots,
            awaited,
            self._heartbeat_fd,
        )
        if self._heartbeats is not None:
            self._heartbeats.clear(worker.index)
        worker.silent_since = None
        environment = {**os.environ, WORKER_ENVIRONMENT: spec.to_environment()}
        inherited = (self.listener.fileno(), *http_fds)
        for fd in (tls_fd, limits_fd, self._heartbeat_fd):
            if fd >= 0:
                inherited += (fd,)
        worker.process = subprocess.Popen(
            self.command,
            env=environment,
            pass_fds=inherited,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        worker.started_at = time.monotonic()
        worker.restart_at = None
        log.info("worker %d launched as pid %d", worker.index, worker.process.pid)

    def _check_workers(self) -> None:
        now = time.monotonic()
        # Every exit is noted before any restart, so that a worker restarted now does not
        # wait for a peer that died since the last check.
        for worker in self.workers:
            process = worker.process
            if process is None:
                continue
            status = process.poll()
            if status is None:
                continue
            worker.process = None
            self._worker_exited(worker, process.pid, status, now)
            if self._stopping:
                return
        for worker in self.workers:
            restart_at = worker.restart_at
            if worker.process is None and restart_at is not None and now >= restart_at:
                self._start(worker, restart=True)
        self._check_heartbeats(now)

    def _check_heartbeats(self, now: float) -> None:
        """Log a serving worker that wrote no heartbeat for SILENT_SECONDS, and log it again
        when it writes one. The supervisor does not restart it: a stopped worker may go on."""
        heartbeats = self._heartbeats
        if heartbeats is None:
            return
        for worker in self.workers:
            process = worker.process
            if process is None:
                continue
            last = heartbeats.last(worker.index)
            if not last:
                continue  # still starting
            if worker.silent_since is None:
                if now - last >= SILENT_SECONDS:
                    worker.silent_since = last
                    log.warning(
                        "worker %d (pid %d) has not run its event loop for %.0f s (process "
                        "state: %s); its clients and the requests for its things get no reply "
                        "until it runs again",
                        worker.index,
                        process.pid,
                        now - last,
                        process_state(process.pid),
                    )
            elif last > worker.silent_since:
                log.info(
                    "worker %d (pid %d) runs again, after about %.1f s without running its "
                    "event loop",
                    worker.index,
                    process.pid,
                    last - worker.silent_since,
                )
                worker.silent_since = None

    def _worker_exited(self, worker: _Worker, pid: int, status: int, now: float) -> None:
        if status == SETTINGS_ERROR_STATUS:
            log.error(
                "worker %d (pid %d) exited with status 2 because of its settings; stopping "
                "every worker",
                worker.index,
                pid,
            )
            self.status = SETTINGS_ERROR_STATUS
            self._stopping = True
            return
        if now - worker.started_at >= STABLE_SECONDS:
            worker.exits_in_a_row = 0
        delay = min(RESTART_DELAY * 2**worker.exits_in_a_row, MAX_RESTART_DELAY)
        worker.exits_in_a_row += 1
        worker.restart_at = now + delay
        self._clear_counts(worker.index)
        if self._heartbeats is not None:
            self._heartbeats.clear(worker.index)  # so that no peer takes it for stopped
        if status < 0:
            cause = f"was killed by {signal.Signals(-status).name}"
        else:
            cause = f"exited with status {status}"
        log.warning(
            "worker %d (pid %d) %s; restarting it in %.1f s", worker.index, pid, cause, delay
        )

    def _clear_counts(self, index: int) -> None:
        """Stop counting the connections of worker ``index``, which died with it."""
        if self.limits_table is None:
            return
        view = self._limit_views.get(index)
        if view is None:
            fd, slots = self.limits_table
            # The limits do not matter here: this view only clears counts.
            view = SharedLimits(
                fd,
                len(self.workers),
                slots,
                index,
                max_connections=0,
                max_per_address=0,
                connect_rate=0.0,
                connect_burst=1,
            )
            self._limit_views[index] = view
        view.clear_counts()

    def _stop_all(self) -> None:
        running = [worker for worker in self.workers if worker.process is not None]
        for worker in running:
            assert worker.process is not None
            worker.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for worker in running:
            process = worker.process
            assert process is not None
            try:
                status = process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error(
                    "worker %d (pid %d) did not stop within %.0f s of SIGTERM; killing it",
                    worker.index,
                    process.pid,
                    STOP_TIMEOUT,
                )
                process.kill()
                status = process.wait()
            # A worker that had not set its signal handlers yet (it was still starting) ends
            # by the SIGTERM itself, before it opened anything.
            if status not in (0, -signal.SIGTERM):
                log.error(
                    "worker %d (pid %d) stopped with status %d", worker.index, process.pid, status
                )
                if not self.status:
                    self.status = 1
        log.info("all %d workers stopped", len(self.workers))
