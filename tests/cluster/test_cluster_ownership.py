"""owner_of: the stable hash that decides which worker owns a client id or thing name."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import pytest

from ironshadow.cluster import owner_of

NAMES = ["device-1", "thermostat-42", "über", "", "a/b", "x" * 200]


def test_owner_of_is_crc32_modulo_workers() -> None:
    # 0xCBF43926 is the published CRC-32 check value of the ASCII digits 1 to 9.
    assert owner_of("123456789", 1_000_000_007) == 0xCBF43926 % 1_000_000_007
    assert owner_of("device-1", 3) == 3073368697 % 3
    assert owner_of("thermostat-42", 7) == 1659595470 % 7


def test_owner_of_encodes_utf8() -> None:
    # CRC-32 of the UTF-8 bytes c3 bc 62 65 72, not of Latin-1 or UTF-16.
    assert owner_of("\u00fcber", 1_000_003) == 3537962120 % 1_000_003


def test_owner_of_one_worker_owns_all() -> None:
    for name in NAMES:
        assert owner_of(name, 1) == 0


def test_owner_of_stays_in_range() -> None:
    for workers in (2, 3, 5, 16):
        for number in range(500):
            assert 0 <= owner_of(f"thing-{number}", workers) < workers


def test_owner_of_spreads_names() -> None:
    counts = Counter(owner_of(f"device-{number}", 3) for number in range(3000))
    assert set(counts) == {0, 1, 2}
    for worker, count in counts.items():
        assert 800 < count < 1200, f"worker {worker} owns {count} of 3000 names"


def test_owner_of_ignores_hash_seed() -> None:
    script = (
        f"from ironshadow.cluster import owner_of; print([owner_of(name, 5) for name in {NAMES!r}])"
    )
    outputs = set()
    for seed in ("1", "2", "12345"):
        result = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
            check=True,
        )
        outputs.add(result.stdout.strip())
    assert outputs == {str([owner_of(name, 5) for name in NAMES])}


def test_owner_of_rejects_zero_workers() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        owner_of("device-1", 0)
