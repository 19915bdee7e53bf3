"""Request processing: order of checks, error documents, versions, get and delete."""

from __future__ import annotations

import orjson
import pytest
from shadow_helpers import shadow, update

from ironshadow.shadow import (
    Shadow,
    ShadowError,
    apply_update,
    delete_shadow,
    get_shadow,
    rejection_client_token,
)


def reject_update(current, payload, now=1):
    with pytest.raises(ShadowError) as info:
        apply_update(current, payload, now)
    return info.value


def reject_json(current, request):
    return reject_update(current, orjson.dumps(request))


# --- parsing ----------------------------------------------------------------------------


def test_empty_update_payload_rejected():
    error = reject_update(None, b"")
    assert (error.code, error.message, error.client_token) == (400, "Missing update payload", None)


@pytest.mark.parametrize("payload", [b"{", b"{'state': {}}", b"   ", b"{}x", b'{"a":NaN}'])
def test_invalid_json_rejected(payload):
    error = reject_update(None, payload)
    assert (error.code, error.message) == (400, "Invalid JSON")


@pytest.mark.parametrize("payload", [b'{"state": {"reported": {"a": "\xff"}}}', b"\xc3\x28"])
def test_non_utf8_payload_gives_415(payload):
    error = reject_update(None, payload)
    assert error.code == 415
    assert error.message == "Unsupported documented encoding; supported encoding is UTF-8"


@pytest.mark.parametrize("payload", [b"[1]", b'"state"', b"5", b"null"])
def test_top_level_not_object_rejected(payload):
    error = reject_update(None, payload)
    assert (error.code, error.message) == (400, "Missing required node: state")


# --- schema checks, each with the clientToken echoed ------------------------------------


@pytest.mark.parametrize(
    ("request_body", "message"),
    [
        ({"clientToken": "t1"}, "Missing required node: state"),
        ({"state": "on", "clientToken": "t1"}, "State node must be an object"),
        ({"state": [1], "clientToken": "t1"}, "State node must be an object"),
        ({"state": 5, "clientToken": "t1"}, "State node must be an object"),
        ({"state": {"desired": 1}, "clientToken": "t1"}, "Desired node must be an object"),
        ({"state": {"desired": []}, "clientToken": "t1"}, "Desired node must be an object"),
        ({"state": {"reported": "x"}, "clientToken": "t1"}, "Reported node must be an object"),
        ({"state": {"foo": {}}, "clientToken": "t1"}, "State contains an invalid node"),
        (
            {"state": {"reported": {"a": 1}, "foo": 1}, "clientToken": "t1"},
            "State contains an invalid node",
        ),
        ({"state": {}, "version": "1", "clientToken": "t1"}, "Invalid version"),
        ({"state": {}, "version": -1, "clientToken": "t1"}, "Invalid version"),
        ({"state": {}, "version": 1.0, "clientToken": "t1"}, "Invalid version"),
        ({"state": {}, "version": True, "clientToken": "t1"}, "Invalid version"),
        ({"state": {}, "version": None, "clientToken": "t1"}, "Invalid version"),
    ],
)
def test_schema_errors_echo_client_token(request_body, message):
    current = shadow({"reported": {"a": 1}}, version=2)
    error = reject_json(current, request_body)
    assert (error.code, error.message) == (400, message)
    assert error.client_token == "t1"
    assert orjson.loads(error.payload(99)) == {
        "code": 400,
        "message": message,
        "timestamp": 99,
        "clientToken": "t1",
    }


def test_error_payload_without_client_token():
    error = reject_json(None, {"state": "x"})
    assert orjson.loads(error.payload(5)) == {
        "code": 400,
        "message": "State node must be an object",
        "timestamp": 5,
    }


def test_oversized_client_token_echoed_in_rejection():
    error = reject_json(None, {"state": {}, "clientToken": "t" * 65})
    assert error.client_token == "t" * 65


def test_state_error_checked_before_client_token():
    error = reject_json(None, {"state": 1, "clientToken": "t" * 65})
    assert error.message == "State node must be an object"


def test_client_token_checked_before_version():
    error = reject_json(None, {"state": {}, "clientToken": "t" * 65, "version": "x"})
    assert error.message == "Invalid clientToken"


def test_delta_in_request_dropped():
    current = shadow({"reported": {"a": 1}}, version=2)
    result = update(current, {"state": {"desired": {"a": 5}, "delta": {"b": 2}}})
    assert result.shadow.state() == {"desired": {"a": 5}, "reported": {"a": 1}}
    assert orjson.loads(result.accepted_payload())["state"] == {"desired": {"a": 5}}


def test_delta_only_state_is_noop():
    current = shadow({"reported": {"a": 1}}, version=2)
    result = update(current, {"state": {"delta": "anything"}})
    assert result.shadow.state() == {"reported": {"a": 1}}
    assert result.version == 3


def test_extra_top_level_fields_ignored():
    result = update(None, {"state": {"reported": {"a": 1}}, "foo": "bar", "metadata": {}})
    assert result.shadow.state() == {"reported": {"a": 1}}


