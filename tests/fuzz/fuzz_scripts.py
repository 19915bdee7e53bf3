"""Inputs for the connection fuzz: broker set-ups, packet strategies, steps and scripts.

A script is a broker set-up and a list of steps. Steps open connections in a few slots and
send them bytes: valid packets of every type, mutated packets and garbage, split at random
chunk boundaries. Other steps close a connection from the client side, stop and start a
client's reading, pause the whole broker, release messages that a consumer holds back, save
the MQTT state, change the access rules and let time pass. The slots share a handful of client
ids, so sessions are taken over, resumed and ended across connections of both protocol
versions. ``connection_fuzz`` runs the scripts.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

# The codec's packet strategies live next to the codec tests. pytest puts only this folder on
# sys.path when it runs the tests here on their own.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "mqtt"))

from codec_strategies import (
    ALLOWED_REASON_CODES,
    connects,
    cut_lists,
    mutate,
    mutations,
    packet_strategies,
    publishes,
    split_chunks,
)

from ironshadow.broker.config import QUEUE_FULL_DROP_OLDEST
from ironshadow.mqtt import (
    MQTT_3_1_1,
    MQTT_5,
    Connect,
    Packet,
    PacketType,
    PropertyId,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Subscribe,
    Subscription,
    Unsubscribe,
    Will,
)

P = PropertyId

# --- broker set-ups -------------------------------------------------------------------------

# Small limits make the queue, in-flight window, topic alias and packet size checks trip
# within a few packets.
_TIGHT = {
    "receive_maximum": 2,
    "max_inflight_v311": 2,
    "topic_alias_maximum": 2,
    "max_queued_messages": 3,
    "queue_full_policy": QUEUE_FULL_DROP_OLDEST,
    "queue_qos0_offline": True,
    "max_packet_size": 160,
    "write_high_water": 256,
    "write_low_water": 64,
    "max_keep_alive": 5,
    "max_session_expiry": 10,
    "max_connections": 5,
}

CONFIGS: dict[str, dict[str, Any]] = {
    "default": {},
    "tight": _TIGHT,
    "no-retain": {"retain_available": False, "deny_subscriptions": ("t/2", "$share/g/#")},
    # CONNECTs wait in the admission queue until time passes.
    "admission": {"connect_rate": 50.0},
    # Abuse limits that a few packets reach. Every fuzzed client connects from one address.
    "limits": {
        "max_connections_per_address": 4,
        "connect_rate_per_address": 20.0,
        "connect_burst_per_address": 3,
        "max_subscriptions": 3,
        "max_publish_rate": 100.0,
        "publish_burst": 3,
        "max_topic_levels": 2,
        "max_topic_length": 16,
    },
}

# What runs inside the broker besides clients: nothing, a consumer that takes messages at
# once, or one that calls Message.hold() as the shadow service does while it stores an update.
CONSUMERS = ["none", "plain", "holding"]
CONSUMER_FILTERS = ["t/#", "$share/g/t/1"]

# --- input strategies -----------------------------------------------------------------------

SLOTS = 3
# Shared client ids, so that connections take over each other's sessions. "" makes the broker
# assign one, and the "$internal/" one is reserved for the engine.
CLIENT_IDS = ["dev-1", "dev-1", "dev-1", "dev-2", "dev-2", "dev-3", "", "$internal/fuzz"]
TOPICS = ["t/1", "t/2", "t", "t/1/x", "$SYS/fuzz", "a/b"]
TOPIC_FILTERS = [
    "#", "t/+", "t/1", "t/#", "+/+", "$SYS/#", "a/b", "$share/g/t/#", "$share/g/#",
    "$share/h/t/1",
]
# Small packet identifiers match the ones that the broker allocates, so acknowledgements from
# the client hit messages in flight.
SMALL_PACKET_IDS = st.integers(1, 4)

# User names with a meaning in FuzzAccessPolicy (see there).
USER_NAMES = [None, None, "device", "deny", "slow-device", "slow-deny"]

client_ids = st.sampled_from(CLIENT_IDS)
fuzz_topics = st.sampled_from(TOPICS)
fuzz_filters = st.sampled_from(TOPIC_FILTERS)


def _sometimes(draw: st.DrawFn) -> bool:
    """Draw True about one time in three."""
    return draw(st.integers(0, 2)) == 0


# Well-behaved packets are built from a few draws each, because drawing takes most of a fuzz
# run's time and the codec's strategies draw every field and property.


@st.composite
def well_behaved_connects(draw: st.DrawFn, version: int) -> Connect:
    """Draw a valid CONNECT. The broker rejects it only for a reserved or missing client id
    (see CLIENT_IDS) or a denied user name (see USER_NAMES)."""
    will = None
    if _sometimes(draw):
        will_properties: dict[int, Any] = {}
        if version == MQTT_5 and draw(st.booleans()):
            will_properties[P.WILL_DELAY_INTERVAL] = draw(st.sampled_from([0, 3, 100]))
        qos = draw(st.integers(0, 2))
        will = Will(draw(fuzz_topics), b"gone", qos, draw(st.booleans()), will_properties)
    properties: dict[int, Any] = {}
    if version == MQTT_5:
        expiry = draw(st.sampled_from([None, 0, 5, 0xFFFFFFFF]))
        if expiry is not None:
            properties[P.SESSION_EXPIRY_INTERVAL] = expiry
        receive_maximum = draw(st.sampled_from([None, 1, 2, 3]))
        if receive_maximum is not None:
            properties[P.RECEIVE_MAXIMUM] = receive_maximum
        if _sometimes(draw):
            properties[P.TOPIC_ALIAS_MAXIMUM] = draw(st.integers(0, 2))
        if _sometimes(draw):
            properties[P.MAXIMUM_PACKET_SIZE] = draw(st.sampled_from([16, 40, 128, 100_000]))
    return Connect(
        client_id=draw(client_ids),
        protocol_level=version,
        clean_start=draw(st.booleans()),
        keep_alive=draw(st.sampled_from([0, 1, 5, 60])),
        username=draw(st.sampled_from(USER_NAMES)),
        will=will,
        properties=properties,
    )


@st.composite
def well_behaved_subscribes(draw: st.DrawFn, version: int) -> Subscribe:
    subscriptions = []
    for _ in range(draw(st.integers(1, 3))):
        subscription = Subscription(draw(fuzz_filters), draw(st.integers(0, 2)))
        if version == MQTT_5 and _sometimes(draw):
            subscription.no_local = draw(st.booleans())
            subscription.retain_as_published = draw(st.booleans())
            subscription.retain_handling = draw(st.integers(0, 2))
        subscriptions.append(subscription)
    properties = {}
    if version == MQTT_5 and _sometimes(draw):
        properties[P.SUBSCRIPTION_IDENTIFIER] = [draw(st.integers(1, 3))]
    return Subscribe(draw(SMALL_PACKET_IDS), subscriptions, properties)


def well_behaved_acks(version: int, packet_class: type) -> st.SearchStrategy[Packet]:
    if version != MQTT_5:
        return st.builds(packet_class, SMALL_PACKET_IDS)
    # Success, and one failure code that each of these packets may carry.
    failure = 0x92 if packet_class in (Pubrel, Pubcomp) else 0x80
    return st.builds(packet_class, SMALL_PACKET_IDS, st.sampled_from([0, 0, failure]))


@st.composite
def fuzz_connects(draw: st.DrawFn, version: int) -> Connect:
    """Draw a CONNECT whose client id, session expiry and limits exercise the broker."""
    connect = draw(connects(version))
    changes: dict[str, Any] = {"client_id": draw(client_ids)}
    if not _sometimes(draw):
        changes["keep_alive"] = draw(st.sampled_from([0, 1, 5, 60]))
    properties = dict(connect.properties)
    if version == MQTT_5:
        if not _sometimes(draw):
            # An authentication method is rejected, because none is offered.
            properties.pop(P.AUTHENTICATION_METHOD, None)
            properties.pop(P.AUTHENTICATION_DATA, None)
        if _sometimes(draw):
            properties[P.SESSION_EXPIRY_INTERVAL] = draw(st.sampled_from([0, 5, 0xFFFFFFFF]))
        if _sometimes(draw):
            properties[P.RECEIVE_MAXIMUM] = draw(st.integers(1, 3))
        if _sometimes(draw):
            properties[P.TOPIC_ALIAS_MAXIMUM] = draw(st.integers(0, 2))
        if _sometimes(draw):
            properties[P.MAXIMUM_PACKET_SIZE] = draw(st.sampled_from([16, 40, 128, 100_000]))
        changes["properties"] = properties
    will = connect.will
    if will is not None and not _sometimes(draw):
        will_properties = dict(will.properties)
        if version == MQTT_5 and _sometimes(draw):
            will_properties[P.WILL_DELAY_INTERVAL] = draw(st.sampled_from([0, 3, 100]))
        changes["will"] = replace(will, topic=draw(fuzz_topics), properties=will_properties)
    return replace(connect, **changes)


@st.composite
def well_behaved_publishes(draw: st.DrawFn, version: int) -> Publish:
    """Draw a valid PUBLISH on a shared topic that the broker accepts, mostly."""
    qos = draw(st.integers(0, 2))
    topic = draw(fuzz_topics)
    properties: dict[int, Any] = {}
    if version == MQTT_5:
        if _sometimes(draw):
            # The client sets an alias and later uses it alone, or uses one it never set.
            properties[P.TOPIC_ALIAS] = draw(st.integers(1, 3))
            if _sometimes(draw):
                topic = ""
        if _sometimes(draw):
            properties[P.MESSAGE_EXPIRY_INTERVAL] = draw(st.sampled_from([0, 1, 100]))
        if _sometimes(draw):
            properties[P.USER_PROPERTY] = [("k", "v")]
    return Publish(
        topic=topic,
        payload=draw(st.sampled_from([b"", b"x", b"0123456789" * 8])),
        qos=qos,
        retain=draw(st.booleans()),
        dup=qos > 0 and draw(st.booleans()),
        packet_id=draw(SMALL_PACKET_IDS) if qos else 0,
        properties=properties,
    )


@st.composite
def fuzz_publishes(draw: st.DrawFn, version: int) -> Publish:
    """Draw a PUBLISH with any valid properties, mostly on a shared topic."""
    publish = draw(publishes(version))
    changes: dict[str, Any] = {}
    if publish.topic and not _sometimes(draw):
        changes["topic"] = draw(fuzz_topics)
    if publish.qos and not _sometimes(draw):
        changes["packet_id"] = draw(SMALL_PACKET_IDS)
    if version == MQTT_5 and P.TOPIC_ALIAS in publish.properties and not _sometimes(draw):
        properties = dict(publish.properties)
        properties[P.TOPIC_ALIAS] = draw(st.integers(1, 3))
        changes["properties"] = properties
    return replace(publish, **changes)


@st.composite
def fuzz_subscribes(draw: st.DrawFn, version: int) -> Subscribe:
    subscribe = draw(packet_strategies(version)["subscribe"])
    subscriptions = [
        sub if _sometimes(draw) else replace(sub, topic_filter=draw(fuzz_filters))
        for sub in subscribe.subscriptions
    ]
    return replace(subscribe, packet_id=draw(SMALL_PACKET_IDS), subscriptions=subscriptions)


@st.composite
def fuzz_unsubscribes(draw: st.DrawFn, version: int) -> Packet:
    unsubscribe = draw(packet_strategies(version)["unsubscribe"])
    filters = [f if _sometimes(draw) else draw(fuzz_filters) for f in unsubscribe.topic_filters]
    return replace(unsubscribe, topic_filters=filters)


@st.composite
def fuzz_acks(draw: st.DrawFn, version: int, kind: str) -> Packet:
    ack = draw(packet_strategies(version)[kind])
    if not _sometimes(draw):
        ack = replace(ack, packet_id=draw(SMALL_PACKET_IDS))
    return ack


@st.composite
def fuzz_disconnects(draw: st.DrawFn, version: int) -> Packet:
    disconnect = draw(packet_strategies(version)["disconnect"])
    if version == MQTT_5 and _sometimes(draw):
        codes = sorted(ALLOWED_REASON_CODES[PacketType.DISCONNECT])
        properties = {P.SESSION_EXPIRY_INTERVAL: draw(st.sampled_from([0, 5]))}
        disconnect = replace(disconnect, reason_code=draw(st.sampled_from(codes)))
        disconnect = replace(disconnect, properties=properties)
    return disconnect


# Packet kinds with repeats, so that the common ones come up more often. A well-behaved client
# sends the first list; a hostile one sends anything, packets of a server included.
_WELL_BEHAVED_KINDS = [
    "publish", "publish", "publish", "publish", "puback", "pubrec", "pubrel", "pubcomp",
    "subscribe", "subscribe", "unsubscribe", "pingreq", "disconnect",
]
_HOSTILE_KINDS = [
    "any connect", "any publish", "any puback", "any pubrec", "any pubrel", "any pubcomp",
    "any subscribe", "any unsubscribe", "pingreq", "disconnect", "auth", "server",
]
_SERVER_KINDS = ["connack", "suback", "unsuback", "pingresp"]
_ACK_CLASSES = {"puback": Puback, "pubrec": Pubrec, "pubrel": Pubrel, "pubcomp": Pubcomp}


@functools.cache
def _packet_strategy(kind: str, version: int) -> st.SearchStrategy[Packet]:
    """Return the strategy for one of the kinds in the lists above, built once."""
    if kind == "connect":
        return well_behaved_connects(version)
    if kind == "publish":
        return well_behaved_publishes(version)
    if kind == "subscribe":
        return well_behaved_subscribes(version)
    if kind in _ACK_CLASSES:
        return well_behaved_acks(version, _ACK_CLASSES[kind])
    if kind == "unsubscribe":
        return st.builds(Unsubscribe, SMALL_PACKET_IDS, st.lists(fuzz_filters, min_size=1))

    if kind == "any connect":
        return fuzz_connects(version)
    if kind == "any publish":
        return fuzz_publishes(version)
    if kind == "any subscribe":
        return fuzz_subscribes(version)
    if kind == "any unsubscribe":
        return fuzz_unsubscribes(version)
    if kind.startswith("any "):
        return fuzz_acks(version, kind[4:])

    if kind == "disconnect":
        return fuzz_disconnects(version)
    if kind == "auth":
        # MQTT 3.1.1 has no AUTH packet, so a 3.1.1 client sends the v5 encoding.
        return packet_strategies(MQTT_5)["auth"]
    if kind == "server":
        return st.sampled_from(_SERVER_KINDS).flatmap(
            lambda name: packet_strategies(version)[name]
        )
    return packet_strategies(version)[kind]


def _packets_of(kinds: list[str], version: int) -> st.SearchStrategy[Packet]:
    return st.sampled_from(kinds).flatmap(lambda kind: _packet_strategy(kind, version))


# Strategies are built once, because Hypothesis validates each new strategy object on first
# use, which costs more than most draws.
_WELL_BEHAVED = {version: _packets_of(_WELL_BEHAVED_KINDS, version) for version in (4, 5)}
_HOSTILE = {version: _packets_of(_HOSTILE_KINDS, version) for version in (4, 5)}


@st.composite
def _hostile_bytes(draw: st.DrawFn, version: int) -> bytes:
    """Draw one encoded packet of any kind, now and then in the other version, or garbage."""
    choice = draw(st.integers(0, 9))
    if choice == 0:
        return draw(st.binary(min_size=1, max_size=24))
    if choice == 1:
        version = MQTT_5 if version == MQTT_3_1_1 else MQTT_3_1_1
    packet = draw(_HOSTILE[version])
    return packet.encode(version)


hostile_bytes = {version: _hostile_bytes(version) for version in (4, 5)}


# --- steps ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Open:
    """A client opens a connection in ``slot`` and sends ``connect`` (it may be empty).

    ``write_eof`` is whether the transport can half-close, as TCP can. A connection that was
    in the slot before stays open, as a client that lost track of it would leave it.
    """

    slot: int
    write_eof: bool
    connect: bytes


@dataclass(frozen=True)
class Send:
    """The client in ``slot`` sends ``chunks``, each one a separate ``data_received``.

    Like a client that reconnects on its own, a slot whose connection has closed opens a new
    one first and sends the slot's last CONNECT again.
    """

    slot: int
    chunks: tuple[bytes, ...]


@dataclass(frozen=True)
class PeerClose:
    """The client in ``slot`` closes its socket, or resets it."""

    slot: int
    reset: bool


@dataclass(frozen=True)
class PeerReading:
    """The client in ``slot`` stops or starts reading, which fills the broker's write buffer."""

    slot: int
    reading: bool


