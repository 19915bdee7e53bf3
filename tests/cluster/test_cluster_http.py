"""The HTTP API of ``ironshadow serve --workers 3``: REST shadow requests and /metrics for
things and figures of every worker, through the HTTP port that every worker serves.

Thing names are chosen with ``owner_of``, so each test decides which worker owns which thing.
Each request opens its own connection, which lands on whichever worker the kernel picks. A
worker handles the requests for its own things itself, as a single engine does, and forwards
the others to their owners: the replies must not depend on where a request landed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_cluster_serve import (
    HOST,
    RESPONSE_TIMEOUT_S,
    START_TIMEOUT_S,
    WORKERS,
    Cluster,
    client_owned_by,
    landing_on,
    worker_figures,
)
from websockets.sync.client import ClientConnection, connect

from conftest import open_clients, scaled
from ironshadow.cluster import owner_of
from mqtt_client import TestClient


@pytest.fixture(autouse=True)
def close_clients() -> Iterator[None]:
    """Close the test's MQTT clients after it, before a module-scoped cluster stops."""
    yield
    while open_clients:
        open_clients.pop().close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    data_dir = tmp_path_factory.mktemp("cluster-http") / "data"
    process = Cluster(data_dir)
    try:
        process.wait_until_running()
        yield process
    finally:
        status = process.stop()
    assert status == 0, f"the supervisor exited with code {status}:\n{process.log_tail()}"


def http(cluster: Cluster) -> httpx.Client:
    """Return an HTTP client that opens a new connection for each request, so that the
    requests land on the workers as separate clients' requests do."""
    return httpx.Client(
        base_url=f"http://{HOST}:{cluster.http_port}",
        timeout=scaled(RESPONSE_TIMEOUT_S),
        trust_env=False,
        limits=httpx.Limits(max_keepalive_connections=0),
    )


def without_times(document: Any, thing: str) -> Any:
    """Return ``document`` without its ``timestamp`` fields, with ``thing`` replaced by
    ``THING`` in strings, so that replies for different things and moments compare equal."""
    if isinstance(document, dict):
        return {
            key: without_times(value, thing)
            for key, value in document.items()
            if key != "timestamp"
        }
    if isinstance(document, list):
        return [without_times(value, thing) for value in document]
    if isinstance(document, str):
        return document.replace(thing, "THING")
    return document


# Requests run in this order on one fresh thing, with the status a single engine returns.
SHADOW_SCENARIO: list[tuple[str, str, bytes, int]] = [
    ("GET", "", b"", 404),
    ("POST", "", b'{"state": {"desired": {"level": 3}}, "clientToken": "c1"}', 200),
    ("POST", "", b'{"state": {"reported": {"level": 1}}}', 200),
    ("POST", "", b'{"state": {"desired": {"level": 4}}, "version": 99}', 409),
    ("POST", "", b'{"state": {"desired": ', 400),
    ("GET", "", b"", 200),
    ("GET", "?name=firmware", b"", 404),
    ("POST", "?name=firmware", b'{"state": {"reported": {"build": "1.2"}}}', 200),
    ("GET", "?name=firmware", b"", 200),
    ("DELETE", "", b"", 200),
    ("GET", "", b"", 404),
    ("DELETE", "", b"", 404),
    ("GET", "?name=firmware", b"", 200),
]


def run_scenario(client: httpx.Client, thing: str) -> list[tuple[int, Any]]:
    results = []
    for method, query, body, _status in SHADOW_SCENARIO:
        response = client.request(method, f"/things/{thing}/shadow{query}", content=body)
        results.append((response.status_code, without_times(response.json(), thing)))
    return results


def mqtt_get(cluster: Cluster, thing: str, query: str = "") -> tuple[str, Any]:
    """Get a shadow over MQTT, from the thing's own device on its owner: return the reply's
    last topic level (``accepted`` or ``rejected``) and its document."""
    prefix = f"$aws/things/{thing}/shadow"
    if query:
        prefix += "/name/" + query.removeprefix("?name=")
    device = TestClient(cluster.port, thing)
    try:
        device.subscribe(f"{prefix}/get/+", qos=1)
        device.publish(f"{prefix}/get", b"{}", qos=1)
        reply = device.expect(timeout=RESPONSE_TIMEOUT_S)
        return reply.topic.rsplit("/", 1)[1], json.loads(reply.payload)
    finally:
        device.close()


