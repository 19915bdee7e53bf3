"""Saved MQTT state without sockets: the serialization of retained messages and sessions,
and how StatePersistence restores, tracks and collects them."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from conftest import scaled
from ironshadow.broker.config import QUEUE_FULL_DROP_NEW, QUEUE_FULL_DROP_OLDEST, BrokerConfig
from ironshadow.broker.core import Broker
from ironshadow.broker.message import Message
from ironshadow.broker.persistence import (
    SESSION_FORMAT,
    StateDecodeError,
    StatePersistence,
    decode_retained,
    decode_session,
    encode_retained,
    encode_session,
)
from ironshadow.broker.session import (
    AWAITING_PUBACK,
    AWAITING_PUBCOMP,
    AWAITING_PUBREC,
    NEVER_EXPIRES,
    Delivery,
    Session,
)
from ironshadow.broker.subscriptions import SubscriptionRecord
from ironshadow.mqtt import MQTT_5, Puback, Pubcomp, Publish, Pubrec, Pubrel
from ironshadow.mqtt import PropertyId as P
from ironshadow.mqtt.packets import Will
from raw_client import RawClient

# A clock offset for the codec tests: epoch seconds minus monotonic seconds.
OFFSET = 1_700_000_000.0

FULL_PROPERTIES = {
    P.PAYLOAD_FORMAT_INDICATOR: 1,
    P.MESSAGE_EXPIRY_INTERVAL: 600,
    P.CONTENT_TYPE: "application/json",
    P.RESPONSE_TOPIC: "replies/kiln-3",
    P.CORRELATION_DATA: b"\x00\x01request-7",
    P.USER_PROPERTY: [("site", "plant-2"), ("site", "line-4"), ("shift", "night")],
}


def run(test: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run ``test`` on an event loop, as the broker's timers need one."""
    return asyncio.run(test())


def full_message(topic: str = "plant/kiln-3/temperature") -> Message:
    message = Message(topic, b'{"celsius": 870}', 2, True, dict(FULL_PROPERTIES))
    message.expires_at = 12_345.5
    return message


def record(session: Session, topic_filter: str, qos: int, **options: Any) -> SubscriptionRecord:
    group = topic_filter.split("/")[1] if topic_filter.startswith("$share/") else None
    return SubscriptionRecord(
        session,
        topic_filter,
        qos,
        options.get("no_local", False),
        options.get("retain_as_published", False),
        options.get("retain_handling", 0),
        options.get("subscription_id", 0),
        group,
    )


def full_session() -> Session:
    """Return a session that uses every field the format stores."""
    session = Session("kiln-3")
    session.version = 5
    session.expiry_interval = 3600
    session.ends_at = 1_700_003_600.25
    session.next_packet_id = 65535
    session.queue_dropped = 12

    session.subscriptions = {
        "plant/+/commands": record(session, "plant/+/commands", 0),
        "plant/kiln-3/#": record(
            session, "plant/kiln-3/#", 1, no_local=True, retain_handling=1, subscription_id=7
        ),
        "alarms": record(
            session,
            "alarms",
            2,
            retain_as_published=True,
            retain_handling=2,
            subscription_id=268_435_455,
        ),
        "$share/ovens/plant/+/heat": record(session, "$share/ovens/plant/+/heat", 1),
    }

    message = full_message()
    session.inflight = {
        65534: Delivery(Message("a/1", b"one", 1, False), 1, False, None),
        1: Delivery(message, 2, True, [7, 268_435_455]),
        2: Delivery(Message("a/2", b"", 2, False), 2, False, [3]),
    }
    session.inflight[65534].state = AWAITING_PUBACK
    session.inflight[1].state = AWAITING_PUBREC
    session.inflight[2].state = AWAITING_PUBCOMP

    session.queue = deque([
        Delivery(message, 1, False, [7]),
        Delivery(Message("plant/kiln-3/door", b"open", 0, False), 0, False, None),
        Delivery(Message("plant/kiln-3/door", b"closed", 1, True), 1, True, None),
    ])
    session.inbound_qos2 = {1, 300, 65535}

    session.will = Will(
        "plant/kiln-3/status",
        b"offline",
        1,
        True,
        {P.WILL_DELAY_INTERVAL: 30, P.CONTENT_TYPE: "text/plain", P.USER_PROPERTY: [("a", "b")]},
    )
    session.will_at = 1_700_000_030.5
    return session


