"""`ironshadow serve` as a user runs it: settings sources, errors and shutdown."""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from conftest import free_port, scaled
from ironshadow.cli import build_parser
from ironshadow.settings import (
    SettingsError,
    broker_config,
    check_storage,
    feed_config,
    resolve,
)
from mqtt_client import V5, TestClient


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *argv])


def test_settings_flag_beats_env_and_file(tmp_path):
    config = tmp_path / "engine.toml"
    config.write_text("mqtt_port = 1111\nmax_connections = 5\nconnect_rate = 2.5\n")
    environ = {"IRONSHADOW_MQTT_PORT": "2222", "IRONSHADOW_MAX_CONNECTIONS": "7"}
    values = resolve(parse("--config", str(config), "--mqtt-port", "3333"), environ)
    assert values["mqtt_port"] == 3333
    assert values["max_connections"] == 7
    assert values["connect_rate"] == 2.5


def test_settings_env_beats_file(tmp_path):
    config = tmp_path / "engine.toml"
    config.write_text("mqtt_port = 1111\n")
    values = resolve(parse("--config", str(config)), {"IRONSHADOW_MQTT_PORT": "2222"})
    assert values["mqtt_port"] == 2222


def test_settings_list_from_each_source(tmp_path):
    config = tmp_path / "engine.toml"
    config.write_text('deny_subscription = ["a/#", "b"]\n')
    from_file = resolve(parse("--config", str(config)), {})
    assert from_file["deny_subscription"] == ("a/#", "b")
    from_env = resolve(parse(), {"IRONSHADOW_DENY_SUBSCRIPTION": "x,y/+"})
    assert from_env["deny_subscription"] == ("x", "y/+")
    from_flags = resolve(parse("--deny-subscription", "p", "--deny-subscription", "q"), {})
    assert from_flags["deny_subscription"] == ("p", "q")


def test_settings_invalid_value_names_source():
    with pytest.raises(SettingsError, match="IRONSHADOW_MQTT_PORT"):
        resolve(parse(), {"IRONSHADOW_MQTT_PORT": "eighteen"})
    with pytest.raises(SettingsError, match="--queue-full-policy"):
        resolve(parse("--queue-full-policy", "explode"), {})


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (("--mqtt-port", "abc"), "expected a whole number"),
        (("--mqtt-port", "70000"), "must be from 1 to 65,535"),
        (("--http-port", "0"), "must be from 1 to 65,535"),
        (("--max-connections", "-1"), "must be at least 0"),
        (("--max-packet-size", "0"), "must be from 128 to"),
        (("--connect-rate", "-5"), "must be at least 0"),
        (("--connect-rate", "nan"), "not a number"),
        (("--receive-maximum", "0"), "must be from 1 to 65,535"),
        (("--max-keep-alive", "-3"), "must be from 0 to 65,535"),
        (("--max-shadow-size", "0"), "must be at least 1"),
        (("--ws-feed-rate", "-1"), "must be at least 0"),
        (("--ws-feed-queue", "0"), "must be at least 1"),
    ],
)
def test_settings_out_of_range(argv, expected):
    with pytest.raises(SettingsError, match=expected) as caught:
        resolve(parse(*argv), {})
    assert argv[0] in str(caught.value)


def test_settings_file_rejects_fraction_for_integer(tmp_path):
    config = tmp_path / "engine.toml"
    config.write_text("max_connections = 1.5\n")
    with pytest.raises(SettingsError, match="expected a whole number"):
        resolve(parse("--config", str(config)), {})


def test_settings_config_is_a_folder(tmp_path):
    with pytest.raises(SettingsError, match="cannot read config file"):
        resolve(parse("--config", str(tmp_path)), {})


def test_settings_unknown_key_in_file(tmp_path):
    config = tmp_path / "engine.toml"
    config.write_text("mqtt_prot = 1884\n")
    with pytest.raises(SettingsError, match="unknown setting 'mqtt_prot'"):
        resolve(parse("--config", str(config)), {})


def test_settings_missing_config_file(tmp_path):
    with pytest.raises(SettingsError, match="not found"):
        resolve(parse("--config", str(tmp_path / "absent.toml")), {})


