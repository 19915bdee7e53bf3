"""``ironshadow serve --workers 3`` as a subprocess, driven by real paho-mqtt clients.

Client ids are chosen with ``owner_of``, so each test decides which worker serves which
client. The per-worker figures under ``$SYS/broker/workers/`` show where the connections
really are.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from paho.mqtt.packettypes import PacketTypes

from conftest import free_port, kill_worker_repeatedly, open_clients, scaled
from ironshadow.cluster import owner_of
from ironshadow.cluster.heartbeat import SILENT_SECONDS
from ironshadow.cluster.worker import HTTP_CALL_TIMEOUT
from ironshadow.mqtt.constants import MQTT_3_1_1, MQTT_5
from ironshadow.mqtt.packets import Connack, Connect, Disconnect, Puback, Publish
from ironshadow.mqtt.properties import PropertyId
from ironshadow.mqtt.reason_codes import ReasonCode
from mqtt_client import V5, V311, TestClient, properties
from raw_client import RawClient

HOST = "127.0.0.1"
WORKERS = 3
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 20.0
RESPONSE_TIMEOUT_S = 10.0
# Will Delay Interval of the delayed-will tests, in seconds.
WILL_DELAY_S = 3
# Seconds between two publications of the per-worker $SYS figures, and how long a monitor
# reads them.
SYS_INTERVAL_S = 0.5
FIGURES_WINDOW_S = 1.5

# Runs `python -m ironshadow` after asking Linux to send the supervisor SIGTERM when the test
# process dies (prctl PR_SET_PDEATHSIG, option 1), so a killed pytest leaves no engine behind.
# The workers stop by themselves when their supervisor is gone.
# servers.py, beside the storage tests, starts a private redis-server.
STORAGE_TESTS = Path(__file__).resolve().parents[1] / "storage"

LAUNCHER = (
    "import ctypes, runpy, signal;"
    " ctypes.CDLL(None).prctl(1, signal.SIGTERM);"
    " runpy.run_module('ironshadow', run_name='__main__', alter_sys=True)"
)


class Cluster:
    """``ironshadow serve --workers N`` in a subprocess, with its log in a file."""

    def __init__(self, data_dir: Path, workers: int = WORKERS, *flags: str) -> None:
        self.port = free_port()
        self.http_port = free_port()
        self.workers = workers
        self.data_dir = data_dir
        # Each worker's PID by index, read once by worker_pids().
        self.pids: dict[int, int] | None = None
        self.log_path = data_dir.parent / f"cluster-{uuid.uuid4().hex[:6]}.log"
        command = [
            sys.executable, "-c", LAUNCHER, "serve",
            "--workers", str(workers),
            "--host", HOST,
            "--mqtt-port", str(self.port),
            "--http-port", str(self.http_port),
            "--data-dir", str(data_dir),
            "--sys-interval", str(SYS_INTERVAL_S),
            *flags,
        ]  # fmt: skip
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:]) or "(no output)"

    def wait_for_log(self, text: str, count: int = 1) -> None:
        """Wait until ``text`` appears ``count`` times in the log."""
        deadline = time.monotonic() + scaled(START_TIMEOUT_S)
        while self.log_text().count(text) < count:
            assert time.monotonic() < deadline, f"{text!r} not logged:\n{self.log_tail()}"
            time.sleep(0.02)

    def wait_until_running(self) -> None:
        """Wait until every worker logged that it runs and every bus link is open."""
        deadline = time.monotonic() + scaled(START_TIMEOUT_S)
        links = self.workers * (self.workers - 1)
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"the supervisor exited with code {self.process.returncode} at start:\n"
                    f"{self.log_tail()}"
                )
            text = self.log_text()
            if text.count("running; stop with") >= self.workers and (
                text.count("bus link to worker") >= links
            ):
                return
            time.sleep(0.05)
        raise AssertionError(
            f"the workers did not start within {START_TIMEOUT_S:g} s:\n{self.log_tail()}"
        )

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(scaled(STOP_TIMEOUT_S))
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def client_owned_by(worker: int, prefix: str) -> str:
    """Return a new client id that ``worker`` owns among WORKERS workers."""
    while True:
        client_id = f"{prefix}-{uuid.uuid4().hex[:8]}"
        if owner_of(client_id, WORKERS) == worker:
            return client_id


def worker_figures(port: int, name: str) -> dict[int, str]:
    """Return the latest ``$SYS/broker/workers/{n}/{name}`` of every worker.

    The figures are retained, so a worker that was killed leaves its last ones behind. The
    monitor reads for FIGURES_WINDOW_S, several publication intervals, and keeps the latest.
    """
    monitor = TestClient(port, client_owned_by(0, "monitor"))
    try:
        monitor.subscribe(f"$SYS/broker/workers/+/{name}")
        figures: dict[int, str] = {}
        deadline = time.monotonic() + scaled(FIGURES_WINDOW_S)
        while time.monotonic() < deadline:
            try:
                message = monitor.messages.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            figures[int(message.topic.split("/")[3])] = message.payload.decode()
        return figures
    finally:
        monitor.close()


def wait_for_figure(port: int, worker: int, name: str, expected: str) -> None:
    deadline = time.monotonic() + scaled(RESPONSE_TIMEOUT_S)
    figures: dict[int, str] = {}
    while time.monotonic() < deadline:
        figures = worker_figures(port, name)
        if figures.get(worker) == expected:
            return
    raise AssertionError(f"{name} of worker {worker} is not {expected}: {figures}")


def worker_pids(cluster: Cluster) -> dict[int, int]:
    """Return each worker's PID by index, read once from the per-worker $SYS figures."""
    if cluster.pids is None:
        figures = worker_figures(cluster.port, "pid")
        assert len(figures) == cluster.workers, figures
        cluster.pids = {index: int(pid) for index, pid in figures.items()}
    return cluster.pids


@contextlib.contextmanager
def landing_on(cluster: Cluster, worker: int) -> Iterator[None]:
    """Stop the other workers (SIGSTOP) during the block, so that a connection made in it
    is accepted by ``worker``. They go on (SIGCONT) when it ends.

    Every worker accepts from the same sockets. The kernel often wakes the same one first,
    so without this a test cannot choose the worker of a TLS or WebSocket connection.
    """
    others = [pid for index, pid in worker_pids(cluster).items() if index != worker]
    for pid in others:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in others:
            os.kill(pid, signal.SIGCONT)


def connect_on(cluster: Cluster, worker: int, client: TestClient) -> TestClient:
    """Connect ``client`` (made with ``connect=False``) through ``worker``, then wait for
    its CONNACK. paho-mqtt completes the TLS and WebSocket handshakes inside connect(), so
    the connection is on ``worker`` before the others run again."""
    with landing_on(cluster, worker):
        client.connect(wait=False)
    assert client.connected.wait(scaled(RESPONSE_TIMEOUT_S)), "no CONNACK"
    return client


@pytest.fixture(autouse=True)
def close_clients() -> Iterator[None]:
    """Close the test's clients after it, before a module-scoped cluster stops."""
    yield
    while open_clients:
        open_clients.pop().close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    data_dir = tmp_path_factory.mktemp("cluster") / "data"
    process = Cluster(data_dir)
    try:
        process.wait_until_running()
        yield process
    finally:
        status = process.stop()
    assert status == 0, f"the supervisor exited with code {status}:\n{process.log_tail()}"