def test_forwarded_rest_matches_local(cluster: Cluster) -> None:
    with http(cluster) as client:
        local = run_scenario(client, client_owned_by(0, "rest"))
        assert [status for status, _ in local] == [step[3] for step in SHADOW_SCENARIO], local
        for worker in (1, 2):
            thing = client_owned_by(worker, "rest")
            forwarded = run_scenario(client, thing)
            assert forwarded == local, f"worker {worker}"
            # The owner has the shadow that the scenario left behind.
            outcome, document = mqtt_get(cluster, thing, "?name=firmware")
            assert outcome == "accepted", document
            assert document["state"] == {"reported": {"build": "1.2"}}


def test_thing_reads_cover_every_worker(cluster: Cluster) -> None:
    """The thing list, a thing's details, its named shadows and its history come from the
    worker that owns it, and the list pages through the things of all workers in order."""
    things = sorted(client_owned_by(worker, "kiln") for worker in range(WORKERS) for _ in range(4))
    with http(cluster) as client:
        for number, thing in enumerate(things):
            for temperature in (100 + number, 200 + number):
                response = client.post(
                    f"/things/{thing}/shadow",
                    json={"state": {"reported": {"temperature": temperature}}},
                )
                assert response.status_code == 200, response.text
            response = client.post(
                f"/things/{thing}/shadow?name=tooling", json={"state": {"reported": {"die": 1}}}
            )
            assert response.status_code == 200, response.text

        listed = []
        next_token = None
        for _ in range(len(things)):
            params = {"prefix": "kiln-", "pageSize": 5}
            if next_token:
                params["nextToken"] = next_token
            page = client.get("/things", params=params).json()
            listed.extend(page["things"])
            next_token = page["nextToken"]
            if next_token is None:
                break
        assert [thing["name"] for thing in listed] == things
        assert all(thing["version"] == 2 for thing in listed), listed

        for worker in range(WORKERS):
            thing = next(name for name in things if owner_of(name, WORKERS) == worker)
            detail = client.get(f"/things/{thing}").json()
            assert (detail["name"], detail["version"], detail["namedShadows"]) == (
                thing,
                2,
                ["tooling"],
            )
            named = client.get(f"/things/{thing}/shadows").json()
            assert named["results"] == ["tooling"]
            points = wait_for_points(client, thing, 2)
            assert [point["value"] for point in points] == [
                100 + things.index(thing),
                200 + things.index(thing),
            ]
        missing = client.get(f"/things/{client_owned_by(2, 'absent')}")
        assert missing.status_code == 404, missing.text


def test_engine_status_adds_up_workers(cluster: Cluster) -> None:
    """GET /api/engine, which the dashboard's engine view reads, covers every worker and
    lists each worker's own figures."""
    with http(cluster) as client:
        before = client.get("/api/engine").json()
        publishers = [
            TestClient(cluster.port, client_owned_by(worker, "gauge")) for worker in range(WORKERS)
        ]
        for publisher in publishers:
            for number in range(5):
                publisher.publish("plant/gauge", b"%d" % number, qos=1)
        after = client.get("/api/engine").json()
    assert [status["worker"] for status in after["workers"]] == list(range(WORKERS))
    received = after["counters"]["publishReceived"] - before["counters"]["publishReceived"]
    assert received == 5 * WORKERS
    per_worker = [
        status["counters"]["publishReceived"] - earlier["counters"]["publishReceived"]
        for status, earlier in zip(after["workers"], before["workers"], strict=True)
    ]
    assert per_worker == [5] * WORKERS
    assert after["connections"]["mqtt"] >= WORKERS
    assert after["connections"]["mqtt"] == sum(
        status["connections"]["mqtt"] for status in after["workers"]
    )


def test_engine_status_counts_websockets_anywhere(cluster: Cluster) -> None:
    """An MQTT client over WebSocket is on one worker, and every worker that serves
    GET /api/engine counts it, whichever worker that is."""
    panel = TestClient(cluster.http_port, client_owned_by(0, "panel"), transport="websockets")
    with http(cluster) as client:
        for _ in range(3 * WORKERS):
            status = client.get("/api/engine").json()
            assert status["connections"]["mqttWebSocket"] == 1, status
            per_worker = [entry["connections"]["mqttWebSocket"] for entry in status["workers"]]
            assert sorted(per_worker) == [0] * (WORKERS - 1) + [1], per_worker
    panel.close()


