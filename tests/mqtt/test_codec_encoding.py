"""Primitive data types: variable byte integers, fixed-size integers, strings, binary data."""

from __future__ import annotations

import pytest
from codec_strategies import MAX_VBI, decode
from hypothesis import given, settings
from hypothesis import strategies as st

from ironshadow.mqtt import MQTT_3_1_1, MQTT_5, MQTTProtocolError, Publish, ReasonCode
from ironshadow.mqtt.encoding import (
    decode_binary,
    decode_string,
    decode_uint16,
    decode_uint32,
    decode_vbi,
    encode_binary,
    encode_string,
    encode_vbi,
)

# --- variable byte integer --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (0, 1),
        (127, 1),
        (128, 2),
        (16_383, 2),
        (16_384, 3),
        (2_097_151, 3),
        (2_097_152, 4),
        (268_435_455, 4),
    ],
)
def test_vbi_boundaries(value, size):
    encoded = encode_vbi(value)
    assert len(encoded) == size
    assert decode_vbi(encoded, 0, len(encoded)) == (value, size)


@pytest.mark.parametrize(
    ("value", "encoded"),
    [(0, b"\x00"), (127, b"\x7f"), (128, b"\x80\x01"), (321, b"\xc1\x02"),
     (268_435_455, b"\xff\xff\xff\x7f")],
)
def test_vbi_bytes(value, encoded):
    assert encode_vbi(value) == encoded


@settings(deadline=None)
@given(st.integers(0, MAX_VBI))
def test_vbi_round_trip(value):
    encoded = encode_vbi(value)
    assert decode_vbi(encoded, 0, len(encoded)) == (value, len(encoded))


@settings(deadline=None)
@given(st.integers(0, MAX_VBI))
def test_vbi_minimal_length(value):
    expected = 1 + (value >= 128) + (value >= 16_384) + (value >= 2_097_152)
    assert len(encode_vbi(value)) == expected


@pytest.mark.parametrize("value", [-1, MAX_VBI + 1, 2**32])
def test_vbi_encode_out_of_range(value):
    with pytest.raises(ValueError):
        encode_vbi(value)


@pytest.mark.parametrize(
    "data", [b"\x80\x80\x80\x80\x01", b"\xff\xff\xff\xff\x7f", b"\x80\x80\x80\x80\x00"]
)
def test_vbi_fifth_byte(data):
    with pytest.raises(MQTTProtocolError) as info:
        decode_vbi(data, 0, len(data))
    assert info.value.reason_code == ReasonCode.MALFORMED_PACKET


@pytest.mark.parametrize("data", [b"", b"\x80", b"\xff\xff", b"\x80\x80\x80"])
def test_vbi_truncated(data):
    with pytest.raises(MQTTProtocolError) as info:
        decode_vbi(data, 0, len(data))
    assert info.value.reason_code == ReasonCode.MALFORMED_PACKET


def test_vbi_decode_stops_at_end():
    # The packet ends before the byte that would finish the integer.
    with pytest.raises(MQTTProtocolError) as info:
        decode_vbi(b"\x80\x01", 0, 1)
    assert info.value.reason_code == ReasonCode.MALFORMED_PACKET


def test_vbi_decode_at_offset():
    assert decode_vbi(b"\xaa\x80\x01\xbb", 1, 4) == (128, 3)


# --- fixed-size integers ----------------------------------------------------------------------


def test_uint16_decode():
    assert decode_uint16(b"\x01\x02", 0, 2) == (0x0102, 2)


def test_uint32_decode():
    assert decode_uint32(b"\xff\xff\xff\xfe", 0, 4) == (0xFFFF_FFFE, 4)


@pytest.mark.parametrize("decoder", [decode_uint16, decode_uint32])
def test_int_truncated(decoder):
    with pytest.raises(MQTTProtocolError) as info:
        decoder(b"\x01", 0, 1)
    assert info.value.reason_code == ReasonCode.MALFORMED_PACKET


# --- UTF-8 strings ----------------------------------------------------------------------------

