"""The bus between the workers of one engine: Unix stream sockets carrying length-prefixed frames.

Each worker listens on ``bus-{index}.sock`` in the cluster folder and keeps one outgoing link
to every peer, so a frame always travels on the sender's own link and a peer's frames arrive
in the order it sent them. The receiving side is :class:`InboundLink`; it learns the sender's
index from the first frame.

A frame is a 4-byte big-endian body length, then the body. The body starts with one kind
byte:

======== ================ ======================================================================
kind     name             rest of the body
======== ================ ======================================================================
0        HELLO            the sender's worker index, 2 bytes big-endian; the first frame on a link
1        RESET            nothing: forget every topic filter that the sender announced before
2        SUBSCRIBE        a topic filter (UTF-8) that the sender's clients now subscribe to
3        UNSUBSCRIBE      a topic filter that none of the sender's clients subscribes to any more
4        PUBLISH          a message for the receiver's subscribers (see :func:`encode_message`)
5        REQUEST          a 4-byte request number, then a shadow request for a thing that the
                          receiver owns, encoded as in PUBLISH. A number other than 0 asks for
                          RELEASED once the request is stored
6        RELEASED         the 4-byte number of a REQUEST that the sender has stored
7        HTTP_CALL        a 4-byte call number, then a shadow request made over HTTP to the sender
                          for a thing that the receiver owns (see :func:`encode_http_call`)
8        HTTP_REPLY       the 4-byte number of an HTTP_CALL, its 2-byte HTTP status, a 2-byte
                          Retry-After in seconds (0 for none), then the JSON body to the end
9        METRICS          a 4-byte call number: the sender asks for the receiver's metrics
10       METRICS_OF       the 4-byte number of a METRICS frame, then the receiver's metrics
                          (see :meth:`~ironshadow.api.metrics.Exposition.to_bytes`)
11       SYNC             a 4-byte number: the receiver answers SYNCED with it, having handled
                          every frame that the sender sent before
12       SYNCED           the 4-byte number of a SYNC frame
13       REPLAY           a client id (MQTT string), then the ``update/delta`` topic to the end: the
                          client subscribed to the delta of a thing that the receiver owns
14       DELTA            a client id and a topic (MQTT strings), then the current delta message
                          to the end: the reply to a REPLAY when the shadow has a delta
15       CLAIM            a 4-byte claim number, a flags byte (CLEAN_START, WANTS_SESSION), a client
                          id: a client whose id the receiver owns connected to the sender
                          without being handed off (TLS, WebSocket). With WANTS_SESSION the
                          sender waits for SESSION with the claim number
16       TAKEOVER         a 4-byte claim number, a flags byte, a 2-byte worker index and a
                          4-byte number, then a client id: a newer connection with that id was
                          made, so the receiver closes the claimed connection, or lets its
                          offline session give way. With WANTS_SESSION it sends the session to
                          that worker in SESSION with that number
17       SHARED           a shared subscription filter ``$share/{group}/{filter}`` (MQTT string),
                          then a message as in PUBLISH, for one of the receiver's members of it
18       CALL             a 4-byte call number, a procedure name (MQTT string), then its arguments
                          as a JSON object to the end: run it on the receiver (an API read)
19       RESULT           the 4-byte number of a CALL, one byte 0 when it succeeded, then its
                          result as JSON; or 1 when it failed, then the reason (UTF-8)
20       FEED             one byte: 1 when the sender's ``/ws`` feed has subscribers, so the
                          receiver sends it CHANGES, and 0 when it has none any more
21       CHANGES          shadow changes stored by the sender: per change the thing name and the
                          shadow name ('' for the classic shadow) as MQTT strings, a 4-byte
                          timestamp, a 4-byte length and the shadow document as the hot store
                          keeps it
22       FIGURES          the sender's own $SYS figures as a JSON object, topic to number, sent at
                          each $SYS interval, so that every worker publishes the engine's totals
23       RETAINED_REQUEST nothing: the sender has just started and requests the receiver's
                          retained messages
24       RETAINED         one retained message of the reply to RETAINED_REQUEST, encoded as
                          in PUBLISH
25       RETAINED_END     nothing: the reply to RETAINED_REQUEST is complete
26       SESSION          the 4-byte number of a CLAIM or TAKEOVER with WANTS_SESSION, a client id
                          (MQTT string), then the client's session as the MQTT state store
                          saves it (:func:`~ironshadow.broker.persistence.encode_session`), or
                          nothing when the sender has none. The sender no longer has it,
                          but it keeps the messages routed to it until TAIL
27       HELD             per session, a 4-byte claim number (0 for an offline session) and a
                          client id (MQTT string): sessions that the sender has of client ids
                          that the receiver owns, sent when a link opens. The receiver
                          requests them from the sender when their clients connect elsewhere
28       PRESSURE         one byte: 1 when the sender's store has fallen behind and it pauses
                          reading, so the receiver pauses reading too, and 0 when it caught up
29       MOVE_SYNC        a 2-byte worker index, then a client id: the sender took in that
                          client's session from that worker and routes its messages from now
                          on. A receiver that is not that worker sends MARK to that worker
30       MARK             a client id: the sender routes that client's messages to the worker
                          that took in its session, and no longer to the receiver
31       TAIL             the 4-byte number of the SESSION frame, a client id (MQTT string), then
                          per message a 4-byte length and the message as in PUBLISH: what was
                          routed to the session on the sender after it sent SESSION
======== ================ ======================================================================

Shared subscriptions are announced whole (``$share/{group}/{filter}``). The worker where a
message is published picks one member of each matching group, counting each peer with
members as one, and sends the message in a SHARED frame when it picks a peer. PUBLISH copies
are routed to plain subscriptions only, so every group gets each message once.

A worker sends SYNC after announcing a new topic filter, and delays the client's SUBACK until
every peer has replied. A message published on any worker after the SUBACK then reaches the
new subscriber.

A session lives on one worker at a time. A client that connects without Clean Start to a
worker that does not have its session gets it from the worker that has it, before CONNACK:
the owner of the client id knows which worker that is (itself, or the one of the latest
CLAIM or HELD), and requests it with TAKEOVER when that is another worker.

Until every worker routes the moved session's messages to its new worker, some still go to
the old one, so the old worker keeps the session's subscriptions and collects what they
match. Each worker's messages travel on its own link in order, so each worker marks the
point after which its messages go to the new worker. The new worker marks it with
MOVE_SYNC, which it sends to every peer once it has the subscriptions. The old worker's
point is when that MOVE_SYNC arrives there, and every other worker sends the old worker a
MARK. A message from a worker past its point reaches the new worker directly, so the old
worker drops its copy (a message for a shared subscription alone is kept: it went to one
worker only). With every point known, or after a second, the old worker sends what it
collected in TAIL and removes the subscriptions. The new worker queues those messages
before the ones it got directly, and the client's CONNACK waits for TAIL.

Call numbers are the sender's own, counted separately from REQUEST numbers: a reply carries
the number of the frame it answers, so that the sender can match it to the waiting caller.
A reply that comes after its caller gave up finds no caller and is ignored.

Writes are batched: frames queued during one event-loop iteration go out in one
``writelines`` call per link at the end of it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from ..broker.message import Message
from ..mqtt.constants import PacketType
from ..mqtt.encoding import decode_string, encode_string
from ..mqtt.properties import PropertyId, decode_properties, encode_properties

log = logging.getLogger("ironshadow.cluster")

HELLO = 0
RESET = 1
SUBSCRIBE = 2
UNSUBSCRIBE = 3
PUBLISH = 4
REQUEST = 5
RELEASED = 6
HTTP_CALL = 7
HTTP_REPLY = 8
METRICS = 9
METRICS_OF = 10
SYNC = 11
SYNCED = 12
REPLAY = 13
DELTA = 14
CLAIM = 15
TAKEOVER = 16
SHARED = 17
CALL = 18
RESULT = 19
FEED = 20
CHANGES = 21
FIGURES = 22
RETAINED_REQUEST = 23
RETAINED = 24
RETAINED_END = 25
SESSION = 26
HELD = 27
PRESSURE = 28
MOVE_SYNC = 29
MARK = 30
TAIL = 31

# Flags of CLAIM and TAKEOVER.
CLEAN_START = 0x01
WANTS_SESSION = 0x02

# The shadow operations of an HTTP_CALL frame, by their code in the frame.
HTTP_OPERATIONS = ("get", "update", "delete")
_HTTP_OPERATION_CODES = {operation: code for code, operation in enumerate(HTTP_OPERATIONS)}
_HAS_SHADOW_NAME = 0x01

# Largest frame body accepted from a peer, in bytes: an MQTT packet is at most 256 MiB, and a
# frame adds a few bytes of header to the message it carries.
MAX_FRAME_BYTES = 256 * 1024 * 1024 + 1024
# Bytes buffered on one link above which further PUBLISH frames to that peer are dropped
# (and counted), so that a stalled peer cannot grow this worker's memory without bound.
MAX_LINK_BUFFER = 64 * 1024 * 1024

_RETAIN = 0x04
_HAS_ORIGIN = 0x08
_EXPIRY = PropertyId.MESSAGE_EXPIRY_INTERVAL


def frame(kind: int, body: bytes = b"") -> bytes:
    """Return one whole frame: length prefix, kind byte and ``body``."""
    return (len(body) + 1).to_bytes(4, "big") + bytes((kind,)) + body


def encode_message(message: Message, now: float) -> bytes:
    """Encode ``message`` for a PUBLISH or REQUEST frame, without the kind byte.

    Layout: one flags byte (QoS in bits 0-1, retain in bit 2, origin present in bit 3), then
    the topic as an MQTT string and the origin client id as an MQTT string when present. The
    MQTT 5 properties with their length follow, then the payload up to the end of the frame.
    A message expiry interval is sent as the time left, rounded up, as a broker forwards it.
    """
    flags = message.qos | (_RETAIN if message.retain else 0)
    origin = message.origin
    if origin is not None:
        flags |= _HAS_ORIGIN
    properties = message.properties
    if message.expires_at is not None:
        properties = dict(properties or {})
        properties[_EXPIRY] = max(0, int(message.expires_at - now + 0.999))
    parts = [bytes((flags,)), message.topic_bytes()]
    if origin is not None:
        parts.append(encode_string(origin))
    parts.append(encode_properties(properties))
    parts.append(message.payload)
    return b"".join(parts)


def decode_message(body: bytes | bytearray, pos: int, end: int) -> Message:
    """Decode what :func:`encode_message` wrote in ``body[pos:end]``."""
    flags = body[pos]
    pos += 1
    topic, pos = decode_string(body, pos, end)
    origin = None
    if flags & _HAS_ORIGIN:
        origin, pos = decode_string(body, pos, end)
    properties, pos = decode_properties(body, pos, end, PacketType.PUBLISH)
    payload = bytes(body[pos:end])
    return Message(topic, payload, flags & 0x03, bool(flags & _RETAIN), properties, origin)


def encode_http_call(
    number: int, operation: str, thing: str, shadow_name: str | None, payload: bytes
) -> bytes:
    """Encode the body of an HTTP_CALL frame, without the kind byte.

    Layout: the 4-byte call number, then one byte with the operation's index in
    ``HTTP_OPERATIONS`` and one flags byte (bit 0 is set when a shadow name follows the thing
    name). The thing name and the shadow name follow as MQTT strings, then the request body
    up to the end.
    """
    flags = 0 if shadow_name is None else _HAS_SHADOW_NAME
    parts = [
        number.to_bytes(4, "big"),
        bytes((_HTTP_OPERATION_CODES[operation], flags)),
        encode_string(thing),
    ]
    if shadow_name is not None:
        parts.append(encode_string(shadow_name))
    parts.append(payload)
    return b"".join(parts)


def decode_http_call(
    body: bytes | bytearray, pos: int, end: int
) -> tuple[int, str, str, str | None, bytes]:
    """Decode what :func:`encode_http_call` wrote in ``body[pos:end]``: the call number,
    operation, thing name, shadow name (None for the classic shadow) and request body."""
    number = int.from_bytes(body[pos : pos + 4], "big")
    operation = HTTP_OPERATIONS[body[pos + 4]]
    flags = body[pos + 5]
    thing, pos = decode_string(body, pos + 6, end)
    shadow_name = None
    if flags & _HAS_SHADOW_NAME:
        shadow_name, pos = decode_string(body, pos, end)
    return number, operation, thing, shadow_name, bytes(body[pos:end])


def encode_http_reply(number: int, status: int, retry_after: int | None, body: bytes) -> bytes:
    """Encode the body of an HTTP_REPLY frame, without the kind byte."""
    return (
        number.to_bytes(4, "big")
        + status.to_bytes(2, "big")
        + (retry_after or 0).to_bytes(2, "big")
        + body
    )


def decode_http_reply(
    body: bytes | bytearray, pos: int, end: int
) -> tuple[int, int, int | None, bytes]:
    """Decode an HTTP_REPLY body: call number, status, Retry-After (None for none), body."""
    number = int.from_bytes(body[pos : pos + 4], "big")
    status = int.from_bytes(body[pos + 4 : pos + 6], "big")
    retry_after = int.from_bytes(body[pos + 6 : pos + 8], "big") or None
    return number, status, retry_after, bytes(body[pos + 8 : end])


class OutboundLink(asyncio.Protocol):
    """This worker's link to one peer: frames queued now are written at the loop's next turn."""

    def __init__(self, peer: int, schedule_flush: Callable[[OutboundLink], None]) -> None:
        self.peer = peer
        self.transport: asyncio.Transport | None = None
        self.out: list[bytes] = []
        self._schedule_flush = schedule_flush
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.out = []
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        """Ignore data: peers never write on a link that they accepted."""

    def send(self, data: bytes) -> bool:
        """Queue one whole frame; return False when the link is closed."""
        if self.transport is None:
            return False
        if not self.out:
            self._schedule_flush(self)
        self.out.append(data)
        return True

    def congested(self) -> bool:
        transport = self.transport
        return transport is None or transport.get_write_buffer_size() > MAX_LINK_BUFFER

    def flush(self) -> None:
        out, self.out = self.out, []
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(out)

    def close(self) -> None:
        if self.transport is not None:
            self.flush()
            self.transport.close()


class InboundLink(asyncio.Protocol):
    """One peer's link to this worker; passes each decoded frame to ``on_frame``.

    ``on_frame(link, kind, body, pos, end)`` gets the kind and the rest of the body as
    ``body[pos:end]``. ``on_lost(link)`` runs when the link closes.
    """

    def __init__(
        self,
        on_frame: Callable[[InboundLink, int, bytearray, int, int], None],
        on_lost: Callable[[InboundLink], None],
    ) -> None:
        # The sender's worker index, from its HELLO frame; None until then.
        self.peer: int | None = None
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._on_frame = on_frame
        self._on_lost = on_lost

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._on_lost(self)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        pos = 0
        size = len(buffer)
        try:
            while size - pos >= 4:
                length = int.from_bytes(buffer[pos : pos + 4], "big")
                if not 1 <= length <= MAX_FRAME_BYTES:
                    raise ValueError(f"frame length {length} is out of range")
                end = pos + 4 + length
                if end > size:
                    break
                kind = buffer[pos + 4]
                if kind == HELLO:
                    self.peer = int.from_bytes(buffer[pos + 5 : end], "big")
                elif self.peer is None:
                    raise ValueError(f"frame of kind {kind} before HELLO")
                else:
                    self._on_frame(self, kind, buffer, pos + 5, end)
                pos = end
        except Exception as exc:  # a bug in a peer, or in a frame handler: drop the link
            log.error("bus link from worker %s: %r; closing the link", self.peer, exc)
            if self.transport is not None:
                self.transport.close()
            self._buffer = bytearray()
            return
        del buffer[:pos]


class DropCounter:
    """Counts PUBLISH frames that could not be sent, and logs them at most once a minute."""

    INTERVAL = 60.0

    def __init__(self) -> None:
        self.count = 0
        self._logged_at = 0.0

    def dropped(self, peer: int, reason: str) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self._logged_at >= self.INTERVAL:
            self._logged_at = now
            log.warning(
                "message for worker %d dropped: %s (%d dropped in all)", peer, reason, self.count
            )
