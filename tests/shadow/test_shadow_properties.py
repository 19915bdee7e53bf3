"""Property tests: updates against a plain reference model of the merge and delta rules."""

from __future__ import annotations

import copy
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st
from shadow_helpers import assert_json_equal, canonical

from ironshadow.shadow import Shadow, ShadowLimits, apply_update

# Generous limits: depth and size have their own tests, here they would only reject cases.
LIMITS = ShadowLimits(max_state_bytes=10**7, max_depth=64)
T_OLD = 1_000
NOW = 2_000
MISSING: Any = object()

keys = st.sampled_from(["a", "b", "c", "é", "1"])
scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-2, max_value=2),
    st.sampled_from([0.0, 1.0, -1.0, 2.5, 2**40]),
    st.text(alphabet="ab1", max_size=2),
)
# Arrays never hold null: a request with one is rejected.
arrays = st.recursive(
    st.lists(scalars, max_size=3),
    lambda children: st.lists(
        st.one_of(scalars, children, st.dictionaries(keys, scalars)), max_size=3
    ),
    max_leaves=6,
)
values = st.recursive(
    st.one_of(scalars, arrays),
    lambda children: st.dictionaries(keys, children, max_size=4),
    max_leaves=12,
)
patch_values = st.recursive(
    st.one_of(st.none(), scalars, arrays),
    lambda children: st.dictionaries(keys, children, max_size=4),
    max_leaves=12,
)
objects = st.dictionaries(keys, values, max_size=4)
patch_objects = st.dictionaries(keys, patch_values, max_size=4)
sections = st.one_of(st.just(MISSING), st.none(), patch_objects)


def ref_merge(stored: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """Merge by the documented rules, written plainly: nulls delete, empty objects go."""
    result = copy.deepcopy(stored)
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict):
            old = result.get(key)
            merged = ref_merge(old if isinstance(old, dict) else {}, value)
            if merged:
                result[key] = merged
            else:
                result.pop(key, None)
        else:
            result[key] = value
    return result


def ref_equal(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(ref_equal(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(ref_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def ref_delta(desired: dict[str, Any], reported: dict[str, Any]) -> dict[str, Any]:
    delta = {}
    for key, want in desired.items():
        if key not in reported:
            delta[key] = want
        elif isinstance(want, dict) and isinstance(reported[key], dict):
            below = ref_delta(want, reported[key])
            if below:
                delta[key] = below
        elif not ref_equal(want, reported[key]):
            delta[key] = want
    return delta


def stamp_all(value: Any, timestamp: int) -> Any:
    if isinstance(value, dict):
        return {key: stamp_all(item, timestamp) for key, item in value.items()}
    if isinstance(value, list):
        return [stamp_all(item, timestamp) for item in value]
    return {"timestamp": timestamp}


def ref_metadata(merged: dict[str, Any], patch: dict[str, Any], old: dict[str, Any]) -> Any:
    """Expected metadata: NOW for what the patch set or replaced, T_OLD for the rest."""
    result = {}
    for key, value in merged.items():
        sent = patch.get(key, MISSING)
        if sent is MISSING:
            result[key] = stamp_all(value, T_OLD)
        elif isinstance(sent, dict) and isinstance(old.get(key), dict):
            result[key] = ref_metadata(value, sent, old[key])
        else:
            result[key] = stamp_all(value, NOW)
    return result


def prune(value: dict[str, Any]) -> dict[str, Any]:
    return ref_merge({}, value)


def build_request(desired: Any, reported: Any) -> dict[str, Any]:
    state = {}
    if desired is not MISSING:
        state["desired"] = desired
    if reported is not MISSING:
        state["reported"] = reported
    return {"state": state}


@settings(max_examples=300)
@given(
    stored_desired=objects,
    stored_reported=objects,
    desired=sections,
    reported=sections,
    version=st.integers(min_value=0, max_value=10**6),
)
def test_update_matches_reference_model(
    stored_desired, stored_reported, desired, reported, version
):
    stored = {"desired": prune(stored_desired), "reported": prune(stored_reported)}
    current = Shadow.from_state(stored, version, timestamp=T_OLD)
    request = build_request(desired, reported)
    result = apply_update(current, orjson.dumps(request), NOW, LIMITS)

    expected = {}
    for name, patch in (("desired", desired), ("reported", reported)):
        if patch is MISSING:
            section = stored[name]
        elif patch is None:
            section = {}
        else:
            section = ref_merge(stored[name], patch)
        if section:
            expected[name] = section
    assert_json_equal(result.shadow.state(), expected)

    delta = (
        ref_delta(expected["desired"], expected.get("reported", {}))
        if "desired" in expected
        else {}
    )
    assert_json_equal(result.shadow.delta(), delta or None)
    assert result.shadow.has_delta is bool(delta)
    assert (result.delta_payload() is not None) is bool(delta)
    assert result.version == version + 1

    metadata = result.shadow.metadata()
    for name, patch in (("desired", desired), ("reported", reported)):
        if name not in expected:
            assert name not in metadata
        elif patch is MISSING or patch is None:
            assert metadata[name] == stamp_all(expected[name], T_OLD)
        else:
            assert metadata[name] == ref_metadata(expected[name], patch, stored[name])


@given(stored=objects, patch=patch_objects)
def test_accepted_echoes_request_state(stored, patch):
    current = Shadow.from_state({"reported": prune(stored)}, 1, timestamp=T_OLD)
    result = apply_update(current, orjson.dumps({"state": {"reported": patch}}), NOW, LIMITS)
    accepted = orjson.loads(result.accepted_payload())
    assert canonical(accepted["state"]) == canonical({"reported": patch})
    assert accepted["metadata"] == {"reported": stamp_all(patch, NOW)}


@given(desired=objects, reported=objects)
def test_reporting_desired_clears_delta(desired, reported):
    current = Shadow.from_state({"desired": prune(desired), "reported": prune(reported)}, 1)
    request = {"state": {"reported": prune(desired)}}
    result = apply_update(current, orjson.dumps(request), NOW, LIMITS)
    assert result.shadow.delta() is None
    assert result.delta_payload() is None


@given(desired=objects, reported=objects, version=st.integers(min_value=0, max_value=10**9))
def test_state_round_trips_through_shadow(desired, reported, version):
    state = {"desired": desired, "reported": reported}
    current = Shadow.from_state(state, version, timestamp=T_OLD)
    expected = {name: prune(value) for name, value in state.items() if prune(value)}
    assert_json_equal(current.state(), expected)
    copy_ = Shadow.from_document(orjson.loads(orjson.dumps(current.document(NOW))))
    assert_json_equal(copy_.state(), expected)
    assert copy_.metadata() == current.metadata()
    assert copy_.version == version
    assert copy_.has_delta is current.has_delta


@given(
    desired=objects,
    reported=objects,
    patches=st.lists(st.tuples(sections, sections), min_size=1, max_size=4),
)
def test_sequence_of_updates_round_trips(desired, reported, patches):
    current = Shadow.from_state({"desired": prune(desired), "reported": prune(reported)}, 0)
    for now, (desired_patch, reported_patch) in enumerate(patches, start=NOW):
        request = build_request(desired_patch, reported_patch)
        current = apply_update(current, orjson.dumps(request), now, LIMITS).shadow
        copy_ = Shadow.from_document(orjson.loads(orjson.dumps(current.document(now))))
        assert copy_.metadata() == current.metadata()
        assert canonical(copy_.state()) == canonical(current.state())
    assert current.version == len(patches)
