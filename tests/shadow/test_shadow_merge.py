"""Merge rules: key-by-key objects, null deletes, whole arrays and scalars, pruning."""

from __future__ import annotations

import pytest
from shadow_helpers import assert_json_equal, shadow, update

from ironshadow.shadow.merge import merge_object


def merged_state(initial, request):
    current = None if initial is None else shadow(initial, version=4)
    return update(current, request).shadow.state()


def test_merge_keeps_sibling_keys():
    state = merged_state({"reported": {"a": 1, "b": 2}}, {"state": {"reported": {"b": 3}}})
    assert state == {"reported": {"a": 1, "b": 3}}


def test_merge_nested_objects_key_by_key():
    initial = {"reported": {"color": {"r": 255, "g": 255, "b": 0}}}
    state = merged_state(initial, {"state": {"reported": {"color": {"r": 10}}}})
    assert state == {"reported": {"color": {"r": 10, "g": 255, "b": 0}}}


def test_merge_leaves_other_section_untouched():
    initial = {"desired": {"x": 1}, "reported": {"y": 2}}
    state = merged_state(initial, {"state": {"reported": {"y": 3}}})
    assert state == {"desired": {"x": 1}, "reported": {"y": 3}}


def test_null_deletes_key():
    state = merged_state({"reported": {"a": 1, "b": 2}}, {"state": {"reported": {"a": None}}})
    assert state == {"reported": {"b": 2}}


def test_null_for_missing_key_bumps_version_only():
    current = shadow({"reported": {"a": 1}}, version=7)
    result = update(current, {"state": {"reported": {"zzz": None}}})
    assert result.shadow.state() == {"reported": {"a": 1}}
    assert result.version == 8


def test_null_section_removes_section():
    initial = {"desired": {"a": 1}, "reported": {"a": 2}}
    assert merged_state(initial, {"state": {"desired": None}}) == {"reported": {"a": 2}}


def test_null_state_clears_both_sections():
    current = shadow({"desired": {"a": 1}, "reported": {"a": 2}}, version=17)
    result = update(current, {"state": None})
    assert result.shadow.state() == {}
    assert result.shadow.deleted is False
    assert result.version == 18


def test_empty_state_changes_nothing():
    initial = {"desired": {"a": 1}, "reported": {"a": 1}}
    assert merged_state(initial, {"state": {}}) == initial


def test_empty_section_changes_nothing():
    initial = {"desired": {"a": 1}}
    assert merged_state(initial, {"state": {"desired": {}}}) == initial


def test_empty_object_onto_object_changes_nothing():
    initial = {"desired": {"cfg": {"a": 1}}}
    assert merged_state(initial, {"state": {"desired": {"cfg": {}}}}) == initial


def test_empty_object_onto_scalar_removes_key():
    initial = {"desired": {"cfg": 3, "other": 1}}
    state = merged_state(initial, {"state": {"desired": {"cfg": {}}}})
    assert state == {"desired": {"other": 1}}


def test_empty_object_onto_missing_key_creates_nothing():
    state = merged_state({"desired": {"a": 1}}, {"state": {"desired": {"new": {}}}})
    assert state == {"desired": {"a": 1}}


def test_scalar_replaces_object():
    state = merged_state({"desired": {"cfg": {"a": 1}}}, {"state": {"desired": {"cfg": 3}}})
    assert state == {"desired": {"cfg": 3}}


def test_object_replaces_scalar():
    state = merged_state({"desired": {"cfg": 3}}, {"state": {"desired": {"cfg": {"a": 1}}}})
    assert state == {"desired": {"cfg": {"a": 1}}}


def test_object_replaces_array():
    state = merged_state({"desired": {"cfg": [1, 2]}}, {"state": {"desired": {"cfg": {"a": 1}}}})
    assert state == {"desired": {"cfg": {"a": 1}}}


def test_array_replaced_whole():
    initial = {"desired": {"sched": [{"h": 1, "on": True}, {"h": 2}]}}
    state = merged_state(initial, {"state": {"desired": {"sched": [{"h": 3}]}}})
    assert state == {"desired": {"sched": [{"h": 3}]}}


