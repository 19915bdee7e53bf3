"""``ironshadow swarm`` run as a user runs it, against the engine and against Mosquitto."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from conftest import free_port, scaled
from ironshadow.swarm.runner import (
    engine_cpu_seconds,
    engine_rss_bytes,
    process_cpu_seconds,
    process_rss_bytes,
    process_tree,
)

SWARM = [sys.executable, "-m", "ironshadow", "swarm", "--warmup", "0.5s", "--processes", "2"]


def run_swarm(*arguments: str, preexec_fn=None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SWARM, *arguments],
        capture_output=True,
        text=True,
        timeout=scaled(120),
        preexec_fn=preexec_fn,
    )


def report(completed: subprocess.CompletedProcess[str]) -> dict:
    assert completed.returncode == 0, completed.stderr
    return orjson.loads(completed.stdout.strip().splitlines()[-1])


def test_steady_qos1_against_engine(make_engine):
    engine = make_engine(sys_interval=1)
    result = report(
        run_swarm(
            "--port", str(engine.port), "--devices", "50", "--frequency", "100ms",
            "--duration", "3s", "--qos", "1", "--json",
        )
    )
    received = engine.call(lambda: engine.server.broker.stats.publish_received)
    updates = engine.call(lambda: engine.server.shadows.updates_applied)

    assert result["scenario"] == "steady"
    assert result["offered_per_s"] == 500
    assert result["achieved_per_s"] is not None
    assert result["ack_latency_ms"]["p50"] is not None
    assert result["errors"] == 0
    assert result["disconnects"] == 0
    # Every update the devices sent reached the broker and became a shadow update. The
    # observer publishes nothing in this scenario: it probes for shadows only before a
    # storm or desired run.
    assert result["sent_total"] > 0
    assert received == result["sent_total"]
    assert updates == result["sent_total"]
    assert engine.call(lambda: len(engine.server.shadows.shadows)) == 50


def test_storm_delivers_pending_deltas(make_engine):
    engine = make_engine(sys_interval=1)
    result = report(
        run_swarm(
            "--port", str(engine.port), "--devices", "60", "--frequency", "500ms",
            "--duration", "1s", "--scenario", "storm", "--abrupt", "--json",
        )
    )
    figures = result["scenario_figures"]
    assert figures["storm_abrupt"] is True
    assert figures["storm_reconnect_s"] > 0
    assert figures["storm_missing_deltas"] == 0
    assert figures["storm_all_deltas_s"] >= figures["storm_reconnect_s"]
    assert figures["storm_connack_ms"]["p50"] is not None
    assert result["errors"] == 0


def test_silent_storm_at_the_connection_limit(make_engine):
    """The old connections of a silent drop occupy every place of max_connections (60
    devices and the swarm's observer), and yet every device reconnects and gets its delta."""
    engine = make_engine(sys_interval=1, max_connections=61)
    result = report(
        run_swarm(
            "--port", str(engine.port), "--devices", "60", "--frequency", "500ms",
            "--duration", "1s", "--scenario", "storm", "--silent", "--json",
        )
    )  # fmt: skip
    figures = result["scenario_figures"]
    assert figures["storm_silent"] is True
    assert figures["storm_missing_deltas"] == 0
    assert result["errors"] == 0
    assert engine.call(lambda: engine.server.broker.stats.connections_rejected) == 0


@pytest.mark.parametrize("flag", ["--silent", "--abrupt"])
def test_drop_flags_need_the_storm(flag):
    completed = run_swarm("--port", "1", flag)
    assert completed.returncode == 2
    assert f"{flag} sets how --scenario storm drops the connections" in completed.stderr
    assert "the scenario is steady" in completed.stderr


def test_abrupt_and_silent_exclude_each_other():
    completed = run_swarm("--port", "1", "--scenario", "storm", "--abrupt", "--silent")
    assert completed.returncode == 2
    assert "--abrupt resets the connections and --silent leaves them open" in completed.stderr


def test_silent_counts_two_files_per_device():
    def low_file_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))

    completed = run_swarm(
        "--port", "1", "--devices", "600", "--processes", "1", "--scenario", "storm",
        "--silent", preexec_fn=low_file_limit,
    )  # fmt: skip
    assert completed.returncode == 2
    assert "--devices 600 --silent over 1 processes needs 1200 open files" in completed.stderr


def test_slow_devices_keep_their_connections(make_engine):
    """Devices that report less often than their keep alive send PINGREQ, so the engine,
    which closes a connection silent for 1.5 times its keep alive, keeps them all."""
    engine = make_engine(sys_interval=1)
    result = report(
        run_swarm(
            "--port", str(engine.port), "--devices", "20", "--frequency", "10s",
            "--keep-alive", "2", "--warmup", "1s", "--duration", "5s", "--json",
        )
    )  # fmt: skip
    assert result["disconnects"] == 0
    assert result["errors"] == 0


def test_desired_converges(make_engine):
    engine = make_engine(sys_interval=1)
    result = report(
        run_swarm(
            "--port", str(engine.port), "--devices", "40", "--frequency", "1s",
            "--duration", "1s", "--scenario", "desired", "--share", "0.5", "--json",
        )
    )
    figures = result["scenario_figures"]
    assert figures["desired_devices"] == 20
    assert figures["desired_converged"] == 20
    assert figures["desired_convergence_s"] is not None
    for index in range(20):
        shadow = engine.call(engine.server.shadows.shadows.get, f"swarm-{index}")
        assert shadow.state()["reported"]["target"] == index + 1
        assert not shadow.has_delta


