"""One worker of ``ironshadow serve --workers N``: the ordinary engine plus its cluster links.

A :class:`ClusterWorker` attaches to an :class:`~ironshadow.engine.Engine` before it starts
and changes five things:

- TCP listener. The broker accepts from the socket that the supervisor bound, with
  :class:`~.handoff.ClusterConnection` as the protocol. At CONNECT, a client whose id another
  worker owns (see :func:`~.ownership.owner_of`) is passed to that worker. Empty client ids,
  TLS and WebSocket connections stay where they are, and their worker claims their id at
  the owner, so that a newer connection with the id closes them (session takeover). A
  client that resumes its session on another worker than before gets it from there: the
  session moves, with its subscriptions and queued messages, before CONNACK.
- Subscriptions. The broker's index is a :class:`ClusterIndex`, which counts the clients'
  subscriptions per topic filter and tells every peer over the bus when a filter gains its
  first subscriber or loses its last one. A peer that connects gets the whole set.
- Routing. Each peer is an internal consumer session of the broker, ``$internal/peer-{n}``,
  subscribed to the filters that the peer announced. The broker routes a message to it as to
  any subscriber, at most once per message, and the consumer sends it to the peer, which
  routes it to its own subscribers. Messages that came from the bus are never sent on.
- Shadow requests. A request for a thing that another worker owns is sent to the owner as a
  REQUEST frame, and this worker's shadow service ignores it. The publisher's acknowledgement
  of a QoS 1 or 2 request waits for the owner's RELEASED frame. The owner's replies reach the
  requester through the requester's worker's subscriptions, like any message.
- HTTP. Every worker serves the HTTP API on the sockets that the supervisor bound. A REST
  shadow request for a thing that another worker owns goes to the owner as an HTTP_CALL
  frame, and the owner's shadow service sends its reply back in an HTTP_REPLY frame.
  ``/metrics`` requests every peer's metrics with a METRICS frame, and a ``/ws`` feed with
  subscribers has every peer send its stored shadow changes (FEED, CHANGES). Each call
  waits a bounded time, so a stopped peer costs a 503 or a missing worker in the metrics,
  never a request that hangs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import orjson

from ..broker.connection import CLOSED, CONNECTED, MQTTConnection
from ..broker.core import INTERNAL_CLIENT_PREFIX, MIN_OVER_LIMIT, default_max_connections
from ..broker.hooks import DUPLICATE_CLIENT_ID, BrokerHooks
from ..broker.limits import peer_address
from ..broker.message import Message
from ..broker.persistence import (
    StateDecodeError,
    decode_session,
    encode_session,
    wall_clock_offset,
)
from ..broker.retained import RetainedStore
from ..broker.session import Delivery, Session
from ..broker.subscriptions import SubscriptionIndex, SubscriptionRecord
from ..engine.service import (
    ChangeListener,
    Reply,
    ShadowChange,
    document_bytes,
    restore_shadow,
)
from ..engine.topics import REQUEST_OPERATIONS, parse_shadow_topic
from ..mqtt.encoding import decode_string, encode_string
from ..mqtt.packets import Connect
from ..mqtt.reason_codes import ConnackReturnCode, ReasonCode
from ..mqtt.topics import parse_shared_subscription, topic_matches
from ..shadow import ShadowError, validate_shadow_name, validate_thing_name
from ..shadow.names import NAMED_SHADOW_SEPARATOR
from . import bus
from .handoff import LOST_SOCKET, ClusterConnection, HandoffListener, HandoffSender
from .heartbeat import SILENT_SECONDS, Heartbeats
from .limits import SharedLimits
from .ownership import owner_of

if TYPE_CHECKING:
    from ..engine import Engine

log = logging.getLogger("ironshadow.cluster")

# Environment variable through which the supervisor describes a worker to its process.
WORKER_ENVIRONMENT = "IRONSHADOW_CLUSTER_WORKER"
# Seconds between two attempts to open the bus link to a peer that is not listening yet.
RECONNECT_INTERVAL = 0.2
# Seconds between two checks that the supervisor is still alive, and between two heartbeats.
PARENT_CHECK_INTERVAL = 1.0
# Request number of a REQUEST frame whose sender waits for no RELEASED frame (QoS 0), and
# the highest number before the numbers start again at 1.
NO_RELEASE = bytes(4)
MAX_REQUEST_NUMBER = 2**32 - 1
# Claim number of an offline session that a peer announced in HELD.
NO_CLAIM = bytes(4)
# Client ids per HELD frame at most, so that a worker with many sessions sends several
# frames of bounded size.
HELD_IDS_PER_FRAME = 1_000
# Seconds that a worker waits for the owner's reply to a REST shadow request before it
# returns 503. A healthy owner replies after one write to its store.
# The limit stays below the 5 s default timeout of httpx, so that such a client reads the 503
# and its reason instead of timing out itself.
HTTP_CALL_TIMEOUT = 4.0
# Seconds that an API read waits for the worker that owns the data (see call()). The owner
# reads memory or its own history file.
CALL_TIMEOUT = 4.0
# Seconds that /metrics waits for each peer's metrics, well within Prometheus's default
# scrape timeout of 10 s. A peer collects its figures from counters in memory.
METRICS_CALL_TIMEOUT = 2.0
# Retry-After, in seconds, of a 503 for a REST request whose owner cannot be reached or is
# waiting for its store.
HTTP_RETRY_AFTER = 1
# Seconds that a starting worker waits for its bus links to and from every peer before it
# accepts clients. The peers start at the same moment and each links once its stores are
# loaded, so with similar stores they are ready within about a second of each other.
LINK_WAIT = 10.0
# Seconds of that wait after which the worker logs which peers it waits for.
LINK_WAIT_NOTICE = 3.0
# Seconds that stop() waits for the bus links to close.
STOP_WAIT = 1.0
# Seconds that a SUBACK waits for the peers to confirm its new topic filters (SYNCED)
# before it is sent anyway. A running peer replies within one loop iteration, and a stopped
# or stuck one must not delay the client's subscription for long.
SYNC_TIMEOUT = 1.0
# Seconds that a CONNECT without Clean Start waits for its session from another worker
# before it goes on without it. The worker that has the session sends it at once.
SESSION_WAIT = 2.0
# Seconds that a worker which sent a session collects the session's messages while it waits
# for the other workers' MARK frames (see _start_move).
MOVE_WAIT = 1.0
# $SYS topics whose figures every worker publishes for the whole engine, as the sum of
# every worker's own figure. The retained message count is the same on every worker and
# the version and uptime are this worker's own.
SUMMED_SYS_TOPICS = frozenset(
    {
        "$SYS/broker/clients/connected",
        "$SYS/broker/clients/disconnected",
        "$SYS/broker/clients/total",
        "$SYS/broker/messages/received",
        "$SYS/broker/messages/sent",
        "$SYS/broker/publish/messages/received",
        "$SYS/broker/publish/messages/sent",
        "$SYS/broker/publish/messages/dropped",
        "$SYS/broker/bytes/received",
        "$SYS/broker/bytes/sent",
        "$SYS/broker/subscriptions/count",
    }
)
SYS_LOAD_PREFIX = "$SYS/broker/load/"
# Prefix of the per-worker $SYS topics. Unlike the rest of $SYS, they are sent to the peers,
# so a client on any worker receives every worker's figures.
WORKER_SYS_PREFIX = "$SYS/broker/workers/"


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """A worker's identity and the location of its peers, passed by the supervisor."""

    index: int
    workers: int
    # Descriptor of the MQTT listening socket, inherited from the supervisor.
    listen_fd: int
    # Folder of the bus and hand-off Unix sockets.
    directory: str
    supervisor_pid: int
    # Descriptor of the MQTT TLS listening socket, or -1 without TLS.
    tls_listen_fd: int = -1
    # Descriptors of the HTTP listening sockets, one per address of the host.
    http_listen_fds: tuple[int, ...] = ()
    # Descriptor of the workers' shared table of connection counts (cluster/limits.py), or -1
    # when no limit needs it, and its slot count.
    limits_fd: int = -1
    limits_slots: int = 0
    # Peers whose bus links the worker waits for before it accepts clients, or None for
    # every peer. A restarted worker leaves out the peers that are not running then, such
    # as one in its restart delay, and links with them when they start.
    awaited_peers: tuple[int, ...] | None = None
    # Descriptor of the supervisor's table of heartbeats (cluster/heartbeat.py), or -1.
    heartbeat_fd: int = -1

    def to_environment(self) -> str:
        return json.dumps(
            {
                "index": self.index,
                "workers": self.workers,
                "listen_fd": self.listen_fd,
                "directory": self.directory,
                "supervisor_pid": self.supervisor_pid,
                "tls_listen_fd": self.tls_listen_fd,
                "http_listen_fds": list(self.http_listen_fds),
                "limits_fd": self.limits_fd,
                "limits_slots": self.limits_slots,
                "awaited_peers": self.awaited_peers,
                "heartbeat_fd": self.heartbeat_fd,
            }
        )

    @classmethod
    def from_environment(cls) -> WorkerSpec | None:
        """Return the spec the supervisor set, or None in a process that is no worker."""
        raw = os.environ.get(WORKER_ENVIRONMENT)
        if not raw:
            return None
        fields = json.loads(raw)
        awaited = fields.get("awaited_peers")
        return cls(
            int(fields["index"]),
            int(fields["workers"]),
            int(fields["listen_fd"]),
            str(fields["directory"]),
            int(fields["supervisor_pid"]),
            int(fields.get("tls_listen_fd", -1)),
            tuple(int(fd) for fd in fields.get("http_listen_fds", ())),
            int(fields.get("limits_fd", -1)),
            int(fields.get("limits_slots", 0)),
            None if awaited is None else tuple(int(peer) for peer in awaited),
            int(fields.get("heartbeat_fd", -1)),
        )

    def bus_path(self, index: int) -> str:
        return os.path.join(self.directory, f"bus-{index}.sock")

    def handoff_path(self, index: int) -> str:
        return os.path.join(self.directory, f"handoff-{index}.sock")


def _handoff_record(address: str, counted: bool, data: bytes) -> bytes:
    """Return what a hand-off sends with a socket: the client's address, for the owner's
    connection counts, whether the sender counted the connection (not one accepted over
    the connection limit), then the bytes read from the socket."""
    encoded = address.encode()
    return bytes((len(encoded),)) + encoded + bytes((counted,)) + data


def _read_handoff_record(record: bytes) -> tuple[str, bool, bytes]:
    """Return the client's address, whether it is counted for this worker, and the bytes
    read so far from a hand-off record."""
    length = record[0]
    return record[1 : 1 + length].decode(), bool(record[1 + length]), record[2 + length :]


