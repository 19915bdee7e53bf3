"""ThingIndex and ThingDirectory in memory, against stand-ins for the engine's maps."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from ironshadow.api.paging import decode_token, encode_token
from ironshadow.api.things import INSORT_MAX_NEW_NAMES, ThingDirectory, ThingIndex


@dataclass
class FakeShadow:
    version: int = 1
    deleted: bool = False
    has_delta: bool = False


@dataclass
class FakeService:
    shadows: dict[str, Any] = field(default_factory=dict)
    last_seen: dict[str, int] = field(default_factory=dict)

    def named_shadow_names(self, thing: str) -> list[str]:
        prefix = thing + "~"
        return sorted(
            key[len(prefix):]
            for key, shadow in self.shadows.items()
            if key.startswith(prefix) and not shadow.deleted
        )


def keep_all(name: str) -> bool:
    return True


def test_index_sorted_and_unique() -> None:
    service = FakeService()
    service.shadows.update({"b": FakeShadow(), "a~x": FakeShadow(), "a": FakeShadow()})
    service.last_seen.update({"c": 1, "b": 2})

    assert ThingIndex(service).names == ["a", "b", "c"]


def test_index_merges_new_names_in_place() -> None:
    service = FakeService(shadows={"m": FakeShadow()})
    index = ThingIndex(service)
    names = index.names

    service.shadows["a"] = FakeShadow()
    service.shadows["z~named"] = FakeShadow()
    service.last_seen["k"] = 1

    assert index.names is names
    assert names == ["a", "k", "m", "z"]


def test_index_merges_many_new_names() -> None:
    service = FakeService(shadows={"m": FakeShadow()})
    index = ThingIndex(service)
    index.refresh()
    new = [f"n{number:03d}" for number in range(INSORT_MAX_NEW_NAMES * 3)]
    random.Random(7).shuffle(new)

    for name in new:
        service.shadows[name] = FakeShadow()

    assert index.names == sorted([*new, "m"])


def test_index_repeated_refresh_is_stable() -> None:
    service = FakeService(shadows={"a": FakeShadow()}, last_seen={"a": 1})
    index = ThingIndex(service)

    index.refresh()
    index.refresh()
    service.last_seen["a"] = 2  # an update of an existing key adds nothing

    assert index.names == ["a"]


def test_index_rebuilds_when_map_replaced() -> None:
    service = FakeService(shadows={"old": FakeShadow()})
    index = ThingIndex(service)
    index.refresh()

    service.shadows = {"new": FakeShadow()}

    assert index.names == ["new"]


def test_index_rebuilds_when_last_key_removed() -> None:
    service = FakeService(shadows={"a": FakeShadow(), "b": FakeShadow()})
    index = ThingIndex(service)
    index.refresh()

    del service.shadows["b"]
    service.shadows["c"] = FakeShadow()

    assert index.names == ["a", "c"]


def test_index_finds_names_after_last_key_reinserted() -> None:
    service = FakeService(shadows={"a": FakeShadow(), "b": FakeShadow()})
    index = ThingIndex(service)
    index.refresh()

    service.shadows["c"] = FakeShadow()
    del service.shadows["b"]
    service.shadows["b"] = FakeShadow()

    assert index.names == ["a", "b", "c"]


def test_index_keeps_older_names_after_removal() -> None:
    service = FakeService(shadows={"a": FakeShadow(), "b": FakeShadow()})
    index = ThingIndex(service)
    index.refresh()

    del service.shadows["a"]
    service.shadows["c"] = FakeShadow()

    # "a" stays in the index as a stale name; callers filter it with their keep function.
    assert "c" in index.names


def test_page_prefix_cursor_and_end() -> None:
    names = ["a1", "b1", "b2", "b3", "b4", "c1"]
    service = FakeService(shadows={name: FakeShadow() for name in names})
    index = ThingIndex(service)

    first, cursor = index.page("b", None, 3, keep_all)
    second, last = index.page("b", cursor, 3, keep_all)

    assert first == ["b1", "b2", "b3"]
    assert cursor == "b3"
    assert second == ["b4"]
    assert last is None


def test_page_scan_limit_returns_cursor() -> None:
    names = [f"t{number:02d}" for number in range(30)]
    service = FakeService(shadows={name: FakeShadow() for name in names})
    index = ThingIndex(service)

    page, cursor = index.page("", None, 5, lambda name: name == "t25", max_scanned=10)

    assert page == []
    assert cursor == "t09"
    page, cursor = index.page("", cursor, 5, lambda name: name == "t25", max_scanned=10)
    assert page == []
    assert cursor == "t19"
    page, cursor = index.page("", cursor, 5, lambda name: name == "t25", max_scanned=10)
    assert page == ["t25"]
    assert cursor is None


def test_directory_filters_stale_and_offline() -> None:
    service = FakeService()
    service.shadows.update({"gone": FakeShadow(deleted=True), "live": FakeShadow(version=4)})
    service.shadows["named-only~cfg"] = FakeShadow()
    service.last_seen.update({"online": 100, "offline": 90})
    broker = SimpleNamespace(
        sessions={
            "online": SimpleNamespace(connection=object()),
            "offline": SimpleNamespace(connection=None),
        }
    )
    directory = ThingDirectory(service, broker)

    everything, _ = directory.list_page("", None, 10, None)
    connected, _ = directory.list_page("", True, 10, None)
    disconnected, _ = directory.list_page("", False, 10, None)

    assert [thing["name"] for thing in everything] == ["live", "named-only", "offline", "online"]
    assert [thing["name"] for thing in connected] == ["online"]
    assert [thing["name"] for thing in disconnected] == ["live", "named-only", "offline"]
    assert everything[0] == {
        "name": "live",
        "connected": False,
        "lastSeen": None,
        "version": 4,
        "pendingDelta": False,
    }
    assert everything[1]["version"] is None


def test_token_round_trip() -> None:
    for name in ["a", "press-17", "naïve", "x" * 128]:
        assert decode_token(encode_token(name)) == name
    assert encode_token(None) is None
    assert decode_token(None) is None


def test_index_large_fleet_incremental() -> None:
    count = 200_000
    service = FakeService(last_seen={f"device-{number:07d}": 0 for number in range(count)})
    index = ThingIndex(service)
    index.refresh()
    names = index.names

    started = time.perf_counter()
    for number in range(100):
        service.last_seen[f"device-{number:07d}x"] = 0
        page, cursor = index.page("device-0150", None, 100, keep_all)
    elapsed = time.perf_counter() - started

    assert index.names is names
    assert len(names) == count + 100
    assert page[0] == "device-0150000"
    assert cursor == page[-1]
    # 100 inserts and pages take milliseconds; a full re-sort per request would take
    # seconds. The bound is loose so that a slow machine still passes.
    assert elapsed < 2.0
