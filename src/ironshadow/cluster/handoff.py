"""Passing a plain TCP connection to the worker that owns its client id.

Every worker accepts from the same listening socket, so a device lands on any of them. The
worker that reads its CONNECT sends the socket's file descriptor (SCM_RIGHTS) and every byte
read from it so far to the owner over ``handoff-{index}.sock``, then closes its own copy of
the descriptor without writing anything. The owner wraps the socket in a transport, feeds it
the saved bytes before anything else, and the client sees one ordinary connection.

Wire format on a hand-off socket: per connection, a 4-byte big-endian length and that many
saved bytes, sent in one ``sendmsg`` call that carries exactly one descriptor. Linux delivers
descriptors with the first bytes of the message that carried them and ends a ``recvmsg`` read
there, so the receiver pairs the n-th complete record with the n-th descriptor.

When the owner's socket buffer is full, as in a reconnect storm, a hand-off waits in a queue
with a duplicate of its descriptor (up to MAX_QUEUED_HANDOFFS) and goes out when the socket is
writable. When the owner's socket is missing or refuses, or the queue is full, the connection
stays where it landed and is served there, with its traffic forwarded over the bus like any
other.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import os
import socket
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..broker.connection import MQTTConnection

if TYPE_CHECKING:
    from ..broker.core import Broker

log = logging.getLogger("ironshadow.cluster")

# Bytes read per recvmsg call on a hand-off socket.
RECEIVE_BYTES = 65_536
# Descriptors that fit in the ancillary buffer of one recvmsg call. The kernel ends a read at
# the first message that carries descriptors, and each message carries one.
RECEIVE_FDS = 16
# recvmsg calls per readiness callback at most. One call returns one hand-off, so reading one
# per callback would let the sender's buffer fill in a reconnect storm.
READS_PER_CALLBACK = 1_024
# Stands in the queue of received descriptors for one that the kernel could not pass.
LOST_SOCKET = -1
# Hand-offs waiting for the peer's socket buffer at most; beyond, connections stay where they
# landed. Each keeps a duplicate descriptor open until it is sent.
MAX_QUEUED_HANDOFFS = 4_096


class ClusterConnection(MQTTConnection):
    """A plain TCP connection that keeps the bytes it read until its CONNECT is routed.

    ``early`` is the list of chunks read before the router decided where the connection
    lives, and None once decided. ``adopted`` contains the bytes that another worker read
    before it passed the connection here, fed to the codec as soon as the transport exists.
    ``counted`` tells whether that worker counted it for this one in the shared limits.
    """

    __slots__ = ("adopted", "counted", "early")

    def __init__(self, broker: Broker, adopted: bytes | None = None, counted: bool = True) -> None:
        super().__init__(broker)
        self.early: list[bytes] | None = [] if adopted is None else None
        self.adopted = adopted
        self.counted = counted

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        adopted, self.adopted = self.adopted, None
        if adopted:
            self.data_received(adopted)

    def counted_by_peer(self) -> bool:
        # ``adopted`` is cleared only after the broker has taken the connection in.
        return self.adopted is not None and self.counted

    def data_received(self, data: bytes) -> None:
        early = self.early
        if early is not None:
            early.append(data)
        MQTTConnection.data_received(self, data)


class HandoffSender:
    """Sends connections to one peer's hand-off socket."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._sock: socket.socket | None = None
        # Bytes of a record that sendmsg accepted only in part. No other record may be sent
        # until they are, because the peer pairs records with descriptors in order.
        self._pending = bytearray()
        # Records waiting for the socket to become writable, each with a duplicate of its
        # descriptor, oldest first.
        self._queue: deque[tuple[int, bytes]] = deque()
        self._watching = False
        # Called after queued records were sent or dropped, which closed their duplicates.
        self.released: Callable[[], None] | None = None

    @property
    def queued(self) -> int:
        """Return how many hand-offs wait in the queue, each holding a descriptor."""
        return len(self._queue)

    def send(self, fd: int, data: bytes) -> bool:
        """Send descriptor ``fd`` with ``data``, now or once the socket is writable.

        Return False when it was not sent and will not be: the caller keeps the connection.
        Otherwise the caller may close ``fd`` at once.
        """
        record = len(data).to_bytes(4, "big") + data
        if self._pending or self._queue:
            return self._enqueue(fd, record)
        for attempt in range(2):
            sock = self._sock or self._connect()
            if sock is None:
                return False
            try:
                sent = sock.sendmsg(
                    [record], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
                )
            except BlockingIOError:
                return self._enqueue(fd, record)
            except OSError as exc:
                # The peer restarted since this socket was connected: connect again, once.
                self.close()
                if attempt:
                    log.warning("hand-off to %s failed: %s", self.path, exc)
                continue
            if sent < len(record):
                self._pending += record[sent:]
                self._watch(sock)
            return True
        return False

    def _enqueue(self, fd: int, record: bytes) -> bool:
        sock = self._sock
        if sock is None or len(self._queue) >= MAX_QUEUED_HANDOFFS:
            return False
        try:
            duplicate = os.dup(fd)
        except OSError:
            return False
        self._queue.append((duplicate, record))
        self._watch(sock)
        return True

    def _watch(self, sock: socket.socket) -> None:
        if not self._watching:
            self._watching = True
            asyncio.get_running_loop().add_writer(sock.fileno(), self._write_pending)

    def _connect(self) -> socket.socket | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()
            return None
        self._sock = sock
        return sock

    def _write_pending(self) -> None:
        """Send the rest of a partly sent record, then the queued records, while writable."""
        sock = self._sock
        if sock is None:
            return
        queued = len(self._queue)
        try:
            done = self._send_waiting(sock)
        except OSError as exc:
            log.warning(
                "hand-off to %s failed: %s; closing %d waiting connection(s), whose clients "
                "reconnect",
                self.path,
                exc,
                len(self._queue),
            )
            self.close()
            if queued:
                self._notify_released()
            return
        if done:
            self._watching = False
            asyncio.get_running_loop().remove_writer(sock.fileno())
        if len(self._queue) < queued:
            self._notify_released()

    def _send_waiting(self, sock: socket.socket) -> bool:
        """Send waiting bytes and records until the socket is full; return True when
        nothing waits any more."""
        pending = self._pending
        queue = self._queue
        try:
            while pending or queue:
                if pending:
                    sent = sock.send(pending)
                    del pending[:sent]
                    if pending:
                        return False  # the socket is full again
                    continue
                duplicate, record = queue[0]
                sent = sock.sendmsg(
                    [record],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [duplicate]))],
                )
                queue.popleft()
                os.close(duplicate)  # the message in flight holds its own reference
                pending += record[sent:]
        except BlockingIOError:
            return False
        return True

    def _notify_released(self) -> None:
        if self.released is not None:
            self.released()

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            if self._watching:
                self._watching = False
                asyncio.get_running_loop().remove_writer(sock.fileno())
            sock.close()
        self._pending.clear()
        while self._queue:
            os.close(self._queue.popleft()[0])