def test_wildcard_subscriber_hears_every_worker(cluster: Cluster) -> None:
    subscriber = TestClient(cluster.port, client_owned_by(0, "listener"))
    subscriber.subscribe("plant/#", qos=1)
    publishers = [
        TestClient(cluster.port, client_owned_by(worker, f"sensor{worker}"))
        for worker in range(WORKERS)
        for _ in range(3)
    ]
    # A broker-assigned id stays on whichever worker accepted the connection.
    publishers.append(TestClient(cluster.port, ""))
    for number, publisher in enumerate(publishers):
        publisher.publish(f"plant/line{number}/temperature", f"{number}".encode(), qos=1)
    received = {}
    for _ in publishers:
        message = subscriber.expect(timeout=RESPONSE_TIMEOUT_S)
        received[message.topic] = message.payload
    assert received == {
        f"plant/line{number}/temperature": f"{number}".encode() for number in range(len(publishers))
    }
    subscriber.expect_none(wait=0.3)


def test_unsubscribed_filter_stops_forwarding(cluster: Cluster) -> None:
    subscriber = TestClient(cluster.port, client_owned_by(1, "listener"))
    subscriber.subscribe("hall/+/door", qos=0)
    publisher = TestClient(cluster.port, client_owned_by(2, "door"))
    publisher.publish("hall/a/door", b"open", qos=1)
    assert subscriber.expect(timeout=RESPONSE_TIMEOUT_S).payload == b"open"
    subscriber.unsubscribe("hall/+/door")
    publisher.publish("hall/a/door", b"closed", qos=1)
    subscriber.expect_none(wait=0.5)


def test_qos_and_retain_survive_the_bus(cluster: Cluster) -> None:
    subscriber = TestClient(cluster.port, client_owned_by(2, "qos"))
    subscriber.subscribe("qos/#", qos=2, retainAsPublished=True)
    publisher = TestClient(cluster.port, client_owned_by(0, "qos-pub"))
    publisher.publish("qos/two", b"exactly once", qos=2, retain=True)
    message = subscriber.expect(timeout=RESPONSE_TIMEOUT_S)
    assert message.payload == b"exactly once"
    assert message.qos == 2
    assert message.retain
    publisher.publish("qos/two", b"", qos=1, retain=True)  # clear the retained message


def test_retained_message_reaches_later_subscriber(cluster: Cluster) -> None:
    publisher = TestClient(cluster.port, client_owned_by(0, "retainer"))
    # Frames from one worker to another arrive in order, so once a marker published after
    # the retained message reaches workers 1 and 2, they have stored the retained message.
    barriers = [TestClient(cluster.port, client_owned_by(worker, "barrier")) for worker in (1, 2)]
    for barrier in barriers:
        barrier.subscribe("barrier/+", qos=1)

    def wait_for_peers(marker: str) -> None:
        publisher.publish(f"barrier/{marker}", b"", qos=1)
        for barrier in barriers:
            assert barrier.expect(timeout=RESPONSE_TIMEOUT_S).topic == f"barrier/{marker}"

    # No client subscribes to config/+ yet, so no worker has a matching filter.
    publisher.publish("config/line7", b"speed=3", qos=1, retain=True)
    wait_for_peers("set")
    for worker in (1, 2):
        subscriber = TestClient(cluster.port, client_owned_by(worker, "late"))
        subscriber.subscribe("config/+", qos=1)
        message = subscriber.expect(timeout=RESPONSE_TIMEOUT_S)
        assert (message.topic, message.payload, message.retain) == (
            "config/line7",
            b"speed=3",
            True,
        )
        subscriber.close()
    publisher.publish("config/line7", b"", qos=1, retain=True)
    wait_for_peers("cleared")
    cleared = TestClient(cluster.port, client_owned_by(2, "cleared"))
    cleared.subscribe("config/+", qos=1)
    cleared.expect_none(wait=0.5)


def test_connections_are_handed_to_their_owner(cluster: Cluster) -> None:
    clients = [
        TestClient(cluster.port, client_owned_by(1, "owned"), protocol=V311) for _ in range(12)
    ]
    # The monitor that reads the figures is owned by worker 0, so it counts there.
    wait_for_figure(cluster.port, 1, "clients/connected", str(len(clients)))
    connected = worker_figures(cluster.port, "clients/connected")
    assert connected[2] == "0", connected
    handed_off = worker_figures(cluster.port, "connections/handed-off")
    adopted = worker_figures(cluster.port, "connections/adopted")
    # With one kernel accept queue for three workers, some of the 12 land elsewhere first.
    assert int(adopted[1]) > 0, adopted
    assert sum(int(count) for count in handed_off.values()) >= int(adopted[1]), handed_off
    for client in clients:
        client.close()


def test_takeover_finds_first_connection(cluster: Cluster) -> None:
    # Whichever workers accept the two connections, both end up on the owner of the id,
    # which closes the first one.
    for attempt in range(4):
        client_id = client_owned_by(attempt % WORKERS, "twin")
        first = TestClient(cluster.port, client_id, protocol=V311, clean=False)
        first.subscribe("twin/topic", qos=1)
        second = TestClient(cluster.port, client_id, protocol=V311, clean=False)
        first.disconnected.wait(scaled(RESPONSE_TIMEOUT_S))
        assert first.disconnected.is_set(), f"{client_id}: the first connection stayed open"
        assert second.connack is not None
        publisher = TestClient(cluster.port, client_owned_by((attempt + 1) % WORKERS, "pub"))
        publisher.publish("twin/topic", b"to the session", qos=1)
        assert second.expect(timeout=RESPONSE_TIMEOUT_S).payload == b"to the session"
        for client in (first, second, publisher):
            client.close()


def test_takeover_between_websocket_and_tcp(cluster: Cluster) -> None:
    # A WebSocket client on worker 0, and a TCP client with the same id handed to worker 1,
    # the owner. Each new connection closes the other.
    client_id = client_owned_by(1, "panel")

    def websocket() -> TestClient:
        client = TestClient(
            cluster.http_port, client_id, V5, transport="websockets", connect=False
        )
        return connect_on(cluster, 0, client)

    web = websocket()
    tcp = TestClient(cluster.port, client_id, V5)
    assert web.disconnected.wait(scaled(RESPONSE_TIMEOUT_S)), "the WebSocket client stayed"
    assert web.disconnect_reason == ReasonCode.SESSION_TAKEN_OVER
    assert tcp.client.is_connected()

    web_again = websocket()
    assert tcp.disconnected.wait(scaled(RESPONSE_TIMEOUT_S)), "the TCP client stayed"
    assert tcp.disconnect_reason == ReasonCode.SESSION_TAKEN_OVER
    assert web_again.client.is_connected()


def moved_to(cluster: Cluster, client_id: str, worker: int) -> bool:
    """Return whether another worker has logged that it sent the session of ``client_id``
    to ``worker``."""
    return f"client {client_id}: its session moves to worker {worker}" in cluster.log_text()