_BAD_UTF8 = {
    "null": b"\x00",
    "null-inside": b"a\x00b",
    "ff-byte": b"\xff",
    "fe-byte": b"\xfe",
    "lone-continuation": b"\x80",
    "truncated-2-byte": b"\xc3",
    "truncated-3-byte": b"\xe2\x82",
    "truncated-4-byte": b"\xf0\x9f\x98",
    "overlong-slash-2-byte": b"\xc0\xaf",
    "overlong-slash-3-byte": b"\xe0\x80\xaf",
    "overlong-null": b"\xc0\x80",
    "surrogate-high": b"\xed\xa0\x80",
    "surrogate-low": b"\xed\xbf\xbf",
    "above-u10ffff": b"\xf4\x90\x80\x80",
}


@pytest.mark.parametrize("raw", list(_BAD_UTF8.values()), ids=list(_BAD_UTF8))
def test_string_rejects_bad_utf8(raw):
    data = len(raw).to_bytes(2, "big") + raw
    with pytest.raises(MQTTProtocolError) as info:
        decode_string(data, 0, len(data))
    assert info.value.reason_code == ReasonCode.MALFORMED_PACKET


@pytest.mark.parametrize("version", [MQTT_3_1_1, MQTT_5])
@pytest.mark.parametrize("raw", list(_BAD_UTF8.values()), ids=list(_BAD_UTF8))
def test_publish_topic_bad_utf8(version, raw):
    packet = Publish("x" * len(raw), b"payload").encode(version)
    # Swap the topic for bad bytes of the same length, so every length prefix stays right.
    data = packet[:4] + raw + packet[4 + len(raw) :]
    with pytest.raises(MQTTProtocolError) as info:
        decode(data, version)
    assert info.value.reason_code == ReasonCode.MALFORMED_PACKET


@pytest.mark.parametrize(
    "text", ["", "a", "temp/°C", "\ufeffbom", "\U0001f600", "\u07ff\u0800\uffff\U0010ffff"]
)
def test_string_valid(text):
    data = encode_string(text)
    assert decode_string(data, 0, len(data)) == (text, len(data))


def test_string_bom_kept():
    # A leading U+FEFF is part of the string, and a receiver must not strip it.
    data = encode_string("\ufeffa")
    assert decode_string(data, 0, len(data))[0] == "\ufeffa"


@settings(deadline=None)
@given(st.text(st.characters(codec="utf-8", exclude_characters="\x00")))
def test_string_round_trip(text):
    data = encode_string(text)
    assert decode_string(data, 0, len(data)) == (text, len(data))


def test_string_length_prefix():
    assert encode_string("é") == b"\x00\x02\xc3\xa9"


def test_string_too_long_to_encode():
    with pytest.raises(ValueError):
        encode_string("a" * 65_536)


def test_string_longest_encodes():
    assert len(encode_string("a" * 65_535)) == 65_537


@pytest.mark.parametrize("data", [b"", b"\x00", b"\x00\x05abc"])
def test_string_truncated(data):
    with pytest.raises(MQTTProtocolError) as info:
        decode_string(data, 0, len(data))
    assert info.value.reason_code == ReasonCode.MALFORMED_PACKET


def test_string_stops_at_packet_end():
    data = encode_string("abc")
    with pytest.raises(MQTTProtocolError) as info:
        decode_string(data, 0, len(data) - 1)
    assert info.value.reason_code == ReasonCode.MALFORMED_PACKET


# --- binary data ------------------------------------------------------------------------------


@settings(deadline=None)
@given(st.binary(max_size=300))
def test_binary_round_trip(data):
    encoded = encode_binary(data)
    assert decode_binary(encoded, 0, len(encoded)) == (data, len(encoded))


@pytest.mark.parametrize("data", [b"\x00", b"\xff\xfe", b"\xc0\xaf", b"\xed\xa0\x80"])
def test_binary_not_utf8_checked(data):
    encoded = encode_binary(data)
    assert decode_binary(encoded, 0, len(encoded)) == (data, len(encoded))


def test_binary_too_long_to_encode():
    with pytest.raises(ValueError):
        encode_binary(b"\x00" * 65_536)


@pytest.mark.parametrize("data", [b"", b"\x00", b"\x00\x03ab"])
def test_binary_truncated(data):
    with pytest.raises(MQTTProtocolError) as info:
        decode_binary(data, 0, len(data))
    assert info.value.reason_code == ReasonCode.MALFORMED_PACKET