def assert_same_message(restored: Message, original: Message) -> None:
    assert restored.topic == original.topic
    assert restored.payload == original.payload
    assert restored.qos == original.qos
    assert restored.retain == original.retain
    assert restored.properties == original.properties
    assert restored.expires_at == original.expires_at


def assert_same_delivery(restored: Delivery, original: Delivery) -> None:
    assert restored.qos == original.qos
    assert restored.retain == original.retain
    assert restored.subscription_ids == original.subscription_ids
    assert restored.state == original.state
    assert_same_message(restored.message, original.message)


# --- the format ---------------------------------------------------------------------------


def test_retained_round_trip_with_every_property():
    message = full_message()
    restored = decode_retained(message.topic, encode_retained(message, OFFSET), OFFSET)
    assert_same_message(restored, message)


def test_retained_expiry_kept_as_epoch_time():
    message = full_message()
    data = encode_retained(message, OFFSET)
    # Another run of the engine has another monotonic clock: the same epoch time maps to it.
    restored = decode_retained(message.topic, data, OFFSET + 1000.0)
    assert restored.expires_at == message.expires_at - 1000.0


def test_retained_without_properties_round_trip():
    message = Message("plain", b"\x00\xff binary", 0, True)
    restored = decode_retained("plain", encode_retained(message, OFFSET), OFFSET)
    assert_same_message(restored, message)
    assert restored.properties is None
    assert restored.expires_at is None


def test_session_round_trip_with_every_field():
    session = full_session()
    restored = decode_session("kiln-3", encode_session(session, OFFSET), OFFSET)

    assert restored.client_id == "kiln-3"
    assert restored.version == 5
    assert restored.expiry_interval == 3600
    assert restored.ends_at == session.ends_at
    assert restored.next_packet_id == 65535
    assert restored.queue_dropped == 12
    assert restored.inbound_qos2 == {1, 300, 65535}
    assert restored.connection is None
    assert restored.expiry_handle is None
    assert restored.will_handle is None
    assert restored.will == session.will
    assert restored.will_at == session.will_at


def test_session_round_trip_keeps_every_subscription_option():
    session = full_session()
    restored = decode_session("kiln-3", encode_session(session, OFFSET), OFFSET)

    assert list(restored.subscriptions) == list(session.subscriptions)
    for topic_filter, original in session.subscriptions.items():
        copy = restored.subscriptions[topic_filter]
        assert copy.session is restored
        assert copy.topic_filter == topic_filter
        assert copy.qos == original.qos
        assert copy.no_local == original.no_local
        assert copy.retain_as_published == original.retain_as_published
        assert copy.retain_handling == original.retain_handling
        assert copy.subscription_id == original.subscription_id
        assert copy.share_group == original.share_group
    assert restored.subscriptions["$share/ovens/plant/+/heat"].share_group == "ovens"


def test_session_round_trip_keeps_messages_in_order():
    session = full_session()
    restored = decode_session("kiln-3", encode_session(session, OFFSET), OFFSET)

    assert list(restored.inflight) == [65534, 1, 2]
    for packet_id, original in session.inflight.items():
        assert_same_delivery(restored.inflight[packet_id], original)
    assert len(restored.queue) == len(session.queue)
    for copy, original in zip(restored.queue, session.queue, strict=True):
        assert_same_delivery(copy, original)
    # One message queued and in flight is one object again after the restore.
    assert restored.queue[0].message is restored.inflight[1].message


def test_minimal_session_round_trip():
    session = Session("dev")
    session.expiry_interval = NEVER_EXPIRES
    restored = decode_session("dev", encode_session(session, OFFSET), OFFSET)
    assert restored.expiry_interval == NEVER_EXPIRES
    assert restored.version == 4
    assert restored.ends_at is None
    assert restored.will is None
    assert restored.will_at is None
    assert restored.subscriptions == {}
    assert restored.inflight == {}
    assert not restored.queue