@pytest.mark.parametrize("clean", [False, True])
def test_delayed_will_follows_reconnect_elsewhere(cluster: Cluster, clean: bool) -> None:
    """A client with a delayed will drops on worker 0 (WebSocket) and comes back over TCP to
    its owner, worker 1. As on one engine, without Clean Start the will is cancelled. With
    Clean Start the old session ends and the will is sent at once."""
    client_id = client_owned_by(1, "crane")
    watcher = TestClient(cluster.port, client_owned_by(2, "watcher"))
    watcher.subscribe(f"wills/{client_id}", qos=1)
    web = TestClient(
        cluster.http_port,
        client_id,
        V5,
        clean=False,
        properties=properties(PacketTypes.CONNECT, SessionExpiryInterval=60),
        will=(f"wills/{client_id}", b"gone", 1, False),
        will_properties=properties(PacketTypes.WILLMESSAGE, WillDelayInterval=WILL_DELAY_S),
        connect=False,
        transport="websockets",
    )
    connect_on(cluster, 0, web)
    web.drop()
    # The will waits on worker 0 for WILL_DELAY_S; the client is back well before.
    time.sleep(0.3)
    TestClient(cluster.port, client_id, V5, clean=clean)
    if clean:
        assert watcher.expect(timeout=WILL_DELAY_S - 1).payload == b"gone"
    else:
        watcher.expect_none(wait=WILL_DELAY_S + 1)


def resume(
    port: int,
    client_id: str,
    protocol: int,
    transport: str = "tcp",
    ca: Path | None = None,
    connect: bool = True,
) -> TestClient:
    """Return a client of ``client_id`` without Clean Start that keeps its session for 5
    minutes. It connects unless ``connect`` is False, over TLS when the certificate
    authority ``ca`` is given."""
    client = TestClient(
        port,
        client_id,
        protocol,
        clean=False,
        properties=(
            properties(PacketTypes.CONNECT, SessionExpiryInterval=300) if protocol == V5 else None
        ),
        connect=False,
        transport=transport,
    )
    if ca is not None:
        client.client.tls_set(ca_certs=str(ca))
    if connect:
        client.connect()
    return client


def expect_resumed(client: TestClient, payloads: list[bytes]) -> None:
    """Check that ``client`` resumed its session and got exactly ``payloads``, in order."""
    assert client.connack is not None and client.connack[0].session_present, (
        f"{client.client._client_id!r}: CONNACK without Session Present"
    )
    assert [client.expect(timeout=RESPONSE_TIMEOUT_S).payload for _ in payloads] == payloads
    client.expect_none(wait=0.3)


@pytest.mark.parametrize("protocol", [V311, V5], ids=["v311", "v5"])
def test_session_moves_between_websocket_and_tcp(cluster: Cluster, protocol: int) -> None:
    """A persistent session follows its client from worker 0 (WebSocket) to worker 1 (TCP,
    handed to the owner of the id) and back, with its subscription and the messages queued
    while the client was away."""
    client_id = client_owned_by(1, "crane")
    topic = f"moves/{client_id}"
    publisher = TestClient(cluster.port, client_owned_by(2, "line"))

    def websocket() -> TestClient:
        client = resume(cluster.http_port, client_id, protocol, "websockets", connect=False)
        return connect_on(cluster, 0, client)

    web = websocket()
    web.subscribe(topic, qos=1)
    web.disconnect()
    for payload in (b"a1", b"a2", b"a3"):
        publisher.publish(topic, payload, qos=1)

    tcp = resume(cluster.port, client_id, protocol)
    expect_resumed(tcp, [b"a1", b"a2", b"a3"])
    assert moved_to(cluster, client_id, 1)
    # The subscription is on worker 1 now, and only there: one copy per message.
    publisher.publish(topic, b"live", qos=1)
    assert tcp.expect(timeout=RESPONSE_TIMEOUT_S).payload == b"live"
    tcp.expect_none(wait=0.5)
    tcp.disconnect()
    for payload in (b"b1", b"b2"):
        publisher.publish(topic, payload, qos=1)

    web_again = websocket()
    expect_resumed(web_again, [b"b1", b"b2"])
    assert moved_to(cluster, client_id, 0)


@pytest.mark.parametrize("shared", [False, True], ids=["plain", "shared"])
def test_messages_during_move_reach_session(cluster: Cluster, shared: bool) -> None:
    """A session moves from worker 0 (WebSocket) to worker 1 (TCP, the owner of the id)
    while worker 2, where the publisher is, is stopped with five messages for it waiting to
    be read. When worker 2 goes on it routes them as it knew the subscription before the
    move, to worker 0, which sends them on to worker 1 before the client's CONNACK. With a
    shared subscription, worker 2 sends them to worker 0 as the worker of the group's only
    member."""
    client_id = client_owned_by(1, "pump" if shared else "valve")
    topic = f"moving/{client_id}"
    publisher = TestClient(cluster.port, client_owned_by(2, "planner"))
    web = connect_on(
        cluster, 0, resume(cluster.http_port, client_id, V5, "websockets", connect=False)
    )
    web.subscribe(f"$share/movers/{topic}" if shared else topic, qos=1)
    web.disconnect()
    publisher.publish(topic, b"before", qos=1)

    during = [b"during %d" % number for number in range(5)]
    publisher_worker = worker_pids(cluster)[2]
    os.kill(publisher_worker, signal.SIGSTOP)
    try:
        for payload in during:
            publisher.publish(topic, payload, qos=1, wait=False)
        tcp = resume(cluster.port, client_id, V5, connect=False)
        tcp.connect(wait=False)
        # Worker 1 takes the session in and waits for worker 0, which waits for worker 2.
        time.sleep(0.3)
    finally:
        os.kill(publisher_worker, signal.SIGCONT)

    assert tcp.connected.wait(scaled(RESPONSE_TIMEOUT_S)), "no CONNACK"
    expect_resumed(tcp, [b"before", *during])
    assert moved_to(cluster, client_id, 1)


def test_move_ends_without_stopped_worker(cluster: Cluster) -> None:
    """A worker that is stopped during a move never sends its MARK. The old worker sends
    what it collected after a second, and the client still resumes its session."""
    client_id = client_owned_by(1, "gate")
    topic = f"moving/{client_id}"
    publisher = TestClient(cluster.port, client_owned_by(1, "planner"))
    web = connect_on(
        cluster, 0, resume(cluster.http_port, client_id, V5, "websockets", connect=False)
    )
    web.subscribe(topic, qos=1)
    web.disconnect()
    publisher.publish(topic, b"queued", qos=1)
    stopped = worker_pids(cluster)[2]
    os.kill(stopped, signal.SIGSTOP)
    try:
        tcp = resume(cluster.port, client_id, V5)
        expect_resumed(tcp, [b"queued"])
    finally:
        os.kill(stopped, signal.SIGCONT)
    assert f"client {client_id}: timed out after 1 s waiting for worker(s) 2" in cluster.log_text()


