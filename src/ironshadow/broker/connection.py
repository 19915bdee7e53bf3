"""One client connection: an ``asyncio.Protocol`` around the sans-I/O codec.

The connection logic uses only the transport methods that every asyncio transport has
(``write``/``writelines``, ``pause_reading``/``resume_reading``, ``close``, ``abort``,
``get_extra_info``, ``set_write_buffer_limits``), so TCP, TLS and WebSocket transports share it.

Lifecycle::

    CONNECTING --CONNECT accepted--> CONNECTED --DISCONNECT, error or socket loss--> CLOSED

Outgoing packets are appended to a per-connection list and written with one ``writelines``
call per event-loop iteration (see ``Broker.schedule_flush``), so a burst of messages to one
subscriber costs one system call, not one per message.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from .._mypyc import mypyc_attr
from ..mqtt.constants import MQTT_5
from ..mqtt.decoder import PacketDecoder
from ..mqtt.errors import MQTTProtocolError, protocol_error
from ..mqtt.packets import (
    Auth,
    Connect,
    Disconnect,
    Pingreq,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Subscribe,
    Unsubscribe,
    Will,
)
from ..mqtt.properties import Properties, PropertyId
from ..mqtt.reason_codes import ReasonCode
from . import hooks as reasons
from . import tls
from .message import Message
from .session import AWAITING_PUBACK, AWAITING_PUBCOMP, Delivery, Session

if TYPE_CHECKING:
    from .access import Principal
    from .core import Broker

log = logging.getLogger("ironshadow.broker")

CONNECTING = 0
CONNECTED = 1
CLOSED = 2

# Publish decisions cached per connection: a device uses a handful of topics, and an
# application that writes to many things' shadows starts a new cache past this many.
MAX_DECISIONS = 1024

# Seconds a connection closed by the broker with a reason code keeps reading (and
# discarding) before the socket is closed.
LINGER_SECONDS = 1.0

_TOPIC_ALIAS = PropertyId.TOPIC_ALIAS
_PUBACK_HEADER = b"\x40\x02"
_PUBREC_HEADER = b"\x50\x02"
_PUBREL_HEADER = b"\x62\x02"
_PUBCOMP_HEADER = b"\x70\x02"
_PINGRESP = b"\xd0\x00"


# A cluster worker's connections extend this class (ironshadow.cluster.handoff).
@mypyc_attr(allow_interpreted_subclasses=True)
class MQTTConnection(asyncio.Protocol):
    __slots__ = (
        "aliases_in",
        "aliases_out",
        "broker",
        "certificate_name",
        "clean_start",
        "client_id",
        "decisions_generation",
        "decoder",
        "disconnect_reason",
        "held",
        "inbound_qos2_limit",
        "keep_alive",
        "last_received",
        "max_packet_size_out",
        "opened_at",
        "out",
        "out_size",
        "over_limit",
        "peer",
        "pending_acks",
        "pending_qos0",
        "principal",
        "publish_allowed_at",
        "publish_decisions",
        "publish_timer",
        "reading_paused",
        "request_problem_information",
        "send_quota",
        "session",
        "state",
        "topic_alias_max_out",
        "transport",
        "username",
        "version",
        "will",
        "write_paused",
    )

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.transport: Any = None
        self.decoder = PacketDecoder(
            broker.config.max_packet_size, counts=broker.stats.received_by_type
        )
        self.state = CONNECTING
        self.version = 4
        self.client_id = ""
        # The Clean Start flag (Clean Session in 3.1.1) of the accepted CONNECT.
        self.clean_start = False
        self.username: str | None = None
        self.session: Session | None = None
        self.peer = ""
        self.keep_alive = 0
        now = time.monotonic()
        self.opened_at = now
        self.last_received = now
        self.out: list[bytes] = []
        self.out_size = 0
        # Accepted over the broker's connection limit: it may only take over a session.
        self.over_limit = False
        # Acknowledgements waiting for consumers to store their messages, in arrival order:
        # [packet bytes, or None for a QoS 0 message; ready].
        self.pending_acks: deque[list[Any]] = deque()
        # Entries of ``pending_acks`` that stand for QoS 0 messages, with no acknowledgement.
        self.pending_qos0 = 0
        self.write_paused = False
        self.reading_paused = False
        self.send_quota = broker.config.max_inflight_v311
        self.inbound_qos2_limit = broker.config.receive_maximum
        self.max_packet_size_out = 0
        self.topic_alias_max_out = 0
        self.aliases_in: dict[int, str] | None = None
        self.aliases_out: dict[str, int] | None = None
        self.request_problem_information = True
        self.will: Will | None = None
        # Why the connection ended, for presence events (see ``hooks``).
        self.disconnect_reason = reasons.CONNECTION_LOST
        # Packets received while the connection is on hold, for release_held() to handle.
        # A broker-wide pause or a CONNECT waiting for admission puts it on hold, and None
        # means that it is not on hold.
        self.held: list[Any] | None = None
        # Thing name from a verified client certificate, set by a TLS listener before CONNECT.
        self.certificate_name: str | None = None
        # Who the client is, from the broker's access policy once CONNECT is authenticated.
        self.principal: Principal | None = None
        # Topic -> whether this client may publish there, for a principal whose topics the
        # policy checks; None when it may publish anywhere. Valid while
        # ``decisions_generation`` equals the policy's generation.
        self.publish_decisions: dict[str, bool] | None = None
        self.decisions_generation = 0
        # PUBLISH rate limit (see ``limits``): the earliest time at which the next PUBLISH is
        # within the rate, and the timer that releases the packets held until then.
        self.publish_allowed_at = 0.0
        self.publish_timer: asyncio.TimerHandle | None = None

    # --- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer = f"{peer[0]}:{peer[1]}"
        # A verified client certificate, present only on a TLS listener with a CA bundle.
        peercert = transport.get_extra_info("peercert")
        if peercert and not self._take_certificate_name(peercert):
            return
        config = self.broker.config
        transport.set_write_buffer_limits(high=config.write_high_water, low=config.write_low_water)
        self.broker.connection_made(self)

    def counted_by_peer(self) -> bool:
        """Return whether another worker of the engine accepted this connection, checked
        the connection limits, and passed it here already counted for this worker (see
        cluster/limits.py)."""
        return False

    def _take_certificate_name(self, peercert: dict[str, Any]) -> bool:
        """Set ``certificate_name`` from the client certificate and return True, or close
        the connection and return False when the certificate lacks the configured field."""
        broker = self.broker
        field = broker.config.tls_name_field
        name = tls.certificate_name(peercert, field)
        if name:
            self.certificate_name = name
            return True
        broker.stats.connections_rejected += 1
        subject = tls.describe_subject(peercert)
        broker._log_rarely(
            "tls-no-name",
            subject,
            "TLS connection from %s rejected: its client certificate (%s) has no %s to take "
            "the thing name from. Issue certificates with one, or change tls_name_field",
            self.peer,
            subject,
            tls.NAME_FIELD_WORDS[field],
        )
        transport = self.transport
        self.state = CLOSED
        self.transport = None
        transport.close()
        return False

    def data_received(self, data: bytes) -> None:
        if self.state == CLOSED:
            return
        self.last_received = time.monotonic()
        broker = self.broker
        broker.stats.bytes_received += len(data)
        try:
            packets = self.decoder.feed(data)
        except MQTTProtocolError as exc:
            self.protocol_error(exc)
            return
        self.handle_packets(packets)

    def handle_packets(self, packets: list[Any]) -> None:
        """Act on ``packets`` in order, keeping those that arrive while on hold."""
        try:
            for index, packet in enumerate(packets):
                if self.held is not None or self.reading_paused or self.broker.reading_paused:
                    # NOTE: uvloop 0.23 starts reading a new connection after connection_made()
                    # even when that paused the transport, so packets can arrive in a pause.
                    # One read can also bring far more packets than the limit that paused the
                    # connection: they wait here, decoded, until it resumes.
                    if self.reading_paused and self.held is None and self.version == MQTT_5:
                        self._check_receive_maximum(packets, index)
                    if self.held is not None:
                        self.held.extend(packets[index:])
                    else:  # ``packets`` is this call's own list: keep it rather than copy it
                        self.held = packets[index:] if index else packets
                    self.transport.pause_reading()
                    if self.broker.reading_paused:
                        self.broker.release_after_pause(self)
                    return
                _HANDLERS[packet.__class__](self, packet)
                if self.state == CLOSED:
                    return
        except MQTTProtocolError as exc:
            self.protocol_error(exc)

    def _check_receive_maximum(self, packets: list[Any], start: int) -> None:
        """Raise if the QoS 1 and 2 PUBLISH packets from ``start`` on would take an MQTT 5
        client over Receive Maximum, as they would when handled now rather than held."""
        waiting = 0
        for packet in packets[start:]:
            if packet.__class__ is Publish and packet.qos and not packet.dup:
                waiting += 1
        limit = self.inbound_qos2_limit
        if waiting and self.unacknowledged() + waiting > limit:
            raise MQTTProtocolError(
                ReasonCode.RECEIVE_MAXIMUM_EXCEEDED,
                f"more than {limit} QoS 1 and 2 messages unacknowledged",
            )

    def release_held(self) -> None:
        """End the hold and act on the packets kept during it."""
        held, self.held = self.held, None
        if held and self.state != CLOSED:
            self.handle_packets(held)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.session is not None and self.state == CONNECTED:
            self.broker.drain(self.session)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is None:
            return  # close() has already done the bookkeeping
        self.state = CLOSED
        self.transport = None
        self.out = []
        self.broker.connection_lost(self)

    # --- writing ----------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Queue one whole packet for the next flush."""
        self.broker.stats.sent_by_type[data[0] >> 4] += 1
        if not self.out:
            self.broker.schedule_flush(self)
        self.out.append(data)
        self.out_size += len(data)

    def flush(self) -> None:
        out = self.out
        if not out:
            return
        transport = self.transport
        self.broker.stats.bytes_sent += self.out_size
        self.out = []
        self.out_size = 0
        if transport is not None and not transport.is_closing():
            transport.writelines(out)
            # Messages queued because ``out`` went over the high-water mark get no
            # resume_writing() call, so send them now unless writelines() paused writing.
            session = self.session
            if session is not None and session.queue and not self.write_paused:
                self.broker.drain(session)

    def fits(self, data: bytes) -> bool:
        """Return whether ``data`` is within the Maximum Packet Size that the client set."""
        limit = self.max_packet_size_out
        return not limit or len(data) <= limit

    @property
    def congested(self) -> bool:
        return self.write_paused or self.out_size > self.broker.config.write_high_water

    def encode_publish(self, delivery: Delivery, packet_id: int, dup: bool) -> bytes | None:
        """Encode ``delivery`` for this client, or return None if it exceeds the client's
        Maximum Packet Size, in which case the message is dropped for this client only
        [MQTT-3.1.2-25]."""
        message = delivery.message
        version = self.version
        alias = 0
        omit_topic = False
        if self.topic_alias_max_out and version == MQTT_5:
            aliases = self.aliases_out
            if aliases is None:
                aliases = self.aliases_out = {}
            alias = aliases.get(message.topic, 0)
            if alias:
                omit_topic = True
            elif len(aliases) < self.topic_alias_max_out:
                alias = aliases[message.topic] = len(aliases) + 1
        data = message.encode(
            version,
            delivery.qos,
            delivery.retain,
            packet_id,
            dup,
            delivery.subscription_ids if version == MQTT_5 else None,
            alias,
            omit_topic,
            time.monotonic(),
        )
        if self.max_packet_size_out and len(data) > self.max_packet_size_out:
            if not omit_topic and alias and self.aliases_out is not None:
                del self.aliases_out[message.topic]
            self.broker.stats.publish_dropped += 1
            return None
        return data

    # --- closing ----------------------------------------------------------------------

    def close(
        self, reason_code: int | None = None, publish_will: bool = True, linger: bool = True
    ) -> None:
        """Close the connection, sending DISCONNECT with ``reason_code`` to a v5 client.

        With a reason code and ``linger``, the broker half-closes the socket and discards
        what the client still sends for ``LINGER_SECONDS`` before closing it. Closing at
        once would make the kernel respond to the client's next write with a reset, which can
        reach the client before it has read the DISCONNECT.
        """
        if self.state == CLOSED or self.transport is None:
            return
        if reason_code is not None and self.version == MQTT_5 and self.state == CONNECTED:
            self.send(Disconnect(reason_code).encode(MQTT_5))
        if not publish_will:
            self.will = None
        self.flush()
        transport = self.transport
        self.state = CLOSED
        self.transport = None
        self.broker.connection_lost(self)
        if reason_code is not None and linger and transport.can_write_eof():
            transport.write_eof()
            self.broker.linger(transport, LINGER_SECONDS)
        else:
            transport.close()

    def protocol_error(self, exc: MQTTProtocolError) -> None:
        client = self.client_id or "(before CONNECT)"
        self.disconnect_reason = reasons.CLIENT_ERROR
        log.warning("client %s from %s: %s; closing the connection", client, self.peer, exc)
        self.broker.stats.protocol_errors += 1
        reason_code = exc.reason_code
        if self.state == CONNECTING:
            if reason_code == ReasonCode.UNSUPPORTED_PROTOCOL_VERSION:
                # Sent in the 3.1.1 form, which every client version can read.
                self.send(b"\x20\x02\x00\x01")
            elif self.decoder.version == MQTT_5:
                self.send(b"\x20\x03\x00" + bytes((reason_code,)) + b"\x00")
        elif reason_code == ReasonCode.UNSUPPORTED_PROTOCOL_VERSION:
            # The code exists only in CONNACK. After CONNECT it comes from a second CONNECT,
            # which is a protocol error whatever protocol it names [MQTT-3.1.0-2].
            reason_code = ReasonCode.PROTOCOL_ERROR
        self.close(reason_code)

    # --- incoming packets -------------------------------------------------------------

    def _require_connected(self, name: str) -> Session:
        if self.state != CONNECTED or self.session is None:
            raise protocol_error(f"{name} received before CONNECT")  # [MQTT-3.1.0-1]
        return self.session

    def _on_connect(self, packet: Connect) -> None:
        if self.state != CONNECTING:
            raise protocol_error("second CONNECT on one connection")  # [MQTT-3.1.0-2]
        self.version = packet.protocol_level
        # Set before admission, so that a CONNACK that rejects the client respects it too.
        self.max_packet_size_out = packet.properties.get(PropertyId.MAXIMUM_PACKET_SIZE, 0)
        self.broker.admit(self, packet)

    def _on_publish(self, packet: Publish) -> None:
        if self.state != CONNECTED:
            raise protocol_error("PUBLISH received before CONNECT")
        session = self.session
        assert session is not None
        broker = self.broker
        limits = broker.limits
        if limits.publish_interval and limits.hold_publish(self, packet):
            return
        broker.stats.publish_received += 1
        topic = packet.topic
        properties = packet.properties
        if properties and self.version == MQTT_5:
            if PropertyId.SUBSCRIPTION_IDENTIFIER in properties:
                # Only the server sets it, on the copies it delivers [MQTT-3.3.4-6].
                raise protocol_error(f"PUBLISH to {topic!r} carries a Subscription Identifier")
            alias = properties.get(_TOPIC_ALIAS)
            if alias is not None:
                topic = self._resolve_topic_alias(topic, alias)
            if properties.get(PropertyId.PAYLOAD_FORMAT_INDICATOR) == 1:
                try:
                    packet.payload.decode("utf-8")
                except UnicodeDecodeError:
                    raise MQTTProtocolError(
                        ReasonCode.PAYLOAD_FORMAT_INVALID,
                        f"payload on {topic!r} is marked as UTF-8 but is not well-formed UTF-8",
                    ) from None
        if len(topic) >= limits.topic_check_length and limits.reject_publish_topic(self, topic):
            return
        if packet.retain and not broker.config.retain_available:
            raise MQTTProtocolError(ReasonCode.RETAIN_NOT_SUPPORTED, "retained messages are off")
        decisions = self.publish_decisions
        if decisions is not None:
            allowed = decisions.get(topic)
            if allowed is None or self.decisions_generation != broker.access.generation:
                allowed = self._decide_publish(topic)
            if not allowed:
                self._publish_denied(packet, topic)
                return
        qos = packet.qos
        message = None
        if qos == 2 and packet.packet_id in session.inbound_qos2:
            # Retransmission before PUBREL: acknowledge again, do not route again.
            # NOTE: after a reconnect this PUBREC does not wait for a consumer that still
            # holds the first copy, because the hold belongs to the old connection.
            self.send_ack(_PUBREC_HEADER + packet.packet_id.to_bytes(2, "big"))
            return
        # The limits apply to $SYS topics too, because a QoS 2 message there also waits for
        # PUBREL in inbound_qos2.
        limit = self.inbound_qos2_limit
        if self.version == MQTT_5:
            if qos and self.unacknowledged() >= limit:
                raise MQTTProtocolError(
                    ReasonCode.RECEIVE_MAXIMUM_EXCEEDED,
                    f"more than {limit} QoS 1 and 2 messages unacknowledged",
                )
        elif qos == 2 and len(session.inbound_qos2) >= limit:
            raise MQTTProtocolError(
                ReasonCode.RECEIVE_MAXIMUM_EXCEEDED,
                f"more than {limit} QoS 2 messages awaiting PUBREL",
            )
        if topic.startswith("$SYS"):
            # $SYS topics belong to the broker: a client's message there is acknowledged
            # and discarded.
            matched = 0
        else:
            message = Message(topic, packet.payload, qos, packet.retain, properties, self.client_id)
            matched = broker.publish(message)
        if not qos:
            if message is not None and message.holds:
                # QoS 0 has no acknowledgement to delay, but the message counts against the
                # same limit while a consumer stores it, so a client that sends faster than
                # the engine stores is slowed down by TCP instead of outrunning the store.
                pending: list[Any] = [None, False]
                message.on_released = lambda: self._ack_ready(pending)
                self.pending_qos0 += 1
                self._queue_ack(pending)
            return
        if qos == 1:
            if matched or self.version != MQTT_5:
                ack = _PUBACK_HEADER + packet.packet_id.to_bytes(2, "big")
            else:
                ack = Puback(packet.packet_id, ReasonCode.NO_MATCHING_SUBSCRIBERS).encode(5)
        else:
            session.inbound_qos2.add(packet.packet_id)
            broker.session_changed(session)
            if matched or self.version != MQTT_5:
                ack = _PUBREC_HEADER + packet.packet_id.to_bytes(2, "big")
            else:
                ack = Pubrec(packet.packet_id, ReasonCode.NO_MATCHING_SUBSCRIBERS).encode(5)
        if message is not None and message.holds:
            # A consumer stores the message first: the acknowledgement waits for it, in
            # order behind any earlier one [MQTT-4.6.0-2].
            pending = [ack, False]
            message.on_released = lambda: self._ack_ready(pending)
            self._queue_ack(pending)
        else:
            self.send_ack(ack)

    def _decide_publish(self, topic: str) -> bool:
        """Return whether this client may publish to ``topic``, and cache the decision."""
        access = self.broker.access
        decisions = self.publish_decisions
        assert decisions is not None and self.principal is not None
        if self.decisions_generation != access.generation or len(decisions) >= MAX_DECISIONS:
            decisions.clear()
            self.decisions_generation = access.generation
        allowed = decisions[topic] = access.may_publish(self.principal, self.client_id, topic)
        return allowed

    def _publish_denied(self, packet: Publish, topic: str) -> None:
        """Drop a PUBLISH that the client may not send, and acknowledge it as its MQTT version
        requires.

        A v5 client gets PUBACK or PUBREC with Not authorized, which ends the QoS 2 flow
        [MQTT-4.3.3-4]. MQTT 3.1.1 has no way to report the refusal, so a 3.1.1 client gets
        the usual acknowledgement. Nothing is routed either way.
        """
        principal = self.principal
        assert principal is not None  # set at CONNECT, before any PUBLISH is handled
        self.broker._log_rarely(
            "publish-denied",
            self.client_id,
            "client %s (%s %r) may not publish to %r; message dropped",
            self.client_id,
            principal.role,
            principal.name,
            topic,
        )
        qos = packet.qos
        if not qos:
            return
        if self.version == MQTT_5:
            properties: Properties = {}
            if self.request_problem_information:
                properties[PropertyId.REASON_STRING] = f"not authorized to publish to {topic}"
            ack_class = Puback if qos == 1 else Pubrec
            ack = ack_class(packet.packet_id, ReasonCode.NOT_AUTHORIZED, properties).encode(5)
            if not self.fits(ack):
                # [MQTT-3.4.2-2] The reason string is left out rather than exceed the limit.
                ack = ack_class(packet.packet_id, ReasonCode.NOT_AUTHORIZED).encode(5)
        else:
            header = _PUBACK_HEADER if qos == 1 else _PUBREC_HEADER
            ack = header + packet.packet_id.to_bytes(2, "big")
        self.send_ack(ack)

    def unacknowledged(self) -> int:
        """QoS 1 and 2 messages from this client not yet fully acknowledged."""
        session = self.session
        inbound = len(session.inbound_qos2) if session is not None else 0
        return inbound + len(self.pending_acks) - self.pending_qos0

    def send_ack(self, ack: bytes) -> None:
        """Send an acknowledgement now, or after the held ones before it."""
        if self.pending_acks:
            self._queue_ack([ack, True])
        else:
            self.send(ack)

    def _queue_ack(self, pending: list[Any]) -> None:
        """Queue ``pending`` behind the held acknowledgements; pause reading at the limit.

        Retransmitted QoS 2 messages queue acknowledgements too, so the pause applies to them
        as well. Without it, a client could grow the queue for as long as a hold lasts.
        """
        self.pending_acks.append(pending)
        if len(self.pending_acks) >= self.inbound_qos2_limit and not self.reading_paused:
            # An MQTT 3.1.1 client has no Receive Maximum to respect, so it is slowed
            # down by TCP instead until its acknowledgements catch up.
            self.reading_paused = True
            self.transport.pause_reading()

    def _ack_ready(self, pending: list[Any]) -> None:
        pending[1] = True
        acks = self.pending_acks
        while acks and acks[0][1]:
            ack = acks.popleft()[0]
            if ack is None:  # a QoS 0 message
                self.pending_qos0 -= 1
            elif self.state == CONNECTED:
                self.send(ack)
        if self.reading_paused and len(acks) < self.inbound_qos2_limit // 2:
            self.reading_paused = False
            transport = self.transport
            if transport is None or self.publish_timer is not None:
                return  # the rate limit's timer resumes it
            if self.broker.reading_paused:
                self.broker.release_after_pause(self)
                return
            transport.resume_reading()
            if self.held is not None:
                self.release_held()

    def _resolve_topic_alias(self, topic: str, alias: int) -> str:
        if alias > self.broker.config.topic_alias_maximum:
            raise MQTTProtocolError(
                ReasonCode.TOPIC_ALIAS_INVALID,
                f"topic alias {alias} exceeds the Topic Alias Maximum "
                f"{self.broker.config.topic_alias_maximum}",
            )  # [MQTT-3.3.2-9]
        aliases = self.aliases_in
        if topic:
            if aliases is None:
                aliases = self.aliases_in = {}
            aliases[alias] = topic
            return topic
        if aliases is None or alias not in aliases:
            raise protocol_error(f"topic alias {alias} was never set on this connection")
        return aliases[alias]

    def _on_puback(self, packet: Puback) -> None:
        session = self._require_connected("PUBACK")
        delivery = session.inflight.get(packet.packet_id)
        if delivery is not None and delivery.state == AWAITING_PUBACK:
            del session.inflight[packet.packet_id]
            self.broker.session_changed(session)
            if session.queue:
                self.broker.drain(session)

    def _on_pubrec(self, packet: Pubrec) -> None:
        session = self._require_connected("PUBREC")
        delivery = session.inflight.get(packet.packet_id)
        pid = packet.packet_id.to_bytes(2, "big")
        if delivery is None or delivery.state == AWAITING_PUBACK:
            if self.version == MQTT_5:
                not_found = ReasonCode.PACKET_IDENTIFIER_NOT_FOUND
                self.send(Pubrel(packet.packet_id, not_found).encode(5))
            else:
                self.send(_PUBREL_HEADER + pid)
            return
        if packet.reason_code >= 0x80:
            # The receiver rejected the message: the flow ends here [MQTT-4.3.3-4].
            del session.inflight[packet.packet_id]
            self.broker.session_changed(session)
            if session.queue:
                self.broker.drain(session)
            return
        delivery.state = AWAITING_PUBCOMP
        self.broker.session_changed(session)
        self.send(_PUBREL_HEADER + pid)

    def _on_pubrel(self, packet: Pubrel) -> None:
        session = self._require_connected("PUBREL")
        pid = packet.packet_id
        if pid in session.inbound_qos2:
            session.inbound_qos2.discard(pid)
            self.broker.session_changed(session)
            self.send(_PUBCOMP_HEADER + pid.to_bytes(2, "big"))
        elif self.version == MQTT_5:
            self.send(Pubcomp(pid, ReasonCode.PACKET_IDENTIFIER_NOT_FOUND).encode(5))
        else:
            self.send(_PUBCOMP_HEADER + pid.to_bytes(2, "big"))

    def _on_pubcomp(self, packet: Pubcomp) -> None:
        session = self._require_connected("PUBCOMP")
        delivery = session.inflight.get(packet.packet_id)
        if delivery is not None and delivery.state == AWAITING_PUBCOMP:
            del session.inflight[packet.packet_id]
            self.broker.session_changed(session)
            if session.queue:
                self.broker.drain(session)

    def _on_subscribe(self, packet: Subscribe) -> None:
        self._require_connected("SUBSCRIBE")
        self.broker.subscribe(self, packet)

    def _on_unsubscribe(self, packet: Unsubscribe) -> None:
        self._require_connected("UNSUBSCRIBE")
        self.broker.unsubscribe(self, packet)

    def _on_pingreq(self, packet: Pingreq) -> None:
        self._require_connected("PINGREQ")
        self.send(_PINGRESP)

    def _on_disconnect(self, packet: Disconnect) -> None:
        session = self._require_connected("DISCONNECT")
        expiry = packet.properties.get(PropertyId.SESSION_EXPIRY_INTERVAL)
        if expiry is not None:
            if session.expiry_interval == 0 and expiry != 0:
                # [MQTT-3.14.2-2] A session that ends at disconnect cannot be revived here.
                raise protocol_error(
                    "DISCONNECT sets a session expiry interval after CONNECT set 0"
                )
            session.expiry_interval = min(expiry, self.broker.config.max_session_expiry)
        publish_will = packet.reason_code == ReasonCode.DISCONNECT_WITH_WILL_MESSAGE
        self.disconnect_reason = reasons.CLIENT_INITIATED_DISCONNECT
        self.close(None, publish_will=publish_will)

    def _on_auth(self, packet: Auth) -> None:
        # No authentication method is offered, so a client may never send AUTH.
        raise protocol_error("AUTH received, but no authentication method was negotiated")

    def _on_server_packet(self, packet: Any) -> None:
        raise protocol_error(f"{packet.packet_type.name} may only be sent by a server")


_HANDLERS: dict[type, Any] = {
    Connect: MQTTConnection._on_connect,
    Publish: MQTTConnection._on_publish,
    Puback: MQTTConnection._on_puback,
    Pubrec: MQTTConnection._on_pubrec,
    Pubrel: MQTTConnection._on_pubrel,
    Pubcomp: MQTTConnection._on_pubcomp,
    Subscribe: MQTTConnection._on_subscribe,
    Unsubscribe: MQTTConnection._on_unsubscribe,
    Pingreq: MQTTConnection._on_pingreq,
    Disconnect: MQTTConnection._on_disconnect,
    Auth: MQTTConnection._on_auth,
}


def _register_server_packets() -> None:
    from ..mqtt.packets import Connack, Pingresp, Suback, Unsuback

    for packet_class in (Connack, Suback, Unsuback, Pingresp):
        _HANDLERS[packet_class] = MQTTConnection._on_server_packet


_register_server_packets()
