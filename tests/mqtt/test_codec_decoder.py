"""PacketDecoder: incremental framing, chunking, buffering, packet size limit, version switch."""

from __future__ import annotations

import itertools

import pytest
from codec_strategies import STREAM_SETTINGS, VERSIONS, packets
from hypothesis import given
from hypothesis import strategies as st

from ironshadow.mqtt import (
    MQTT_3_1_1,
    MQTT_5,
    Connect,
    MQTTProtocolError,
    PacketDecoder,
    Pingreq,
    PropertyId,
    Puback,
    Publish,
    ReasonCode,
    Subscribe,
    Subscription,
)
from ironshadow.mqtt.constants import MAX_PACKET_SIZE
from ironshadow.mqtt.encoding import encode_vbi


def feed_chunks(decoder: PacketDecoder, data: bytes, cuts: list[int]) -> list:
    """Feed ``data`` split at the offsets in ``cuts`` and return every packet decoded."""
    bounds = [0, *sorted(set(cuts)), len(data)]
    decoded = []
    for start, stop in itertools.pairwise(bounds):
        decoded.extend(decoder.feed(data[start:stop]))
    return decoded


def _stream(items: list, version: int) -> bytes:
    return b"".join(packet.encode(version) for packet in items)


# --- chunking ---------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
@STREAM_SETTINGS
@given(data=st.data())
def test_stream_all_at_once(version, data):
    items = data.draw(st.lists(packets(version), max_size=6))
    decoder = PacketDecoder(version=version)
    assert decoder.feed(_stream(items, version)) == items
    assert decoder.buffered == 0


@pytest.mark.parametrize("version", VERSIONS)
@STREAM_SETTINGS
@given(data=st.data())
def test_stream_byte_by_byte(version, data):
    items = data.draw(st.lists(packets(version), max_size=6))
    stream = _stream(items, version)
    decoder = PacketDecoder(version=version)
    assert feed_chunks(decoder, stream, list(range(len(stream)))) == items
    assert decoder.buffered == 0


@pytest.mark.parametrize("version", VERSIONS)
@STREAM_SETTINGS
@given(data=st.data())
def test_stream_random_splits(version, data):
    items = data.draw(st.lists(packets(version), max_size=6))
    stream = _stream(items, version)
    cuts = data.draw(st.lists(st.integers(0, len(stream))))
    decoder = PacketDecoder(version=version)
    assert feed_chunks(decoder, stream, cuts) == items
    assert decoder.buffered == 0


@pytest.mark.parametrize("version", VERSIONS)
@STREAM_SETTINGS
@given(data=st.data())
def test_partial_packet_stays_buffered(version, data):
    items = data.draw(st.lists(packets(version), max_size=4))
    last = data.draw(packets(version)).encode(version)
    keep = data.draw(st.integers(0, len(last) - 1))
    decoder = PacketDecoder(version=version)
    assert decoder.feed(_stream(items, version) + last[:keep]) == items
    assert decoder.buffered == keep


def test_one_byte_short():
    data = Publish("a/b", b"hello", qos=1, packet_id=3).encode(MQTT_5)
    decoder = PacketDecoder(version=MQTT_5)
    assert decoder.feed(data[:-1]) == []
    assert decoder.buffered == len(data) - 1
    assert decoder.feed(data[-1:]) == [Publish("a/b", b"hello", qos=1, packet_id=3)]
    assert decoder.buffered == 0


def test_lone_first_byte_buffered():
    decoder = PacketDecoder()
    assert decoder.feed(b"\xc0") == []
    assert decoder.buffered == 1
    assert decoder.feed(b"\x00") == [Pingreq()]


def test_empty_feed():
    decoder = PacketDecoder()
    assert decoder.feed(b"") == []
    assert decoder.buffered == 0


def test_partial_remaining_length_buffered():
    # Remaining length 200 takes two bytes, and only the first of them has arrived.
    decoder = PacketDecoder()
    assert decoder.feed(b"\x30\xc8") == []
    assert decoder.buffered == 2


def test_feed_bytearray():
    decoder = PacketDecoder()
    assert decoder.feed(bytearray(b"\xc0\x00\xc0")) == [Pingreq()]
    assert decoder.buffered == 1


# --- remaining length -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data", [b"\x30\xff\xff\xff\xff\x01", b"\x30\x80\x80\x80\x80\x00", b"\xc0\xff\xff\xff\xff"]
)
def test_remaining_length_five_bytes(data):
    with pytest.raises(MQTTProtocolError) as info:
        PacketDecoder().feed(data)
    assert info.value.reason_code == ReasonCode.MALFORMED_PACKET


