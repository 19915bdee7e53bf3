"""Acknowledgements held by a consumer inside the engine until it has stored the message."""

from __future__ import annotations

from ironshadow.mqtt import (
    MQTT_3_1_1,
    MQTT_5,
    Disconnect,
    Pingreq,
    Pingresp,
    Puback,
    Publish,
    Pubrec,
    ReasonCode,
)
from raw_client import RawClient


def holding_consumer(server, topic_filter: str, client_id: str) -> list:
    """Subscribe a consumer that holds every message it receives; return its list.

    The consumer is added to the engine that serves ``client_id``. In a cluster a client's
    own worker routes its messages to the consumers there, as a worker's shadow service
    receives the requests of its own devices.
    """
    held: list = []

    def consume(message) -> None:
        message.hold()
        held.append(message)

    engine = server.owner(client_id)
    engine.call(engine.broker.add_consumer, "store", [topic_filter], consume)
    return held


def release_all(server, held: list, client_id: str) -> None:
    def release() -> None:
        while held:
            held.pop(0).release()

    server.owner(client_id).call(release)


def test_puback_waits_for_release(broker):
    held = holding_consumer(broker, "stored/#", "plc")
    client = RawClient(broker.port, MQTT_5)
    client.connect("plc")
    client.send(Publish("stored/a", b"1", 1, packet_id=1))
    client.receive_none(0.3)
    assert broker.owner("plc").call(len, held) == 1
    release_all(broker, held, "plc")
    assert client.receive(Puback).packet_id == 1


def test_acks_stay_in_arrival_order(broker):
    held = holding_consumer(broker, "stored/#", "plc")
    client = RawClient(broker.port, MQTT_5)
    client.connect("plc")
    # The second message is not held, but its PUBACK must not overtake the first one's.
    client.send(
        Publish("stored/a", b"1", 1, packet_id=1),
        Publish("plain/b", b"2", 1, packet_id=2),
    )
    client.receive_none(0.3)
    release_all(broker, held, "plc")
    assert client.receive(Puback).packet_id == 1
    assert client.receive(Puback).packet_id == 2


def test_pubrec_waits_for_release(broker):
    held = holding_consumer(broker, "stored/#", "plc")
    client = RawClient(broker.port, MQTT_5)
    client.connect("plc")
    client.send(Publish("stored/a", b"1", 2, packet_id=5))
    client.receive_none(0.3)
    release_all(broker, held, "plc")
    assert client.receive(Pubrec).packet_id == 5


def test_held_acks_count_against_receive_maximum(make_broker):
    broker = make_broker(receive_maximum=3)
    holding_consumer(broker, "stored/#", "plc")
    client = RawClient(broker.port, MQTT_5)
    client.connect("plc")
    client.send(*[Publish("stored/a", b"x", 1, packet_id=n) for n in range(1, 5)])
    packets = client.wait_closed()
    assert isinstance(packets[-1], Disconnect)
    assert packets[-1].reason_code == ReasonCode.RECEIVE_MAXIMUM_EXCEEDED


def test_v311_client_paused_until_acks_sent(make_broker):
    broker = make_broker(receive_maximum=4)
    held = holding_consumer(broker, "stored/#", "plc-311")
    client = RawClient(broker.port, MQTT_3_1_1)
    client.connect("plc-311")
    client.send(*[Publish("stored/a", b"x", 1, packet_id=n) for n in range(1, 5)])
    client.receive_none(0.3)
    # Reading is paused: a fifth message waits in the socket, neither routed nor held.
    client.send(Publish("stored/a", b"x", 1, packet_id=5))
    client.receive_none(0.3)
    assert broker.owner("plc-311").call(len, held) == 4
    release_all(broker, held, "plc-311")
    acknowledged = [client.receive(Puback).packet_id for _ in range(4)]
    assert acknowledged == [1, 2, 3, 4]
    # Once the acknowledgements are out, the broker reads again and holds the fifth.
    client.receive_none(0.3)
    assert broker.owner("plc-311").call(len, held) == 1
    release_all(broker, held, "plc-311")
    assert client.receive(Puback).packet_id == 5
    assert client.is_open()


def test_retransmissions_pause_reading_while_held(make_broker):
    # Each retransmission of a held QoS 2 message queues one more PUBREC behind the held
    # one, so a client that keeps retransmitting must be slowed down like one that sends
    # new messages, or its queued acknowledgements grow without bound.
    broker = make_broker(receive_maximum=4)
    held = holding_consumer(broker, "stored/#", "plc-retry")
    client = RawClient(broker.port, MQTT_3_1_1)
    client.connect("plc-retry")
    client.send(Publish("stored/a", b"x", 2, packet_id=1))
    client.send(*[Publish("stored/a", b"x", 2, dup=True, packet_id=1) for _ in range(4)])
    client.receive_none(0.3)
    # Reading is paused: the PINGREQ waits in the socket until the acknowledgements are out.
    client.send(Pingreq())
    client.receive_none(0.3)
    assert broker.owner("plc-retry").call(len, held) == 1
    release_all(broker, held, "plc-retry")
    acknowledged = [client.receive(Pubrec).packet_id for _ in range(5)]
    assert acknowledged == [1] * 5
    assert isinstance(client.receive(), Pingresp)
