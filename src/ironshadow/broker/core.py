"""The broker: sessions, routing, retained messages, wills, admission and flow control.

Everything here runs on one event loop and never blocks. The I/O of each client lives in
:class:`~ironshadow.broker.connection.MQTTConnection`; this module decides what to send.

Admission. Sockets are accepted as fast as the loop can (the listen backlog absorbs bursts)
and each new socket must send CONNECT within ``connect_timeout``. CONNECT packets are then
processed at no more than ``connect_rate`` per second: the ones over the rate wait in a FIFO
admission queue with their socket paused, so a reconnect storm is served in arrival order while
connected clients keep being served.

Broker-wide pause. ``pause_reading()`` stops reading from every connection, new ones included,
until ``resume_reading()``; storage layers raise it when their queues fill up, so that TCP flow
control slows the devices down. Keep-alive timers do not expire while the pause is in force.

Saved state. When the engine keeps MQTT state across restarts, ``state_changes`` collects the
retained topics and sessions that changed, and the engine writes them behind (see
``persistence``). Without it the broker keeps everything in memory only.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import secrets
import socket
import time
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from ..mqtt.constants import MQTT_5
from ..mqtt.errors import MQTTProtocolError, protocol_error
from ..mqtt.packets import Connack, Connect, Suback, Subscribe, Unsuback, Unsubscribe
from ..mqtt.properties import Properties, PropertyId
from ..mqtt.reason_codes import ConnackReturnCode, ReasonCode
from ..mqtt.topics import parse_shared_subscription, topic_matches, validate_topic_filter
from . import hooks as reasons
from . import tls
from .access import AccessPolicy, AuthenticationResult, Principal, Rejection
from .config import (
    FILE_DESCRIPTOR_RESERVE,
    QUEUE_FULL_DROP_OLDEST,
    TLS_NAME_FIELDS,
    BrokerConfig,
)
from .connection import CLOSED, CONNECTED, CONNECTING, MQTTConnection
from .hooks import BrokerHooks
from .limits import MAX_CONNECTIONS, AbuseLimits
from .message import Message
from .retained import RetainedStore
from .session import (
    AWAITING_PUBACK,
    AWAITING_PUBCOMP,
    AWAITING_PUBREC,
    NEVER_EXPIRES,
    Delivery,
    Session,
)
from .stats import BrokerStats
from .subscriptions import SubscriptionIndex, SubscriptionRecord

if TYPE_CHECKING:
    import ssl

    from .persistence import StateChanges

log = logging.getLogger("ironshadow.broker")


def default_max_connections() -> int:
    """Return the connection limit that the open-file limit of this process allows."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1_000_000
    return max(1, soft - FILE_DESCRIPTOR_RESERVE)

# Shares of its connection limit at which a broker that shares its listening socket with
# other workers stops accepting from it, and below which it accepts again. The rest of the
# limit is kept for the connections that the other workers hand to it (its own clients),
# and the gap between the two keeps it from switching on every close.
ACCEPT_STOP_SHARE = 0.9
ACCEPT_RESUME_SHARE = 0.85
# Connections accepted over max_connections at once, at least: as many more as the open-file
# limit leaves (see Broker.max_over_limit). Each waits for its CONNECT and stays only if it
# takes over the session of a connected client. A device that reconnects after a network
# drop that the engine did not notice does so, because its old connection still occupies a
# place until its keep alive expires.
MIN_OVER_LIMIT = 64
# Seconds that a connection accepted over max_connections has to send CONNECT.
OVER_LIMIT_CONNECT_TIMEOUT = 2.0
# Client ids of the engine's internal consumers; clients may not use them.
INTERNAL_CLIENT_PREFIX = "$internal/"
# Shortest interval between two batches of queued CONNECTs, in seconds.
ADMISSION_TICK = 0.01
# How often keep-alive and CONNECT timeouts are checked, in seconds.
SWEEP_INTERVAL = 0.5
# Clients named one by one in the log when changed access rules disconnect them; past this
# many, one line gives the total.
ACCESS_LOG_LINES = 20
# Repeated warnings about one client (dropped messages, rejected connections) are logged
# at most once per this many seconds.
LOG_REPEAT_INTERVAL = 60.0
# Session takeovers logged one by one per LOG_REPEAT_INTERVAL. Devices that reconnect after
# a silent network drop take over thousands of sessions at once, so past this many, one line
# at the end of the interval gives the number of the others.
TAKEOVER_LOG_LINES = 20
_PUBREL_HEADER = b"\x62\x02"


