"""Abuse limits: what one source address or one client may cost the broker.

Each limit is a :class:`~ironshadow.broker.config.BrokerConfig` field, and its field name is
the ``limit`` label of the trip counter (``BrokerStats.limit_trips``). A trip is logged at most
once per client or address per ``LOG_REPEAT_INTERVAL`` (see ``Broker._log_rarely``).

Per source address:

- ``max_connections_per_address``: open connections, counted when the socket is accepted and
  before any CONNECT is read. A socket over the limit is closed at once. The count of an
  address is removed when its last connection closes. (A socket over ``max_connections``,
  the limit of the whole broker, may instead wait for its CONNECT, to take over the session
  of a connected client: see ``Broker.connection_made``.)
- ``connect_rate_per_address``: CONNECT packets per second, as a token bucket that holds up to
  ``connect_burst_per_address`` tokens and starts full. A CONNECT without a token gets CONNACK
  0x9F Connection rate exceeded (v5) or return code 3 Server unavailable (3.1.1), and the
  connection is closed. A bucket that is full again is forgotten: one shared timer, running
  only while buckets exist, removes those.

Per client:

- ``max_publish_rate``: PUBLISH packets per second, with ``publish_burst`` at once. The check is
  a generic cell rate algorithm: ``MQTTConnection.publish_allowed_at`` is the earliest time at
  which the next PUBLISH conforms, so each PUBLISH costs one comparison and one addition. A
  PUBLISH that comes too early is held with the packets after it, the socket stops being read,
  and one timer per held connection (``MQTTConnection.publish_timer``) releases them when the
  bucket has refilled. TCP flow control then slows that client down. Nothing is dropped, and
  other clients are not affected.
- ``max_subscriptions``: subscriptions held by the client's session. A filter over the limit
  gets SUBACK 0x97 Quota exceeded (0x80 on 3.1.1). A filter that replaces an existing
  subscription of the same session does not count again.
- ``max_topic_levels`` and ``max_topic_length``: levels and UTF-8 bytes of a PUBLISH topic,
  a will topic and a SUBSCRIBE filter (the whole filter, ``$share/GROUP/`` included). A PUBLISH
  over them closes the connection, with DISCONNECT 0x90 Topic name invalid on v5. A will topic
  over them gets CONNACK 0x90 on v5, and a 3.1.1 connection is closed without CONNACK. A filter
  over them gets SUBACK 0x8F Topic filter invalid (0x80 on 3.1.1).

The transport address is the one that counts, so behind a proxy or a load balancer every client
shares the proxy's address.

In an engine of several workers the open connections, per address too, and the CONNECT buckets
are kept in a table that the workers share (``shared``, see cluster/limits.py), so these
limits and ``max_connections`` hold for the whole engine.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import TYPE_CHECKING, Any, Protocol

from ..mqtt.constants import MQTT_5
from ..mqtt.packets import Connack, Connect, Publish
from ..mqtt.properties import PropertyId
from ..mqtt.reason_codes import ConnackReturnCode, ReasonCode
from . import hooks as reasons

if TYPE_CHECKING:
    from .connection import MQTTConnection
    from .core import Broker
    from .session import Session

# The broker's connection limit, which ``AbuseLimits.connection_opened`` reports but does not
# count as a trip.
MAX_CONNECTIONS = "max_connections"
# Limit names: the BrokerConfig fields, and the ``limit`` label of the trip counter.
MAX_CONNECTIONS_PER_ADDRESS = "max_connections_per_address"
CONNECT_RATE_PER_ADDRESS = "connect_rate_per_address"
MAX_SUBSCRIPTIONS = "max_subscriptions"
MAX_PUBLISH_RATE = "max_publish_rate"
MAX_TOPIC_LEVELS = "max_topic_levels"
MAX_TOPIC_LENGTH = "max_topic_length"
LIMIT_NAMES = (
    MAX_CONNECTIONS_PER_ADDRESS,
    CONNECT_RATE_PER_ADDRESS,
    MAX_SUBSCRIPTIONS,
    MAX_PUBLISH_RATE,
    MAX_TOPIC_LEVELS,
    MAX_TOPIC_LENGTH,
)

# The largest topic that MQTT can encode, in bytes: a two-byte length prefix.
MAX_TOPIC_BYTES = 65_535
# Highest accepted max_topic_levels. The subscription index matches wildcard filters
# recursively, one Python frame per level, and a 1000-level filter exceeds CPython's default
# recursion limit of 1000 frames, so the broker keeps well below it.
MAX_TOPIC_LEVELS_CEILING = 512
# Shortest pause of a client over max_publish_rate, in seconds. At high rates a pause per
# token would cost a timer per message, so a pause lasts at least this long and then releases
# as many held packets as the tokens gathered meanwhile allow.
MIN_PUBLISH_PAUSE = 0.01
# Shortest interval between two removals of full connect-rate buckets, in seconds.
MIN_PRUNE_INTERVAL = 1.0


class SharedCounts(Protocol):
    """Connection counts and CONNECT buckets kept for every worker of an engine."""

    def open(self, address: str, force: bool = False) -> tuple[str, int] | None: ...

    def connections(self) -> int: ...

    def close_connection(self, address: str) -> None: ...

    def take_connect_token(self, address: str) -> bool: ...

    def prune(self) -> bool: ...

    def connections_from(self, address: str) -> int: ...

    def addresses(self) -> int: ...


def peer_address(peer: str) -> str:
    """Return the host of a ``host:port`` peer string; an IPv6 host keeps its colons."""
    return peer.rpartition(":")[0]


def default_burst(rate: float) -> int:
    """Return the burst for a rate when none is configured: one second's worth, at least 1."""
    return max(1, math.ceil(rate))


