"""The delta: the parts of desired that reported does not match yet.

The delta walks every key of desired. A key missing from reported is in the delta with its
whole desired value. Two objects are compared key by key, and the key is kept only if
something below it differs, so the delta keeps the path from the root. Any other pair is
compared as whole JSON values, arrays included (order matters), and the desired value is
kept if they differ. Keys that only reported contains never appear.

JSON equality: numbers compare by value (``1 == 1.0``), but a number never equals a string
(``21 != "21"``) and a boolean is not a number (``true != 1``), unlike Python's ``==``.
"""

from __future__ import annotations

from typing import Any

_MISSING: Any = object()


def json_equal(a: Any, b: Any) -> bool:
    """Compare two decoded JSON values by JSON rules rather than Python's."""
    kind = type(a)
    if kind is type(b):
        if kind is dict:
            if len(a) != len(b):
                return False
            for key, value in a.items():
                other = b.get(key, _MISSING)
                if other is _MISSING or not json_equal(value, other):
                    return False
            return True
        if kind is list:
            return len(a) == len(b) and all(map(json_equal, a, b))
        return a == b
    # int against float: by value. bool is its own type here, so True never equals 1.
    return (kind is int or kind is float) and (type(b) is int or type(b) is float) and a == b


def compute_delta(desired: dict[str, Any], reported: dict[str, Any] | None) -> dict[str, Any]:
    """Return the delta of ``desired`` against ``reported`` (empty when they agree).

    Values in the result are shared with ``desired``, not copied.
    """
    if not reported:
        return dict(desired)
    delta: dict[str, Any] = {}
    for key, want in desired.items():
        have = reported.get(key, _MISSING)
        if have is _MISSING:
            delta[key] = want
        elif type(want) is dict and type(have) is dict:
            below = compute_delta(want, have)
            if below:
                delta[key] = below
        elif not json_equal(want, have):
            delta[key] = want
    return delta


def has_delta(desired: dict[str, Any], reported: dict[str, Any] | None) -> bool:
    """Return whether ``compute_delta(desired, reported)`` would be non-empty.

    The walk stops at the first difference, and nothing is copied.
    """
    if not reported:
        return bool(desired)
    for key, want in desired.items():
        have = reported.get(key, _MISSING)
        if have is _MISSING:
            return True
        kind = type(want)
        if kind is dict and type(have) is dict:
            if has_delta(want, have):
                return True
        elif kind is type(have) and kind is not list and kind is not dict:
            if want != have:
                return True
        elif not json_equal(want, have):
            return True
    return False