def test_remaining_length_five_bytes_split():
    decoder = PacketDecoder()
    assert decoder.feed(b"\x30\xff\xff") == []
    with pytest.raises(MQTTProtocolError) as info:
        decoder.feed(b"\xff\xff\x01")
    assert info.value.reason_code == ReasonCode.MALFORMED_PACKET


def test_remaining_length_four_bytes_waits():
    # The largest remaining length is legal, so the decoder waits for the body.
    decoder = PacketDecoder()
    assert decoder.feed(b"\x30\xff\xff\xff\x7f") == []
    assert decoder.buffered == 5


def test_default_max_is_protocol_max():
    assert PacketDecoder().max_packet_size == MAX_PACKET_SIZE


# --- maximum packet size ----------------------------------------------------------------------


def test_too_large_from_header_alone():
    header = b"\x30" + encode_vbi(10 * 1024 * 1024)
    decoder = PacketDecoder(max_packet_size=1024)
    with pytest.raises(MQTTProtocolError) as info:
        decoder.feed(header)
    assert info.value.reason_code == ReasonCode.PACKET_TOO_LARGE
    assert decoder.buffered <= len(header)


def test_too_large_header_byte_by_byte():
    header = b"\x30" + encode_vbi(10 * 1024 * 1024)
    decoder = PacketDecoder(max_packet_size=1024)
    for byte in header[:-1]:
        decoder.feed(bytes((byte,)))
    with pytest.raises(MQTTProtocolError) as info:
        decoder.feed(header[-1:])
    assert info.value.reason_code == ReasonCode.PACKET_TOO_LARGE
    assert decoder.buffered <= len(header)


def test_too_large_after_small_packets():
    data = Pingreq().encode(MQTT_3_1_1) * 3 + b"\x30" + encode_vbi(2000)
    decoder = PacketDecoder(max_packet_size=1024)
    with pytest.raises(MQTTProtocolError) as info:
        decoder.feed(data)
    assert info.value.reason_code == ReasonCode.PACKET_TOO_LARGE


def _publish_of_size(total: int) -> bytes:
    """Return an MQTT 3.1.1 QoS 0 PUBLISH that is ``total`` bytes long, header included."""
    topic = b"\x00\x01t"
    body_size = total - 2  # first byte and a one-byte remaining length
    data = b"\x30" + encode_vbi(body_size) + topic + b"x" * (body_size - len(topic))
    assert len(data) == total
    return data


def test_packet_at_max_accepted():
    decoder = PacketDecoder(max_packet_size=100)
    assert len(decoder.feed(_publish_of_size(100))) == 1


def test_packet_over_max_rejected():
    decoder = PacketDecoder(max_packet_size=100)
    with pytest.raises(MQTTProtocolError) as info:
        decoder.feed(_publish_of_size(101))
    assert info.value.reason_code == ReasonCode.PACKET_TOO_LARGE


def test_too_large_message_names_sizes():
    decoder = PacketDecoder(max_packet_size=100)
    with pytest.raises(MQTTProtocolError) as info:
        decoder.feed(_publish_of_size(101))
    assert "101" in info.value.message
    assert "100" in info.value.message


# --- version ----------------------------------------------------------------------------------


def test_connect_switches_to_v5():
    publish = Publish("t", b"x", properties={PropertyId.CONTENT_TYPE: "text/plain"})
    data = Connect("c", protocol_level=MQTT_5).encode() + publish.encode(MQTT_5)
    decoder = PacketDecoder(version=MQTT_3_1_1)
    decoded = decoder.feed(data)
    assert decoded[1] == publish
    assert decoder.version == MQTT_5


def test_connect_switches_to_v311():
    data = Connect("c").encode() + Puback(5).encode(MQTT_3_1_1)
    decoder = PacketDecoder(version=MQTT_5)
    decoded = decoder.feed(data)
    assert decoded[1] == Puback(5)
    assert decoder.version == MQTT_3_1_1


def test_connect_switch_across_chunks():
    subscribe = Subscribe(1, [Subscription("a/#", 1, no_local=True)])
    data = Connect("c", protocol_level=MQTT_5).encode() + subscribe.encode(MQTT_5)
    decoder = PacketDecoder()
    decoded = feed_chunks(decoder, data, list(range(len(data))))
    assert decoded[1] == subscribe


def test_error_raised_after_good_packets():
    decoder = PacketDecoder()
    with pytest.raises(MQTTProtocolError) as info:
        decoder.feed(Pingreq().encode(MQTT_3_1_1) + b"\x00\x00")
    assert info.value.reason_code == ReasonCode.MALFORMED_PACKET
