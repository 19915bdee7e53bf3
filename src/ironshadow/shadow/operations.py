"""Update, get and delete requests: bytes of a request in, reply payloads out.

An update is processed in a fixed order, so that the same input always gives the same
error (the order of AWS's Greengrass shadow manager, plus the checks that it skips):

1. the engine checks the thing and shadow names (``validate_thing_name`` and
   ``validate_shadow_name``);
2. an empty payload is rejected (400);
3. the payload is parsed: bytes that are not UTF-8 give 415, other bad JSON 400
   ``Invalid JSON``;
4. ``state.delta`` is dropped, because only the service computes it;
5. schema checks, 400 each: state, desired, reported, unknown keys in state, clientToken,
   version, then depth and nulls in arrays (found while merging, which changes nothing
   outside this function);
6. a ``version`` other than the stored one gives 409;
7. desired and reported are merged (see ``merge``);
8. the merged desired plus reported may hold at most ``max_state_bytes`` of compact JSON
   (413);
9. the new shadow gets the next version, even when nothing changed.

From step 3 on, every error carries the request's clientToken when it is a string, because
SDKs match rejections to requests by it.

The replies of an accepted update are built only on request (``UpdateResult``), because the
engine sends each one only when a client subscribes to its topic.
"""

from __future__ import annotations

from typing import Any

import orjson

from .delta import has_delta
from .document import Shadow
from .errors import (
    DESIRED_NOT_OBJECT,
    INVALID_CLIENT_TOKEN,
    INVALID_JSON,
    INVALID_STATE_NODE,
    INVALID_VERSION,
    MISSING_STATE,
    MISSING_UPDATE_PAYLOAD,
    PAYLOAD_TOO_LARGE,
    REPORTED_NOT_OBJECT,
    STATE_NOT_OBJECT,
    UNSUPPORTED_ENCODING,
    VERSION_CONFLICT,
    ShadowError,
    no_shadow,
)
from .jsonbytes import dumps_exact
from .limits import DEFAULT_LIMITS, ShadowLimits
from .merge import merge_object
from .metadata import StoredNode, load_node, stamp_tree, store_node

_MISSING: Any = object()
# Marks a section that the update did not decode; its dict is decoded when a reply needs it.
_NOT_DECODED: Any = object()


class UpdateResult:
    """An accepted update: the new shadow, and builders for the replies to publish.

    ``shadow`` is the new shadow to store, ``previous`` the live shadow it replaces (None
    when the update created the shadow or followed a delete), ``version`` the new version
    and ``client_token`` the request's clientToken or None.
    """

    __slots__ = (
        "_desired",
        "_reported",
        "_request_state",
        "client_token",
        "previous",
        "shadow",
        "timestamp",
        "version",
    )

    def __init__(
        self,
        shadow: Shadow,
        previous: Shadow | None,
        request_state: dict[str, Any] | None,
        client_token: str | None,
        timestamp: int,
        desired: Any,
        reported: Any,
    ) -> None:
        self.shadow = shadow
        self.previous = previous
        self.version = shadow.version
        self.client_token = client_token
        self.timestamp = timestamp
        self._request_state = request_state
        self._desired = desired
        self._reported = reported

    def accepted_payload(self) -> bytes:
        """Serialise update/accepted: the request's state as sent, nulls included, with
        metadata for exactly those fields, the new version, timestamp and clientToken."""
        state = self._request_state
        stamp = {"timestamp": self.timestamp}
        message: dict[str, Any] = {
            "state": state,
            "metadata": stamp if state is None else stamp_tree(state, stamp),
            "version": self.version,
            "timestamp": self.timestamp,
        }
        if self.client_token is not None:
            message["clientToken"] = self.client_token
        return dumps_exact(message)

    def request_section(self, name: str) -> bytes | None:
        """Serialise the request's ``desired`` or ``reported`` part as sent, nulls included,
        or return None when the request did not contain it. A request with ``"state": null``
        cleared both, so both are ``null``."""
        state = self._request_state
        if state is None:
            return b"null"
        if name not in state:
            return None
        return dumps_exact(state[name])

    def delta_payload(self) -> bytes | None:
        """Serialise update/delta with the whole current delta, or return None when it is
        empty, in which case nothing is published on update/delta."""
        if not self.shadow.has_delta:
            return None
        desired, reported = self._sections()
        return self.shadow._delta_payload(desired, reported, self.timestamp, self.client_token)

    def documents_payload(self) -> bytes:
        """Serialise update/documents: previous (null if there was no live shadow) and
        current, each with state, metadata and version, plus timestamp and clientToken."""
        previous = self.previous
        desired, reported = self._sections()
        message: dict[str, Any] = {
            "previous": None
            if previous is None
            else previous._versioned_state(previous.desired(), previous.reported()),
            "current": self.shadow._versioned_state(desired, reported),
            "timestamp": self.timestamp,
        }
        if self.client_token is not None:
            message["clientToken"] = self.client_token
        return dumps_exact(message)

    def _sections(self) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        if self._desired is _NOT_DECODED:
            self._desired = self.shadow.desired()
        if self._reported is _NOT_DECODED:
            self._reported = self.shadow.reported()
        return self._desired, self._reported


