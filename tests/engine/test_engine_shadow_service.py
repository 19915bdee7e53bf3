"""The shadow service over MQTT: topics, replies, presence events and delta replay."""

from __future__ import annotations

import time

import orjson

from conftest import scaled
from ironshadow.engine import service as service_module
from ironshadow.engine.service import REPLAYS_PER_ITERATION
from ironshadow.mqtt import (
    MQTT_5,
    Connack,
    Connect,
    Disconnect,
    PropertyId,
    Publish,
    Subscribe,
    Subscription,
)
from ironshadow.shadow import Shadow
from mqtt_client import V5, V311, TestClient
from raw_client import RawClient

PREFIX = "$aws/things/press-7/shadow"


def payload(document: object) -> bytes:
    return orjson.dumps(document)


def test_update_publishes_accepted_and_documents(engine):
    app = TestClient(engine.port, "dashboard")
    app.subscribe(PREFIX + "/update/+", 1)
    device = TestClient(engine.port, "press-7", V311)
    device.publish(PREFIX + "/update", payload({"state": {"reported": {"rpm": 1200}}}), 1)
    first = app.expect()
    second = app.expect()
    by_topic = {message.topic: orjson.loads(message.payload) for message in (first, second)}
    assert set(by_topic) == {PREFIX + "/update/accepted", PREFIX + "/update/documents"}
    assert by_topic[PREFIX + "/update/accepted"]["version"] == 1
    assert by_topic[PREFIX + "/update/accepted"]["state"] == {"reported": {"rpm": 1200}}
    assert by_topic[PREFIX + "/update/documents"]["previous"] is None
    assert by_topic[PREFIX + "/update/documents"]["current"]["version"] == 1
    app.expect_none()


def test_desired_change_sends_delta_to_device(engine):
    device = TestClient(engine.port, "press-7")
    device.subscribe(PREFIX + "/update/delta", 1)
    device.publish(PREFIX + "/update", payload({"state": {"reported": {"speed": 1}}}), 1)
    app = TestClient(engine.port, "scheduler")
    app.publish(PREFIX + "/update", payload({"state": {"desired": {"speed": 3}}}), 1)
    delta = orjson.loads(device.expect().payload)
    assert delta["state"] == {"speed": 3}
    assert delta["version"] == 2
    # Reporting the desired value leaves no delta, so no further message comes.
    device.publish(PREFIX + "/update", payload({"state": {"reported": {"speed": 3}}}), 1)
    device.expect_none()


def test_named_shadow_uses_its_own_topics(engine):
    named = "$aws/things/press-7/shadow/name/tooling"
    app = TestClient(engine.port, "dashboard")
    app.subscribe(named + "/update/accepted", 1)
    app.subscribe(PREFIX + "/update/accepted", 1)
    app.publish(named + "/update", payload({"state": {"reported": {"die": "D4"}}}), 1)
    message = app.expect()
    assert message.topic == named + "/update/accepted"
    assert orjson.loads(message.payload)["version"] == 1
    app.expect_none()
    owner = engine.owner("press-7")
    listed = owner.call(owner.server.shadows.named_shadow_names, "press-7")
    assert listed == ["tooling"]


def test_get_and_delete_round_trip(engine):
    app = TestClient(engine.port, "dashboard")
    for suffix in ("get/accepted", "get/rejected", "delete/accepted", "delete/rejected"):
        app.subscribe(f"{PREFIX}/{suffix}", 1)
    app.publish(PREFIX + "/get", b"", 1)
    missing = app.expect()
    assert missing.topic == PREFIX + "/get/rejected"
    assert orjson.loads(missing.payload)["code"] == 404
    app.publish(PREFIX + "/update", payload({"state": {"desired": {"on": True}}}), 1)
    app.publish(PREFIX + "/get", payload({"clientToken": "t-1"}), 1)
    document = orjson.loads(app.expect().payload)
    assert document["state"]["delta"] == {"on": True}
    assert document["clientToken"] == "t-1"
    app.publish(PREFIX + "/delete", b"", 1)
    deleted = app.expect()
    assert deleted.topic == PREFIX + "/delete/accepted"
    assert orjson.loads(deleted.payload)["version"] == 1
    app.publish(PREFIX + "/delete", b"", 1)
    assert app.expect().topic == PREFIX + "/delete/rejected"


def test_rejected_update_echoes_client_token(engine):
    app = TestClient(engine.port, "dashboard")
    app.subscribe(PREFIX + "/update/rejected", 1)
    app.publish(PREFIX + "/update", payload({"state": "on", "clientToken": "abc"}), 1)
    error = orjson.loads(app.expect().payload)
    assert error["code"] == 400
    assert error["message"] == "State node must be an object"
    assert error["clientToken"] == "abc"


def test_invalid_thing_name_rejected(engine):
    topic = "$aws/things/bad.name/shadow"
    app = TestClient(engine.port, "dashboard")
    app.subscribe(topic + "/update/rejected", 1)
    app.publish(topic + "/update", payload({"state": {"reported": {"a": 1}}}), 1)
    error = orjson.loads(app.expect().payload)
    assert error["code"] == 400
    assert "bad.name" in error["message"]