class LogBudget:
    """A log of one kind of INFO message: up to ``lines`` per ``interval`` seconds are
    written, the others counted. An interval with skipped messages ends with one line,
    ``summary`` formatted with their number, the seconds of the interval so far (less than
    ``interval`` at shutdown) and ``lines``."""

    def __init__(self, lines: int, interval: float, summary: str) -> None:
        self.lines = lines
        self.interval = interval
        self.summary = summary
        self._logged = 0
        self._skipped = 0
        self._ends = 0.0
        self._handle: asyncio.TimerHandle | None = None

    def info(self, loop: asyncio.AbstractEventLoop, message: str, *args: object) -> None:
        """Write ``message`` at INFO if the interval allows another line, or count it."""
        now = time.monotonic()
        if now >= self._ends:
            self.flush()  # in case its timer has not run yet
            self._ends = now + self.interval
            self._logged = 0
        if self._logged < self.lines:
            self._logged += 1
            log.info(message, *args)
            return
        if not self._skipped:
            self._handle = loop.call_later(self._ends - now, self.flush)
        self._skipped += 1

    def flush(self) -> None:
        """Write the summary line if messages were skipped; the broker calls it at shutdown."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._skipped:
            started = self._ends - self.interval
            elapsed = min(time.monotonic(), self._ends) - started
            log.info(self.summary, self._skipped, elapsed, self.lines)
            self._skipped = 0


def _sockets(server: asyncio.AbstractServer) -> list[socket.socket]:
    """Return the listening sockets of ``server``.

    uvloop returns a list where asyncio's type stubs declare a tuple, and the compiled build
    (setup.py) checks declared types, so the attribute is read without one.
    """
    sockets: Any = getattr(server, "sockets")  # noqa: B009, the declared type is wrong
    return list(sockets)


def _merge_delivery(
    delivery: Delivery | None, record: SubscriptionRecord, message: Message
) -> Delivery:
    """Return the delivery of ``message`` by ``record``, merged into the session's
    ``delivery`` by another matching subscription if there is one: one copy with the highest
    QoS and every subscription identifier [MQTT-3.3.4-2]."""
    qos = record.qos if record.qos < message.qos else message.qos
    retain = message.retain and record.retain_as_published
    if delivery is None:
        ids = [record.subscription_id] if record.subscription_id else None
        return Delivery(message, qos, retain, ids)
    delivery.qos = max(delivery.qos, qos)
    delivery.retain = delivery.retain or retain
    if record.subscription_id:
        if delivery.subscription_ids is None:
            delivery.subscription_ids = []
        delivery.subscription_ids.append(record.subscription_id)
    return delivery


class Broker:
    def __init__(
        self, config: BrokerConfig | None = None, access: AccessPolicy | None = None
    ) -> None:
        self.config = config or BrokerConfig()
        # Who may connect and which topics they may use; the default allows everything.
        # Replace it before start() or between connections; see ``access``.
        self.access = access or AccessPolicy()
        # Connections whose CONNECT waits, on hold meanwhile: for the access policy, or for
        # their session to come from another worker (``session_fetch``).
        self._connects_waiting: set[MQTTConnection] = set()
        self.sessions: dict[str, Session] = {}
        self.connections: set[MQTTConnection] = set()
        # Those of ``connections`` accepted over max_connections that have not sent
        # CONNECT yet (see MIN_OVER_LIMIT).
        self.over_limit = 0
        self.index = SubscriptionIndex()
        self.retained = RetainedStore()
        self.stats = BrokerStats()
        # Per-address and per-client abuse limits; see ``limits``.
        self.limits = AbuseLimits(self)
        self.reading_paused = False
        # Whether the current pause is one of pause_reading(brief=True).
        self._brief_pause = False
        self.paused_since: float | None = None
        # Connections that held packets because of a broker-wide pause, oldest first (a dict
        # as an ordered set). A brief resume releases only these.
        self.held_in_pause: dict[MQTTConnection, None] = {}
        self._dirty: list[MQTTConnection] = []
        self._admission: deque[tuple[MQTTConnection, Connect]] = deque()
        self._admission_tokens = 0.0
        self._admission_refilled = time.monotonic()
        self._admission_handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._servers: list[asyncio.base_events.Server] = []
        self._sweep_handle: asyncio.TimerHandle | None = None
        self._sys_handle: asyncio.TimerHandle | None = None
        self._log_times: dict[tuple[str, str], float] = {}
        self._takeover_log = LogBudget(
            TAKEOVER_LOG_LINES,
            LOG_REPEAT_INTERVAL,
            "%d more clients took over their sessions in the last %.0f s; the first %d of "
            "that interval are named above",
        )
        self._deny = tuple(self.config.deny_subscriptions)
        descriptors = default_max_connections()
        self.max_connections = self.config.max_connections or descriptors
        # The maximum of ``over_limit``: the descriptors left above max_connections.
        self.max_over_limit = max(MIN_OVER_LIMIT, descriptors - self.max_connections)
        self.hooks: list[BrokerHooks] = []
        self._lingering: set[asyncio.Transport] = set()
        # Retained topics and sessions changed since the last save, when the engine persists
        # MQTT state (see ``persistence``); None when nothing is persisted.
        self.state_changes: StateChanges | None = None
        # Set by a cluster worker before start(). ``listen_socket`` is the TCP listening
        # socket that the supervisor bound, used instead of binding one, and
        # ``tcp_connection_class`` the protocol of its connections. ``connect_router`` may
        # pass a connection to another worker at CONNECT, or reject it, and returns True
        # when it did either.
        # ``subscribe_barrier(finish)`` may delay the SUBACK of a SUBSCRIBE until the other
        # workers have its new filters. It returns True when it will call ``finish`` later,
        # and False to have it called now. ``finish`` sends the SUBACK and the retained
        # messages.
        self.listen_socket: socket.socket | None = None
        # The same for the TLS port, which the supervisor binds too.
        self.tls_listen_socket: socket.socket | None = None
        # With a shared TCP listening socket, a broker at its connection limit stops
        # accepting and leaves new connections to the other workers, instead of rejecting
        # them. ``_listen_fd`` is a copy of the socket's descriptor to accept from again.
        self._listen_fd: int | None = None
        self._accept_stopped = False
        self._accept_resuming = False
        # ``held_descriptors()`` returns how many descriptors this process holds for
        # connections that are not in ``connections``, such as a cluster worker's copies of
        # connections waiting to be handed off. They count toward the share of the limit
        # at which the broker stops accepting; call ``descriptors_released()`` when some
        # are closed.
        self.held_descriptors: Callable[[], int] | None = None
        self._resume_task: asyncio.Task[None] | None = None
        self.tcp_connection_class: type[MQTTConnection] = MQTTConnection
        self.connect_router: Callable[[MQTTConnection, Connect], bool] | None = None
        self.subscribe_barrier: Callable[[Callable[[], None]], bool] | None = None
        # ``session_fetch(client_id)`` may bring the session of a client that connects
        # without Clean Start from the worker that has it. It returns a future that is done
        # once the session is in ``sessions`` or is known not to exist, or None when no other
        # worker can have it. The CONNECT waits for the future.
        self.session_fetch: Callable[[str], asyncio.Future[None] | None] | None = None
        # ``sys_totals(topics)`` may turn this broker's $SYS figures into figures for the
        # whole engine before they are published, as a cluster worker does.
        self.sys_totals: Callable[[list[tuple[str, str]]], list[tuple[str, str]]] | None = None

    # --- extension points -------------------------------------------------------------

    def add_hooks(self, hooks: BrokerHooks) -> None:
        self.hooks.append(hooks)

    def add_consumer(
        self, name: str, topic_filters: list[str], callback: Callable[[Message], None]
    ) -> Session:
        """Subscribe a consumer inside the engine to ``topic_filters``.

        Matching messages are passed to ``callback`` as they are routed, with no queue and
        no QoS flow. The consumer counts as a subscriber for :meth:`has_subscribers`.
        """
        client_id = INTERNAL_CLIENT_PREFIX + name
        session = Session(client_id)
        session.consumer = callback
        session.expiry_interval = NEVER_EXPIRES
        self.sessions[client_id] = session
        for topic_filter in topic_filters:
            validate_topic_filter(topic_filter)
            record = SubscriptionRecord(session, topic_filter, 2)
            session.subscriptions[topic_filter] = record
            self.index.add(topic_filter, record)
        return session

    def has_subscribers(self, topic: str) -> bool:
        """Whether any subscription matches ``topic``: connected, offline or internal.

        Callers skip building a message that nobody would receive.
        """
        return bool(self.index.match(topic))

    def session_changed(self, session: Session) -> None:
        """Mark a persistent session's state changed, for the next save of the MQTT state.

        It runs on every queue and acknowledgement change, so it ignores sessions that end at
        disconnect. Connect, disconnect and the end of a session call :meth:`_mark_session`
        instead, which marks every session, because such a session may replace or delete a
        saved persistent one.
        """
        changes = self.state_changes
        if changes is not None and session.expiry_interval:
            changes.sessions[session.client_id] = None

    def _mark_session(self, client_id: str) -> None:
        changes = self.state_changes
        if changes is not None:
            changes.sessions[client_id] = None

    # --- lifecycle --------------------------------------------------------------------

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    async def start(self) -> None:
        """Open the TCP listener, and the TLS listener when configured, then start the
        periodic work.

        Raises TLSConfigError for an invalid TLS file before any listener opens, and
        TLSListenerError when the TLS port cannot be bound.
        """
        config = self.config
        tls_context = None
        if config.tls_cert or config.tls_key or config.tls_ca:
            tls_context = self._tls_context()
        connection_class = self.tcp_connection_class
        if self.listen_socket is not None:
            self._listen_fd = os.dup(self.listen_socket.fileno())
        server = await self.loop.create_server(
            lambda: connection_class(self),
            backlog=config.listen_backlog,
            **self._listen_address(self.listen_socket, config.port),
        )
        self._servers.append(server)
        if tls_context is not None:
            try:
                self._servers.append(await self._open_tls_listener(tls_context))
            except BaseException:
                server.close()
                await server.wait_closed()
                self._servers.clear()
                raise
        self._sweep_handle = self.loop.call_later(SWEEP_INTERVAL, self._sweep)
        if config.sys_interval > 0:
            self._sys_handle = self.loop.call_later(config.sys_interval, self._publish_sys)
        addresses = ", ".join(
            f"{sock.getsockname()[0]}:{sock.getsockname()[1]}" for sock in _sockets(server)
        )
        rate = f"{config.connect_rate:g}" if config.connect_rate else "unlimited"
        if self.listen_socket is None:
            log.info(
                "MQTT listener open on %s; at most %d connections, %s CONNECT packets per "
                "second",
                addresses,
                self.max_connections,
                rate,
            )
        else:
            # A cluster worker: --max-connections is counted for the whole engine (see
            # AbuseLimits.shared), and the CONNECT rate is this worker's share.
            log.info(
                "MQTT listener open on %s; this worker holds at most %d connections (its "
                "open-file limit) and admits %s CONNECT packets per second",
                addresses,
                self.max_connections,
                rate,
            )
        if tls_context is not None:
            self._log_tls_listener(self._servers[-1])

    def _listen_address(self, sock: socket.socket | None, port: int) -> dict[str, Any]:
        """Return the create_server() arguments that name where to listen: the socket that
        a cluster's supervisor bound, or the configured host and ``port``."""
        if sock is not None:
            return {"sock": sock}
        return {"host": self.config.host, "port": port, "reuse_address": True}

    def _tls_context(self) -> ssl.SSLContext:
        config = self.config
        if config.tls_name_field not in TLS_NAME_FIELDS:
            raise tls.TLSConfigError(
                f"invalid tls_name_field {config.tls_name_field!r}: choose one of "
                + ", ".join(TLS_NAME_FIELDS)
            )
        context = tls.server_context(config.tls_cert, config.tls_key, config.tls_ca)
        tls.report_handshake_failures(context, self._tls_handshake_failed)
        return context

    async def _open_tls_listener(self, context: ssl.SSLContext) -> asyncio.base_events.Server:
        config = self.config
        try:
            server = await self.loop.create_server(
                lambda: MQTTConnection(self),
                ssl=context,
                ssl_handshake_timeout=config.tls_handshake_timeout,
                backlog=config.listen_backlog,
                **self._listen_address(self.tls_listen_socket, config.tls_port),
            )
        except OSError as exc:
            raise tls.TLSListenerError(
                exc.errno,
                f"cannot open the MQTT TLS listener on {config.host}:{config.tls_port}: "
                f"{exc.strerror}",
            ) from exc
        return server

    def _log_tls_listener(self, server: asyncio.base_events.Server) -> None:
        config = self.config
        addresses = ", ".join(
            f"{sock.getsockname()[0]}:{sock.getsockname()[1]}" for sock in _sockets(server)
        )
        if config.tls_ca:
            clients = (
                f"client certificates required (CA file {config.tls_ca}), thing name from "
                f"{config.tls_name_field}"
            )
        else:
            clients = "no client certificates requested"
        log.info("MQTT TLS listener open on %s; %s", addresses, clients)

    def _tls_handshake_failed(self, exc: ssl.SSLError) -> None:
        # The peer's address is not known here: the failing handshake runs inside the
        # SSL object, which has no reference to its transport.
        self.stats.connections_rejected += 1
        reason = tls.handshake_error_text(exc)
        self._log_rarely(
            "tls-handshake",
            reason,
            "TLS handshake on port %d failed: %s. Repeats of this reason are logged at most "
            "once a minute",
            self.config.tls_port,
            reason,
        )

    def listening(self) -> bool:
        """Return whether the MQTT listener is open and accepting connections."""
        return bool(self._servers) and all(server.is_serving() for server in self._servers)

    @property
    def ports(self) -> list[int]:
        return [sock.getsockname()[1] for server in self._servers for sock in _sockets(server)]

    async def shutdown(self) -> None:
        """Stop accepting, tell v5 clients the server is shutting down, flush and close."""
        for server in self._servers:
            server.close()
        for handle in (self._sweep_handle, self._sys_handle, self._admission_handle):
            if handle is not None:
                handle.cancel()
        self.limits.close()
        count = len(self.connections)
        for connection in list(self.connections):
            connection.disconnect_reason = reasons.SERVER_INITIATED_DISCONNECT
            connection.close(ReasonCode.SERVER_SHUTTING_DOWN, publish_will=False, linger=False)
        for transport in self._lingering:
            transport.close()
        self._lingering.clear()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        if self._listen_fd is not None:
            os.close(self._listen_fd)
            self._listen_fd = None
        for session in self.sessions.values():
            session.cancel_timers()
        self._takeover_log.flush()
        log.info("broker stopped; %d connection(s) closed", count)

    # --- connections ------------------------------------------------------------------

    def linger(self, transport: asyncio.Transport, seconds: float) -> None:
        """Close a half-closed transport after ``seconds``, or at shutdown if that is sooner."""
        self._lingering.add(transport)

        def close() -> None:
            self._lingering.discard(transport)
            transport.close()

        self.loop.call_later(seconds, close)

    def connection_made(self, connection: MQTTConnection) -> None:
        over = self.limits.connection_opened(connection)
        limit = self.max_connections
        if over is None and len(self.connections) - self.over_limit >= limit:
            # The limits above counted it, or the worker that passed it here did: undo that.
            self.limits.connection_closed(connection)
            over = MAX_CONNECTIONS
        if over is not None:
            if over != MAX_CONNECTIONS:
                self._reject_at_accept(connection)
                return
            if self.over_limit >= self.max_over_limit:
                self._log_rarely(
                    "max-connections",
                    "",
                    "connection from %s rejected: %s",
                    connection.peer,
                    self._connection_limit_text(),
                )
                self._reject_at_accept(connection)
                return
            # Kept until its CONNECT shows whether it takes over a session (see _connect).
            connection.over_limit = True
            self.over_limit += 1
        elif not connection.counted_by_peer():
            # The worker that accepted it and passed it here counted it already.
            self.stats.connections_accepted += 1
        self.connections.add(connection)
        if self._listen_fd is not None and self._descriptors_in_use() >= limit * ACCEPT_STOP_SHARE:
            self._stop_accepting()
        if self.reading_paused:
            connection.transport.pause_reading()
            self.release_after_pause(connection)

    def _connection_limit_text(self) -> str:
        """Return how many connections are open against the limit that was reached: the
        whole engine's with several workers, unless this worker's own limit is lower."""
        open_here = len(self.connections) - self.over_limit
        if self.limits.shared is None or open_here >= self.max_connections:
            noun = "connection" if open_here == 1 else "connections"
            return f"{open_here} {noun} open, the maximum is {self.max_connections}"
        return (
            f"the workers hold {self.limits.engine_connections()} connections, the maximum "
            f"is {self.config.max_connections} (max_connections)"
        )

    def _place_freed(self, connection: MQTTConnection) -> bool:
        """Count a connection accepted over max_connections, and return True, when a place
        has been freed since it was accepted."""
        if len(self.connections) - self.over_limit >= self.max_connections:
            return False
        return self.limits.connection_opened(connection) is None

    def _reject_at_accept(self, connection: MQTTConnection) -> None:
        self.stats.connections_rejected += 1
        connection.state = CLOSED
        connection.transport.abort()
        connection.transport = None

    def _stop_accepting(self) -> None:
        """Stop accepting from the shared listening socket: its other workers take the new
        connections until this one is below ACCEPT_RESUME_SHARE of its limit again."""
        if self._accept_stopped or not self._servers:
            return
        self._accept_stopped = True
        self._servers[0].close()
        log.info(
            "%d connections open and %d waiting to be handed off, of at most %d: accepting "
            "none until some close, and keeping the rest for clients handed over by the "
            "other workers, which accept new connections meanwhile",
            len(self.connections),
            self._descriptors_in_use() - len(self.connections),
            self.max_connections,
        )

    def _descriptors_in_use(self) -> int:
        held = self.held_descriptors
        return len(self.connections) + (held() if held is not None else 0)

    def descriptors_released(self) -> None:
        """Accept again if accepting stopped and the descriptors in use are below
        ACCEPT_RESUME_SHARE of the limit now."""
        if (
            self._accept_stopped
            and not self._accept_resuming
            and self._listen_fd is not None  # None once the broker has shut down
            and self._descriptors_in_use() < self.max_connections * ACCEPT_RESUME_SHARE
        ):
            self._accept_resuming = True
            self._resume_task = self.loop.create_task(self._resume_accepting())

    async def _resume_accepting(self) -> None:
        assert self._listen_fd is not None
        sock = socket.socket(fileno=os.dup(self._listen_fd))
        connection_class = self.tcp_connection_class
        try:
            server = await self.loop.create_server(
                lambda: connection_class(self), sock=sock, backlog=self.config.listen_backlog
            )
        except OSError as exc:
            sock.close()
            log.error("accepting connections again failed: %s; restart the engine", exc)
            return
        finally:
            self._accept_resuming = False
        if self._listen_fd is None:  # the broker shut down meanwhile
            server.close()
            return
        self._servers[0] = server
        self._accept_stopped = False
        log.info("%d connections open: accepting again", len(self.connections))

    def connection_lost(self, connection: MQTTConnection) -> None:
        if connection.over_limit:
            connection.over_limit = False  # never counted in the limits
            self.over_limit -= 1
        elif connection in self.connections:
            self.limits.connection_closed(connection)
        self.connections.discard(connection)
        self.descriptors_released()
        self.held_in_pause.pop(connection, None)
        session = connection.session
        if session is None or session.connection is not connection:
            return
        session.connection = None
        for hooks in self.hooks:
            hooks.client_disconnected(connection, connection.disconnect_reason)
        will = connection.will
        connection.will = None
        if will is not None:
            delay = will.properties.get(PropertyId.WILL_DELAY_INTERVAL, 0)
            if session.expiry_interval == 0 or delay == 0:
                self._publish_will(will, connection.client_id)
            else:
                # [MQTT-3.1.3-9] Sent after the delay unless the session resumes first,
                # and no later than the end of the session.
                delay = min(delay, session.expiry_interval)
                session.will = will
                session.will_at = time.time() + delay
                session.will_handle = self.loop.call_later(
                    delay, self._fire_delayed_will, session
                )
        if session.expiry_interval == 0:
            self._end_session(session)
            return
        if session.expiry_interval != NEVER_EXPIRES:
            session.ends_at = time.time() + session.expiry_interval
            session.expiry_handle = self.loop.call_later(
                session.expiry_interval, self._expire_session, session
            )
        self._mark_session(session.client_id)

    def connected_elsewhere(self, client_id: str, clean_start: bool) -> None:
        """Let an offline session give way to a connection with its client id that another
        engine process (a cluster worker's peer) accepted.

        As for a connection here, Clean Start ends the session and sends a pending delayed
        will now, and otherwise the delayed will is cancelled [MQTT-3.1.3-9]. The session's
        other state stays here until :meth:`release_session` moves it.
        """
        session = self.sessions.get(client_id)
        if session is None or session.connection is not None:
            return
        if clean_start:
            self._end_session(session)
        elif session.will is not None:
            self._cancel_will(session)
            log.info("client %s connected through another worker; its delayed will is "
                     "cancelled", client_id)
            self._mark_session(client_id)

    def release_session(self, session: Session) -> None:
        """Remove an offline session that moves to another engine process (a cluster
        worker's peer), where a connection resumes it.

        Its subscriptions leave the index, and a pending delayed will is dropped, not sent:
        the resuming connection cancels it [MQTT-3.1.3-9].
        """
        self.detach_session(session)
        self.forget_detached(session)

    def detach_session(self, session: Session) -> None:
        """Remove an offline session that moves to another engine process, as
        :meth:`release_session` does, but keep its subscriptions in the index until
        :meth:`forget_detached`. Meanwhile the messages routed to it go to its consumer,
        which the caller sets."""
        if self.sessions.get(session.client_id) is session:
            del self.sessions[session.client_id]
        self._cancel_will(session)
        session.queue.clear()
        session.inflight.clear()
        session.cancel_timers()
        self._mark_session(session.client_id)

    def forget_detached(self, session: Session) -> None:
        """Take the subscriptions of a session removed by :meth:`detach_session` out of the
        index, except those that a newer session with its client id has made since."""
        newer = self.sessions.get(session.client_id)
        for topic_filter in session.subscriptions:
            if newer is not None and topic_filter in newer.subscriptions:
                continue
            group, inner = parse_shared_subscription(topic_filter)
            self.index.remove(inner, session.client_id, group)
        session.subscriptions.clear()

    @staticmethod
    def _cancel_will(session: Session) -> None:
        if session.will_handle is not None:
            session.will_handle.cancel()
            session.will_handle = None
        session.will = None
        session.will_at = None

    def adopt_session(self, session: Session) -> None:
        """Take in an offline session that another engine process released, with its
        subscriptions and queued messages. Its expiry runs on from its saved end."""
        self.sessions[session.client_id] = session
        for topic_filter, record in session.subscriptions.items():
            _group, inner = parse_shared_subscription(topic_filter)
            self.index.add(inner, record)
        if session.ends_at is not None:
            session.expiry_handle = self.loop.call_later(
                max(0.0, session.ends_at - time.time()), self._expire_session, session
            )
        self._mark_session(session.client_id)

    def _publish_will(self, will, client_id: str) -> None:  # type: ignore[no-untyped-def]
        # Will Delay Interval belongs to CONNECT and is not valid in a PUBLISH, so a
        # subscriber would reject the message as malformed.
        properties = {
            key: value
            for key, value in will.properties.items()
            if key != PropertyId.WILL_DELAY_INTERVAL
        }
        message = Message(will.topic, will.payload, will.qos, will.retain, properties)
        self.publish(message)
        log.info("published the will of client %s on %r", client_id, will.topic)

    def _fire_delayed_will(self, session: Session) -> None:
        session.will_handle = None
        session.will_at = None
        will, session.will = session.will, None
        if will is not None:
            self._publish_will(will, session.client_id)
            self._mark_session(session.client_id)

    def _expire_session(self, session: Session) -> None:
        session.expiry_handle = None
        if session.connection is None and self.sessions.get(session.client_id) is session:
            log.info("session of client %s expired", session.client_id)
            self._end_session(session)

    def _end_session(self, session: Session) -> None:
        """Remove a session with its subscriptions; a pending delayed will is sent now."""
        if self.sessions.get(session.client_id) is session:
            del self.sessions[session.client_id]
        for topic_filter in session.subscriptions:
            group, inner = parse_shared_subscription(topic_filter)
            self.index.remove(inner, session.client_id, group)
        session.subscriptions.clear()
        session.queue.clear()
        session.inflight.clear()
        if session.will_handle is not None:
            self._fire_delayed_will(session)
        session.cancel_timers()
        self._mark_session(session.client_id)

    # --- admission --------------------------------------------------------------------

    def admit(self, connection: MQTTConnection, connect: Connect) -> None:
        """Process CONNECT now, or queue it when the connect rate is exceeded."""
        router = self.connect_router
        if router is not None and router(connection, connect):
            return
        if self.limits.reject_connect(connection, connect):
            return
        rate = self.config.connect_rate
        if rate <= 0:
            self._accept_connect(connection, connect)
            return
        self._refill_tokens()
        if not self._admission and self._admission_tokens >= 1.0:
            self._admission_tokens -= 1.0
            self._accept_connect(connection, connect)
            return
        connection.transport.pause_reading()
        # A client may send packets right after CONNECT without waiting for CONNACK, so
        # they are kept until the CONNECT is accepted.
        connection.held = []
        self._admission.append((connection, connect))
        if self._admission_handle is None:
            tick = self._admission_tick()
            self._admission_handle = self.loop.call_later(tick, self._admit_queued)

    def _admission_tick(self) -> float:
        # Admit in batches at least ADMISSION_TICK apart: a timer per token would cost more
        # than the CONNECTs it paces at high rates.
        return max(1.0 / self.config.connect_rate, ADMISSION_TICK)

    def _refill_tokens(self) -> None:
        now = time.monotonic()
        rate = self.config.connect_rate
        # A burst of up to one second's worth of CONNECTs is admitted at once.
        self._admission_tokens = min(
            rate, self._admission_tokens + (now - self._admission_refilled) * rate
        )
        self._admission_refilled = now

    def _admit_queued(self) -> None:
        self._admission_handle = None
        self._refill_tokens()
        while self._admission and self._admission_tokens >= 1.0:
            connection, connect = self._admission.popleft()
            if connection.state != CONNECTING or connection.transport is None:
                continue
            self._admission_tokens -= 1.0
            if not self.reading_paused:
                connection.transport.resume_reading()
            self._accept_connect(connection, connect)
            # Still CONNECTING means that authentication or a session fetch is under way,
            # which releases it later.
            if connection.state != CONNECTING:
                if self.reading_paused:
                    self.release_after_pause(connection)
                else:
                    connection.release_held()
        if self._admission:
            tick = self._admission_tick()
            self._admission_handle = self.loop.call_later(tick, self._admit_queued)

    @property
    def admission_queue_length(self) -> int:
        return len(self._admission)

    def _accept_connect(self, connection: MQTTConnection, connect: Connect) -> None:
        result = self.access.authenticate(connection, connect)
        if isinstance(result, asyncio.Future):
            self._await_authentication(connection, connect, result)
            return
        self._authenticated(connection, connect, result)

    def _await_authentication(
        self,
        connection: MQTTConnection,
        connect: Connect,
        future: asyncio.Future[AuthenticationResult],
    ) -> None:
        """Hold the connection until the access policy's ``future`` is done."""
        self._hold_connect(connection)
        future.add_done_callback(partial(self._authentication_done, connection, connect))

    def _hold_connect(self, connection: MQTTConnection) -> None:
        """Stop reading from a connection whose CONNECT waits, until _release_connect."""
        connection.transport.pause_reading()
        if connection.held is None:
            # Packets sent right after CONNECT wait for its outcome, as during admission.
            connection.held = []
        self._connects_waiting.add(connection)

    def _release_connect(self, connection: MQTTConnection) -> None:
        """Read again from a connection whose CONNECT waited, and handle what it held."""
        if connection.state == CLOSED or connection in self._connects_waiting:
            return
        if self.reading_paused:
            self.release_after_pause(connection)
            return
        if not connection.reading_paused:
            connection.transport.resume_reading()
        connection.release_held()

    def _authentication_done(
        self,
        connection: MQTTConnection,
        connect: Connect,
        future: asyncio.Future[AuthenticationResult],
    ) -> None:
        self._connects_waiting.discard(connection)
        if connection.state != CONNECTING or connection.transport is None:
            return  # the client left while it waited
        error = None if future.cancelled() else future.exception()
        if future.cancelled() or error is not None:
            log.error(
                "authentication of client %r from %s failed: %r",
                connect.client_id,
                connection.peer,
                error or "cancelled",
            )
            result: AuthenticationResult = Rejection(
                ReasonCode.SERVER_UNAVAILABLE,
                ConnackReturnCode.SERVER_UNAVAILABLE,
                "authentication failed inside the server",
            )
        else:
            result = future.result()
        self._authenticated(connection, connect, result)
        self._release_connect(connection)

    def _authenticated(
        self, connection: MQTTConnection, connect: Connect, result: AuthenticationResult
    ) -> None:
        """Continue a CONNECT once the access policy has named the client or rejected it."""
        if isinstance(result, Rejection):
            connection.client_id = connect.client_id
            self._reject_connect(
                connection, result.v5_code, result.v311_code, result.reason, quiet_repeats=True
            )
            return
        connection.principal = result
        if self.access.restricts(result):
            # A dict here, even an empty one, turns on the topic checks of this connection.
            connection.publish_decisions = {}
            connection.decisions_generation = self.access.generation
        fetch = self.session_fetch
        client_id = connect.client_id
        if (
            fetch is not None
            and not connect.clean_start
            and client_id
            and client_id not in self.sessions
        ):
            future = fetch(client_id)
            if future is not None:
                self._hold_connect(connection)
                future.add_done_callback(partial(self._session_fetched, connection, connect))
                return
        self._connect_checked(connection, connect)

    def _session_fetched(
        self, connection: MQTTConnection, connect: Connect, _future: asyncio.Future[None]
    ) -> None:
        self._connects_waiting.discard(connection)
        if connection.state != CONNECTING or connection.transport is None:
            return  # the client left while it waited
        self._connect_checked(connection, connect)
        self._release_connect(connection)

    def _connect_checked(self, connection: MQTTConnection, connect: Connect) -> None:
        try:
            self._connect(connection, connect)
        except MQTTProtocolError as exc:
            connection.protocol_error(exc)

    def _reject_connect(
        self,
        connection: MQTTConnection,
        v5_code: int,
        v311_code: int,
        reason: str,
        quiet_repeats: bool = False,
        log_group: str = "",
    ) -> None:
        """Send CONNACK with the failure code and close; ``quiet_repeats`` logs each client's
        rejections at most once per LOG_REPEAT_INTERVAL, for failures a client may repeat.
        With ``log_group``, such rejections are logged at most once per interval for all
        clients together, under that name."""
        self.stats.connections_rejected += 1
        if quiet_repeats:
            self._log_rarely(
                log_group or "connect-rejected",
                "" if log_group else connection.client_id,
                "connection of client %r from %s rejected: %s",
                connection.client_id,
                connection.peer,
                reason,
            )
        else:
            log.warning(
                "connection of client %r from %s rejected: %s",
                connection.client_id,
                connection.peer,
                reason,
            )
        if connection.version == MQTT_5:
            properties: Properties = {PropertyId.REASON_STRING: reason}
            data = Connack(v5_code, False, properties).encode(MQTT_5)
            if not connection.fits(data):
                # [MQTT-3.2.2-19] The reason string is left out rather than exceed the limit.
                data = Connack(v5_code).encode(MQTT_5)
            connection.send(data)
        else:
            connection.send(Connack(v311_code).encode(4))
        connection.close(publish_will=False)

    def _connect(self, connection: MQTTConnection, connect: Connect) -> None:
        version = connect.protocol_level
        properties = connect.properties
        config = self.config
        client_id = connect.client_id
        connection.client_id = client_id
        connection.username = connect.username
        assigned_id = None

        if version == MQTT_5 and PropertyId.AUTHENTICATION_METHOD in properties:
            self._reject_connect(
                connection,
                ReasonCode.BAD_AUTHENTICATION_METHOD,
                ConnackReturnCode.NOT_AUTHORIZED,
                f"authentication method {properties[PropertyId.AUTHENTICATION_METHOD]!r} "
                "is not supported",
            )
            return
        if not client_id:
            if version != MQTT_5 and not connect.clean_start:
                # [MQTT-3.1.3-8] A 3.1.1 client without an id must ask for a clean session.
                self._reject_connect(
                    connection,
                    ReasonCode.CLIENT_IDENTIFIER_NOT_VALID,
                    ConnackReturnCode.IDENTIFIER_REJECTED,
                    "an empty client id needs clean session set",
                )
                return
            client_id = assigned_id = "auto-" + secrets.token_hex(12)
            connection.client_id = client_id
        elif client_id.startswith(INTERNAL_CLIENT_PREFIX):
            # The engine's own consumers use these sessions; a client must not take them over.
            self._reject_connect(
                connection,
                ReasonCode.CLIENT_IDENTIFIER_NOT_VALID,
                ConnackReturnCode.IDENTIFIER_REJECTED,
                f"client ids starting with {INTERNAL_CLIENT_PREFIX!r} are reserved for the engine",
            )
            return

        will = connect.will
        principal = connection.principal
        assert principal is not None
        restricted = connection.publish_decisions is not None
        if (
            will is not None
            and restricted
            and not self.access.may_publish(principal, client_id, will.topic)
        ):
            self._reject_connect(
                connection,
                ReasonCode.NOT_AUTHORIZED,
                ConnackReturnCode.NOT_AUTHORIZED,
                f"{principal.role} {principal.name!r} may not publish its will message to "
                f"{will.topic!r}",
                quiet_repeats=True,
            )
            return

        # Session expiry: 3.1.1 clean session 0 keeps the session for ever.
        if version == MQTT_5:
            expiry = properties.get(PropertyId.SESSION_EXPIRY_INTERVAL, 0)
        else:
            expiry = 0 if connect.clean_start else NEVER_EXPIRES
        expiry = min(expiry, config.max_session_expiry)

        # Session takeover [MQTT-3.1.4-3]: the old connection is closed (its will published
        # as for any unexpected close) before this one attaches.
        session = self.sessions.get(client_id)
        if connection.over_limit:
            taking_over = session is not None and session.connection is not None
            if not taking_over and not self._place_freed(connection):
                self._reject_connect(
                    connection,
                    ReasonCode.SERVER_BUSY,
                    ConnackReturnCode.SERVER_UNAVAILABLE,
                    f"{self._connection_limit_text()}. At the limit, only a client whose "
                    "previous connection is still open may connect, to take it over. Retry "
                    "later.",
                    quiet_repeats=True,
                    log_group="max-connections",
                )
                return
            connection.over_limit = False
            self.over_limit -= 1
            if taking_over:
                # The old connection closes below, which gives back its place.
                self.limits.count_over_limit(connection)
            self.stats.connections_accepted += 1
        if session is not None and session.connection is not None:
            old = session.connection
            self.log_takeover(
                "client %s from %s takes over its session from %s",
                client_id,
                connection.peer,
                old.peer,
            )
            old.disconnect_reason = reasons.DUPLICATE_CLIENT_ID
            old.close(ReasonCode.SESSION_TAKEN_OVER)
            session = self.sessions.get(client_id)
        connection.clean_start = connect.clean_start
        if session is not None and connect.clean_start:
            self._end_session(session)
            session = None
        session_present = session is not None
        if session is None:
            session = Session(client_id)
            self.sessions[client_id] = session
        else:
            # A resumed session cancels its expiry and any delayed will [MQTT-3.1.3-9].
            session.cancel_timers()
            session.will = None
            session.will_at = None
            session.ends_at = None
            if restricted:
                # The session may come from another principal or from older rules.
                self._revoke_subscriptions(session, principal)
        session.expiry_interval = expiry
        session.version = version
        session.connection = connection
        self._mark_session(client_id)
        connection.session = session
        connection.will = connect.will
        connection.state = CONNECTED

        # Keep alive, send window and limits announced by the client.
        keep_alive = connect.keep_alive
        server_keep_alive = None
        # MQTT 3.1.1 has no Server Keep Alive to lower a client's keep alive, so it keeps its own.
        too_long = keep_alive == 0 or keep_alive > config.max_keep_alive
        if version == MQTT_5 and config.max_keep_alive and too_long:
            keep_alive = server_keep_alive = config.max_keep_alive
        connection.keep_alive = keep_alive
        if version == MQTT_5:
            connection.send_quota = properties.get(PropertyId.RECEIVE_MAXIMUM, 65535)
            connection.max_packet_size_out = properties.get(PropertyId.MAXIMUM_PACKET_SIZE, 0)
            connection.topic_alias_max_out = properties.get(PropertyId.TOPIC_ALIAS_MAXIMUM, 0)
            connection.request_problem_information = bool(
                properties.get(PropertyId.REQUEST_PROBLEM_INFORMATION, 1)
            )
        else:
            connection.send_quota = config.max_inflight_v311

        if version == MQTT_5:
            connack_properties: dict[int, object] = {
                PropertyId.RECEIVE_MAXIMUM: config.receive_maximum,
                PropertyId.TOPIC_ALIAS_MAXIMUM: config.topic_alias_maximum,
                PropertyId.MAXIMUM_PACKET_SIZE: config.max_packet_size,
            }
            if not config.retain_available:
                connack_properties[PropertyId.RETAIN_AVAILABLE] = 0
            if assigned_id is not None:
                connack_properties[PropertyId.ASSIGNED_CLIENT_IDENTIFIER] = assigned_id
            if server_keep_alive is not None:
                connack_properties[PropertyId.SERVER_KEEP_ALIVE] = server_keep_alive
            requested = properties.get(PropertyId.SESSION_EXPIRY_INTERVAL, 0)
            if requested != expiry:
                connack_properties[PropertyId.SESSION_EXPIRY_INTERVAL] = expiry
            connection.send(Connack(0, session_present, connack_properties).encode(MQTT_5))
        else:
            connection.send(Connack(0, session_present).encode(4))

        if session_present:
            self._resend_inflight(session, connection)
        if session.queue:
            self.drain(session)
        for hooks in self.hooks:
            hooks.client_connected(connection)

    def _resend_inflight(self, session: Session, connection: MQTTConnection) -> None:
        """Send every in-flight message again, in order [MQTT-4.4.0-1]."""
        for packet_id, delivery in list(session.inflight.items()):
            if delivery.state == AWAITING_PUBCOMP:
                connection.send(_PUBREL_HEADER + packet_id.to_bytes(2, "big"))
                continue
            if delivery.message.expired(time.monotonic()):
                del session.inflight[packet_id]
                continue
            data = connection.encode_publish(delivery, packet_id, dup=True)
            if data is None:
                del session.inflight[packet_id]
                continue
            connection.send(data)
            self.stats.publish_sent += 1

    # --- access rules -----------------------------------------------------------------

    def access_changed(self) -> None:
        """Apply changed access rules to the connected clients.

        The access policy calls this after it increments its generation. A client that the
        policy no longer admits is disconnected (v5: Not authorized), and a restricted client
        loses the subscriptions it may no longer make.
        """
        access = self.access
        closed: list[str] = []
        for connection in list(self.connections):
            principal = connection.principal
            if connection.state != CONNECTED or principal is None:
                continue
            reason = access.recheck(principal)
            if reason is not None:
                closed.append(connection.client_id)
                if len(closed) <= ACCESS_LOG_LINES:
                    log.info("client %s disconnected: %s", connection.client_id, reason)
                connection.disconnect_reason = reasons.SERVER_INITIATED_DISCONNECT
                connection.close(ReasonCode.NOT_AUTHORIZED)
                continue
            if connection.publish_decisions is not None and connection.session is not None:
                self._revoke_subscriptions(connection.session, principal)
        if len(closed) > ACCESS_LOG_LINES:
            log.info(
                "%d clients disconnected in all because the access rules no longer admit them",
                len(closed),
            )

    def _revoke_subscriptions(self, session: Session, principal: Principal) -> None:
        """Remove the subscriptions and queued messages that ``principal`` may not read."""
        access = self.access
        client_id = session.client_id
        revoked = []
        for topic_filter in list(session.subscriptions):
            group, inner = parse_shared_subscription(topic_filter)
            if not access.may_subscribe(principal, client_id, inner):
                del session.subscriptions[topic_filter]
                self.index.remove(inner, client_id, group)
                revoked.append(topic_filter)
        queue = session.queue
        kept = [d for d in queue if access.may_subscribe(principal, client_id, d.message.topic)]
        dropped = len(queue) - len(kept)
        if dropped:
            queue.clear()
            queue.extend(kept)
        if revoked or dropped:
            log.info(
                "client %s: removed subscriptions %s and %d queued messages that %s %r may "
                "not read",
                client_id,
                revoked,
                dropped,
                principal.role,
                principal.name,
            )
            self._mark_session(client_id)

    # --- subscriptions ----------------------------------------------------------------

    def subscribe(self, connection: MQTTConnection, packet: Subscribe) -> None:
        session = connection.session
        assert session is not None
        version = connection.version
        subscription_id = 0
        ids = packet.properties.get(PropertyId.SUBSCRIPTION_IDENTIFIER)
        if ids:
            subscription_id = ids[0]
        codes: list[int] = []
        retained: list[tuple[Message, SubscriptionRecord]] = []
        added: list[SubscriptionRecord] = []
        for sub in packet.subscriptions:
            topic_filter = sub.topic_filter
            try:
                group, inner = parse_shared_subscription(topic_filter)
                if group is None:
                    validate_topic_filter(topic_filter)
            except MQTTProtocolError as exc:
                if version == MQTT_5:
                    codes.append(ReasonCode.TOPIC_FILTER_INVALID)
                    log.info("client %s: %s", session.client_id, exc.message)
                    continue
                raise  # a 3.1.1 client gets its connection closed [MQTT-4.7.3-?]
            if group is not None and sub.no_local:
                raise protocol_error(
                    f"shared subscription {topic_filter!r} sets No Local"
                )  # [MQTT-3.8.3-4]
            rejected = self.limits.reject_subscription(session, topic_filter)
            if rejected:
                codes.append(rejected)
                continue
            if any(topic_matches(denied, inner) or denied == inner for denied in self._deny):
                codes.append(ReasonCode.UNSPECIFIED_ERROR)
                log.info(
                    "client %s: subscription to %r denied by configuration",
                    session.client_id,
                    topic_filter,
                )
                continue
            if connection.publish_decisions is not None and not self.access.may_subscribe(
                connection.principal,  # type: ignore[arg-type]
                session.client_id,
                inner,
            ):
                codes.append(
                    ReasonCode.NOT_AUTHORIZED if version == MQTT_5 else ReasonCode.UNSPECIFIED_ERROR
                )
                self._log_rarely(
                    "subscribe-denied",
                    session.client_id,
                    "client %s may not subscribe to %r; SUBACK carries the failure code",
                    session.client_id,
                    topic_filter,
                )
                continue
            record = SubscriptionRecord(
                session,
                topic_filter,
                sub.qos,
                sub.no_local,
                sub.retain_as_published,
                sub.retain_handling,
                subscription_id,
                group,
            )
            existed = self.index.add(inner, record)
            session.subscriptions[topic_filter] = record
            added.append(record)
            codes.append(sub.qos)
            if group is None and (
                sub.retain_handling == 0 or (sub.retain_handling == 1 and not existed)
            ):
                retained.extend((message, record) for message in self.retained.match(inner))
        if added:
            self.session_changed(session)
        suback = Suback(packet.packet_id, codes).encode(version)
        barrier = self.subscribe_barrier
        if barrier is not None and added:
            finish = partial(self._subscribed, connection, session, suback, retained, added)
            if barrier(finish):
                return
        self._subscribed(connection, session, suback, retained, added)

    def _subscribed(
        self,
        connection: MQTTConnection,
        session: Session,
        suback: bytes,
        retained: list[tuple[Message, SubscriptionRecord]],
        added: list[SubscriptionRecord],
    ) -> None:
        """Send the SUBACK and the retained messages of a SUBSCRIBE that is in the index."""
        if connection.state != CLOSED:
            connection.send(suback)
        for message, record in retained:
            # Retained messages sent because of a subscription keep the retain flag
            # [MQTT-3.3.1-8].
            qos = min(message.qos, record.qos)
            ids_for = [record.subscription_id] if record.subscription_id else None
            self.deliver(session, Delivery(message, qos, True, ids_for))
        if self.hooks:
            for record in added:
                for hooks in self.hooks:
                    hooks.subscribed(session, record)

    def unsubscribe(self, connection: MQTTConnection, packet: Unsubscribe) -> None:
        session = connection.session
        assert session is not None
        codes: list[int] = []
        for topic_filter in packet.topic_filters:
            record = session.subscriptions.pop(topic_filter, None)
            if record is None:
                codes.append(ReasonCode.NO_SUBSCRIPTION_EXISTED)
                continue
            group, inner = parse_shared_subscription(topic_filter)
            self.index.remove(inner, session.client_id, group)
            codes.append(ReasonCode.SUCCESS)
        connection.send(Unsuback(packet.packet_id, codes).encode(connection.version))
        self.session_changed(session)

    # --- routing ----------------------------------------------------------------------

    def publish(self, message: Message, shared: bool = True) -> int:
        """Route ``message`` to every matching subscription; return how many matched.

        With ``shared`` False the shared subscription groups are left out: a cluster worker
        routes a message from a peer so, because the peer has served the groups.
        """
        if message.retain:
            self.retained.store(message)
            changes = self.state_changes
            # $SYS topics are published again by this broker after a restart.
            if changes is not None and not message.topic.startswith("$SYS/"):
                changes.retained[message.topic] = None
        nodes = self.index.match(message.topic)
        if not nodes:
            return 0
        origin = message.origin
        msg_qos = message.qos
        if len(nodes) == 1 and (not shared or not nodes[0].groups):
            records = nodes[0].records
            if not records:
                return 0
            count = 0
            for record in records.values():
                session = record.session
                if record.no_local and session.client_id == origin:
                    continue
                count += 1
                consumer = session.consumer
                if consumer is not None:
                    # An internal consumer takes the message as it is, as deliver() gives it.
                    consumer(message)
                    continue
                qos = record.qos if record.qos < msg_qos else msg_qos
                retain = message.retain and record.retain_as_published
                ids = [record.subscription_id] if record.subscription_id else None
                self.deliver(session, Delivery(message, qos, retain, ids))
            return count
        # Several filters match: each session gets one copy with the highest QoS of its
        # matching subscriptions and all their subscription identifiers [MQTT-3.3.4-2].
        merged: dict[str, Delivery] = {}
        sessions: dict[str, Session] = {}
        for record in self.index.iter_records(nodes, shared):
            client_id = record.session.client_id
            if record.no_local and client_id == origin:
                continue
            delivery = merged.get(client_id)
            if delivery is None:
                sessions[client_id] = record.session
            merged[client_id] = _merge_delivery(delivery, record, message)
        for client_id, delivery in merged.items():
            self.deliver(sessions[client_id], delivery)
        return len(merged)

    def deliver_to(self, session: Session, message: Message) -> None:
        """Deliver ``message`` to ``session`` alone, as :meth:`publish` would by the
        session's subscriptions: for a message that was routed to it in another engine
        process before the session moved here."""
        delivery = None
        client_id = session.client_id
        for topic_filter, record in session.subscriptions.items():
            if record.no_local and client_id == message.origin:
                continue
            if topic_matches(parse_shared_subscription(topic_filter)[1], message.topic):
                delivery = _merge_delivery(delivery, record, message)
        if delivery is not None:
            self.deliver(session, delivery)

    def deliver(self, session: Session, delivery: Delivery) -> None:
        """Send ``delivery`` to the session's client now, or queue it."""
        if session.consumer is not None:
            session.consumer(delivery.message)
            return
        connection = session.connection
        if connection is None or connection.state != CONNECTED:
            if delivery.qos or self.config.queue_qos0_offline:
                self._enqueue(session, delivery)
            return
        if not delivery.qos:
            if connection.congested:
                self.stats.publish_dropped += 1
                self._log_rarely(
                    "qos0-dropped",
                    session.client_id,
                    "client %s is not reading fast enough; dropping QoS 0 messages",
                    session.client_id,
                )
                return
            data = connection.encode_publish(delivery, 0, False)
            if data is not None:
                connection.send(data)
                self.stats.publish_sent += 1
            return
        if session.queue or len(session.inflight) >= connection.send_quota or connection.congested:
            self._enqueue(session, delivery)
            return
        self._send_inflight(session, connection, delivery)

    def _send_inflight(
        self, session: Session, connection: MQTTConnection, delivery: Delivery
    ) -> None:
        packet_id = session.allocate_packet_id()
        data = connection.encode_publish(delivery, packet_id, False)
        if data is None:
            return
        delivery.state = AWAITING_PUBACK if delivery.qos == 1 else AWAITING_PUBREC
        session.inflight[packet_id] = delivery
        self.session_changed(session)
        connection.send(data)
        self.stats.publish_sent += 1

    def _enqueue(self, session: Session, delivery: Delivery) -> None:
        queue = session.queue
        if len(queue) >= self.config.max_queued_messages:
            self.stats.queue_dropped += 1
            session.queue_dropped += 1
            self._log_rarely(
                "queue-full",
                session.client_id,
                "queue of client %s is full (%d messages); %s (%d dropped so far)",
                session.client_id,
                len(queue),
                "dropping the oldest"
                if self.config.queue_full_policy == QUEUE_FULL_DROP_OLDEST
                else "dropping new messages",
                session.queue_dropped,
            )
            if self.config.queue_full_policy != QUEUE_FULL_DROP_OLDEST:
                # The queue is unchanged, so the session is not marked for saving: a full
                # queue would otherwise be written whole on every save. The saved drop count
                # catches up with the next change.
                return
            queue.popleft()
        queue.append(delivery)
        self.session_changed(session)

    def drain(self, session: Session) -> None:
        """Send queued messages while the in-flight window and the write buffer allow."""
        connection = session.connection
        if connection is None or connection.state != CONNECTED:
            return
        queue = session.queue
        now = time.monotonic()
        while queue and not connection.congested:
            delivery = queue[0]
            if delivery.qos and len(session.inflight) >= connection.send_quota:
                return
            queue.popleft()
            self.session_changed(session)
            if delivery.message.expired(now):
                continue
            if delivery.qos:
                self._send_inflight(session, connection, delivery)
            else:
                data = connection.encode_publish(delivery, 0, False)
                if data is not None:
                    connection.send(data)
                    self.stats.publish_sent += 1

    # --- output batching --------------------------------------------------------------

    def schedule_flush(self, connection: MQTTConnection) -> None:
        if not self._dirty:
            self.loop.call_soon(self._flush)
        self._dirty.append(connection)

    def _flush(self) -> None:
        dirty = self._dirty
        self._dirty = []
        for connection in dirty:
            connection.flush()

    # --- broker-wide pause ------------------------------------------------------------

    def pause_reading(self, brief: bool = False) -> None:
        """Stop reading from every connection until :meth:`resume_reading`.

        ``brief`` is for a pause of one event-loop iteration: nothing is logged, and each
        connection pauses itself when it next receives data (``handle_packets`` keeps the
        packets), which spares a call per connection when most of them send nothing.
        """
        if not self.reading_paused:
            self.reading_paused = True
            self.paused_since = time.monotonic()
        elif brief or not self._brief_pause:
            return
        # A full pause may follow a brief one: the store then needs its own resume.
        self._brief_pause = brief
        if brief:
            return
        for connection in self.connections:
            if connection.transport is not None:
                connection.transport.pause_reading()
        log.warning("reading from all %d connections paused", len(self.connections))

    def resume_reading(self, brief: bool = False) -> None:
        if not self.reading_paused or (brief and not self._brief_pause):
            return
        self.reading_paused = False
        paused_for = time.monotonic() - (self.paused_since or time.monotonic())
        self.paused_since = None
        if brief:
            self._release_held_in_pause()
            return
        self.held_in_pause.clear()  # every connection is released below
        now = time.monotonic()
        queued = {id(connection) for connection, _ in self._admission}
        # Connections waiting for authentication are released when it ends.
        queued.update(id(connection) for connection in self._connects_waiting)
        # A copy, because packets released from hold can close connections.
        for connection in list(self.connections):
            # The pause does not count against keep alive.
            connection.last_received = max(connection.last_received, now - SWEEP_INTERVAL)
            if connection.transport is not None and id(connection) not in queued:
                # A connection waiting for its acknowledgements resumes when they are sent.
                if not connection.reading_paused:
                    connection.transport.resume_reading()
                connection.release_held()
        log.warning("reading resumed after %.1f s", paused_for)

    def release_after_pause(self, connection: MQTTConnection) -> None:
        """Have the end of the broker-wide pause resume ``connection`` and release its packets.

        Whatever leaves a connection paused or holding packets because the broker is paused
        calls this, since a brief pause's end visits only these connections.
        """
        self.held_in_pause[connection] = None

    def _release_held_in_pause(self) -> None:
        """End a brief pause: release the connections that held packets during it.

        A brief pause paused no transport itself, so the connections that received nothing
        need no call. If the released packets pause the broker again, the connections not
        reached yet keep their place at the front for the next resume, so none waits behind
        the others twice.
        """
        held = self.held_in_pause
        queued = {id(connection) for connection, _ in self._admission}
        queued.update(id(connection) for connection in self._connects_waiting)
        for connection in list(held):
            if self.reading_paused:
                return
            del held[connection]
            if connection.transport is None or id(connection) in queued:
                continue  # closed, or released when its admission or authentication ends
            if not connection.reading_paused:
                connection.transport.resume_reading()
            connection.release_held()

    # --- periodic work ----------------------------------------------------------------

    def _sweep(self) -> None:
        """Close connections whose keep alive expired or that never sent CONNECT."""
        self._sweep_handle = self.loop.call_later(SWEEP_INTERVAL, self._sweep)
        if self.reading_paused:
            return
        now = time.monotonic()
        connect_timeout = self.config.connect_timeout
        queued = {id(connection) for connection, _ in self._admission}
        # A client whose CONNECT is being authenticated has sent it in time.
        queued.update(id(connection) for connection in self._connects_waiting)
        for connection in list(self.connections):
            if connection.state == CONNECTING:
                if (
                    connection.over_limit
                    and now - connection.opened_at > OVER_LIMIT_CONNECT_TIMEOUT
                    and id(connection) not in queued
                ):
                    self._log_rarely(
                        "max-connections",
                        "",
                        "connection from %s rejected: it was accepted over the connection "
                        "limit and sent no CONNECT within %.0f s",
                        connection.peer,
                        OVER_LIMIT_CONNECT_TIMEOUT,
                    )
                    # As at accept: a WebSocket client gets close code 1013 (try again later).
                    self.connection_lost(connection)
                    self._reject_at_accept(connection)
                elif now - connection.opened_at > connect_timeout and id(connection) not in queued:
                    log.info(
                        "connection from %s closed: no CONNECT within %.0f s",
                        connection.peer,
                        connect_timeout,
                    )
                    connection.close()
                continue
            if connection.publish_timer is not None:
                continue  # its packets wait for max_publish_rate, so the client is alive
            keep_alive = connection.keep_alive
            # [MQTT-3.1.2-24] One and a half keep-alive periods without a packet.
            if keep_alive and now - connection.last_received > 1.5 * keep_alive:
                log.info(
                    "client %s from %s timed out: no packet for %.1f s (keep alive %d s)",
                    connection.client_id,
                    connection.peer,
                    now - connection.last_received,
                    keep_alive,
                )
                connection.disconnect_reason = reasons.KEEP_ALIVE_TIMEOUT
                connection.close(ReasonCode.KEEP_ALIVE_TIMEOUT)

    def _publish_sys(self) -> None:
        self._sys_handle = self.loop.call_later(self.config.sys_interval, self._publish_sys)
        stats = self.stats
        stats.sample_loads()
        connected = sum(1 for s in self.sessions.values() if s.connection is not None)
        topics = stats.sys_topics(
            connected, len(self.sessions) - connected, self.index.count, self.retained.count
        )
        if self.sys_totals is not None:
            topics = self.sys_totals(topics)
        for topic, payload in topics:
            self.publish(Message(topic, payload.encode(), 0, True))

    def log_takeover(self, message: str, *args: object) -> None:
        """Log that a client took over its session, within TAKEOVER_LOG_LINES a minute."""
        self._takeover_log.info(self.loop, message, *args)

    def _log_rarely(self, kind: str, key: str, message: str, *args: object) -> None:
        now = time.monotonic()
        last = self._log_times.get((kind, key))
        if last is not None and now - last < LOG_REPEAT_INTERVAL:
            return
        if len(self._log_times) > 10_000:
            self._log_times.clear()
        self._log_times[(kind, key)] = now
        log.warning(message, *args)