def test_every_truncation_is_a_decode_error():
    data = encode_session(full_session(), OFFSET)
    for length in range(len(data)):
        with pytest.raises(StateDecodeError):
            decode_session("kiln-3", data[:length], OFFSET)
    retained = encode_retained(full_message(), OFFSET)
    for length in range(len(retained)):
        with pytest.raises(StateDecodeError):
            decode_retained("plant/kiln-3/temperature", retained[:length], OFFSET)


def test_trailing_bytes_are_a_decode_error():
    data = encode_session(full_session(), OFFSET)
    with pytest.raises(StateDecodeError, match="1 unexpected bytes after the end"):
        decode_session("kiln-3", data + b"\x00", OFFSET)


def test_newer_format_is_a_decode_error():
    data = bytearray(encode_session(full_session(), OFFSET))
    data[1] = SESSION_FORMAT + 1
    with pytest.raises(StateDecodeError, match="format version 2"):
        decode_session("kiln-3", bytes(data), OFFSET)


def test_entry_under_another_key_is_a_decode_error():
    data = encode_session(full_session(), OFFSET)
    with pytest.raises(StateDecodeError, match="client 'kiln-3'"):
        decode_session("kiln-4", data, OFFSET)
    with pytest.raises(StateDecodeError, match="does not start with"):
        decode_retained("kiln-3", data, OFFSET)
    retained = encode_retained(full_message(), OFFSET)
    with pytest.raises(StateDecodeError, match="contains a message on"):
        decode_retained("other/topic", retained, OFFSET)


def test_invalid_inflight_state_is_a_decode_error():
    session = Session("dev")
    session.expiry_interval = 60
    session.inflight[5] = Delivery(Message("a", b"x", 1, False), 1, False, None)
    session.inflight[5].state = AWAITING_PUBREC  # PUBREC is never awaited at QoS 1
    with pytest.raises(StateDecodeError, match="in-flight message 5"):
        decode_session("dev", encode_session(session, OFFSET), OFFSET)


# --- restoring and collecting -------------------------------------------------------------


def saved_session(client_id: str, expiry: int, ends_in: float | None, queued: int = 0) -> bytes:
    session = Session(client_id)
    session.expiry_interval = expiry
    session.ends_at = None if ends_in is None else time.time() + ends_in
    session.subscriptions["t/#"] = record(session, "t/#", 1)
    for number in range(queued):
        session.queue.append(Delivery(Message("t/x", b"%d" % number, 1, False), 1, False, None))
    return encode_session(session, time.time() - time.monotonic())


def test_restore_installs_sessions_offline_with_expiry():
    async def scenario() -> None:
        broker = Broker(BrokerConfig())
        persistence = StatePersistence(broker)
        report = persistence.restore({}, {"dev": saved_session("dev", 3600, 1800.0)})
        assert report.sessions == 1
        session = broker.sessions["dev"]
        assert session.connection is None
        assert broker.has_subscribers("t/x")
        assert session.expiry_handle is not None
        remaining = session.expiry_handle.when() - asyncio.get_running_loop().time()
        # The expiry runs from the saved end time, not from a full interval again.
        assert 1700 < remaining <= 1800
        session.cancel_timers()

    run(scenario)


def test_restore_of_session_saved_while_connected():
    async def scenario() -> None:
        broker = Broker(BrokerConfig())
        persistence = StatePersistence(broker)
        persistence.restore({}, {"dev": saved_session("dev", 300, None)})
        session = broker.sessions["dev"]
        assert session.ends_at is not None
        remaining = session.expiry_handle.when() - asyncio.get_running_loop().time()
        assert 290 < remaining <= 300
        # The new end time is saved at the next write.
        assert "dev" in persistence.changes.sessions
        session.cancel_timers()

    run(scenario)