class HandoffListener:
    """Accepts hand-off sockets from peers and calls ``on_connection(fd, data)`` per record.

    ``on_connection`` owns the descriptor from then on. It gets LOST_SOCKET for a record
    whose socket the kernel could not pass.
    """

    def __init__(self, path: str, on_connection: Callable[[int, bytes], None]) -> None:
        self.path = path
        self._on_connection = on_connection
        self._sock: socket.socket | None = None
        self._readers: set[_HandoffReader] = set()

    def listen(self) -> None:
        """Open the hand-off socket. Peers may connect and send at once, and what they send
        waits in the socket until :meth:`start`."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(self.path)
        sock.listen(64)
        sock.setblocking(False)
        self._sock = sock

    def start(self) -> None:
        """Accept the peers' hand-offs from now on."""
        if self._sock is None:
            self.listen()
        assert self._sock is not None
        asyncio.get_running_loop().add_reader(self._sock.fileno(), self._accept)

    def _accept(self) -> None:
        assert self._sock is not None
        while True:
            try:
                conn, _address = self._sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                log.warning("accepting a hand-off socket on %s failed: %s", self.path, exc)
                return
            conn.setblocking(False)
            reader = _HandoffReader(conn, self._on_connection, self._readers.discard)
            self._readers.add(reader)
            asyncio.get_running_loop().add_reader(conn.fileno(), reader.read)

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            asyncio.get_running_loop().remove_reader(sock.fileno())
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        for reader in list(self._readers):
            reader.close()


class _HandoffReader:
    """Reads records and descriptors from one peer's hand-off socket."""

    def __init__(
        self,
        sock: socket.socket,
        on_connection: Callable[[int, bytes], None],
        on_closed: Callable[[_HandoffReader], None],
    ) -> None:
        self._sock: socket.socket | None = sock
        self._on_connection = on_connection
        self._on_closed = on_closed
        self._buffer = bytearray()
        self._fds: deque[int] = deque()
        # Handed-over connections whose socket the kernel could not pass to this process.
        self.lost = 0

    def read(self) -> None:
        for _ in range(READS_PER_CALLBACK):
            if not self._read_once():
                return

    def _read_once(self) -> bool:
        """Read once and adopt what arrived; return False when nothing more can be read now."""
        sock = self._sock
        if sock is None:
            return False
        try:
            data, ancillary, flags, _address = sock.recvmsg(
                RECEIVE_BYTES, socket.CMSG_SPACE(RECEIVE_FDS * array.array("i").itemsize)
            )
        except BlockingIOError:
            return False
        except OSError as exc:
            log.warning("reading a hand-off socket failed: %s", exc)
            self.close()
            return False
        for level, kind, cdata in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
                self._fds.extend(fds)
        if flags & socket.MSG_CTRUNC and not ancillary:
            # The kernel could not give this process the socket (no free descriptor): the
            # record that it came with is lost, and its client reconnects. Linux returns at
            # most one sender's descriptors per read, so the loss is this read's record.
            self._fds.append(LOST_SOCKET)
        if not data:
            self.close()
            return False
        buffer = self._buffer
        buffer += data
        while len(buffer) >= 4:
            length = int.from_bytes(buffer[:4], "big")
            if len(buffer) < 4 + length:
                break
            saved = bytes(buffer[4 : 4 + length])
            del buffer[: 4 + length]
            if not self._fds:
                log.error("hand-off record of %d bytes came without a socket; closing", length)
                self.close()
                return False
            fd = self._fds.popleft()
            if fd == LOST_SOCKET:
                self.lost += 1
                if self.lost == 1 or self.lost % 1000 == 0:
                    log.warning(
                        "a connection handed over by another worker was lost: this worker has "
                        "no free file descriptor (%d lost in all); its client reconnects",
                        self.lost,
                    )
            self._on_connection(fd, saved)
        return True

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            asyncio.get_running_loop().remove_reader(sock.fileno())
            sock.close()
        while self._fds:
            fd = self._fds.popleft()
            if fd != LOST_SOCKET:
                os.close(fd)
        self._on_closed(self)