def test_feed_shows_changes_of_every_worker(cluster: Cluster) -> None:
    """A /ws feed on each worker gets the changes of the things that every worker owns
    while it has subscribers."""
    url = f"ws://{HOST}:{cluster.http_port}/ws"
    things = [client_owned_by(worker, "oven") for worker in range(WORKERS)]
    with contextlib.ExitStack() as stack:
        feeds = []
        for worker in range(WORKERS):
            # connect() returns once the WebSocket handshake is done, on that worker.
            with landing_on(cluster, worker):
                feed = connect(url, open_timeout=scaled(RESPONSE_TIMEOUT_S))
            feeds.append(stack.enter_context(feed))
        for feed in feeds:
            feed.send(json.dumps({"subscribe": ["oven-*"]}))
            assert json.loads(feed.recv(timeout=scaled(RESPONSE_TIMEOUT_S))) == {
                "subscriptions": ["oven-*"]
            }
        for number, thing in enumerate(things):
            device = TestClient(cluster.port, thing)
            frames = [wait_for_change(feed, device, thing, number) for feed in feeds]
            device.close()
            for frame in frames:
                assert frame["thing"] == thing
                assert frame["state"]["reported"] == {"heat": number}


def wait_for_change(
    feed: ClientConnection, device: TestClient, thing: str, heat: int
) -> dict[str, Any]:
    """Have ``device`` report ``heat`` until ``feed`` shows the change of ``thing``.

    A worker requests its peers' changes when its feed's first subscription is made, so an
    update stored in the moment after may not reach the feed: the device reports again.
    """
    deadline = time.monotonic() + scaled(RESPONSE_TIMEOUT_S)
    while time.monotonic() < deadline:
        device.publish(
            f"$aws/things/{thing}/shadow/update",
            json.dumps({"state": {"reported": {"heat": heat}}}).encode(),
            qos=1,
        )
        with contextlib.suppress(TimeoutError):
            received = json.loads(feed.recv(timeout=0.5))
            # A held frame of the previous thing or report may come late.
            if received["thing"] == thing and received["state"]["reported"] == {"heat": heat}:
                return received
    raise AssertionError(f"no change of {thing} in the feed")


def wait_for_points(client: httpx.Client, thing: str, count: int) -> list[dict[str, Any]]:
    """Return the history points of ``thing`` once there are ``count``: rows reach the
    history store a moment after their update."""
    deadline = time.monotonic() + scaled(RESPONSE_TIMEOUT_S)
    points: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        response = client.get(f"/things/{thing}/history", params={"from": "0"})
        assert response.status_code == 200, response.text
        points = response.json()["points"]
        if len(points) >= count:
            return points
        time.sleep(0.1)
    raise AssertionError(f"{len(points)} of {count} history points for {thing}")


@pytest.mark.parametrize("owner", [1, 2])
def test_rest_desired_reaches_device_as_delta(cluster: Cluster, owner: int) -> None:
    thing = client_owned_by(owner, "heater")
    prefix = f"$aws/things/{thing}/shadow"
    device = TestClient(cluster.port, thing)
    device.subscribe(f"{prefix}/update/delta", qos=1)
    device.subscribe(f"{prefix}/update/accepted", qos=1)
    device.publish(f"{prefix}/update", b'{"state": {"reported": {"temperature": 20}}}', qos=1)
    assert json.loads(device.expect(timeout=RESPONSE_TIMEOUT_S).payload)["version"] == 1
    with http(cluster) as client:
        response = client.post(
            f"/things/{thing}/shadow", json={"state": {"desired": {"temperature": 55}}}
        )
    assert response.status_code == 200, response.text
    # Version 2: the owner applied the update to the shadow that the device created.
    assert response.json()["version"] == 2
    # As on a single engine, an update over HTTP publishes update/delta but no
    # update/accepted.
    delta = device.expect(timeout=RESPONSE_TIMEOUT_S)
    assert delta.topic == f"{prefix}/update/delta"
    document = json.loads(delta.payload)
    assert document["state"] == {"temperature": 55}
    assert document["version"] == 2


def scrape(client: httpx.Client) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    """Return every sample of /metrics by family name, read with prometheus_client's parser."""
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {
        family.name: [(sample.name, sample.labels, sample.value) for sample in family.samples]
        for family in text_string_to_metric_families(response.text)
    }


def by_worker(samples: list[tuple[str, dict[str, str], float]]) -> dict[str, float]:
    """Return the value of each worker's unlabelled sample (``worker`` its only label)."""
    return {labels["worker"]: value for _name, labels, value in samples if len(labels) == 1}


