"""Metadata trees: from the compact stored form to AWS's per-leaf form, and back.

AWS gives every leaf of desired and reported a ``{"timestamp": T}`` object in the same
position, and every array element one of its own (an object inside an array gets one per
member, as AWS's Greengrass shadow manager does). IronShadow stores a compact node instead,
described in ``merge``: an int for a subtree whose leaves share one timestamp, or a dict of
nodes. A shadow keeps a dict node serialised as JSON bytes to save memory.
"""

from __future__ import annotations

from typing import Any

import orjson

from .jsonbytes import dumps_exact
from .merge import MetadataNode

# A shadow stores a section's node as the int itself or as the JSON bytes of a dict node.
StoredNode = int | bytes


def store_node(node: MetadataNode) -> StoredNode:
    return node if type(node) is int else dumps_exact(node)


def load_node(stored: StoredNode) -> MetadataNode:
    return stored if isinstance(stored, int) else orjson.loads(stored)


def stamp_tree(value: Any, stamp: dict[str, int]) -> Any:
    """Give every leaf, array element and null of ``value`` the same ``stamp`` object.

    This is the metadata of an update/accepted message, which covers exactly the fields
    that the request sent; a null gets a bare ``{"timestamp": T}``. The stamp object is
    shared, which orjson serialises without trouble.
    """
    kind = type(value)
    if kind is dict:
        stamped = {}
        for key, item in value.items():
            # Leaves are tested inline: a call per leaf would cost more than the rest.
            item_kind = type(item)
            if item_kind is dict or item_kind is list:
                stamped[key] = stamp_tree(item, stamp)
            else:
                stamped[key] = stamp
        return stamped
    if kind is list:
        return [stamp_tree(item, stamp) for item in value]
    return stamp


def expand_node(value: Any, node: MetadataNode) -> Any:
    """Build AWS's per-leaf metadata for ``value`` from its compact node."""
    if isinstance(node, int):
        return stamp_tree(value, {"timestamp": node})
    if type(value) is not dict:
        # A dict node always belongs to an object; take its latest time if it does not.
        return stamp_tree(value, {"timestamp": _latest(node)})
    return {key: expand_node(item, node.get(key, 0)) for key, item in value.items()}


def collapse_metadata(value: Any, metadata: Any, default: int) -> MetadataNode:
    """Build the compact node for ``value`` from AWS's per-leaf ``metadata``.

    A leaf without a usable ``{"timestamp": int}`` gets ``default``. The elements of an
    array share one node, so the array gets the latest of their timestamps.
    """
    kind = type(value)
    if kind is dict:
        members = metadata if type(metadata) is dict else {}
        nodes = {
            key: collapse_metadata(item, members.get(key), default) for key, item in value.items()
        }
        first = next(iter(nodes.values()), default)
        if type(first) is int and all(type(n) is int and n == first for n in nodes.values()):
            return first
        return nodes
    latest = _latest_timestamp(metadata)
    return default if latest is None else latest


def _latest_timestamp(metadata: Any) -> int | None:
    """Return the latest ``{"timestamp": int}`` found in per-leaf metadata, or None."""
    if type(metadata) is dict:
        timestamp = metadata.get("timestamp")
        if type(timestamp) is int and len(metadata) == 1:
            return timestamp
        found = [_latest_timestamp(item) for item in metadata.values()]
    elif type(metadata) is list:
        found = [_latest_timestamp(item) for item in metadata]
    else:
        return None
    return max((item for item in found if item is not None), default=None)


def _latest(node: MetadataNode) -> int:
    if isinstance(node, int):
        return node
    return max((_latest(child) for child in node.values()), default=0)