def test_stopped_worker_is_logged_and_skipped(tmp_path: Path) -> None:
    """A worker stopped with SIGSTOP keeps its process, so it is not restarted. The
    supervisor logs it after SILENT_SECONDS without a heartbeat, with its process state,
    and logs again once it runs. Meanwhile the other worker rejects the CONNECT of a client
    that the stopped one serves and fails its things' REST requests at once."""
    cluster = Cluster(tmp_path / "data", 2)
    name = next(f"kiln{n}" for n in range(100) if owner_of(f"kiln{n}", 2) == 1)
    base = f"http://{HOST}:{cluster.http_port}"
    try:
        cluster.wait_until_running()
        pid = worker_pids(cluster)[1]
        os.kill(pid, signal.SIGSTOP)
        try:
            cluster.wait_for_log(f"worker 1 (pid {pid}) has not run its event loop for")
            # Worker 0 accepts every connection and request while worker 1 is stopped.
            for version, code in ((MQTT_5, ReasonCode.SERVER_UNAVAILABLE), (MQTT_3_1_1, 3)):
                connack = RawClient(cluster.port, version).connect(name)
                assert connack.reason_code == code
            reason = RawClient(cluster.port).connect(name).properties[PropertyId.REASON_STRING]
            assert reason.startswith(
                f"Worker 1, which serves client id '{name}', did not respond: it has not run "
            )
            started = time.monotonic()
            update = {"state": {"reported": {"heat": 900}}}
            response = httpx.post(f"{base}/things/{name}/shadow", json=update, timeout=10)
            assert time.monotonic() - started < HTTP_CALL_TIMEOUT
            assert response.status_code == 503
            message = response.json()["message"]
            assert "(stopped or stuck). The update was not sent there: retry it shortly." in (
                message
            )
        finally:
            os.kill(pid, signal.SIGCONT)
        cluster.wait_for_log(f"worker 1 (pid {pid}) runs again, after about")
        text = cluster.log_text()
        assert "(process state: stopped by a signal)" in text
        paused = re.search(r"runs again, after about ([\d.]+) s without", text)
        assert paused is not None
        assert float(paused.group(1)) >= SILENT_SECONDS
        # Worker 0 ran all along.
        assert text.count("has not run its event loop") == 1
        assert f"connection of client '{name}' from" in text
        assert RawClient(cluster.port).connect(name).reason_code == ReasonCode.SUCCESS
        response = httpx.post(f"{base}/things/{name}/shadow", json=update, timeout=10)
        assert response.status_code == 200, response.text
    finally:
        status = cluster.stop()
    assert status == 0, cluster.log_tail()


def test_session_moves_through_three_workers(tmp_path: Path) -> None:
    """TLS and WebSocket clients stay on the worker that accepted them. A persistent
    session goes from a WebSocket connection on worker 0 to a TLS connection on worker 2 and
    back, each time through the owner of the id, worker 1, which has neither connection."""
    from tls.certificates import make_certificates

    certificates = make_certificates(tmp_path / "certificates")
    tls_port = free_port()
    cluster = Cluster(
        tmp_path / "data",
        WORKERS,
        "--tls-port", str(tls_port),
        "--tls-cert", str(certificates.server.cert),
        "--tls-key", str(certificates.server.key),
    )  # fmt: skip
    client_id = client_owned_by(1, "press")
    topic = f"moves/{client_id}"
    try:
        cluster.wait_until_running()
        publisher = TestClient(cluster.port, client_owned_by(1, "line"))

        def websocket() -> TestClient:
            # With a certificate, the HTTP port serves MQTT over secure WebSocket.
            client = resume(
                cluster.http_port, client_id, V5, "websockets", certificates.ca, connect=False
            )
            return connect_on(cluster, 0, client)

        web = websocket()
        web.subscribe(topic, qos=1)
        web.disconnect()
        publisher.publish(topic, b"to tls", qos=1)
        secure = resume(tls_port, client_id, V5, ca=certificates.ca, connect=False)
        connect_on(cluster, 2, secure)
        expect_resumed(secure, [b"to tls"])
        secure.disconnect()
        publisher.publish(topic, b"to web", qos=1)
        web = websocket()
        expect_resumed(web, [b"to web"])
        log = cluster.log_text()
        for sender, receiver in ((0, 2), (2, 0)):
            # Logged by the worker that sends the session.
            move = f"worker-{sender} ironshadow.cluster: client {client_id}: its session moves"
            assert f"{move} to worker {receiver}" in log, (sender, receiver)
    finally:
        status = cluster.stop()
    assert status == 0, cluster.log_tail()


def test_every_worker_serves_tls(tmp_path: Path) -> None:
    """Each worker serves the TLS port, and TLS clients reach subscribers on any worker."""
    from tls.certificates import make_certificates

    certificates = make_certificates(tmp_path / "certificates")
    tls_port = free_port()
    cluster = Cluster(
        tmp_path / "data",
        2,
        "--tls-port", str(tls_port),
        "--tls-cert", str(certificates.server.cert),
        "--tls-key", str(certificates.server.key),
    )  # fmt: skip
    try:
        cluster.wait_until_running()
        assert cluster.log_text().count("MQTT TLS listener open on") == 2, cluster.log_tail()
        subscriber = TestClient(cluster.port, "tls-watcher")
        subscriber.subscribe("secure/#", qos=1)
        for number in range(6):
            client = TestClient(tls_port, f"tls-sensor-{number}", connect=False)
            client.client.tls_set(ca_certs=str(certificates.ca))
            client.connect()
            client.publish(f"secure/{number}", b"%d" % number, qos=1)
            client.close()
        received = {subscriber.expect(timeout=RESPONSE_TIMEOUT_S).topic for _ in range(6)}
        assert received == {f"secure/{number}" for number in range(6)}
    finally:
        status = cluster.stop()
    assert status == 0, cluster.log_tail()


def test_delta_reaches_device_on_owner(cluster: Cluster) -> None:
    thing = client_owned_by(1, "boiler")
    device = TestClient(cluster.port, thing)
    device.subscribe(f"$aws/things/{thing}/shadow/update/delta", qos=1)
    device.subscribe(f"$aws/things/{thing}/shadow/update/accepted", qos=1)
    device.publish(
        f"$aws/things/{thing}/shadow/update",
        json.dumps({"state": {"reported": {"setpoint": 60}}}).encode(),
        qos=1,
    )
    accepted = json.loads(device.expect(timeout=RESPONSE_TIMEOUT_S).payload)
    assert accepted["state"]["reported"] == {"setpoint": 60}
    assert accepted["version"] == 1
    application = TestClient(cluster.port, client_owned_by(2, "app"))
    application.subscribe(f"$aws/things/{thing}/shadow/update/accepted", qos=1)
    application.publish(
        f"$aws/things/{thing}/shadow/update",
        json.dumps({"state": {"desired": {"setpoint": 70}}, "clientToken": "t1"}).encode(),
        qos=1,
    )
    reply = json.loads(application.expect(timeout=RESPONSE_TIMEOUT_S).payload)
    assert reply["clientToken"] == "t1"
    assert reply["version"] == 2
    messages = {}
    for _ in range(2):
        message = device.expect(timeout=RESPONSE_TIMEOUT_S)
        messages[message.topic.rsplit("/", 1)[1]] = json.loads(message.payload)
    assert messages["delta"]["state"] == {"setpoint": 70}
    assert messages["delta"]["version"] == 2


