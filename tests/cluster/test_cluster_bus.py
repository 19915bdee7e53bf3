"""The bus frames that carry REST shadow requests and their replies, decoded without sockets."""

from __future__ import annotations

import pytest

from ironshadow.cluster import bus


def frames_received(*chunks: bytes) -> list[tuple[int, int, bytes]]:
    """Feed ``chunks`` to an inbound link; return each frame's sender, kind and rest of body."""
    received: list[tuple[int, int, bytes]] = []

    def on_frame(link: bus.InboundLink, kind: int, body: bytearray, pos: int, end: int) -> None:
        assert link.peer is not None
        received.append((link.peer, kind, bytes(body[pos:end])))

    link = bus.InboundLink(on_frame, lambda _link: None)
    for chunk in chunks:
        link.data_received(chunk)
    return received


@pytest.mark.parametrize("operation", bus.HTTP_OPERATIONS)
@pytest.mark.parametrize("shadow_name", [None, "firmware"])
def test_http_call_round_trip(operation: str, shadow_name: str | None) -> None:
    body = bus.encode_http_call(70_000, operation, "press-7", shadow_name, b'{"state": {}}')
    data = bus.frame(bus.HELLO, (2).to_bytes(2, "big")) + bus.frame(bus.HTTP_CALL, body)
    # Split inside the second frame: the link waits for the rest of it.
    received = frames_received(data[:12], data[12:])
    assert received == [(2, bus.HTTP_CALL, body)]
    decoded = bus.decode_http_call(body, 0, len(body))
    assert decoded == (70_000, operation, "press-7", shadow_name, b'{"state": {}}')


def test_http_call_keeps_empty_body() -> None:
    body = bus.encode_http_call(1, "get", "t", None, b"")
    assert bus.decode_http_call(body, 0, len(body)) == (1, "get", "t", None, b"")


@pytest.mark.parametrize("retry_after", [None, 1, 600])
def test_http_reply_round_trip(retry_after: int | None) -> None:
    body = bus.encode_http_reply(2**32 - 1, 409, retry_after, b'{"code": 409}')
    # Decoded at an offset, as a frame handler gets it inside the link's buffer.
    padded = b"xxxx" + body + b"yy"
    assert bus.decode_http_reply(padded, 4, 4 + len(body)) == (
        2**32 - 1,
        409,
        retry_after,
        b'{"code": 409}',
    )
