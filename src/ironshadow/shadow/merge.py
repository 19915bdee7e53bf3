"""Merge the desired or reported object of an update into the stored one.

Merge rules (AWS IoT Device Shadow):

* objects merge key by key, and keys that the update does not name keep their values;
* ``null`` deletes a key, and a ``null`` for a missing key changes nothing;
* scalars and arrays replace the stored value whole, an object replaces a scalar or an
  array, and a scalar replaces an object;
* a new subtree is stored without its ``null`` members;
* objects that end up empty are removed, recursively. AWS documents no rule for them.
  IronShadow removes them, which matches the one behaviour seen on AWS (a section emptied
  by nulls disappears).

The same walk merges the metadata. A metadata node is either an int, the epoch-second
timestamp of every leaf below that point, or a dict with one node for each key of the
matching state object. An array is always replaced whole, so one int serves all of its
elements. Most devices report all their values at once, so a section's node is usually a
single int.

The walk visits every value of the update, so it also enforces the two checks that need to
see them all: the nesting depth and the ban on ``null`` inside arrays. Depth counts
non-empty objects and arrays only, the desired or reported object being level 1.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .errors import NULL_IN_ARRAY, ShadowError, too_deep

MetadataNode = int | dict[str, Any]


def merge_object(
    base: dict[str, Any],
    patch: dict[str, Any],
    metadata: MetadataNode,
    now: int,
    level: int,
    max_depth: int,
) -> MetadataNode:
    """Merge ``patch`` into ``base`` in place and return the metadata node of the result.

    ``base`` must be an object that the caller owns (it is changed), ``metadata`` its
    metadata node, and ``level`` the nesting level of ``patch``. Raises ShadowError 400 for
    a level above ``max_depth`` or a null inside an array. ``base`` may be left half merged
    when it raises.
    """
    child_level = level + 1
    # Keys of base whose whole value now dates from ``now``, counted so that the usual case
    # (every key sent again) needs no per-key metadata. Keys merged into an older object
    # are listed in ``merged`` instead, and keys that an empty object left as they were in
    # ``unchanged``.
    stamped = 0
    merged: dict[str, MetadataNode] | None = None
    unchanged: set[str] | None = None
    for key, value in patch.items():
        if value is None:
            base.pop(key, None)
            continue
        kind = type(value)
        if kind is dict:
            old = base.get(key)
            if not value:
                # An empty object changes nothing in a stored object. Anywhere else it
                # replaces the value and is then pruned, so the key goes.
                if type(old) is dict:
                    if unchanged is None:
                        unchanged = set()
                    unchanged.add(key)
                else:
                    base.pop(key, None)
                continue
            if child_level > max_depth:
                raise too_deep(max_depth)
            if type(old) is dict:
                old_node = metadata.get(key, now) if type(metadata) is dict else metadata
                node = merge_object(old, value, old_node, now, child_level, max_depth)
                if not old:
                    del base[key]
                elif node == now:
                    stamped += 1
                else:
                    if merged is None:
                        merged = {}
                    merged[key] = node
                continue
            value = copy_without_nulls(value, child_level, max_depth)
            if not value:
                base.pop(key, None)
                continue
        elif kind is list and value:
            check_array(value, child_level, max_depth)
        base[key] = value
        stamped += 1

    if stamped == len(base) or metadata == now:
        # Either every leaf was just written, or the untouched ones date from ``now`` too.
        return now
    return _combined_metadata(base, patch, metadata, now, merged, unchanged)


def _combined_metadata(
    base: dict[str, Any],
    patch: dict[str, Any],
    metadata: MetadataNode,
    now: int,
    merged: dict[str, MetadataNode] | None,
    unchanged: set[str] | None,
) -> MetadataNode:
    """Build the node of a merged object from old and new nodes, collapsing uniform trees."""
    old_is_int = type(metadata) is int
    old_nodes: Any = metadata  # a dict unless old_is_int
    nodes: dict[str, MetadataNode] = {}
    uniform = True
    first: MetadataNode | None = None
    for key in base:
        if merged is not None and key in merged:
            node = merged[key]
        elif key in patch and (unchanged is None or key not in unchanged):
            node = now
        elif old_is_int:
            node = metadata
        else:
            # A dict node has every key of its object; ``now`` only guards the invariant.
            node = old_nodes.get(key, now)
        nodes[key] = node
        if first is None:
            first = node
        elif uniform and (type(node) is not int or node != first):
            uniform = False
    if uniform and type(first) is int:
        return first
    return nodes


def copy_without_nulls(value: dict[str, Any], level: int, max_depth: int) -> dict[str, Any]:
    """Copy a new subtree without its null members and empty objects, checking its depth.

    ``value`` is a non-empty object at ``level``, which the caller has checked.
    """
    child_level = level + 1
    copy: dict[str, Any] = {}
    for key, item in value.items():
        if item is None:
            continue
        kind = type(item)
        if kind is dict:
            if not item:
                continue
            if child_level > max_depth:
                raise too_deep(max_depth)
            item = copy_without_nulls(item, child_level, max_depth)
            if not item:
                continue
        elif kind is list and item:
            check_array(item, child_level, max_depth)
        copy[key] = item
    return copy


def check_array(items: Iterable[Any], level: int, max_depth: int) -> None:
    """Check a non-empty array at ``level``: its depth, and no null anywhere inside it.

    Arrays are stored as given, so a null member of an object inside an array would be
    stored as a value rather than delete anything. It is rejected like a null element.
    The members of an object inside an array are checked through the same function.
    """
    if level > max_depth:
        raise too_deep(max_depth)
    child_level = level + 1
    for item in items:
        if item is None:
            raise ShadowError(400, NULL_IN_ARRAY)
        kind = type(item)
        if kind is dict:
            if item:
                check_array(item.values(), child_level, max_depth)
        elif kind is list and item:
            check_array(item, child_level, max_depth)


def prune(value: dict[str, Any]) -> dict[str, Any]:
    """Copy a stored object without null members and empty objects (no limits checked)."""
    copy: dict[str, Any] = {}
    for key, item in value.items():
        if item is None:
            continue
        if type(item) is dict:
            item = prune(item)
            if not item:
                continue
        copy[key] = item
    return copy