def test_settings_feed_from_each_source(tmp_path):
    config = tmp_path / "engine.toml"
    config.write_text("ws_feed_rate = 2\nws_feed_queue = 300\n")

    defaults = feed_config(resolve(parse(), {}))
    from_file = feed_config(resolve(parse("--config", str(config)), {}))
    from_env = feed_config(resolve(parse(), {"IRONSHADOW_WS_FEED_RATE": "0.5"}))
    from_flags = feed_config(resolve(parse("--ws-feed-rate", "0", "--ws-feed-queue", "7"), {}))

    assert (defaults.rate, defaults.max_queue) == (4.0, 10_000)
    assert (from_file.rate, from_file.max_queue) == (2.0, 300)
    assert from_env.rate == 0.5
    assert (from_flags.rate, from_flags.max_queue) == (0.0, 7)


def test_settings_water_marks_checked():
    values = resolve(parse("--write-high-water", "10", "--write-low-water", "20"), {})
    with pytest.raises(SettingsError, match="write_low_water"):
        broker_config(values)


def start_engine(tmp_path, *argv: str) -> subprocess.Popen[str]:
    if "--http-port" not in argv:
        argv = ("--http-port", str(free_port()), *argv)
    return subprocess.Popen(
        [sys.executable, "-m", "ironshadow", "serve", "--data-dir", str(tmp_path / "data"), *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def wait_for_port(port: int) -> None:
    deadline = time.monotonic() + scaled(15)
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on port {port} after 15 s")


def test_serve_port_in_use_is_clear_error(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        engine = start_engine(tmp_path, "--mqtt-port", str(port))
        output, _ = engine.communicate(timeout=scaled(30))
    assert engine.returncode == 2
    assert f"MQTT port {port}" in output
    assert "--mqtt-port" in output
    assert "Traceback" not in output


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_http_port_in_use_is_clear_error(tmp_path, workers):
    # One process binds the HTTP port itself; with two, the supervisor binds it.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        engine = start_engine(
            tmp_path,
            "--mqtt-port", str(free_port()),
            "--http-port", str(port),
            "--workers", workers,
        )  # fmt: skip
        output, _ = engine.communicate(timeout=scaled(30))
    assert engine.returncode == 2
    assert f"HTTP port {port}" in output
    assert "--http-port" in output
    assert "Traceback" not in output


def test_serve_answers_mqtt_and_http(tmp_path):
    mqtt_port = free_port()
    http_port = free_port()
    engine = start_engine(tmp_path, "--mqtt-port", str(mqtt_port), "--http-port", str(http_port))
    try:
        wait_for_port(http_port)
        device = TestClient(mqtt_port, "boiler-2", V5)
        update = b'{"state": {"reported": {"bar": 1.5}}}'
        device.publish("$aws/things/boiler-2/shadow/update", update, 1)
        url = f"http://127.0.0.1:{http_port}/things/boiler-2/shadow"
        deadline = time.monotonic() + scaled(10)
        while True:
            try:
                with urllib.request.urlopen(url, timeout=scaled(5)) as response:
                    document = json.loads(response.read())
                break
            except urllib.error.HTTPError as error:
                # The update may still be on its way; anything but 404 is a failure.
                assert error.code == 404
                assert time.monotonic() < deadline, "the shadow never appeared over HTTP"
                time.sleep(0.05)
    finally:
        engine.send_signal(signal.SIGTERM)
        engine.communicate(timeout=scaled(15))
    assert document["state"]["reported"] == {"bar": 1.5}
    assert document["version"] == 1


def test_serve_sigterm_disconnects_v5_clients(tmp_path):
    port = free_port()
    engine = start_engine(tmp_path, "--mqtt-port", str(port))
    try:
        wait_for_port(port)
        client = TestClient(port, "plc-7", V5)
        engine.send_signal(signal.SIGTERM)
        assert client.disconnected.wait(scaled(10))
        assert client.disconnect_reason == 0x8B
        output, _ = engine.communicate(timeout=scaled(15))
    finally:
        if engine.poll() is None:
            engine.kill()
            engine.wait()
    assert engine.returncode == 0
    assert "broker stopped" in output
    assert (tmp_path / "data").is_dir()


def test_serve_env_and_config_file(tmp_path):
    port = free_port()
    config = tmp_path / "engine.toml"
    config.write_text(f"mqtt_port = {port}\nhttp_port = {free_port()}\n")
    engine = subprocess.Popen(
        [sys.executable, "-m", "ironshadow", "serve", "--data-dir", str(tmp_path / "d")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "IRONSHADOW_CONFIG": str(config)},
    )
    try:
        wait_for_port(port)
    finally:
        engine.send_signal(signal.SIGINT)
        engine.communicate(timeout=scaled(15))
    assert engine.returncode == 0


def test_settings_memory_only_with_stores():
    values = resolve(parse("--memory-only", "true", "--redis", "redis://127.0.0.1:6400/0"), {})
    with pytest.raises(SettingsError, match="memory_only"):
        check_storage(values)


def test_settings_abuse_limits_from_each_source(tmp_path):
    config = tmp_path / "engine.toml"
    config.write_text("max_subscriptions = 50\nconnect_rate_per_address = 3\n")
    environ = {"IRONSHADOW_MAX_PUBLISH_RATE": "2.5", "IRONSHADOW_PUBLISH_BURST": "20"}
    argv = ("--config", str(config), "--max-topic-levels", "16", "--max-topic-length", "300")
    broker = broker_config(resolve(parse(*argv), environ))
    assert broker.max_subscriptions == 50
    assert broker.connect_rate_per_address == 3.0
    assert broker.max_publish_rate == 2.5
    assert broker.publish_burst == 20
    assert broker.max_topic_levels == 16
    assert broker.max_topic_length == 300
    defaults = broker_config(resolve(parse(), {}))
    assert defaults.max_connections_per_address == 0
    assert defaults.connect_rate_per_address == 0
    assert defaults.max_publish_rate == 0
    assert defaults.max_subscriptions == 10_000


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (("--max-topic-levels", "0"), "must be from 1 to 512"),
        (("--max-topic-levels", "513"), "must be from 1 to 512"),
        (("--max-topic-length", "65536"), "must be from 1 to 65,535"),
        (("--max-publish-rate", "-1"), "must be at least 0"),
        (("--max-connections-per-address", "-1"), "must be at least 0"),
        (("--connect-burst-per-address", "2.5"), "expected a whole number"),
    ],
)
def test_settings_abuse_limit_ranges(argv, expected):
    with pytest.raises(SettingsError, match=expected) as caught:
        resolve(parse(*argv), {})
    assert argv[0] in str(caught.value)