def _closed_by_client(sock: socket.socket) -> bool:
    """Return whether the client has closed or reset ``sock``, with nothing left to read."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False  # open, with nothing to read yet
    except OSError:
        return True  # reset


@dataclass(slots=True)
class _Move:
    """A session sent to another worker, whose messages this worker still collects."""

    session: Session
    to: int
    # Number of the SESSION frame, sent back in TAIL.
    number: bytes
    # Workers whose messages for the session may still come here first.
    waiting: set[int]
    messages: list[Message]
    timer: asyncio.TimerHandle


@dataclass(slots=True)
class _Arrival:
    """A session taken in from a peer that waits for the peer's TAIL."""

    session: Session
    # Deliveries queued in the session when it arrived. The messages of TAIL go right after them.
    queued: int
    # Lets the client's CONNECT go on, or None when the CONNECT no longer waits.
    resume: Callable[[], None] | None
    timer: asyncio.TimerHandle


class _Call:
    """A request sent to a peer (HTTP_CALL or METRICS) whose caller awaits the reply."""

    __slots__ = ("fail", "future", "peer", "timer")

    def __init__(
        self,
        peer: int,
        future: asyncio.Future[Any],
        timer: asyncio.TimerHandle,
        fail: Callable[[str, bool], Any],
    ) -> None:
        self.peer = peer
        self.future = future
        self.timer = timer
        # Returns the caller's result when no reply comes, given the reason and whether the
        # request was sent.
        self.fail = fail


def silence_reason(silence: float) -> str:
    """Return the reason, for an error message, that a worker silent for ``silence`` seconds
    was not sent a request."""
    return f"it has not run for {silence:.0f} s (stopped or stuck)"


def owner_not_responding(thing: str, owner: int, reason: str) -> str:
    """Return the error message for a request about ``thing`` whose owner did not respond."""
    return f"Thing {thing!r} belongs to worker {owner}, which did not respond: {reason}."


class PeerCallError(Exception):
    """A procedure run on another worker failed, or its worker did not reply in time.

    ``reason`` is the cause in words for the user of the API, such as "no reply within
    2 s", and does not name the procedure.
    """

    def __init__(self, peer: int, reason: str) -> None:
        super().__init__(f"worker {peer} did not respond: {reason}")
        self.peer = peer
        self.reason = reason


class ClusterIndex(SubscriptionIndex):
    """A subscription index that counts client subscriptions per topic filter.

    Plain subscriptions count under their filter and shared ones under their whole
    ``$share/{group}/{filter}``. ``on_change(topic_filter, present)`` runs when such a key
    gets its first subscription from a client (True) or loses its last one (False).
    Internal sessions (the shadow service and the peers) are not counted, so only filters of
    real clients are announced.
    """

    __slots__ = ("filters", "on_change")

    def __init__(self, on_change: Callable[[str, bool], None]) -> None:
        super().__init__()
        # Topic filter or shared subscription filter -> client subscriptions on it.
        self.filters: dict[str, int] = {}
        self.on_change = on_change

    def add(self, inner_filter: str, record: SubscriptionRecord) -> bool:
        replaced = SubscriptionIndex.add(self, inner_filter, record)
        if not replaced and not record.session.client_id.startswith(INTERNAL_CLIENT_PREFIX):
            key = _filter_key(inner_filter, record.share_group)
            count = self.filters.get(key, 0)
            self.filters[key] = count + 1
            if not count:
                self.on_change(key, True)
        return replaced

    def remove(self, inner_filter: str, client_id: str, share_group: str | None) -> bool:
        removed = SubscriptionIndex.remove(self, inner_filter, client_id, share_group)
        if removed and not client_id.startswith(INTERNAL_CLIENT_PREFIX):
            key = _filter_key(inner_filter, share_group)
            count = self.filters[key] - 1
            if count:
                self.filters[key] = count
            else:
                del self.filters[key]
                self.on_change(key, False)
        return removed


def _filter_key(inner_filter: str, share_group: str | None) -> str:
    """Return the key under which ClusterIndex counts and announces a subscription."""
    return inner_filter if share_group is None else f"$share/{share_group}/{inner_filter}"


class ClusterRetainedStore(RetainedStore):
    """A retained message store that reports each message it stores to ``on_store``."""

    __slots__ = ("on_store",)

    def __init__(self) -> None:
        super().__init__()
        self.on_store: Callable[[Message], None] | None = None

    def store(self, message: Message) -> None:
        RetainedStore.store(self, message)
        if self.on_store is not None:
            self.on_store(message)


