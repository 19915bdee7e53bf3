"""Every shadow vector, run over MQTT against a running engine.

The pure-logic run of the same vectors cannot show which topics the service publishes on, nor
the in-flight limit; this one can. Each request is followed on the same connection by a get
for a thing that does not exist: the service applies requests in arrival order, so when that
get's rejection arrives, every reply to the vector's request has arrived before it.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from ironshadow.engine.topics import shadow_topic_prefix
from ironshadow.mqtt import MQTT_5, Publish
from ironshadow.shadow import Shadow, shadow_key
from raw_client import RawClient

VECTORS_PATH = Path(__file__).resolve().parents[3] / "shared" / "shadow-vectors.json"
THING = "dev1"
SENTINEL_PREFIX = "$aws/things/sentinel/shadow"
# The requesting client. With three workers it lives on worker 0 and the things on worker 1,
# so every request and reply crosses the bus, in order on one link each way.
CLIENT_ID = "app"


def load_vectors() -> list[dict[str, Any]]:
    if not VECTORS_PATH.exists():
        return []
    return json.loads(VECTORS_PATH.read_text())["vectors"]


VECTORS = load_vectors()


def request_payload(request: dict[str, Any]) -> bytes:
    if "payload_raw" in request:
        return request["payload_raw"].encode()
    if "payload_b64" in request:
        return base64.b64decode(request["payload_b64"])
    return orjson.dumps(request["payload"])


def initial_shadow(initial: dict[str, Any] | None) -> Shadow | None:
    if initial is None:
        return None
    if initial.get("deleted"):
        return Shadow.from_state(None, initial["version"], deleted=True)
    return Shadow.from_state(initial["state"], initial["version"])


def assert_matches(expected: Any, actual: Any, path: str = "") -> None:
    """Check ``actual`` against a partial expectation: '$ts' is any integer, and dicts may
    have fields that the expectation leaves out."""
    if expected == "$ts":
        assert isinstance(actual, int), f"{path}: expected a timestamp, got {actual!r}"
    elif isinstance(expected, dict):
        assert isinstance(actual, dict), f"{path}: expected an object, got {actual!r}"
        for key, value in expected.items():
            assert key in actual, f"{path}.{key} is missing from {actual!r}"
            assert_matches(value, actual[key], f"{path}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list), f"{path}: expected an array, got {actual!r}"
        assert len(actual) == len(expected), f"{path}: {actual!r} != {expected!r}"
        for index, (item, value) in enumerate(zip(expected, actual, strict=True)):
            assert_matches(item, value, f"{path}[{index}]")
    else:
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"


def replies_until_sentinel(client: RawClient, prefix: str) -> list[Publish]:
    """Collect the service's messages under ``prefix``, without the client's own requests
    that its ``prefix/#`` subscription also receives."""
    requests = {f"{prefix}/{operation}" for operation in ("update", "get", "delete")}
    replies = []
    while True:
        packet = client.receive(Publish)
        if packet.topic.startswith(SENTINEL_PREFIX):
            return replies
        if packet.topic not in requests:
            replies.append(packet)


@pytest.mark.skipif(not VECTORS, reason=f"shadow vectors not found at {VECTORS_PATH}")
@pytest.mark.parametrize("vector", VECTORS, ids=[vector["name"] for vector in VECTORS])
def test_vector_over_mqtt(engine, vector):
    request = vector["request"]
    expect = vector["expect"]
    shadow_name = request.get("shadow_name")
    prefix = shadow_topic_prefix(THING, shadow_name)
    key = shadow_key(THING, shadow_name)
    owner = engine.owner(THING)
    service = owner.server.shadows
    initial = initial_shadow(vector["initial"])
    if initial is not None:
        owner.call(service.shadows.__setitem__, key, initial)

    client = RawClient(engine.port, MQTT_5)
    client.connect(CLIENT_ID)
    client.subscribe(prefix + "/#", 0, packet_id=1)
    client.subscribe(SENTINEL_PREFIX + "/get/rejected", 0, packet_id=2)

    # Requests still waiting to be applied count as in flight: gets sent in the same
    # write as the vector's request reach the service in the same loop iteration.
    held = request.get("preconditions", {}).get("inflight_requests_on_same_connection", 0)
    packets = [Publish(prefix + "/get", b"") for _ in range(held)]
    packets.append(Publish(f"{prefix}/{request['op']}", request_payload(request)))
    packets.append(Publish(SENTINEL_PREFIX + "/get", b""))
    client.send(*packets)
    replies = replies_until_sentinel(client, prefix)
    replies = [reply for reply in replies if not reply.topic.endswith("/get/accepted") or not held]

    published = sorted(reply.topic[len(prefix) + 1 :] for reply in replies)
    assert published == sorted(expect["publishes"])
    documents = {reply.topic[len(prefix) + 1 :]: orjson.loads(reply.payload) for reply in replies}
    operation = request["op"]

    if expect["outcome"] == "rejected":
        error = documents[f"{operation}/rejected"]
        assert error["code"] == expect["code"]
        if expect.get("message") is not None:
            assert error["message"] == expect["message"]
    else:
        accepted = documents[f"{operation}/accepted"]
        if expect.get("version") is not None:
            assert accepted["version"] == expect["version"]
        if expect.get("version_gt") is not None:
            assert accepted["version"] > expect["version_gt"]
        if "accepted" in expect:
            assert_matches(expect["accepted"], accepted)
        if "metadata" in expect:
            assert_matches(expect["metadata"], accepted["metadata"])
        if "delta_message" in expect:
            assert_matches(expect["delta_message"], documents["update/delta"])
        if "documents" in expect:
            assert_matches(expect["documents"], documents["update/documents"])

    stored = owner.call(service.shadows.get, key)
    if expect.get("state", ...) is None:
        assert stored is None or stored.deleted
    elif "state" in expect:
        assert stored is not None
        assert stored.state() == expect["state"]
    if "delta" in expect and stored is not None and not stored.deleted:
        assert stored.delta() == expect["delta"]