def test_unheard_replies_are_not_published(engine):
    owner = engine.owner("press-7")
    service = owner.server.shadows
    device = TestClient(engine.port, "press-7")
    device.publish(PREFIX + "/update", payload({"state": {"reported": {"a": 1}}}), 1)
    device.publish(PREFIX + "/get", b"", 1)
    assert owner.call(lambda: service.updates_applied) == 1
    assert owner.call(lambda: service.messages_published) == 0
    device.subscribe(PREFIX + "/update/documents", 1)
    device.publish(PREFIX + "/update", payload({"state": {"reported": {"a": 2}}}), 1)
    assert device.expect().topic == PREFIX + "/update/documents"
    assert owner.call(lambda: service.messages_published) == 1


def test_offline_persistent_session_counts_as_listener(engine):
    device = TestClient(engine.port, "press-7", V311, clean=False)
    device.subscribe(PREFIX + "/update/delta", 1)
    device.disconnect()
    app = TestClient(engine.port, "scheduler")
    app.publish(PREFIX + "/update", payload({"state": {"desired": {"mode": "auto"}}}), 1)
    device.connect()
    delta = orjson.loads(device.expect().payload)
    assert delta["state"] == {"mode": "auto"}


def test_queued_delta_not_replayed_twice(engine):
    session = {PropertyId.SESSION_EXPIRY_INTERVAL: 300}
    device = RawClient(engine.port, MQTT_5)
    device.connect("press-7", clean_start=False, properties=session)
    device.subscribe(PREFIX + "/update/delta", 1)
    device.close()
    app = TestClient(engine.port, "scheduler")
    app.publish(PREFIX + "/update", payload({"state": {"desired": {"mode": "auto"}}}), 1)
    # CONNECT and SUBSCRIBE in one write: the queued delta is in flight (this client never
    # acknowledges it) when the subscription would trigger a replay.
    device = RawClient(engine.port, MQTT_5)
    device.send(
        Connect("press-7", MQTT_5, clean_start=False, properties=session),
        Subscribe(2, [Subscription(PREFIX + "/update/delta", 1)]),
    )
    device.receive(Connack)
    packets = []
    while True:
        try:
            packets.append(device.receive(timeout=1.0))
        except AssertionError:
            break
    deltas = [packet for packet in packets if isinstance(packet, Publish)]
    assert len(deltas) == 1
    assert orjson.loads(deltas[0].payload)["state"] == {"mode": "auto"}


def test_delta_replayed_on_subscribe(engine):
    owner = engine.owner("press-7")
    shadow = Shadow.from_state({"desired": {"target": 40}, "reported": {"target": 35}}, 7)
    owner.call(owner.server.shadows.shadows.__setitem__, "press-7", shadow)
    device = TestClient(engine.port, "press-7")
    device.subscribe(PREFIX + "/update/delta", 1)
    delta = orjson.loads(device.expect().payload)
    assert delta["state"] == {"target": 40}
    assert delta["version"] == 7
    device.expect_none()
    # A wildcard filter is not a request for one shadow's delta: no replay.
    watcher = TestClient(engine.port, "watcher")
    watcher.subscribe("$aws/things/+/shadow/update/delta", 1)
    watcher.expect_none()


def test_no_replay_without_delta(engine):
    owner = engine.owner("press-7")
    shadow = Shadow.from_state({"desired": {"target": 40}, "reported": {"target": 40}}, 2)
    owner.call(owner.server.shadows.shadows.__setitem__, "press-7", shadow)
    device = TestClient(engine.port, "press-7")
    device.subscribe(PREFIX + "/update/delta", 1)
    device.expect_none()


def test_replays_paced_but_all_sent(engine):
    things = [f"line-{number}" for number in range(REPLAYS_PER_ITERATION * 2 + 50)]
    for thing in things:
        shadow = Shadow.from_state({"desired": {"on": True}}, 1)
        owner = engine.owner(thing)
        owner.call(owner.server.shadows.shadows.__setitem__, thing, shadow)
    client = RawClient(engine.port, MQTT_5)
    client.connect("gateway")
    topics = [f"$aws/things/{thing}/shadow/update/delta" for thing in things]
    subscriptions = [Subscription(topic, 0) for topic in topics]
    client.send(Subscribe(1, subscriptions))
    client.receive()  # SUBACK
    received = {client.receive(Publish).topic for _ in things}
    assert received == set(topics)


