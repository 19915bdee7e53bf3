"""Reason codes: every byte value against the codes each packet may carry, in both versions."""

from __future__ import annotations

import pytest
from codec_strategies import (
    ALLOWED_REASON_CODES,
    CONNACK_RETURN_CODES_3_1_1,
    SUBACK_RETURN_CODES_3_1_1,
    decode,
    decode_error,
)

from ironshadow.mqtt import (
    MQTT_3_1_1,
    MQTT_5,
    ConnackReturnCode,
    MQTTProtocolError,
    PacketType,
    ReasonCode,
    Suback,
)


def _v5_packets(packet_type: PacketType, code: int) -> list[bytes]:
    """Return MQTT 5 encodings of ``packet_type`` that carry ``code``, in each layout it has."""
    if packet_type == PacketType.CONNACK:
        return [bytes((0x20, 3, 0, code, 0))]
    if packet_type in (PacketType.PUBACK, PacketType.PUBREC, PacketType.PUBCOMP):
        first = packet_type << 4
        return [bytes((first, 3, 0, 1, code)), bytes((first, 4, 0, 1, code, 0))]
    if packet_type == PacketType.PUBREL:
        return [bytes((0x62, 3, 0, 1, code)), bytes((0x62, 4, 0, 1, code, 0))]
    # SUBACK and UNSUBACK: one code, then two codes of which ``code`` is the last.
    if packet_type == PacketType.SUBACK:
        return [bytes((0x90, 4, 0, 1, 0, code)), bytes((0x90, 5, 0, 1, 0, 0, code))]
    if packet_type == PacketType.UNSUBACK:
        return [bytes((0xB0, 4, 0, 1, 0, code)), bytes((0xB0, 5, 0, 1, 0, 0, code))]
    first = packet_type << 4  # DISCONNECT and AUTH
    return [bytes((first, 1, code)), bytes((first, 2, code, 0))]


@pytest.mark.parametrize("packet_type", list(ALLOWED_REASON_CODES), ids=lambda t: t.name)
def test_v5_reason_codes(packet_type):
    accepted = {
        code
        for code in range(256)
        if all(decode_error(data, MQTT_5) is None for data in _v5_packets(packet_type, code))
    }
    assert accepted == ALLOWED_REASON_CODES[packet_type]


@pytest.mark.parametrize("packet_type", list(ALLOWED_REASON_CODES), ids=lambda t: t.name)
def test_v5_bad_reason_code_malformed(packet_type):
    rejections = set()
    for code in set(range(256)) - ALLOWED_REASON_CODES[packet_type]:
        for data in _v5_packets(packet_type, code):
            rejections.add(decode_error(data, MQTT_5).reason_code)
    assert rejections == {ReasonCode.MALFORMED_PACKET}


@pytest.mark.parametrize("packet_type", list(ALLOWED_REASON_CODES), ids=lambda t: t.name)
def test_v5_reason_code_decoded(packet_type):
    for code in ALLOWED_REASON_CODES[packet_type]:
        for data in _v5_packets(packet_type, code):
            packet = decode(data, MQTT_5)[0]
            if hasattr(packet, "reason_codes"):
                assert packet.reason_codes[-1] == code
            else:
                assert packet.reason_code == code


def test_v311_connack_return_codes():
    accepted = {
        code
        for code in range(256)
        if decode_error(bytes((0x20, 2, 0, code)), MQTT_3_1_1) is None
    }
    assert accepted == CONNACK_RETURN_CODES_3_1_1


def test_v311_connack_return_code_names():
    assert {code.value for code in ConnackReturnCode} == CONNACK_RETURN_CODES_3_1_1


def test_v311_suback_return_codes():
    accepted = {
        code
        for code in range(256)
        if decode_error(bytes((0x90, 3, 0, 1, code)), MQTT_3_1_1) is None
    }
    assert accepted == SUBACK_RETURN_CODES_3_1_1


def test_v311_suback_bad_code_malformed():
    with pytest.raises(MQTTProtocolError) as info:
        decode(b"\x90\x03\x00\x01\x03", MQTT_3_1_1)
    assert info.value.reason_code == ReasonCode.MALFORMED_PACKET


def test_v311_suback_maps_failures():
    # MQTT 3.1.1 has one failure code, 0x80, so every MQTT 5 failure code becomes 0x80.
    data = Suback(1, [0x00, 0x02, 0x87, 0x8F, 0xA2]).encode(MQTT_3_1_1)
    assert decode(data, MQTT_3_1_1)[0].reason_codes == [0x00, 0x02, 0x80, 0x80, 0x80]


def test_v311_acks_have_no_reason_code():
    assert decode(b"\x40\x02\x00\x01", MQTT_3_1_1)[0].reason_code == ReasonCode.SUCCESS


def test_v5_suback_codes_each_checked():
    # The second code is invalid, so a decoder that checks only the first would accept it.
    with pytest.raises(MQTTProtocolError) as info:
        decode(b"\x90\x05\x00\x01\x00\x00\x03", MQTT_5)
    assert info.value.reason_code == ReasonCode.MALFORMED_PACKET


def test_error_str_names_code():
    error = MQTTProtocolError(ReasonCode.PACKET_TOO_LARGE, "too big")
    assert str(error) == "too big (reason code 0x95 PACKET_TOO_LARGE)"
