"""The shadow feed at /ws: requests, frames, coalescing and slow clients, with the
``websockets`` client against a real engine fed by MQTT and REST."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from api_harness import EngineApiThread, http_client, running_engine
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from conftest import scaled
from ironshadow.api.feed import (
    MAX_SUBSCRIPTIONS,
    FeedConfig,
    check_subscription,
    encode_change,
)
from ironshadow.engine import StorageConfig
from ironshadow.engine.service import ShadowChange
from ironshadow.shadow import Shadow
from mqtt_client import TestClient

HOST = "127.0.0.1"


@pytest.fixture
def engine() -> Iterator[EngineApiThread]:
    with running_engine() as thread:
        yield thread


@pytest.fixture
def device(engine: EngineApiThread) -> TestClient:
    return TestClient(engine.mqtt_port, "feed-test-device")


@contextlib.contextmanager
def feed_client(thread: EngineApiThread, **options: Any) -> Iterator[ClientConnection]:
    url = f"ws://{HOST}:{thread.http_port}/ws"
    with connect(url, open_timeout=scaled(10), **options) as websocket:
        yield websocket


def request(websocket: ClientConnection, document: Any) -> dict[str, Any]:
    """Send a request and return the reply."""
    websocket.send(document if isinstance(document, str) else json.dumps(document))
    return next_frame(websocket)


def next_frame(websocket: ClientConnection, timeout: float = 10.0) -> dict[str, Any]:
    return json.loads(websocket.recv(timeout=scaled(timeout)))


def update(
    device: TestClient, thing: str, state: dict[str, Any], shadow: str | None = None
) -> None:
    """Publish a shadow update over MQTT and wait for its PUBACK, sent once it is applied."""
    topic = f"$aws/things/{thing}/shadow"
    if shadow is not None:
        topic += f"/name/{shadow}"
    device.publish(topic + "/update", json.dumps({"state": state}), qos=1)


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + scaled(timeout)
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


# --- requests ------------------------------------------------------------------------------


def test_feed_subscribe_and_unsubscribe(engine: EngineApiThread) -> None:
    with feed_client(engine) as websocket:
        first = request(websocket, {"subscribe": ["press-7", "line-2*"]})
        second = request(websocket, {"unsubscribe": ["press-7"], "subscribe": ["*"]})
        third = request(websocket, {"unsubscribe": ["*", "never-subscribed"]})

    assert first == {"subscriptions": ["line-2*", "press-7"]}
    assert second == {"subscriptions": ["*", "line-2*"]}
    assert third == {"subscriptions": ["line-2*"]}


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ("not json", "invalid JSON"),
        ([], "a request must be a JSON object"),
        ({}, "a request must be a JSON object"),
        ({"watch": ["press-7"]}, "unknown request member 'watch'"),
        ({"subscribe": "press-7"}, "'subscribe' must be a list of strings"),
        ({"unsubscribe": [7]}, "'unsubscribe' must be a list of strings"),
        ({"subscribe": ["line-2/*"]}, "invalid subscription 'line-2/*'"),
        ({"subscribe": ["a*b"]}, "invalid subscription 'a*b'"),
        ({"subscribe": [""]}, "invalid subscription ''"),
        ({"subscribe": ["**"]}, "invalid subscription '**'"),
    ],
)
def test_feed_rejects_invalid_request(
    engine: EngineApiThread, document: Any, message: str
) -> None:
    with feed_client(engine) as websocket:
        reply = request(websocket, document)
        after = request(websocket, {"subscribe": []})

    assert set(reply) == {"error"}
    assert message in reply["error"]
    assert after == {"subscriptions": []}


def test_feed_request_is_applied_whole_or_not(engine: EngineApiThread) -> None:
    with feed_client(engine) as websocket:
        request(websocket, {"subscribe": ["kept"]})
        reply = request(websocket, {"unsubscribe": ["kept"], "subscribe": ["fine", "bad/name"]})
        after = request(websocket, {"subscribe": []})

    assert "invalid subscription 'bad/name'" in reply["error"]
    assert after == {"subscriptions": ["kept"]}


def test_feed_limits_subscriptions(engine: EngineApiThread) -> None:
    names = [f"thing-{index}" for index in range(MAX_SUBSCRIPTIONS)]
    with feed_client(engine) as websocket:
        full = request(websocket, {"subscribe": names})
        over = request(websocket, {"subscribe": ["one-more"]})

    assert len(full["subscriptions"]) == MAX_SUBSCRIPTIONS
    assert over["error"].startswith(f"too many subscriptions: {MAX_SUBSCRIPTIONS + 1}")


def test_feed_binary_request_closes_with_1003(engine: EngineApiThread) -> None:
    with feed_client(engine) as websocket:
        websocket.send(b'{"subscribe": ["press-7"]}')
        with pytest.raises(ConnectionClosed) as closed:
            websocket.recv(timeout=scaled(10))

    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1003


# --- frames --------------------------------------------------------------------------------


def test_feed_frame_carries_shadow_state(engine: EngineApiThread, device: TestClient) -> None:
    with feed_client(engine) as websocket:
        request(websocket, {"subscribe": ["press-7"]})
        before = int(time.time())
        update(device, "press-7", {"reported": {"speed": 1}, "desired": {"speed": 3}})
        frame = next_frame(websocket)

    assert set(frame) == {"thing", "shadow", "version", "deleted", "state", "timestamp"}
    assert frame["thing"] == "press-7"
    assert frame["shadow"] is None
    assert frame["version"] == 1
    assert frame["deleted"] is False
    assert frame["state"] == {
        "desired": {"speed": 3},
        "reported": {"speed": 1},
        "delta": {"speed": 3},
    }
    assert before <= frame["timestamp"] <= int(time.time())


def test_feed_frames_for_named_shadow_and_delete(
    engine: EngineApiThread, device: TestClient
) -> None:
    with feed_client(engine) as websocket:
        request(websocket, {"subscribe": ["press-7"]})
        update(device, "press-7", {"reported": {"firmware": "1.2"}}, shadow="firmware")
        named = next_frame(websocket)
        device.publish("$aws/things/press-7/shadow/name/firmware/delete", b"", qos=1)
        deleted = next_frame(websocket)

    assert named["shadow"] == "firmware"
    assert named["state"] == {"reported": {"firmware": "1.2"}}
    assert deleted["shadow"] == "firmware"
    assert deleted["deleted"] is True
    assert deleted["state"] is None
    assert deleted["version"] == 1


def test_feed_sends_only_subscribed_things(engine: EngineApiThread, device: TestClient) -> None:
    with feed_client(engine) as websocket:
        request(websocket, {"subscribe": ["press-7", "line-2*"]})
        update(device, "press-8", {"reported": {"n": 1}})
        update(device, "line-3-robot", {"reported": {"n": 2}})
        update(device, "line-2-robot", {"reported": {"n": 3}})
        update(device, "press-7", {"reported": {"n": 4}})
        first = next_frame(websocket)
        second = next_frame(websocket)

    assert first["thing"] == "line-2-robot"
    assert second["thing"] == "press-7"


def test_feed_sends_one_frame_for_overlapping_subscriptions(
    engine: EngineApiThread, device: TestClient
) -> None:
    with feed_client(engine) as websocket:
        request(websocket, {"subscribe": ["press-7", "press-*", "*"]})
        update(device, "press-7", {"reported": {"n": 1}})
        update(device, "other", {"reported": {"n": 2}})
        first = next_frame(websocket)
        second = next_frame(websocket)

    assert first["thing"] == "press-7"
    assert second["thing"] == "other"


def test_feed_receives_rest_updates(engine: EngineApiThread) -> None:
    with feed_client(engine) as websocket, http_client(engine) as http:
        request(websocket, {"subscribe": ["*"]})
        response = http.post(
            "/things/valve-3/shadow", content=json.dumps({"state": {"desired": {"open": True}}})
        )
        frame = next_frame(websocket)

    assert response.status_code == 200
    assert frame["thing"] == "valve-3"
    assert frame["state"] == {"desired": {"open": True}, "delta": {"open": True}}


def test_feed_with_durable_store(tmp_path: Any) -> None:
    with running_engine(storage=StorageConfig(tmp_path)) as thread:
        device = TestClient(thread.mqtt_port, "durable-device")
        with feed_client(thread) as websocket:
            request(websocket, {"subscribe": ["press-7"]})
            update(device, "press-7", {"reported": {"speed": 2}})
            frame = next_frame(websocket)

    assert frame["thing"] == "press-7"
    assert frame["version"] == 1
    assert frame["state"] == {"reported": {"speed": 2}}


def test_feed_metrics(engine: EngineApiThread, device: TestClient) -> None:
    with feed_client(engine) as websocket, http_client(engine) as http:
        request(websocket, {"subscribe": ["*"]})
        update(device, "press-7", {"reported": {"speed": 2}})
        next_frame(websocket)
        lines = http.get("/metrics").text.splitlines()

    assert "ironshadow_feed_clients 1" in lines
    assert "ironshadow_feed_frames_sent_total 1" in lines
    assert "ironshadow_feed_clients_dropped_total 0" in lines
    assert "ironshadow_mqtt_websocket_connections 0" in lines


def test_feed_listens_only_while_subscribed(engine: EngineApiThread) -> None:
    service = engine.engine.shadows

    def listening() -> bool:
        return engine.call(lambda: service.change_listener is not None)

    assert not listening()
    with feed_client(engine) as websocket:
        request(websocket, {"subscribe": ["press-7"]})
        assert listening()
        request(websocket, {"unsubscribe": ["press-7"]})
        assert not listening()
        request(websocket, {"subscribe": ["line-*"]})
        assert listening()
    assert wait_until(lambda: not listening())


def test_feed_close_at_shutdown_is_1001(engine: EngineApiThread) -> None:
    with feed_client(engine) as websocket:
        request(websocket, {"subscribe": ["*"]})
        engine.stop()
        with pytest.raises(ConnectionClosed) as closed:
            websocket.recv(timeout=scaled(10))

    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1001


# --- coalescing ----------------------------------------------------------------------------


def test_feed_coalesces_fast_updates(engine: EngineApiThread, device: TestClient) -> None:
    rate = FeedConfig().rate
    count = 50
    frames: list[dict[str, Any]] = []
    with feed_client(engine) as websocket:
        request(websocket, {"subscribe": ["press-7"]})
        started = time.monotonic()
        for counter in range(count):
            update(device, "press-7", {"reported": {"counter": counter}})
        while not frames or frames[-1]["version"] < count:
            frames.append(next_frame(websocket))
        elapsed = time.monotonic() - started
        with pytest.raises(TimeoutError):
            websocket.recv(timeout=scaled(2 / rate))

    versions = [frame["version"] for frame in frames]
    assert len(frames) < count
    # At most one frame at once and `rate` per second after it, plus one in progress.
    assert len(frames) <= rate * elapsed + 2
    assert versions == sorted(set(versions))
    assert frames[-1]["state"] == {"reported": {"counter": count - 1}}


def test_feed_rate_zero_sends_every_change() -> None:
    with running_engine(feed=FeedConfig(rate=0)) as thread:
        device = TestClient(thread.mqtt_port, "every-change")
        with feed_client(thread) as websocket:
            request(websocket, {"subscribe": ["press-7"]})
            for counter in range(10):
                update(device, "press-7", {"reported": {"counter": counter}})
            frames = [next_frame(websocket) for _ in range(10)]

    assert [frame["version"] for frame in frames] == list(range(1, 11))


# --- slow clients --------------------------------------------------------------------------


def test_feed_drops_stalled_client(caplog: pytest.LogCaptureFixture) -> None:
    max_queue = 20
    with running_engine(feed=FeedConfig(max_queue=max_queue)) as thread:
        feed = thread.api.app.state.feed
        publisher = TestClient(thread.mqtt_port, "bulk-publisher", connect=False)
        # The shadow service rejects more than 10 requests in flight from one client.
        publisher.client.max_inflight_messages_set(10)
        publisher.connect()
        # A small receive buffer, a one-message queue and no compression make the client's
        # side hold little, so the engine's side fills up soon.
        sock = socket.create_connection((HOST, thread.http_port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        with (
            feed_client(thread, sock=sock, max_queue=1, compression=None) as stalled,
            feed_client(thread) as healthy,
        ):
            request(stalled, {"subscribe": ["bulk-*"]})
            request(healthy, {"subscribe": ["bulk-*"]})
            received: dict[str, int] = {}
            reader = threading.Thread(target=_read_versions, args=(healthy, received))
            reader.start()

            def dropped() -> int:
                return thread.call(lambda: feed.clients_dropped)

            published = 0
            while not dropped() and published < 5000:
                infos = []
                for index in range(published, published + 50):
                    # Random bytes, so that no layer compresses the frames much.
                    state = {"reported": {"blob": base64.b64encode(os.urandom(4500)).decode()}}
                    topic = f"$aws/things/bulk-{index}/shadow/update"
                    infos.append(
                        publisher.publish(topic, json.dumps({"state": state}), 1, wait=False)
                    )
                for info in infos:
                    info.wait_for_publish(scaled(10))
                published += 50
            assert wait_until(lambda: len(received) == published)
            drop_count = dropped()
            clients = thread.call(lambda: len(feed.clients))
            # The stalled client reads at last, with a larger buffer to read faster: the
            # frames that the engine had handed over, then the close frame.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    stalled.recv(timeout=scaled(10))
            healthy.close()
            reader.join(scaled(10))

    assert drop_count == 1
    assert clients == 1
    assert all(version == 1 for version in received.values())
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1008
    assert closed.value.rcvd.reason == f"too slow: more than {max_queue} frames waiting"
    drops = [record for record in caplog.records if "feed client" in record.getMessage()]
    assert len(drops) == 1
    assert f"the maximum is {max_queue}" in drops[0].getMessage()


def _read_versions(websocket: ClientConnection, received: dict[str, int]) -> None:
    with contextlib.suppress(ConnectionClosed, TimeoutError):
        while True:
            frame = json.loads(websocket.recv(timeout=scaled(30)))
            received[frame["thing"]] = frame["version"]


# --- without sockets -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "valid"),
    [
        ("press-7", True),
        ("a:b_c-D9", True),
        ("line-2*", True),
        ("*", True),
        ("x" * 128, True),
        ("x" * 128 + "*", True),
        ("x" * 129, False),
        ("line-2/*", False),
        ("*line", False),
        ("li*ne", False),
        ("**", False),
        ("", False),
        ("press 7", False),
    ],
)
def test_check_subscription(entry: str, valid: bool) -> None:
    error = check_subscription(entry)

    if valid:
        assert error is None
    else:
        assert error is not None
        assert repr(entry) in error


def test_encode_change_of_tombstone() -> None:
    tombstone = Shadow.from_state(None, 4, deleted=True)

    frame = json.loads(encode_change(ShadowChange("press-7", "firmware", tombstone, 1700000000)))

    assert frame == {
        "thing": "press-7",
        "shadow": "firmware",
        "version": 4,
        "deleted": True,
        "state": None,
        "timestamp": 1700000000,
    }


def test_encode_change_without_delta() -> None:
    shadow = Shadow.from_state({"reported": {"speed": 3}, "desired": {"speed": 3}}, 2)

    frame = json.loads(encode_change(ShadowChange("press-7", None, shadow, 1700000000)))

    assert frame["state"] == {"desired": {"speed": 3}, "reported": {"speed": 3}}
    assert frame["version"] == 2
