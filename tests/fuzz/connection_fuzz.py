"""Fuzzing the broker's connection state machine: the harness that runs fuzz scripts.

:func:`run_script` runs a script (see ``fuzz_scripts``) against a fresh :class:`Broker` on a
fresh event loop. The connections are real :class:`MQTTConnection` objects, but their
transport is the in-memory :class:`MemoryTransport`: a socket pair per input would cap a run
at a few thousand inputs, and a fuzz run needs a million. Time passes by running the broker's
timer callbacks early rather than by waiting (see :meth:`FuzzRun.elapse`).

Oracles, checked after every step:

* no exception leaves a protocol callback, and the event loop's exception handler is never
  called (the broker must turn every bad input into a closed connection);
* a chunk on which a reference :class:`PacketDecoder` fails leaves the connection closed;
* the broker is consistent: a closed connection is not in ``broker.connections``, a session's
  in-flight, queued and inbound QoS 2 counts stay within their limits, so do the
  acknowledgements waiting behind held messages, and the subscription index contains exactly
  the subscriptions of live sessions;
* each connection gets at most one connected and one disconnected hook call, in that order;
* everything the broker writes to a client decodes in that client's protocol version, starts
  with CONNACK, respects the client's Maximum Packet Size and Topic Alias Maximum, and ends
  after a DISCONNECT;
* saved MQTT state decodes again;
* no log record is at ERROR level or above, and every log record formats.

After the last step the harness releases every hold, resumes reading and lets all timers run.
A new, well-behaved client must then connect, subscribe, publish to itself and receive the
message. After ``Broker.shutdown()`` no transport may be left open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

try:
    import uvloop
except ImportError:  # uvloop does not build on Windows; the standard loop works too.
    uvloop = None

from fuzz_scripts import (
    CONFIGS,
    CONSUMER_FILTERS,
    SLOTS,
    BrokerReading,
    Elapse,
    Open,
    PeerClose,
    PeerReading,
    Release,
    RulesChange,
    Save,
    Script,
    Send,
    Step,
)

from ironshadow.broker.access import (
    ANONYMOUS,
    METHOD_PASSWORD,
    ROLE_DEVICE,
    AccessPolicy,
    AuthenticationResult,
    Principal,
    bad_credentials,
)
from ironshadow.broker.config import BrokerConfig
from ironshadow.broker.connection import (
    CLOSED,
    CONNECTED,
    LINGER_SECONDS,
    MQTTConnection,
)
from ironshadow.broker.core import Broker
from ironshadow.broker.hooks import BrokerHooks
from ironshadow.broker.message import Message
from ironshadow.broker.persistence import (
    StatePersistence,
    decode_retained,
    decode_session,
    wall_clock_offset,
)
from ironshadow.broker.session import Session
from ironshadow.broker.subscriptions import SubscriptionRecord
from ironshadow.mqtt import (
    MQTT_3_1_1,
    MQTT_5,
    Connack,
    Connect,
    Disconnect,
    MQTTProtocolError,
    Packet,
    PacketDecoder,
    PropertyId,
    Puback,
    Publish,
    Suback,
    Subscribe,
    Subscription,
)
from ironshadow.mqtt.encoding import decode_vbi
from ironshadow.mqtt.packets import decode_packet

P = PropertyId

# --- the in-memory transport ----------------------------------------------------------------


class MemoryTransport:
    """A stand-in for a TCP transport that records what the broker writes.

    It keeps the parts of asyncio's transport contract that the broker relies on:

    * data from the client waits while reading is paused, and arrives on a later loop
      iteration after resume_reading();
    * write() calls pause_writing() once more than the high-water mark is buffered, and the
      client's reading calls resume_writing() once it is down to the low-water mark;
    * close() and abort() call connection_lost() on the next loop iteration;
    * write() after write_eof() raises RuntimeError, as asyncio's transports do.
    """

    def __init__(self, run: FuzzRun, peer: tuple[str, int], write_eof: bool) -> None:
        self.run = run
        self.peer = peer
        self.protocol: MQTTConnection | None = None
        self.written = bytearray()  # bytes that reached the client
        self.unsent: list[bytes] = []  # bytes buffered while the client does not read
        self.unsent_size = 0
        self.client_reading = True
        self.reading = True
        self.inbox: deque[bytes] = deque()  # client bytes held while reading is paused
        self.closing = False
        self.eof = False
        self.lost = False
        self.late_writes = 0
        self.high = 65536
        self.low = 16384
        self.writing_paused = False
        self._can_write_eof = write_eof
        # Decodes what the client sent, like the connection's own decoder, to check that a
        # malformed stream always ends the connection.
        self.reference: PacketDecoder | None = PacketDecoder(run.broker.config.max_packet_size)
        # Maximum number of packets in the chunk of one data_received() call.
        self.max_chunk_packets = 0
        # The first CONNECT that the client sent, as decoded by the reference decoder.
        self.connect: Connect | None = None

    # asyncio.Transport methods that the broker calls

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return self.peer
        return default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.high = 65536 if high is None else high
        self.low = self.high // 4 if low is None else low

    def write(self, data: bytes) -> None:
        if self.eof:
            raise RuntimeError("Cannot call write() after write_eof()")
        if self.closing:
            self.late_writes += 1
            return
        if self.client_reading:
            self.written += data
            return
        self.unsent.append(bytes(data))
        self.unsent_size += len(data)
        if self.unsent_size > self.high and not self.writing_paused:
            self.writing_paused = True
            assert self.protocol is not None
            self.protocol.pause_writing()

    def writelines(self, items: list[bytes]) -> None:
        self.write(b"".join(items))

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        if self.reading:
            return
        self.reading = True
        if self.inbox:
            self.run.loop.call_soon(self._deliver_inbox)

    def can_write_eof(self) -> bool:
        return self._can_write_eof

    def write_eof(self) -> None:
        if not self.closing:
            self.eof = True

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        self.run.loop.call_soon(self._connection_lost, None)

    def abort(self) -> None:
        self.unsent.clear()
        self.close()

    # the client's side

    def client_send(self, chunk: bytes) -> None:
        """Deliver ``chunk`` as the event loop would, or hold it while reading is paused."""
        if self.lost or self.closing:
            return  # a closed transport reads no more
        if not self.reading or self.inbox:
            self.inbox.append(chunk)
            return
        self._deliver(chunk)

    def client_close(self, reset: bool) -> None:
        if self.lost:
            return
        self.closing = True
        self.inbox.clear()
        self._connection_lost(ConnectionResetError("reset by the fuzzer") if reset else None)

    def client_set_reading(self, reading: bool) -> None:
        self.client_reading = reading
        if not reading or self.lost:
            return
        for data in self.unsent:
            self.written += data
        self.unsent.clear()
        self.unsent_size = 0
        if self.writing_paused:
            self.writing_paused = False
            assert self.protocol is not None
            self.protocol.resume_writing()

    def _deliver_inbox(self) -> None:
        while self.inbox and self.reading and not (self.lost or self.closing):
            self._deliver(self.inbox.popleft())

    def _deliver(self, chunk: bytes) -> None:
        connection = self.protocol
        assert connection is not None
        error = None
        if self.reference is not None:
            try:
                packets = self.reference.feed(chunk)
                self.max_chunk_packets = max(self.max_chunk_packets, len(packets))
                if self.connect is None and packets and isinstance(packets[0], Connect):
                    self.connect = packets[0]
            except MQTTProtocolError as exc:
                error = exc
                self.reference = None
        was_open = connection.state != CLOSED
        connection.data_received(chunk)
        if error is not None and was_open:
            assert connection.state == CLOSED, (
                f"the connection stayed open after a malformed chunk {chunk!r}: {error}"
            )

    def _connection_lost(self, exc: Exception | None) -> None:
        if self.lost:
            return
        self.lost = True
        self.closing = True
        assert self.protocol is not None
        self.protocol.connection_lost(exc)


# --- checks of what the broker wrote ----------------------------------------------------------


class OutputCheck:
    """Decode what the broker wrote to one client and check it against the protocol."""

    def __init__(self) -> None:
        self.offset = 0
        self.version: int | None = None
        self.packets: list[Packet] = []
        self.aliases: set[int] = set()
        self.disconnected = False

    def check(self, transport: MemoryTransport) -> None:
        data = transport.written
        if self.version is None:
            if len(data) < 2:
                return
            # [MQTT-3.2.0-1] The first packet from the server is CONNACK. A 3.1.1 CONNACK
            # has exactly 2 bytes after its fixed header, and a v5 one has more.
            assert data[0] == 0x20, f"the first packet sent is not CONNACK: {bytes(data[:16])!r}"
            self.version = MQTT_3_1_1 if data[1] == 2 else MQTT_5
        while self.offset + 2 <= len(data):
            start = self.offset
            try:
                length, body_start = decode_vbi(data, start + 1, len(data))
                stop = body_start + length
                assert stop <= len(data), "the broker wrote a partial packet"
                packet = decode_packet(data[start], bytes(data[body_start:stop]), self.version)
            except MQTTProtocolError as exc:
                raise AssertionError(
                    f"the broker sent a malformed packet {bytes(data[start:start + 64])!r}: {exc}"
                ) from exc
            self._check_packet(packet, stop - start, transport)
            self.offset = stop

    def _check_packet(self, packet: Packet, size: int, transport: MemoryTransport) -> None:
        assert not self.disconnected, f"{packet!r} sent after DISCONNECT"
        if self.packets:
            assert not isinstance(packet, Connack), "a second CONNACK"
        else:
            assert isinstance(packet, Connack), f"the first packet sent is {packet!r}"
        self.packets.append(packet)
        if isinstance(packet, Disconnect):
            assert self.version == MQTT_5, "an MQTT 3.1.1 server never sends DISCONNECT"
            self.disconnected = True
        if self.version != MQTT_5:
            return
        connect = transport.connect
        limit = connect.properties.get(P.MAXIMUM_PACKET_SIZE, 0) if connect is not None else 0
        properties = getattr(packet, "properties", None) or {}
        optional = P.REASON_STRING in properties or P.USER_PROPERTY in properties
        if limit and (isinstance(packet, Publish) or optional):
            # A PUBLISH over the client's Maximum Packet Size is dropped [MQTT-3.1.2-25], and
            # a Reason String or User Property is left out rather than make a packet too
            # large (for example [MQTT-3.2.2-19], [MQTT-3.4.2-2]). Other packets are not
            # checked, because no encoding makes a CONNACK or a DISCONNECT with a reason
            # code fit a limit of a few bytes.
            assert size <= limit, f"{packet!r} is {size} bytes, over the client's maximum {limit}"
        if isinstance(packet, Publish):
            alias = packet.properties.get(P.TOPIC_ALIAS)
            if alias is not None:
                assert connect is not None
                maximum = connect.properties.get(P.TOPIC_ALIAS_MAXIMUM, 0)
                assert alias <= maximum, f"topic alias {alias} over the client's {maximum}"
                if packet.topic:
                    self.aliases.add(alias)
                else:
                    assert alias in self.aliases, f"topic alias {alias} used before it was set"


# --- the harness ----------------------------------------------------------------------------


class FuzzAccessPolicy(AccessPolicy):
    """Authenticates by user name, at once or later, and restricts devices to ``t/`` topics.

    No user name is anonymous and unrestricted, "device" is a restricted device, and "deny" is
    rejected. The "slow-" names get the same result through a future that the harness sets
    when time passes, as a policy that checks a password hash in a thread would.
    """

    def __init__(self) -> None:
        self.pending: list[tuple[asyncio.Future[AuthenticationResult], AuthenticationResult]] = []
        self.revoked = False
        self.generation = 0

    def authenticate(
        self, connection: MQTTConnection, connect: Connect
    ) -> AuthenticationResult | asyncio.Future[AuthenticationResult]:
        name = connect.username or ""
        base = name.removeprefix("slow-")
        result: AuthenticationResult = ANONYMOUS
        if base == "deny":
            result = bad_credentials(f"user {name!r} is not allowed in")
        elif base == "device":
            result = Principal(name, ROLE_DEVICE, METHOD_PASSWORD)
        if name == base:
            return result
        future: asyncio.Future[AuthenticationResult] = asyncio.get_running_loop().create_future()
        self.pending.append((future, result))
        return future

    def finish_pending(self) -> None:
        pending, self.pending = self.pending, []
        for future, result in pending:
            future.set_result(result)

    def recheck(self, principal: Principal) -> str | None:
        if self.revoked and principal.role == ROLE_DEVICE:
            return "devices may no longer connect"
        return None

    def restricts(self, principal: Principal) -> bool:
        return principal.role == ROLE_DEVICE

    def may_publish(self, principal: Principal, client_id: str, topic: str) -> bool:
        return not self.revoked and topic.startswith("t/")

    def may_subscribe(self, principal: Principal, client_id: str, topic_filter: str) -> bool:
        return not self.revoked and topic_filter.startswith("t/")


@dataclass
class Client:
    connection: MQTTConnection
    transport: MemoryTransport
    output: OutputCheck = field(default_factory=OutputCheck)
    # Hook events in order: "connected", "disconnected".
    events: list[str] = field(default_factory=list)


class _Hooks(BrokerHooks):
    def __init__(self, run: FuzzRun) -> None:
        self.run = run

    def client_connected(self, connection: MQTTConnection) -> None:
        self.run.event(connection, "connected")
        quota = self.run.quotas
        client_id = connection.client_id
        quota[client_id] = max(quota.get(client_id, 0), connection.send_quota)

    def client_disconnected(self, connection: MQTTConnection, reason: str) -> None:
        self.run.event(connection, "disconnected")


class FuzzRun:
    """One script against one broker; see the module docstring for what it checks."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.loop = loop = asyncio.get_running_loop()
        self.loop_errors: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _loop, context: self.loop_errors.append(context))
        config = BrokerConfig(port=0, sys_interval=0, **CONFIGS[script.config])
        self.access = FuzzAccessPolicy() if script.access else None
        self.broker = broker = Broker(config, self.access)
        self.hooks = _Hooks(self)
        broker.add_hooks(self.hooks)
        self.persistence: StatePersistence | None = None
        if script.persist:
            self.persistence = StatePersistence(broker)
            self.persistence.restore({}, {})
        self.held: list[Message] = []
        if script.consumer != "none":
            broker.add_consumer("fuzz", CONSUMER_FILTERS, self._consume)
        self.slots: list[Client | None] = [None] * SLOTS
        # The last CONNECT that each slot sent, sent again when a slot reconnects.
        self.connects: list[bytes] = [b""] * SLOTS
        self.clients: list[Client] = []
        self.by_connection: dict[int, Client] = {}
        # Maximum send quota (the client's Receive Maximum) seen per client id. A session's
        # in-flight window never exceeds it.
        self.quotas: dict[str, int] = {}
        self.next_port = 40000

    def _consume(self, message: Message) -> None:
        if self.script.consumer == "holding":
            message.hold()
            self.held.append(message)

    def event(self, connection: MQTTConnection, name: str) -> None:
        client = self.by_connection.get(id(connection))
        assert client is not None, f"hook {name} for an unknown connection"
        client.events.append(name)

    # steps

    def open(self, write_eof: bool, host: str = "127.0.0.1") -> Client:
        self.next_port += 1
        transport = MemoryTransport(self, (host, self.next_port), write_eof)
        connection = MQTTConnection(self.broker)
        transport.protocol = connection
        client = Client(connection, transport)
        self.clients.append(client)
        self.by_connection[id(connection)] = client
        connection.connection_made(transport)
        return client

    def apply(self, step: Step) -> None:
        if isinstance(step, Open):
            client = self.slots[step.slot] = self.open(step.write_eof)
            self.connects[step.slot] = step.connect
            if step.connect:
                client.transport.client_send(step.connect)
            return
        if isinstance(step, Send | PeerClose | PeerReading):
            client = self.slots[step.slot]
            if client is None:
                return
            if isinstance(step, Send) and client.transport.closing:
                client = self.slots[step.slot] = self.open(client.transport._can_write_eof)
                if self.connects[step.slot]:
                    client.transport.client_send(self.connects[step.slot])
            if isinstance(step, Send):
                for chunk in step.chunks:
                    client.transport.client_send(chunk)
            elif isinstance(step, PeerClose):
                client.transport.client_close(step.reset)
            else:
                client.transport.client_set_reading(step.reading)
            return
        if isinstance(step, BrokerReading):
            if step.paused:
                self.broker.pause_reading()
            else:
                self.broker.resume_reading()
            return
        if isinstance(step, Release):
            self.release(step.count, step.newest_first)
            return
        if isinstance(step, Save):
            self.save()
            return
        if isinstance(step, RulesChange):
            if self.access is not None:
                self.access.revoked = step.revoke
                self.access.generation += 1
                self.broker.access_changed()
            return
        assert isinstance(step, Elapse)
        self.elapse(step.seconds)

    def release(self, count: int, newest_first: bool) -> None:
        for _ in range(min(count, len(self.held))):
            message = self.held.pop() if newest_first else self.held.pop(0)
            message.release()

    def save(self) -> None:
        """Collect the changed state as the engine's saver does, and decode it again."""
        if self.persistence is None:
            return
        batch = self.persistence.collect(1 << 20)
        offset = wall_clock_offset()
        for topic, data in batch.retained.items():
            if data is not None:
                message = decode_retained(topic, data, offset)
                assert message.payload == self.broker.retained.get(topic).payload  # type: ignore[union-attr]
        for client_id, data in batch.sessions.items():
            if data is not None:
                session = decode_session(client_id, data, offset)
                live = self.broker.sessions[client_id]
                assert set(session.subscriptions) == set(live.subscriptions)
                assert set(session.inflight) == set(live.inflight)
                assert len(session.queue) == len(live.queue)
        self.persistence.saved(batch)

    def elapse(self, seconds: float) -> None:
        """Run, now, the timer callbacks that ``seconds`` of waiting would run.

        The broker's timers are event-loop handles, so the harness cancels each handle that
        would fire within ``seconds`` and calls the broker method it was scheduled with.
        Message expiry is the one timing that this leaves out: it follows the real clock.
        """
        broker = self.broker
        if self.access is not None:
            self.access.finish_pending()
        # Admission: the token bucket refills with the elapsed time.
        if broker._admission_handle is not None:
            broker._admission_handle.cancel()
            broker._admission_refilled -= seconds
            broker._admit_queued()
        # Connections half-closed by the broker are closed after LINGER_SECONDS.
        if seconds >= LINGER_SECONDS:
            for transport in list(broker._lingering):
                broker._lingering.discard(transport)
                transport.close()
        # Keep alive and CONNECT timeouts: the sweep compares these times with the clock.
        for connection in broker.connections:
            connection.last_received -= seconds
            connection.opened_at -= seconds
        if broker._sweep_handle is not None:
            broker._sweep_handle.cancel()
        broker._sweep()
        # Delayed wills, then session expiry, as a will never comes later than its session's end.
        deadline = time.time() + seconds
        for session in list(broker.sessions.values()):
            if session.will_handle is not None and (session.will_at or 0) <= deadline:
                session.will_handle.cancel()
                broker._fire_delayed_will(session)
            if session.expiry_handle is not None and (session.ends_at or 0) <= deadline:
                session.expiry_handle.cancel()
                broker._expire_session(session)

    # checks

    def check(self) -> None:
        assert not self.loop_errors, f"the event loop's exception handler ran: {self.loop_errors}"
        broker = self.broker
        config = broker.config
        for client in self.clients:
            connection = client.connection
            transport = client.transport
            assert transport.late_writes == 0, "the broker wrote to a closed transport"
            if connection.state == CLOSED:
                assert connection not in broker.connections, "a closed connection is listed"
            if transport.lost:
                assert connection.state == CLOSED, "connection_lost() left the connection open"
            client.output.check(transport)
            if connection.state != CLOSED:
                # Reading pauses once this many acknowledgements wait behind held messages,
                # but the rest of the chunk being handled may still add to them.
                limit = config.receive_maximum + transport.max_chunk_packets
                assert len(connection.pending_acks) <= limit, (
                    f"{len(connection.pending_acks)} acknowledgements wait behind held "
                    f"messages, over {limit}"
                )
            events = client.events
            assert events in ([], ["connected"], ["connected", "disconnected"]), events
        for connection in broker.connections:
            assert connection.state != CLOSED
            assert connection.transport is not None
            if connection.state == CONNECTED:
                session = connection.session
                assert session is not None
                assert session.connection is connection
                assert broker.sessions.get(session.client_id) is session
        subscription_count = 0
        for client_id, session in broker.sessions.items():
            assert session.client_id == client_id
            subscription_count += len(session.subscriptions)
            if session.connection is not None:
                assert session.connection in broker.connections
                assert session.connection.state == CONNECTED
            if session.consumer is not None:
                continue
            self._check_session_limits(session, config)
        records = list(_index_records(broker))
        assert len(records) == subscription_count == broker.index.count, (
            f"{len(records)} records in the subscription index, {subscription_count} "
            f"subscriptions in sessions, index count {broker.index.count}"
        )
        for record in records:
            session = record.session
            assert broker.sessions.get(session.client_id) is session, (
                f"the subscription index holds {record.topic_filter!r} of an ended session "
                f"{session.client_id!r}"
            )
            assert session.subscriptions.get(record.topic_filter) is record

    def _check_session_limits(self, session: Session, config: BrokerConfig) -> None:
        client_id = session.client_id
        window = self.quotas.get(client_id, 0)
        assert len(session.inflight) <= window, (
            f"session {client_id!r} has {len(session.inflight)} messages in flight, "
            f"over the largest Receive Maximum {window}"
        )
        assert len(session.queue) <= config.max_queued_messages, (
            f"session {client_id!r} queues {len(session.queue)} messages, over "
            f"max_queued_messages {config.max_queued_messages}"
        )
        assert len(session.inbound_qos2) <= config.receive_maximum, (
            f"session {client_id!r} has {len(session.inbound_qos2)} QoS 2 messages awaiting "
            f"PUBREL, over receive_maximum {config.receive_maximum}"
        )

    async def settle(self) -> None:
        """Let the loop run the callbacks that the last step scheduled, and theirs."""
        for _ in range(4):
            await asyncio.sleep(0)

    async def run(self) -> None:
        for step in self.script.steps:
            self.apply(step)
            await self.settle()
            self.check()
        await self.finish()

    async def finish(self) -> None:
        """Undo every stall, let all timers run, and check that a new client is served."""
        broker = self.broker
        if broker.config.max_connections:
            # The clients leave, so that the new one is not over the connection limit.
            for client in self.clients:
                client.transport.client_close(reset=False)
        broker.resume_reading()
        self.release(len(self.held), newest_first=False)
        for client in self.clients:
            client.transport.client_set_reading(True)
        await self.settle()
        self.elapse(1e6)
        await self.settle()
        self.check()
        await self.check_fresh_client()
        await broker.shutdown()
        await self.settle()
        self.check()
        for client in self.clients:
            assert client.transport.closing, "a transport was left open after shutdown"
        assert not broker.connections

    async def check_fresh_client(self) -> None:
        """A well-behaved client connects, subscribes, publishes to itself and gets it back."""
        version = self.script.fresh_version
        # From another address, as another device would be: the fuzzed clients may have used
        # up the limits of theirs.
        client = self.open(write_eof=True, host="127.0.0.2")
        topic = "fresh/check"
        packets = [
            Connect("fuzz-fresh", protocol_level=version, keep_alive=60),
            Subscribe(1, [Subscription(topic, 1)]),
            Publish(topic, b"ping", qos=1, packet_id=1),
        ]
        for packet in packets:
            client.transport.client_send(packet.encode(version))
            await self.settle()
            # CONNECT may wait in the admission queue until time passes.
            self.elapse(0.1)
            await self.settle()
        self.check()
        received = client.output.packets
        assert received, "a new client got no CONNACK"
        assert isinstance(received[0], Connack) and received[0].reason_code == 0, received[0]
        assert any(isinstance(p, Suback) and p.reason_codes == [1] for p in received), received
        assert any(isinstance(p, Puback) and p.packet_id == 1 for p in received), received
        assert any(
            isinstance(p, Publish) and p.topic == topic and p.payload == b"ping" for p in received
        ), received