def test_rejection_leaves_current_unchanged():
    current = shadow({"reported": {"a": 1}}, version=2)
    reject_json(current, {"state": {"reported": {"a": 2, "deep": [None]}}})
    assert current.state() == {"reported": {"a": 1}}
    assert current.version == 2


# --- versions ---------------------------------------------------------------------------


def test_version_matching_accepted():
    current = shadow({"reported": {"a": 1}}, version=10)
    assert update(current, {"state": {"reported": {"a": 2}}, "version": 10}).version == 11


@pytest.mark.parametrize("version", [0, 9, 11, 1000])
def test_version_mismatch_conflict(version):
    current = shadow({"reported": {"a": 1}}, version=10)
    error = reject_json(current, {"state": {"reported": {"a": 2}}, "version": version})
    assert (error.code, error.message) == (409, "Version conflict")


def test_version_conflict_echoes_client_token():
    current = shadow({"reported": {"a": 1}}, version=10)
    error = reject_json(current, {"state": {}, "version": 3, "clientToken": "c"})
    assert error.client_token == "c"


def test_version_conflict_wins_over_size():
    current = shadow({"reported": {"a": 1}}, version=10)
    error = reject_json(current, {"state": {"reported": {"b": "z" * 9000}}, "version": 3})
    assert error.code == 409


def test_version_on_new_shadow():
    assert update(None, {"state": {"reported": {"a": 1}}, "version": 0}).version == 1
    error = reject_json(None, {"state": {"reported": {"a": 1}}, "version": 1})
    assert error.code == 409


def test_version_bumps_on_every_accepted_update():
    current = shadow({"reported": {"a": 1}}, version=1)
    for expected in range(2, 6):
        current = update(current, {"state": {"reported": {"a": 1}}}).shadow
        assert current.version == expected


def test_update_after_delete_continues_version():
    tombstone, _ = delete_shadow(shadow({"reported": {"a": 1}}, version=5), b"", 1)
    result = update(tombstone, {"state": {"reported": {"b": 2}}})
    assert result.version == 6
    assert result.previous is None
    assert result.shadow.state() == {"reported": {"b": 2}}


def test_update_after_delete_version_check_uses_deleted_version():
    tombstone = Shadow.from_state(None, 5, deleted=True)
    assert update(tombstone, {"state": {}, "version": 5}).version == 6
    assert reject_json(tombstone, {"state": {}, "version": 6}).code == 409


# --- get --------------------------------------------------------------------------------


def test_get_returns_full_document():
    current = shadow({"desired": {"a": 2}, "reported": {"a": 1}}, version=7, timestamp=100)
    document = orjson.loads(get_shadow(current, b'{"clientToken": "g1"}', 200))
    assert document == {
        "state": {"desired": {"a": 2}, "reported": {"a": 1}, "delta": {"a": 2}},
        "metadata": {
            "desired": {"a": {"timestamp": 100}},
            "reported": {"a": {"timestamp": 100}},
            "delta": {"a": {"timestamp": 100}},
        },
        "version": 7,
        "timestamp": 200,
        "clientToken": "g1",
    }


def test_get_without_delta_omits_it():
    current = shadow({"reported": {"a": 1}}, version=7, timestamp=100)
    document = orjson.loads(get_shadow(current, b"", 200))
    assert "delta" not in document["state"]
    assert "delta" not in document["metadata"]
    assert "clientToken" not in document


def test_get_emptied_shadow():
    document = orjson.loads(get_shadow(shadow({}, version=18), b"", 200))
    assert document["state"] == {}
    assert document["metadata"] == {}
    assert document["version"] == 18


@pytest.mark.parametrize("payload", [b"", b"{}", b'{"other": 1}', b"[]", b"5"])
def test_get_ignores_other_content(payload):
    current = shadow({"reported": {"a": 1}})
    assert orjson.loads(get_shadow(current, payload, 1))["version"] == 1


def test_get_missing_shadow_404():
    with pytest.raises(ShadowError) as info:
        get_shadow(None, b'{"clientToken": "g"}', 1, thing_name="dev1")
    error = info.value
    assert (error.code, error.message, error.client_token) == (
        404,
        "No shadow exists with name: 'dev1'",
        "g",
    )


def test_get_deleted_shadow_404():
    tombstone = Shadow.from_state(None, 3, deleted=True)
    with pytest.raises(ShadowError) as info:
        get_shadow(tombstone, b"", 1, thing_name="dev1")
    assert info.value.code == 404


def test_get_named_shadow_404_names_shadow():
    with pytest.raises(ShadowError) as info:
        get_shadow(None, b"", 1, thing_name="dev1", shadow_name="cfg")
    assert info.value.message == "No shadow exists with name: 'cfg'"


def test_get_bad_json_checked_before_404():
    with pytest.raises(ShadowError) as info:
        get_shadow(None, b"{", 1, thing_name="dev1")
    assert (info.value.code, info.value.message) == (400, "Invalid JSON")


def test_get_invalid_client_token():
    with pytest.raises(ShadowError) as info:
        get_shadow(shadow({}), orjson.dumps({"clientToken": "x" * 65}), 1)
    assert info.value.message == "Invalid clientToken"


