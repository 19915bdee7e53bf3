"""Heartbeats of the workers, so that the supervisor can log a worker that stops running.

A worker that is stopped (SIGSTOP, a debugger) or stuck in one long task keeps its process,
so the supervisor does not restart it, and its clients get no replies. The supervisor
creates a table in a memfd with one 8-byte slot per worker, and each serving worker writes
the time of ``time.monotonic()`` into its slot from a timer of its event loop, once a second
(``worker.PARENT_CHECK_INTERVAL``). On Linux
that clock (CLOCK_MONOTONIC) is the same in every process, so the supervisor compares the
slot with its own clock. A slot of 0 means that the worker is not serving yet.
"""

from __future__ import annotations

import mmap
import struct
import time

from .limits import create_memfd

# Seconds without a heartbeat after which the supervisor logs that a worker does not run.
SILENT_SECONDS = 5.0

_SLOT = struct.Struct("<d")

# Process states in /proc/PID/stat, as the warning names them.
_PROCESS_STATES = {
    "R": "running",
    "S": "sleeping",
    "D": "waiting for the disk",
    "T": "stopped by a signal",
    "t": "stopped by a debugger",
    "Z": "exited",
}


def create_heartbeats(workers: int) -> int:
    """Create a zeroed table of ``workers`` slots in a memfd and return its descriptor,
    inheritable by the workers."""
    return create_memfd("ironshadow-heartbeats", _SLOT.size * workers)


class Heartbeats:
    """A view of the table in the memfd ``fd``, for ``workers`` workers."""

    def __init__(self, fd: int, workers: int) -> None:
        self.workers = workers
        self._map = mmap.mmap(fd, _SLOT.size * workers)

    def beat(self, index: int) -> None:
        """Record that worker ``index`` runs now."""
        _SLOT.pack_into(self._map, _SLOT.size * index, time.monotonic())

    def last(self, index: int) -> float:
        """Return the time of worker ``index``'s latest heartbeat, or 0.0 before the first."""
        return float(_SLOT.unpack_from(self._map, _SLOT.size * index)[0])

    def clear(self, index: int) -> None:
        """Mark worker ``index`` as not serving yet, before a new process of it starts."""
        _SLOT.pack_into(self._map, _SLOT.size * index, 0.0)

    def close(self) -> None:
        self._map.close()


def process_state(pid: int) -> str:
    """Return the state of process ``pid`` in words, from /proc/PID/stat, or "unknown"."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            text = stat.read()
    except OSError:
        return "unknown"
    # The state follows the command name, which is in parentheses and may contain spaces
    # and parentheses itself.
    fields = text[text.rfind(")") + 1 :].split()
    if not fields:
        return "unknown"
    return _PROCESS_STATES.get(fields[0], fields[0])
