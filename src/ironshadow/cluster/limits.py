"""Connection limits that hold for the whole engine when it runs as several workers.

One engine counts its open connections, per source address too, and keeps a CONNECT token
bucket per address, all in its own memory (broker/limits.py). Workers share those figures
through a table in shared memory, so that ``--max-connections``,
``--max-connections-per-address`` and ``--connect-rate-per-address`` limit the engine and not
each worker. The supervisor creates the table (a memfd) when one of them is set, and every
worker maps it. A worker changes the table only while it holds an exclusive flock on its own
open file description of the memfd, so the workers of a test cluster, threads of one
process, exclude each other as processes do. A worker that dies releases the lock with its
descriptors. The supervisor then clears what it had counted, and so does its next process
when it starts.

Layout, for W workers and S slots (S a power of two), each part aligned to 8 bytes:

- ``totals``: int64[W], the connections each worker holds;
- ``used``: int64[1], the slots in use;
- ``keys``: uint64[S], the 64-bit hash of a source address, 0 in a free slot;
- ``counts``: int32[W * S], each worker's open connections from the address of a slot
  (worker ``w``'s count of slot ``s`` is at ``w * S + s``);
- ``tokens`` and ``refilled``: float64[S], the address's CONNECT bucket and when it was last
  filled, in ``time.monotonic()`` seconds (CLOCK_MONOTONIC, shared by every process on the
  machine).

Slots are found by linear probing from the hash. Removing one moves the entries after it
back, so there are no deleted markers. An address keeps its slot while a worker holds a
connection from it or its bucket is not full. When three quarters of the slots are in use,
new addresses are not counted (logged), and their connections are accepted.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import mmap
import os
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from ..broker.core import FILE_DESCRIPTOR_RESERVE

if TYPE_CHECKING:
    from ..broker.config import BrokerConfig

log = logging.getLogger("ironshadow.cluster")

# Minimum and maximum slot counts of a table. The largest takes 8 + 16 + 4 * workers bytes
# per slot: 40 MiB for 4 workers, of which only the pages in use are allocated.
MIN_SLOTS = 4_096
MAX_SLOTS = 1 << 20
# Open files per worker assumed when the open-file limit is unlimited.
MAX_FILES = 1_000_000
# Share of the slots in use beyond which new addresses are not counted.
MAX_LOAD = 0.75
# Seconds between two warnings that the table is full.
FULL_WARNING_INTERVAL = 60.0
# Names of the limits that ``SharedLimits.open`` reports when it rejects a connection.
ENGINE_CONNECTIONS = "max_connections"
ADDRESS_CONNECTIONS = "max_connections_per_address"


def needs_table(config: BrokerConfig) -> bool:
    """Return whether a limit that the workers must share is set."""
    return bool(
        config.max_connections
        or config.max_connections_per_address
        or config.connect_rate_per_address > 0
    )


def table_slots(config: BrokerConfig, workers: int) -> int:
    """Return the slot count of the table for an engine of ``workers``: a power of two, at
    least twice the connections that the engine may hold, so that every source address
    could have a slot, and at most MAX_SLOTS.

    The workers' open-file limits also bound the connections, whatever the value of
    --max-connections, so a huge value does not make a huge table.
    """
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    per_worker = MAX_FILES if hard == resource.RLIM_INFINITY else hard
    connections = workers * max(1, per_worker - FILE_DESCRIPTOR_RESERVE)
    if config.max_connections:
        connections = min(connections, config.max_connections)
    slots = MIN_SLOTS
    while slots < 2 * connections and slots < MAX_SLOTS:
        slots *= 2
    return slots


def table_size(workers: int, slots: int) -> int:
    """Return the bytes of a table for ``workers`` workers and ``slots`` slots."""
    return 8 * workers + 8 + 8 * slots + 4 * workers * slots + 16 * slots


def create_memfd(name: str, size: int) -> int:
    """Create a zeroed memfd of ``size`` bytes and return its descriptor, inheritable by the
    workers."""
    fd = os.memfd_create(name)
    try:
        os.ftruncate(fd, size)
        os.set_inheritable(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def create_table(workers: int, slots: int) -> int:
    """Create a zeroed table in a memfd and return its descriptor, inheritable by workers."""
    return create_memfd("ironshadow-limits", table_size(workers, slots))


def address_key(address: str) -> int:
    """Return the 64-bit key of a source address; never 0, which marks a free slot."""
    digest = hashlib.blake2b(address.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") or 1


class SharedLimits:
    """One worker's view of the table in the memfd ``fd``.

    ``max_connections`` and ``max_per_address`` are the engine's limits (0: none),
    ``connect_rate`` and ``connect_burst`` its CONNECT bucket per address (rate 0: none).
    """

    def __init__(
        self,
        fd: int,
        workers: int,
        slots: int,
        index: int,
        *,
        max_connections: int,
        max_per_address: int,
        connect_rate: float,
        connect_burst: int,
    ) -> None:
        if slots & (slots - 1):
            raise ValueError(f"the slot count must be a power of two, got {slots}")
        self.index = index
        self.slots = slots
        self.max_connections = max_connections
        self.max_per_address = max_per_address
        self.connect_rate = connect_rate
        self.connect_burst = float(connect_burst)
        self._workers = workers
        self._mask = slots - 1
        # A description of our own: flock excludes other descriptions, even in this process.
        self._lock_fd = os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
        self._map = mmap.mmap(fd, table_size(workers, slots))
        view = self._bytes = memoryview(self._map)
        self._totals = view[: 8 * workers].cast("q")
        offset = 8 * workers
        self._used = view[offset : offset + 8].cast("q")
        offset += 8
        self._keys = view[offset : offset + 8 * slots].cast("Q")
        offset += 8 * slots
        self._counts_offset = offset
        self._counts = view[offset : offset + 4 * workers * slots].cast("i")
        offset += 4 * workers * slots
        self._tokens = view[offset : offset + 8 * slots].cast("d")
        offset += 8 * slots
        self._refilled = view[offset : offset + 8 * slots].cast("d")
        # Addresses whose bucket this worker took a token from, until it is full again.
        self._draining: set[str] = set()
        self._full_warned = 0.0

    @contextmanager
    def _locked(self) -> Iterator[None]:
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    # --- connections ------------------------------------------------------------------

    def open(self, address: str, force: bool = False) -> tuple[str, int] | None:
        """Count a connection that this worker accepted from ``address``.

        Return None, or the limit that rejects it (ENGINE_CONNECTIONS or
        ADDRESS_CONNECTIONS) and the count that reached it. A rejected one is not counted.
        With ``force`` it is counted without checking the limits, as a connection that
        takes over a client's session is.
        """
        with self._locked():
            if self.max_connections and not force:
                total = sum(self._totals)
                if total >= self.max_connections:
                    return ENGINE_CONNECTIONS, total
            if self.max_per_address and address:
                slot = self._slot(address, True)
                if slot >= 0:
                    count = self._address_count(slot)
                    if count >= self.max_per_address and not force:
                        return ADDRESS_CONNECTIONS, count
                    self._counts[self.index * self.slots + slot] += 1
            self._totals[self.index] += 1
        return None

    def move(self, address: str, source: int, target: int) -> None:
        """Move a connection from ``address`` from the counts of worker ``source`` to those
        of ``target``, in one step, without checking the limits again.

        A worker moves a connection to its owner before it passes it there, and back if it
        could not pass it. So a connection on its way counts exactly once, and connections
        accepted meanwhile by other workers see the right figures.
        """
        with self._locked():
            if self.max_per_address and address:
                slot = self._slot(address, True)
                if slot >= 0:
                    self._uncount(source, slot)
                    self._counts[target * self.slots + slot] += 1
            self._totals[source] -= 1
            self._totals[target] += 1

    def close_connection(self, address: str) -> None:
        """Remove from the counts a connection that this worker held."""
        self.release(address, self.index)

    def release(self, address: str, worker: int) -> None:
        """Remove from the counts of ``worker`` a connection from ``address``."""
        with self._locked():
            self._totals[worker] -= 1
            if self.max_per_address and address:
                slot = self._slot(address, False)
                if slot >= 0:
                    self._uncount(worker, slot)
                    if self._idle(slot, time.monotonic()):
                        self._remove(slot)

    def connections(self) -> int:
        """Return the connections that the engine's workers hold."""
        return sum(self._totals)

    def connections_from(self, address: str) -> int:
        """Return the connections that the engine's workers hold from ``address``."""
        with self._locked():
            slot = self._slot(address, False)
            return self._address_count(slot) if slot >= 0 else 0

    def addresses(self) -> int:
        """Return how many source addresses have a slot."""
        return self._used[0]

    # --- CONNECT rate -------------------------------------------------------------------

    def take_connect_token(self, address: str) -> bool:
        """Take a token from the bucket of ``address``; return False if it has none."""
        with self._locked():
            slot = self._slot(address, True)
            if slot < 0:
                return True
            now = time.monotonic()
            tokens = self._tokens[slot] + (now - self._refilled[slot]) * self.connect_rate
            tokens = min(tokens, self.connect_burst)
            self._refilled[slot] = now
            if tokens < 1.0:
                self._tokens[slot] = tokens
                return False
            self._tokens[slot] = tokens - 1.0
        self._draining.add(address)
        return True

    def prune(self) -> bool:
        """Free the slots of the addresses whose bucket this worker drew from and that are
        idle now (full again, and no connection from them). Return whether any bucket that
        this worker drew from is still refilling."""
        with self._locked():
            now = time.monotonic()
            for address in list(self._draining):
                slot = self._slot(address, False)
                if slot < 0:
                    self._draining.discard(address)
                elif self._bucket_full(slot, now):
                    self._draining.discard(address)
                    if self._idle(slot, now):
                        self._remove(slot)
        return bool(self._draining)

    # --- restart ------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget what this worker's previous process counted, since its connections died
        with it, and free the slots that are idle.

        Called when the worker starts, before it accepts a connection.
        """
        self.clear_counts()
        with self._locked():
            now = time.monotonic()
            idle = [
                self._keys[slot]
                for slot in range(self.slots)
                if self._keys[slot] and self._idle(slot, now)
            ]
            for key in idle:
                self._remove(self._find(key))

    def clear_counts(self) -> None:
        """Set this worker's connection counts to zero.

        The supervisor calls it when the worker exits, so that the connections that died
        with it stop counting before its next process starts.
        """
        with self._locked():
            self._totals[self.index] = 0
            start = self._counts_offset + 4 * self.index * self.slots
            end = start + 4 * self.slots
            self._bytes[start:end] = bytes(end - start)

    # --- slots --------------------------------------------------------------------------

    def _slot(self, address: str, create: bool) -> int:
        """Return the slot of ``address``, or -1 when it has none. With ``create``, a new
        address takes a free slot, and -1 means that the table is full."""
        key = address_key(address)
        slot = self._find(key)
        if slot >= 0 or not create:
            return slot
        if self._used[0] >= self.slots * MAX_LOAD:
            self._warn_full()
            return -1
        slot = key & self._mask
        while self._keys[slot]:
            slot = (slot + 1) & self._mask
        self._keys[slot] = key
        self._used[0] += 1
        for worker in range(self._workers):
            self._counts[worker * self.slots + slot] = 0
        self._tokens[slot] = self.connect_burst
        self._refilled[slot] = time.monotonic()
        return slot

    def _find(self, key: int) -> int:
        keys = self._keys
        mask = self._mask
        slot = key & mask
        while True:
            found = keys[slot]
            if found == key:
                return slot
            if not found:
                return -1
            slot = (slot + 1) & mask

    def _remove(self, slot: int) -> None:
        """Free ``slot``, moving back the entries after it that probing would not find."""
        keys = self._keys
        mask = self._mask
        hole = slot
        probe = slot
        while True:
            probe = (probe + 1) & mask
            key = keys[probe]
            if not key:
                break
            home = key & mask
            # The entry at ``probe`` may fill the hole if its home is not between them.
            if (probe - home) & mask >= (probe - hole) & mask:
                self._move(probe, hole)
                hole = probe
        keys[hole] = 0
        self._used[0] -= 1

    def _move(self, source: int, target: int) -> None:
        self._keys[target] = self._keys[source]
        for worker in range(self._workers):
            base = worker * self.slots
            self._counts[base + target] = self._counts[base + source]
        self._tokens[target] = self._tokens[source]
        self._refilled[target] = self._refilled[source]

    def _uncount(self, worker: int, slot: int) -> None:
        # A connection accepted while the table was full has no count to remove.
        position = worker * self.slots + slot
        if self._counts[position] > 0:
            self._counts[position] -= 1

    def _address_count(self, slot: int) -> int:
        return sum(self._counts[worker * self.slots + slot] for worker in range(self._workers))

    def _bucket_full(self, slot: int, now: float) -> bool:
        if self.connect_rate <= 0:
            return True
        refill = (now - self._refilled[slot]) * self.connect_rate
        return self._tokens[slot] + refill >= self.connect_burst

    def _idle(self, slot: int, now: float) -> bool:
        return self._address_count(slot) == 0 and self._bucket_full(slot, now)

    def _warn_full(self) -> None:
        now = time.monotonic()
        if now - self._full_warned < FULL_WARNING_INTERVAL:
            return
        self._full_warned = now
        log.warning(
            "worker %d: the table of source addresses holds %d of its %d slots; connections "
            "from new addresses are accepted without counting them toward "
            "--max-connections-per-address or --connect-rate-per-address",
            self.index,
            self._used[0],
            self.slots,
        )
