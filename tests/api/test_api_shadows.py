"""GET, POST and DELETE /things/{thing}/shadow over real HTTP, with MQTT side effects."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from api_harness import EngineApiThread, http_client, running_engine

from mqtt_client import TestClient

SHADOW_PREFIX = "$aws/things/{thing}/shadow"


@pytest.fixture
def engine() -> Iterator[EngineApiThread]:
    with running_engine() as thread:
        yield thread


@pytest.fixture
def client(engine: EngineApiThread) -> Iterator[httpx.Client]:
    with http_client(engine) as client:
        yield client


def update(
    client: httpx.Client, thing: str, document: Any, name: str | None = None
) -> httpx.Response:
    body = document if isinstance(document, bytes) else json.dumps(document).encode()
    params = {} if name is None else {"name": name}
    return client.post(f"/things/{thing}/shadow", content=body, params=params)


def get(
    client: httpx.Client, thing: str, name: str | None = None, body: bytes = b""
) -> httpx.Response:
    params = {} if name is None else {"name": name}
    return client.request("GET", f"/things/{thing}/shadow", params=params, content=body)


def delete(client: httpx.Client, thing: str, name: str | None = None) -> httpx.Response:
    params = {} if name is None else {"name": name}
    return client.delete(f"/things/{thing}/shadow", params=params)


def assert_error(response: httpx.Response, status: int, message: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    document = response.json()
    assert document["code"] == status
    assert isinstance(document["timestamp"], int)
    if message is not None:
        assert document["message"] == message
    return document


# --- updates and gets --------------------------------------------------------------------


def test_update_creates_classic_shadow(client: httpx.Client) -> None:
    response = update(client, "press-1", {"state": {"desired": {"speed": 1200}}})

    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    accepted = response.json()
    assert accepted["state"] == {"desired": {"speed": 1200}}
    assert accepted["version"] == 1
    assert set(accepted["metadata"]["desired"]["speed"]) == {"timestamp"}
    assert isinstance(accepted["timestamp"], int)


def test_get_returns_merged_state_and_delta(client: httpx.Client) -> None:
    update(client, "press-2", {"state": {"desired": {"speed": 1200, "mode": "auto"}}})
    update(client, "press-2", {"state": {"reported": {"speed": 900, "mode": "auto"}}})

    response = get(client, "press-2")

    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    document = response.json()
    assert document["state"]["desired"] == {"speed": 1200, "mode": "auto"}
    assert document["state"]["reported"] == {"speed": 900, "mode": "auto"}
    assert document["state"]["delta"] == {"speed": 1200}
    assert document["version"] == 2
    assert "speed" in document["metadata"]["delta"]


def test_version_goes_up_per_update(client: httpx.Client) -> None:
    versions = [
        update(client, "press-3", {"state": {"reported": {"count": count}}}).json()["version"]
        for count in range(4)
    ]

    assert versions == [1, 2, 3, 4]


def test_named_shadow_is_separate(client: httpx.Client) -> None:
    update(client, "press-4", {"state": {"reported": {"classic": True}}})
    named = update(client, "press-4", {"state": {"reported": {"firmware": "2.1"}}}, "firmware")

    assert named.status_code == 200
    assert named.json()["version"] == 1
    assert get(client, "press-4", "firmware").json()["state"]["reported"] == {"firmware": "2.1"}
    assert get(client, "press-4").json()["state"]["reported"] == {"classic": True}


def test_client_token_echoed(client: httpx.Client) -> None:
    accepted = update(client, "press-5", {"state": {"desired": {"a": 1}}, "clientToken": "t-1"})
    got = get(client, "press-5", body=b'{"clientToken": "t-2"}')

    assert accepted.json()["clientToken"] == "t-1"
    assert got.json()["clientToken"] == "t-2"


def test_update_with_matching_version(client: httpx.Client) -> None:
    update(client, "press-6", {"state": {"desired": {"a": 1}}})

    response = update(client, "press-6", {"state": {"desired": {"a": 2}}, "version": 1})

    assert response.status_code == 200
    assert response.json()["version"] == 2


def test_update_after_mqtt_update(engine: EngineApiThread, client: httpx.Client) -> None:
    device = TestClient(engine.mqtt_port, client_id="press-7")
    topic = SHADOW_PREFIX.format(thing="press-7")
    device.subscribe(topic + "/update/accepted", qos=1)
    device.publish(topic + "/update", json.dumps({"state": {"reported": {"t": 20}}}), qos=1)
    device.expect()

    document = get(client, "press-7").json()

    assert document["state"]["reported"] == {"t": 20}
    assert document["version"] == 1


# --- deletes --------------------------------------------------------------------------


def test_delete_then_get_is_404(client: httpx.Client) -> None:
    update(client, "press-8", {"state": {"reported": {"a": 1}}})
    update(client, "press-8", {"state": {"reported": {"a": 2}}})

    deleted = delete(client, "press-8")

    assert deleted.status_code == 200
    assert deleted.headers["content-type"] == "application/json"
    assert deleted.json()["version"] == 2
    document = assert_error(get(client, "press-8"), 404)
    assert document["message"].startswith("No shadow exists")


def test_delete_named_keeps_classic(client: httpx.Client) -> None:
    update(client, "press-9", {"state": {"reported": {"a": 1}}})
    update(client, "press-9", {"state": {"reported": {"b": 1}}}, "extra")

    assert delete(client, "press-9", "extra").status_code == 200

    assert_error(get(client, "press-9", "extra"), 404)
    assert get(client, "press-9").status_code == 200


def test_delete_missing_shadow_is_404(client: httpx.Client) -> None:
    assert_error(delete(client, "never-created"), 404)
    assert_error(delete(client, "never-created", "config"), 404)


def test_get_missing_shadow_is_404(client: httpx.Client) -> None:
    document = assert_error(get(client, "never-created", body=b'{"clientToken": "g-1"}'), 404)

    assert document["clientToken"] == "g-1"


def test_update_after_delete_continues_version(client: httpx.Client) -> None:
    update(client, "press-10", {"state": {"reported": {"a": 1}}})
    delete(client, "press-10")

    response = update(client, "press-10", {"state": {"reported": {"a": 2}}})

    assert response.status_code == 200
    assert response.json()["version"] > 1


# --- rejected requests ----------------------------------------------------------------


def test_invalid_json_is_400(client: httpx.Client) -> None:
    assert_error(update(client, "press-11", b"{not json"), 400, "Invalid JSON")


def test_non_utf8_body_is_415(client: httpx.Client) -> None:
    assert_error(
        update(client, "press-12", b'{"state": "\xff\xfe"}'),
        415,
        "Unsupported documented encoding; supported encoding is UTF-8",
    )


def test_missing_state_is_400(client: httpx.Client) -> None:
    document = assert_error(
        update(client, "press-13", {"clientToken": "m-1"}), 400, "Missing required node: state"
    )

    assert document["clientToken"] == "m-1"


def test_empty_update_body_is_400(client: httpx.Client) -> None:
    assert_error(update(client, "press-14", b""), 400)


def test_version_conflict_is_409(client: httpx.Client) -> None:
    update(client, "press-15", {"state": {"desired": {"a": 1}}})

    stale = {"state": {"desired": {"a": 2}}, "version": 7, "clientToken": "v"}
    document = assert_error(
        update(client, "press-15", stale),
        409,
        "Version conflict",
    )

    assert document["clientToken"] == "v"
    assert get(client, "press-15").json()["state"]["desired"] == {"a": 1}


def test_state_over_8_kb_is_413(client: httpx.Client) -> None:
    response = update(client, "press-16", {"state": {"desired": {"blob": "x" * 9000}}})

    assert_error(response, 413, "The payload exceeds the maximum size allowed")
    assert_error(get(client, "press-16"), 404)


def test_body_over_limit_is_413() -> None:
    with running_engine(max_body_bytes=1024) as engine, http_client(engine) as client:
        response = update(client, "press-17", {"state": {"desired": {"blob": "x" * 2000}}})
        document = assert_error(response, 413)
        assert "1024 bytes" in document["message"]

        small = update(client, "press-17", {"state": {"desired": {"a": 1}}})
        assert small.status_code == 200


def test_chunked_body_over_limit_is_413() -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"state": {"desired": {"blob": "'
        for _ in range(10):
            yield b"x" * 500
        yield b'"}}}'

    with running_engine(max_body_bytes=1024) as engine, http_client(engine) as client:
        response = client.post("/things/press-18/shadow", content=chunks())

        assert_error(response, 413)


@pytest.mark.parametrize(
    ("thing", "fragment"),
    [
        ("bad%20name", "Invalid thing name"),
        ("a" * 129, "maximum is 128"),
        ("semi;colon", "Invalid thing name"),
    ],
)
def test_bad_thing_name_is_400(client: httpx.Client, thing: str, fragment: str) -> None:
    for response in (
        client.post(f"/things/{thing}/shadow", content=b'{"state": {"desired": {"a": 1}}}'),
        client.get(f"/things/{thing}/shadow"),
        client.delete(f"/things/{thing}/shadow"),
    ):
        document = assert_error(response, 400)
        assert fragment in document["message"]


@pytest.mark.parametrize("name", ["", "a b", "x" * 65, "tilde~name"])
def test_bad_shadow_name_is_400(client: httpx.Client, name: str) -> None:
    for response in (
        update(client, "press-19", {"state": {"desired": {"a": 1}}}, name),
        get(client, "press-19", name),
        delete(client, "press-19", name),
    ):
        document = assert_error(response, 400)
        assert "shadow name" in document["message"]


def test_unsupported_method_is_405(client: httpx.Client) -> None:
    response = client.put("/things/press-20/shadow", content=b"{}")

    document = assert_error(response, 405)
    assert response.headers["allow"] == "DELETE, GET, POST"
    assert "DELETE, GET, POST" in document["message"]


# --- MQTT side effects --------------------------------------------------------------------


def test_update_publishes_delta_and_documents(
    engine: EngineApiThread, client: httpx.Client
) -> None:
    topic = SHADOW_PREFIX.format(thing="robot-1")
    device = TestClient(engine.mqtt_port, client_id="robot-1")
    device.subscribe(topic + "/update/delta", qos=1)
    device.subscribe(topic + "/update/documents", qos=1)

    response = update(client, "robot-1", {"state": {"desired": {"arm": "up"}}, "clientToken": "r"})
    assert response.status_code == 200

    messages = [device.expect(), device.expect()]
    received = {message.topic: json.loads(message.payload) for message in messages}
    delta = received[topic + "/update/delta"]
    assert delta["state"] == {"arm": "up"}
    assert delta["version"] == 1
    assert delta["clientToken"] == "r"
    documents = received[topic + "/update/documents"]
    assert documents["previous"] is None
    assert documents["current"]["state"]["desired"] == {"arm": "up"}
    assert documents["current"]["version"] == 1


def test_update_of_named_shadow_publishes_on_named_topic(
    engine: EngineApiThread, client: httpx.Client
) -> None:
    topic = SHADOW_PREFIX.format(thing="robot-2") + "/name/gripper/update/delta"
    device = TestClient(engine.mqtt_port, client_id="robot-2")
    device.subscribe(topic, qos=1)

    update(client, "robot-2", {"state": {"desired": {"force": 5}}}, "gripper")

    message = device.expect()
    assert message.topic == topic
    assert json.loads(message.payload)["state"] == {"force": 5}


def test_update_without_delta_publishes_no_delta(
    engine: EngineApiThread, client: httpx.Client
) -> None:
    topic = SHADOW_PREFIX.format(thing="robot-3")
    device = TestClient(engine.mqtt_port, client_id="robot-3")
    device.subscribe(topic + "/update/delta", qos=1)

    response = update(client, "robot-3", {"state": {"reported": {"arm": "down"}}})

    assert response.status_code == 200
    device.expect_none()


def test_rejected_update_publishes_nothing(engine: EngineApiThread, client: httpx.Client) -> None:
    topic = SHADOW_PREFIX.format(thing="robot-4")
    device = TestClient(engine.mqtt_port, client_id="robot-4")
    device.subscribe(topic + "/#", qos=1)

    assert_error(update(client, "robot-4", b"{broken"), 400)
    assert_error(get(client, "robot-4"), 404)

    device.expect_none()