def test_ramp_connects_at_the_given_rate(make_engine):
    engine = make_engine(sys_interval=1)
    result = report(
        run_swarm(
            "--port", str(engine.port), "--devices", "100", "--frequency", "1s",
            "--duration", "1s", "--scenario", "ramp", "--ramp-rate", "200", "--json",
        )
    )
    # 100 connections at 200 per second take at least half a second to open.
    assert result["connect_s"] >= 0.45
    assert result["connack_latency_ms"]["p99"] is not None


@pytest.fixture
def mosquitto(tmp_path: Path):
    executable = shutil.which("mosquitto")
    if executable is None:
        pytest.skip("mosquitto is not installed (Debian package mosquitto)")
    port = free_port()
    config = tmp_path / "mosquitto.conf"
    config.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\nsys_interval 1\npersistence false\n"
    )
    process = subprocess.Popen(
        [executable, "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + scaled(10)
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "mosquitto did not start"
            time.sleep(0.05)
    yield port
    process.terminate()
    process.wait(timeout=10)


def test_steady_and_storm_against_mosquitto(mosquitto):
    result = report(
        run_swarm(
            "--port", str(mosquitto), "--devices", "50", "--frequency", "200ms",
            "--duration", "3s", "--qos", "1", "--scenario", "storm", "--json",
        )
    )
    assert result["achieved_per_s"] is not None
    assert result["ack_latency_ms"]["p50"] is not None
    figures = result["scenario_figures"]
    assert figures["storm_reconnect_s"] > 0
    assert "storm_missing_deltas" not in figures
    assert "no deltas" in figures["storm_note"]


def test_unreachable_broker_is_a_clear_error():
    completed = run_swarm("--port", str(free_port()), "--devices", "5", "--duration", "1s")
    assert completed.returncode == 2
    assert "cannot connect to the MQTT broker at 127.0.0.1:" in completed.stderr
    assert "ironshadow serve" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_impossible_rate_is_a_clear_error():
    completed = run_swarm("--port", "1", "--devices", "20000", "--frequency", "1ms")
    assert completed.returncode == 2
    assert "--devices 20000 at --frequency 1ms offer 20,000,000 messages/s" in completed.stderr
    assert "about 300,000 each" in completed.stderr
    assert "lower --devices" in completed.stderr


def test_file_limit_is_a_clear_error():
    def low_file_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    completed = run_swarm(
        "--port", "1", "--devices", "1000", "--processes", "1", preexec_fn=low_file_limit
    )
    assert completed.returncode == 2
    assert "needs 1000 open files per process, but the file limit is 256" in completed.stderr
    assert "--processes" in completed.stderr


def test_bad_duration_names_the_value():
    completed = run_swarm("--frequency", "fast")
    assert completed.returncode == 2
    assert "invalid duration 'fast'" in completed.stderr


def test_ceiling_runs_against_the_discard_server():
    result = report(
        run_swarm("--ceiling", "--devices", "20", "--frequency", "0", "--duration", "2s", "--json")
    )
    assert result["scenario_figures"]["target"].startswith("discard server")
    assert result["sent_total"] > 0
    assert result["achieved_per_s"] > 0
    assert result["errors"] == 0
    # The discard server is a local process, so its CPU is reported as the engine's.
    assert result["engine_cpu_percent_core"] is not None


def test_missing_engine_process_is_a_clear_error():
    completed = run_swarm("--port", "1", "--engine-pid", "999999999")
    assert completed.returncode == 2
    assert "--engine-pid 999999999: no such process" in completed.stderr


def _children(pid: int) -> list[int]:
    """Return the PIDs of the processes whose parent is ``pid``, read from /proc."""
    children = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(
                line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line
            )
        except OSError:
            continue  # the process ended while the loop ran
        if fields.get("PPid", "").strip() == str(pid):
            children.append(int(status.parent.name))
    return children


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGKILL])
def test_stopped_swarm_leaves_no_workers(make_engine, stop_signal):
    engine = make_engine()
    swarm = subprocess.Popen(
        [*SWARM, "--port", str(engine.port), "--devices", "20", "--frequency", "100ms",
         "--duration", "10m"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + scaled(30)
        while engine.call(lambda: len(engine.server.broker.connections)) < 20:
            assert time.monotonic() < deadline, "the swarm's devices did not connect"
            time.sleep(0.05)
        workers = _children(swarm.pid)
        assert len(workers) >= 2

        swarm.send_signal(stop_signal)
        swarm.wait(timeout=scaled(30))

        deadline = time.monotonic() + scaled(30)
        while any(_alive(pid) for pid in workers):
            assert time.monotonic() < deadline, "swarm workers outlived the swarm"
            time.sleep(0.05)
    finally:
        if swarm.poll() is None:
            swarm.kill()
            swarm.wait()


def test_engine_figures_include_child_processes():
    """--engine-pid of ironshadow serve names the supervisor; its workers are its children,
    and the engine's CPU and RSS include theirs."""
    own_pid = os.getpid()
    busy = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\n"
    child = subprocess.Popen([sys.executable, "-c", busy + "time.sleep(30)"])
    try:
        assert child.pid in process_tree(own_pid)
        deadline = time.monotonic() + scaled(10)
        while True:
            # This process's own CPU time only grows, so it is read first: the difference is
            # then at least the child's CPU time, however long the reads themselves take.
            own = process_cpu_seconds(own_pid)
            if engine_cpu_seconds(own_pid) - own >= 0.25:
                break
            assert time.monotonic() < deadline, "the child's CPU time never showed"
            time.sleep(0.05)
        assert engine_rss_bytes(own_pid) > process_rss_bytes(own_pid)
    finally:
        child.kill()
        child.wait()
