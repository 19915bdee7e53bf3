"""Every case of the shared shadow test vectors, run against the pure shadow logic.

The vectors list the topics that the service publishes. At this level an accepted update
publishes update/accepted and update/documents, plus update/delta when ``delta_payload()``
is not None. A rejection publishes the operation's ``rejected`` topic.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import orjson
import pytest
from shadow_helpers import T0, assert_json_equal, assert_partial

from ironshadow.shadow import (
    Shadow,
    ShadowError,
    apply_update,
    delete_shadow,
    get_shadow,
    validate_shadow_name,
    validate_thing_name,
)

# The vectors are in the shared folder beside the checkout.
VECTORS_PATH = Path(__file__).parents[3] / "shared" / "shadow-vectors.json"
THING = "dev1"
NOW = T0 + 100


def load_vectors() -> list[dict[str, Any]]:
    if not VECTORS_PATH.exists():
        return []
    return orjson.loads(VECTORS_PATH.read_bytes())["vectors"]


VECTORS = load_vectors()


def initial_shadow(initial: dict[str, Any] | None) -> Shadow | None:
    if initial is None:
        return None
    if initial.get("deleted"):
        return Shadow.from_state(None, initial["version"], deleted=True)
    return Shadow.from_state(initial["state"], initial["version"], timestamp=T0)


def request_payload(request: dict[str, Any]) -> bytes:
    if "payload_b64" in request:
        return base64.b64decode(request["payload_b64"])
    if "payload_raw" in request:
        return request["payload_raw"].encode()
    return orjson.dumps(request["payload"])


def run(vector: dict[str, Any]) -> dict[str, Any]:
    """Run one vector's request and collect what the service would store and publish."""
    request = vector["request"]
    operation = request["op"]
    shadow_name = request.get("shadow_name")
    validate_thing_name(THING)
    if shadow_name is not None:
        validate_shadow_name(shadow_name)
    current = initial_shadow(vector["initial"])
    payload = request_payload(request)
    outcome: dict[str, Any] = {"stored": current, "publishes": [], "messages": {}}
    try:
        if operation == "update":
            result = apply_update(current, payload, NOW)
            outcome["stored"] = result.shadow
            accepted = orjson.loads(result.accepted_payload())
            outcome["response"] = accepted
            outcome["messages"]["accepted"] = accepted
            outcome["messages"]["documents"] = orjson.loads(result.documents_payload())
            outcome["publishes"] = ["update/accepted", "update/documents"]
            delta = result.delta_payload()
            if delta is not None:
                outcome["messages"]["delta_message"] = orjson.loads(delta)
                outcome["publishes"].append("update/delta")
        elif operation == "get":
            names = {"thing_name": THING, "shadow_name": shadow_name}
            outcome["response"] = orjson.loads(get_shadow(current, payload, NOW, **names))
            outcome["publishes"] = ["get/accepted"]
        elif operation == "delete":
            names = {"thing_name": THING, "shadow_name": shadow_name}
            tombstone, reply = delete_shadow(current, payload, NOW, **names)
            outcome["stored"] = tombstone
            outcome["response"] = orjson.loads(reply)
            outcome["publishes"] = ["delete/accepted"]
        else:
            raise AssertionError(f"unknown operation {operation!r}")
        outcome["outcome"] = "accepted"
    except ShadowError as error:
        outcome["outcome"] = "rejected"
        outcome["error"] = error
        outcome["response"] = orjson.loads(error.payload(NOW))
        outcome["publishes"] = [f"{operation}/rejected"]
    return outcome


@pytest.mark.skipif(not VECTORS, reason=f"no shadow vectors at {VECTORS_PATH}")
@pytest.mark.parametrize(
    "vector", VECTORS or [None], ids=[v["name"] for v in VECTORS] or ["no-vectors"]
)
def test_vector(vector: dict[str, Any]) -> None:
    if "inflight_requests_on_same_connection" in vector["request"].get("preconditions", {}):
        pytest.skip("in-flight limit is enforced by the engine")
    expect = vector["expect"]
    outcome = run(vector)

    assert outcome["outcome"] == expect["outcome"], outcome.get("error")
    if expect["outcome"] == "rejected":
        assert outcome["error"].code == expect["code"]
        if expect.get("message") is not None:
            assert outcome["error"].message == expect["message"]

    stored = outcome["stored"]
    live = stored if stored is not None and not stored.deleted else None
    if expect["state"] is None:
        assert live is None, f"expected no shadow, found {live!r}"
    else:
        assert live is not None, "expected a shadow, found none"
        assert_json_equal(live.state(), expect["state"])
    assert_json_equal(live.delta() if live is not None else None, expect["delta"])

    if expect["outcome"] == "accepted":
        version = outcome["response"]["version"]
    else:
        version = live.version if live is not None else None
    if expect["version"] is not None or "version_gt" not in expect:
        assert version == expect["version"]
    if "version_gt" in expect:
        assert version > expect["version_gt"]

    assert sorted(outcome["publishes"]) == sorted(expect["publishes"])
    if "topics" in expect:
        prefix = f"$aws/things/{THING}/shadow"
        if vector["request"].get("shadow_name"):
            prefix += f"/name/{vector['request']['shadow_name']}"
        topics = [f"{prefix}/{suffix}" for suffix in outcome["publishes"]]
        assert sorted(topics) == sorted(expect["topics"])
    if "client_token" in expect:
        assert outcome["response"].get("clientToken") == expect["client_token"]
    for name in ("accepted", "documents", "delta_message"):
        if name in expect:
            assert_partial(outcome["messages"].get(name), expect[name])
    if "metadata" in expect:
        assert_partial(outcome["response"]["metadata"], expect["metadata"])
        assert_partial(live.metadata(), expect["metadata"])
