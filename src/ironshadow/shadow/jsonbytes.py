"""JSON serialisation for bytes that may be kept: stored sections and reply payloads."""

from __future__ import annotations

from typing import Any

import orjson


def dumps_exact(value: Any) -> bytes:
    """Serialise ``value`` to compact JSON bytes whose memory block fits their length.

    orjson 3.13 returns a bytes object whose memory block is rounded up (4 KB for a small
    document, measured with tracemalloc) and never shrunk. A million stored shadows would
    keep gigabytes of unused memory, and so would reply payloads queued for offline
    devices. Joining with an empty bytes copies the data into an exactly sized object,
    which costs about 0.04 µs for a small document.
    """
    return b"".join((orjson.dumps(value), b""))
