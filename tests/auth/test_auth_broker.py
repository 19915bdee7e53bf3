"""Authentication and topic rules in the broker, with real sockets, paho-mqtt and raw packets.

Each test runs an in-process engine whose broker has the access policy that ``ironshadow
serve`` installs, on a data folder with the users of ``conftest.USERS``.
"""

from __future__ import annotations

import pytest

from ironshadow.auth import UserStore
from ironshadow.mqtt import (
    MQTT_3_1_1,
    MQTT_5,
    Connack,
    Connect,
    Puback,
    Publish,
    Pubrec,
    Suback,
    Subscribe,
    Subscription,
    Will,
)
from ironshadow.mqtt.reason_codes import ReasonCode
from mqtt_client import V311
from raw_client import RawClient

from .auth_harness import AuthEngine, paho_client

NOT_AUTHORIZED = 0x87
BAD_CREDENTIALS = 0x86
SUBACK_FAILURE = 0x80


def connect(
    port: int,
    client_id: str,
    username: str | None,
    password: str | None,
    version: int = MQTT_5,
    will: Will | None = None,
) -> tuple[RawClient, Connack]:
    client = RawClient(port, version)
    client.send(
        Connect(
            client_id,
            version,
            True,
            0,
            username=username,
            password=password.encode() if password is not None else None,
            will=will,
        )
    )
    return client, client.receive(Connack, timeout=10)


def shadow_topic(thing: str, operation: str) -> str:
    return f"$aws/things/{thing}/shadow/{operation}"


def admin_watching(engine: AuthEngine, topic_filter: str) -> RawClient:
    """Return an admin client subscribed to ``topic_filter``, which may read every topic."""
    admin, connack = connect(engine.port, "operator-watch", "operator", "operator-secret")
    assert connack.reason_code == 0
    assert admin.subscribe(topic_filter, 1).reason_codes == [1]
    return admin


# --- CONNECT ---------------------------------------------------------------------------


@pytest.mark.parametrize(("version", "expected"), [(MQTT_5, BAD_CREDENTIALS), (MQTT_3_1_1, 4)])
def test_connect_wrong_password(auth_engine, version, expected):
    client, connack = connect(auth_engine.port, "press-1", "press-1", "wrong", version)
    assert connack.reason_code == expected
    assert client.wait_closed() == []


@pytest.mark.parametrize(("version", "expected"), [(MQTT_5, BAD_CREDENTIALS), (MQTT_3_1_1, 4)])
def test_connect_unknown_user(auth_engine, version, expected):
    client, connack = connect(auth_engine.port, "ghost", "ghost", "press-1-secret", version)
    assert connack.reason_code == expected
    assert client.wait_closed() == []


@pytest.mark.parametrize(("version", "expected"), [(MQTT_5, NOT_AUTHORIZED), (MQTT_3_1_1, 5)])
def test_connect_without_credentials(auth_engine, version, expected):
    _client, connack = connect(auth_engine.port, "press-1", None, None, version)
    assert connack.reason_code == expected


@pytest.mark.parametrize(("version", "expected"), [(MQTT_5, NOT_AUTHORIZED), (MQTT_3_1_1, 5)])
def test_connect_device_with_other_client_id(auth_engine, version, expected):
    _client, connack = connect(auth_engine.port, "press-2", "press-1", "press-1-secret", version)
    assert connack.reason_code == expected


@pytest.mark.parametrize(("version", "expected"), [(MQTT_5, NOT_AUTHORIZED), (MQTT_3_1_1, 5)])
def test_connect_will_on_foreign_topic(auth_engine, version, expected):
    will = Will(shadow_topic("press-2", "update"), b"{}", 0, False)
    _client, connack = connect(
        auth_engine.port, "press-1", "press-1", "press-1-secret", version, will
    )
    assert connack.reason_code == expected