def test_get_from_another_worker(cluster: Cluster) -> None:
    thing = client_owned_by(0, "valve")
    device = TestClient(cluster.port, thing)
    device.subscribe(f"$aws/things/{thing}/shadow/update/accepted", qos=1)
    device.publish(
        f"$aws/things/{thing}/shadow/update",
        json.dumps({"state": {"reported": {"open": True}}}).encode(),
        qos=1,
    )
    device.expect(timeout=RESPONSE_TIMEOUT_S)
    reader = TestClient(cluster.port, client_owned_by(2, "reader"))
    reader.subscribe(f"$aws/things/{thing}/shadow/get/+", qos=1)
    reader.publish(f"$aws/things/{thing}/shadow/get", b"{}", qos=1)
    message = reader.expect(timeout=RESPONSE_TIMEOUT_S)
    assert message.topic.endswith("/get/accepted"), message.payload
    assert json.loads(message.payload)["state"]["reported"] == {"open": True}
    reader.expect_none(wait=0.3)


def test_puback_waits_for_owner_store(cluster: Cluster) -> None:
    base = f"http://{HOST}:{cluster.http_port}"
    for number in range(5):
        # The thing belongs to worker 0, and the publisher's id to worker 2.
        thing = client_owned_by(0, "tank")
        publisher = TestClient(cluster.port, client_owned_by(2, "filler"))
        document = {"state": {"reported": {"level": number}}}
        publisher.publish(
            f"$aws/things/{thing}/shadow/update", json.dumps(document).encode(), qos=1
        )
        # PUBACK came back, so worker 0 has applied and stored the update.
        response = httpx.get(f"{base}/things/{thing}/shadow", timeout=10)
        assert response.status_code == 200, response.text
        assert response.json()["state"]["reported"] == {"level": number}
        publisher.close()


def test_request_lost_with_owner_is_not_acknowledged(tmp_path: Path) -> None:
    """A QoS 1 shadow request whose owner dies before confirming it gets no PUBACK: its
    publisher is disconnected instead, so that the client sends it again."""
    cluster = Cluster(tmp_path / "data")
    try:
        cluster.wait_until_running()
        pids = worker_figures(cluster.port, "pid")
        thing = client_owned_by(1, "valve")
        publisher = RawClient(cluster.port)
        publisher.connect(client_owned_by(2, "panel"))
        os.kill(int(pids[1]), signal.SIGSTOP)  # the stopped owner never replies
        try:
            document = json.dumps({"state": {"desired": {"open": True}}}).encode()
            publisher.send(Publish(f"$aws/things/{thing}/shadow/update", document, 1, packet_id=7))
            publisher.receive_none(wait=scaled(0.5))
        finally:
            os.kill(int(pids[1]), signal.SIGKILL)
        packets = publisher.wait_closed(timeout=scaled(RESPONSE_TIMEOUT_S))
        assert not [packet for packet in packets if isinstance(packet, Puback)], packets
        assert [packet.reason_code for packet in packets if isinstance(packet, Disconnect)] == [
            ReasonCode.SERVER_BUSY
        ]
        assert "closed 1 publishing connection(s) without acknowledging" in cluster.log_text()
    finally:
        status = cluster.stop()
    assert status == 0, cluster.log_tail()