@pytest.mark.parametrize(
    ("burst", "rate"),
    [
        ("--publish-burst", "max_publish_rate"),
        ("--connect-burst-per-address", "connect_rate_per_address"),
    ],
)
def test_settings_burst_needs_its_rate(burst, rate):
    values = resolve(parse(burst, "10"), {})
    with pytest.raises(SettingsError, match=f"set {rate} too"):
        broker_config(values)


def test_default_workers_follow_cores_and_connections():
    from ironshadow.broker.core import FILE_DESCRIPTOR_RESERVE
    from ironshadow.cluster.supervisor import FLEET_SHARE_PER_WORKER, auto_workers

    cores = len(os.sched_getaffinity(0))
    assert resolve(parse(), {})["workers"] == 0
    assert auto_workers(0) == cores
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        pytest.skip("no hard open-file limit: connections never need more workers")
    per_worker = int((hard - FILE_DESCRIPTOR_RESERVE) * FLEET_SHARE_PER_WORKER)
    assert auto_workers(per_worker) == cores
    assert auto_workers(per_worker * (cores + 1) + 1) == cores + 2


def test_huge_max_connections_needs_explicit_workers(tmp_path):
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        pytest.skip("no hard open-file limit: connections never need more workers")
    engine = start_engine(tmp_path, "--max-connections", "100000000")
    output, _ = engine.communicate(timeout=scaled(30))
    assert engine.returncode == 2
    assert "--max-connections 100000000 needs" in output
    assert "set --workers" in output
    assert "Traceback" not in output


@pytest.mark.parametrize("workers", [1, 2])
def test_unreachable_max_connections_warns(tmp_path, workers):
    from ironshadow.broker.core import FILE_DESCRIPTOR_RESERVE

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        pytest.skip("no hard open-file limit: any --max-connections can be reached")
    # Each process raises its soft limit to the hard one and keeps a reserve for itself.
    limit = workers * (hard - FILE_DESCRIPTOR_RESERVE) + 1
    engine = start_engine(
        tmp_path,
        "--mqtt-port", str(free_port()),
        "--workers", str(workers),
        "--memory-only", "true",
        "--max-connections", str(limit),
    )  # fmt: skip
    lines = []
    try:
        assert engine.stdout is not None
        for line in engine.stdout:
            lines.append(line)
            if "running; stop with" in line:
                break
    finally:
        engine.terminate()
        engine.communicate(timeout=scaled(30))
    output = "".join(lines)
    assert f"--max-connections {limit} cannot be reached: " in output
    assert "--workers 0 starts the" in output
    assert "running; stop with" in output