def test_empty_array_is_a_value():
    state = merged_state({"desired": {"v": [1]}}, {"state": {"desired": {"v": []}}})
    assert state == {"desired": {"v": []}}


def test_new_subtree_drops_null_members():
    request = {"state": {"reported": {"cfg": {"a": 1, "b": None, "c": {"d": None}}}}}
    assert merged_state(None, request) == {"reported": {"cfg": {"a": 1}}}


def test_new_subtree_of_only_nulls_creates_nothing():
    request = {"state": {"reported": {"x": 1, "cfg": {"a": None, "b": {"c": None}}}}}
    assert merged_state(None, request) == {"reported": {"x": 1}}


def test_nested_delete_prunes_emptied_objects():
    initial = {"reported": {"a": {"b": {"c": 1}}, "keep": 1}}
    state = merged_state(initial, {"state": {"reported": {"a": {"b": {"c": None}}}}})
    assert state == {"reported": {"keep": 1}}


def test_deleting_last_key_drops_section():
    initial = {"desired": {"color": "RED"}, "reported": {"color": "GREEN"}}
    state = merged_state(initial, {"state": {"desired": {"color": None}}})
    assert state == {"reported": {"color": "GREEN"}}


def test_subtree_of_nulls_onto_object_keeps_other_members():
    initial = {"reported": {"a": {"x": 1, "y": 2}}}
    state = merged_state(initial, {"state": {"reported": {"a": {"x": None, "z": None}}}})
    assert state == {"reported": {"a": {"y": 2}}}


def test_update_creates_shadow_with_version_1():
    result = update(None, {"state": {"reported": {"a": 1}}})
    assert result.version == 1
    assert result.previous is None


def test_empty_state_creates_shadow():
    result = update(None, {"state": {}})
    assert result.version == 1
    assert result.shadow.state() == {}


def test_number_types_are_kept():
    state = merged_state(None, {"state": {"desired": {"f": 1.0, "i": 1, "b": True}}})
    assert_json_equal(state, {"desired": {"f": 1.0, "i": 1, "b": True}})


def test_unicode_values_round_trip():
    state = merged_state(None, {"state": {"reported": {"név": "árvíztűrő", "emoji": "🔧"}}})
    assert state == {"reported": {"név": "árvíztűrő", "emoji": "🔧"}}


# --- metadata nodes, at the level of merge_object ---------------------------------------


def test_metadata_node_collapses_when_all_leaves_updated():
    base = {"a": 1, "b": 2}
    node = merge_object(base, {"a": 5, "b": 6}, 100, 200, 1, 6)
    assert node == 200


def test_metadata_node_splits_for_partial_update():
    base = {"a": 1, "b": 2}
    node = merge_object(base, {"a": 5}, 100, 200, 1, 6)
    assert node == {"a": 200, "b": 100}


def test_metadata_node_stays_when_time_unchanged():
    base = {"a": 1, "b": 2}
    assert merge_object(base, {"a": 5}, 200, 200, 1, 6) == 200


def test_metadata_node_nested_partial_update():
    base = {"o": {"x": 1, "y": 2}, "z": 3}
    node = merge_object(base, {"o": {"x": 9}}, 100, 200, 1, 6)
    assert node == {"o": {"x": 200, "y": 100}, "z": 100}


def test_metadata_node_collapses_again_when_caught_up():
    base = {"a": 1, "b": 2}
    node = merge_object(base, {"b": 5}, {"a": 300, "b": 100}, 300, 1, 6)
    assert node == 300


def test_metadata_node_drops_deleted_keys():
    base = {"a": 1, "b": 2, "c": 3}
    node = merge_object(base, {"b": None}, {"a": 100, "b": 200, "c": 300}, 400, 1, 6)
    assert node == {"a": 100, "c": 300}


@pytest.mark.parametrize("value", [3, "s", True, [1, 2]])
def test_metadata_node_of_replaced_value_is_now(value):
    base = {"a": {"x": 1, "y": 2}, "b": 0}
    node = merge_object(base, {"a": value}, {"a": {"x": 100, "y": 150}, "b": 100}, 200, 1, 6)
    assert node == {"a": 200, "b": 100}
