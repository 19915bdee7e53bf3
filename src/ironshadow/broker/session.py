"""MQTT sessions and the outbound QoS flows.

A session outlives its connections when its expiry interval is above zero. It holds the
client's subscriptions, the QoS 1 and 2 messages sent but not yet acknowledged (in flight)
and the messages waiting to be sent (queued). When the engine keeps MQTT state, such a session
also outlives a restart of the engine (see ``persistence``).

Outbound delivery, per message and subscriber::

    QoS 0:  send PUBLISH                              -> done
    QoS 1:  send PUBLISH(id) -> in flight  --PUBACK-->   done
    QoS 2:  send PUBLISH(id) -> in flight  --PUBREC-->   send PUBREL(id), state PUBREL
                                           --PUBCOMP-->  done

A message is queued instead of sent when the client is offline, when the in-flight window
(the client's Receive Maximum) is full, or when the connection's write buffer is above its
high-water mark. Each acknowledgement that frees a slot sends the next queued message. When a
session resumes, every in-flight message is sent again first, in order: PUBLISH with DUP set,
or PUBREL for those past PUBREC [MQTT-4.4.0-1].

Inbound QoS 2 keeps the packet identifiers that were answered with PUBREC until PUBREL comes,
so a retransmitted PUBLISH is acknowledged again but not routed twice [MQTT-4.3.3-10].
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..mqtt.packets import Will
from .message import Message
from .subscriptions import SubscriptionRecord

if TYPE_CHECKING:
    from .connection import MQTTConnection

# In-flight states of an outbound QoS 1 or 2 message.
AWAITING_PUBACK = 1
AWAITING_PUBREC = 2
AWAITING_PUBCOMP = 3

# A session that must never expire (MQTT 3.1.1 clean session 0, or interval 0xFFFFFFFF).
NEVER_EXPIRES = 0xFFFFFFFF


class Delivery:
    """A message as one subscriber receives it: its QoS, retain flag and subscription ids."""

    __slots__ = ("message", "qos", "retain", "state", "subscription_ids")

    def __init__(
        self, message: Message, qos: int, retain: bool, subscription_ids: list[int] | None
    ) -> None:
        self.message = message
        self.qos = qos
        self.retain = retain
        self.subscription_ids = subscription_ids
        self.state = 0


class Session:
    __slots__ = (
        "client_id",
        "connection",
        "consumer",
        "ends_at",
        "expiry_handle",
        "expiry_interval",
        "inbound_qos2",
        "inflight",
        "next_packet_id",
        "queue",
        "queue_dropped",
        "subscriptions",
        "version",
        "will",
        "will_at",
        "will_handle",
    )

    def __init__(self, client_id: str) -> None:
        self.client_id = client_id
        self.connection: MQTTConnection | None = None
        # Set for a consumer inside the engine: messages routed to this session are passed
        # to it synchronously instead of being sent to a client.
        self.consumer: Callable[[Message], None] | None = None
        # Full topic filter (with any $share prefix) -> record.
        self.subscriptions: dict[str, SubscriptionRecord] = {}
        self.inflight: dict[int, Delivery] = {}
        self.queue: deque[Delivery] = deque()
        self.queue_dropped = 0
        self.inbound_qos2: set[int] = set()
        self.next_packet_id = 1
        self.expiry_interval = 0
        self.expiry_handle: asyncio.TimerHandle | None = None
        # Epoch seconds (time.time()) when the offline session ends, or None while it is
        # connected or when it never expires. Wall-clock time, so that it survives a restart.
        self.ends_at: float | None = None
        # MQTT protocol level of the last connection: 4 for 3.1.1, 5 for 5.0.
        self.version = 4
        self.will: Will | None = None
        # Epoch seconds when the delayed ``will`` is due, or None without one.
        self.will_at: float | None = None
        self.will_handle: asyncio.TimerHandle | None = None

    def allocate_packet_id(self) -> int:
        """Return a packet identifier that no in-flight message uses [MQTT-2.2.1-3]."""
        inflight = self.inflight
        packet_id = self.next_packet_id
        while packet_id in inflight:
            packet_id = packet_id % 65535 + 1
        self.next_packet_id = packet_id % 65535 + 1
        return packet_id

    def cancel_timers(self) -> None:
        if self.expiry_handle is not None:
            self.expiry_handle.cancel()
            self.expiry_handle = None
        if self.will_handle is not None:
            self.will_handle.cancel()
            self.will_handle = None
