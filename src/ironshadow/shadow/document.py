"""The stored shadow: a compact, immutable record per thing and shadow name.

A shadow keeps desired and reported as their compact JSON bytes, which is also the form
whose size AWS limits. It keeps each section's metadata as a compact node (see ``merge``):
an int when all its leaves share one timestamp, else the JSON bytes of a dict of nodes.
Nothing is decoded until a request needs it, and a typical small shadow costs about 480
bytes of resident memory, its map entry included (``benchmarks/shadow_memory.py``).

A tombstone is a deleted shadow that keeps its version, so that an update within the
retention time (48 hours on AWS) continues from it instead of starting again at 1.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from .delta import compute_delta, has_delta
from .jsonbytes import dumps_exact
from .merge import MetadataNode, prune
from .metadata import StoredNode, collapse_metadata, expand_node, load_node, store_node

_SECTIONS = ("desired", "reported")


class Shadow:
    """One shadow document: version, desired and reported state, and their metadata.

    Instances are not changed after construction; an update builds a new one. Build them
    with ``from_state``, ``from_document`` or ``apply_update``.
    """

    __slots__ = (
        "_desired",
        "_desired_metadata",
        "_reported",
        "_reported_metadata",
        "deleted",
        "has_delta",
        "version",
    )

    version: int
    deleted: bool
    has_delta: bool
    _desired: bytes | None
    _reported: bytes | None
    _desired_metadata: StoredNode | None
    _reported_metadata: StoredNode | None

    def __init__(
        self,
        version: int,
        desired: bytes | None,
        reported: bytes | None,
        desired_metadata: StoredNode | None,
        reported_metadata: StoredNode | None,
        has_delta: bool,
        deleted: bool = False,
    ) -> None:
        # Low-level: the arguments must already be consistent (compact JSON of non-empty
        # objects, matching metadata nodes, has_delta computed from both).
        self.version = version
        self._desired = desired
        self._reported = reported
        self._desired_metadata = desired_metadata
        self._reported_metadata = reported_metadata
        self.has_delta = has_delta
        self.deleted = deleted

    @classmethod
    def from_state(
        cls,
        state: Any,
        version: Any,
        deleted: bool = False,
        timestamp: int | None = None,
    ) -> Shadow:
        """Build a shadow whose every leaf was last updated at ``timestamp``.

        ``state`` is ``{"desired"?: {...}, "reported"?: {...}}``; null members and empty
        objects are dropped. ``timestamp`` defaults to the current time. With
        ``deleted=True`` the result is a tombstone and ``state`` must be empty or None.
        Raises ValueError for a malformed state or version.
        """
        if type(version) is not int or version < 0:
            raise ValueError(f"version must be a non-negative integer, got {version!r}")
        if timestamp is None:
            timestamp = int(time.time())
        if deleted:
            if state:
                raise ValueError("a deleted shadow (tombstone) has no state")
            return cls(version, None, None, None, None, False, deleted=True)
        sections = _check_state(state)
        desired = sections.get("desired")
        reported = sections.get("reported")
        return cls(
            version,
            dumps_exact(desired) if desired else None,
            dumps_exact(reported) if reported else None,
            timestamp if desired else None,
            timestamp if reported else None,
            has_delta(desired, reported) if desired else False,
        )

    @classmethod
    def from_document(cls, document: Any) -> Shadow:
        """Build a shadow from a document that ``document()`` returned (delta is ignored).

        Leaves without metadata get the document's ``timestamp``. An array keeps one
        timestamp for all its elements, the latest. Raises ValueError for a malformed
        document.
        """
        if type(document) is not dict:
            raise ValueError(f"a shadow document must be an object, got {document!r}")
        version = document.get("version")
        default = document.get("timestamp")
        if type(default) is not int:
            default = 0
        state = document.get("state") or {}
        if type(state) is dict:
            state = {key: value for key, value in state.items() if key != "delta"}
        sections = _check_state(state)
        metadata = document.get("metadata")
        if type(metadata) is not dict:
            metadata = {}
        desired = sections.get("desired")
        reported = sections.get("reported")
        shadow = cls.from_state(sections, version, timestamp=default)
        if desired:
            node = collapse_metadata(desired, metadata.get("desired"), default)
            shadow._desired_metadata = store_node(node)
        if reported:
            node = collapse_metadata(reported, metadata.get("reported"), default)
            shadow._reported_metadata = store_node(node)
        return shadow

    def __repr__(self) -> str:
        if self.deleted:
            return f"Shadow(version={self.version}, deleted=True)"
        return f"Shadow(version={self.version}, state={self.state()!r})"

    @property
    def state_bytes(self) -> int:
        """Bytes of compact JSON of desired plus reported, the size that the limit counts."""
        return len(self._desired or b"") + len(self._reported or b"")

    def desired(self) -> dict[str, Any] | None:
        """Decode the desired section (None when there is none)."""
        return orjson.loads(self._desired) if self._desired is not None else None

    def reported(self) -> dict[str, Any] | None:
        """Decode the reported section (None when there is none)."""
        return orjson.loads(self._reported) if self._reported is not None else None

    def state(self) -> dict[str, Any]:
        """Decode the state as ``{"desired"?: {...}, "reported"?: {...}}``."""
        state: dict[str, Any] = {}
        if self._desired is not None:
            state["desired"] = orjson.loads(self._desired)
        if self._reported is not None:
            state["reported"] = orjson.loads(self._reported)
        return state

    def metadata(self) -> dict[str, Any]:
        """Build AWS's per-leaf metadata: ``{"desired"?: ..., "reported"?: ...}``."""
        return self._metadata_for(self.desired(), self.reported())

    def delta(self) -> dict[str, Any] | None:
        """Compute the delta of desired against reported, or None when it is empty."""
        if not self.has_delta:
            return None
        return compute_delta(self.desired() or {}, self.reported())

    def document(self, now: int) -> dict[str, Any]:
        """Build the full document as get/accepted carries it, without clientToken.

        Raises ValueError for a tombstone, which has no document; callers check ``deleted``.
        """
        if self.deleted:
            raise ValueError(f"shadow version {self.version} is deleted and has no document")
        return self._document(self.desired(), self.reported(), now)

    def delta_payload(self, now: int, client_token: str | None = None) -> bytes | None:
        """Serialise the update/delta message, or return None when the delta is empty.

        The engine also sends it to a device that reconnects, so that it catches up.
        """
        if not self.has_delta:
            return None
        return self._delta_payload(self.desired(), self.reported(), now, client_token)

    # The helpers below take sections that the caller already decoded, so that an update
    # serialises its replies without decoding the sections again.

    def _metadata_for(
        self, desired: dict[str, Any] | None, reported: dict[str, Any] | None
    ) -> dict[str, Any]:
        metadata: dict[str, Any] = {}
        if desired is not None:
            metadata["desired"] = expand_node(desired, self._desired_node())
        if reported is not None:
            metadata["reported"] = expand_node(reported, self._reported_node())
        return metadata

    def _document(
        self, desired: dict[str, Any] | None, reported: dict[str, Any] | None, now: int
    ) -> dict[str, Any]:
        state: dict[str, Any] = {}
        if desired is not None:
            state["desired"] = desired
        if reported is not None:
            state["reported"] = reported
        metadata = self._metadata_for(desired, reported)
        if self.has_delta and desired is not None:
            delta = compute_delta(desired, reported)
            state["delta"] = delta
            metadata["delta"] = expand_node(delta, self._desired_node())
        return {"state": state, "metadata": metadata, "version": self.version, "timestamp": now}

    def _versioned_state(
        self, desired: dict[str, Any] | None, reported: dict[str, Any] | None
    ) -> dict[str, Any]:
        """Build one side of update/documents: state, metadata and version."""
        state: dict[str, Any] = {}
        if desired is not None:
            state["desired"] = desired
        if reported is not None:
            state["reported"] = reported
        return {
            "state": state,
            "metadata": self._metadata_for(desired, reported),
            "version": self.version,
        }

    def _delta_payload(
        self,
        desired: dict[str, Any] | None,
        reported: dict[str, Any] | None,
        now: int,
        client_token: str | None,
    ) -> bytes | None:
        if not self.has_delta or desired is None:
            return None
        delta = compute_delta(desired, reported)
        message: dict[str, Any] = {
            "state": delta,
            "metadata": expand_node(delta, self._desired_node()),
            "version": self.version,
            "timestamp": now,
        }
        if client_token is not None:
            message["clientToken"] = client_token
        return dumps_exact(message)

    def _desired_node(self) -> MetadataNode:
        return load_node(self._desired_metadata) if self._desired_metadata is not None else 0

    def _reported_node(self) -> MetadataNode:
        return load_node(self._reported_metadata) if self._reported_metadata is not None else 0


def _check_state(state: Any) -> dict[str, dict[str, Any]]:
    """Check a state given to a constructor and return its sections, pruned."""
    if state is None:
        return {}
    if type(state) is not dict:
        raise ValueError(f"state must be an object or None, got {state!r}")
    sections: dict[str, dict[str, Any]] = {}
    for key, value in state.items():
        if key not in _SECTIONS:
            raise ValueError(f"state may contain only 'desired' and 'reported', got {key!r}")
        if value is None:
            continue
        if type(value) is not dict:
            raise ValueError(f"state[{key!r}] must be an object or None, got {value!r}")
        value = prune(value)
        if value:
            sections[key] = value
    return sections
