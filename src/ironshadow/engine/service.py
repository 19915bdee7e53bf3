"""The shadow service: handles the AWS IoT Device Shadow topics over the embedded broker.

Requests arrive through an internal consumer subscribed to the request topics only. They are
collected during one event-loop iteration and applied together in arrival order at the end
of it, which later lets the stores commit one batch per iteration. A request is in flight
from its arrival until it is applied; more than ``MAX_INFLIGHT_REQUESTS`` in flight from one
client are rejected with 429, as AWS IoT does. After ``MAX_REQUESTS_PER_ITERATION`` requests
in one iteration, accepted or rejected, the broker stops reading until they are applied.

No wasted work: each reply and notification is built only when some subscription (a connected
client, an offline persistent session or an internal consumer) matches its topic.

Delta replay: when a client subscribes with a filter equal to a shadow's ``update/delta``
topic and that shadow has a non-empty delta, the service sends the current delta to that
client alone, unless one is already queued for it. Replays go out at most
``REPLAYS_PER_ITERATION`` per loop iteration, so a reconnect storm's replays never starve the
accept and CONNECT processing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import NamedTuple

import orjson

from ..broker.core import Broker
from ..broker.hooks import CLIENT_INITIATED_DISCONNECT, BrokerHooks
from ..broker.message import Message
from ..broker.session import Delivery, Session
from ..broker.subscriptions import SubscriptionRecord
from ..shadow import (
    Shadow,
    ShadowError,
    ShadowLimits,
    UpdateResult,
    apply_update,
    delete_shadow,
    get_shadow,
    rejection_client_token,
    shadow_key,
    validate_shadow_name,
    validate_thing_name,
)
from ..shadow.jsonbytes import dumps_exact
from ..storage.base import HistoryRow, ShadowWrite
from ..storage.pipeline import WriteBehind
from .topics import REQUEST_FILTERS, parse_shadow_topic, shadow_topic_prefix

log = logging.getLogger("ironshadow.shadow")

# Requests from one client that may wait to be applied. AWS IoT rejects the next one with
# 429 (more than 10 in flight on one connection).
MAX_INFLIGHT_REQUESTS = 10
# Requests in one event-loop iteration, accepted or rejected, after which the broker stops
# reading until they are applied. One iteration reads from every connection with data, and
# after a stall thousands of connections can bring millions of messages: handled in one go,
# they kept the loop, the store's backpressure and every client waiting for minutes.
MAX_REQUESTS_PER_ITERATION = 4_000
# Delta replays sent per event-loop iteration during a reconnect storm.
REPLAYS_PER_ITERATION = 200
# QoS of every message the service publishes, so that replies and deltas reach QoS 1
# subscribers reliably and wait in offline persistent sessions.
SERVICE_QOS = 1
PRESENCE_PREFIX = "$aws/events/presence/"
# Seconds a deleted shadow keeps its version, as on AWS: an update within this time continues
# from the deleted version, a later one starts again at 1.
TOMBSTONE_SECONDS = 48 * 3600


class Request(NamedTuple):
    thing: str
    shadow_name: str | None
    operation: str
    payload: bytes
    client_id: str
    # The routed message. With stores it is held, so that the publisher's acknowledgement
    # waits until the change is durable.
    message: Message


class ShadowChange(NamedTuple):
    """One stored change of a shadow, as ``ShadowService.change_listener`` receives it."""

    thing: str
    shadow_name: str | None
    # The new shadow, or a tombstone (``deleted`` set) after a delete.
    shadow: Shadow
    # Epoch seconds of the change, the ``timestamp`` of its shadow document.
    timestamp: int


# Receives the shadow changes of one stored batch; see ShadowService.change_listener.
ChangeListener = Callable[[list[ShadowChange]], None]


class Reply(NamedTuple):
    """The result of a shadow request made over HTTP: a status and a JSON body."""

    status: int
    body: bytes
    # Seconds for the Retry-After header of a 503, or None to send none.
    retry_after: int | None = None


class ShadowService(BrokerHooks):
    def __init__(
        self,
        broker: Broker,
        limits: ShadowLimits | None = None,
        pipeline: WriteBehind | None = None,
    ) -> None:
        self.broker = broker
        self.limits = limits or ShadowLimits()
        # Without a pipeline, shadows live in memory only and replies go out at once.
        self.pipeline = pipeline
        # While a batch is applied with a pipeline: the writes it makes and the replies to
        # publish once they are durable.
        self._writes: list[ShadowWrite] = []
        self._rows: list[HistoryRow] = []
        self._deferred: list[tuple[str, bytes]] | None = None
        # Epoch seconds, with fractions, of the batch being applied: the history's time.
        self._batch_time = 0.0
        self.shadows: dict[str, Shadow] = {}
        # Key -> epoch seconds of the delete, for each shadow that is a tombstone.
        self.tombstones: dict[str, int] = {}
        # Thing -> names of its named shadows, for listing them without a full scan.
        self.named_shadows: dict[str, set[str]] = {}
        # Thing (client id) -> epoch seconds of its last connect or disconnect.
        self.last_seen: dict[str, int] = {}
        self._pending: list[Request] = []
        # Requests that arrived since the last _apply_pending(), and whether the broker's
        # reading is paused because they reached MAX_REQUESTS_PER_ITERATION.
        self._arrived = 0
        self._reading_held = False
        self._inflight: dict[str, int] = {}
        self._replays: deque[tuple[Session, SubscriptionRecord, str, str]] = deque()
        self._replay_scheduled = False
        self._presence_sequence = 0
        # Delta messages published, after updates and as replays to new subscribers.
        self.deltas_sent = 0
        # Called with each batch's stored changes, in the order they were applied, once they
        # are durable (at once when shadows live in memory only). While it is None no change
        # is collected: the WebSocket feed sets it only while a client subscribes.
        self.change_listener: ChangeListener | None = None
        self._changes: list[ShadowChange] = []
        self.updates_applied = 0
        self.messages_published = 0
        # Set by a cluster worker and called with the thing name of each MQTT request. It
        # returns True when another worker's shadow service handles the request (it was sent
        # there, or it is a copy of one sent there), so that this service ignores it.
        self.route_request: Callable[[str, Message], bool] | None = None
        # Set by a cluster worker and called with each HTTP request's operation, thing, shadow
        # name and body. For a thing that another worker owns it sends the request there and
        # returns a future of the owner's reply. For a thing of this worker it returns None.
        self.forward_http: (
            Callable[[str, str, str | None, bytes], asyncio.Future[Reply] | None] | None
        ) = None
        # Set by a cluster worker and called with the thing, client id and topic of a
        # subscription that may get a delta replay. For a thing that another worker owns it
        # requests the delta from the owner (see deliver_replay) and returns True.
        self.ask_replay: Callable[[str, str, str], bool] | None = None
        broker.add_consumer("shadow", REQUEST_FILTERS, self._on_request)
        broker.add_hooks(self)

    # --- MQTT requests ----------------------------------------------------------------

    def _on_request(self, message: Message) -> None:
        parsed = parse_shadow_topic(message.topic)
        if parsed is None:
            return
        thing, shadow_name, operation = parsed
        route = self.route_request
        if route is not None and route(thing, message):
            return
        client_id = message.origin or ""
        self._arrived += 1
        if self._arrived >= MAX_REQUESTS_PER_ITERATION and not self.broker.reading_paused:
            self._reading_held = True
            self.broker.pause_reading(brief=True)
        inflight = self._inflight.get(client_id, 0)
        if inflight >= MAX_INFLIGHT_REQUESTS:
            error = ShadowError(
                429,
                f"Too many requests: at most {MAX_INFLIGHT_REQUESTS} may be in flight "
                "on one connection",
                rejection_client_token(message.payload),
            )
            self._publish_error(shadow_topic_prefix(thing, shadow_name), operation, error)
            return
        self._inflight[client_id] = inflight + 1
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._apply_pending)
        if self.pipeline is not None:
            # The publisher's acknowledgement waits until the change is durable. Without
            # stores, the next loop iteration applies it before any more input is read.
            message.hold()
        self._pending.append(
            Request(thing, shadow_name, operation, message.payload, client_id, message)
        )

    def _apply_pending(self) -> None:
        pending, self._pending = self._pending, []
        self._arrived = 0
        inflight = self._inflight
        now = int(time.time())
        self._begin_batch()
        try:
            for request in pending:
                count = inflight[request.client_id] - 1
                if count:
                    inflight[request.client_id] = count
                else:
                    del inflight[request.client_id]
                self._handle(request, now)
        finally:
            if self.pipeline is not None:
                messages = [request.message for request in pending]
                self._end_batch(lambda: _release_all(messages))
            else:
                self._end_batch(_nothing)
            if self._reading_held:
                # A store pause begun meanwhile outlasts this one: see Broker.resume_reading.
                self._reading_held = False
                self.broker.resume_reading(brief=True)

    def _begin_batch(self) -> None:
        self._batch_time = time.time()
        if self.pipeline is not None:
            self._deferred = []

    def _end_batch(self, then: Callable[[], None]) -> None:
        """Publish the batch's replies and call ``then`` once its writes are durable."""
        deferred, self._deferred = self._deferred, None
        writes, self._writes = self._writes, []
        rows, self._rows = self._rows, []
        changes, self._changes = self._changes, []

        def finish() -> None:
            for topic, payload in deferred or ():
                self._publish(topic, payload)
            then()
            if changes and self.change_listener is not None:
                self.change_listener(changes)

        if self.pipeline is not None and writes:
            self.pipeline.submit(writes, rows, finish)
        else:
            # NOTE: a batch without writes (gets, rejections) replies at once, so it can
            # overtake an earlier batch still waiting for its write and show its state.
            finish()

    def _handle(self, request: Request, now: int) -> None:
        prefix = shadow_topic_prefix(request.thing, request.shadow_name)
        operation = request.operation
        has_subscribers = self.broker.has_subscribers
        try:
            key = shadow_key(request.thing, request.shadow_name)
            current = self.shadows.get(key)
            if current is None:  # a stored shadow's names were checked when it was created
                self._checked_key(request.thing, request.shadow_name)
            if operation == "update":
                result = apply_update(current, request.payload, now, self.limits)
                self._store(key, request.thing, request.shadow_name, result.shadow, now, result)
                topic = prefix + "/update/accepted"
                if has_subscribers(topic):
                    self._publish(topic, result.accepted_payload())
                self._publish_update_notifications(prefix, result)
            elif operation == "get":
                topic = prefix + "/get/accepted"
                if has_subscribers(topic) or has_subscribers(prefix + "/get/rejected"):
                    document = get_shadow(
                        current,
                        request.payload,
                        now,
                        thing_name=request.thing,
                        shadow_name=request.shadow_name,
                        limits=self.limits,
                    )
                    self._publish(topic, document, only_if_heard=True)
            else:
                tombstone, document = delete_shadow(
                    current,
                    request.payload,
                    now,
                    thing_name=request.thing,
                    shadow_name=request.shadow_name,
                    limits=self.limits,
                )
                self._store(key, request.thing, request.shadow_name, tombstone, now)
                self._publish(prefix + "/delete/accepted", document, only_if_heard=True)
        except ShadowError as error:
            self._publish_error(prefix, operation, error, now)

    def _publish_update_notifications(self, prefix: str, result: UpdateResult) -> None:
        has_subscribers = self.broker.has_subscribers
        topic = prefix + "/update/delta"
        if has_subscribers(topic):
            delta = result.delta_payload()
            if delta is not None:
                self.deltas_sent += 1
                self._publish(topic, delta)
        topic = prefix + "/update/documents"
        if has_subscribers(topic):
            self._publish(topic, result.documents_payload())

    def _checked_key(self, thing: str, shadow_name: str | None) -> str:
        validate_thing_name(thing)
        if shadow_name is not None:
            validate_shadow_name(shadow_name)
        return shadow_key(thing, shadow_name)

    def _store(
        self,
        key: str,
        thing: str,
        shadow_name: str | None,
        shadow: Shadow,
        now: int,
        result: UpdateResult | None = None,
    ) -> None:
        """Keep the new shadow, and queue its write and history row when stores are set."""
        self.shadows[key] = shadow
        if self.change_listener is not None:
            self._changes.append(ShadowChange(thing, shadow_name, shadow, now))
        if shadow.deleted:
            self.tombstones[key] = now
        elif self.tombstones:
            self.tombstones.pop(key, None)
        if self.pipeline is not None:
            self._writes.append(ShadowWrite(key, document_bytes(shadow, now)))
            if result is not None:
                self._rows.append(
                    HistoryRow(
                        self._batch_time,
                        thing,
                        shadow_name or "",
                        shadow.version,
                        result.request_section("reported"),
                        result.request_section("desired"),
                    )
                )
        if result is None:
            return
        self.updates_applied += 1
        if shadow_name is not None:
            names = self.named_shadows.get(thing)
            if names is None:
                names = self.named_shadows[thing] = set()
            names.add(shadow_name)

    def _publish(self, topic: str, payload: bytes, only_if_heard: bool = False) -> None:
        if only_if_heard and not self.broker.has_subscribers(topic):
            return
        if self._deferred is not None:
            self._deferred.append((topic, payload))
            return
        self.messages_published += 1
        self.broker.publish(Message(topic, payload, SERVICE_QOS, False))

    def _publish_error(
        self, prefix: str, operation: str, error: ShadowError, now: int | None = None
    ) -> None:
        request = operation.split("/", 1)[0]
        if request not in ("update", "get", "delete"):
            return
        topic = f"{prefix}/{request}/rejected"
        if self.broker.has_subscribers(topic):
            self._publish(topic, error.payload(int(time.time()) if now is None else now))

    # --- HTTP requests ----------------------------------------------------------------

    async def http_request(
        self, operation: str, thing: str, shadow_name: str | None, payload: bytes
    ) -> Reply:
        """Apply a shadow request made over HTTP and return its status and body once the
        change is durable.

        Errors are returned, not published on ``/rejected``. An accepted update still
        publishes ``update/delta`` and ``update/documents``. A request for a thing that
        another worker owns is sent there through ``forward_http``, which returns its reply.
        """
        forward = self.forward_http
        if forward is not None:
            forwarded = forward(operation, thing, shadow_name, payload)
            if forwarded is not None:
                return await forwarded
        replied: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()

        def set_reply(reply: Reply) -> None:
            # The future is cancelled when the HTTP client goes away before the reply.
            if not replied.done():
                replied.set_result(reply)

        self.apply_http_request(operation, thing, shadow_name, payload, set_reply)
        return await replied

    def apply_http_request(
        self,
        operation: str,
        thing: str,
        shadow_name: str | None,
        payload: bytes,
        then: Callable[[Reply], None],
    ) -> None:
        """Apply a shadow request made over HTTP now, and call ``then`` with its reply once
        the change is durable.

        A cluster worker calls this for requests that another worker received over HTTP.
        """
        now = int(time.time())
        reply: Reply | None = None

        def finish() -> None:
            if reply is not None:
                then(reply)

        self._begin_batch()
        try:
            reply = self._http_apply(operation, thing, shadow_name, payload, now)
        finally:
            self._end_batch(finish)

    def _http_apply(
        self, operation: str, thing: str, shadow_name: str | None, payload: bytes, now: int
    ) -> Reply:
        try:
            key = self._checked_key(thing, shadow_name)
            current = self.shadows.get(key)
            if operation == "update":
                result = apply_update(current, payload, now, self.limits)
                self._store(key, thing, shadow_name, result.shadow, now, result)
                self._publish_update_notifications(shadow_topic_prefix(thing, shadow_name), result)
                return Reply(200, result.accepted_payload())
            limits = self.limits
            if operation == "get":
                document = get_shadow(
                    current, payload, now, thing_name=thing, shadow_name=shadow_name, limits=limits
                )
                return Reply(200, document)
            tombstone, document = delete_shadow(
                current, payload, now, thing_name=thing, shadow_name=shadow_name, limits=limits
            )
            self._store(key, thing, shadow_name, tombstone, now)
            return Reply(200, document)
        except ShadowError as error:
            return Reply(error.code, error.payload(now))

    # --- persistence ------------------------------------------------------------------

    async def load(self) -> int:
        """Load every shadow from the hot store; return how many were loaded."""
        assert self.pipeline is not None
        count = 0
        async for batch in self.pipeline.hot.load_shadows():
            for key, document in batch:
                shadow = restore_shadow(document)
                self.shadows[key] = shadow
                if shadow.deleted:
                    self.tombstones[key] = orjson.loads(document).get("timestamp", int(time.time()))
                thing, _, shadow_name = key.partition("~")
                if shadow_name:
                    self.named_shadows.setdefault(thing, set()).add(shadow_name)
            count += len(batch)
        return count

    def expire_tombstones(self, now: float) -> int:
        """Forget the shadows deleted TOMBSTONE_SECONDS or more ago; return how many.

        A later update of such a shadow starts again at version 1, as on AWS.
        """
        expired = [
            key for key, deleted in self.tombstones.items() if now - deleted >= TOMBSTONE_SECONDS
        ]
        for key in expired:
            del self.tombstones[key]
            del self.shadows[key]
            thing, _, shadow_name = key.partition("~")
            if shadow_name:
                names = self.named_shadows.get(thing)
                if names is not None:
                    names.discard(shadow_name)
                    if not names:
                        del self.named_shadows[thing]
        if expired and self.pipeline is not None:
            self.pipeline.submit([ShadowWrite(key, None) for key in expired], [], _nothing)
        return len(expired)

    def named_shadow_names(self, thing: str) -> list[str]:
        """Return the names of the thing's named shadows that exist (not deleted), sorted."""
        names = self.named_shadows.get(thing, ())
        return sorted(name for name in names if not self.shadows[shadow_key(thing, name)].deleted)

    # --- broker events: presence and delta replay ---------------------------------------

    def client_connected(self, connection) -> None:  # type: ignore[no-untyped-def]
        now = time.time()
        self.last_seen[connection.client_id] = int(now)
        self._publish_presence(connection, "connected", now)

    def client_disconnected(self, connection, reason: str) -> None:  # type: ignore[no-untyped-def]
        now = time.time()
        client_id = connection.client_id
        # Requests still in flight count as the shadow they may create: mosquitto_pub sends
        # its one update in the same read as its DISCONNECT, before the update is applied.
        if (
            connection.session.expiry_interval
            or self._has_shadow(client_id)
            or client_id in self._inflight
        ):
            self.last_seen[client_id] = int(now)
        else:
            # A client that leaves neither a session nor a shadow behind (a command-line
            # tool, a client with a broker-assigned id) is forgotten, so the thing list
            # and this map hold only things the engine keeps state for.
            self.last_seen.pop(client_id, None)
        self._publish_presence(connection, "disconnected", now, reason)

    def _has_shadow(self, thing: str) -> bool:
        classic = self.shadows.get(thing)
        return (classic is not None and not classic.deleted) or bool(self.named_shadows.get(thing))

    def _publish_presence(
        self, connection, event: str, now: float, reason: str | None = None  # type: ignore[no-untyped-def]
    ) -> None:
        client_id = connection.client_id
        topic = f"{PRESENCE_PREFIX}{event}/{client_id}"
        if not self.broker.has_subscribers(topic):
            return
        self._presence_sequence += 1
        self.messages_published += 1
        document: dict[str, object] = {
            "clientId": client_id,
            "timestamp": int(now * 1000),
            "eventType": event,
            "sessionIdentifier": f"{id(connection):x}",
            "principalIdentifier": connection.username or "anonymous",
            "ipAddress": connection.peer.rsplit(":", 1)[0],
            "versionNumber": self._presence_sequence,
        }
        if reason is not None:
            document["clientInitiatedDisconnect"] = reason == CLIENT_INITIATED_DISCONNECT
            document["disconnectReason"] = reason
        # dumps_exact: the event may wait in offline sessions' queues.
        self.broker.publish(Message(topic, dumps_exact(document), SERVICE_QOS, False))

    def subscribed(self, session: Session, record: SubscriptionRecord) -> None:
        if record.share_group is not None or session.consumer is not None:
            return
        parsed = parse_shadow_topic(record.topic_filter)
        if parsed is None or parsed[2] != "update/delta":
            return
        thing, shadow_name, _ = parsed
        if "+" in thing or (shadow_name is not None and "+" in shadow_name):
            return
        ask = self.ask_replay
        if ask is not None and ask(thing, session.client_id, record.topic_filter):
            return
        key = shadow_key(thing, shadow_name)
        shadow = self.shadows.get(key)
        if shadow is None or shadow.deleted or not shadow.has_delta:
            return
        topic = record.topic_filter
        if _delta_pending(session, topic):
            return
        self._replays.append((session, record, key, topic))
        if not self._replay_scheduled:
            self._replay_scheduled = True
            asyncio.get_running_loop().call_soon(self._send_replays)

    def _send_replays(self) -> None:
        replays = self._replays
        now = int(time.time())
        for _ in range(min(REPLAYS_PER_ITERATION, len(replays))):
            session, record, key, topic = replays.popleft()
            if session.connection is None or session.subscriptions.get(topic) is not record:
                continue
            shadow = self.shadows.get(key)
            if shadow is None or shadow.deleted or _delta_pending(session, topic):
                continue
            payload = shadow.delta_payload(now)
            if payload is not None:
                self._deliver_delta(session, record, topic, payload)
        if replays:
            asyncio.get_running_loop().call_soon(self._send_replays)
        else:
            self._replay_scheduled = False

    def _deliver_delta(
        self, session: Session, record: SubscriptionRecord, topic: str, payload: bytes
    ) -> None:
        message = Message(topic, payload, SERVICE_QOS, False)
        qos = min(SERVICE_QOS, record.qos)
        ids = [record.subscription_id] if record.subscription_id else None
        self.deltas_sent += 1
        self.broker.deliver(session, Delivery(message, qos, False, ids))

    def delta_for(self, topic: str) -> bytes | None:
        """Return the current delta message of the shadow whose ``update/delta`` topic is
        ``topic``, or None when it has no delta; for a peer's delta replay."""
        parsed = parse_shadow_topic(topic)
        if parsed is None:
            return None
        shadow = self.shadows.get(shadow_key(parsed[0], parsed[1]))
        if shadow is None or shadow.deleted:
            return None
        return shadow.delta_payload(int(time.time()))

    def deliver_replay(self, client_id: str, topic: str, payload: bytes) -> None:
        """Send a delta that the owner of its thing returned for a replay to ``client_id``,
        if the client is still connected and subscribed and no delta waits for it yet."""
        session = self.broker.sessions.get(client_id)
        if session is None or session.connection is None:
            return
        record = session.subscriptions.get(topic)
        if record is not None and not _delta_pending(session, topic):
            self._deliver_delta(session, record, topic, payload)


def document_bytes(shadow: Shadow, now: int) -> bytes:
    """Serialise a shadow for the hot store: its full document, or a tombstone's version.

    Other services read these documents (the Redis key schema is public), so they have the
    shape of a get/accepted reply.
    """
    # dumps_exact: a write waits in the pipeline, thousands of them when the store is slow,
    # and orjson's own result would keep about 4 KB each (see dumps_exact).
    if shadow.deleted:
        return dumps_exact({"deleted": True, "version": shadow.version, "timestamp": now})
    return dumps_exact(shadow.document(now))


def restore_shadow(document: bytes) -> Shadow:
    """Rebuild a shadow from what :func:`document_bytes` stored."""
    parsed = orjson.loads(document)
    if parsed.get("deleted"):
        return Shadow.from_state(None, parsed["version"], deleted=True)
    return Shadow.from_document(parsed)


def _nothing() -> None:
    pass


def _release_all(messages: list[Message]) -> None:
    for message in messages:
        message.release()


def _delta_pending(session: Session, topic: str) -> bool:
    """Return whether a message on ``topic`` waits in the session's queue or in flight."""
    for delivery in session.queue:
        if delivery.message.topic == topic:
            return True
    return any(delivery.message.topic == topic for delivery in session.inflight.values())