def _index_records(broker: Broker) -> Iterator[SubscriptionRecord]:
    """Yield every record in the broker's subscription index, shared groups included."""
    index = broker.index
    stack = [*index._exact.values(), index._root]
    while stack:
        node = stack.pop()
        if node.records:
            yield from node.records.values()
        if node.groups:
            for group in node.groups.values():
                yield from group.members.values()
        if node.children:
            stack.extend(node.children.values())


def new_loop() -> asyncio.AbstractEventLoop:
    return uvloop.new_event_loop() if uvloop is not None else asyncio.new_event_loop()


def run_script(script: Script) -> None:
    """Run ``script`` on a fresh broker and event loop; raise AssertionError on a failed check."""

    async def main() -> None:
        await FuzzRun(script).run()

    loop = new_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


class _FormatCheck(logging.Handler):
    """Format every record, so that a bad log call fails, and fail on ERROR and above."""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.levelno >= logging.ERROR:
            raise AssertionError(f"the broker logged an error: {message}")


@contextlib.contextmanager
def checked_broker_logs() -> Iterator[None]:
    """Route the broker's log records to a checking handler instead of the usual output.

    Fuzz inputs make the broker log a warning for nearly every connection, which would flood
    the output and slow the run down.
    """
    logger = logging.getLogger("ironshadow")
    handlers, propagate, level = logger.handlers, logger.propagate, logger.level
    logger.handlers = [_FormatCheck()]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.handlers = handlers
        logger.propagate = propagate
        logger.setLevel(level)