def test_restore_drops_expired_session_and_retained():
    async def scenario() -> None:
        broker = Broker(BrokerConfig())
        persistence = StatePersistence(broker)
        expired = Message("r/old", b"x", 0, True, {P.MESSAGE_EXPIRY_INTERVAL: 1})
        expired.expires_at = time.monotonic() - 5
        live = Message("r/new", b"y", 0, True)
        offset = time.time() - time.monotonic()
        report = persistence.restore(
            {"r/old": encode_retained(expired, offset), "r/new": encode_retained(live, offset)},
            {"gone": saved_session("gone", 60, -1.0), "kept": saved_session("kept", 60, 30.0)},
        )
        assert report.retained == 1
        assert report.expired_retained == 1
        assert report.sessions == 1
        assert report.expired_sessions == 1
        assert "gone" not in broker.sessions
        assert broker.retained.get("r/old") is None
        assert broker.retained.get("r/new").payload == b"y"

        batch = persistence.collect(1 << 20)
        assert batch.sessions == {"gone": None}
        assert batch.retained == {"r/old": None}
        broker.sessions["kept"].cancel_timers()

    run(scenario)


@pytest.mark.parametrize(
    ("policy", "kept"),
    [(QUEUE_FULL_DROP_NEW, [b"0", b"1", b"2"]), (QUEUE_FULL_DROP_OLDEST, [b"2", b"3", b"4"])],
)
def test_restore_bounds_queue_and_counts_drops(policy, kept):
    async def scenario() -> None:
        broker = Broker(BrokerConfig(max_queued_messages=3, queue_full_policy=policy))
        persistence = StatePersistence(broker)
        report = persistence.restore(
            {}, {"dev": saved_session("dev", NEVER_EXPIRES, None, queued=5)}
        )
        session = broker.sessions["dev"]
        assert [delivery.message.payload for delivery in session.queue] == kept
        assert session.queue_dropped == 2
        assert broker.stats.queue_dropped == 2
        assert report.queue_dropped == 2

    run(scenario)


def test_restore_skips_undecodable_entries(caplog):
    async def scenario() -> None:
        broker = Broker(BrokerConfig())
        persistence = StatePersistence(broker)
        report = persistence.restore(
            {"r/t": b"R\x01\x00"},
            {"bad": b"garbage", "good": saved_session("good", NEVER_EXPIRES, None)},
        )
        assert report.undecodable == 2
        assert report.sessions == 1
        assert "good" in broker.sessions
        assert "bad" not in broker.sessions
        # The entry stays in the store, so nothing is collected for it.
        assert persistence.collect(1 << 20).sessions == {}

    with caplog.at_level(logging.WARNING, logger="ironshadow.broker"):
        run(scenario)
    assert "skipped the saved session of client bad" in caplog.text
    assert "skipped the saved retained message on 'r/t'" in caplog.text


def test_restore_publishes_will_due_during_downtime():
    async def scenario() -> None:
        broker = Broker(BrokerConfig())
        persistence = StatePersistence(broker)
        session = Session("dev")
        session.expiry_interval = 600
        session.ends_at = time.time() + 500
        session.will = Will("status/dev", b"offline", 1, True, {P.WILL_DELAY_INTERVAL: 10})
        session.will_at = time.time() - 1
        persistence.restore({}, {"dev": encode_session(session, 0.0)})
        retained = broker.retained.get("status/dev")
        assert retained is not None
        assert retained.payload == b"offline"
        assert broker.sessions["dev"].will is None
        batch = persistence.collect(1 << 20)
        assert "status/dev" in batch.retained
        # The session is saved again, without its will.
        restored = decode_session("dev", batch.sessions["dev"], 0.0)
        assert restored.will is None
        broker.sessions["dev"].cancel_timers()

    run(scenario)


def test_collect_skips_sessions_that_end_at_disconnect():
    async def scenario() -> None:
        broker = Broker(BrokerConfig())
        persistence = StatePersistence(broker)
        persistence.restore({}, {})
        clean = Session("clean")
        broker.sessions["clean"] = clean
        broker.session_changed(clean)
        persistent = Session("persistent")
        persistent.expiry_interval = 60
        broker.sessions["persistent"] = persistent
        broker.session_changed(persistent)
        broker._mark_session("clean")

        batch = persistence.collect(1 << 20)
        assert list(batch.sessions) == ["persistent"]
        persistence.saved(batch)
        assert persistence.pending == 0

        # The persistent session becomes a clean one: its saved copy is deleted.
        persistent.expiry_interval = 0
        broker._mark_session("persistent")
        batch = persistence.collect(1 << 20)
        assert batch.sessions == {"persistent": None}

    run(scenario)