def serve_once(data_dir: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    """Run ``ironshadow serve`` on ``data_dir`` with ``flags``, expecting it to exit."""
    command = [
        sys.executable, "-m", "ironshadow", "serve", *flags,
        "--host", HOST,
        "--mqtt-port", str(free_port()),
        "--http-port", str(free_port()),
        "--data-dir", str(data_dir),
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=scaled(STOP_TIMEOUT_S))


def test_restart_with_other_worker_count_keeps_data(tmp_path: Path) -> None:
    """Shadows, persistent sessions and history rows survive restarts from one process to
    3 workers, to 2, and back to one: each start moves the stores to the new owners."""
    data_dir = tmp_path / "data"
    things = [f"mixer-{number}" for number in range(12)]
    for round_number, workers in enumerate((1, 3, 2, 1)):
        cluster = Cluster(data_dir, workers)
        try:
            cluster.wait_until_running()
            app = TestClient(cluster.port, "planner")
            app.subscribe("$aws/things/+/shadow/get/accepted", qos=1)
            app.subscribe("$aws/things/+/shadow/update/accepted", qos=1)
            for thing in things:
                if round_number:
                    app.publish(f"$aws/things/{thing}/shadow/get", b"{}", qos=1)
                    stored = json.loads(app.expect(timeout=RESPONSE_TIMEOUT_S).payload)
                    assert stored["version"] == round_number, (workers, thing, stored)
                    assert stored["state"]["reported"]["round"] == round_number - 1
                update = {"state": {"reported": {"round": round_number}}}
                app.publish(f"$aws/things/{thing}/shadow/update", json.dumps(update).encode(), 1)
                accepted = json.loads(app.expect(timeout=RESPONSE_TIMEOUT_S).payload)
                assert accepted["version"] == round_number + 1
            keeper = TestClient(cluster.port, "keeper", V311, clean=False)
            assert keeper.connack[0].session_present == bool(round_number), workers
            keeper.subscribe("orders/#", qos=1)
            for client in (app, keeper):
                client.close()
            if workers == 1 and round_number:
                # One process serves the history of every thing: all four rounds are there.
                for thing in things:
                    url = f"http://{HOST}:{cluster.http_port}/things/{thing}/history"
                    points = wait_for_history(url, 4)
                    assert [point["value"] for point in points] == [0, 1, 2, 3]
        finally:
            status = cluster.stop()
        assert status == 0, f"--workers {workers} exited with {status}:\n{cluster.log_tail()}"
        if round_number:
            assert "moving the stores" in cluster.log_text()


def test_session_found_after_restart(tmp_path: Path) -> None:
    """Sessions of WebSocket clients stay in the folder of the worker that served them.
    After a restart with the same worker count, their owners learn where they are (HELD
    frames), so a client that comes back over TCP to its owner gets its session and the
    messages queued before the restart."""
    data_dir = tmp_path / "data"
    # Client ids, each with the worker that serves its WebSocket: never the owner.
    clients = [
        (client_owned_by(1, "robot"), 0),
        (client_owned_by(1, "robot"), 2),
        (client_owned_by(0, "robot"), 2),
    ]
    cluster = Cluster(data_dir)
    try:
        cluster.wait_until_running()
        publisher = TestClient(cluster.port, client_owned_by(0, "line"))
        for client_id, worker in clients:
            web = resume(cluster.http_port, client_id, V5, "websockets", connect=False)
            connect_on(cluster, worker, web)
            web.subscribe(f"orders/{client_id}", qos=1)
            web.disconnect()
            publisher.publish(f"orders/{client_id}", b"before the restart", qos=1)
        publisher.close()
    finally:
        status = cluster.stop()
    assert status == 0, cluster.log_tail()

    cluster = Cluster(data_dir)
    try:
        cluster.wait_until_running()
        for client_id, worker in clients:
            device = resume(cluster.port, client_id, V5)
            expect_resumed(device, [b"before the restart"])
            device.close()
            owner = owner_of(client_id, WORKERS)
            move = f"worker-{worker} ironshadow.cluster: client {client_id}: its session moves"
            assert f"{move} to worker {owner}" in cluster.log_text()
    finally:
        status = cluster.stop()
    assert status == 0, cluster.log_tail()


def test_takeover_after_owner_restart(tmp_path: Path) -> None:
    """WebSocket clients stay connected to workers 0 and 2 while worker 1, the owner of
    their ids, is killed and restarted. The restarted owner learns of their connections
    (HELD frames with their claims), so a new TCP connection with the same id still takes
    over each of them."""
    cluster = Cluster(tmp_path / "data")
    try:
        cluster.wait_until_running()
        webs = {}
        for worker in (0, 2):
            client_id = client_owned_by(1, "arm")
            client = TestClient(
                cluster.http_port, client_id, V5, transport="websockets", connect=False
            )
            webs[client_id] = connect_on(cluster, worker, client)
        pids = worker_pids(cluster)
        os.kill(pids[1], signal.SIGKILL)
        deadline = time.monotonic() + scaled(START_TIMEOUT_S)
        new_pids: dict[int, str] = {}
        while new_pids.get(1) in (None, str(pids[1])) and time.monotonic() < deadline:
            new_pids = worker_figures(cluster.port, "pid")
        assert new_pids.get(1) not in (None, str(pids[1])), new_pids
        for client_id, web in webs.items():
            assert web.client.is_connected(), f"{client_id} lost its connection"
            TestClient(cluster.port, client_id, V5)
            assert web.disconnected.wait(scaled(RESPONSE_TIMEOUT_S)), client_id
            assert web.disconnect_reason == ReasonCode.SESSION_TAKEN_OVER
    finally:
        status = cluster.stop()
    assert status == 0, cluster.log_tail()


def wait_for_history(url: str, count: int) -> list[dict]:
    """Return the history points at ``url`` once there are ``count``: rows reach the
    history store a moment after their update."""
    deadline = time.monotonic() + scaled(RESPONSE_TIMEOUT_S)
    points: list[dict] = []
    while time.monotonic() < deadline:
        points = httpx.get(url, params={"from": "0"}).json()["points"]
        if len(points) >= count:
            return points
        time.sleep(0.1)
    raise AssertionError(f"{len(points)} of {count} history points at {url}")


def test_killed_worker_restarts(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path / "data")
    try:
        cluster.wait_until_running()
        thing = client_owned_by(2, "pump")
        device = TestClient(cluster.port, thing)
        device.subscribe(f"$aws/things/{thing}/shadow/update/accepted", qos=1)
        device.publish(
            f"$aws/things/{thing}/shadow/update",
            json.dumps({"state": {"reported": {"rpm": 1200}}}).encode(),
            qos=1,
        )
        assert json.loads(device.expect(timeout=RESPONSE_TIMEOUT_S).payload)["version"] == 1
        pids = worker_figures(cluster.port, "pid")
        watcher = TestClient(cluster.port, client_owned_by(0, "watcher"))
        watcher.subscribe("after/#", qos=1)
        # Under load: a publisher on worker 0 keeps sending while worker 2 dies.
        publisher = TestClient(cluster.port, client_owned_by(0, "load"))
        for number in range(200):
            publisher.publish(f"load/{number}", b"x", qos=0)
        os.kill(int(pids[2]), signal.SIGKILL)
        device.disconnected.wait(scaled(RESPONSE_TIMEOUT_S))
        assert device.disconnected.is_set(), "the device stayed connected to a killed worker"
        deadline = time.monotonic() + scaled(START_TIMEOUT_S)
        new_pids = pids
        while time.monotonic() < deadline:
            new_pids = worker_figures(cluster.port, "pid")
            if new_pids.get(2) not in (None, pids[2]):
                break
        assert new_pids.get(2) not in (None, pids[2]), new_pids
        assert new_pids[0] == pids[0]
        assert new_pids[1] == pids[1]
        assert "worker 2 (pid" in cluster.log_text()
        assert "was killed by SIGKILL; restarting it" in cluster.log_text()
        device.close()
        device = TestClient(cluster.port, thing)
        device.subscribe(f"$aws/things/{thing}/shadow/update/accepted", qos=1)
        device.publish(
            f"$aws/things/{thing}/shadow/update",
            json.dumps({"state": {"reported": {"rpm": 1300}}}).encode(),
            qos=1,
        )
        accepted = json.loads(device.expect(timeout=RESPONSE_TIMEOUT_S).payload)
        # The restarted worker reloaded the shadow from its folder.
        assert accepted["version"] == 2
        # The restarted worker learns worker 0's filters when worker 0's link to it reopens,
        # which can be shortly after it accepts clients, so the device publishes until the
        # watcher on worker 0 hears it.
        deadline = time.monotonic() + scaled(RESPONSE_TIMEOUT_S)
        heard = None
        while heard is None and time.monotonic() < deadline:
            device.publish("after/restart", b"back", qos=1)
            try:
                heard = watcher.messages.get(timeout=scaled(0.2))
            except queue.Empty:
                continue
        assert heard is not None, "no message from the restarted worker reached worker 0"
        assert heard.payload == b"back"
        publisher.close()
        device.close()
    finally:
        status = cluster.stop()
    assert status == 0, cluster.log_tail()


def test_restarted_worker_catches_up_retained(tmp_path: Path) -> None:
    """Retained messages set and cleared while a worker was down reach its clients after it
    restarts, instead of the ones its folder had."""
    cluster = Cluster(tmp_path / "data")
    try:
        cluster.wait_until_running()
        publisher = TestClient(cluster.port, client_owned_by(0, "panel"))
        publisher.publish("plant/a", b"1", qos=1, retain=True)
        publisher.publish("plant/b", b"2", qos=1, retain=True)
        # Worker 1 saves its MQTT state every 100 ms.
        time.sleep(0.5)
        pids = worker_figures(cluster.port, "pid")
        os.kill(int(pids[1]), signal.SIGKILL)
        publisher.publish("plant/a", b"3", qos=1, retain=True)
        publisher.publish("plant/b", b"", qos=1, retain=True)
        publisher.publish("plant/c", b"4", qos=1, retain=True)
        deadline = time.monotonic() + scaled(START_TIMEOUT_S)
        while "worker 1: took" not in cluster.log_text():
            assert time.monotonic() < deadline, cluster.log_tail()
            time.sleep(0.05)
        reader = TestClient(cluster.port, client_owned_by(1, "reader"))
        reader.subscribe("plant/#", qos=1)
        retained = {}
        for _ in range(2):
            message = reader.expect(timeout=RESPONSE_TIMEOUT_S)
            retained[message.topic] = message.payload
        assert retained == {"plant/a": b"3", "plant/c": b"4"}
        reader.expect_none(wait=0.5)
    finally:
        status = cluster.stop()
    assert status == 0, cluster.log_tail()


def test_connect_rate_is_shared(tmp_path: Path) -> None:
    """--connect-rate applies to the whole engine: each of 3 workers admits a third."""
    cluster = Cluster(tmp_path / "data", WORKERS, "--connect-rate", "300")
    try:
        cluster.wait_until_running()
        listeners = [
            line for line in cluster.log_text().splitlines() if "MQTT listener open" in line
        ]
        assert len(listeners) == WORKERS, listeners
        for line in listeners:
            assert "admits 100 CONNECT packets per second" in line, line
            # Its own open-file limit, not the engine's --max-connections.
            assert "this worker holds at most" in line, line
    finally:
        status = cluster.stop()
    assert status == 0, cluster.log_tail()


def test_sigterm_stops_every_worker(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path / "data")
    try:
        cluster.wait_until_running()
        pids = [int(pid) for pid in worker_figures(cluster.port, "pid").values()]
        assert len(pids) == WORKERS
    finally:
        status = cluster.stop()
    assert status == 0, cluster.log_tail()
    assert "all 3 workers stopped" in cluster.log_text()
    # The workers stop together, so none reports its peers' links closing.
    assert "bus link to worker" not in cluster.log_text().split("SIGTERM received")[1]
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_one_worker_runs_without_supervisor(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path / "data", workers=1)
    try:
        cluster.wait_until_running()
        subscriber = TestClient(cluster.port, "one-listener")
        subscriber.subscribe("plant/#", qos=1)
        publisher = TestClient(cluster.port, "one-sensor")
        publisher.publish("plant/line1", b"21.5", qos=1)
        assert subscriber.expect(timeout=RESPONSE_TIMEOUT_S).payload == b"21.5"
        publisher.subscribe("$aws/things/one-sensor/shadow/update/accepted", qos=1)
        publisher.publish(
            "$aws/things/one-sensor/shadow/update",
            json.dumps({"state": {"reported": {"on": True}}}).encode(),
            qos=1,
        )
        accepted = json.loads(publisher.expect(timeout=RESPONSE_TIMEOUT_S).payload)
        assert accepted["version"] == 1
        subscriber.close()
        publisher.close()
    finally:
        status = cluster.stop()
    assert status == 0, cluster.log_tail()
    assert "supervisor" not in cluster.log_text()
    assert "worker-0" not in cluster.log_text()
    assert not (tmp_path / "data" / "workers.json").exists()
    assert (tmp_path / "data" / "shadows").exists()


def test_shared_redis_keeps_one_owner(tmp_path: Path) -> None:
    if str(STORAGE_TESTS) not in sys.path:
        sys.path.append(str(STORAGE_TESTS))
    from servers import RedisServer, fresh_redis_url

    redis_server = RedisServer.start()
    try:
        url = fresh_redis_url(redis_server)
        thing = client_owned_by(1, "press")
        document = {"state": {"reported": {"force": 9}}}
        for run_number in (1, 2):
            cluster = Cluster(tmp_path / "data", WORKERS, "--redis", url)
            try:
                cluster.wait_until_running()
                # The publisher's id belongs to worker 2, so the request is forwarded.
                client = TestClient(cluster.port, client_owned_by(2, "operator"))
                client.subscribe(f"$aws/things/{thing}/shadow/update/accepted", qos=1)
                client.publish(
                    f"$aws/things/{thing}/shadow/update", json.dumps(document).encode(), qos=1
                )
                accepted = json.loads(client.expect(timeout=RESPONSE_TIMEOUT_S).payload)
                # The second run continues from the version stored in Redis by the first.
                assert accepted["version"] == run_number
                client.close()
            finally:
                status = cluster.stop()
            assert status == 0, cluster.log_tail()
        # In the second run, workers 0 and 2 loaded the shadow from Redis and dropped it.
        assert cluster.log_text().count("forgot 1 loaded shadows that other workers own") == 2
    finally:
        redis_server.stop()


def test_connection_limits_hold_for_the_engine(tmp_path: Path) -> None:
    """--max-connections and --max-connections-per-address count every worker's
    connections, and the connections of a killed worker stop counting when it exits."""
    cluster = Cluster(
        tmp_path / "data", WORKERS, "--max-connections", "4", "--max-connections-per-address", "2"
    )
    try:
        cluster.wait_until_running()
        # From the supervisor's log: reading $SYS would take a connection.
        pids = {
            int(index): int(pid)
            for index, pid in re.findall(r"worker (\d+) launched as pid (\d+)", cluster.log_text())
        }
        # Two devices of worker 1 take 127.0.0.1's share; each worker would allow two more.
        devices = [RawClient(cluster.port) for _ in range(2)]
        for device in devices:
            assert device.connect(client_owned_by(1, "a")).reason_code == ReasonCode.SUCCESS
        assert RawClient(cluster.port).wait_closed() == []
        others = [RawClient(cluster.port, source=f"127.0.0.{number}") for number in (2, 3)]
        for other in others:
            assert other.connect(client_owned_by(0, "b")).reason_code == ReasonCode.SUCCESS
        # Four connections are open in the engine: a fifth, with a new client id, is
        # rejected at its CONNECT.
        fifth = RawClient(cluster.port, source="127.0.0.4")
        assert fifth.connect(client_owned_by(2, "e")).reason_code == ReasonCode.SERVER_BUSY

        os.kill(pids[1], signal.SIGKILL)
        for device in devices:
            assert device.wait_closed() == []
        cluster.wait_for_log("was killed by SIGKILL; restarting it")
        # The supervisor has cleared worker 1's counts: 127.0.0.1 has its share back
        # before worker 1 runs again. Worker 0 owns these devices.
        devices = [RawClient(cluster.port) for _ in range(2)]
        for device in devices:
            assert device.connect(client_owned_by(0, "c")).reason_code == ReasonCode.SUCCESS
        assert RawClient(cluster.port).wait_closed() == []

        cluster.wait_for_log("running; stop with", WORKERS + 1)
        # A closed connection frees its place, and the restarted worker counts its own.
        devices.pop().close()
        deadline = time.monotonic() + scaled(RESPONSE_TIMEOUT_S)
        late = RawClient(cluster.port)
        while not late.is_open(wait=0.2):
            assert time.monotonic() < deadline, "the closed connection still counts"
            late = RawClient(cluster.port)
        assert late.connect(client_owned_by(1, "d")).reason_code == ReasonCode.SUCCESS
        assert RawClient(cluster.port).wait_closed() == []
        assert all(other.is_open() for other in others)
    finally:
        status = cluster.stop()
    assert status == 0, cluster.log_tail()


def test_connection_limit_holds_in_a_burst(tmp_path: Path) -> None:
    """Connections that arrive while others are handed to their owners get exactly the
    places left: they neither take those of the connections on their way nor are rejected
    because of them."""
    limit = 5
    cluster = Cluster(tmp_path / "data", WORKERS, "--max-connections", str(limit))
    try:
        cluster.wait_until_running()
        clients = []
        for number in range(40):
            try:
                client = RawClient(cluster.port)
                client.send(Connect(f"burst-{number}", V5))
            except OSError:
                continue  # closed at accept before the CONNECT went out
            clients.append(client)
        # Each client gets CONNACK, or is closed at accept without one.
        pending = list(clients)
        deadline = time.monotonic() + scaled(RESPONSE_TIMEOUT_S)
        while pending and time.monotonic() < deadline:
            for client in list(pending):
                client.is_open(wait=0.01)
                if client.received or client.closed:
                    pending.remove(client)
        assert not pending, f"{len(pending)} clients got neither a CONNACK nor a close"
        replies = [client.received[0] for client in clients if client.received]
        assert all(isinstance(reply, Connack) for reply in replies), replies
        accepted = sum(reply.reason_code == ReasonCode.SUCCESS for reply in replies)
        assert accepted == limit
    finally:
        status = cluster.stop()
    assert status == 0, cluster.log_tail()


def test_takeover_at_the_engine_limit(tmp_path: Path) -> None:
    """Devices of every worker reconnect while their old connections still occupy all the
    places of --max-connections. Each new connection is passed to the device's owner and
    takes over there, and afterwards the limit is still enforced."""
    cluster = Cluster(tmp_path / "data", WORKERS, "--max-connections", str(WORKERS))
    try:
        cluster.wait_until_running()
        names = [client_owned_by(worker, "kiln") for worker in range(WORKERS)]
        current = {}
        for name in names:
            current[name] = RawClient(cluster.port)
            assert current[name].connect(name, keep_alive=60).reason_code == ReasonCode.SUCCESS
        # Twice each, so that some of the new connections land on another worker than
        # the owner and are passed to it.
        for _round in range(2):
            for name in names:
                new = RawClient(cluster.port)
                assert new.connect(name, keep_alive=60).reason_code == ReasonCode.SUCCESS
                packets = current[name].wait_closed()
                assert [packet.reason_code for packet in packets] == [
                    ReasonCode.SESSION_TAKEN_OVER
                ]
                current[name] = new
        assert all(client.is_open() for client in current.values())
        other = RawClient(cluster.port)
        assert other.connect("stranger").reason_code == ReasonCode.SERVER_BUSY
        assert other.wait_closed() == []
    finally:
        status = cluster.stop()
    assert status == 0, cluster.log_tail()


def test_closed_client_passed_to_stopped_owner(tmp_path: Path) -> None:
    """A connection that its client closed while the hand-off waited for the stopped owner
    does not take over the session of the client's live connection once the owner goes on."""
    cluster = Cluster(tmp_path / "data")
    try:
        cluster.wait_until_running()
        pids = worker_pids(cluster)
        name = client_owned_by(1, "press")
        live = RawClient(cluster.port)
        assert live.connect(name, keep_alive=60).reason_code == ReasonCode.SUCCESS
        os.kill(pids[1], signal.SIGSTOP)
        try:
            # A stopped worker accepts nothing, so another one reads this CONNECT and
            # passes the connection on to worker 1, where it waits.
            given_up = RawClient(cluster.port)
            given_up.send(Connect(name, V5, keep_alive=60))
            time.sleep(0.5)
            given_up.close()
            time.sleep(0.5)
        finally:
            os.kill(pids[1], signal.SIGCONT)
        live.receive_none(wait=2.0)
        assert live.is_open()
    finally:
        status = cluster.stop()
    assert status == 0, cluster.log_tail()


def test_restarted_worker_logs_awaited_peer(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path / "data")
    try:
        cluster.wait_until_running()
        pids = worker_pids(cluster)
        # A stopped worker 2 cannot link to the next process of worker 0.
        os.kill(pids[2], signal.SIGSTOP)
        try:
            os.kill(pids[0], signal.SIGKILL)
            cluster.wait_for_log("worker 0: waiting for bus links with worker(s) 2")
        finally:
            os.kill(pids[2], signal.SIGCONT)
        cluster.wait_for_log("running; stop with", WORKERS + 1)
        assert "no bus links with worker(s)" not in cluster.log_text()
    finally:
        status = cluster.stop()
    assert status == 0, cluster.log_tail()


def test_restarted_worker_skips_delayed_peer(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path / "data")
    try:
        cluster.wait_until_running()
        pid = worker_pids(cluster)[0]
        # Five exits in a row: 0.5, 1, 2, 4, then 8 s.
        assert kill_worker_repeatedly(cluster.log_text, 2, 5) == 8.0
        os.kill(pid, signal.SIGKILL)
        cluster.wait_for_log("worker 0: worker(s) 2 not running; linking with them when")
        # Worker 0's next process serves while worker 2 still waits for its restart.
        cluster.wait_for_log("worker 0 of 3 (pid", 2)
        assert cluster.log_text().count("worker 2 launched as pid") == 5, cluster.log_tail()
        # Once worker 2 is back, every worker is linked with every other one again.
        cluster.wait_for_log("worker 2 of 3 (pid", 2)
        cluster.wait_for_log("worker 0: bus link to worker 2 open", 2)
        cluster.wait_for_log("worker 2: bus link to worker 0 open", 2)
        text = cluster.log_text()
        assert "no bus links with worker(s)" not in text
        assert "waiting for bus links" not in text
    finally:
        status = cluster.stop()
    assert status == 0, cluster.log_tail()


def test_client_handed_to_starting_worker_waits(tmp_path: Path) -> None:
    """A client handed to a worker that still waits for its links is served once they are
    open both ways, so the acknowledgement of a request to another worker comes back."""
    cluster = Cluster(tmp_path / "data")
    try:
        cluster.wait_until_running()
        pids = worker_pids(cluster)
        # Worker 1 stopped: the next process of worker 2 links to it, but not it to worker 2.
        os.kill(pids[1], signal.SIGSTOP)
        try:
            os.kill(pids[2], signal.SIGKILL)
            cluster.wait_for_log("worker 2: bus link to worker 0 open", 2)
            device = RawClient(cluster.port, MQTT_3_1_1)
            thing = client_owned_by(1, "boiler")
            update = json.dumps({"state": {"reported": {"bar": 3}}}).encode()
            device.send(
                Connect(client_owned_by(2, "gateway"), MQTT_3_1_1),
                Publish(f"$aws/things/{thing}/shadow/update", update, 1, packet_id=7),
            )
            time.sleep(1)
        finally:
            os.kill(pids[1], signal.SIGCONT)
        assert device.receive(Connack, timeout=RESPONSE_TIMEOUT_S).reason_code == 0
        assert device.receive(Puback, timeout=RESPONSE_TIMEOUT_S).packet_id == 7
    finally:
        status = cluster.stop()
    assert status == 0, cluster.log_tail()


def test_unreachable_owner_logged_rarely(tmp_path: Path) -> None:
    """While a thing's owner is down, each QoS 1 request for it closes its publisher, and
    the reason is logged once rather than for every request."""
    cluster = Cluster(tmp_path / "data")
    try:
        cluster.wait_until_running()
        # Five exits in a row keep worker 1 down for 8 s.
        assert kill_worker_repeatedly(cluster.log_text, 1, 5) == 8.0
        topic = f"$aws/things/{client_owned_by(1, 'kiln')}/shadow/update"
        for _ in range(3):
            device = RawClient(cluster.port, MQTT_3_1_1)
            device.connect(client_owned_by(0, "panel"))
            device.send(Publish(topic, b'{"state": {"reported": {"on": 1}}}', 1, packet_id=1))
            device.wait_closed(timeout=RESPONSE_TIMEOUT_S)
        text = cluster.log_text()
        assert text.count("worker 1 cannot be reached before confirming") == 1, text
        assert "(1 closed so in all)" in text
    finally:
        status = cluster.stop()
    assert status == 0, cluster.log_tail()
