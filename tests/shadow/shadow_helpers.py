"""Helpers shared by the shadow tests: requests as dicts, and strict JSON comparisons."""

from __future__ import annotations

from typing import Any

import orjson

from ironshadow.shadow import Shadow, UpdateResult, apply_update

# An arbitrary epoch second for initial shadows; requests run at later times.
T0 = 1_700_000_000


def update(current: Shadow | None, request: Any, now: int = T0 + 10) -> UpdateResult:
    """Apply an update given as a JSON-able value."""
    return apply_update(current, orjson.dumps(request), now)


def shadow(state: dict[str, Any] | None, version: int = 1, timestamp: int = T0) -> Shadow:
    return Shadow.from_state(state, version, timestamp=timestamp)


def canonical(value: Any) -> bytes:
    """Serialise with sorted keys, so that 1 and 1.0 or True and 1 stay different."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def assert_json_equal(actual: Any, expected: Any) -> None:
    assert canonical(actual) == canonical(expected), f"{actual!r} != {expected!r}"


def assert_partial(actual: Any, expected: Any, path: str = "$") -> None:
    """Check that ``actual`` contains ``expected``; the string "$ts" matches any integer.

    Objects may have extra members; arrays must have the same length.
    """
    if expected == "$ts":
        assert type(actual) is int, f"{path}: expected an integer timestamp, got {actual!r}"
        return
    if type(expected) is dict:
        assert type(actual) is dict, f"{path}: expected an object, got {actual!r}"
        for key, value in expected.items():
            assert key in actual, f"{path}: missing member {key!r} in {actual!r}"
            assert_partial(actual[key], value, f"{path}.{key}")
        return
    if type(expected) is list:
        assert type(actual) is list, f"{path}: expected an array, got {actual!r}"
        assert len(actual) == len(expected), f"{path}: {actual!r} != {expected!r}"
        for index, (item, want) in enumerate(zip(actual, expected, strict=True)):
            assert_partial(item, want, f"{path}[{index}]")
        return
    assert canonical(actual) == canonical(expected), f"{path}: {actual!r} != {expected!r}"