def test_collect_coalesces_and_bounds_batches():
    async def scenario() -> None:
        broker = Broker(BrokerConfig())
        persistence = StatePersistence(broker)
        persistence.restore({}, {})
        for number in range(10):
            session = Session(f"dev-{number}")
            session.expiry_interval = NEVER_EXPIRES
            broker.sessions[session.client_id] = session
        for _ in range(100):  # many changes to one session are one entry
            for number in range(10):
                broker.session_changed(broker.sessions[f"dev-{number}"])
        assert persistence.pending == 10

        size = len(encode_session(broker.sessions["dev-0"], 0.0)) + len("dev-0")
        first = persistence.collect(3 * size)
        assert list(first.sessions) == ["dev-0", "dev-1", "dev-2"]
        assert persistence.pending == 7
        # A failed write marks its entries again, after those still waiting.
        persistence.save_failed(first)
        second = persistence.collect(1 << 20)
        assert list(second.sessions)[:7] == [f"dev-{number}" for number in range(3, 10)]
        assert len(second.sessions) == 10

    run(scenario)


def test_sys_topics_are_not_saved():
    async def scenario() -> None:
        broker = Broker(BrokerConfig())
        persistence = StatePersistence(broker)
        persistence.restore({}, {})
        broker.publish(Message("$SYS/broker/uptime", b"5 seconds", 0, True))
        broker.publish(Message("plant/state", b"running", 0, True))
        assert list(persistence.collect(1 << 20).retained) == ["plant/state"]

    run(scenario)


# --- marking changes on a running broker --------------------------------------------------


def saved_copy(broker_thread: Any, persistence: StatePersistence, client_id: str) -> Session:
    """Wait for the next collected change of ``client_id`` and return it decoded."""
    deadline = time.monotonic() + scaled(5)
    while True:
        batch = broker_thread.call(persistence.collect, 1 << 20)
        data = batch.sessions.get(client_id)
        if data is not None:
            return decode_session(client_id, data, 0.0)
        assert time.monotonic() < deadline, f"no change of {client_id} marked within 5 s"
        time.sleep(0.01)


@pytest.mark.one_process("attaches a second persistence to one engine")
def test_flows_of_connected_client_marked(broker):
    persistence = StatePersistence(broker.broker)
    broker.call(persistence.restore, {}, {})
    device = RawClient(broker.port, MQTT_5)
    device.connect("kiln-3", clean_start=False, properties={P.SESSION_EXPIRY_INTERVAL: 60})
    device.subscribe("jobs/#", 2)
    assert list(saved_copy(broker, persistence, "kiln-3").subscriptions) == ["jobs/#"]

    publisher = RawClient(broker.port, MQTT_5)
    publisher.connect("publisher")
    publisher.send(Publish("jobs/a", b"a", 1, packet_id=1), Publish("jobs/b", b"b", 2, packet_id=2))
    first, second = device.receive_publishes(2)
    inflight = saved_copy(broker, persistence, "kiln-3").inflight
    states = {packet_id: delivery.state for packet_id, delivery in inflight.items()}
    assert states == {first.packet_id: AWAITING_PUBACK, second.packet_id: AWAITING_PUBREC}

    device.send(Puback(first.packet_id), Pubrec(second.packet_id))
    assert device.receive(Pubrel).packet_id == second.packet_id
    inflight = saved_copy(broker, persistence, "kiln-3").inflight
    states = {packet_id: delivery.state for packet_id, delivery in inflight.items()}
    assert states == {second.packet_id: AWAITING_PUBCOMP}

    device.send(Pubcomp(second.packet_id))
    assert saved_copy(broker, persistence, "kiln-3").inflight == {}

    device.send(Publish("telemetry", b"t", 2, packet_id=9))
    assert device.receive(Pubrec).packet_id == 9
    assert saved_copy(broker, persistence, "kiln-3").inbound_qos2 == {9}
    device.send(Pubrel(9))
    assert device.receive(Pubcomp).packet_id == 9
    assert saved_copy(broker, persistence, "kiln-3").inbound_qos2 == set()
    # The publisher's session ends at disconnect, so it is never collected.
    assert broker.call(lambda: "publisher" in persistence.stored_sessions) is False
