"""Fuzzing PacketDecoder: random and mutated input raises MQTTProtocolError and nothing else.

Each test feeds its bytes in a random chunking. Any exception other than MQTTProtocolError
fails the test. Packets that the decoder does return must encode and decode back to themselves.
"""

from __future__ import annotations

import pytest
from codec_strategies import (
    FUZZ_SETTINGS,
    VERSIONS,
    cut_lists,
    mutate,
    mutations,
    packets,
    split_chunks,
)
from hypothesis import given
from hypothesis import strategies as st

from ironshadow.mqtt import Connect, MQTTProtocolError, Packet, PacketDecoder

_VERSION_PAIRS = [(decoder, stream) for decoder in VERSIONS for stream in VERSIONS]


def feed_until_error(decoder: PacketDecoder, data: bytes, cuts: list[int]) -> list[Packet]:
    """Feed ``data`` in chunks and return the packets decoded before the first protocol error."""
    decoded: list[Packet] = []
    try:
        for chunk in split_chunks(data, cuts):
            decoded.extend(decoder.feed(chunk))
    except MQTTProtocolError:
        pass
    return decoded


def check_re_encodes(decoded: list[Packet], version: int) -> None:
    """Assert that each decoded packet survives encode and decode with the version it had."""
    for packet in decoded:
        again = PacketDecoder(version=version).feed(packet.encode(version))
        assert again == [packet]
        if isinstance(packet, Connect):
            version = packet.protocol_level


@pytest.mark.parametrize("version", VERSIONS)
@FUZZ_SETTINGS
@given(data=st.binary(max_size=300), cuts=cut_lists)
def test_random_bytes(version, data, cuts):
    decoded = feed_until_error(PacketDecoder(version=version), data, cuts)
    check_re_encodes(decoded, version)


@pytest.mark.parametrize("version", VERSIONS)
@FUZZ_SETTINGS
@given(
    body=st.binary(max_size=120),
    first_byte=st.integers(0, 255),
    cuts=cut_lists,
)
def test_random_body_framed(version, body, first_byte, cuts):
    # Random bodies behind a correct fixed header reach the per-type decoders far more often
    # than fully random bytes do.
    data = bytes((first_byte, len(body))) + body
    decoded = feed_until_error(PacketDecoder(version=version), data, cuts)
    check_re_encodes(decoded, version)


@pytest.mark.parametrize(("decoder_version", "stream_version"), _VERSION_PAIRS)
@FUZZ_SETTINGS
@given(data=st.data())
def test_mutated_packets(decoder_version, stream_version, data):
    items = data.draw(st.lists(packets(stream_version), min_size=1, max_size=3))
    stream = b"".join(packet.encode(stream_version) for packet in items)
    mutated = mutate(stream, data.draw(mutations))
    decoder = PacketDecoder(version=decoder_version)
    decoded = feed_until_error(decoder, mutated, data.draw(cut_lists))
    check_re_encodes(decoded, decoder_version)


@pytest.mark.parametrize("version", VERSIONS)
@FUZZ_SETTINGS
@given(data=st.data())
def test_mutated_after_connect(version, data):
    # A valid CONNECT first makes the decoder switch versions before the damaged bytes arrive.
    connect = Connect("fuzz", protocol_level=version).encode()
    items = data.draw(st.lists(packets(version), min_size=1, max_size=3))
    stream = b"".join(packet.encode(version) for packet in items)
    mutated = connect + mutate(stream, data.draw(mutations))
    start = data.draw(st.sampled_from(VERSIONS))
    decoded = feed_until_error(PacketDecoder(version=start), mutated, data.draw(cut_lists))
    check_re_encodes(decoded, start)


@pytest.mark.parametrize("version", VERSIONS)
@FUZZ_SETTINGS
@given(data=st.data())
def test_buffer_below_max_size(version, data):
    # Whatever arrives, the decoder never keeps a partial packet as large as its maximum.
    max_size = data.draw(st.integers(8, 64))
    items = data.draw(st.lists(packets(version), max_size=3))
    stream = b"".join(packet.encode(version) for packet in items)
    stream = mutate(stream + data.draw(st.binary(max_size=80)), data.draw(mutations))
    decoder = PacketDecoder(max_packet_size=max_size, version=version)
    try:
        for chunk in split_chunks(stream, data.draw(cut_lists)):
            decoder.feed(chunk)
    except MQTTProtocolError:
        return
    assert decoder.buffered < max_size
