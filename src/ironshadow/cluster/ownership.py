"""Ownership of thing names and client ids by the workers of one engine.

``owner_of(name, workers)`` is the CRC-32 (``zlib.crc32``, the IEEE 802.3 polynomial used by
zip and PNG) of the name's UTF-8 bytes, taken modulo the number of workers. It depends only on
the name and the worker count, never on ``PYTHONHASHSEED`` or the process, so every worker, a
restarted worker and any tool outside the engine compute the same owner.
"""

from __future__ import annotations

import zlib


def owner_of(name: str, workers: int) -> int:
    """Return the index (0 to ``workers - 1``) of the worker that owns ``name``.

    A device whose client id is its thing name is served entirely by this worker: its
    connection is passed there at CONNECT, and its shadow lives there.
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    return zlib.crc32(name.encode("utf-8")) % workers
