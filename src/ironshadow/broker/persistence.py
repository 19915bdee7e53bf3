"""Saving and restoring the broker's MQTT state: retained messages and persistent sessions.

What is saved. Every retained message except those on ``$SYS/`` topics, which the broker
publishes again after a restart. Every persistent session: one whose expiry interval is above
zero (MQTT 3.1.1 clean session 0, or MQTT 5 with a Session Expiry Interval), except the
engine's internal consumers. A session that ends at disconnect is never saved, and saving
one that replaces a saved persistent session deletes the saved copy.

Change tracking. While the engine persists MQTT state, ``Broker.state_changes`` is a
:class:`StateChanges`: the retained topics and client ids whose state changed since the last
save, in dicts used as ordered sets. The broker marks an entry with one dict store on every
change (a retained message set or cleared; a session created, resumed, taken over, ended or
expired; a subscription added or removed; a message queued, sent, acknowledged or dropped from
the front of a full queue). The saver calls :meth:`StatePersistence.collect` about every
100 ms, which serializes the current state of each marked entry once, however often it
changed. The cost of a save therefore grows with the number of changed entries and their
size, not with the message rate.

NOTE: a session is saved whole, queue included, so a session whose long queue changes on every
save interval costs its full size each time. ``collect`` bounds one save by bytes, and what it
leaves stays marked for the next one.

Format. Big-endian, like MQTT. Strings are UTF-8 with a two-byte length, as in MQTT.
Properties use the MQTT 5 wire encoding. Times are epoch seconds as IEEE doubles, so that a
remaining interval is right after a restart::

    retained message   "R" u8:format  message
    session            "S" u8:format  string:client_id  u8:protocol_level
                       u32:expiry_interval  u8:flags (1: ends_at follows, 2: will follows)
                       [f64:ends_at]  u16:next_packet_id  u64:queue_dropped
                       u32:count {string:filter  u8:options  u32:subscription_id}
                       u32:count {u16:packet_id}                  inbound QoS 2 awaiting PUBREL
                       u32:count {u16:packet_id  u8:state  delivery}        in flight
                       u32:count {delivery}                                 queued
                       [string:topic  u32:length payload  u8:qos_retain  properties  f64:due]
    delivery           u8:qos_retain  u16:count {u32:subscription_id}  message
    message            string:topic  u8:flags  u32:length payload  properties  [f64:expires]

Subscription options are the SUBSCRIBE options byte: bits 0-1 QoS, bit 2 No Local, bit 3
Retain As Published, bits 4-5 Retain Handling. ``qos_retain`` is the QoS in bits 0-1 and
the retain flag in bit 2. A message's flags are ``qos_retain`` plus bit 3 when an expiry time
follows. ``state`` is the in-flight state of ``session``: 1 PUBLISH sent at QoS 1, 2 PUBLISH
sent at QoS 2, 3 PUBREL sent. ``ends_at`` is absent while the session is connected: the saved
session was then cut off by a crash, and its expiry interval starts again when it is restored.

A session's delayed will is saved with it, but the will of a connected client is not, as the
broker does not publish wills when it shuts down either.
"""

from __future__ import annotations

import logging
import math
import struct
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..mqtt.constants import MAX_SUBSCRIPTION_ID, MQTT_3_1_1, MQTT_5, PacketType
from ..mqtt.encoding import encode_string
from ..mqtt.errors import MQTTProtocolError
from ..mqtt.packets import Will
from ..mqtt.properties import WILL, Properties, decode_properties, encode_properties
from ..mqtt.topics import parse_shared_subscription, validate_topic_name
from .config import QUEUE_FULL_DROP_OLDEST
from .core import INTERNAL_CLIENT_PREFIX
from .message import Message
from .session import (
    AWAITING_PUBACK,
    AWAITING_PUBCOMP,
    AWAITING_PUBREC,
    NEVER_EXPIRES,
    Delivery,
    Session,
)
from .subscriptions import SubscriptionRecord

if TYPE_CHECKING:
    from .core import Broker

log = logging.getLogger("ironshadow.broker")

