"""Metadata: a timestamp per leaf and per array element, merged like the state."""

from __future__ import annotations

import orjson
from shadow_helpers import T0, shadow, update

from ironshadow.shadow import Shadow
from ironshadow.shadow.metadata import collapse_metadata, expand_node


def ts(value):
    return {"timestamp": value}


def test_metadata_per_leaf_and_array_element():
    result = update(None, {"state": {"desired": {"a": 1, "b": {"c": 2}, "arr": [1, 2]}}}, now=500)
    assert result.shadow.metadata() == {
        "desired": {"a": ts(500), "b": {"c": ts(500)}, "arr": [ts(500), ts(500)]}
    }


def test_metadata_objects_inside_array_get_member_stamps():
    result = update(None, {"state": {"desired": {"s": [{"h": 1, "on": True}, [3]]}}}, now=500)
    assert result.shadow.metadata() == {
        "desired": {"s": [{"h": ts(500), "on": ts(500)}, [ts(500)]]}
    }


def test_metadata_untouched_fields_keep_timestamps():
    current = shadow({"reported": {"a": 1, "b": {"x": 1, "y": 2}}}, timestamp=100)
    result = update(current, {"state": {"reported": {"b": {"x": 5}}}}, now=200)
    assert result.shadow.metadata() == {
        "reported": {"a": ts(100), "b": {"x": ts(200), "y": ts(100)}}
    }


def test_metadata_of_other_section_unchanged():
    current = shadow({"desired": {"a": 1}, "reported": {"a": 0}}, timestamp=100)
    result = update(current, {"state": {"reported": {"a": 1}}}, now=200)
    assert result.shadow.metadata() == {"desired": {"a": ts(100)}, "reported": {"a": ts(200)}}


def test_metadata_of_deleted_field_removed():
    current = shadow({"reported": {"a": 1, "b": 2}}, timestamp=100)
    result = update(current, {"state": {"reported": {"a": None}}}, now=200)
    assert result.shadow.metadata() == {"reported": {"b": ts(100)}}


def test_metadata_of_replaced_object_is_new():
    current = shadow({"desired": {"cfg": {"a": 1, "b": 2}}}, timestamp=100)
    result = update(current, {"state": {"desired": {"cfg": 7}}}, now=200)
    assert result.shadow.metadata() == {"desired": {"cfg": ts(200)}}


def test_metadata_sequence_of_partial_updates():
    current = shadow({"reported": {"a": 0, "b": 0, "c": 0}}, timestamp=100)
    current = update(current, {"state": {"reported": {"a": 1}}}, now=200).shadow
    current = update(current, {"state": {"reported": {"b": 1}}}, now=300).shadow
    current = update(current, {"state": {"reported": {"d": 1}}}, now=300).shadow
    assert current.metadata() == {
        "reported": {"a": ts(200), "b": ts(300), "c": ts(100), "d": ts(300)}
    }
    current = update(current, {"state": {"reported": {"a": 2, "c": 2}}}, now=300).shadow
    assert current._reported_metadata == 300


def test_accepted_metadata_covers_fields_sent():
    current = shadow({"desired": {"color": "green"}, "reported": {"color": "red"}})
    request = {"state": {"reported": {"color": "green", "gone": None}, "desired": None}}
    accepted = orjson.loads(update(current, request, now=700).accepted_payload())
    assert accepted["state"] == request["state"]
    assert accepted["metadata"] == {
        "reported": {"color": ts(700), "gone": ts(700)},
        "desired": ts(700),
    }


def test_accepted_metadata_for_null_state():
    accepted = orjson.loads(
        update(shadow({"reported": {"a": 1}}), {"state": None}, now=7).accepted_payload()
    )
    assert accepted["state"] is None
    assert accepted["metadata"] == ts(7)


def test_accepted_metadata_for_empty_objects():
    accepted = orjson.loads(update(None, {"state": {"desired": {}}}, now=7).accepted_payload())
    assert accepted["state"] == {"desired": {}}
    assert accepted["metadata"] == {"desired": {}}


def test_delta_metadata_holds_desired_timestamps():
    current = shadow(
        {"desired": {"a": 1, "b": {"c": 2, "d": 3}}, "reported": {"b": {"d": 3}}}, timestamp=100
    )
    result = update(current, {"state": {"desired": {"a": 5}}}, now=200)
    message = orjson.loads(result.delta_payload())
    assert message["state"] == {"a": 5, "b": {"c": 2}}
    assert message["metadata"] == {"a": ts(200), "b": {"c": ts(100)}}


def test_get_metadata_includes_delta():
    current = shadow({"desired": {"a": 1, "b": 2}, "reported": {"a": 1}}, timestamp=100)
    document = current.document(now=900)
    assert document["metadata"] == {
        "desired": {"a": ts(100), "b": ts(100)},
        "reported": {"a": ts(100)},
        "delta": {"b": ts(100)},
    }


def test_expand_node_dict_against_scalar_takes_latest():
    assert expand_node(5, {"a": 100, "b": {"c": 300}}) == ts(300)


def test_collapse_uniform_tree_to_int():
    state = {"a": 1, "b": {"c": [1, 2]}}
    metadata = {"a": ts(5), "b": {"c": [ts(5), ts(5)]}}
    assert collapse_metadata(state, metadata, 0) == 5


def test_collapse_mixed_tree():
    state = {"a": 1, "b": {"c": [1, 2], "d": "x"}}
    metadata = {"a": ts(5), "b": {"c": [ts(6), ts(7)], "d": ts(5)}}
    assert collapse_metadata(state, metadata, 0) == {"a": 5, "b": {"c": 7, "d": 5}}


def test_collapse_missing_metadata_uses_default():
    assert collapse_metadata({"a": 1, "b": [1]}, None, 42) == 42
    assert collapse_metadata({"a": 1, "b": 2}, {"a": ts(1)}, 42) == {"a": 1, "b": 42}


def test_metadata_survives_document_round_trip():
    current = shadow({"reported": {"a": 1, "b": {"x": 1, "y": [1, 2]}}}, timestamp=100)
    current = update(current, {"state": {"reported": {"b": {"x": 2}}}}, now=200).shadow
    copy = Shadow.from_document(orjson.loads(orjson.dumps(current.document(now=300))))
    assert copy.metadata() == current.metadata()
    assert copy.state() == current.state()
    assert copy.version == current.version


def test_from_state_stamps_every_leaf():
    current = Shadow.from_state({"desired": {"a": [1, {"b": 2}]}}, 3, timestamp=T0)
    assert current.metadata() == {"desired": {"a": [ts(T0), {"b": ts(T0)}]}}