def test_connect_will_on_own_topic(auth_engine):
    will = Will(shadow_topic("press-1", "update"), b"{}", 0, False)
    _client, connack = connect(
        auth_engine.port, "press-1", "press-1", "press-1-secret", MQTT_5, will
    )
    assert connack.reason_code == 0


def test_connect_paho_with_password(auth_engine):
    client = paho_client(auth_engine.port, "press-1", "press-1", "press-1-secret")
    assert client.connack is not None
    assert not client.connack[1].is_failure
    assert client.subscribe(shadow_topic("press-1", "update/accepted"), 1) == [1]
    client.publish(shadow_topic("press-1", "update"), b'{"state":{"reported":{"rpm":5}}}', 1)
    message = client.expect()
    assert message.topic == shadow_topic("press-1", "update/accepted")
    assert b'"rpm":5' in message.payload


def test_connect_paho_wrong_password(auth_engine):
    client = paho_client(auth_engine.port, "press-1", "press-1", "nope", protocol=V311)
    assert client.connack is not None
    assert client.connack[1].is_failure
    assert client.connack[1].value == BAD_CREDENTIALS  # paho maps 3.1.1 code 4 to 0x86


# --- PUBLISH ---------------------------------------------------------------------------


def test_publish_foreign_shadow_v5_denied(auth_engine):
    admin = admin_watching(auth_engine, "$aws/things/press-2/#")
    device, connack = connect(auth_engine.port, "press-1", "press-1", "press-1-secret")
    assert connack.reason_code == 0
    topic = shadow_topic("press-2", "update")
    device.send(Publish(topic, b'{"state":{"reported":{"x":1}}}', 1, packet_id=7))
    puback = device.receive(Puback)
    assert puback.packet_id == 7
    assert puback.reason_code == NOT_AUTHORIZED
    device.send(Publish(topic, b'{"state":{"reported":{"x":2}}}', 2, packet_id=8))
    pubrec = device.receive(Pubrec)
    assert pubrec.packet_id == 8
    assert pubrec.reason_code == NOT_AUTHORIZED
    device.send(Publish(topic, b'{"state":{"reported":{"x":3}}}', 0))
    # The connection stays open and its own topics still work.
    device.send(Publish(shadow_topic("press-1", "update"), b'{"state":{}}', 1, packet_id=9))
    assert device.receive(Puback).reason_code in (0, ReasonCode.NO_MATCHING_SUBSCRIBERS)
    admin.receive_none(0.5)
    assert "press-2" not in auth_engine.call(lambda: set(auth_engine.thread.server.shadows.shadows))


def test_publish_foreign_shadow_v311_dropped(auth_engine):
    admin = admin_watching(auth_engine, "$aws/things/press-2/#")
    device, connack = connect(
        auth_engine.port, "press-1", "press-1", "press-1-secret", MQTT_3_1_1
    )
    assert connack.reason_code == 0
    topic = shadow_topic("press-2", "update")
    device.send(Publish(topic, b'{"state":{"reported":{"x":1}}}', 1, packet_id=3))
    puback = device.receive(Puback)
    assert puback.packet_id == 3  # acknowledged as 3.1.1 requires, but not routed
    device.send(Publish(topic, b'{"state":{"reported":{"x":1}}}', 2, packet_id=4))
    assert device.receive(Pubrec).packet_id == 4
    admin.receive_none(0.5)
    assert device.is_open(0.1)
    assert "press-2" not in auth_engine.call(lambda: set(auth_engine.thread.server.shadows.shadows))


