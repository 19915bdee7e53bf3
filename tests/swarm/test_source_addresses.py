"""``ironshadow swarm`` spreading its devices over source addresses and generator processes."""

from __future__ import annotations

import argparse
import math
import os
import resource
import subprocess
import sys
import time

import orjson
import pytest

from conftest import scaled
from ironshadow.swarm.options import (
    FD_RESERVE,
    MAX_SOURCE_ADDRESSES,
    SwarmOptions,
    SwarmUsageError,
    check,
    default_source_addresses,
    devices_per_source_address,
    devices_per_source_address_by_default,
    parse_source_addresses,
)

SWARM = [sys.executable, "-m", "ironshadow", "swarm", "--warmup", "0.5s"]


def run_swarm(*arguments: str, preexec_fn=None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SWARM, *arguments],
        capture_output=True,
        text=True,
        timeout=scaled(120),
        preexec_fn=preexec_fn,
    )


# --- parsing -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1", ("127.0.0.1",)),
        ("127.0.0.1-127.0.0.3", ("127.0.0.1", "127.0.0.2", "127.0.0.3")),
        ("127.0.0.9,127.0.0.1-127.0.0.2", ("127.0.0.9", "127.0.0.1", "127.0.0.2")),
        (" 127.0.0.1 , 127.0.0.2 ", ("127.0.0.1", "127.0.0.2")),
        ("127.0.0.255-127.0.1.1", ("127.0.0.255", "127.0.1.0", "127.0.1.1")),
        ("::1", ("::1",)),
    ],
)
def test_source_addresses_parse(text, expected):
    assert parse_source_addresses(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("127.0.0.x", "invalid source address '127.0.0.x'"),
        ("127.0.0.1-", "invalid source address '127.0.0.1-'"),
        ("127.0.0.5-127.0.0.1", "the last address must follow the first"),
        ("127.0.0.1-::1", "of the same IP version"),
        ("127.0.0.1,127.0.0.1", "an address is listed twice"),
        (",", "give at least one address"),
        ("127.0.0.0-127.0.255.255", f"more than {MAX_SOURCE_ADDRESSES:,} addresses"),
    ],
)
def test_source_addresses_reject_invalid(text, message):
    with pytest.raises(argparse.ArgumentTypeError) as raised:
        parse_source_addresses(text)
    assert message in str(raised.value)


def test_invalid_source_addresses_exit_with_message():
    completed = run_swarm("--port", "1", "--source-addresses", "127.0.0.5-127.0.0.1")
    assert completed.returncode == 2
    assert "--source-addresses" in completed.stderr
    assert "the last address must follow the first" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_unassigned_source_address_is_a_clear_error():
    # 192.0.2.0/24 is reserved for documentation (RFC 5737), so no interface has it. The
    # check only binds a socket: nothing is sent.
    completed = run_swarm("--port", "1", "--devices", "4", "--source-addresses", "192.0.2.7")
    assert completed.returncode == 2
    assert "cannot bind to 192.0.2.7" in completed.stderr
    assert "addresses of this machine" in completed.stderr


def test_source_address_version_must_match_host():
    completed = run_swarm("--port", "1", "--devices", "4", "--source-addresses", "::1")
    assert completed.returncode == 2
    assert "::1 is an IPv6 address but --host 127.0.0.1 is IPv4" in completed.stderr


def test_too_few_source_addresses_is_a_clear_error():
    per_address = devices_per_source_address()
    devices = per_address * 2 + 1
    completed = run_swarm(
        "--port",
        "1",
        "--devices",
        str(devices),
        "--processes",
        "8",
        "--source-addresses",
        "127.0.0.1-127.0.0.2",
    )
    assert completed.returncode == 2
    each = math.ceil(devices / 2)
    assert f"over 2 source addresses puts {each:,} devices on each" in completed.stderr
    assert "give at least 3 addresses in --source-addresses" in completed.stderr


# --- the default spread --------------------------------------------------------------------


def test_default_is_the_kernels_choice_for_small_fleets():
    options = SwarmOptions(devices=devices_per_source_address_by_default())
    assert default_source_addresses(options) == ()


