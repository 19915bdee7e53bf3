"""Limits: nesting depth, state size, clientToken length, thing and shadow names."""

from __future__ import annotations

import orjson
import pytest
from shadow_helpers import shadow, update

from ironshadow.shadow import (
    ShadowError,
    ShadowLimits,
    apply_update,
    shadow_key,
    validate_shadow_name,
    validate_thing_name,
)

TOO_DEEP = "JSON contains too many levels of nesting; maximum is 6"


def nested(levels, leaf="v"):
    """Build {"1": {"2": ... {str(levels): leaf}}}: an object per level, the section being 1."""
    value = leaf
    for level in range(levels, 0, -1):
        value = {str(level): value}
    return value


def rejection(current, request, limits=None):
    with pytest.raises(ShadowError) as info:
        apply_update(current, orjson.dumps(request), 1, limits or ShadowLimits())
    return info.value


# --- depth ------------------------------------------------------------------------------


def test_depth_6_levels_accepted():
    # desired is level 1, and the object under "5" is level 6 and contains "6": "v".
    request = {"state": {"desired": nested(6)}}
    assert update(None, request).shadow.state() == request["state"]


def test_depth_7_levels_rejected():
    error = rejection(None, {"state": {"reported": nested(7)}})
    assert (error.code, error.message) == (400, TOO_DEEP)


def test_depth_array_counts_as_level():
    ok = nested(5, leaf=[1])  # the array is level 6
    assert update(None, {"state": {"desired": ok}}).version == 1
    error = rejection(None, {"state": {"desired": nested(6, leaf=[1])}})
    assert error.message == TOO_DEEP


def test_depth_nested_arrays_count_each():
    ok = nested(4, leaf=[[1]])  # arrays at levels 5 and 6
    assert update(None, {"state": {"desired": ok}}).version == 1
    error = rejection(None, {"state": {"desired": nested(4, leaf=[[[1]]])}})
    assert error.message == TOO_DEEP


def test_depth_object_inside_array_counts():
    error = rejection(None, {"state": {"desired": nested(5, leaf=[{"a": 1}])}})
    assert error.message == TOO_DEEP


@pytest.mark.parametrize("empty", [{}, []])
def test_depth_empty_containers_do_not_count(empty):
    assert update(None, {"state": {"desired": {"x": 1, **nested(6, leaf=empty)}}}).version == 1


def test_depth_checked_for_null_only_subtree():
    error = rejection(None, {"state": {"desired": nested(7, leaf=None)}})
    assert error.message == TOO_DEEP


def test_depth_checked_when_merging_into_existing_objects():
    current = shadow({"desired": nested(6)})
    error = rejection(current, {"state": {"desired": nested(7)}})
    assert error.message == TOO_DEEP


def test_depth_limit_configurable():
    limits = ShadowLimits(max_depth=2)
    error = rejection(None, {"state": {"desired": nested(3)}}, limits)
    assert error.message == "JSON contains too many levels of nesting; maximum is 2"
    apply_update(None, orjson.dumps({"state": {"desired": nested(2)}}), 1, limits)


def test_depth_error_wins_over_version_conflict():
    error = rejection(
        shadow({"reported": {"a": 1}}, version=3), {"state": {"reported": nested(7)}, "version": 1}
    )
    assert error.code == 400


# --- nulls in arrays --------------------------------------------------------------------


@pytest.mark.parametrize("value", [[None], [1, None], [[None]], [{"a": None}], [{"a": [None]}]])
def test_null_inside_array_rejected(value):
    error = rejection(None, {"state": {"desired": {"v": value}}})
    assert error.code == 400
    assert "null" in error.message


def test_null_inside_array_in_new_subtree_rejected():
    error = rejection(None, {"state": {"desired": {"o": {"v": [None]}}}})
    assert error.code == 400


# --- size -------------------------------------------------------------------------------


def blob(total_bytes, key="d"):
    """An object whose compact JSON is exactly ``total_bytes`` long."""
    overhead = len(orjson.dumps({key: ""}))
    return {key: "z" * (total_bytes - overhead)}


def test_size_8192_bytes_accepted():
    assert update(None, {"state": {"desired": blob(8192)}}).shadow.state_bytes == 8192


def test_size_8193_bytes_rejected():
    error = rejection(None, {"state": {"desired": blob(8193)}})
    assert (error.code, error.message) == (413, "The payload exceeds the maximum size allowed")


def test_size_counts_both_sections():
    current = shadow({"reported": blob(4096, key="r")})
    assert update(current, {"state": {"desired": blob(4096)}}).shadow.state_bytes == 8192
    error = rejection(current, {"state": {"desired": blob(4097)}})
    assert error.code == 413