def test_presence_events(engine):
    watcher = TestClient(engine.port, "ops", V5)
    watcher.subscribe("$aws/events/presence/+/+", 1)
    device = TestClient(engine.port, "press-7", V311)
    connected = watcher.expect()
    assert connected.topic == "$aws/events/presence/connected/press-7"
    event = orjson.loads(connected.payload)
    assert event["clientId"] == "press-7"
    assert event["eventType"] == "connected"
    assert event["ipAddress"] == "127.0.0.1"
    device.drop()
    lost = orjson.loads(watcher.expect().payload)
    assert lost["eventType"] == "disconnected"
    assert lost["disconnectReason"] == "CONNECTION_LOST"
    assert lost["clientInitiatedDisconnect"] is False
    assert lost["versionNumber"] > event["versionNumber"]
    # A clean session without a shadow is forgotten at disconnect; a persistent one is not.
    owner = engine.owner("press-7")
    assert owner.call(owner.server.shadows.last_seen.get, "press-7") is None
    device = TestClient(engine.port, "press-7", V311, clean=False)
    watcher.expect()  # connected again
    device.disconnect()
    clean = orjson.loads(watcher.expect().payload)
    assert clean["disconnectReason"] == "CLIENT_INITIATED_DISCONNECT"
    assert clean["clientInitiatedDisconnect"] is True
    last_seen = owner.call(owner.server.shadows.last_seen.get, "press-7")
    assert isinstance(last_seen, int)


def test_one_shot_publisher_is_remembered(engine):
    """A client that sends its update and DISCONNECT at once, as mosquitto_pub does, leaves
    a shadow behind, so the engine keeps its last connect for the thing list."""
    client = RawClient(engine.port, MQTT_5)
    client.connect("lathe-3")
    update = orjson.dumps({"state": {"reported": {"rpm": 700}}})
    client.send(Publish("$aws/things/lathe-3/shadow/update", update), Disconnect())
    client.wait_closed()
    owner = engine.owner("lathe-3")
    shadows = owner.server.shadows
    deadline = time.monotonic() + scaled(5)
    while owner.call(shadows.shadows.get, "lathe-3") is None:
        assert time.monotonic() < deadline, "the update was not applied"
        time.sleep(0.01)
    assert isinstance(owner.call(shadows.last_seen.get, "lathe-3"), int)


def test_too_many_requests_in_flight(engine):
    client = RawClient(engine.port, MQTT_5)
    client.connect("flood")
    client.subscribe(PREFIX + "/update/+", 0)
    update = payload({"state": {"reported": {"n": 1}}, "clientToken": "over"})
    client.send(*[Publish(PREFIX + "/update", update) for _ in range(11)])
    codes = []
    for _ in range(21):  # 10 accepted + 10 documents + 1 rejected
        packet = client.receive(Publish)
        if packet.topic.endswith("/rejected"):
            codes.append(orjson.loads(packet.payload))
    assert len(codes) == 1
    assert codes[0]["code"] == 429
    assert codes[0]["clientToken"] == "over"


def test_requests_over_iteration_cap_wait_not_lost(engine, monkeypatch):
    """Past the per-iteration cap the broker keeps the remaining packets and reads them
    after the batch is applied: every update is applied, in order."""
    monkeypatch.setattr(service_module, "MAX_REQUESTS_PER_ITERATION", 5)
    clients = []
    for number in range(2):
        prefix = f"$aws/things/cell-{number}/shadow"
        client = RawClient(engine.port, MQTT_5)
        client.connect(f"cell-{number}")
        client.subscribe(prefix + "/update/accepted", 0)
        clients.append((client, prefix))
    for client, prefix in clients:
        updates = [
            Publish(prefix + "/update", payload({"state": {"reported": {"n": n}}}))
            for n in range(8)
        ]
        client.send(*updates)

    for client, prefix in clients:
        replies = [client.receive(Publish) for _ in range(8)]
        assert [packet.topic for packet in replies] == [prefix + "/update/accepted"] * 8
        versions = [orjson.loads(packet.payload)["version"] for packet in replies]
        assert versions == list(range(1, 9))
    for number in range(2):
        owner = engine.owner(f"cell-{number}")
        assert owner.call(lambda owner=owner: owner.broker.reading_paused) is False


def test_many_connections_over_iteration_cap_all_served(engine, monkeypatch):
    """With far more held packets than one iteration may take, a brief resume releases the
    holding connections in turn until the cap pauses the broker again, and the next resume
    starts with those not reached. Every update of every client is applied, in order."""
    monkeypatch.setattr(service_module, "MAX_REQUESTS_PER_ITERATION", 5)
    clients = []
    for number in range(20):
        prefix = f"$aws/things/line-{number}/shadow"
        client = RawClient(engine.port, MQTT_5)
        client.connect(f"line-{number}")
        client.subscribe(prefix + "/update/accepted", 0)
        clients.append((client, prefix))
    for client, prefix in clients:
        client.send(
            *[
                Publish(prefix + "/update", payload({"state": {"reported": {"n": n}}}))
                for n in range(12)
            ]
        )

    for client, prefix in clients:
        replies = [client.receive(Publish) for _ in range(12)]
        assert [packet.topic for packet in replies] == [prefix + "/update/accepted"] * 12
        versions = [orjson.loads(packet.payload)["version"] for packet in replies]
        assert versions == list(range(1, 13))
    for number in range(20):
        broker = engine.owner(f"line-{number}").broker
        paused = engine.owner(f"line-{number}").call(
            lambda broker=broker: (broker.reading_paused, len(broker.held_in_pause))
        )
        assert paused == (False, 0)
