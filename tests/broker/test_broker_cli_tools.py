"""The broker with Mosquitto's command-line clients, mosquitto_pub and mosquitto_sub, as
separate processes over loopback."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from conftest import scaled
from mqtt_client import TestClient

pytestmark = pytest.mark.skipif(
    shutil.which("mosquitto_sub") is None or shutil.which("mosquitto_pub") is None,
    reason="mosquitto_pub and mosquitto_sub are not installed",
)

VERSIONS = ["mqttv311", "mqttv5"]


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    """Collect started processes and kill any still running after the test."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.communicate()


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + scaled(timeout)
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.02)


def subscribed(broker, client_id: str, topic_filter: str) -> Callable[[], bool]:
    """Return a check that the client subscribed and every worker routes by its filter."""
    owner = broker.owner(client_id)

    def check() -> bool:
        def look() -> bool:
            session = owner.broker.sessions.get(client_id)
            return session is not None and topic_filter in session.subscriptions

        return owner.call(look) and broker.settled()

    return check


def start_sub(
    processes, broker, client_id: str, topic_filter: str, *args: str
) -> subprocess.Popen[str]:
    """Start mosquitto_sub and return once its subscription is in the broker's session."""
    command = [
        "mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.port),
        "-i", client_id, "-t", topic_filter, "-W", str(int(scaled(10))), *args,
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    processes.append(process)
    wait_for(subscribed(broker, client_id, topic_filter))
    return process


def run_pub(broker, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    command = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), *args]
    return subprocess.run(
        command, input=stdin, capture_output=True, text=True, timeout=scaled(10), check=False
    )


def run_sub(broker, *args: str, wait: int = 5) -> subprocess.CompletedProcess[str]:
    """Run mosquitto_sub to completion, for at most ``wait`` seconds."""
    command = [
        "mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.port), "-W", str(wait), *args
    ]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=scaled(wait + 5), check=False
    )


def output(process: subprocess.Popen[str]) -> str:
    stdout, _ = process.communicate(timeout=scaled(10))
    return stdout


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("qos", ["0", "1", "2"])
def test_pub_reaches_sub(broker, processes, version, qos):
    sub = start_sub(
        processes, broker, "cli-sub", "cli/+", "-V", version, "-q", qos, "-C", "1",
        "-F", "%t|%p|%q",
    )
    result = run_pub(broker, "-V", version, "-q", qos, "-t", "cli/t", "-m", "hello")
    assert result.returncode == 0, result.stderr
    assert output(sub) == f"cli/t|hello|{qos}\n"


@pytest.mark.parametrize("version", VERSIONS)
def test_retained_flag_on_late_sub(broker, processes, version):
    result = run_pub(broker, "-V", version, "-r", "-q", "1", "-t", "cli/r", "-m", "kept")
    assert result.returncode == 0, result.stderr
    result = run_sub(broker, "-t", "cli/r", "-V", version, "-C", "1", "-F", "%r %p")
    assert result.stdout == "1 kept\n"


def test_null_retained_deletes(broker, processes):
    run_pub(broker, "-r", "-t", "cli/r", "-m", "kept")
    run_pub(broker, "-r", "-t", "cli/r", "-n")
    result = run_sub(broker, "-t", "cli/r", "-C", "1", wait=1)
    assert result.stdout == ""


def test_sub_skips_stale_with_r(broker, processes):
    run_pub(broker, "-r", "-t", "cli/r", "-m", "stale")
    sub = start_sub(processes, broker, "cli-sub", "cli/r", "-R", "-C", "1")
    run_pub(broker, "-t", "cli/r", "-m", "fresh")
    assert output(sub) == "fresh\n"


def test_pub_lines_from_stdin(broker, processes):
    sub = start_sub(processes, broker, "cli-sub", "cli/lines", "-q", "1", "-C", "3")
    result = run_pub(broker, "-q", "1", "-t", "cli/lines", "-l", stdin="one\ntwo\nthree\n")
    assert result.returncode == 0, result.stderr
    assert output(sub) == "one\ntwo\nthree\n"


