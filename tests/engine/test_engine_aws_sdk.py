"""The AWS IoT Device SDK v2 for Python (``awsiotsdk``), unchanged, against ``ironshadow serve``.

The SDK's connection builders in ``awsiot.mqtt_connection_builder`` (awsiotsdk 1.31.0)
always create a TLS context. So these tests build the connection from the SDK's own
runtime: ``awscrt.mqtt.Client`` with ``tls_ctx=None`` for MQTT 3.1.1, and
``awscrt.mqtt5.Client`` without ``tls_ctx`` for MQTT 5. Both open plain TCP connections to
the engine on loopback. The shadow clients (``IotShadowClient`` and ``IotShadowClientV2``)
are used exactly as a device would use them.

The engine runs as ``python -m ironshadow serve`` in a subprocess on free ports, one per
module, and every test uses its own thing names.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from awscrt import mqtt, mqtt5, mqtt_request_response
from awsiot import ServiceStreamOptions, V2ServiceException, iotshadow

from conftest import free_port, scaled

# The SDK's native library (awscrt) has crashed the whole test process with a segmentation
# fault now and then, in its own threads. So the suite runs this module in a child pytest
# process (test_engine_aws_sdk_child.py), where a crash fails only these tests.
CHILD_VARIABLE = "IRONSHADOW_AWS_SDK_CHILD"
pytestmark = pytest.mark.skipif(
    os.environ.get(CHILD_VARIABLE) != "1",
    reason=f"runs in a child pytest process, started by test_engine_aws_sdk_child.py "
    f"(or set {CHILD_VARIABLE}=1)",
)

HOST = "127.0.0.1"
ENGINE_START_TIMEOUT_S = 15.0
ENGINE_STOP_TIMEOUT_S = 15.0
RESPONSE_TIMEOUT_S = 10.0
KEEP_ALIVE_S = 30
QOS1 = mqtt.QoS.AT_LEAST_ONCE

# Limits of the V2 request-response client: subscriptions it may hold at once for
# requests (update, get and delete need two each) and for streams.
V2_REQUEST_SUBSCRIPTIONS = 6
V2_STREAM_SUBSCRIPTIONS = 2
V2_OPERATION_TIMEOUT_S = 10


# --- The engine under test -------------------------------------------------------------

# Runs `python -m ironshadow` after asking Linux to send the engine SIGTERM when the test
# process dies (prctl PR_SET_PDEATHSIG, option 1). A killed pytest runs no fixture
# teardown, and without this the engine would keep running with no parent.
ENGINE_LAUNCHER = (
    "import ctypes, runpy, signal;"
    " ctypes.CDLL(None).prctl(1, signal.SIGTERM);"
    " runpy.run_module('ironshadow', run_name='__main__', alter_sys=True)"
)


class EngineProcess:
    """``ironshadow serve`` in a subprocess, stopped by its PID with SIGTERM."""

    def __init__(self, data_dir: Path) -> None:
        self.port = free_port()
        self.log_path = data_dir.parent / "engine.log"
        command = [
            sys.executable, "-c", ENGINE_LAUNCHER, "serve",
            "--host", HOST,
            "--mqtt-port", str(self.port),
            "--http-port", str(free_port()),
            "--data-dir", str(data_dir),
        ]  # fmt: skip
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:]) or "(no output)"

    def wait_for_port(self) -> None:
        deadline = time.monotonic() + scaled(ENGINE_START_TIMEOUT_S)
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"ironshadow serve exited with code {self.process.returncode} at start:\n"
                    f"{self.log_tail()}"
                )
            try:
                socket.create_connection((HOST, self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(
            f"ironshadow serve did not listen on port {self.port} within"
            f" {ENGINE_START_TIMEOUT_S:g} s:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(scaled(ENGINE_STOP_TIMEOUT_S))
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineProcess]:
    data_dir = tmp_path_factory.mktemp("aws-sdk") / "data"
    process = EngineProcess(data_dir)
    try:
        process.wait_for_port()
        yield process
    finally:
        process.stop()
    assert process.process.returncode == 0, (
        f"ironshadow serve exited with code {process.process.returncode} after SIGTERM:\n"
        f"{process.log_tail()}"
    )


def unique_thing(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def result_of(future: Future[Any], description: str) -> Any:
    try:
        return future.result(scaled(RESPONSE_TIMEOUT_S))
    except TimeoutError:
        raise AssertionError(
            f"timed out after {RESPONSE_TIMEOUT_S:g} s waiting for {description}"
        ) from None


# --- SDK connections without TLS ------------------------------------------------------


@pytest.fixture
def connect_mqtt3(engine: EngineProcess) -> Iterator[Callable[[str], mqtt.Connection]]:
    """Return a factory of connected MQTT 3.1.1 connections, disconnected after the test."""
    connections: list[mqtt.Connection] = []

    def connect(client_id: str) -> mqtt.Connection:
        # tls_ctx=None makes the SDK runtime open a plain TCP connection.
        client = mqtt.Client(None, tls_ctx=None)
        connection = mqtt.Connection(
            client, HOST, engine.port, client_id, clean_session=True, keep_alive_secs=KEEP_ALIVE_S
        )
        result_of(connection.connect(), f"CONNACK for {client_id}")
        connections.append(connection)
        return connection

    yield connect
    for connection in connections:
        connection.disconnect().result(scaled(RESPONSE_TIMEOUT_S))


@pytest.fixture
def connect_mqtt5(engine: EngineProcess) -> Iterator[Callable[[str], mqtt5.Client]]:
    """Return a factory of started and connected MQTT 5 clients, stopped after the test."""
    clients: list[tuple[mqtt5.Client, threading.Event]] = []

    def connect(client_id: str) -> mqtt5.Client:
        connected = threading.Event()
        stopped = threading.Event()
        options = mqtt5.ClientOptions(
            host_name=HOST,
            port=engine.port,
            connect_options=mqtt5.ConnectPacket(
                client_id=client_id, keep_alive_interval_sec=KEEP_ALIVE_S
            ),
            on_lifecycle_event_connection_success_fn=lambda _event: connected.set(),
            on_lifecycle_event_stopped_fn=lambda _event: stopped.set(),
        )
        client = mqtt5.Client(options)
        client.start()
        clients.append((client, stopped))
        if not connected.wait(scaled(RESPONSE_TIMEOUT_S)):
            raise AssertionError(
                f"MQTT 5 client {client_id} did not connect within {RESPONSE_TIMEOUT_S:g} s"
            )
        return client

    yield connect
    # Wait until each client has stopped: a client released while its native side is still
    # shutting down has crashed the process (see CHILD_VARIABLE above).
    for client, stopped in clients:
        client.stop()
        if not stopped.wait(scaled(RESPONSE_TIMEOUT_S)):
            raise AssertionError(f"MQTT 5 client did not stop within {RESPONSE_TIMEOUT_S:g} s")


# --- V1 client: IotShadowClient with callbacks ----------------------------------------


class ShadowResponses:
    """Queues of the responses an ``IotShadowClient`` receives for one thing.

    The constructor subscribes to the thing's response topics. Each kind
    (``update_accepted``, ``delta`` and so on) has its own queue, filled from the SDK's
    callbacks on its event-loop thread.
    """

    def __init__(self, client: iotshadow.IotShadowClient, thing: str) -> None:
        self.queues: dict[str, queue.Queue[Any]] = {}
        subscriptions = {
            "update_accepted": (
                client.subscribe_to_update_shadow_accepted,
                iotshadow.UpdateShadowSubscriptionRequest,
            ),
            "update_rejected": (
                client.subscribe_to_update_shadow_rejected,
                iotshadow.UpdateShadowSubscriptionRequest,
            ),
            "get_accepted": (
                client.subscribe_to_get_shadow_accepted,
                iotshadow.GetShadowSubscriptionRequest,
            ),
            "get_rejected": (
                client.subscribe_to_get_shadow_rejected,
                iotshadow.GetShadowSubscriptionRequest,
            ),
            "delete_accepted": (
                client.subscribe_to_delete_shadow_accepted,
                iotshadow.DeleteShadowSubscriptionRequest,
            ),
            "delete_rejected": (
                client.subscribe_to_delete_shadow_rejected,
                iotshadow.DeleteShadowSubscriptionRequest,
            ),
            "delta": (
                client.subscribe_to_shadow_delta_updated_events,
                iotshadow.ShadowDeltaUpdatedSubscriptionRequest,
            ),
        }
        for kind, (subscribe, request_class) in subscriptions.items():
            self.queues[kind] = queue.Queue()
            suback, _topic = subscribe(request_class(thing_name=thing), QOS1, self.queues[kind].put)
            result_of(suback, f"SUBACK for {kind} of {thing}")

    def expect(self, kind: str) -> Any:
        try:
            return self.queues[kind].get(timeout=scaled(RESPONSE_TIMEOUT_S))
        except queue.Empty:
            others = {name: q.qsize() for name, q in self.queues.items() if q.qsize()}
            raise AssertionError(
                f"timed out after {RESPONSE_TIMEOUT_S:g} s waiting for a {kind} message."
                f" Messages queued for other kinds: {others}"
            ) from None


def publish_update(
    client: iotshadow.IotShadowClient, thing: str, token: str, version: int | None = None, **state
) -> None:
    request = iotshadow.UpdateShadowRequest(
        thing_name=thing,
        state=iotshadow.ShadowState(**state),
        client_token=token,
        version=version,
    )
    result_of(client.publish_update_shadow(request, QOS1), f"PUBACK for update {token}")


def publish_get(client: iotshadow.IotShadowClient, thing: str, token: str) -> None:
    request = iotshadow.GetShadowRequest(thing_name=thing, client_token=token)
    result_of(client.publish_get_shadow(request, QOS1), f"PUBACK for get {token}")


def publish_delete(client: iotshadow.IotShadowClient, thing: str, token: str) -> None:
    request = iotshadow.DeleteShadowRequest(thing_name=thing, client_token=token)
    result_of(client.publish_delete_shadow(request, QOS1), f"PUBACK for delete {token}")


def test_v1_update_get_delete(connect_mqtt3):
    thing = unique_thing("sdk-v1")
    client = iotshadow.IotShadowClient(connect_mqtt3(thing))
    responses = ShadowResponses(client, thing)

    publish_update(client, thing, "update-1", reported={"temperature": 21, "fan": "on"})
    accepted = responses.expect("update_accepted")
    assert isinstance(accepted, iotshadow.UpdateShadowResponse)
    assert accepted.version == 1
    assert accepted.client_token == "update-1"
    assert accepted.state.reported == {"temperature": 21, "fan": "on"}
    assert accepted.state.desired is None
    assert set(accepted.metadata.reported) == {"temperature", "fan"}
    assert isinstance(accepted.metadata.reported["temperature"]["timestamp"], int)
    assert isinstance(accepted.timestamp, datetime)

    publish_get(client, thing, "get-1")
    document = responses.expect("get_accepted")
    assert isinstance(document, iotshadow.GetShadowResponse)
    assert document.version == 1
    assert document.client_token == "get-1"
    assert document.state.reported == {"temperature": 21, "fan": "on"}
    assert document.state.desired is None
    assert document.state.delta is None
    assert set(document.metadata.reported) == {"temperature", "fan"}
    assert isinstance(document.timestamp, datetime)

    publish_delete(client, thing, "delete-1")
    deleted = responses.expect("delete_accepted")
    assert isinstance(deleted, iotshadow.DeleteShadowResponse)
    assert deleted.version == 1
    assert deleted.client_token == "delete-1"
    assert isinstance(deleted.timestamp, datetime)

    publish_get(client, thing, "get-2")
    error = responses.expect("get_rejected")
    assert isinstance(error, iotshadow.ErrorResponse)
    assert error.code == 404
    assert error.message == f"No shadow exists with name: '{thing}'"
    assert error.client_token == "get-2"


def test_v1_desired_sends_delta(connect_mqtt3):
    thing = unique_thing("sdk-v1-delta")
    client = iotshadow.IotShadowClient(connect_mqtt3(thing))
    responses = ShadowResponses(client, thing)

    publish_update(client, thing, "report-1", reported={"temperature": 21, "mode": "auto"})
    assert responses.expect("update_accepted").version == 1

    publish_update(client, thing, "desire-1", desired={"temperature": 25, "mode": "auto"})
    accepted = responses.expect("update_accepted")
    assert accepted.version == 2
    assert accepted.client_token == "desire-1"
    assert accepted.state.desired == {"temperature": 25, "mode": "auto"}

    delta = responses.expect("delta")
    assert isinstance(delta, iotshadow.ShadowDeltaUpdatedEvent)
    assert delta.state == {"temperature": 25}
    assert delta.version == 2
    assert delta.client_token == "desire-1"
    assert set(delta.metadata) == {"temperature"}
    assert isinstance(delta.timestamp, datetime)

    publish_get(client, thing, "get-1")
    document = responses.expect("get_accepted")
    assert document.version == 2
    assert document.state.desired == {"temperature": 25, "mode": "auto"}
    assert document.state.reported == {"temperature": 21, "mode": "auto"}
    assert document.state.delta == {"temperature": 25}

    # The device catches up, so the delta is empty and no delta message is sent.
    publish_update(client, thing, "report-2", reported={"temperature": 25})
    assert responses.expect("update_accepted").version == 3

    # The next delta therefore comes from the next desired change, version 4.
    publish_update(client, thing, "desire-2", desired={"mode": "eco"})
    assert responses.expect("update_accepted").version == 4
    delta = responses.expect("delta")
    assert delta.version == 4
    assert delta.state == {"mode": "eco"}
    assert delta.client_token == "desire-2"

    publish_delete(client, thing, "delete-1")
    assert responses.expect("delete_accepted").version == 4


def test_v1_version_conflict_rejected(connect_mqtt3):
    thing = unique_thing("sdk-v1-409")
    client = iotshadow.IotShadowClient(connect_mqtt3(thing))
    responses = ShadowResponses(client, thing)

    publish_update(client, thing, "report-1", reported={"temperature": 21})
    assert responses.expect("update_accepted").version == 1

    publish_update(client, thing, "stale-1", version=7, reported={"temperature": 22})
    error = responses.expect("update_rejected")
    assert isinstance(error, iotshadow.ErrorResponse)
    assert error.code == 409
    assert error.client_token == "stale-1"

    publish_update(client, thing, "matching-1", version=1, reported={"temperature": 23})
    accepted = responses.expect("update_accepted")
    assert accepted.version == 2
    assert accepted.client_token == "matching-1"

    publish_delete(client, thing, "delete-1")
    assert responses.expect("delete_accepted").version == 2


def test_v1_named_shadow_separate(connect_mqtt3):
    thing = unique_thing("sdk-v1-named")
    client = iotshadow.IotShadowClient(connect_mqtt3(thing))
    accepted: queue.Queue[iotshadow.UpdateShadowResponse] = queue.Queue()
    fetched: queue.Queue[iotshadow.GetShadowResponse] = queue.Queue()
    rejected: queue.Queue[iotshadow.ErrorResponse] = queue.Queue()
    subscribe_request = iotshadow.UpdateNamedShadowSubscriptionRequest(
        thing_name=thing, shadow_name="firmware"
    )
    suback, _ = client.subscribe_to_update_named_shadow_accepted(
        subscribe_request, QOS1, accepted.put
    )
    result_of(suback, "SUBACK for named update/accepted")
    get_request = iotshadow.GetNamedShadowSubscriptionRequest(
        thing_name=thing, shadow_name="firmware"
    )
    suback, _ = client.subscribe_to_get_named_shadow_accepted(get_request, QOS1, fetched.put)
    result_of(suback, "SUBACK for named get/accepted")
    classic_request = iotshadow.GetShadowSubscriptionRequest(thing_name=thing)
    suback, _ = client.subscribe_to_get_shadow_rejected(classic_request, QOS1, rejected.put)
    result_of(suback, "SUBACK for classic get/rejected")

    update = iotshadow.UpdateNamedShadowRequest(
        thing_name=thing,
        shadow_name="firmware",
        state=iotshadow.ShadowState(reported={"version": "1.4.2"}),
        client_token="named-1",
    )
    result_of(client.publish_update_named_shadow(update, QOS1), "PUBACK for named update")
    response = accepted.get(timeout=scaled(RESPONSE_TIMEOUT_S))
    assert response.version == 1
    assert response.client_token == "named-1"
    assert response.state.reported == {"version": "1.4.2"}

    get = iotshadow.GetNamedShadowRequest(
        thing_name=thing, shadow_name="firmware", client_token="named-get"
    )
    result_of(client.publish_get_named_shadow(get, QOS1), "PUBACK for named get")
    document = fetched.get(timeout=scaled(RESPONSE_TIMEOUT_S))
    assert document.version == 1
    assert document.client_token == "named-get"
    assert document.state.reported == {"version": "1.4.2"}

    # The classic shadow of the same thing was never written.
    publish_get(client, thing, "classic-get")
    error = rejected.get(timeout=scaled(RESPONSE_TIMEOUT_S))
    assert error.code == 404
    assert error.client_token == "classic-get"


# --- V2 client: IotShadowClientV2 with futures and streams ----------------------------


def make_v2_client(protocol_client: mqtt.Connection | mqtt5.Client) -> iotshadow.IotShadowClientV2:
    options = mqtt_request_response.ClientOptions(
        max_request_response_subscriptions=V2_REQUEST_SUBSCRIPTIONS,
        max_streaming_subscriptions=V2_STREAM_SUBSCRIPTIONS,
        operation_timeout_in_seconds=V2_OPERATION_TIMEOUT_S,
    )
    return iotshadow.IotShadowClientV2(protocol_client, options)


@pytest.fixture(params=["mqtt311", "mqtt5"])
def v2_client_for(request, connect_mqtt3, connect_mqtt5):
    """Return a factory of V2 shadow clients over MQTT 3.1.1 or MQTT 5, by parameter."""
    connect = connect_mqtt3 if request.param == "mqtt311" else connect_mqtt5

    def make(client_id: str) -> iotshadow.IotShadowClientV2:
        return make_v2_client(connect(client_id))

    return make


class DeltaStream:
    """The V2 client's delta stream for one thing, with the events it delivered queued.

    The SDK's streaming operation has no close method (awscrt 0.36.1), so this object
    keeps it referenced for as long as the test holds the stream.
    """

    def __init__(self, client: iotshadow.IotShadowClientV2, thing: str) -> None:
        self.thing = thing
        self.events: queue.Queue[iotshadow.ShadowDeltaUpdatedEvent] = queue.Queue()
        self._established = threading.Event()
        self._operation = client.create_shadow_delta_updated_stream(
            iotshadow.ShadowDeltaUpdatedSubscriptionRequest(thing_name=thing),
            ServiceStreamOptions(
                incoming_event_listener=self.events.put,
                subscription_status_listener=self._on_status,
            ),
        )

    def _on_status(self, event: mqtt_request_response.SubscriptionStatusEvent) -> None:
        if event.type == mqtt_request_response.SubscriptionStatusEventType.SUBSCRIPTION_ESTABLISHED:
            self._established.set()

    def open(self) -> None:
        """Open the stream and wait until its subscription is established."""
        self._operation.open()
        if not self._established.wait(scaled(RESPONSE_TIMEOUT_S)):
            raise AssertionError(
                f"delta stream subscription for {self.thing} was not established within"
                f" {RESPONSE_TIMEOUT_S:g} s"
            )

    def next_event(self) -> iotshadow.ShadowDeltaUpdatedEvent:
        try:
            return self.events.get(timeout=scaled(RESPONSE_TIMEOUT_S))
        except queue.Empty:
            raise AssertionError(
                f"timed out after {RESPONSE_TIMEOUT_S:g} s waiting for an event on the delta"
                f" stream of {self.thing}"
            ) from None


def test_v2_update_get_delta_delete(v2_client_for):
    thing = unique_thing("sdk-v2")
    client = v2_client_for(thing)
    deltas = DeltaStream(client, thing)
    deltas.open()

    reported = iotshadow.UpdateShadowRequest(
        thing_name=thing, state=iotshadow.ShadowState(reported={"temperature": 21, "mode": "auto"})
    )
    # The V2 client matches each response to its request by a fresh clientToken, so the
    # future completes only if the engine echoes the token.
    accepted = result_of(client.update_shadow(reported), "update_shadow response")
    assert isinstance(accepted, iotshadow.UpdateShadowResponse)
    assert accepted.version == 1
    assert accepted.client_token == reported.client_token
    assert uuid.UUID(accepted.client_token)
    assert accepted.state.reported == {"temperature": 21, "mode": "auto"}
    assert set(accepted.metadata.reported) == {"temperature", "mode"}

    desired = iotshadow.UpdateShadowRequest(
        thing_name=thing, state=iotshadow.ShadowState(desired={"temperature": 25})
    )
    accepted = result_of(client.update_shadow(desired), "update_shadow response")
    assert accepted.version == 2
    assert accepted.client_token == desired.client_token
    assert accepted.state.desired == {"temperature": 25}

    delta = deltas.next_event()
    assert isinstance(delta, iotshadow.ShadowDeltaUpdatedEvent)
    assert delta.state == {"temperature": 25}
    assert delta.version == 2
    assert delta.client_token == desired.client_token
    assert set(delta.metadata) == {"temperature"}

    get = iotshadow.GetShadowRequest(thing_name=thing)
    document = result_of(client.get_shadow(get), "get_shadow response")
    assert isinstance(document, iotshadow.GetShadowResponse)
    assert document.version == 2
    assert document.client_token == get.client_token
    assert document.state.desired == {"temperature": 25}
    assert document.state.reported == {"temperature": 21, "mode": "auto"}
    assert document.state.delta == {"temperature": 25}

    delete = iotshadow.DeleteShadowRequest(thing_name=thing)
    deleted = result_of(client.delete_shadow(delete), "delete_shadow response")
    assert isinstance(deleted, iotshadow.DeleteShadowResponse)
    assert deleted.version == 2
    assert deleted.client_token == delete.client_token
    assert isinstance(deleted.timestamp, datetime)


def test_v2_errors_raise_modeled(v2_client_for):
    thing = unique_thing("sdk-v2-errors")
    client = v2_client_for(thing)

    missing = iotshadow.GetShadowRequest(thing_name=thing)
    with pytest.raises(V2ServiceException) as raised:
        result_of(client.get_shadow(missing), "get_shadow response")
    error = raised.value.modeled_error
    assert isinstance(error, iotshadow.V2ErrorResponse)
    assert error.code == 404
    assert error.client_token == missing.client_token

    first = iotshadow.UpdateShadowRequest(
        thing_name=thing, state=iotshadow.ShadowState(reported={"temperature": 21})
    )
    assert result_of(client.update_shadow(first), "update_shadow response").version == 1

    stale = iotshadow.UpdateShadowRequest(
        thing_name=thing, version=5, state=iotshadow.ShadowState(reported={"temperature": 22})
    )
    with pytest.raises(V2ServiceException) as raised:
        result_of(client.update_shadow(stale), "update_shadow response")
    error = raised.value.modeled_error
    assert isinstance(error, iotshadow.V2ErrorResponse)
    assert error.code == 409
    assert error.client_token == stale.client_token

    delete = iotshadow.DeleteShadowRequest(thing_name=thing)
    assert result_of(client.delete_shadow(delete), "delete_shadow response").version == 1
    with pytest.raises(V2ServiceException) as raised:
        result_of(client.delete_shadow(iotshadow.DeleteShadowRequest(thing_name=thing)), "delete")
    assert raised.value.modeled_error.code == 404