def test_metrics_cover_every_worker(cluster: Cluster) -> None:
    thing = client_owned_by(2, "counted")
    with http(cluster) as client:
        before = by_worker(scrape(client)["ironshadow_shadow_updates"])
        response = client.post(f"/things/{thing}/shadow", json={"state": {"reported": {"n": 1}}})
        assert response.status_code == 200, response.text
        families = scrape(client)

    workers = {str(worker) for worker in range(WORKERS)}
    assert by_worker(families["ironshadow_worker_up"]) == dict.fromkeys(workers, 1.0)
    updates = by_worker(families["ironshadow_shadow_updates"])
    assert set(updates) == workers
    assert updates["2"] == before["2"] + 1
    assert updates["0"] == before["0"]
    assert set(by_worker(families["process_resident_memory_bytes"])) == workers
    # Every worker serves HTTP, so each reports its own WebSocket endpoints.
    for name in ("ironshadow_mqtt_websocket_connections", "ironshadow_feed_clients"):
        assert set(by_worker(families[name])) == workers, name

    # A labelled family keeps its own label beside the worker's.
    packets = {
        (labels["worker"], labels["type"])
        for _name, labels, _value in families["ironshadow_packets_received"]
    }
    assert ("1", "connect") in packets

    # With the embedded stores every worker reports its histograms too.
    buckets = {
        labels["worker"]
        for name, labels, _value in families["ironshadow_store_write_seconds"]
        if name.endswith("_bucket")
    }
    assert buckets == workers

    for name, samples in families.items():
        if name == "ironshadow_metrics_collect_seconds":
            continue  # the scrape's own duration, which no single worker has
        for sample_name, labels, _value in samples:
            assert "worker" in labels, f"{sample_name} has no worker label"


def wait_for_status(client: httpx.Client, path: str, status: int) -> httpx.Response:
    """Repeat GET ``path`` until it returns ``status``, as while a worker restarts."""
    deadline = time.monotonic() + scaled(START_TIMEOUT_S)
    response = client.get(path)
    while response.status_code != status and time.monotonic() < deadline:
        time.sleep(0.1)
        response = client.get(path)
    return response


def test_http_served_with_worker_0_stopped(tmp_path: Path) -> None:
    """Every worker serves the HTTP port: with worker 0 stopped, the others serve REST
    requests, the /ws feed and MQTT over WebSocket."""
    cluster = Cluster(tmp_path / "data")
    try:
        cluster.wait_until_running()
        pid = int(worker_figures(cluster.port, "pid")[0])
        things = [client_owned_by(worker, "kiln") for worker in (1, 2)]
        os.kill(pid, signal.SIGSTOP)
        try:
            with http(cluster) as client:
                for thing in things:
                    response = client.post(
                        f"/things/{thing}/shadow", json={"state": {"desired": {"on": True}}}
                    )
                    assert response.status_code == 200, response.text
                    response = client.get(f"/things/{thing}/shadow")
                    assert response.status_code == 200, response.text
                    assert response.json()["state"]["desired"] == {"on": True}

            url = f"ws://{HOST}:{cluster.http_port}/ws"
            with connect(url, open_timeout=scaled(RESPONSE_TIMEOUT_S)) as feed:
                feed.send(json.dumps({"subscribe": ["kiln-*"]}))
                assert json.loads(feed.recv(timeout=scaled(RESPONSE_TIMEOUT_S))) == {
                    "subscriptions": ["kiln-*"]
                }
                for heat, thing in enumerate(things):
                    device = TestClient(cluster.port, thing)
                    frame = wait_for_change(feed, device, thing, heat)
                    assert frame["state"]["reported"] == {"heat": heat}
                    device.close()

            panel = TestClient(
                cluster.http_port, client_owned_by(1, "panel"), transport="websockets"
            )
            panel.subscribe("kiln/alarm", qos=1)
            line = TestClient(cluster.port, client_owned_by(2, "line"))
            line.publish("kiln/alarm", b"hot", qos=1)
            assert panel.expect(timeout=RESPONSE_TIMEOUT_S).payload == b"hot"
        finally:
            os.kill(pid, signal.SIGCONT)
    finally:
        status = cluster.stop()
    assert status == 0, cluster.log_tail()


