"""Broker counters and their $SYS/broker/... topics, named as Mosquitto names them so that
tools written for any broker can read the rates."""

from __future__ import annotations

import math
import time

from .. import __version__
from .limits import LIMIT_NAMES

# Averaging windows of the $SYS load figures, in minutes.
LOAD_WINDOWS = (1, 5, 15)
_LOADED_COUNTERS = (
    ("messages/received", "packets_received"),
    ("messages/sent", "packets_sent"),
    ("publish/received", "publish_received"),
    ("publish/sent", "publish_sent"),
    ("publish/dropped", "publish_dropped"),
    ("bytes/received", "bytes_received"),
    ("bytes/sent", "bytes_sent"),
    ("connections", "connections_accepted"),
)


class BrokerStats:
    __slots__ = (
        "_last_sample",
        "_last_values",
        "_loads",
        "bytes_received",
        "bytes_sent",
        "connections_accepted",
        "connections_rejected",
        "limit_trips",
        "protocol_errors",
        "publish_dropped",
        "publish_received",
        "publish_sent",
        "queue_dropped",
        "received_by_type",
        "sent_by_type",
        "started_at",
    )

    def __init__(self) -> None:
        self.bytes_received = 0
        self.bytes_sent = 0
        # MQTT packets by control packet type (the index, 1 for CONNECT to 15 for AUTH).
        self.received_by_type = [0] * 16
        self.sent_by_type = [0] * 16
        self.publish_received = 0
        self.publish_sent = 0
        # QoS 0 messages not sent to a congested client, and messages over a client's
        # Maximum Packet Size.
        self.publish_dropped = 0
        # Messages that a full session queue dropped.
        self.queue_dropped = 0
        self.protocol_errors = 0
        self.connections_accepted = 0
        self.connections_rejected = 0
        # Trips of each abuse limit, by limit name (see ``limits``).
        self.limit_trips = dict.fromkeys(LIMIT_NAMES, 0)
        self.started_at = time.monotonic()
        self._last_sample = self.started_at
        self._last_values = {name: 0 for _, name in _LOADED_COUNTERS}
        self._loads = {
            (topic, window): 0.0 for topic, _ in _LOADED_COUNTERS for window in LOAD_WINDOWS
        }

    @property
    def packets_received(self) -> int:
        return sum(self.received_by_type)

    @property
    def packets_sent(self) -> int:
        return sum(self.sent_by_type)

    def sample_loads(self) -> None:
        """Update the moving averages of the per-minute rates (as Mosquitto computes them)."""
        now = time.monotonic()
        elapsed = now - self._last_sample
        if elapsed <= 0:
            return
        self._last_sample = now
        for topic, name in _LOADED_COUNTERS:
            value = getattr(self, name)
            per_minute = (value - self._last_values[name]) * 60.0 / elapsed
            self._last_values[name] = value
            for window in LOAD_WINDOWS:
                weight = math.exp(-elapsed / (60.0 * window))
                key = (topic, window)
                self._loads[key] = per_minute + weight * (self._loads[key] - per_minute)

    def sys_topics(
        self, clients_connected: int, clients_offline: int, subscriptions: int, retained: int
    ) -> list[tuple[str, str]]:
        """Return ``(topic, payload)`` pairs for every $SYS/broker/... topic."""
        uptime = int(time.monotonic() - self.started_at)
        topics = [
            ("$SYS/broker/version", f"IronShadow {__version__}"),
            ("$SYS/broker/uptime", f"{uptime} seconds"),
            ("$SYS/broker/clients/connected", str(clients_connected)),
            ("$SYS/broker/clients/disconnected", str(clients_offline)),
            ("$SYS/broker/clients/total", str(clients_connected + clients_offline)),
            ("$SYS/broker/messages/received", str(self.packets_received)),
            ("$SYS/broker/messages/sent", str(self.packets_sent)),
            ("$SYS/broker/publish/messages/received", str(self.publish_received)),
            ("$SYS/broker/publish/messages/sent", str(self.publish_sent)),
            (
                "$SYS/broker/publish/messages/dropped",
                str(self.publish_dropped + self.queue_dropped),
            ),
            ("$SYS/broker/bytes/received", str(self.bytes_received)),
            ("$SYS/broker/bytes/sent", str(self.bytes_sent)),
            ("$SYS/broker/subscriptions/count", str(subscriptions)),
            ("$SYS/broker/retained messages/count", str(retained)),
        ]
        for (topic, window), value in self._loads.items():
            topics.append((f"$SYS/broker/load/{topic}/{window}min", f"{value:.2f}"))
        return topics
