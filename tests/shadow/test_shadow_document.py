"""The Shadow record: construction, decoding, delta, documents and compactness."""

from __future__ import annotations

import gc
import tracemalloc

import orjson
import pytest
from shadow_helpers import T0, shadow, update

from ironshadow.shadow import Shadow, apply_update


def test_from_state_sections():
    current = Shadow.from_state({"desired": {"a": 1}, "reported": {"b": 2}}, 4, timestamp=T0)
    assert current.state() == {"desired": {"a": 1}, "reported": {"b": 2}}
    assert current.desired() == {"a": 1}
    assert current.reported() == {"b": 2}
    assert current.version == 4
    assert current.deleted is False


def test_from_state_none_is_empty_live_shadow():
    current = Shadow.from_state(None, 2)
    assert current.state() == {}
    assert current.deleted is False
    assert current.delta() is None


def test_from_state_prunes_nulls_and_empty_objects():
    current = Shadow.from_state(
        {"desired": {"a": None, "b": {}, "c": {"d": {}}}, "reported": {}}, 1
    )
    assert current.state() == {}


def test_from_state_defaults_timestamp_to_now():
    current = Shadow.from_state({"reported": {"a": 1}}, 1)
    assert current.metadata()["reported"]["a"]["timestamp"] >= T0


@pytest.mark.parametrize(
    "state",
    [[1], {"delta": {}}, {"desired": 1}, {"reported": [1]}, {"other": {}}],
)
def test_from_state_rejects_malformed_state(state):
    with pytest.raises(ValueError):
        Shadow.from_state(state, 1)


@pytest.mark.parametrize("version", [-1, 1.5, "1", None])
def test_from_state_rejects_bad_version(version):
    with pytest.raises(ValueError, match="version"):
        Shadow.from_state({}, version)


def test_tombstone():
    tombstone = Shadow.from_state(None, 9, deleted=True)
    assert tombstone.deleted is True
    assert tombstone.version == 9
    assert tombstone.state() == {}
    assert tombstone.has_delta is False
    with pytest.raises(ValueError, match="deleted"):
        tombstone.document(1)
    with pytest.raises(ValueError):
        Shadow.from_state({"reported": {"a": 1}}, 9, deleted=True)


def test_has_delta_and_delta():
    current = shadow({"desired": {"a": 1, "b": 2}, "reported": {"a": 1}})
    assert current.has_delta is True
    assert current.delta() == {"b": 2}


def test_no_delta_without_desired():
    current = shadow({"reported": {"a": 1}})
    assert current.has_delta is False
    assert current.delta() is None
    assert current.delta_payload(1) is None


def test_delta_payload_for_reconnect():
    current = shadow({"desired": {"a": 1}}, version=3, timestamp=100)
    message = orjson.loads(current.delta_payload(500, client_token="r"))
    assert message == {
        "state": {"a": 1},
        "metadata": {"a": {"timestamp": 100}},
        "version": 3,
        "timestamp": 500,
        "clientToken": "r",
    }


def test_document_shape():
    current = shadow({"desired": {"a": 1}, "reported": {"a": 0}}, version=3, timestamp=100)
    document = current.document(200)
    assert list(document) == ["state", "metadata", "version", "timestamp"]
    assert document["state"]["delta"] == {"a": 1}


def test_state_bytes_is_compact_json_size():
    current = shadow({"desired": {"a": 1}, "reported": {"b": "xy"}})
    assert current.state_bytes == len(b'{"a":1}') + len(b'{"b":"xy"}')


def test_from_document_round_trip():
    current = shadow({"desired": {"a": [1, 2]}, "reported": {"a": [1], "t": 21.5}}, version=12)
    current = update(current, {"state": {"reported": {"t": 22}}}, now=T0 + 50).shadow
    document = orjson.loads(orjson.dumps(current.document(T0 + 60)))
    copy = Shadow.from_document(document)
    assert copy.state() == current.state()
    assert copy.metadata() == current.metadata()
    assert copy.version == current.version
    assert copy.has_delta is current.has_delta
    assert copy.document(T0 + 60) == current.document(T0 + 60)


def test_from_document_without_metadata_uses_timestamp():
    copy = Shadow.from_document({"state": {"reported": {"a": 1}}, "version": 2, "timestamp": 77})
    assert copy.metadata() == {"reported": {"a": {"timestamp": 77}}}


@pytest.mark.parametrize(
    "document", [[], {"state": {}, "version": "x"}, {"state": 5, "version": 1}]
)
def test_from_document_rejects_malformed(document):
    with pytest.raises(ValueError):
        Shadow.from_document(document)


def test_shadow_is_immutable_by_update():
    current = shadow({"reported": {"a": 1}}, version=1)
    update(current, {"state": {"reported": {"a": 2}}})
    assert current.state() == {"reported": {"a": 1}}
    assert current.version == 1


def test_shadow_has_no_instance_dict():
    current = shadow({"reported": {"a": 1}})
    assert not hasattr(current, "__dict__")
    with pytest.raises(AttributeError):
        current.extra = 1  # type: ignore[attr-defined]


def test_typical_shadow_is_compact():
    # tracemalloc counts the memory blocks allocated, including over-allocated bytes
    # objects that sys.getsizeof misses. benchmarks/shadow_memory.py measures RSS.
    count = 2000
    desired = orjson.dumps({"state": {"desired": {"mode": "eco", "interval": 30}}})
    reported = [
        orjson.dumps(
            {"state": {"reported": {"t": 20 + i / 10, "h": 40.5, "p": 1013.2, "v": 3.3, "r": -i}}}
        )
        for i in range(count)
    ]
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    shadows = []
    for i in range(count):
        current = apply_update(None, desired, T0 + i).shadow
        shadows.append(apply_update(current, reported[i], T0 + i + 1).shadow)
    gc.collect()
    per_shadow = (tracemalloc.get_traced_memory()[0] - before) / count
    tracemalloc.stop()
    assert per_shadow < 500, per_shadow


def test_repr_names_version_and_state():
    assert repr(shadow({"reported": {"a": 1}}, version=3)) == (
        "Shadow(version=3, state={'reported': {'a': 1}})"
    )
    assert repr(Shadow.from_state(None, 3, deleted=True)) == "Shadow(version=3, deleted=True)"