@dataclass(frozen=True)
class BrokerReading:
    """The storage layer pauses or resumes reading from every connection."""

    paused: bool


@dataclass(frozen=True)
class Release:
    """The holding consumer releases ``count`` held messages, oldest or newest first."""

    count: int
    newest_first: bool


@dataclass(frozen=True)
class Save:
    """The engine saves the changed MQTT state, which must decode again."""


@dataclass(frozen=True)
class RulesChange:
    """The access rules change: devices lose their rights (``revoke``) or get them back."""

    revoke: bool


@dataclass(frozen=True)
class Elapse:
    """``seconds`` pass: keep alives, CONNECT timeouts, wills, sessions and lingers expire."""

    seconds: float


Step = (
    Open | Send | PeerClose | PeerReading | BrokerReading | Release | Save | RulesChange | Elapse
)


@dataclass(frozen=True)
class Script:
    config: str
    consumer: str
    # Whether the broker tracks changes for saving, as the engine does with a data folder.
    persist: bool
    # Whether the broker uses FuzzAccessPolicy instead of admitting every client.
    access: bool
    # Protocol version of the client in each slot.
    versions: tuple[int, ...]
    steps: tuple[Step, ...]
    fresh_version: int


slots = st.integers(0, SLOTS - 1)


@st.composite
def sends(draw: st.DrawFn, versions: tuple[int, ...]) -> Send:
    """Draw what one client sends: three times in four well-behaved packets, else anything,
    perhaps mutated."""
    slot = draw(slots)
    version = versions[slot]
    if draw(st.integers(0, 3)):
        items = draw(st.lists(_WELL_BEHAVED[version], min_size=1, max_size=4))
        stream = b"".join(packet.encode(version) for packet in items)
    else:
        stream = b"".join(draw(st.lists(hostile_bytes[version], min_size=1, max_size=4)))
        if draw(st.booleans()):
            stream = mutate(stream, draw(mutations))
    chunks = split_chunks(stream, draw(cut_lists))
    return Send(slot, tuple(chunk for chunk in chunks if chunk))