def apply_update(
    current: Shadow | None,
    payload: bytes,
    now: int,
    limits: ShadowLimits = DEFAULT_LIMITS,
) -> UpdateResult:
    """Apply an update request to ``current`` (None if the shadow never existed).

    ``now`` is the time in integer epoch seconds. Returns the accepted result; raises
    ShadowError with the code, message and clientToken of the rejection. ``current`` is
    not changed either way.
    """
    state, desired_patch, reported_patch, token, expected_version = _read_update(payload, limits)

    if current is None or current.deleted:
        # NOTE: a shadow that never existed counts as version 0 for the version check, and a
        # tombstone as its deleted version. AWS documents neither case.
        live = None
        old_version = 0 if current is None else current.version
        old_desired = old_reported = None
        old_desired_metadata = old_reported_metadata = None
    else:
        live = current
        old_version = current.version
        old_desired = current._desired
        old_reported = current._reported
        old_desired_metadata = current._desired_metadata
        old_reported_metadata = current._reported_metadata

    max_depth = limits.max_depth
    try:
        desired, desired_metadata, desired_object = _merge_section(
            old_desired, old_desired_metadata, desired_patch, now, max_depth
        )
        reported, reported_metadata, reported_object = _merge_section(
            old_reported, old_reported_metadata, reported_patch, now, max_depth
        )
    except ShadowError as error:
        error.client_token = token
        raise

    if expected_version is not _MISSING and expected_version != old_version:
        raise ShadowError(409, VERSION_CONFLICT, token)
    size = 0
    if desired is not None:
        size += len(desired)
    if reported is not None:
        size += len(reported)
    if size > limits.max_state_bytes:
        raise ShadowError(413, PAYLOAD_TOO_LARGE, token)

    # Decode an unchanged section only when the other one changed and both exist.
    if desired is None:
        delta = False
    elif reported is None:
        delta = True
    elif desired_object is _NOT_DECODED and reported_object is _NOT_DECODED:
        delta = live is not None and live.has_delta
    else:
        if desired_object is _NOT_DECODED:
            desired_object = orjson.loads(desired)
        if reported_object is _NOT_DECODED:
            reported_object = orjson.loads(reported)
        delta = has_delta(desired_object, reported_object)

    shadow = Shadow(old_version + 1, desired, reported, desired_metadata, reported_metadata, delta)
    return UpdateResult(shadow, live, state, token, now, desired_object, reported_object)


def _read_update(payload: bytes, limits: ShadowLimits) -> tuple[Any, Any, Any, str | None, Any]:
    """Parse an update and run the checks that need no stored state (steps 2 to 5).

    Returns the state (None for ``"state": null``), the desired and reported patches
    (``_MISSING`` when absent), the clientToken to echo, and the expected version
    (``_MISSING`` when absent). Depth and nulls in arrays are checked while merging.
    """
    if not payload:
        raise ShadowError(400, MISSING_UPDATE_PAYLOAD)
    request = _parse(payload)
    if type(request) is not dict:
        raise ShadowError(400, MISSING_STATE)

    client_token = request.get("clientToken")
    token = client_token if type(client_token) is str else None
    state = request.get("state", _MISSING)
    if state is _MISSING:
        raise ShadowError(400, MISSING_STATE, token)
    if state is None:
        desired_patch = reported_patch = None
    elif type(state) is not dict:
        raise ShadowError(400, STATE_NOT_OBJECT, token)
    else:
        state.pop("delta", None)
        desired_patch = state.get("desired", _MISSING)
        reported_patch = state.get("reported", _MISSING)
        if desired_patch is not _MISSING and _not_object(desired_patch):
            raise ShadowError(400, DESIRED_NOT_OBJECT, token)
        if reported_patch is not _MISSING and _not_object(reported_patch):
            raise ShadowError(400, REPORTED_NOT_OBJECT, token)
        if len(state) != (desired_patch is not _MISSING) + (reported_patch is not _MISSING):
            raise ShadowError(400, INVALID_STATE_NODE, token)

    if client_token is not None and not _valid_token(client_token, limits):
        raise ShadowError(400, INVALID_CLIENT_TOKEN, token)
    expected_version = request.get("version", _MISSING)
    if expected_version is not _MISSING and (
        type(expected_version) is not int or expected_version < 0
    ):
        raise ShadowError(400, INVALID_VERSION, token)
    return state, desired_patch, reported_patch, token, expected_version