def test_stopped_owner_gives_503(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path / "data")
    try:
        cluster.wait_until_running()
        pid = int(worker_figures(cluster.port, "pid")[1])
        thing = client_owned_by(1, "silent")
        other = client_owned_by(2, "awake")
        path = f"/things/{thing}/shadow"
        with http(cluster) as client:
            response = client.post(path, json={"state": {"reported": {"on": True}}})
            assert response.status_code == 200, response.text

            os.kill(pid, signal.SIGSTOP)
            try:
                # Sent at once, before worker 1 counts as silent: both wait 4 s for a reply.
                # The client's own timeout is RESPONSE_TIMEOUT_S: a wait on the stopped
                # worker without end would fail here with a timeout error.
                with ThreadPoolExecutor(2) as pool, http(cluster) as other_client:
                    read = pool.submit(client.get, path)
                    write = pool.submit(
                        other_client.post, path, json={"state": {"reported": {"on": True}}}
                    )
                    response = read.result()
                    assert response.status_code == 503, response.text
                    assert response.json()["message"] == (
                        f"Thing {thing!r} belongs to worker 1, which did not respond: no reply "
                        "within 4 s. Retry the request shortly."
                    )
                    assert response.headers["Retry-After"] == "1"
                    # A write may have been applied before the reply was given up. This one
                    # is applied once worker 1 goes on, because it waits in worker 1's socket.
                    response = write.result()
                    assert response.status_code == 503, response.text
                    assert "The update may have been applied there" in response.json()["message"]

                # Without a heartbeat for 5 s, worker 1 is sent no more requests.
                cluster.wait_for_log(f"worker 1 (pid {pid}) has not run its event loop")
                silent = r"it has not run for \d+ s \(stopped or stuck\)"
                response = client.post(path, json={"state": {"reported": {"on": False}}})
                assert response.status_code == 503, response.text
                assert re.fullmatch(
                    f"Thing '{thing}' belongs to worker 1, which did not respond: {silent}. "
                    "The update was not sent there: retry it shortly.",
                    response.json()["message"],
                )
                response = client.get(f"/things/{thing}")
                assert response.status_code == 503, response.text
                assert re.fullmatch(
                    f"Thing '{thing}' belongs to worker 1, which did not respond: {silent}. "
                    "Retry the request shortly.",
                    response.json()["message"],
                )
                families = scrape(client)
                up = by_worker(families["ironshadow_worker_up"])
                assert up == {"0": 1.0, "1": 0.0, "2": 1.0}
                assert "1" not in by_worker(families["ironshadow_shadow_updates"])
                # The other workers still reply.
                response = client.post(
                    f"/things/{other}/shadow", json={"state": {"reported": {"on": True}}}
                )
                assert response.status_code == 200, response.text
                # The list goes on without worker 1's things and names the worker.
                response = client.get("/things")
                assert response.status_code == 200, response.text
                page = response.json()
                [unavailable] = page["unavailableWorkers"]
                assert unavailable["worker"] == 1
                assert re.fullmatch(silent, unavailable["error"])
                assert [thing["name"] for thing in page["things"]] == [other]
                # The engine view lists worker 1 as down and adds up the others.
                response = client.get("/api/engine")
                assert response.status_code == 200, response.text
                engine = response.json()
                workers = engine["workers"]
                assert [worker["up"] for worker in workers] == [True, False, True]
                assert workers[1]["up"] is False
                assert re.fullmatch(silent, workers[1]["error"])
                for name, value in engine["counters"].items():
                    assert value == workers[0]["counters"][name] + workers[2]["counters"][name]
                assert engine["counters"]["shadowUpdates"] >= 1
            finally:
                os.kill(pid, signal.SIGCONT)

            # Worker 1 is sent requests again from its first heartbeat, within milliseconds.
            response = wait_for_status(client, path, 200)
            assert response.status_code == 200, response.text
            # The first write was applied when worker 1 went on, the one not sent was not.
            assert response.json()["state"]["reported"] == {"on": True}

            os.kill(pid, signal.SIGKILL)
            response = client.get(path)
            assert response.status_code == 503, response.text
            assert "belongs to worker 1" in response.json()["message"]
            # The supervisor restarts worker 1, which reloads the shadow from its folder.
            response = wait_for_status(client, path, 200)
            assert response.status_code == 200, response.text
            assert response.json()["state"]["reported"] == {"on": True}
    finally:
        status = cluster.stop()
    assert status == 0, cluster.log_tail()


def test_one_worker_metrics_have_no_worker_label(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path / "data", workers=1)
    try:
        cluster.wait_until_running()
        with http(cluster) as client:
            families = scrape(client)
    finally:
        status = cluster.stop()
    assert status == 0, cluster.log_tail()
    assert "ironshadow_worker_up" not in families
    assert families["ironshadow_clients_connected"] == [("ironshadow_clients_connected", {}, 0.0)]