# Versions of the formats above. A reader rejects a higher version, which a newer IronShadow
# wrote, with StateDecodeError.
RETAINED_FORMAT = 1
SESSION_FORMAT = 1

_RETAINED_TAG = b"R"
_SESSION_TAG = b"S"

_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_F64 = struct.Struct(">d")
_HEADER = struct.Struct(">cB")
_SESSION_FIXED = struct.Struct(">BIB")  # protocol level, expiry interval, flags
_SUBSCRIPTION = struct.Struct(">BI")  # options, subscription identifier
_INFLIGHT = struct.Struct(">HB")  # packet identifier, state

_SESSION_ENDS_AT = 0x01
_SESSION_WILL = 0x02
_MESSAGE_EXPIRES = 0x08
_RETAIN = 0x04

# In-flight state -> the QoS of the deliveries that can be in it.
_STATE_QOS = {AWAITING_PUBACK: 1, AWAITING_PUBREC: 2, AWAITING_PUBCOMP: 2}


class StateDecodeError(ValueError):
    """Saved MQTT state that cannot be decoded; the message names the part and the reason."""


@dataclass(slots=True)
class StateChanges:
    """Retained topics and client ids changed since the last save, in order of first change."""

    retained: dict[str, None] = field(default_factory=dict)
    sessions: dict[str, None] = field(default_factory=dict)


@dataclass(slots=True)
class StateBatch:
    """Serialized entries for one write to a state store; None deletes an entry."""

    retained: dict[str, bytes | None] = field(default_factory=dict)
    sessions: dict[str, bytes | None] = field(default_factory=dict)
    size: int = 0  # bytes of the serialized entries, keys included

    def __bool__(self) -> bool:
        return bool(self.retained or self.sessions)


@dataclass(slots=True)
class RestoreReport:
    """Counts from :meth:`StatePersistence.restore`, for the start-up log."""

    retained: int = 0
    sessions: int = 0
    expired_retained: int = 0
    expired_sessions: int = 0
    undecodable: int = 0
    queue_dropped: int = 0


# --- writing ------------------------------------------------------------------------------


def wall_clock_offset() -> float:
    """Return what to add to a ``time.monotonic()`` value to get epoch seconds."""
    return time.time() - time.monotonic()


def encode_message(message: Message, clock_offset: float) -> bytes:
    """Serialize a message, reusing the bytes cached on it since its first serialization."""
    data = message.serialized
    if data is not None:
        return data
    flags = message.qos | (_RETAIN if message.retain else 0)
    if message.expires_at is not None:
        flags |= _MESSAGE_EXPIRES
    parts = [
        encode_string(message.topic),
        _U8.pack(flags),
        _U32.pack(len(message.payload)),
        message.payload,
        encode_properties(message.properties),
    ]
    if message.expires_at is not None:
        parts.append(_F64.pack(message.expires_at + clock_offset))
    data = message.serialized = b"".join(parts)
    return data


def encode_retained(message: Message, clock_offset: float) -> bytes:
    return _HEADER.pack(_RETAINED_TAG, RETAINED_FORMAT) + encode_message(message, clock_offset)


def _encode_delivery(delivery: Delivery, clock_offset: float) -> list[bytes]:
    ids = delivery.subscription_ids or ()
    return [
        _U8.pack(delivery.qos | (_RETAIN if delivery.retain else 0)),
        _U16.pack(len(ids)),
        *(_U32.pack(subscription_id) for subscription_id in ids),
        encode_message(delivery.message, clock_offset),
    ]


