"""Delta rules: which desired values differ from reported, compared as JSON values."""

from __future__ import annotations

import pytest
from shadow_helpers import assert_json_equal, shadow, update

from ironshadow.shadow.delta import compute_delta, has_delta, json_equal


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (1, 1.0),
        (0, 0.0),
        (-5, -5.0),
        ("x", "x"),
        (True, True),
        (None, None),
        ([1, 2], [1.0, 2]),
        ({"a": [1, {"b": 2}]}, {"a": [1.0, {"b": 2.0}]}),
        ([], []),
        ({}, {}),
    ],
)
def test_json_equal_true(a, b):
    assert json_equal(a, b)
    assert json_equal(b, a)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (21, "21"),
        (True, 1),
        (False, 0),
        (True, 1.0),
        ([True], [1]),
        ([1, 2], [2, 1]),
        ([1, 2], [1, 2, 3]),
        ({"a": 1}, {"a": 1, "b": 2}),
        ({"a": 1}, {"b": 1}),
        ({"a": False}, {"a": 0}),
        (None, 0),
        ("", None),
        ([], {}),
        (1, 1.5),
    ],
)
def test_json_equal_false(a, b):
    assert not json_equal(a, b)
    assert not json_equal(b, a)


def check_delta(desired, reported, expected):
    delta = compute_delta(desired, reported)
    assert_json_equal(delta, expected)
    assert has_delta(desired, reported) is bool(expected)


def test_delta_without_reported_is_all_desired():
    check_delta({"a": 1, "b": {"c": 2}}, None, {"a": 1, "b": {"c": 2}})


def test_delta_of_differing_keys_only():
    desired = {"color": "RED", "state": "STOP"}
    reported = {"color": "GREEN", "engine": "ON"}
    check_delta(desired, reported, {"color": "RED", "state": "STOP"})


def test_delta_keeps_path_to_root():
    desired = {"lights": {"color": {"r": 255, "g": 255, "b": 255}}}
    reported = {"lights": {"color": {"r": 255, "g": 0, "b": 255}}}
    check_delta(desired, reported, {"lights": {"color": {"g": 255}}})


def test_delta_ignores_reported_only_keys():
    check_delta({"a": 1}, {"a": 1, "temp": 22}, {})


def test_delta_numbers_by_value():
    check_delta({"level": 1.0}, {"level": 1}, {})


def test_delta_number_differs_from_string():
    check_delta({"setpoint": "21"}, {"setpoint": 21}, {"setpoint": "21"})


@pytest.mark.parametrize(("want", "have"), [(True, 1), (False, 0), (1, True), (0, False)])
def test_delta_boolean_is_not_number(want, have):
    check_delta({"on": want}, {"on": have}, {"on": want})


def test_delta_array_copied_whole():
    check_delta({"v": [1, 2, 3]}, {"v": [1, 2]}, {"v": [1, 2, 3]})


def test_delta_array_order_matters():
    check_delta({"v": ["a", "b"]}, {"v": ["b", "a"]}, {"v": ["a", "b"]})


def test_delta_equal_arrays_of_objects():
    check_delta({"v": [{"h": 1}]}, {"v": [{"h": 1.0}]}, {})


def test_delta_object_against_scalar():
    check_delta({"cfg": {"a": 1}}, {"cfg": "default"}, {"cfg": {"a": 1}})


def test_delta_scalar_against_object():
    check_delta({"cfg": 5}, {"cfg": {"a": 1}}, {"cfg": 5})


def test_delta_object_against_array():
    check_delta({"cfg": {"a": 1}}, {"cfg": [1]}, {"cfg": {"a": 1}})


def test_delta_nested_object_fully_matched():
    check_delta({"a": {"b": {"c": 1}}}, {"a": {"b": {"c": 1, "d": 2}}}, {})


def test_delta_nested_key_missing_in_reported():
    check_delta({"a": {"b": 1, "c": 2}}, {"a": {"b": 1}}, {"a": {"c": 2}})


def test_delta_reappears_when_reported_key_deleted():
    current = shadow({"desired": {"mode": "eco"}, "reported": {"mode": "eco"}})
    assert current.has_delta is False
    result = update(current, {"state": {"reported": {"mode": None}}})
    assert result.shadow.has_delta is True
    assert result.shadow.delta() == {"mode": "eco"}


def test_delta_gone_when_desired_key_deleted():
    current = shadow({"desired": {"a": 1, "b": 2}, "reported": {"a": 1}})
    result = update(current, {"state": {"desired": {"b": None}}})
    assert result.shadow.delta() is None
    assert result.delta_payload() is None


def test_delta_after_reported_only_update():
    current = shadow({"desired": {"LOCK": "unlock"}, "reported": {"LOCK": "unlock"}})
    result = update(current, {"state": {"reported": {"LOCK": "locked"}}})
    assert result.shadow.delta() == {"LOCK": "unlock"}
    assert result.delta_payload() is not None


def test_delta_unchanged_by_empty_update():
    current = shadow({"desired": {"a": 2}, "reported": {"a": 1}})
    result = update(current, {"state": {}})
    assert result.shadow.has_delta is True
    assert result.shadow.delta() == {"a": 2}


def test_desired_not_cleared_when_matched():
    current = shadow({"desired": {"LOCK": "unlock"}, "reported": {"LOCK": "locked"}})
    result = update(current, {"state": {"reported": {"LOCK": "unlock"}}})
    assert result.shadow.state()["desired"] == {"LOCK": "unlock"}
    assert result.shadow.delta() is None
