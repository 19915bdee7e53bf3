"""`ironshadow auth` and `ironshadow serve` with users, as an operator runs them."""

from __future__ import annotations

import json
import shutil
import stat
import subprocess

import pytest

from conftest import free_port, scaled
from mqtt_client import V5, V311

from .auth_harness import (
    IRONSHADOW,
    add_user,
    paho_client,
    remove_user,
    run_auth,
    serving,
    wait_for_log,
    worker_count,
)

NOT_AUTHORIZED = 0x87
BAD_CREDENTIALS = 0x86


# --- ironshadow auth ---------------------------------------------------------------------


def test_auth_add_list_remove(tmp_path):
    data_dir = tmp_path / "data"
    added = run_auth("add", "press-1", "--role", "device", "--data-dir", str(data_dir),
                     password="s3cret-press\n")
    assert added.returncode == 0, added.stderr
    assert "added device 'press-1'" in added.stdout
    add_user(data_dir, "dashboard", "application", "s3cret-dash")

    users_file = data_dir / "users.json"
    assert stat.S_IMODE(users_file.stat().st_mode) == 0o600
    text = users_file.read_text()
    assert "s3cret" not in text
    stored = json.loads(text)["users"]
    assert stored["press-1"]["role"] == "device"
    assert stored["press-1"]["password_hash"].startswith("$argon2id$")

    listed = run_auth("list", "--data-dir", str(data_dir))
    assert listed.returncode == 0
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["NAME", "ROLE"]
    assert [line.split() for line in lines[1:]] == [
        ["dashboard", "application"],
        ["press-1", "device"],
    ]
    assert "s3cret" not in listed.stdout
    assert "argon2" not in listed.stdout

    removed = run_auth("remove", "press-1", "--data-dir", str(data_dir))
    assert removed.returncode == 0, removed.stderr
    assert "removed device 'press-1'" in removed.stdout
    listed = run_auth("list", "--data-dir", str(data_dir))
    assert [line.split()[0] for line in listed.stdout.splitlines()[1:]] == ["dashboard"]


def test_auth_add_duplicate(tmp_path):
    add_user(tmp_path, "press-1", "device", "first")
    result = run_auth("add", "press-1", "--role", "admin", "--data-dir", str(tmp_path),
                      password="second\n")
    assert result.returncode == 1
    assert "user 'press-1' already exists" in result.stderr
    assert "ironshadow auth remove press-1" in result.stderr
    stored = json.loads((tmp_path / "users.json").read_text())["users"]
    assert stored["press-1"]["role"] == "device"


def test_auth_add_bad_role(tmp_path):
    result = run_auth("add", "x", "--role", "superuser", "--data-dir", str(tmp_path),
                      password="pw\n")
    assert result.returncode == 2
    assert "invalid choice: 'superuser'" in result.stderr
    assert not (tmp_path / "users.json").exists()


def test_auth_remove_missing_user(tmp_path):
    add_user(tmp_path, "press-1", "device", "pw")
    result = run_auth("remove", "press-9", "--data-dir", str(tmp_path))
    assert result.returncode == 1
    assert "user 'press-9' not found" in result.stderr
    assert "press-1" in result.stderr  # the known users, to spot a typo


def test_auth_add_empty_password(tmp_path):
    result = run_auth("add", "press-1", "--role", "device", "--data-dir", str(tmp_path),
                      password="\n")
    assert result.returncode == 1
    assert "no password for 'press-1' on standard input" in result.stderr


def test_auth_add_invalid_device_name(tmp_path):
    result = run_auth("add", "press/1", "--role", "device", "--data-dir", str(tmp_path),
                      password="pw\n")
    assert result.returncode == 1
    assert "invalid device name 'press/1'" in result.stderr


def test_auth_list_empty(tmp_path):
    result = run_auth("list", "--data-dir", str(tmp_path))
    assert result.returncode == 0
    assert "no users in" in result.stdout


# --- ironshadow serve ----------------------------------------------------------------------