def encode_session(session: Session, clock_offset: float) -> bytes:
    """Serialize a session with its subscriptions, messages and any delayed will."""
    flags = 0
    if session.ends_at is not None:
        flags |= _SESSION_ENDS_AT
    will = session.will
    if will is not None and session.will_at is not None:
        flags |= _SESSION_WILL
    parts = [
        _HEADER.pack(_SESSION_TAG, SESSION_FORMAT),
        encode_string(session.client_id),
        _SESSION_FIXED.pack(session.version, session.expiry_interval, flags),
    ]
    if session.ends_at is not None:
        parts.append(_F64.pack(session.ends_at))
    parts.append(_U16.pack(session.next_packet_id))
    parts.append(_U64.pack(session.queue_dropped))

    parts.append(_U32.pack(len(session.subscriptions)))
    for topic_filter, record in session.subscriptions.items():
        options = (
            record.qos
            | (0x04 if record.no_local else 0)
            | (0x08 if record.retain_as_published else 0)
            | (record.retain_handling << 4)
        )
        parts.append(encode_string(topic_filter))
        parts.append(_SUBSCRIPTION.pack(options, record.subscription_id))

    parts.append(_U32.pack(len(session.inbound_qos2)))
    parts.extend(_U16.pack(packet_id) for packet_id in sorted(session.inbound_qos2))

    parts.append(_U32.pack(len(session.inflight)))
    for packet_id, delivery in session.inflight.items():
        parts.append(_INFLIGHT.pack(packet_id, delivery.state))
        parts.extend(_encode_delivery(delivery, clock_offset))

    parts.append(_U32.pack(len(session.queue)))
    for delivery in session.queue:
        parts.extend(_encode_delivery(delivery, clock_offset))

    if flags & _SESSION_WILL:
        assert will is not None and session.will_at is not None
        parts.append(encode_string(will.topic))
        parts.append(_U32.pack(len(will.payload)))
        parts.append(will.payload)
        parts.append(_U8.pack(will.qos | (_RETAIN if will.retain else 0)))
        parts.append(encode_properties(will.properties))
        parts.append(_F64.pack(session.will_at))
    return b"".join(parts)


# --- reading ------------------------------------------------------------------------------