def test_killed_sub_publishes_will(broker, processes):
    watcher = TestClient(broker.port, "watcher")
    watcher.subscribe("wills/#", 1)
    sub = start_sub(
        processes, broker, "cli-sub", "cli/t",
        "--will-topic", "wills/cli-sub", "--will-payload", "gone", "--will-qos", "1",
    )
    sub.kill()
    message = watcher.expect()
    assert message.topic == "wills/cli-sub"
    assert message.payload == b"gone"


def test_terminated_sub_sends_no_will(broker, processes):
    watcher = TestClient(broker.port, "watcher")
    watcher.subscribe("wills/#", 1)
    sub = start_sub(
        processes, broker, "cli-sub", "cli/t", "--will-topic", "wills/cli-sub",
        "--will-payload", "gone",
    )
    # SIGTERM makes mosquitto_sub send DISCONNECT before it exits.
    sub.terminate()
    sub.communicate(timeout=scaled(5))
    watcher.expect_none()


@pytest.mark.parametrize("version", VERSIONS)
def test_persistent_sub_gets_queued(broker, processes, version):
    persistent = ["-V", version, "-c", "-q", "1"]
    if version == "mqttv5":
        persistent += ["-x", "60"]
    first = start_sub(processes, broker, "cli-sub", "cli/q", *persistent)
    first.terminate()
    first.communicate(timeout=scaled(5))
    owner = broker.owner("cli-sub")
    wait_for(lambda: owner.call(lambda: owner.broker.sessions["cli-sub"].connection is None))
    result = run_pub(broker, "-V", version, "-q", "1", "-t", "cli/q", "-m", "queued")
    assert result.returncode == 0, result.stderr
    second = run_sub(broker, "-i", "cli-sub", "-t", "cli/q", "-C", "1", *persistent)
    assert second.stdout == "queued\n"


def test_v5_properties_through_cli(broker, processes):
    sub = start_sub(
        processes, broker, "cli-sub", "cli/p", "-V", "mqttv5", "-C", "1", "-F", "%P|%R|%C|%p"
    )
    result = run_pub(
        broker, "-V", "mqttv5", "-t", "cli/p", "-m", "body",
        "-D", "publish", "user-property", "site", "A",
        "-D", "publish", "response-topic", "cli/reply",
        "-D", "publish", "content-type", "text/plain",
    )
    assert result.returncode == 0, result.stderr
    assert output(sub) == "site:A|cli/reply|text/plain|body\n"


def test_pub_topic_alias(broker, processes):
    sub = start_sub(processes, broker, "cli-sub", "cli/alias", "-q", "1", "-C", "3")
    result = run_pub(
        broker, "-V", "mqttv5", "-q", "1", "-t", "cli/alias", "-l",
        "-D", "publish", "topic-alias", "1", stdin="a\nb\nc\n",
    )
    assert result.returncode == 0, result.stderr
    assert output(sub) == "a\nb\nc\n"


def test_sub_message_expiry_shown(broker, processes):
    sub = start_sub(processes, broker, "cli-sub", "cli/e", "-V", "mqttv5", "-C", "1", "-F", "%E")
    run_pub(broker, "-V", "mqttv5", "-t", "cli/e", "-m", "x", "-D", "publish",
            "message-expiry-interval", "30")
    assert 25 <= int(output(sub)) <= 30


def test_denied_subscription_reported(make_broker):
    broker = make_broker(deny_subscriptions=("secret/#",))
    result = run_sub(broker, "-t", "secret/keys", wait=2)
    assert "All subscription requests were denied" in result.stderr


def test_sub_hash_skips_sys(make_broker, processes):
    broker = make_broker(sys_interval=0.2)
    sub = start_sub(processes, broker, "cli-sub", "#", "-v", "-C", "1")
    time.sleep(0.5)
    run_pub(broker, "-t", "cli/visible", "-m", "x")
    assert output(sub) == "cli/visible x\n"
