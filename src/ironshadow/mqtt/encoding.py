"""Primitive data types of MQTT: integers, variable byte integers, strings and binary data.

Decoders take a buffer, a start offset and the end of the packet, and return the value with
the offset that follows it. Every overrun of the packet end is a malformed packet.
"""

from __future__ import annotations

from .constants import MAX_STRING_LENGTH, MAX_VARIABLE_BYTE_INTEGER
from .errors import malformed

_VBI_CACHE = [bytes([n]) for n in range(128)]


def encode_vbi(value: int) -> bytes:
    """Encode a variable byte integer in the fewest bytes [MQTT-1.5.5-1]."""
    if value < 128:
        if value < 0:
            raise ValueError(f"variable byte integer must not be negative, got {value}")
        return _VBI_CACHE[value]
    if value > MAX_VARIABLE_BYTE_INTEGER:
        raise ValueError(
            f"variable byte integer {value} exceeds the maximum {MAX_VARIABLE_BYTE_INTEGER}"
        )
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode_vbi(buffer: bytes | bytearray, pos: int, end: int) -> tuple[int, int]:
    """Decode a variable byte integer of at most 4 bytes."""
    value = 0
    shift = 0
    for _ in range(4):
        if pos >= end:
            raise malformed("variable byte integer runs past the end of the packet")
        byte = buffer[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise malformed("variable byte integer is longer than 4 bytes")


def decode_uint16(buffer: bytes | bytearray, pos: int, end: int) -> tuple[int, int]:
    if pos + 2 > end:
        raise malformed("two-byte integer runs past the end of the packet")
    return (buffer[pos] << 8) | buffer[pos + 1], pos + 2


def decode_uint32(buffer: bytes | bytearray, pos: int, end: int) -> tuple[int, int]:
    if pos + 4 > end:
        raise malformed("four-byte integer runs past the end of the packet")
    return int.from_bytes(buffer[pos : pos + 4], "big"), pos + 4


def decode_binary(buffer: bytes | bytearray, pos: int, end: int) -> tuple[bytes, int]:
    if pos + 2 > end:
        raise malformed("length of binary data runs past the end of the packet")
    length = (buffer[pos] << 8) | buffer[pos + 1]
    pos += 2
    if pos + length > end:
        raise malformed(f"binary data of {length} bytes runs past the end of the packet")
    return bytes(buffer[pos : pos + length]), pos + length


def decode_string(buffer: bytes | bytearray, pos: int, end: int) -> tuple[str, int]:
    """Decode a UTF-8 string, rejecting ill-formed UTF-8, surrogates and U+0000.

    Python's UTF-8 codec already rejects overlong forms and encoded surrogates
    [MQTT-1.5.4-1]; U+0000 is checked here [MQTT-1.5.4-2].
    """
    if pos + 2 > end:
        raise malformed("length of UTF-8 string runs past the end of the packet")
    length = (buffer[pos] << 8) | buffer[pos + 1]
    pos += 2
    stop = pos + length
    if stop > end:
        raise malformed(f"UTF-8 string of {length} bytes runs past the end of the packet")
    raw = buffer[pos:stop]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise malformed(
            f"string is not well-formed UTF-8: {exc.reason} at byte {exc.start}"
        ) from exc
    if "\x00" in text:
        raise malformed("string contains the null character U+0000")
    return text, stop


def encode_string(text: str) -> bytes:
    data = text.encode("utf-8")
    length = len(data)
    if length > MAX_STRING_LENGTH:
        raise ValueError(f"UTF-8 string of {length} bytes exceeds {MAX_STRING_LENGTH} bytes")
    return length.to_bytes(2, "big") + data


def encode_binary(data: bytes) -> bytes:
    length = len(data)
    if length > MAX_STRING_LENGTH:
        raise ValueError(f"binary data of {length} bytes exceeds {MAX_STRING_LENGTH} bytes")
    return length.to_bytes(2, "big") + data