class _Reader:
    """A cursor over saved bytes whose every read raises StateDecodeError past the end."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, size: int) -> bytes:
        end = self.pos + size
        if end > len(self.data):
            raise StateDecodeError(
                f"the data ends at byte {len(self.data)}, inside a field of {size} bytes "
                f"at byte {self.pos}"
            )
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def unpack(self, layout: struct.Struct) -> tuple:  # type: ignore[type-arg]
        return layout.unpack(self.take(layout.size))

    def u8(self) -> int:
        return self.unpack(_U8)[0]  # type: ignore[no-any-return]

    def u16(self) -> int:
        return self.unpack(_U16)[0]  # type: ignore[no-any-return]

    def u32(self) -> int:
        return self.unpack(_U32)[0]  # type: ignore[no-any-return]

    def time(self) -> float:
        value: float = self.unpack(_F64)[0]
        if not math.isfinite(value):
            raise StateDecodeError(f"the time at byte {self.pos - 8} is {value}")
        return value

    def string(self) -> str:
        raw = self.take(self.u16())
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise StateDecodeError(
                f"the string at byte {self.pos - len(raw)} is not valid UTF-8: {exc.reason}"
            ) from None

    def properties(self, packet_type: int) -> Properties:
        try:
            properties, self.pos = decode_properties(
                self.data, self.pos, len(self.data), packet_type
            )
        except MQTTProtocolError as exc:
            raise StateDecodeError(f"invalid properties: {exc.message}") from None
        return properties

    def header(self, tag: bytes, newest: int, what: str) -> None:
        found, version = self.unpack(_HEADER)
        if found != tag:
            raise StateDecodeError(f"the entry does not start with {tag!r}, so it is not {what}")
        if version > newest:
            raise StateDecodeError(
                f"the entry has format version {version}, but this IronShadow reads version "
                f"{newest} at most"
            )

    def end(self) -> None:
        if self.pos != len(self.data):
            raise StateDecodeError(
                f"{len(self.data) - self.pos} unexpected bytes after the end of the entry"
            )


def _qos_retain(value: int, at: int) -> tuple[int, bool]:
    qos = value & 0x03
    if qos == 3 or value & ~0x07:
        raise StateDecodeError(f"invalid QoS and retain byte 0x{value:02X} at byte {at}")
    return qos, bool(value & _RETAIN)


def _check_subscription_id(value: int, lowest: int) -> None:
    if not lowest <= value <= MAX_SUBSCRIPTION_ID:
        raise StateDecodeError(
            f"subscription identifier {value} is outside {lowest}..{MAX_SUBSCRIPTION_ID}"
        )


def _read_message(
    reader: _Reader, clock_offset: float, messages: dict[bytes, Message]
) -> Message:
    start = reader.pos
    topic = reader.string()
    try:
        validate_topic_name(topic)
    except MQTTProtocolError as exc:
        raise StateDecodeError(exc.message) from None
    flags = reader.u8()
    qos, retain = _qos_retain(flags & ~_MESSAGE_EXPIRES, reader.pos - 1)
    payload = reader.take(reader.u32())
    properties = reader.properties(PacketType.PUBLISH)
    expires = reader.time() if flags & _MESSAGE_EXPIRES else None
    data = reader.data[start : reader.pos]
    # Messages that several sessions queued were saved once per session: restore them as one
    # object again.
    message = messages.get(data)
    if message is not None:
        return message
    message = Message(topic, payload, qos, retain, properties)
    message.expires_at = None if expires is None else expires - clock_offset
    message.serialized = data
    messages[data] = message
    return message


def _read_delivery(
    reader: _Reader, clock_offset: float, messages: dict[bytes, Message]
) -> Delivery:
    qos, retain = _qos_retain(reader.u8(), reader.pos - 1)
    ids = [reader.u32() for _ in range(reader.u16())]
    for subscription_id in ids:
        _check_subscription_id(subscription_id, 1)
    message = _read_message(reader, clock_offset, messages)
    return Delivery(message, qos, retain, ids or None)


def decode_retained(
    topic: str, data: bytes, clock_offset: float, messages: dict[bytes, Message] | None = None
) -> Message:
    """Rebuild a retained message saved under ``topic`` by :func:`encode_retained`."""
    reader = _Reader(data)
    reader.header(_RETAINED_TAG, RETAINED_FORMAT, "a retained message")
    message = _read_message(reader, clock_offset, {} if messages is None else messages)
    reader.end()
    if message.topic != topic:
        raise StateDecodeError(f"the entry contains a message on {message.topic!r}")
    if not message.payload:
        raise StateDecodeError("the payload is empty, which clears a retained message")
    return message


def decode_session(
    client_id: str,
    data: bytes,
    clock_offset: float,
    messages: dict[bytes, Message] | None = None,
) -> Session:
    """Rebuild a session saved by :func:`encode_session`, offline and without timers.

    ``clock_offset`` converts saved message expiry times back to ``time.monotonic()``.
    """
    if messages is None:
        messages = {}
    reader = _Reader(data)
    reader.header(_SESSION_TAG, SESSION_FORMAT, "a session")
    saved_id = reader.string()
    if saved_id != client_id:
        raise StateDecodeError(f"the entry contains the session of client {saved_id!r}")
    session = Session(client_id)
    version, session.expiry_interval, flags = reader.unpack(_SESSION_FIXED)
    if version not in (MQTT_3_1_1, MQTT_5):
        raise StateDecodeError(f"unknown protocol level {version}")
    session.version = version
    if flags & _SESSION_ENDS_AT:
        session.ends_at = reader.time()
    session.next_packet_id = reader.u16()
    if not session.next_packet_id:
        raise StateDecodeError("the next packet identifier is 0")
    session.queue_dropped = reader.unpack(_U64)[0]

    for _ in range(reader.u32()):
        topic_filter = reader.string()
        options, subscription_id = reader.unpack(_SUBSCRIPTION)
        _check_subscription_id(subscription_id, 0)  # 0: the subscription has none
        qos = options & 0x03
        retain_handling = (options >> 4) & 0x03
        if qos == 3 or retain_handling == 3 or options & 0xC0:
            raise StateDecodeError(
                f"invalid options 0x{options:02X} for the subscription to {topic_filter!r}"
            )
        try:
            group, _inner = parse_shared_subscription(topic_filter)
        except MQTTProtocolError as exc:
            raise StateDecodeError(exc.message) from None
        session.subscriptions[topic_filter] = SubscriptionRecord(
            session,
            topic_filter,
            qos,
            bool(options & 0x04),
            bool(options & 0x08),
            retain_handling,
            subscription_id,
            group,
        )

    for _ in range(reader.u32()):
        packet_id = reader.u16()
        if not packet_id:
            raise StateDecodeError("an inbound QoS 2 packet identifier is 0")
        session.inbound_qos2.add(packet_id)

    for _ in range(reader.u32()):
        packet_id, state = reader.unpack(_INFLIGHT)
        delivery = _read_delivery(reader, clock_offset, messages)
        if not packet_id or _STATE_QOS.get(state) != delivery.qos:
            raise StateDecodeError(
                f"in-flight message {packet_id} has state {state} at QoS {delivery.qos}"
            )
        delivery.state = state
        session.inflight[packet_id] = delivery

    session.queue = deque(
        _read_delivery(reader, clock_offset, messages) for _ in range(reader.u32())
    )

    if flags & _SESSION_WILL:
        topic = reader.string()
        payload = reader.take(reader.u32())
        qos, retain = _qos_retain(reader.u8(), reader.pos - 1)
        properties = reader.properties(WILL)
        session.will = Will(topic, payload, qos, retain, properties)
        session.will_at = reader.time()
    reader.end()
    return session


# --- saving and restoring a broker ---------------------------------------------------------


def _is_persistent(session: Session) -> bool:
    return (
        session.expiry_interval > 0
        and session.consumer is None
        and not session.client_id.startswith(INTERNAL_CLIENT_PREFIX)
    )


class StatePersistence:
    """Restores a broker's saved MQTT state, then tracks and serializes its changes.

    The caller owns the store: it passes the store's contents to :meth:`restore`, writes each
    batch from :meth:`collect`, and reports the result with :meth:`saved` or
    :meth:`save_failed`. This class works on the broker's internals, so everything here runs
    on the broker's event loop.
    """

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.changes = StateChanges()
        # Client ids with an entry in the store, so that a session that is not persistent
        # deletes an entry only where there is one.
        self.stored_sessions: set[str] = set()

    @property
    def pending(self) -> int:
        """Retained topics and sessions changed and not yet collected."""
        return len(self.changes.retained) + len(self.changes.sessions)

    def restore(
        self, retained: Mapping[str, bytes], sessions: Mapping[str, bytes]
    ) -> RestoreReport:
        """Put saved retained messages and sessions into the broker and start tracking.

        Call it before the broker accepts connections. Sessions come back offline with their
        expiry running from the saved time. Expired entries are dropped, and deleted at the
        next save. An entry that cannot be decoded is logged and skipped but left in the
        store. A delayed will that fell due while the engine was down is published now.
        """
        broker = self.broker
        report = RestoreReport()
        changes = self.changes
        now = time.time()
        clock_offset = now - time.monotonic()
        messages: dict[bytes, Message] = {}

        for topic, data in retained.items():
            try:
                message = decode_retained(topic, data, clock_offset, messages)
            except (StateDecodeError, struct.error) as exc:
                report.undecodable += 1
                log.warning("skipped the saved retained message on %r: %s", topic, exc)
                continue
            if message.expired(time.monotonic()):
                report.expired_retained += 1
                changes.retained[topic] = None
                continue
            broker.retained.store(message)
            report.retained += 1

        due_wills: list[Session] = []
        for client_id, data in sessions.items():
            self.stored_sessions.add(client_id)
            if client_id.startswith(INTERNAL_CLIENT_PREFIX) or client_id in broker.sessions:
                changes.sessions[client_id] = None
                continue
            try:
                session = decode_session(client_id, data, clock_offset, messages)
            except (StateDecodeError, struct.error) as exc:
                report.undecodable += 1
                log.warning("skipped the saved session of client %s: %s", client_id, exc)
                continue
            if not session.expiry_interval or (
                session.ends_at is not None and session.ends_at <= now
            ):
                report.expired_sessions += 1
                changes.sessions[client_id] = None
                if session.will is not None:
                    due_wills.append(session)
                continue
            self._install(session, now, report, due_wills)
            report.sessions += 1

        broker.state_changes = changes
        for session in due_wills:
            # The will was due during the downtime, or when its session ended.
            broker._fire_delayed_will(session)
        return report

    def _install(
        self, session: Session, now: float, report: RestoreReport, due_wills: list[Session]
    ) -> None:
        broker = self.broker
        client_id = session.client_id
        broker.sessions[client_id] = session
        for topic_filter, record in session.subscriptions.items():
            _group, inner = parse_shared_subscription(topic_filter)
            broker.index.add(inner, record)

        excess = len(session.queue) - broker.config.max_queued_messages
        if excess > 0:
            drop_oldest = broker.config.queue_full_policy == QUEUE_FULL_DROP_OLDEST
            for _ in range(excess):
                if drop_oldest:
                    session.queue.popleft()
                else:
                    session.queue.pop()
            session.queue_dropped += excess
            broker.stats.queue_dropped += excess
            report.queue_dropped += excess
            self.changes.sessions[client_id] = None
            log.warning(
                "the saved queue of client %s exceeds the limit of %d messages by %d; "
                "dropped the %s ones",
                client_id,
                broker.config.max_queued_messages,
                excess,
                "oldest" if drop_oldest else "newest",
            )

        loop = broker.loop
        if session.expiry_interval == NEVER_EXPIRES:
            session.ends_at = None
        else:
            if session.ends_at is None:
                # Saved while connected, so the engine stopped without closing the
                # connection: the session goes offline now.
                session.ends_at = now + session.expiry_interval
                self.changes.sessions[client_id] = None
            session.expiry_handle = loop.call_later(
                session.ends_at - now, broker._expire_session, session
            )
        if session.will is not None and session.will_at is not None:
            if session.will_at <= now:
                due_wills.append(session)
            else:
                session.will_handle = loop.call_later(
                    session.will_at - now, broker._fire_delayed_will, session
                )

    def collect(self, max_bytes: int) -> StateBatch:
        """Serialize the marked entries, oldest mark first, until about ``max_bytes``.

        Entries beyond the bound stay marked. The caller writes the batch and then calls
        :meth:`saved` or :meth:`save_failed`.
        """
        batch = StateBatch()
        changes = self.changes
        clock_offset = wall_clock_offset()
        now = time.monotonic()
        broker = self.broker

        topics = changes.retained
        remaining = iter(topics)
        for topic in remaining:
            message = broker.retained.get(topic)
            data = None
            if message is not None and not message.expired(now):
                data = self._encode(encode_retained, message, clock_offset, "retained message")
                if data is None:
                    continue
            batch.retained[topic] = data
            batch.size += len(topic) + (len(data) if data else 0)
            if batch.size >= max_bytes:
                break
        # Nothing marks entries while this method runs, so the rest becomes the new set.
        changes.retained = dict.fromkeys(remaining)
        if batch.size >= max_bytes:
            return batch

        remaining = iter(changes.sessions)
        for client_id in remaining:
            session = broker.sessions.get(client_id)
            if session is not None and _is_persistent(session):
                data = self._encode(encode_session, session, clock_offset, "session")
                if data is None:
                    continue
            elif client_id in self.stored_sessions:
                data = None
            else:
                continue
            batch.sessions[client_id] = data
            batch.size += len(client_id) + (len(data) if data else 0)
            if batch.size >= max_bytes:
                break
        changes.sessions = dict.fromkeys(remaining)
        return batch

    @staticmethod
    def _encode(
        encode: Callable[[Any, float], bytes], value: object, clock_offset: float, what: str
    ) -> bytes | None:
        try:
            return encode(value, clock_offset)
        except (ValueError, OverflowError, struct.error) as exc:
            # NOTE: not expected, because everything saved was checked by the MQTT codec
            # first; the entry keeps its previous saved state.
            log.error("cannot serialize a %s for saving: %s", what, exc)
            return None

    def saved(self, batch: StateBatch) -> None:
        """Record that ``batch`` is in the store."""
        for client_id, data in batch.sessions.items():
            if data is None:
                self.stored_sessions.discard(client_id)
            else:
                self.stored_sessions.add(client_id)

    def save_failed(self, batch: StateBatch) -> None:
        """Mark the entries of ``batch`` again, so the next save writes their newest state."""
        for topic in batch.retained:
            self.changes.retained[topic] = None
        for client_id in batch.sessions:
            self.changes.sessions[client_id] = None