def test_size_counts_merged_document():
    current = shadow({"reported": blob(8180, key="r")})
    # The update adds ',"x":"abcdefghijklmnop"', 22 bytes, to 8180 stored bytes.
    error = rejection(current, {"state": {"reported": {"x": "abcdefghijklmnop"}}})
    assert error.code == 413


def test_size_counts_utf8_bytes():
    # "é" is two bytes in UTF-8, and orjson does not escape it.
    value = {"d": "é" * 4092}  # 8 + 8184 bytes
    assert update(None, {"state": {"desired": value}}).shadow.state_bytes == 8192
    error = rejection(None, {"state": {"desired": {"d": "é" * 4093}}})
    assert error.code == 413


def test_size_update_shrinking_an_oversized_shadow_accepted():
    current = shadow({"reported": blob(9000, key="r")})  # over the limit, e.g. after a limit change
    result = update(current, {"state": {"reported": {"r": None}}})
    assert result.shadow.state() == {}


def test_size_limit_configurable():
    limits = ShadowLimits(max_state_bytes=100)
    error = rejection(None, {"state": {"desired": blob(101)}}, limits)
    assert error.code == 413


def test_size_rejection_keeps_version():
    current = shadow({"reported": blob(8000, key="r")}, version=4)
    rejection(current, {"state": {"desired": blob(500)}})
    assert current.version == 4


# --- clientToken ------------------------------------------------------------------------


def test_client_token_64_bytes_accepted():
    result = update(None, {"state": {}, "clientToken": "t" * 64})
    assert result.client_token == "t" * 64


def test_client_token_65_bytes_rejected():
    error = rejection(None, {"state": {}, "clientToken": "t" * 65})
    assert (error.code, error.message) == (400, "Invalid clientToken")


def test_client_token_counted_in_utf8_bytes():
    assert update(None, {"state": {}, "clientToken": "é" * 32}).client_token == "é" * 32
    error = rejection(None, {"state": {}, "clientToken": "é" * 33})
    assert error.message == "Invalid clientToken"


@pytest.mark.parametrize("token", [5, ["a"], {"a": 1}, True])
def test_client_token_not_string_rejected(token):
    error = rejection(None, {"state": {}, "clientToken": token})
    assert error.message == "Invalid clientToken"
    assert error.client_token is None


def test_client_token_empty_string_accepted():
    assert update(None, {"state": {}, "clientToken": ""}).client_token == ""


# --- limits object ----------------------------------------------------------------------


def test_limits_defaults():
    limits = ShadowLimits()
    assert (limits.max_state_bytes, limits.max_depth, limits.max_client_token_bytes) == (
        8192,
        6,
        64,
    )


@pytest.mark.parametrize("field", ["max_state_bytes", "max_depth", "max_client_token_bytes"])
@pytest.mark.parametrize("value", [0, -1, 1.5, "8"])
def test_limits_reject_invalid_values(field, value):
    with pytest.raises(ValueError, match=field):
        ShadowLimits(**{field: value})


# --- names ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "dev1", "A-b_c:9", "x" * 128])
def test_thing_name_valid(name):
    validate_thing_name(name)


@pytest.mark.parametrize("name", ["", "x" * 129, "a b", "a/b", "a$b", "a~b", "é", "a#", "+"])
def test_thing_name_invalid(name):
    with pytest.raises(ShadowError) as info:
        validate_thing_name(name)
    assert info.value.code == 400
    assert "thing name" in info.value.message


@pytest.mark.parametrize("name", ["a", "cfg", "$x", "A-b_c:9$", "x" * 64])
def test_shadow_name_valid(name):
    validate_shadow_name(name)


@pytest.mark.parametrize("name", ["", "x" * 65, "a b", "a/b", "a~b", "#", "+"])
def test_shadow_name_invalid(name):
    with pytest.raises(ShadowError) as info:
        validate_shadow_name(name)
    assert info.value.code == 400
    assert "shadow name" in info.value.message


def test_name_error_names_value_and_limit():
    with pytest.raises(ShadowError) as info:
        validate_thing_name("x" * 129)
    assert "129 characters, maximum is 128" in info.value.message


def test_name_not_string_rejected():
    with pytest.raises(ShadowError):
        validate_thing_name(None)  # type: ignore[arg-type]


def test_shadow_key_classic_is_thing_name():
    thing = "device-1"
    assert shadow_key(thing) is thing
    assert shadow_key(thing, None) is thing


def test_shadow_key_named():
    assert shadow_key("device-1", "cfg") == "device-1~cfg"