def get_shadow(
    current: Shadow | None,
    payload: bytes,
    now: int,
    *,
    thing_name: str | None = None,
    shadow_name: str | None = None,
    limits: ShadowLimits = DEFAULT_LIMITS,
) -> bytes:
    """Build the get/accepted payload for a get request.

    ``payload`` is empty or ``{"clientToken": ...}``; other content is ignored. The names
    only go into the 404 message. Raises ShadowError 404 for a missing or deleted shadow,
    400 or 415 for a bad payload.
    """
    token = _read_client_token(payload, limits)
    if current is None or current.deleted:
        error = no_shadow(thing_name, shadow_name)
        error.client_token = token
        raise error
    document = current.document(now)
    if token is not None:
        document["clientToken"] = token
    return dumps_exact(document)


def delete_shadow(
    current: Shadow | None,
    payload: bytes,
    now: int,
    *,
    thing_name: str | None = None,
    shadow_name: str | None = None,
    limits: ShadowLimits = DEFAULT_LIMITS,
) -> tuple[Shadow, bytes]:
    """Delete a shadow: return the tombstone to store and the delete/accepted payload.

    The tombstone keeps the deleted version, which delete/accepted also carries, and the
    next update continues from it. The engine should drop tombstones after the retention
    time (48 hours on AWS), after which versions start again at 1. Raises ShadowError 404
    for a missing or deleted shadow, 400 or 415 for a bad payload.
    """
    token = _read_client_token(payload, limits)
    if current is None or current.deleted:
        error = no_shadow(thing_name, shadow_name)
        error.client_token = token
        raise error
    tombstone = Shadow(current.version, None, None, None, None, False, deleted=True)
    message: dict[str, Any] = {"version": current.version, "timestamp": now}
    if token is not None:
        message["clientToken"] = token
    return tombstone, dumps_exact(message)


def rejection_client_token(payload: bytes) -> str | None:
    """Return the clientToken of a request that the engine rejects itself (429, 500).

    Returns None, rather than raising, when the payload is not a JSON object with a string
    clientToken.
    """
    try:
        request = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    if type(request) is not dict:
        return None
    token = request.get("clientToken")
    return token if type(token) is str else None


def _parse(payload: bytes) -> Any:
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        try:
            bytes(payload).decode("utf-8")
        except UnicodeDecodeError:
            raise ShadowError(415, UNSUPPORTED_ENCODING) from None
        raise ShadowError(400, INVALID_JSON) from None


def _not_object(value: Any) -> bool:
    return value is not None and type(value) is not dict


def _valid_token(token: Any, limits: ShadowLimits) -> bool:
    if type(token) is not str:
        return False
    max_bytes = limits.max_client_token_bytes
    if len(token) > max_bytes:
        return False
    return token.isascii() or len(token.encode()) <= max_bytes


def _read_client_token(payload: bytes, limits: ShadowLimits) -> str | None:
    """Parse a get or delete payload and return its valid clientToken, or None."""
    if not payload:
        return None
    request = _parse(payload)
    if type(request) is not dict:
        return None
    client_token = request.get("clientToken")
    if client_token is None:
        return None
    if not _valid_token(client_token, limits):
        token = client_token if type(client_token) is str else None
        raise ShadowError(400, INVALID_CLIENT_TOKEN, token)
    return client_token


def _merge_section(
    old: bytes | None,
    old_metadata: StoredNode | None,
    patch: Any,
    now: int,
    max_depth: int,
) -> tuple[bytes | None, StoredNode | None, Any]:
    """Merge one section's patch; return its JSON, stored metadata and decoded object.

    The decoded object is ``_NOT_DECODED`` when the section did not change, and None when
    the section is gone.
    """
    if patch is _MISSING or (patch is not None and not patch):
        return old, old_metadata, _NOT_DECODED
    if patch is None:
        return None, None, None
    if old is None:
        base: dict[str, Any] = {}
        node = merge_object(base, patch, now, now, 1, max_depth)
    else:
        base = orjson.loads(old)
        assert old_metadata is not None
        node = merge_object(base, patch, load_node(old_metadata), now, 1, max_depth)
    if not base:
        return None, None, None
    return dumps_exact(base), store_node(node), base