@pytest.mark.parametrize("operation", ["get", "update", "delete"])
def test_shadow_requests_for_other_device(auth_engine, operation):
    """A device cannot read, change or delete another device's shadow."""
    owner, connack = connect(auth_engine.port, "press-2", "press-2", "press-2-secret")
    assert connack.reason_code == 0
    owner.send(Publish(shadow_topic("press-2", "update"), b'{"state":{"reported":{"t":1}}}', 1,
                       packet_id=1))
    assert owner.receive(Puback).packet_id == 1
    watcher = admin_watching(auth_engine, "$aws/things/press-2/shadow/#")

    device, connack = connect(auth_engine.port, "press-1", "press-1", "press-1-secret")
    payload = b'{"state":{"reported":{"t":99}}}' if operation == "update" else b""
    device.send(Publish(shadow_topic("press-2", operation), payload, 1, packet_id=2))
    assert device.receive(Puback).reason_code == NOT_AUTHORIZED
    watcher.receive_none(0.5)  # no accepted, rejected or delta reply was published

    def reported() -> object:
        shadow = auth_engine.thread.server.shadows.shadows.get("press-2")
        return None if shadow is None else shadow.reported()

    assert auth_engine.call(reported) == {"t": 1}


def test_publish_decisions_cached_until_rules_change(auth_engine):
    device, _ = connect(auth_engine.port, "press-1", "press-1", "press-1-secret")
    topic = "factory/press-1/temperature"
    device.send(Publish(topic, b"20", 1, packet_id=1))
    assert device.receive(Puback).reason_code == NOT_AUTHORIZED

    def cached() -> dict[str, bool] | None:
        (connection,) = [
            c for c in auth_engine.thread.broker.connections if c.client_id == "press-1"
        ]
        return dict(connection.publish_decisions or {})

    assert auth_engine.call(cached) == {topic: False}


def test_admin_publishes_anywhere(auth_engine):
    admin = admin_watching(auth_engine, "#")
    client, connack = connect(auth_engine.port, "operator", "operator", "operator-secret")
    assert connack.reason_code == 0
    client.send(Publish("factory/anything", b"1", 1, packet_id=1))
    assert client.receive(Puback).reason_code == 0
    assert admin.receive(Publish).topic == "factory/anything"


def test_application_uses_every_shadow(auth_engine):
    app, connack = connect(auth_engine.port, "dash-1", "dashboard", "dashboard-secret")
    assert connack.reason_code == 0
    assert app.subscribe("$aws/things/+/shadow/update/accepted", 1).reason_codes == [1]
    assert app.subscribe("$aws/events/presence/#", 1, packet_id=2).reason_codes == [1]
    app.send(Publish(shadow_topic("press-2", "update"), b'{"state":{"desired":{"on":1}}}', 1,
                     packet_id=3))
    received = {type(packet): packet for packet in (app.receive(), app.receive())}
    assert received[Puback].packet_id == 3
    assert received[Publish].topic == shadow_topic("press-2", "update/accepted")
    app.send(Publish("factory/other", b"1", 1, packet_id=4))
    assert app.receive(Puback).reason_code == NOT_AUTHORIZED
    assert app.subscribe("#", 0, packet_id=5).reason_codes == [NOT_AUTHORIZED]


# --- SUBSCRIBE -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "topic_filter",
    [
        "$aws/things/press-2/shadow/update/delta",
        "$aws/things/+/shadow/update/delta",
        "$aws/things/#",
        "#",
        "$share/group/$aws/things/press-2/shadow/#",
    ],
)
@pytest.mark.parametrize(("version", "failure"), [(MQTT_5, NOT_AUTHORIZED),
                                                  (MQTT_3_1_1, SUBACK_FAILURE)])
def test_subscribe_foreign_topics_denied(auth_engine, topic_filter, version, failure):
    if topic_filter.startswith("$share") and version != MQTT_5:
        pytest.skip("shared subscriptions are an MQTT 5 feature")
    device, _ = connect(auth_engine.port, "press-1", "press-1", "press-1-secret", version)
    assert device.subscribe(topic_filter, 1).reason_codes == [failure]
    # Own topics stay allowed on the same connection.
    own = "$aws/things/press-1/shadow/update/delta"
    assert device.subscribe(own, 1, packet_id=2).reason_codes == [1]