class ClusterWorker:
    """Joins an engine to its peers; :meth:`start` starts the engine too."""

    def __init__(self, engine: Engine, spec: WorkerSpec, stop: Callable[[], None]) -> None:
        self.engine = engine
        self.spec = spec
        self.index = spec.index
        self.workers = spec.workers
        self._stop = stop
        broker = self.broker = engine.broker
        self._retained = ClusterRetainedStore()
        self._attach()

        peers = [peer for peer in range(self.workers) if peer != self.index]
        self._links: dict[int, bus.OutboundLink | None] = dict.fromkeys(peers)
        # The consumers that stand for each peer's members of a shared subscription, by peer
        # and $share filter (see _shared_member).
        self._shared_members: dict[tuple[int, str], Session] = {}
        self._peer_sessions: dict[int, Session] = {
            peer: broker.add_consumer(f"peer-{peer}", [], self._peer_consumer(peer))
            for peer in peers
        }
        self._senders = {peer: HandoffSender(spec.handoff_path(peer)) for peer in peers}
        for sender in self._senders.values():
            sender.released = broker.descriptors_released
        broker.held_descriptors = self._held_descriptors
        # Sockets handed to this worker whose adoption has not finished yet.
        self._adopting = 0
        self._handoff = HandoffListener(spec.handoff_path(self.index), self._adopt)
        self._dirty: list[bus.OutboundLink] = []
        # Every open link from a peer, and each peer's current one, set by the RESET frame
        # that starts it.
        self._accepted: set[bus.InboundLink] = set()
        self._inbound_links: dict[int, bus.InboundLink] = {}
        # While a message from the bus is routed: that message (so it is not sent on, while
        # the replies published meanwhile are), and whether it is a shadow request for this
        # worker's shadow service.
        self._inbound: Message | None = None
        self._inbound_peer = self.index
        self._inbound_request = False
        # Shadow requests sent to each peer whose publishers' acknowledgements wait for the
        # peer's RELEASED frame, by request number.
        self._held: dict[int, dict[int, Message]] = {peer: {} for peer in peers}
        self._next_request = 0
        # Whether a filter was announced since the last SYNC, and the SUBACKs that wait for
        # SYNCED frames: by SYNC number, the peers yet to reply, the SUBACKs' senders and
        # the timer that sends them anyway.
        self._announced = False
        self._syncs: dict[
            int, tuple[set[int], list[Callable[[], None]], asyncio.TimerHandle]
        ] = {}
        self._next_sync = 0
        # Session takeover across workers. On the owner of a client id: the peer and claim
        # number of the latest connection with that id on another worker. On that worker:
        # the claim number of each such connection it holds.
        # NOTE: the owner forgets a claim only when a newer connection with the id arrives,
        # so it keeps one entry per id ever claimed (TLS and WebSocket clients).
        self._remote_clients: dict[str, tuple[int, bytes]] = {}
        self._claims: dict[str, bytes] = {}
        self._next_claim = 0
        # Connections that wait for their session from a peer: by the number of the CLAIM or
        # TAKEOVER that requested it, the client id, the future that the broker waits for,
        # and the timer that ends the wait.
        self._session_waits: dict[
            bytes, tuple[str, asyncio.Future[None], asyncio.TimerHandle]
        ] = {}
        # Client ids whose CLAIM was sent with the request for their session, before
        # CONNACK, so that the connection does not claim its id again.
        # NOTE: an entry stays when the CONNECT fails after the session arrived (for
        # example a will that the client may not publish), until the id connects again.
        self._early_claims: set[str] = set()
        # Sessions on their way to another worker whose messages this worker collects
        # meanwhile, and sessions taken in that wait for those messages, by client id.
        self._moves: dict[str, _Move] = {}
        self._arrivals: dict[str, _Arrival] = {}
        # HTTP_CALL and METRICS frames sent whose reply has not arrived yet, by call number.
        self._calls: dict[int, _Call] = {}
        self._next_call = 0
        # Calls that got no reply, and when that was last logged.
        self._calls_failed = 0
        self._calls_failed_logged_at = 0.0
        # Publishing connections closed because their shadow requests were not confirmed.
        self._publishers_closed = 0
        # Procedures that peers run on this worker with CALL frames, by name: each takes the
        # arguments as a dict and returns a JSON-serialisable result. Set by the command line,
        # which builds them with the HTTP API's code.
        self.procedures: dict[str, Callable[[dict[str, Any]], Awaitable[Any]]] = {}
        # Backpressure over the whole engine: whether this worker's store has fallen behind,
        # the peers whose stores have, and whether this worker paused reading for either.
        self._own_pressure = False
        self._pressured_peers: set[int] = set()
        self._paused_for_pressure = False
        # The /ws feed: this worker's feed's listener while it has subscribers, and the
        # peers whose FEED frames requested this worker's shadow changes.
        self._local_feed: ChangeListener | None = None
        self._feed_peers: set[int] = set()
        # While a peer's copy of its retained messages is on its way (see
        # _catch_up_retained): the topics restored from this worker's folder at start, the
        # topics set or cleared here since, and the topics of the copy received so far.
        self._catching_up = False
        self._storing_copy = False
        self._stale_retained: set[str] = set()
        self._touched_retained: set[str] = set()
        self._copied_retained: set[str] = set()
        # $SYS figures: this worker's own at its last publication, and each peer's latest.
        self._own_figures: dict[str, float] = {}
        self._peer_figures: dict[int, dict[str, float]] = {}
        # Whether each worker keeps the history of its own things (SQLite in its folder),
        # so that a history read for another worker's thing is a CALL to that worker.
        self.history_per_worker = False
        # Returns this worker's metrics, encoded with Exposition.to_bytes, for a peer's
        # METRICS frame. Set by the command line, which builds them with the HTTP API's code.
        self.metrics_source: Callable[[], bytes] | None = None
        # The last message encoded for the bus, reused when it goes to several peers.
        self._encoded_message: Message | None = None
        self._encoded = b""
        self._drops = bus.DropCounter()
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._parent_timer: asyncio.TimerHandle | None = None
        # Set when this worker begins to shut down. The supervisor stops every worker at
        # once, so a bus link that closes from then on is neither logged nor reopened.
        self.stopping = False
        self._heartbeats: Heartbeats | None = None
        if spec.heartbeat_fd >= 0:
            self._heartbeats = Heartbeats(spec.heartbeat_fd, spec.workers)
        self._sys_timer: asyncio.TimerHandle | None = None
        # Connections passed to a peer, taken from a peer, and kept here because the hand-off
        # failed; published under $SYS/broker/workers/{index}/connections/.
        self.handed_off = 0
        self.adopted = 0
        self.handoff_failed = 0

    def _open_shared_limits(self) -> SharedLimits | None:
        """Map the table of connection counts that the supervisor created, if any, and
        forget what this worker's previous process counted in it."""
        spec = self.spec
        if spec.limits_fd < 0:
            return None
        config = self.broker.config
        table = SharedLimits(
            spec.limits_fd,
            self.workers,
            spec.limits_slots,
            self.index,
            max_connections=config.max_connections,
            max_per_address=config.max_connections_per_address,
            connect_rate=config.connect_rate_per_address,
            connect_burst=self.broker.limits.connect_burst,
        )
        table.reset()
        log.info(
            "worker %d: connection limits counted for the whole engine, with the other "
            "workers (--max-connections %s, --max-connections-per-address %s, "
            "--connect-rate-per-address %s)",
            self.index,
            config.max_connections or "unlimited",
            config.max_connections_per_address or "unlimited",
            (
                f"{config.connect_rate_per_address:g}"
                if config.connect_rate_per_address
                else "unlimited"
            ),
        )
        return table

    def _attach(self) -> None:
        """Set the broker's and the shadow service's cluster hooks, before the engine starts.

        The broker's index becomes a ClusterIndex that contains the same records, and its
        retained store a ClusterRetainedStore, still empty at this point.
        """
        broker = self.broker
        index = ClusterIndex(self._filter_changed)
        for session in broker.sessions.values():
            for topic_filter, record in session.subscriptions.items():
                _group, inner = parse_shared_subscription(topic_filter)
                index.add(inner, record)
        broker.index = index
        assert not broker.retained.count
        broker.retained = self._retained
        broker.listen_socket = socket.socket(fileno=self.spec.listen_fd)
        if self.spec.tls_listen_fd >= 0:
            broker.tls_listen_socket = socket.socket(fileno=self.spec.tls_listen_fd)
        broker.tcp_connection_class = ClusterConnection
        # --max-connections is the engine's, checked in the shared table. What this process
        # may hold is bounded by its own open-file limit.
        broker.max_connections = default_max_connections()
        engine_limit = broker.config.max_connections
        if engine_limit:
            # Client ids spread the engine's connections over the workers, so about a share
            # of them live here. The descriptors left above it may hold connections that
            # wait over the engine's limit to take over a session (see MIN_OVER_LIMIT).
            share = math.ceil(engine_limit / self.workers)
            broker.max_over_limit = max(MIN_OVER_LIMIT, broker.max_connections - share)
        self.shared_limits = self._open_shared_limits()
        broker.limits.shared = self.shared_limits
        broker.connect_router = self._route_connect
        broker.subscribe_barrier = self._hold_suback
        broker.session_fetch = self._fetch_session
        broker.sys_totals = self._sys_totals
        broker.add_hooks(_TakeoverHooks(self))
        if self.engine.pipeline is not None:
            self.engine.pipeline.on_pressure = self.store_pressure
        shadows = self.engine.shadows
        shadows.route_request = self._route_request
        shadows.forward_http = self._forward_http
        shadows.ask_replay = self._ask_replay

    # --- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Load the engine's stores, open this worker's bus and hand-off sockets, link to
        the peers, then serve.

        The peers link to the bus socket, so no request of theirs arrives before the shadows
        are loaded. Connections that they hand over wait in the hand-off socket until this
        worker serves, so that a client's requests to other workers find them linked both
        ways: a reply sent over a link that is not open yet would be lost.
        """
        await self.engine.open()
        foreign = self._forget_foreign_shadows()
        if foreign:
            log.info(
                "worker %d: forgot %d loaded shadows that other workers own", self.index, foreign
            )
        loop = asyncio.get_running_loop()
        path = self.spec.bus_path(self.index)
        if os.path.exists(path):
            os.unlink(path)
        self._server = await loop.create_unix_server(self._accept_link, path)
        self._handoff.listen()
        for peer in self._links:
            task = loop.create_task(self._keep_linked(peer))
            self._tasks.add(task)
        await self._wait_for_links()
        await self.engine.serve()
        self._handoff.start()
        # From here on, and not for the retained messages restored at start, every retained
        # message set on this worker goes to every peer.
        self._retained.on_store = self._retained_stored
        self._catch_up_retained()
        self._check_parent()  # and the first heartbeat
        interval = self.broker.config.sys_interval
        if interval > 0:
            self._sys_timer = loop.call_later(interval, self._publish_sys)
        log.info(
            "worker %d of %d (pid %d) is serving; it owns the client ids and things whose CRC-32 "
            "modulo %d is %d",
            self.index,
            self.workers,
            os.getpid(),
            self.workers,
            self.index,
        )

    async def stop(self) -> None:
        """Close the hand-off socket, the bus links and the timers, and wait for the tasks.

        Nothing of the worker stays open afterwards, so its event loop can be closed.
        """
        for timer in (self._parent_timer, self._sys_timer):
            if timer is not None:
                timer.cancel()
        self._parent_timer = self._sys_timer = None
        if self._heartbeats is not None:
            self._heartbeats.close()
            self._heartbeats = None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        self._tasks.clear()
        self._fail_calls(None, "the engine is shutting down")
        for number in list(self._syncs):
            self._sync_done(number)
        self._handoff.close()
        for sender in self._senders.values():
            sender.close()
        closing = []
        for link in self._links.values():
            if link is not None:
                link.close()
                closing.append(link.closed)
        for inbound in list(self._accepted):
            if inbound.transport is not None:
                inbound.transport.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
            path = self.spec.bus_path(self.index)
            if os.path.exists(path):
                os.unlink(path)
        await asyncio.gather(*tasks, return_exceptions=True)
        # Transports close at the loop's next turns; wait for them, briefly.
        if closing:
            await asyncio.wait(closing, timeout=STOP_WAIT)
        deadline = time.monotonic() + STOP_WAIT
        while self._accepted and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def _wait_for_links(self) -> None:
        """Wait until the bus links to and from every awaited peer are open, or LINK_WAIT
        seconds.

        Then the first clients and HTTP requests reach their owners and get the replies.
        The peers that were not running when the supervisor started this worker are not
        awaited (see ``WorkerSpec.awaited_peers``).
        """
        awaited = self.spec.awaited_peers
        peers = [peer for peer in self._links if awaited is None or peer in awaited]
        if len(peers) < len(self._links):
            log.info(
                "worker %d: worker(s) %s not running; linking with them when they start",
                self.index,
                ", ".join(str(peer) for peer in self._links if peer not in peers),
            )
        started = time.monotonic()
        announced = False
        while True:
            missing = [peer for peer in peers if not self._linked_both_ways(peer)]
            if not missing:
                return
            waited = time.monotonic() - started
            if waited >= LINK_WAIT_NOTICE and not announced:
                # A peer still loading its stores, or one that died after this worker
                # started, keeps it waiting.
                announced = True
                log.info(
                    "worker %d: waiting for bus links with worker(s) %s; accepting clients "
                    "once they are linked, or after %.0f s",
                    self.index,
                    ", ".join(map(str, missing)),
                    LINK_WAIT,
                )
            if waited >= LINK_WAIT:
                log.warning(
                    "worker %d: no bus links with worker(s) %s after %.0f s; starting without "
                    "them, and their things' requests fail until they are linked",
                    self.index,
                    ", ".join(map(str, missing)),
                    LINK_WAIT,
                )
                return
            await asyncio.sleep(RECONNECT_INTERVAL / 4)

    def _linked_both_ways(self, peer: int) -> bool:
        return self._links[peer] is not None and peer in self._inbound_links

    def linked_peers(self) -> int:
        """Return how many peers this worker's outgoing bus links reach now."""
        return sum(link is not None for link in self._links.values())

    def _accept_link(self) -> bus.InboundLink:
        link = bus.InboundLink(self._on_frame, self._inbound_lost)
        self._accepted.add(link)
        return link

    def _forget_foreign_shadows(self) -> int:
        """Drop the shadows loaded at start that another worker owns, and return how many.

        With a shared hot store (Redis) every worker loads every shadow, but only the owner
        serves and writes it, so a copy here would go stale.
        """
        # NOTE: each worker still reads every shadow from the shared store at start.
        service = self.engine.shadows
        foreign = [
            key
            for key in service.shadows
            if owner_of(key.split(NAMED_SHADOW_SEPARATOR, 1)[0], self.workers) != self.index
        ]
        for key in foreign:
            del service.shadows[key]
            service.tombstones.pop(key, None)
        for thing in list(service.named_shadows):
            if owner_of(thing, self.workers) != self.index:
                del service.named_shadows[thing]
        return len(foreign)

    def _check_parent(self) -> None:
        """Stop this worker if the supervisor is gone; otherwise write a heartbeat for it."""
        if os.getppid() != self.spec.supervisor_pid:
            log.error(
                "worker %d: the supervisor (pid %d) is gone; stopping",
                self.index,
                self.spec.supervisor_pid,
            )
            self._stop()
            return
        if self._heartbeats is not None:
            self._heartbeats.beat(self.index)
        loop = asyncio.get_running_loop()
        self._parent_timer = loop.call_later(PARENT_CHECK_INTERVAL, self._check_parent)

    # --- connections ------------------------------------------------------------------

    def _route_connect(self, connection: MQTTConnection, connect: Connect) -> bool:
        """Pass ``connection`` to the owner of its client id; return True when it was passed."""
        if type(connection) is not ClusterConnection or connection.early is None:
            return False
        early, connection.early = connection.early, None
        client_id = connect.client_id
        if not client_id:
            return False
        owner = owner_of(client_id, self.workers)
        if owner == self.index:
            return False
        silence = self.peer_silence(owner)
        if silence:
            # The owner would take the socket but not read it until it runs again.
            connection.client_id = client_id
            self.broker._reject_connect(
                connection,
                ReasonCode.SERVER_UNAVAILABLE,
                ConnackReturnCode.SERVER_UNAVAILABLE,
                f"Worker {owner}, which serves client id {client_id!r}, did not respond: "
                f"{silence_reason(silence)}. Retry later.",
                quiet_repeats=True,
                log_group="owner-silent",
            )
            return True
        transport = connection.transport
        sock = transport.get_extra_info("socket")
        address = peer_address(connection.peer)
        # A connection accepted over the limit is not counted anywhere: the owner checks
        # the limits again, and it may take over its client's session there.
        shared = None if connection.over_limit else self.shared_limits
        if shared is not None:
            # NOTE: a hand-off queued for a peer that restarts before the queue is sent is
            # dropped, and stays counted for that peer until it exits again.
            shared.move(address, self.index, owner)
        record = _handoff_record(address, not connection.over_limit, b"".join(early))
        if sock is None or not self._senders[owner].send(sock.fileno(), record):
            if shared is not None:
                shared.move(address, owner, self.index)
            self.handoff_failed += 1
            return False
        self.handed_off += 1
        log.debug("client %s from %s passed to worker %d", client_id, connection.peer, owner)
        # Forget the connection without writing to it: the owner has the socket now.
        connection.state = CLOSED
        connection.transport = None
        if shared is not None:
            # The owner counts it already, so the broker must not remove it from the counts.
            self.broker.connections.discard(connection)
        self.broker.connection_lost(connection)
        transport.abort()
        return True

    def _held_descriptors(self) -> int:
        """Return how many descriptors this worker holds for connections that are not the
        broker's: those waiting to be handed off, and those handed to it and not yet
        adopted."""
        return self._adopting + sum(sender.queued for sender in self._senders.values())

    def _adopt(self, fd: int, record: bytes) -> None:
        address, counted, data = _read_handoff_record(record)
        if fd == LOST_SOCKET:
            self._adoption_failed(address, counted)
            return
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            os.close(fd)
            log.warning("a socket passed by a peer is not usable: %s", exc)
            self._adoption_failed(address, counted)
            return
        if _closed_by_client(sock):
            # Its CONNECT would otherwise take over the session of a newer connection of
            # the same client, as when the hand-off waited while this worker was stopped.
            # NOTE: a client that sent more packets before closing is not detected here.
            self.broker._log_rarely(
                "handoff-closed",
                "",
                "worker %d: a connection from %s passed by a peer was closed by its client "
                "before this worker took it over; dropped it",
                self.index,
                address,
            )
            sock.close()
            self._adoption_failed(address, counted)
            return
        task = asyncio.get_running_loop().create_task(
            self._adopt_socket(sock, address, counted, data)
        )
        self._adopting += 1
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _adopt_socket(
        self, sock: socket.socket, address: str, counted: bool, data: bytes
    ) -> None:
        broker = self.broker
        try:
            await broker.loop.connect_accepted_socket(
                lambda: ClusterConnection(broker, adopted=data, counted=counted), sock
            )
        except OSError as exc:
            self._adopting -= 1
            log.warning("adopting a connection passed by a peer failed: %s", exc)
            sock.close()
            self._adoption_failed(address, counted)
            broker.descriptors_released()
            return
        # The connection is among the broker's connections now.
        self._adopting -= 1
        self.adopted += 1

    def _adoption_failed(self, address: str, counted: bool) -> None:
        """Remove from this worker's counts a connection that a peer counted for it and that
        did not arrive, or that could not be wrapped in a transport."""
        if self.shared_limits is not None and counted:
            self.shared_limits.release(address, self.index)

    # --- subscriptions ----------------------------------------------------------------

    def _filter_changed(self, topic_filter: str, present: bool) -> None:
        data = bus.frame(bus.SUBSCRIBE if present else bus.UNSUBSCRIBE, topic_filter.encode())
        for link in self._links.values():
            if link is not None:
                link.send(data)
                self._announced = present or self._announced

    def _hold_suback(self, send: Callable[[], None]) -> bool:
        """Hold a SUBACK until every peer that was sent a new filter has replied to the SYNC
        that follows it (the broker's subscribe barrier).

        A SUBACK without a new filter waits behind the latest SYNC still pending, so that
        SUBACKs keep the order of their SUBSCRIBEs. Return False when nothing is pending.
        """
        if not self._announced:
            pending = self._syncs.get(self._next_sync)
            if pending is None:
                return False
            pending[1].append(send)
            return True
        self._announced = False
        self._next_sync = self._next_sync % MAX_REQUEST_NUMBER + 1
        number = self._next_sync
        data = bus.frame(bus.SYNC, number.to_bytes(4, "big"))
        waiting = set()
        for peer, link in self._links.items():
            if link is not None and link.send(data):
                waiting.add(peer)
        if not waiting:
            return False
        timer = asyncio.get_running_loop().call_later(SYNC_TIMEOUT, self._sync_done, number)
        self._syncs[number] = (waiting, [send], timer)
        return True

    def _synced(self, peer: int, number: int) -> None:
        entry = self._syncs.get(number)
        if entry is not None:
            entry[0].discard(peer)
            if not entry[0]:
                self._sync_done(number)

    def _sync_done(self, number: int) -> None:
        """Send the SUBACKs of SYNC ``number``: every peer replied, or the timeout passed."""
        entry = self._syncs.pop(number, None)
        if entry is not None:
            entry[2].cancel()
            for send in entry[1]:
                send()

    def _forget_syncs(self, peer: int) -> None:
        """Stop waiting for ``peer``'s SYNCED frames: its link closed."""
        for number in [number for number, entry in self._syncs.items() if peer in entry[0]]:
            self._synced(peer, number)

    def waiting_subacks(self) -> int:
        """Return how many SUBACKs wait for the peers to confirm their filters."""
        return len(self._syncs)

    def _announce_all(self, link: bus.OutboundLink) -> None:
        assert isinstance(self.broker.index, ClusterIndex)
        link.send(bus.frame(bus.HELLO, self.index.to_bytes(2, "big")))
        link.send(bus.frame(bus.RESET))
        for topic_filter in self.broker.index.filters:
            link.send(bus.frame(bus.SUBSCRIBE, topic_filter.encode()))
        if self._local_feed is not None:
            link.send(bus.frame(bus.FEED, b"\x01"))
        self._announce_sessions(link)
        if self._own_pressure:
            link.send(bus.frame(bus.PRESSURE, b"\x01"))

    # --- retained messages of a restarted worker --------------------------------------

    def _catch_up_retained(self) -> None:
        """Ask a peer for its retained messages, which replace those restored from this
        worker's folder: the peers kept running while this worker was down, and its folder
        misses what was set or cleared meanwhile."""
        linked = [peer for peer, link in self._links.items() if link is not None]
        if not linked:
            return
        self._catching_up = True
        self._stale_retained = {
            message.topic
            for message in self._retained.messages()
            if not _own_sys_topic(message.topic)
        }
        self._send_to(linked[0], bus.frame(bus.RETAINED_REQUEST))

    def _send_retained(self, peer: int) -> None:
        """Reply to RETAINED_REQUEST with every retained message but this worker's own $SYS."""
        for message in self._retained.messages():
            if not _own_sys_topic(message.topic):
                self._send_message(peer, bus.RETAINED, message)
        self._send_to(peer, bus.frame(bus.RETAINED_END))

    def _retained_copied(self, message: Message) -> None:
        """Keep a message of a peer's copy, unless its topic was set or cleared here since
        the start, which is newer."""
        if not self._catching_up:
            return
        self._copied_retained.add(message.topic)
        if message.topic not in self._touched_retained:
            self._store_retained_quietly(message)

    def _retained_copy_done(self) -> None:
        """Clear the restored retained messages that the peer's copy does not have."""
        if not self._catching_up:
            return
        cleared = self._stale_retained - self._copied_retained - self._touched_retained
        for topic in cleared:
            self._store_retained_quietly(Message(topic, b"", 0, True))
        if cleared or self._copied_retained:
            log.info(
                "worker %d: took %d retained messages from a peer and cleared %d that it no "
                "longer has",
                self.index,
                len(self._copied_retained),
                len(cleared),
            )
        self._catching_up = False
        self._stale_retained = set()
        self._touched_retained = set()
        self._copied_retained = set()

    def _store_retained_quietly(self, message: Message) -> None:
        """Store or clear a retained message without routing it or sending it to the
        peers, and mark it for this worker's saved MQTT state."""
        self._storing_copy = True
        try:
            self._retained.store(message)
        finally:
            self._storing_copy = False
        changes = self.broker.state_changes
        if changes is not None:
            changes.retained[message.topic] = None

    # --- backpressure -----------------------------------------------------------------

    def store_pressure(self, raised: bool) -> None:
        """Pause reading while this worker's store is behind, and have every peer pause
        too: their clients' requests for this worker's things would otherwise pile up here
        in memory instead of slowing those clients down."""
        self._own_pressure = raised
        data = bus.frame(bus.PRESSURE, b"\x01" if raised else b"\x00")
        for link in self._links.values():
            if link is not None:
                link.send(data)
        self._update_pause()

    def _peer_pressure(self, peer: int, raised: bool) -> None:
        if raised:
            if peer not in self._pressured_peers:
                log.warning(
                    "worker %d: the store of worker %d has fallen behind; pausing reading "
                    "until it catches up",
                    self.index,
                    peer,
                )
            self._pressured_peers.add(peer)
        else:
            self._pressured_peers.discard(peer)
        self._update_pause()

    def _update_pause(self) -> None:
        paused = self._own_pressure or bool(self._pressured_peers)
        if paused == self._paused_for_pressure:
            return
        self._paused_for_pressure = paused
        if paused:
            self.broker.pause_reading()
        else:
            self.broker.resume_reading()

    # --- the /ws feed -----------------------------------------------------------------

    def set_feed_listener(self, listener: ChangeListener | None) -> None:
        """Pass stored shadow changes to this worker's /ws feed while it has subscribers
        (``listener``), and ask every peer for its changes meanwhile."""
        was_listening = self._local_feed is not None
        self._local_feed = listener
        self._update_change_listener()
        if (listener is not None) == was_listening:
            return
        data = bus.frame(bus.FEED, b"\x01" if listener is not None else b"\x00")
        for link in self._links.values():
            if link is not None:
                link.send(data)

    def _feed_requested(self, peer: int, listening: bool) -> None:
        if listening:
            self._feed_peers.add(peer)
        else:
            self._feed_peers.discard(peer)
        self._update_change_listener()

    def _update_change_listener(self) -> None:
        """Give the shadow service the listener that reaches every feed that wants changes:
        none, this worker's feed alone, or the peers' feeds too."""
        listener = self._forward_changes if self._feed_peers else self._local_feed
        self.engine.shadows.change_listener = listener

    def _forward_changes(self, changes: list[ShadowChange]) -> None:
        """Pass stored shadow changes to this worker's feed and to every peer whose feed
        requested them."""
        if self._local_feed is not None:
            self._local_feed(changes)
        parts = [len(changes).to_bytes(4, "big")]
        for change in changes:
            document = document_bytes(change.shadow, change.timestamp)
            parts.append(encode_string(change.thing))
            parts.append(encode_string(change.shadow_name or ""))
            parts.append(change.timestamp.to_bytes(4, "big"))
            parts.append(len(document).to_bytes(4, "big"))
            parts.append(document)
        data = bus.frame(bus.CHANGES, b"".join(parts))
        for peer in self._feed_peers:
            self._send_to(peer, data)

    def _changes_arrived(self, body: bytearray, pos: int, end: int) -> None:
        listener = self._local_feed
        if listener is None:
            return  # the feed lost its last subscriber meanwhile
        count = int.from_bytes(body[pos : pos + 4], "big")
        pos += 4
        changes = []
        for _ in range(count):
            thing, pos = decode_string(body, pos, end)
            shadow_name, pos = decode_string(body, pos, end)
            timestamp = int.from_bytes(body[pos : pos + 4], "big")
            length = int.from_bytes(body[pos + 4 : pos + 8], "big")
            pos += 8
            shadow = restore_shadow(bytes(body[pos : pos + length]))
            pos += length
            changes.append(ShadowChange(thing, shadow_name or None, shadow, timestamp))
        listener(changes)

    def _forget_peer_filters(self, peer: int) -> None:
        session = self._peer_sessions[peer]
        for topic_filter in session.subscriptions:
            self.broker.index.remove(topic_filter, session.client_id, None)
        session.subscriptions.clear()
        for (owner, share_filter), member in self._shared_members.items():
            if owner == peer and member.subscriptions.pop(share_filter, None) is not None:
                group, inner = parse_shared_subscription(share_filter)
                self.broker.index.remove(inner, member.client_id, group)

    def _shared_member(self, peer: int, share_filter: str) -> Session:
        """Return the consumer that stands for ``peer``'s members of ``share_filter`` in this
        worker's group: picked, it sends the message to the peer in a SHARED frame."""
        member = self._shared_members.get((peer, share_filter))
        if member is None:

            def consume(message: Message) -> None:
                prefix = encode_string(share_filter)
                self._send_message(peer, bus.SHARED, message, prefix)

            member = self.broker.add_consumer(f"peer-{peer}/{share_filter}", [], consume)
            self._shared_members[(peer, share_filter)] = member
        return member

    def _shared_arrived(self, body: bytearray, pos: int, end: int) -> None:
        """Deliver a SHARED frame's message to one of this worker's members of its group."""
        share_filter, pos = decode_string(body, pos, end)
        message = bus.decode_message(body, pos, end)
        group_name, inner = parse_shared_subscription(share_filter)
        assert group_name is not None
        group = self.broker.index.group(inner, group_name)
        record = None
        if group is not None:
            record = group.pick(clients_only=True)
            if record is None:
                # A member whose session moves to another worker takes the message there in
                # TAIL.
                for member in group.members.values():
                    if member.session.client_id in self._moves:
                        record = member
                        break
        if record is None:
            # Its members here left after the peer picked this worker.
            self._drops.dropped(self.index, f"no member of {share_filter} is left there")
            return
        qos = min(message.qos, record.qos)
        retain = message.retain and record.retain_as_published
        ids = [record.subscription_id] if record.subscription_id else None
        self.broker.deliver(record.session, Delivery(message, qos, retain, ids))

    # --- bus links --------------------------------------------------------------------

    async def _keep_linked(self, peer: int) -> None:
        """Keep the outgoing link to ``peer`` open, reconnecting whenever it closes."""
        loop = asyncio.get_running_loop()
        path = self.spec.bus_path(peer)
        while True:
            try:
                _transport, link = await loop.create_unix_connection(
                    lambda: bus.OutboundLink(peer, self._schedule_flush), path
                )
            except OSError:
                await asyncio.sleep(RECONNECT_INTERVAL)
                continue
            self._links[peer] = link
            self._announce_all(link)
            log.info("worker %d: bus link to worker %d open", self.index, peer)
            await link.closed
            self._links[peer] = None
            self._forget_syncs(peer)
            self._fail_calls(peer, "its bus link closed before it replied")
            if self.stopping:
                return
            # The supervisor logs why the peer stopped, if it did.
            log.info(
                "worker %d: bus link to worker %d closed, as when it stops or restarts; "
                "reconnecting",
                self.index,
                peer,
            )
            await asyncio.sleep(RECONNECT_INTERVAL)

    def _schedule_flush(self, link: bus.OutboundLink) -> None:
        if not self._dirty:
            asyncio.get_running_loop().call_soon(self._flush)
        self._dirty.append(link)

    def _flush(self) -> None:
        dirty, self._dirty = self._dirty, []
        for link in dirty:
            link.flush()

    def _on_frame(
        self, link: bus.InboundLink, kind: int, body: bytearray, pos: int, end: int
    ) -> None:
        peer = link.peer
        assert peer is not None
        if kind == bus.PUBLISH:
            message = bus.decode_message(body, pos, end)
            self._inbound = message
            self._inbound_peer = peer
            try:
                self.broker.publish(message, shared=False)
            finally:
                self._inbound = None
            return
        if kind == bus.REQUEST:
            self._request_arrived(peer, body, pos, end)
            return
        if kind == bus.RELEASED:
            self._release_held(peer, int.from_bytes(body[pos:end], "big"))
            return
        if kind == bus.RESET:
            self._inbound_links[peer] = link
            self._forget_peer_filters(peer)
            # A feed that still has subscribers sends FEED again after RESET, and a worker
            # whose store is behind sends PRESSURE again.
            self._feed_requested(peer, False)
            self._peer_pressure(peer, False)
            return
        if kind == bus.SYNC:
            link = self._links[peer]
            if link is not None:
                link.send(bus.frame(bus.SYNCED, bytes(body[pos:end])))
            return
        if kind == bus.SYNCED:
            self._synced(peer, int.from_bytes(body[pos:end], "big"))
            return
        if kind == bus.RETAINED:
            self._retained_copied(bus.decode_message(body, pos, end))
            return
        if kind == bus.RETAINED_END:
            self._retained_copy_done()
            return
        if kind == bus.RETAINED_REQUEST:
            self._send_retained(peer)
            return
        if kind == bus.FIGURES:
            self._peer_figures[peer] = orjson.loads(bytes(body[pos:end]))
            return
        if kind == bus.CHANGES:
            self._changes_arrived(body, pos, end)
            return
        if kind == bus.FEED:
            self._feed_requested(peer, body[pos] == 1)
            return
        if kind == bus.SHARED:
            self._shared_arrived(body, pos, end)
            return
        if kind == bus.CLAIM:
            client_id = bytes(body[pos + 5 : end]).decode()
            self._claimed(peer, bytes(body[pos : pos + 4]), body[pos + 4], client_id)
            return
        if kind == bus.TAKEOVER:
            claim = bytes(body[pos : pos + 4])
            flags = body[pos + 4]
            reply_to = int.from_bytes(body[pos + 5 : pos + 7], "big")
            number = bytes(body[pos + 7 : pos + 11])
            client_id = bytes(body[pos + 11 : end]).decode()
            self._taken_over(claim, flags, client_id, reply_to, number)
            return
        if kind == bus.PRESSURE:
            self._peer_pressure(peer, body[pos] == 1)
            return
        if kind == bus.HELD:
            self._sessions_held(peer, body, pos, end)
            return
        if kind == bus.SESSION:
            number = bytes(body[pos : pos + 4])
            client_id, pos = decode_string(body, pos + 4, end)
            self._session_arrived(peer, number, client_id, bytes(body[pos:end]))
            return
        if kind == bus.MOVE_SYNC:
            sender = int.from_bytes(body[pos : pos + 2], "big")
            self._move_synced(peer, sender, bytes(body[pos + 2 : end]).decode())
            return
        if kind == bus.MARK:
            self._marked(bytes(body[pos:end]).decode(), (peer,))
            return
        if kind == bus.TAIL:
            self._tail_arrived(body, pos, end)
            return
        if kind == bus.REPLAY:
            self._replay_requested(peer, body, pos, end)
            return
        if kind == bus.DELTA:
            client_id, pos = decode_string(body, pos, end)
            topic, pos = decode_string(body, pos, end)
            self.engine.shadows.deliver_replay(client_id, topic, bytes(body[pos:end]))
            return
        if kind >= bus.HTTP_CALL:
            self._call_frame(peer, kind, body, pos, end)
            return
        topic_filter = bytes(body[pos:end]).decode()
        group, inner = parse_shared_subscription(topic_filter)
        if group is None:
            session = self._peer_sessions[peer]
        else:
            session = self._shared_member(peer, topic_filter)
        if kind == bus.SUBSCRIBE:
            record = SubscriptionRecord(session, topic_filter, 2, share_group=group)
            session.subscriptions[topic_filter] = record
            self.broker.index.add(inner, record)
        elif kind == bus.UNSUBSCRIBE:
            if session.subscriptions.pop(topic_filter, None) is not None:
                self.broker.index.remove(inner, session.client_id, group)
        else:
            raise ValueError(f"unknown frame kind {kind}")

    def _inbound_lost(self, link: bus.InboundLink) -> None:
        self._accepted.discard(link)
        # A link replaced by a newer one from the same peer leaves that one's filters alone.
        if link.peer is not None and self._inbound_links.get(link.peer) is link:
            del self._inbound_links[link.peer]
            self._forget_peer_filters(link.peer)
            # The peer may have stopped before storing the requests it had not confirmed.
            held = self._held[link.peer]
            messages = list(held.values())
            held.clear()
            self._disconnect_publishers(messages, f"worker {link.peer} went away")
            # A feed that went away with its worker wants no more changes, and its store no
            # longer pauses the others.
            self._feed_requested(link.peer, False)
            self._peer_pressure(link.peer, False)
            self._fail_calls(link.peer, "its bus link closed before it replied")
            for move in list(self._moves.values()):
                if move.to == link.peer:
                    self._finish_move(move)
                else:
                    self._marked(move.session.client_id, (link.peer,))

    # --- routing ----------------------------------------------------------------------

    def _peer_consumer(self, peer: int) -> Callable[[Message], None]:
        def consume(message: Message) -> None:
            if message is self._inbound:
                return  # it came from the bus, and every worker got its own copy
            topic = message.topic
            if message.retain:
                return  # _retained_stored sends it to every peer
            topic = message.topic
            if topic.startswith("$"):
                if topic.startswith("$SYS/") and not topic.startswith(WORKER_SYS_PREFIX):
                    return  # every worker publishes its own $SYS figures
                if self._request_owner(topic) == peer:
                    return  # _route_request sends it to the owner as a REQUEST
            self._send_message(peer, bus.PUBLISH, message)

        return consume

    def _retained_stored(self, message: Message) -> None:
        """Send a retained message set on this worker to every peer, subscribed or not, so
        that a later subscriber on any worker receives it."""
        if self._catching_up and not self._storing_copy:
            self._touched_retained.add(message.topic)
        if message is self._inbound or self._storing_copy:
            return
        topic = message.topic
        if topic.startswith("$SYS/") and not topic.startswith(WORKER_SYS_PREFIX):
            return
        for peer in self._links:
            self._send_message(peer, bus.PUBLISH, message)

    def _request_owner(self, topic: str) -> int | None:
        """Return the owner of the thing of shadow request ``topic``, or None for other topics."""
        parsed = parse_shadow_topic(topic)
        if parsed is None or parsed[2] not in REQUEST_OPERATIONS:
            return None
        return owner_of(parsed[0], self.workers)

    def _send_message(self, peer: int, kind: int, message: Message, prefix: bytes = b"") -> bool:
        """Queue ``message`` for ``peer`` after ``prefix``; return False when it was dropped."""
        link = self._links[peer]
        if link is None:
            self._drops.dropped(peer, "no bus link to that worker")
            return False
        if link.congested():
            self._drops.dropped(peer, "its bus link is congested")
            return False
        if self._encoded_message is not message:
            self._encoded = bus.encode_message(message, time.monotonic())
            self._encoded_message = message
        link.send(bus.frame(kind, prefix + self._encoded))
        return True

    def _route_request(self, thing: str, message: Message) -> bool:
        """Send a request to the owner of ``thing``; return True when this worker must ignore it."""
        if message is self._inbound:
            # A REQUEST frame is for this worker; a PUBLISH copy is the owner's to handle.
            return not self._inbound_request
        owner = owner_of(thing, self.workers)
        if owner == self.index:
            return False
        if not message.qos:
            self._send_message(owner, bus.REQUEST, message, NO_RELEASE)
            return True
        # The publisher's PUBACK or PUBREC waits until the owner has stored the update and
        # sends RELEASED with this number, as it waits for a local shadow service.
        number = self._next_request = self._next_request % MAX_REQUEST_NUMBER + 1
        if self._send_message(owner, bus.REQUEST, message, number.to_bytes(4, "big")):
            message.hold()
            self._held[owner][number] = message
        else:
            # Hold the message, never to release it: the publisher gets no acknowledgement.
            message.hold()
            self._disconnect_publishers([message], f"worker {owner} cannot be reached", True)
        return True

    # --- session takeover -------------------------------------------------------------

    def client_connected(self, client_id: str, clean_start: bool) -> None:
        """Make a new connection take over any older one with the same id on another worker.

        The owner of the id receives a CLAIM for every connection with it that another worker
        accepted. It closes its own connection or lets its offline session give way, and
        sends TAKEOVER to the worker of the previous claim, which does the same. A handed-off
        client costs one dictionary lookup on its owner and no frame.
        """
        if client_id in self._early_claims:
            self._early_claims.discard(client_id)
            return
        flags = bus.CLEAN_START if clean_start else 0
        owner = owner_of(client_id, self.workers)
        if owner == self.index:
            previous = self._remote_clients.pop(client_id, None)
            if previous is not None:
                self._send_takeover(previous, flags, client_id)
            return
        self._send_claim(owner, flags, client_id)

    def client_disconnected(self, client_id: str) -> None:
        self._claims.pop(client_id, None)

    def _send_claim(self, owner: int, flags: int, client_id: str) -> bytes:
        claim = self._new_claim()
        self._claims[client_id] = claim
        self._send_to(owner, bus.frame(bus.CLAIM, claim + bytes((flags,)) + client_id.encode()))
        return claim

    def _new_claim(self) -> bytes:
        self._next_claim = self._next_claim % MAX_REQUEST_NUMBER + 1
        return self._next_claim.to_bytes(4, "big")

    def _fetch_session(self, client_id: str) -> asyncio.Future[None] | None:
        """Bring the session of ``client_id`` here from the worker that has it, for a
        connection without Clean Start that found none here (the broker's session fetch).

        A worker that does not own the id claims it with WANTS_SESSION, and the owner replies
        with its own session or has the worker of the latest claim send that one. The owner
        itself asks the worker of the latest claim, if there is one, and otherwise the
        session does not exist. Return the future that the CONNECT waits for, or None.
        """
        if client_id.startswith(INTERNAL_CLIENT_PREFIX):
            return None
        owner = owner_of(client_id, self.workers)
        if owner == self.index:
            previous = self._remote_clients.get(client_id)
            if previous is None or self._links[previous[0]] is None:
                return None
            del self._remote_clients[client_id]
            number = self._new_claim()
            self._send_takeover(previous, bus.WANTS_SESSION, client_id, self.index, number)
        else:
            if self._links[owner] is None:
                return None
            number = self._send_claim(owner, bus.WANTS_SESSION, client_id)
            self._early_claims.add(client_id)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        timer = loop.call_later(SESSION_WAIT, self._session_wait_over, number)
        self._session_waits[number] = (client_id, future, timer)
        return future

    def _announce_sessions(self, link: bus.OutboundLink) -> None:
        """Send a peer whose link has just opened the ids that it owns of the sessions here,
        because a restarted owner has no record of them."""
        peer = link.peer
        claims = self._claims
        parts = [
            claims.get(client_id, NO_CLAIM) + encode_string(client_id)
            for client_id, session in self.broker.sessions.items()
            if session.consumer is None
            and not client_id.startswith(INTERNAL_CLIENT_PREFIX)
            and owner_of(client_id, self.workers) == peer
        ]
        for start in range(0, len(parts), HELD_IDS_PER_FRAME):
            link.send(bus.frame(bus.HELD, b"".join(parts[start : start + HELD_IDS_PER_FRAME])))

    def _sessions_held(self, peer: int, body: bytearray, pos: int, end: int) -> None:
        """Record where the sessions of ids that this worker owns are, unless a session or
        a claim here is known for the id already."""
        sessions = self.broker.sessions
        while pos < end:
            claim = bytes(body[pos : pos + 4])
            client_id, pos = decode_string(body, pos + 4, end)
            if client_id not in sessions and client_id not in self._remote_clients:
                self._remote_clients[client_id] = (peer, claim)

    def _session_wait_over(self, number: bytes) -> None:
        wait = self._session_waits.pop(number, None)
        if wait is not None:
            log.warning(
                "client %s: fetching its session from another worker timed out after %.0f s; "
                "the client gets a new session",
                wait[0],
                SESSION_WAIT,
            )
            wait[1].set_result(None)

    def _claimed(self, peer: int, claim: bytes, flags: int, client_id: str) -> None:
        self._give_way(client_id, bool(flags & bus.CLEAN_START), peer)
        previous = self._remote_clients.get(client_id)
        self._remote_clients[client_id] = (peer, claim)
        if previous is not None and previous[0] != peer:
            # The session, if any, is on the worker of the previous claim.
            self._send_takeover(previous, flags, client_id, peer, claim)
        elif flags & bus.WANTS_SESSION:
            self._send_session(peer, claim, client_id)

    def _send_takeover(
        self,
        claim: tuple[int, bytes],
        flags: int,
        client_id: str,
        reply_to: int = 0,
        number: bytes = bytes(4),
    ) -> None:
        """Tell the worker of ``claim`` (its index and number) that a newer connection with
        ``client_id`` was made; with WANTS_SESSION in ``flags``, it sends the session to
        worker ``reply_to`` in a SESSION frame with ``number``."""
        data = claim[1] + bytes((flags,)) + reply_to.to_bytes(2, "big") + number
        self._send_to(claim[0], bus.frame(bus.TAKEOVER, data + client_id.encode()))

    def _taken_over(
        self, claim: bytes, flags: int, client_id: str, reply_to: int, number: bytes
    ) -> None:
        """Give way to a newer connection, unless this worker's connection with
        ``client_id`` is newer than ``claim``."""
        session = self.broker.sessions.get(client_id)
        if session is not None and (
            session.connection is None or self._claims.get(client_id) == claim
        ):
            owner = owner_of(client_id, self.workers)
            self._give_way(client_id, bool(flags & bus.CLEAN_START), owner)
        if flags & bus.WANTS_SESSION:
            self._send_session(reply_to, number, client_id)

    def _give_way(self, client_id: str, clean_start: bool, worker: int) -> None:
        """Close this worker's connection with ``client_id``, then let its session give way."""
        session = self.broker.sessions.get(client_id)
        if session is None:
            return
        if session.connection is not None:
            self._close_taken_over(session.connection, client_id, worker)
        self.broker.connected_elsewhere(client_id, clean_start)

    def _send_session(self, peer: int, number: bytes, client_id: str) -> None:
        """Move this worker's offline session of ``client_id`` to ``peer``, where a
        connection waits for it; send an empty SESSION frame when there is none."""
        data = b""
        session = self.broker.sessions.get(client_id)
        if session is not None and session.connection is None and session.consumer is None:
            data = encode_session(session, wall_clock_offset())
            if session.subscriptions:
                self._start_move(session, peer, number)
            else:
                self.broker.release_session(session)
            log.info("client %s: its session moves to worker %d", client_id, peer)
        self._send_to(peer, bus.frame(bus.SESSION, number + encode_string(client_id) + data))

    def _start_move(self, session: Session, peer: int, number: bytes) -> None:
        """Collect the messages routed to ``session`` here until every worker routes them
        to ``peer``, where the session goes, then send them there in TAIL.

        Each worker's messages come here in the order it sent them, and each marks the
        point after which it routes the session's messages to ``peer``: this worker and
        ``peer`` when MOVE_SYNC from ``peer`` arrives, every other worker with MARK. A
        message that a worker sent after its point reaches ``peer`` directly, so it is
        dropped here. The session's subscriptions stay in this worker's index meanwhile.
        """
        client_id = session.client_id
        previous = self._moves.get(client_id)
        if previous is not None:
            self._finish_move(previous)
        self.broker.detach_session(session)
        waiting = {worker for worker, link in self._links.items() if link is not None}
        waiting.add(self.index)
        timer = asyncio.get_running_loop().call_later(MOVE_WAIT, self._move_wait_over, client_id)
        move = _Move(session, peer, number, waiting, [], timer)
        session.consumer = partial(self._collect, move)
        self._moves[client_id] = move

    def _collect(self, move: _Move, message: Message) -> None:
        """Keep a message routed to a moving session, unless the session's new worker gets
        it directly.

        The new worker gets a message directly when a worker sent it after its mark and it
        matches a plain subscription. A worker sends a shared subscription's message to one
        worker only, so such a message is always kept.
        """
        origin = self._inbound_peer if message is self._inbound else self.index
        if origin not in move.waiting:
            topic = message.topic
            for topic_filter in move.session.subscriptions:
                group, inner = parse_shared_subscription(topic_filter)
                if group is None and topic_matches(inner, topic):
                    return
        move.messages.append(message)

    def _move_synced(self, peer: int, sender: int, client_id: str) -> None:
        """Handle MOVE_SYNC from ``peer``, which took in the session of ``client_id`` from
        worker ``sender``: mark the point after which this worker routes its messages there."""
        if sender == self.index:
            self._marked(client_id, (peer, self.index))
            return
        link = self._links[sender]
        if link is not None:
            link.send(bus.frame(bus.MARK, client_id.encode()))

    def _marked(self, client_id: str, workers: tuple[int, ...]) -> None:
        move = self._moves.get(client_id)
        if move is None:
            return
        move.waiting.difference_update(workers)
        if not move.waiting:
            self._finish_move(move)

    def _move_wait_over(self, client_id: str) -> None:
        move = self._moves.get(client_id)
        if move is None:
            return
        log.warning(
            "client %s: timed out after %.0f s waiting for worker(s) %s to route its messages "
            "to worker %d, where its session moved; sending the %d messages collected so far",
            client_id,
            MOVE_WAIT,
            ", ".join(str(worker) for worker in sorted(move.waiting)),
            move.to,
            len(move.messages),
        )
        self._finish_move(move)

    def _finish_move(self, move: _Move) -> None:
        """Send the messages collected for a moving session to its new worker in TAIL, and
        remove the session's subscriptions from this worker's index."""
        session = move.session
        client_id = session.client_id
        if self._moves.get(client_id) is move:
            del self._moves[client_id]
        move.timer.cancel()
        now = time.monotonic()
        parts = [move.number, encode_string(client_id)]
        for message in move.messages:
            encoded = bus.encode_message(message, now)
            parts.append(len(encoded).to_bytes(4, "big"))
            parts.append(encoded)
        self._send_to(move.to, bus.frame(bus.TAIL, b"".join(parts)))
        session.consumer = None
        self.broker.forget_detached(session)

    def _session_arrived(self, peer: int, number: bytes, client_id: str, data: bytes) -> None:
        """Take in a session that ``peer`` released (see _send_session), and let the
        CONNECT that waits for it go on once the peers have its subscriptions and the
        messages that went to ``peer`` meanwhile have come (see _start_move).

        A session that comes after its connection stopped waiting is kept offline, unless
        the client has a session here again by then.
        """
        wait = self._session_waits.pop(number, None)
        if wait is not None:
            wait[2].cancel()
        broker = self.broker
        adopted = None
        if data:
            try:
                session = decode_session(client_id, data, wall_clock_offset())
            except (StateDecodeError, struct.error) as exc:
                # NOTE: not expected, because the peer runs the same code.
                log.error("client %s: decoding its session from a peer failed: %s", client_id, exc)
            else:
                if client_id in broker.sessions:
                    log.warning(
                        "client %s: dropped its session from a peer, which came after the "
                        "client had connected without it",
                        client_id,
                    )
                else:
                    broker.adopt_session(session)
                    adopted = session
        resume = None
        if wait is not None:
            future = wait[1]

            def resume() -> None:
                if not future.done():
                    future.set_result(None)

        if adopted is not None and adopted.subscriptions:
            self._await_tail(peer, adopted, resume)
        elif resume is not None and not self._hold_suback(resume):
            resume()

    def _await_tail(
        self, peer: int, session: Session, resume: Callable[[], None] | None
    ) -> None:
        """Tell every peer that the session of a client came here from ``peer`` (MOVE_SYNC,
        after the announcements of its subscriptions), and hold the client's CONNECT until
        ``peer`` sends TAIL."""
        client_id = session.client_id
        data = bus.frame(bus.MOVE_SYNC, peer.to_bytes(2, "big") + client_id.encode())
        for link in self._links.values():
            if link is not None:
                link.send(data)
        # TAIL comes within MOVE_WAIT of the peer's SESSION frame, unless the peer is gone.
        timer = asyncio.get_running_loop().call_later(
            SESSION_WAIT, self._tail_wait_over, client_id
        )
        self._arrivals[client_id] = _Arrival(session, len(session.queue), resume, timer)

    def _tail_wait_over(self, client_id: str) -> None:
        arrival = self._arrivals.pop(client_id, None)
        if arrival is None:
            return
        log.warning(
            "client %s: timed out after %.0f s waiting for the messages routed to its session "
            "on its previous worker; the client resumes without them",
            client_id,
            SESSION_WAIT,
        )
        if arrival.resume is not None:
            arrival.resume()

    def _tail_arrived(self, body: bytearray, pos: int, end: int) -> None:
        """Queue the messages of a TAIL frame in the moved session, before the ones that
        reached it here, then let the client's CONNECT go on."""
        pos += 4
        client_id, pos = decode_string(body, pos, end)
        arrival = self._arrivals.pop(client_id, None)
        if arrival is not None:
            arrival.timer.cancel()
        broker = self.broker
        session = broker.sessions.get(client_id)
        if session is not None:
            queue = session.queue
            later = []
            if arrival is not None and arrival.session is session:
                while len(queue) > arrival.queued:
                    later.append(queue.pop())
            while pos < end:
                length = int.from_bytes(body[pos : pos + 4], "big")
                pos += 4
                broker.deliver_to(session, bus.decode_message(body, pos, pos + length))
                pos += length
            queue.extend(reversed(later))
        if arrival is not None and arrival.resume is not None:
            resume = arrival.resume
            if not self._hold_suback(resume):
                resume()

    def _close_taken_over(self, connection: MQTTConnection, client_id: str, worker: int) -> None:
        self.broker.log_takeover(
            "client %s from %s: a newer connection through worker %d takes over its session",
            client_id,
            connection.peer,
            worker,
        )
        connection.disconnect_reason = DUPLICATE_CLIENT_ID
        connection.close(ReasonCode.SESSION_TAKEN_OVER)

    def _ask_replay(self, thing: str, client_id: str, topic: str) -> bool:
        """Ask the owner of ``thing`` for the delta that a new subscriber here should get;
        return False when this worker owns it."""
        owner = owner_of(thing, self.workers)
        if owner == self.index:
            return False
        link = self._links[owner]
        if link is not None:
            link.send(bus.frame(bus.REPLAY, encode_string(client_id) + topic.encode()))
        return True

    def _replay_requested(self, peer: int, body: bytearray, pos: int, end: int) -> None:
        client_id, pos = decode_string(body, pos, end)
        topic = bytes(body[pos:end]).decode()
        payload = self.engine.shadows.delta_for(topic)
        link = self._links[peer]
        if payload is not None and link is not None:
            reply = encode_string(client_id) + encode_string(topic) + payload
            link.send(bus.frame(bus.DELTA, reply))

    def _request_arrived(self, peer: int, body: bytearray, pos: int, end: int) -> None:
        """Route a REQUEST frame, and send RELEASED back once its message is released."""
        number = int.from_bytes(body[pos : pos + 4], "big")
        message = bus.decode_message(body, pos + 4, end)
        self._inbound = message
        self._inbound_peer = peer
        self._inbound_request = True
        try:
            self.broker.publish(message, shared=False)
        finally:
            self._inbound = None
            self._inbound_request = False
        if not number:
            return
        data = bus.frame(bus.RELEASED, number.to_bytes(4, "big"))
        if message.holds:
            message.on_released = partial(self._send_released, peer, data)
        else:
            self._send_released(peer, data)

    def _send_released(self, peer: int, data: bytes) -> None:
        link = self._links[peer]
        # NOTE: lost when the link to the requester is not open, and its publisher then waits
        # for the acknowledgement until that link opens and closes. start() opens both
        # directions before a worker serves, so a restart does not lead here.
        if link is not None:
            link.send(data)

    def _release_held(self, peer: int, number: int) -> None:
        """Release the request ``number`` held for ``peer``: its publisher is acknowledged."""
        message = self._held[peer].pop(number, None)
        if message is not None:
            message.release()

    def _disconnect_publishers(
        self, messages: list[Message], reason: str, rarely: bool = False
    ) -> None:
        """Close the connections that published ``messages``, which stay unacknowledged.

        Each message is a QoS 1 or 2 shadow request that its owner may not have stored. The
        client sends it again after it reconnects (with a persistent session), or knows that
        it was not delivered. An acknowledgement would report as stored an update that may be
        lost. With ``rarely``, the same ``reason`` is logged at most once a minute (see
        ``Broker._log_rarely``), because while an owner is down every request for its
        things comes here on its own.
        """
        closed = 0
        loop = self.broker.loop
        for message in messages:
            session = self.broker.sessions.get(message.origin or "")
            connection = session.connection if session is not None else None
            if connection is not None and connection.state != CLOSED:
                # Soon rather than now: this may run inside the connection's own PUBLISH.
                loop.call_soon(connection.close, ReasonCode.SERVER_BUSY)
                closed += 1
        if not messages:
            return
        self._publishers_closed += closed
        text = (
            "worker %d: %s before confirming %d shadow request(s); closed %d publishing "
            "connection(s) without acknowledging them, so that the clients send them again "
            "(%d closed so in all)"
        )
        args = (self.index, reason, len(messages), closed, self._publishers_closed)
        if rarely:
            self.broker._log_rarely("unconfirmed-requests", reason, text, *args)
        else:
            log.warning(text, *args)

    # --- HTTP requests and metrics for other workers ---------------------------------

    def _forward_http(
        self, operation: str, thing: str, shadow_name: str | None, payload: bytes
    ) -> asyncio.Future[Reply] | None:
        """Send a REST shadow request to the owner of ``thing``, and return the future of
        its reply. Return None when this worker handles the request itself."""
        try:
            validate_thing_name(thing)
            if shadow_name is not None:
                validate_shadow_name(shadow_name)
        except ShadowError:
            return None  # this worker's service rejects it with 400, as the owner would
        owner = owner_of(thing, self.workers)
        if owner == self.index:
            return None

        def fail(reason: str, sent: bool) -> Reply:
            message = owner_not_responding(thing, owner, reason)
            if operation == "get":
                message += " Retry the request shortly."
            elif not sent:
                message += f" The {operation} was not sent there: retry it shortly."
            else:
                message += (
                    f" The {operation} may have been applied there: read the shadow before "
                    "you retry it."
                )
            return Reply(503, ShadowError(503, message).payload(int(time.time())), HTTP_RETRY_AFTER)

        body = bus.encode_http_call(
            self._next_call_number(), operation, thing, shadow_name, payload
        )
        return self._call(owner, bus.HTTP_CALL, body, HTTP_CALL_TIMEOUT, fail)

    def owner(self, name: str) -> int:
        """Return the worker that owns the thing or client id ``name``."""
        return owner_of(name, self.workers)

    def peer_silence(self, peer: int) -> float:
        """Return the seconds since ``peer`` last ran its event loop when they are at least
        SILENT_SECONDS, as while it is stopped or stuck, or 0.0.

        Without the supervisor's heartbeats (an in-process test cluster) it is always 0.0,
        and so it is for a peer that is starting: the supervisor clears its heartbeat when
        it exits and when it starts.
        """
        if self._heartbeats is None:
            return 0.0
        last = self._heartbeats.last(peer)
        if not last:
            return 0.0
        silence = time.monotonic() - last
        return silence if silence >= SILENT_SECONDS else 0.0

    async def call(
        self, peer: int, procedure: str, arguments: dict[str, Any], timeout: float = CALL_TIMEOUT
    ) -> Any:
        """Run ``procedure`` on ``peer`` and return its result; raise PeerCallError when it
        fails there or no reply comes within ``timeout`` seconds."""
        number = self._next_call_number()
        body = number.to_bytes(4, "big") + encode_string(procedure) + orjson.dumps(arguments)

        result = await self._call(
            peer, bus.CALL, body, timeout, lambda reason, _sent: PeerCallError(peer, reason)
        )
        if isinstance(result, PeerCallError):
            raise result
        return result

    def _procedure_called(self, peer: int, body: bytearray, pos: int, end: int) -> None:
        number = bytes(body[pos : pos + 4])
        name, pos = decode_string(body, pos + 4, end)
        arguments = orjson.loads(bytes(body[pos:end]))
        task = asyncio.get_running_loop().create_task(
            self._run_procedure(peer, number, name, arguments)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_procedure(
        self, peer: int, number: bytes, name: str, arguments: dict[str, Any]
    ) -> None:
        procedure = self.procedures.get(name)
        try:
            if procedure is None:
                raise LookupError(f"no procedure named {name!r} on worker {self.index}")
            reply = b"\x00" + orjson.dumps(await procedure(arguments))
        except Exception as exc:  # the caller gets the reason, and this worker goes on
            log.warning("worker %d: %s for worker %d failed: %r", self.index, name, peer, exc)
            reply = b"\x01" + repr(exc).encode()
        self._send_to(peer, bus.frame(bus.RESULT, number + reply))

    async def gather_metrics(self) -> dict[int, bytes | None]:
        """Ask every peer for its metrics, and return them by worker index. A peer that has
        no open link or does not reply within METRICS_CALL_TIMEOUT gets None."""
        futures = {
            peer: self._call(
                peer,
                bus.METRICS,
                self._next_call_number().to_bytes(4, "big"),
                METRICS_CALL_TIMEOUT,
                lambda _reason, _sent: None,
            )
            for peer in self._links
        }
        await asyncio.gather(*futures.values())
        return {peer: future.result() for peer, future in futures.items()}

    def _next_call_number(self) -> int:
        self._next_call = self._next_call % MAX_REQUEST_NUMBER + 1
        return self._next_call

    def _call(
        self,
        peer: int,
        kind: int,
        body: bytes,
        timeout: float,
        fail: Callable[[str, bool], Any],
    ) -> asyncio.Future[Any]:
        """Send a call frame whose body starts with its call number, and return the future
        of its result: the reply, or ``fail(reason, sent)`` when none comes within
        ``timeout`` or the frame could not be sent."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        link = self._links[peer]
        if link is None:
            future.set_result(fail("no bus link to it is open, as while it restarts", False))
            return future
        silence = self.peer_silence(peer)
        if silence:
            future.set_result(fail(silence_reason(silence), False))
            return future
        if link.congested():
            future.set_result(fail("its bus link is congested", False))
            return future
        if not link.send(bus.frame(kind, body)):
            future.set_result(fail("its bus link has just closed", False))
            return future
        number = int.from_bytes(body[:4], "big")
        timer = loop.call_later(timeout, self._call_timed_out, number, timeout)
        self._calls[number] = _Call(peer, future, timer, fail)
        return future

    def _call_timed_out(self, number: int, timeout: float) -> None:
        call = self._calls.pop(number, None)
        if call is not None:
            reason = f"no reply within {timeout:g} s"
            self._log_call_failure(call.peer, reason)
            if not call.future.done():
                call.future.set_result(call.fail(reason, True))

    def _log_call_failure(self, peer: int, reason: str) -> None:
        """Count a call that got no reply, and log it at most once a minute."""
        self._calls_failed += 1
        now = time.monotonic()
        if now - self._calls_failed_logged_at >= bus.DropCounter.INTERVAL:
            self._calls_failed_logged_at = now
            log.warning(
                "worker %d: a REST or metrics request to worker %d failed: %s "
                "(%d such failures in all)",
                self.index,
                peer,
                reason,
                self._calls_failed,
            )

    def _fail_calls(self, peer: int | None, reason: str) -> None:
        """End the waiting calls to ``peer`` (to every peer when None) with their failure."""
        numbers = [
            number for number, call in self._calls.items() if peer is None or call.peer == peer
        ]
        for number in numbers:
            call = self._calls.pop(number)
            call.timer.cancel()
            self._log_call_failure(call.peer, reason)
            if not call.future.done():
                call.future.set_result(call.fail(reason, True))

    def _finish_call(self, number: int, result: Any) -> None:
        call = self._calls.pop(number, None)
        if call is None:
            return  # its caller gave up before the reply came
        call.timer.cancel()
        if not call.future.done():
            call.future.set_result(result)

    def _call_frame(self, peer: int, kind: int, body: bytearray, pos: int, end: int) -> None:
        """Handle an HTTP_CALL, HTTP_REPLY, METRICS, METRICS_OF, CALL or RESULT frame from
        ``peer``."""
        if kind == bus.HTTP_CALL:
            self._http_call_arrived(peer, *bus.decode_http_call(body, pos, end))
        elif kind == bus.HTTP_REPLY:
            number, status, retry_after, reply_body = bus.decode_http_reply(body, pos, end)
            self._finish_call(number, Reply(status, reply_body, retry_after))
        elif kind == bus.METRICS:
            source = self.metrics_source
            metrics = source() if source is not None else b"[]"
            self._send_to(peer, bus.frame(bus.METRICS_OF, bytes(body[pos : pos + 4]) + metrics))
        elif kind == bus.METRICS_OF:
            self._finish_call(
                int.from_bytes(body[pos : pos + 4], "big"), bytes(body[pos + 4 : end])
            )
        elif kind == bus.CALL:
            self._procedure_called(peer, body, pos, end)
        elif kind == bus.RESULT:
            number = int.from_bytes(body[pos : pos + 4], "big")
            if body[pos + 4] == 0:
                result: Any = orjson.loads(bytes(body[pos + 5 : end]))
            else:
                reason = bytes(body[pos + 5 : end]).decode(errors="replace")
                result = PeerCallError(peer, f"the request failed there: {reason}")
            self._finish_call(number, result)
        else:
            raise ValueError(f"unknown frame kind {kind}")

    def _http_call_arrived(
        self,
        peer: int,
        number: int,
        operation: str,
        thing: str,
        shadow_name: str | None,
        payload: bytes,
    ) -> None:
        """Apply a REST shadow request that ``peer`` received, and send the reply back once
        the change is durable."""

        def send_reply(reply: Reply) -> None:
            data = bus.encode_http_reply(number, reply.status, reply.retry_after, reply.body)
            self._send_to(peer, bus.frame(bus.HTTP_REPLY, data))

        pipeline = self.engine.pipeline
        if operation != "get" and pipeline is not None and pipeline.pressure:
            message = (
                f"Worker {self.index}, which owns thing {thing!r}, is waiting for its store to "
                "catch up; retry the request later."
            )
            send_reply(
                Reply(503, ShadowError(503, message).payload(int(time.time())), HTTP_RETRY_AFTER)
            )
            return
        self.engine.shadows.apply_http_request(operation, thing, shadow_name, payload, send_reply)

    def _send_to(self, peer: int, data: bytes) -> None:
        """Queue a reply frame for ``peer``; without a link it is lost, and the caller's
        timeout ends the wait."""
        link = self._links[peer]
        if link is not None:
            link.send(data)

    # --- $SYS -------------------------------------------------------------------------

    def _sys_totals(self, topics: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """Return the broker's $SYS figures with each summed figure (SUMMED_SYS_TOPICS and
        the loads) replaced by the total over this worker and its peers' latest reports."""
        own: dict[str, float] = {}
        totals = []
        for topic, payload in topics:
            if topic in SUMMED_SYS_TOPICS or topic.startswith(SYS_LOAD_PREFIX):
                value = float(payload)
                if topic == "$SYS/broker/subscriptions/count":
                    value -= self._peer_records()
                own[topic] = value
                value += sum(figures.get(topic, 0) for figures in self._peer_figures.values())
                is_load = topic.startswith(SYS_LOAD_PREFIX)
                payload = f"{value:.2f}" if is_load else str(int(value))
            totals.append((topic, payload))
        self._own_figures = own
        return totals

    def _peer_records(self) -> int:
        """Return how many subscription records stand for the peers' subscriptions here."""
        records = sum(len(session.subscriptions) for session in self._peer_sessions.values())
        return records + sum(len(member.subscriptions) for member in self._shared_members.values())

    def _publish_sys(self) -> None:
        broker = self.broker
        if self._own_figures:
            data = bus.frame(bus.FIGURES, orjson.dumps(self._own_figures))
            for link in self._links.values():
                if link is not None:
                    link.send(data)
        interval = broker.config.sys_interval
        self._sys_timer = broker.loop.call_later(interval, self._publish_sys)
        connected = sum(1 for connection in broker.connections if connection.state == CONNECTED)
        prefix = f"{WORKER_SYS_PREFIX}{self.index}/"
        figures = (
            ("pid", os.getpid()),
            ("clients/connected", connected),
            ("connections/handed-off", self.handed_off),
            ("connections/adopted", self.adopted),
            ("connections/hand-off-failed", self.handoff_failed),
            ("bus/dropped", self._drops.count),
        )
        for name, value in figures:
            broker.publish(Message(prefix + name, str(value).encode(), 0, True))


def _own_sys_topic(topic: str) -> bool:
    """Return whether ``topic`` is one of the $SYS topics that each worker sets itself."""
    return topic.startswith("$SYS/") and not topic.startswith(WORKER_SYS_PREFIX)


class _TakeoverHooks(BrokerHooks):
    """Passes the broker's connection events to :meth:`ClusterWorker.client_connected`."""

    def __init__(self, worker: ClusterWorker) -> None:
        self.worker = worker

    def client_connected(self, connection: MQTTConnection) -> None:
        session = connection.session
        if session is not None and not session.client_id.startswith(INTERNAL_CLIENT_PREFIX):
            self.worker.client_connected(session.client_id, connection.clean_start)

    def client_disconnected(self, connection: MQTTConnection, reason: str) -> None:
        session = connection.session
        if session is not None and session.connection is None:
            self.worker.client_disconnected(session.client_id)