def test_serve_refuses_public_host_without_users(tmp_path):
    # 192.0.2.1 is a documentation address (RFC 5737) that no machine has: the engine must
    # stop before it tries to bind it.
    result = subprocess.run(
        [*IRONSHADOW, "serve", "--memory-only", "--host", "192.0.2.1",
         "--mqtt-port", str(free_port()), "--http-port", str(free_port()),
         "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=scaled(60),
    )  # fmt: skip
    assert result.returncode == 2
    assert "no users in" in result.stderr
    assert "--host 192.0.2.1 is not a loopback address" in result.stderr
    assert "--allow-anonymous" in result.stderr
    assert "ironshadow auth add" in result.stderr


def test_serve_allow_anonymous_passes_check(tmp_path):
    """With --allow-anonymous the check passes, and the engine goes on to bind the address."""
    result = subprocess.run(
        [*IRONSHADOW, "serve", "--memory-only", "--host", "192.0.2.1", "--allow-anonymous",
         "--mqtt-port", str(free_port()), "--http-port", str(free_port()),
         "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=scaled(60),
    )  # fmt: skip
    assert result.returncode == 2
    assert "anonymous access: no users, and allow_anonymous is set" in result.stderr
    assert "it is not an address of this machine" in result.stderr


def test_serve_logs_anonymous_mode(tmp_path):
    with serving(tmp_path / "data") as engine:
        wait_for_log(engine, "anonymous access: no users, every listener on loopback")
        client = paho_client(engine.mqtt_port, "anyone", None, None)
        assert not client.connack[1].is_failure


def test_serve_users_change_while_running(tmp_path):
    data_dir = tmp_path / "data"
    add_user(data_dir, "operator", "admin", "operator-pw")
    with serving(data_dir) as engine:
        wait_for_log(engine, "authentication required: 1 user in")
        refused = paho_client(engine.mqtt_port, "press-1", "press-1", "press-pw")
        assert refused.connack[1].value == BAD_CREDENTIALS

        add_user(data_dir, "press-1", "device", "press-pw")
        wait_for_log(engine, "authentication required: 2 users in")
        device = paho_client(engine.mqtt_port, "press-1", "press-1", "press-pw")
        assert not device.connack[1].is_failure

        remove_user(data_dir, "press-1")
        wait_for_log(engine, "authentication required: 1 user in", count=2)
        # The connected device is disconnected with Not authorized, and cannot come back.
        assert device.disconnected.wait(scaled(10))
        assert device.disconnect_reason.value == NOT_AUTHORIZED
        again = paho_client(engine.mqtt_port, "press-1", "press-1", "press-pw")
        assert again.connack[1].value == BAD_CREDENTIALS
        assert "press-pw" not in engine.log_text()


def test_serve_users_added_ends_anonymous_access(tmp_path):
    data_dir = tmp_path / "data"
    with serving(data_dir) as engine:
        anonymous = paho_client(engine.mqtt_port, "anyone", None, None)
        assert not anonymous.connack[1].is_failure
        add_user(data_dir, "operator", "admin", "operator-pw")
        wait_for_log(engine, "authentication required: 1 user in")
        assert anonymous.disconnected.wait(scaled(10))
        refused = paho_client(engine.mqtt_port, "anyone-2", None, None, protocol=V311)
        assert refused.connack[1].is_failure


ACL_GRANTING = """
[[rule]]
roles = ["device"]
publish = ["factory/{username}/telemetry"]

[[rule]]
users = ["dashboard"]
subscribe = ["factory/+/telemetry"]
"""

ACL_DENYING = """
[[rule]]
users = ["dashboard"]
subscribe = ["factory/+/telemetry"]
"""


def test_serve_acl_rule_and_reload(tmp_path):
    data_dir = tmp_path / "data"
    add_user(data_dir, "press-1", "device", "press-pw")
    add_user(data_dir, "dashboard", "application", "dash-pw")
    acl = tmp_path / "acl.toml"
    acl.write_text(ACL_GRANTING)
    with serving(data_dir, "--acl-file", str(acl)) as engine:
        dashboard = paho_client(engine.mqtt_port, "dash", "dashboard", "dash-pw")
        assert dashboard.subscribe("factory/+/telemetry", 1) == [1]
        assert dashboard.subscribe("factory/#", 1)[0].value == NOT_AUTHORIZED
        device = paho_client(engine.mqtt_port, "press-1", "press-1", "press-pw")
        device.publish("factory/press-1/telemetry", b"21.5", qos=1)
        assert dashboard.expect().payload == b"21.5"
        # Another device's topic stays closed to press-1.
        info = device.publish("factory/press-2/telemetry", b"0", qos=1)
        assert info.is_published()
        dashboard.expect_none(0.5)

        acl.write_text(ACL_DENYING)
        # Each worker reloads the file itself; the publisher's worker applies the rules.
        wait_for_log(engine, f"ACL file {acl} reloaded: 1 rules", count=worker_count(engine))
        device.publish("factory/press-1/telemetry", b"22.0", qos=1)
        dashboard.expect_none(0.5)

        acl.write_text("[[rule]]\nroles = [\"boss\"]\n")
        wait_for_log(engine, "unknown role 'boss'")
        assert "the previous rules stay in force" in engine.log_text()


def test_serve_rejects_invalid_acl_file(tmp_path):
    acl = tmp_path / "acl.toml"
    acl.write_text("[[rule]]\npublish = [\"a/#/b\"]\n")
    result = subprocess.run(
        [*IRONSHADOW, "serve", "--memory-only", "--acl-file", str(acl),
         "--mqtt-port", str(free_port()), "--http-port", str(free_port()),
         "--data-dir", str(tmp_path / "data")],
        capture_output=True, text=True, timeout=scaled(60),
    )  # fmt: skip
    assert result.returncode == 2
    assert f"ACL file {acl}, rule 1: invalid topic pattern 'a/#/b'" in result.stderr


# --- Mosquitto's clients ---------------------------------------------------------------


mosquitto = pytest.mark.skipif(
    shutil.which("mosquitto_sub") is None or shutil.which("mosquitto_pub") is None,
    reason="mosquitto_pub and mosquitto_sub are not installed",
)


@mosquitto
@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
def test_mosquitto_clients_with_password(tmp_path, version):
    data_dir = tmp_path / "data"
    add_user(data_dir, "press-1", "device", "press-pw")
    add_user(data_dir, "dashboard", "application", "dash-pw")
    with serving(data_dir) as engine:
        port = str(engine.mqtt_port)
        subscriber = subprocess.Popen(
            ["mosquitto_sub", "-h", "127.0.0.1", "-p", port, "-V", version, "-i", "dash",
             "-u", "dashboard", "-P", "dash-pw", "-t", "$aws/things/+/shadow/update/accepted",
             "-C", "1", "-W", str(int(scaled(20)))],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            # mosquitto_sub reports no moment when its subscription is in place, so the
            # device publishes again until mosquitto_sub prints a message and exits.
            payload = '{"state":{"reported":{"rpm":1200}}}'
            for _ in range(int(scaled(40))):
                published = subprocess.run(
                    ["mosquitto_pub", "-h", "127.0.0.1", "-p", port, "-V", version,
                     "-i", "press-1", "-u", "press-1", "-P", "press-pw", "-q", "1",
                     "-t", "$aws/things/press-1/shadow/update", "-m", payload],
                    capture_output=True, text=True, timeout=scaled(20),
                )  # fmt: skip
                assert published.returncode == 0, published.stderr
                try:
                    output, errors = subscriber.communicate(timeout=0.5)
                    break
                except subprocess.TimeoutExpired:
                    continue
            else:
                raise AssertionError("mosquitto_sub received nothing")
        finally:
            if subscriber.poll() is None:
                subscriber.kill()
                subscriber.communicate()
        assert subscriber.returncode == 0, errors
        assert '"rpm":1200' in output

        wrong = subprocess.run(
            ["mosquitto_pub", "-h", "127.0.0.1", "-p", port, "-V", version, "-i", "press-1",
             "-u", "press-1", "-P", "wrong", "-t", "$aws/things/press-1/shadow/update",
             "-m", "{}"],
            capture_output=True, text=True, timeout=scaled(20),
        )  # fmt: skip
        assert wrong.returncode != 0
        # Mosquitto 2.0 words the 3.1.1 return code 4 and the v5 reason 0x86 differently.
        assert "bad user name or password" in wrong.stderr.lower()


@mosquitto
def test_mosquitto_sub_denied_foreign_topic(tmp_path):
    data_dir = tmp_path / "data"
    add_user(data_dir, "press-1", "device", "press-pw")
    with serving(data_dir) as engine:
        result = subprocess.run(
            ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(engine.mqtt_port), "-V", "mqttv5",
             "-i", "press-1", "-u", "press-1", "-P", "press-pw",
             "-t", "$aws/things/press-2/shadow/#", "-W", str(int(scaled(10)))],
            capture_output=True, text=True, timeout=scaled(30),
        )  # fmt: skip
        # mosquitto_sub 2.0 exits with status 0 when every subscription was denied.
        assert "All subscription requests were denied" in result.stderr
        assert result.stdout == ""


def test_paho_v311_and_v5(tmp_path):
    data_dir = tmp_path / "data"
    add_user(data_dir, "press-1", "device", "press-pw")
    with serving(data_dir) as engine:
        for protocol in (V311, V5):
            client = paho_client(engine.mqtt_port, "press-1", "press-1", "press-pw",
                                 protocol=protocol)
            assert not client.connack[1].is_failure
            client.disconnect()