# --- delete -----------------------------------------------------------------------------


def test_delete_returns_tombstone_and_payload():
    current = shadow({"reported": {"a": 1}}, version=3)
    tombstone, payload = delete_shadow(current, b'{"clientToken": "d1"}', 50)
    assert tombstone.deleted is True
    assert tombstone.version == 3
    assert tombstone.has_delta is False
    assert tombstone.delta_payload(1) is None
    assert orjson.loads(payload) == {"version": 3, "timestamp": 50, "clientToken": "d1"}


def test_delete_missing_shadow_404():
    with pytest.raises(ShadowError) as info:
        delete_shadow(None, b"", 1, thing_name="dev1")
    assert (info.value.code, info.value.message) == (404, "No shadow exists with name: 'dev1'")


def test_delete_twice_404():
    tombstone, _ = delete_shadow(shadow({"reported": {"a": 1}}), b"", 1)
    with pytest.raises(ShadowError) as info:
        delete_shadow(tombstone, b"", 2, thing_name="dev1")
    assert info.value.code == 404


def test_delete_emptied_shadow_accepted():
    tombstone, payload = delete_shadow(shadow({}, version=18), b"", 1)
    assert tombstone.deleted is True
    assert orjson.loads(payload)["version"] == 18


def test_not_found_without_names():
    with pytest.raises(ShadowError) as info:
        get_shadow(None, b"", 1)
    assert info.value.message == "No shadow exists"


# --- reply payloads of an update ----------------------------------------------------------


def test_accepted_payload_echoes_request_state():
    request = {"state": {"reported": {"a": 1, "b": None, "c": [1, 2]}}, "clientToken": "u"}
    accepted = orjson.loads(update(None, request, now=60).accepted_payload())
    assert accepted == {
        "state": {"reported": {"a": 1, "b": None, "c": [1, 2]}},
        "metadata": {
            "reported": {
                "a": {"timestamp": 60},
                "b": {"timestamp": 60},
                "c": [{"timestamp": 60}, {"timestamp": 60}],
            }
        },
        "version": 1,
        "timestamp": 60,
        "clientToken": "u",
    }


def test_delta_payload_same_version_as_accepted():
    current = shadow({"reported": {"a": 1}}, version=4)
    result = update(current, {"state": {"desired": {"a": 2}}, "clientToken": "q"}, now=70)
    accepted = orjson.loads(result.accepted_payload())
    delta = orjson.loads(result.delta_payload())
    assert delta["version"] == accepted["version"] == 5
    assert delta["state"] == {"a": 2}
    assert delta["clientToken"] == "q"
    assert delta["timestamp"] == 70


def test_delta_payload_holds_whole_delta():
    current = shadow({"desired": {"a": 1}, "reported": {"a": 0}}, version=4)
    result = update(current, {"state": {"desired": {"b": 2}}})
    assert orjson.loads(result.delta_payload())["state"] == {"a": 1, "b": 2}


def test_documents_payload_previous_and_current():
    current = shadow({"reported": {"a": 1}}, version=4, timestamp=100)
    result = update(current, {"state": {"reported": {"a": 2}}, "clientToken": "z"}, now=200)
    documents = orjson.loads(result.documents_payload())
    assert documents == {
        "previous": {
            "state": {"reported": {"a": 1}},
            "metadata": {"reported": {"a": {"timestamp": 100}}},
            "version": 4,
        },
        "current": {
            "state": {"reported": {"a": 2}},
            "metadata": {"reported": {"a": {"timestamp": 200}}},
            "version": 5,
        },
        "timestamp": 200,
        "clientToken": "z",
    }


def test_documents_previous_null_on_create():
    documents = orjson.loads(update(None, {"state": {"reported": {"a": 1}}}).documents_payload())
    assert documents["previous"] is None
    assert documents["current"]["version"] == 1


def test_documents_previous_null_after_delete():
    tombstone = Shadow.from_state(None, 5, deleted=True)
    documents = orjson.loads(update(tombstone, {"state": {}}).documents_payload())
    assert documents["previous"] is None
    assert documents["current"] == {"state": {}, "metadata": {}, "version": 6}


def test_documents_current_has_no_delta():
    current = shadow({"desired": {"a": 1}}, version=1)
    documents = orjson.loads(update(current, {"state": {"reported": {"a": 0}}}).documents_payload())
    assert "delta" not in documents["current"]["state"]


def test_reply_payloads_can_be_built_repeatedly():
    result = update(shadow({"reported": {"a": 1}}), {"state": {"desired": {"a": 2}}})
    assert result.delta_payload() == result.delta_payload()
    assert result.documents_payload() == result.documents_payload()
    assert result.accepted_payload() == result.accepted_payload()


# --- rejection_client_token ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "token"),
    [
        (b'{"clientToken": "abc", "state": {}}', "abc"),
        (b'{"clientToken": 5}', None),
        (b"{", None),
        (b"", None),
        (b"\xff", None),
        (b"[1]", None),
    ],
)
def test_rejection_client_token(payload, token):
    assert rejection_client_token(payload) == token