def test_default_spreads_large_loopback_fleets():
    per_address = devices_per_source_address_by_default()
    assert per_address <= devices_per_source_address()
    options = SwarmOptions(devices=2 * per_address + 1)
    assert default_source_addresses(options) == ("127.0.0.1", "127.0.0.2", "127.0.0.3")


def test_given_source_addresses_win_over_default():
    options = SwarmOptions(devices=10, source_addresses=("127.0.0.7",))
    assert default_source_addresses(options) == ("127.0.0.7",)


def test_large_fleet_to_remote_host_needs_source_addresses():
    # Not a loopback address, so the swarm cannot know which local addresses reach it.
    options = SwarmOptions(host="192.0.2.1", devices=devices_per_source_address() + 1)
    assert default_source_addresses(options) == ()
    with pytest.raises(SwarmUsageError) as raised:
        check(options)
    assert "give --source-addresses with addresses of this machine" in str(raised.value)


# --- devices really connect from their addresses -------------------------------------------


def test_devices_connect_from_given_addresses(make_engine):
    engine = make_engine(sys_interval=1)
    addresses = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
    devices = 30
    swarm = subprocess.Popen(
        [
            *SWARM,
            "--port",
            str(engine.port),
            "--devices",
            str(devices),
            "--processes",
            "2",
            "--frequency",
            "1s",
            "--duration",
            "10m",
            "--source-addresses",
            "127.0.0.2-127.0.0.4",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def device_peers() -> dict[str, str]:
        return {
            connection.client_id: connection.peer.rpartition(":")[0]
            for connection in engine.server.broker.connections
            if connection.client_id.startswith("swarm-") and connection.client_id[6:].isdigit()
        }

    try:
        deadline = time.monotonic() + scaled(30)
        while len(peers := engine.call(device_peers)) < devices:
            assert swarm.poll() is None, "the swarm exited before its devices connected"
            assert time.monotonic() < deadline, "the swarm's devices did not connect"
            time.sleep(0.05)
    finally:
        swarm.terminate()
        swarm.wait(timeout=scaled(30))

    for index in range(devices):
        assert peers[f"swarm-{index}"] == addresses[index % 3]
    assert set(peers.values()) == set(addresses)


def test_processes_follow_the_file_limit(make_engine):
    engine = make_engine(sys_interval=1)
    limit = 256

    def low_file_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    devices = 400
    completed = run_swarm(
        "--port",
        str(engine.port),
        "--devices",
        str(devices),
        "--frequency",
        "1s",
        "--duration",
        "1s",
        "--source-addresses",
        "127.0.0.1-127.0.0.2",
        "--json",
        preexec_fn=low_file_limit,
    )
    assert completed.returncode == 0, completed.stderr
    result = orjson.loads(completed.stdout.strip().splitlines()[-1])

    # No --processes: one per CPU, and more when one process's share of 400 devices would
    # not fit in 256 open files less the generator's own.
    expected = max(os.cpu_count() or 1, math.ceil(devices / (limit - FD_RESERVE)))
    assert result["processes"] == expected
    assert result["errors"] == 0
    assert result["source_addresses"] == ["127.0.0.1", "127.0.0.2"]
    assert engine.call(lambda: len(engine.server.shadows.shadows)) == devices


def _worker_with_low_file_limit(options, first, count, seed, pipe) -> None:
    """Run a generator process whose file limit is lower than its coordinator's."""
    from ironshadow.swarm.worker import run_worker

    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
    run_worker(options, first, count, seed, pipe)


def test_worker_checks_its_own_file_limit():
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    process = context.Process(
        target=_worker_with_low_file_limit, args=(SwarmOptions(port=1), 0, 500, 1, theirs)
    )
    process.start()
    theirs.close()
    try:
        assert ours.poll(scaled(30)), "the generator process sent nothing"
        kind, message = ours.recv()
    finally:
        process.join(scaled(30))
        ours.close()

    assert kind == "failed"
    assert f"500 devices need {500 + FD_RESERVE} open files in this process" in message
    assert "its file limit is 256" in message
    assert "--processes" in message
    assert process.exitcode == 0
