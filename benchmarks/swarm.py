"""Run ``ironshadow swarm`` against IronShadow and Mosquitto and print the figures side by side.

Each case starts a fresh broker on a free loopback port (IronShadow with ``--sys-interval 1``,
Mosquitto with ``sys_interval 1``), runs the swarm command with ``--json`` and ``--engine-pid``,
and keeps the JSON it prints last. The cases:

* ``ceiling``: the generator alone, against its discard server (``--ceiling``);
* ``steady``: IronShadow at each ``--devices`` count, at ``--frequency`` and QoS 0;
* ``steady-memory``: the same with ``--memory-only`` (no stores);
* ``steady-mosquitto``: the same load against Mosquitto, which only counts and drops the
  messages (nobody subscribes): the bare cost of a QoS 0 message, for the CPU ratio;
* ``storm``: a reconnect storm of ``--storm-devices`` devices, abrupt (connections reset),
  against IronShadow (with pending deltas) and Mosquitto (connections only);
* ``storm-silent``: a reconnect storm of ``--storm-devices`` devices whose old connections
  stay open and silent (``--silent``), against IronShadow with ``--max-connections`` set to
  the fleet and the swarm's observer, so that the old connections occupy every place;
* ``desired``: delta convergence for a share of ``--desired-devices`` devices.

Usage (from the repository root)::

    .venv/bin/python benchmarks/swarm.py --devices 1000,2000,5000 --frequency 100ms
    .venv/bin/python benchmarks/swarm.py --only storm --storm-devices 5000,19000
    .venv/bin/python benchmarks/swarm.py --only storm-silent --storm-devices 5000
    .venv/bin/python benchmarks/swarm.py --only steady,steady-memory,steady-mosquitto \
        --devices 2000 --frequency 100ms

IronShadow runs with its defaults (journal and SQLite in a temporary data folder), except in
``steady-memory``. Before each case the script waits until fewer than 5,000 sockets are in
TIME-WAIT, so that the case has the loopback's ephemeral ports. All traffic goes to
127.0.0.1, to servers this script starts.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from support import (
    BenchmarkError,
    RunningBroker,
    add_ironshadow_cmd_argument,
    add_mosquitto_argument,
    format_table,
    make_ironshadow_spec,
    make_mosquitto_spec,
    wait_for_free_ports,
)

CASES = (
    "ceiling",
    "steady",
    "steady-memory",
    "steady-mosquitto",
    "storm",
    "storm-silent",
    "desired",
)
BROKER_START_TIMEOUT_S = 60.0
BROKER_STOP_TIMEOUT_S = 30.0
# Sockets in TIME-WAIT allowed before a case starts: 28,000 ephemeral ports less a fleet.
FREE_PORTS_TIME_WAIT = 5_000


def parse_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid device counts {text!r}: use 1000,2000") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"invalid device counts {text!r}: use 1000,2000")
    return counts


def run_swarm(arguments: Sequence[str], timeout_s: float) -> dict[str, Any]:
    command = [sys.executable, "-m", "ironshadow", "swarm", *arguments, "--json"]
    print(f"$ {shlex.join(command[1:])}", file=sys.stderr, flush=True)
    completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    if completed.returncode != 0:
        raise BenchmarkError(f"swarm failed ({completed.returncode}): {completed.stderr.strip()}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def with_broker(spec, swarm_arguments: list[str], timeout_s: float) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    wait_for_free_ports(FREE_PORTS_TIME_WAIT)
    with RunningBroker(
        spec,
        start_timeout_s=BROKER_START_TIMEOUT_S,
        stop_timeout_s=BROKER_STOP_TIMEOUT_S,
        tempdir_prefix="swarm",
    ) as broker:
        return run_swarm(
            ["--port", str(broker.port), "--engine-pid", str(broker.pid), *swarm_arguments],
            timeout_s,
        )


def storm_arguments(devices: int, drop: str) -> list[str]:
    """Return the swarm arguments of a reconnect storm of ``devices`` devices, with
    ``drop`` (--abrupt or --silent) as the way their connections are dropped."""
    return [
        "--devices", str(devices), "--frequency", "10s", "--scenario", "storm", drop,
        "--connect-timeout", "120s", "--duration", "5s", "--warmup", "1s",
    ]  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(CASES), help="cases to run, comma-separated")
    parser.add_argument("--devices", type=parse_counts, default=[1000, 2000, 5000])
    parser.add_argument("--frequency", default="100ms")
    parser.add_argument("--duration", default="20s")
    parser.add_argument("--storm-devices", type=parse_counts, default=[5000])
    parser.add_argument("--desired-devices", type=int, default=2000)
    add_ironshadow_cmd_argument(parser)
    add_mosquitto_argument(parser)
    arguments = parser.parse_args(argv)
    cases = [case.strip() for case in arguments.only.split(",") if case.strip()]
    unknown = [case for case in cases if case not in CASES]
    if unknown:
        parser.error(f"unknown cases {unknown}: choose from {','.join(CASES)}")

    extra = "--sys-interval 1 --max-connections 19500 --log-level WARNING"
    ironshadow = make_ironshadow_spec(arguments.ironshadow_cmd, extra)
    ironshadow_memory = make_ironshadow_spec(
        arguments.ironshadow_cmd, f"{extra} --memory-only true"
    )
    mosquitto = make_mosquitto_spec(
        arguments.mosquitto, {"sys_interval": "1", "max_connections": "-1"}
    )
    common = ["--duration", arguments.duration, "--warmup", "3s"]
    rows: list[list[str]] = []

    def add_row(name: str, result: dict[str, Any]) -> None:
        figures = result["scenario_figures"]

        def show(value: Any, digits: int = 1) -> str:
            return "-" if value is None else f"{value:,.{digits}f}"

        rows.append(
            [
                name,
                f"{result['devices']:,}",
                show(result["offered_per_s"], 0),
                show(result["achieved_per_s"], 0),
                show(result["engine_cpu_percent_core"]),
                show(result["engine_us_per_message"], 2),
                show(result["engine_rss_mb"]),
                show(result["generator_cpu_percent_core"]),
                show(figures.get("storm_reconnect_s"), 2),
                show(figures.get("storm_all_deltas_s"), 2),
                show(figures.get("desired_convergence_s"), 3),
            ]
        )
        print(json.dumps({"case": name, **result}), flush=True)

    try:
        if "ceiling" in cases:
            result = run_swarm(["--ceiling", "--devices", "1000", "--frequency", "0", *common], 600)
            add_row("ceiling (discard server)", result)
        steady_brokers = [
            (f"steady {arguments.frequency}", ironshadow, "steady"),
            (f"steady {arguments.frequency} memory-only", ironshadow_memory, "steady-memory"),
            (f"steady {arguments.frequency} Mosquitto", mosquitto, "steady-mosquitto"),
        ]
        for devices in arguments.devices:
            for name, spec, case in steady_brokers:
                if case in cases:
                    steady = ["--devices", str(devices), "--frequency", arguments.frequency]
                    add_row(name, with_broker(spec, [*steady, *common], 900))
        if "storm" in cases:
            for devices in arguments.storm_devices:
                storm = storm_arguments(devices, "--abrupt")
                add_row("storm IronShadow", with_broker(ironshadow, storm, 900))
                add_row("storm Mosquitto", with_broker(mosquitto, storm, 900))
        if "storm-silent" in cases:
            for devices in arguments.storm_devices:
                # The fleet and the swarm's observer fill the engine's places.
                full = make_ironshadow_spec(
                    arguments.ironshadow_cmd,
                    f"--sys-interval 1 --max-connections {devices + 1} --log-level WARNING",
                )
                silent = storm_arguments(devices, "--silent")
                add_row("storm silent IronShadow", with_broker(full, silent, 900))
        if "desired" in cases:
            desired = [
                "--devices",
                str(arguments.desired_devices),
                "--frequency",
                "10s",
                "--scenario",
                "desired",
                "--share",
                "0.5",
                "--duration",
                "2s",
                "--warmup",
                "1s",
            ]
            add_row("desired 50 %", with_broker(ironshadow, desired, 900))
    except BenchmarkError as error:
        print(f"swarm benchmark: error: {error}", file=sys.stderr)
        return 1

    columns = [
        ("case", 24),
        ("devices", 8),
        ("offered/s", 10),
        ("achieved/s", 10),
        ("engine CPU %", 12),
        ("engine µs/msg", 13),
        ("RSS MB", 7),
        ("gen CPU %", 9),
        ("reconnect s", 11),
        ("deltas s", 8),
        ("converge s", 10),
    ]
    print(format_table(columns, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