class AbuseLimits:
    """The broker's abuse limits and the per-address state that they need."""

    __slots__ = (
        "_prune_handle",
        "broker",
        "connect_buckets",
        "connect_burst",
        "connect_rate",
        "connections_by_address",
        "max_connections_per_address",
        "max_subscriptions",
        "max_topic_length",
        "max_topic_levels",
        "publish_interval",
        "publish_tolerance",
        "shared",
        "topic_check_length",
    )

    def __init__(self, broker: Broker) -> None:
        config = broker.config
        if not 1 <= config.max_topic_levels <= MAX_TOPIC_LEVELS_CEILING:
            raise ValueError(
                f"max_topic_levels is {config.max_topic_levels}; "
                f"it must be from 1 to {MAX_TOPIC_LEVELS_CEILING}"
            )
        if not 1 <= config.max_topic_length <= MAX_TOPIC_BYTES:
            raise ValueError(
                f"max_topic_length is {config.max_topic_length}; "
                f"it must be from 1 to {MAX_TOPIC_BYTES}"
            )
        self.broker = broker
        self.max_connections_per_address = config.max_connections_per_address
        # Open connections per source address, for the addresses that have one.
        self.connections_by_address: dict[str, int] = {}

        self.connect_rate = config.connect_rate_per_address
        self.connect_burst = config.connect_burst_per_address or default_burst(self.connect_rate)
        # Source address -> [tokens, time of the last refill], for addresses whose bucket
        # is not full.
        self.connect_buckets: dict[str, list[float]] = {}
        self._prune_handle: asyncio.TimerHandle | None = None
        # The counts of every worker of the engine, set by a cluster worker before the first
        # connection. When set, they replace the two tables above.
        self.shared: SharedCounts | None = None

        rate = config.max_publish_rate
        # Seconds per PUBLISH at the maximum rate; 0.0 turns the check off.
        self.publish_interval = 1.0 / rate if rate > 0 else 0.0
        burst = config.publish_burst or default_burst(rate)
        # How far ahead of the steady rate a client may be: the burst less one packet.
        self.publish_tolerance = (burst - 1) * self.publish_interval

        self.max_subscriptions = config.max_subscriptions
        self.max_topic_levels = config.max_topic_levels
        self.max_topic_length = config.max_topic_length
        # Topics shorter than this many characters are within both topic limits: a topic of
        # n characters has at most n + 1 levels and at most 4 * n UTF-8 bytes.
        self.topic_check_length = min(self.max_topic_levels, self.max_topic_length // 4 + 1)

    def close(self) -> None:
        """Cancel the timer that removes full buckets; the broker calls it at shutdown."""
        if self._prune_handle is not None:
            self._prune_handle.cancel()
            self._prune_handle = None

    def trip(self, limit: str, key: str, message: str, *args: object) -> None:
        """Count a trip of ``limit`` and log ``message``, at most once a minute per ``key``."""
        self.broker.stats.limit_trips[limit] += 1
        self.broker._log_rarely(limit, key, message, *args)

    # --- connections per address ------------------------------------------------------

    def connection_opened(self, connection: MQTTConnection) -> str | None:
        """Count a new connection against its source address and, with several workers,
        against the engine's connections.

        Return None, or the limit that the connection is over (MAX_CONNECTIONS_PER_ADDRESS
        or MAX_CONNECTIONS), which leaves it uncounted. A per-address trip is logged here,
        and the broker logs or handles the other.
        """
        if self.shared is not None:
            return self._shared_opened(self.shared, connection)
        limit = self.max_connections_per_address
        if not limit:
            return None
        address = peer_address(connection.peer)
        if not address:
            return None  # a transport that reports no peer address
        count = self.connections_by_address.get(address, 0)
        if count >= limit:
            self._address_full(connection, address, count)
            return MAX_CONNECTIONS_PER_ADDRESS
        self.connections_by_address[address] = count + 1
        return None

    def count_over_limit(self, connection: MQTTConnection) -> None:
        """Count a connection accepted over MAX_CONNECTIONS, without checking the limits,
        once it takes over the session of a connected client. The old connection closes
        next and removes its own count."""
        address = peer_address(connection.peer)
        if self.shared is not None:
            self.shared.open(address, force=True)
        elif self.max_connections_per_address and address:
            self.connections_by_address[address] = self.connections_by_address.get(address, 0) + 1

    def engine_connections(self) -> int:
        """Return the connections open in the whole engine: every worker's, with several."""
        if self.shared is not None:
            return self.shared.connections()
        return len(self.broker.connections)

    def _address_full(self, connection: MQTTConnection, address: str, count: int) -> None:
        self.trip(
            MAX_CONNECTIONS_PER_ADDRESS,
            address,
            "connection from %s rejected: %d connections from this address are open, "
            "the maximum is %d (max_connections_per_address)",
            connection.peer,
            count,
            self.max_connections_per_address,
        )

    def _shared_opened(self, shared: SharedCounts, connection: MQTTConnection) -> str | None:
        if connection.counted_by_peer():
            return None
        address = peer_address(connection.peer)
        rejected = shared.open(address)
        if rejected is None:
            return None
        limit, count = rejected
        if limit == MAX_CONNECTIONS_PER_ADDRESS:
            self._address_full(connection, address, count)
            return MAX_CONNECTIONS_PER_ADDRESS
        return MAX_CONNECTIONS

    def connections_from(self, address: str) -> int:
        """Return how many connections from ``address`` are counted (0 without a limit)."""
        if self.shared is not None:
            return self.shared.connections_from(address)
        return self.connections_by_address.get(address, 0)

    def addresses(self) -> int:
        """Return how many source addresses have a count or a CONNECT bucket."""
        if self.shared is not None:
            return self.shared.addresses()
        return len(self.connections_by_address.keys() | self.connect_buckets.keys())

    def connection_closed(self, connection: MQTTConnection) -> None:
        """Forget a closed connection that ``connection_opened`` accepted."""
        timer = connection.publish_timer
        if timer is not None:
            timer.cancel()
            connection.publish_timer = None
        if self.shared is not None:
            self.shared.close_connection(peer_address(connection.peer))
            return
        if not self.max_connections_per_address:
            return
        address = peer_address(connection.peer)
        count = self.connections_by_address.get(address)
        if count is None:
            return
        if count <= 1:
            del self.connections_by_address[address]
        else:
            self.connections_by_address[address] = count - 1

    # --- CONNECT ------------------------------------------------------------------------

    def reject_connect(self, connection: MQTTConnection, connect: Connect) -> bool:
        """Reject a CONNECT over its address's rate, or with a will topic over the topic
        limits. Return True if it was rejected, after closing the connection."""
        if self.connect_rate > 0:
            address = peer_address(connection.peer)
            if address and not self._take_connect_token(address):
                self.trip(
                    CONNECT_RATE_PER_ADDRESS,
                    address,
                    "connection of client %r from %s rejected: more than %g CONNECT packets "
                    "per second from this address (connect_rate_per_address)",
                    connect.client_id,
                    connection.peer,
                    self.connect_rate,
                )
                self._send_connack_and_close(
                    connection,
                    ReasonCode.CONNECTION_RATE_EXCEEDED,
                    ConnackReturnCode.SERVER_UNAVAILABLE,
                    "connection rate exceeded: too many CONNECT packets from this address; "
                    "retry later",
                )
                return True
        will = connect.will
        if will is not None and len(will.topic) >= self.topic_check_length:
            problem = self.topic_problem(will.topic)
            if problem is not None:
                limit, text = problem
                self.trip(
                    limit,
                    connect.client_id or connection.peer,
                    "connection of client %r from %s rejected: will topic %s",
                    connect.client_id,
                    connection.peer,
                    text,
                )
                self._send_connack_and_close(
                    connection, ReasonCode.TOPIC_NAME_INVALID, None, f"will topic {text}"
                )
                return True
        return False

    def _send_connack_and_close(
        self, connection: MQTTConnection, v5_code: int, v311_code: int | None, reason: str
    ) -> None:
        """Send a refusing CONNACK (none to 3.1.1 when ``v311_code`` is None) and close."""
        self.broker.stats.connections_rejected += 1
        if connection.version == MQTT_5:
            properties = {PropertyId.REASON_STRING: reason}
            data = Connack(v5_code, False, properties).encode(MQTT_5)
            if not connection.fits(data):
                # [MQTT-3.2.2-19] The reason string is left out rather than exceed the limit.
                data = Connack(v5_code).encode(MQTT_5)
            connection.send(data)
        elif v311_code is not None:
            connection.send(Connack(v311_code).encode(4))
        connection.close(publish_will=False)

    def _take_connect_token(self, address: str) -> bool:
        """Take a token from the address's bucket; return False if it has none."""
        if self.shared is not None:
            taken = self.shared.take_connect_token(address)
            if taken and self._prune_handle is None:
                self._schedule_prune()
            return taken
        now = time.monotonic()
        bucket = self.connect_buckets.get(address)
        if bucket is None:
            bucket = self.connect_buckets[address] = [float(self.connect_burst), now]
            if self._prune_handle is None:
                self._schedule_prune()
        else:
            tokens = bucket[0] + (now - bucket[1]) * self.connect_rate
            bucket[0] = min(tokens, float(self.connect_burst))
            bucket[1] = now
        if bucket[0] < 1.0:
            return False
        bucket[0] -= 1.0
        return True

    def _schedule_prune(self) -> None:
        # Every bucket refills within burst / rate seconds, so each run finds the buckets of
        # addresses that went quiet before the previous run full.
        delay = max(self.connect_burst / self.connect_rate, MIN_PRUNE_INTERVAL)
        self._prune_handle = self.broker.loop.call_later(delay, self._prune_buckets)

    def _prune_buckets(self) -> None:
        """Remove the buckets that are full again; run again while any remain."""
        self._prune_handle = None
        if self.shared is not None:
            if self.shared.prune():
                self._schedule_prune()
            return
        now = time.monotonic()
        rate = self.connect_rate
        burst = self.connect_burst
        full = [
            address
            for address, (tokens, refilled) in self.connect_buckets.items()
            if tokens + (now - refilled) * rate >= burst
        ]
        for address in full:
            del self.connect_buckets[address]
        if self.connect_buckets:
            self._schedule_prune()

    # --- topics and subscriptions -----------------------------------------------------

    def topic_problem(self, topic: str) -> tuple[str, str] | None:
        """Return the limit that ``topic`` exceeds and a description, or None if within both."""
        length = len(topic)
        if length > self.max_topic_length or (
            length * 4 > self.max_topic_length
            and not topic.isascii()
            and len(topic.encode()) > self.max_topic_length
        ):
            size = len(topic.encode())
            return (
                MAX_TOPIC_LENGTH,
                f"{_preview(topic)} has {size} bytes, the maximum is {self.max_topic_length} "
                "(max_topic_length)",
            )
        levels = topic.count("/") + 1
        if levels > self.max_topic_levels:
            return (
                MAX_TOPIC_LEVELS,
                f"{_preview(topic)} has {levels} levels, the maximum is {self.max_topic_levels} "
                "(max_topic_levels)",
            )
        return None

    def reject_publish_topic(self, connection: MQTTConnection, topic: str) -> bool:
        """Close the connection if ``topic`` exceeds a topic limit; return True if it did.

        The caller checks ``len(topic) >= topic_check_length`` first, so shorter topics cost
        nothing more.
        """
        problem = self.topic_problem(topic)
        if problem is None:
            return False
        limit, text = problem
        self.trip(
            limit,
            connection.client_id,
            "client %s from %s disconnected: PUBLISH topic %s",
            connection.client_id,
            connection.peer,
            text,
        )
        connection.disconnect_reason = reasons.CLIENT_ERROR
        connection.close(ReasonCode.TOPIC_NAME_INVALID)
        return True

    def reject_subscription(self, session: Session, topic_filter: str) -> int:
        """Return the SUBACK reason code for a filter over a limit, or 0 if it is within them."""
        if len(topic_filter) >= self.topic_check_length:
            problem = self.topic_problem(topic_filter)
            if problem is not None:
                limit, text = problem
                self.trip(
                    limit,
                    session.client_id,
                    "client %s: subscription rejected: topic filter %s",
                    session.client_id,
                    text,
                )
                return ReasonCode.TOPIC_FILTER_INVALID
        limit = self.max_subscriptions
        subscriptions = session.subscriptions
        if limit and len(subscriptions) >= limit and topic_filter not in subscriptions:
            self.trip(
                MAX_SUBSCRIPTIONS,
                session.client_id,
                "client %s: subscription to %s rejected: the client has %d subscriptions, "
                "the maximum is %d (max_subscriptions)",
                session.client_id,
                _preview(topic_filter),
                len(subscriptions),
                limit,
            )
            return ReasonCode.QUOTA_EXCEEDED
        return 0

    # --- PUBLISH rate -----------------------------------------------------------------

    def hold_publish(self, connection: MQTTConnection, packet: Publish) -> bool:
        """Take ``packet`` if it is within the client's rate and return False. Otherwise hold
        it, stop reading the socket until the rate allows it, and return True.

        Called only when ``publish_interval`` is set. ``connection.last_received`` is the
        arrival time of the chunk that contained the packet, so the common case reads no clock.
        """
        now = connection.last_received
        allowed_at = connection.publish_allowed_at
        if now >= allowed_at:
            floor = now - self.publish_tolerance
            start = allowed_at if allowed_at > floor else floor
            connection.publish_allowed_at = start + self.publish_interval
            return False
        # handle_packets() appends the packets after this one to the hold.
        connection.held = [packet]
        connection.transport.pause_reading()
        if connection.publish_timer is None:
            delay = max(allowed_at - time.monotonic(), MIN_PUBLISH_PAUSE)
            connection.publish_timer = self.broker.loop.call_later(
                delay, self._release_publishes, connection
            )
            self.trip(
                MAX_PUBLISH_RATE,
                connection.client_id,
                "client %s from %s publishes faster than %g messages per second "
                "(max_publish_rate); reading from it is paused until its rate allows more",
                connection.client_id,
                connection.peer,
                1.0 / self.publish_interval,
            )
        return True

    def _release_publishes(self, connection: MQTTConnection) -> None:
        """Resume a connection held by :meth:`hold_publish` and act on its held packets."""
        connection.publish_timer = None
        transport: Any = connection.transport
        if transport is None:
            return
        if self.broker.reading_paused:
            self.broker.release_after_pause(connection)
            return
        # The held packets are the client's latest sign of life, for its keep alive, and the
        # arrival time that hold_publish() compares with.
        connection.last_received = time.monotonic()
        if not connection.reading_paused:  # else _ack_ready() resumes reading
            transport.resume_reading()
        connection.release_held()


def _preview(topic: str) -> str:
    """Quote a topic for a log line, shortened when it is long."""
    if len(topic) <= 80:
        return repr(topic)
    return repr(topic[:60] + "...") + f" ({len(topic)} characters)"
