"""Measure a reconnect storm with MQTT authentication off and on, in one run.

Each case starts a fresh ``ironshadow serve`` on a free loopback port and runs
``ironshadow swarm --scenario storm --abrupt`` against it: the devices connect, publish for a
short window, lose their connections at once and reconnect at once, each with a pending delta.
The cases:

* ``off``: no users, so every client is anonymous and no topic is checked;
* ``shared``: one application user that every device and the observer log in as. The first
  CONNECT checks its password (one Argon2 hash) and every later one finds it in the cache. An
  ACL rule lets that user read ``$SYS/#``, where the swarm reads the broker's message counter.
  Application users are restricted, so every publish goes through the topic check as well;
* ``per-device`` (with ``--per-device``): one device user per simulated device, named as its
  client id, plus an admin user for the swarm's observer. Setting up hashes one password per
  device. The first connect checks each password once, because the cache is empty, and the
  storm then finds every one in the cache.

Usage (from the repository root)::

    .venv/bin/python benchmarks/auth_storm.py --devices 2000
    .venv/bin/python benchmarks/auth_storm.py --devices 500 --per-device

All traffic goes to 127.0.0.1, to engines this script starts, and each is stopped by its PID.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from support import (
    BenchmarkError,
    BrokerSpec,
    RunningBroker,
    add_ironshadow_cmd_argument,
    format_table,
    make_ironshadow_spec,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from ironshadow.auth import UserStore

CLIENT_PREFIX = "swarm-"
OBSERVER = f"{CLIENT_PREFIX}observer"
SHARED_USER = "swarm"
SHARED_PASSWORD = "swarm-benchmark-password"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0


def add_with_cli(data_dir: Path, name: str, role: str, password: str) -> None:
    """Add a user with the real ``ironshadow auth add`` command, password on stdin."""
    result = subprocess.run(
        [sys.executable, "-m", "ironshadow", "auth", "add", name, "--role", role,
         "--data-dir", str(data_dir)],
        input=password + "\n", capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if result.returncode != 0:
        raise BenchmarkError(f"ironshadow auth add {name} failed: {result.stderr.strip()}")


def prepare_off(workdir: Path, devices: int) -> tuple[list[str], list[str]]:
    return [], []


def prepare_shared(workdir: Path, devices: int) -> tuple[list[str], list[str]]:
    add_with_cli(workdir / "data", SHARED_USER, "application", SHARED_PASSWORD)
    acl = workdir / "acl.toml"
    acl.write_text(f'[[rule]]\nusers = ["{SHARED_USER}"]\nsubscribe = ["$SYS/#"]\n')
    return (["--acl-file", str(acl)], ["--username", SHARED_USER, "--password", SHARED_PASSWORD])


def prepare_per_device(workdir: Path, devices: int) -> tuple[list[str], list[str]]:
    store = UserStore(workdir / "data" / "users.json")
    started = time.monotonic()
    entries = [
        (f"{CLIENT_PREFIX}{index}", "device", f"{CLIENT_PREFIX}{index}-pw".encode())
        for index in range(devices)
    ]
    entries.append((OBSERVER, "admin", f"{OBSERVER}-pw".encode()))
    store.add_many(entries)
    print(
        f"hashed {len(entries):,} passwords in {time.monotonic() - started:.1f} s",
        file=sys.stderr,
        flush=True,
    )
    return [], ["--username", "{client_id}", "--password", "{client_id}-pw"]


CASES: dict[str, Callable[[Path, int], tuple[list[str], list[str]]]] = {
    "off": prepare_off,
    "shared": prepare_shared,
    "per-device": prepare_per_device,
}


def spec_for(
    command: str, extra: str, prepare: Callable[[Path, int], tuple[list[str], list[str]]],
    devices: int, swarm_arguments: list[str],
) -> BrokerSpec:
    """Return an IronShadow spec whose data folder ``prepare`` fills before the start."""
    base = make_ironshadow_spec(command, extra)

    def build(port: int, workdir: Path) -> list[str]:
        argv = base.build_command(port, workdir)  # creates workdir / "data"
        serve_arguments, swarm_extra = prepare(workdir, devices)
        swarm_arguments[:] = swarm_extra
        return argv + serve_arguments

    return BrokerSpec("ironshadow", build, base.extra_env)


def run_case(
    name: str, arguments: argparse.Namespace
) -> dict[str, Any]:
    swarm_extra: list[str] = []
    extra = "--sys-interval 1 --memory-only true --log-level WARNING"
    spec = spec_for(
        arguments.ironshadow_cmd, extra, CASES[name], arguments.devices, swarm_extra
    )
    with RunningBroker(
        spec,
        start_timeout_s=START_TIMEOUT_S,
        stop_timeout_s=STOP_TIMEOUT_S,
        tempdir_prefix=f"auth-storm-{name}",
    ) as broker:
        command = [
            sys.executable, "-m", "ironshadow", "swarm",
            "--port", str(broker.port), "--engine-pid", str(broker.pid),
            "--devices", str(arguments.devices), "--frequency", "10s",
            "--scenario", "storm", "--abrupt", "--connect-timeout", "300s",
            "--duration", "5s", "--warmup", "1s", "--client-prefix", CLIENT_PREFIX,
            *swarm_extra, "--json",
        ]  # fmt: skip
        shown = [part if part != SHARED_PASSWORD else "***" for part in command[1:]]
        print(f"$ {shlex.join(shown)}", file=sys.stderr, flush=True)
        completed = subprocess.run(command, capture_output=True, text=True, timeout=1800)
        if completed.returncode != 0:
            raise BenchmarkError(
                f"swarm failed for case {name} ({completed.returncode}): "
                f"{completed.stderr.strip()[-2000:]}"
            )
        return json.loads(completed.stdout.strip().splitlines()[-1])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=2000, help="simulated devices")
    parser.add_argument(
        "--per-device",
        action="store_true",
        help="also run the case with one device user per simulated device",
    )
    add_ironshadow_cmd_argument(parser)
    arguments = parser.parse_args(argv)
    cases = ["off", "shared"] + (["per-device"] if arguments.per_device else [])
    rows = []
    for name in cases:
        try:
            result = run_case(name, arguments)
        except BenchmarkError as error:
            print(f"auth storm benchmark: error: {error}", file=sys.stderr)
            return 1
        print(json.dumps({"case": name, **result}), flush=True)
        figures = result["scenario_figures"]
        connack = figures.get("storm_connack_ms") or {}

        def show(value: Any, digits: int = 1) -> str:
            return "-" if value is None else f"{value:,.{digits}f}"

        rows.append(
            [
                name,
                f"{result['devices']:,}",
                show(result["connect_s"], 2),
                show(figures.get("storm_reconnect_s"), 2),
                show(connack.get("p50")),
                show(connack.get("p99")),
                show(figures.get("storm_all_deltas_s"), 2),
                str(figures.get("storm_missing_deltas", "-")),
                show(result["engine_us_per_message"], 2),
                f"{result['errors']}",
            ]
        )
    columns = [
        ("auth", 10),
        ("devices", 8),
        ("first connect s", 15),
        ("storm reconnect s", 17),
        ("CONNACK p50 ms", 14),
        ("CONNACK p99 ms", 14),
        ("all deltas s", 12),
        ("missing", 7),
        ("engine µs/msg", 13),
        ("errors", 6),
    ]
    print(format_table(columns, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