def test_subscribe_denied_gets_nothing(auth_engine):
    device, _ = connect(auth_engine.port, "press-1", "press-1", "press-1-secret")
    assert device.subscribe("$aws/things/press-2/shadow/#", 1).reason_codes == [NOT_AUTHORIZED]
    owner, _ = connect(auth_engine.port, "press-2", "press-2", "press-2-secret")
    owner.send(Publish(shadow_topic("press-2", "update"), b'{"state":{"reported":{"a":1}}}', 1,
                       packet_id=1))
    assert owner.receive(Puback).packet_id == 1
    device.receive_none(0.5)


# --- the credential cache -----------------------------------------------------------------


def test_cache_skips_hasher_on_reconnect(auth_engine):
    before = auth_engine.verifications()
    first, connack = connect(auth_engine.port, "press-1", "press-1", "press-1-secret")
    assert connack.reason_code == 0
    assert auth_engine.verifications() == before + 1
    first.close()
    _second, connack = connect(auth_engine.port, "press-1", "press-1", "press-1-secret")
    assert connack.reason_code == 0
    assert auth_engine.verifications() == before + 1
    # A wrong password is checked (once), and the right one is still cached.
    _client, connack = connect(auth_engine.port, "press-1", "press-1", "wrong")
    assert connack.reason_code == BAD_CREDENTIALS
    assert auth_engine.verifications() == before + 2
    _client, connack = connect(auth_engine.port, "press-1", "press-1", "wrong")
    assert connack.reason_code == BAD_CREDENTIALS
    assert auth_engine.verifications() == before + 2


def test_cache_coalesces_concurrent_checks(auth_engine):
    """CONNECTs with the same credentials that arrive together share one password check."""
    before = auth_engine.verifications()
    packet = Connect("dash", MQTT_5, True, 0, username="dashboard",
                     password=b"dashboard-secret")
    clients = []
    for index in range(8):
        client = RawClient(auth_engine.port, MQTT_5)
        clients.append(client)
        packet.client_id = f"dash-{index}"
        client.send(packet.encode(MQTT_5))
    for client in clients:
        assert client.receive(Connack, timeout=10).reason_code == 0
    assert auth_engine.verifications() == before + 1


def test_cache_checks_changed_password_again(auth_engine, data_dir):
    client, connack = connect(auth_engine.port, "press-1", "press-1", "press-1-secret")
    assert connack.reason_code == 0
    client.close()
    count = auth_engine.verifications()
    store = UserStore(data_dir / "users.json")
    store.remove("press-1")
    store.add("press-1", "device", b"new-secret")
    auth_engine.call(auth_engine.policy.reload)
    _client, connack = connect(auth_engine.port, "press-1", "press-1", "press-1-secret")
    assert connack.reason_code == BAD_CREDENTIALS
    assert auth_engine.verifications() == count + 1
    _client, connack = connect(auth_engine.port, "press-1", "press-1", "new-secret")
    assert connack.reason_code == 0
    assert auth_engine.verifications() == count + 2


def test_packets_after_connect_wait_for_password_check(auth_engine):
    """A client that sends SUBSCRIBE and PUBLISH right behind CONNECT has them handled after
    the password check, in order."""
    client = RawClient(auth_engine.port, MQTT_5)
    topic = shadow_topic("press-1", "update")
    client.send(
        Connect("press-1", MQTT_5, True, 0, username="press-1", password=b"press-1-secret"),
        Subscribe(1, [Subscription(shadow_topic("press-1", "update/accepted"), 1)], {}),
        Publish(topic, b'{"state":{"reported":{"k":1}}}', 1, packet_id=2),
    )
    assert client.receive(Connack, timeout=10).reason_code == 0
    assert client.receive(Suback).reason_codes == [1]
    received = [client.receive(), client.receive()]
    assert {type(packet) for packet in received} == {Puback, Publish}