@functools.cache
@st.composite
def opens(draw: st.DrawFn, versions: tuple[int, ...], slot: int | None = None) -> Open:
    if slot is None:
        slot = draw(slots)
    version = versions[slot]
    connect = b""
    choice = draw(st.integers(0, 9))
    if choice == 1:
        connect = draw(_packet_strategy("any connect", version)).encode()
    elif choice:
        connect = draw(_packet_strategy("connect", version)).encode()
        if draw(st.booleans()):
            # Subscribing right away makes messages flow between the slots.
            connect += draw(_packet_strategy("subscribe", version)).encode(version)
    return Open(slot, draw(st.booleans()), connect)


# Step kinds with repeats: sending makes up about half of the steps.
_STEP_KINDS = [
    "send", "send", "send", "send", "send", "send", "open", "peer close", "peer reading",
    "broker reading", "release", "save", "rules", "elapse",
]


@functools.cache
def steps(versions: tuple[int, ...]) -> st.SearchStrategy[Step]:
    strategies: dict[str, st.SearchStrategy[Step]] = {
        "send": sends(versions),
        "open": opens(versions),
        "peer close": st.builds(PeerClose, slots, st.booleans()),
        "peer reading": st.builds(PeerReading, slots, st.booleans()),
        "broker reading": st.builds(BrokerReading, st.booleans()),
        "release": st.builds(Release, st.integers(1, 3), st.booleans()),
        "save": st.just(Save()),
        "rules": st.builds(RulesChange, st.booleans()),
        "elapse": st.builds(Elapse, st.sampled_from([0.6, 3.0, 20.0, 1e6])),
    }
    return st.sampled_from(_STEP_KINDS).flatmap(strategies.__getitem__)


@st.composite
def scripts(draw: st.DrawFn, min_steps: int = 6, max_steps: int = 40) -> Script:
    versions = tuple(draw(st.lists(st.sampled_from([4, 5]), min_size=SLOTS, max_size=SLOTS)))
    # Every slot starts with a connection, most of them with a valid CONNECT.
    first = [draw(opens(versions, slot)) for slot in range(SLOTS)]
    return Script(
        config=draw(st.sampled_from(list(CONFIGS))),
        consumer=draw(st.sampled_from(CONSUMERS)),
        persist=draw(st.booleans()),
        access=draw(st.booleans()),
        versions=versions,
        steps=(
            *first,
            *draw(st.lists(steps(versions), min_size=min_steps, max_size=max_steps)),
        ),
        fresh_version=draw(st.sampled_from([4, 5])),
    )
