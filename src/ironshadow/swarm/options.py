"""The swarm's options: parsing, validation and the checks that turn bad input into advice."""

from __future__ import annotations

import argparse
import math
import os
import re
import resource
from dataclasses import dataclass

SCENARIOS = ("steady", "storm", "ramp", "desired")

# File descriptors a generator process keeps for itself beyond one per device: the event loop,
# the pipe to the coordinator, logs and libraries.
FD_RESERVE = 64
# Messages per second above which one generator process certainly cannot keep up, for the
# check of an impossible rate. Publishing flat out at QoS 0 to the discard server (--ceiling)
# measured about 6 µs of generator CPU per message on 2 CPUs, about 160,000 messages/s per
# core; this bound is about twice that, so the check stops only requests no process could serve.
MAX_RATE_PER_PROCESS = 300_000
# Local ports for outgoing connections from one source address to one server port on Linux,
# from the default net.ipv4.ip_local_port_range of 32768 to 60999.
EPHEMERAL_PORTS_DEFAULT = 28_232

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m)?\s*$")


class SwarmUsageError(Exception):
    """Invalid swarm options: the message names the value and what to change."""


def parse_duration(text: str) -> float:
    """Parse ``100ms``, ``2s``, ``1.5`` (seconds) or ``1m`` into seconds."""
    match = _DURATION.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r}: use a number of seconds, or a number with ms, s or m, "
            "such as 100ms or 2s"
        )
    value = float(match.group(1))
    unit = match.group(2) or "s"
    return value * {"ms": 0.001, "s": 1.0, "m": 60.0}[unit]


@dataclass(frozen=True)
class SwarmOptions:
    host: str = "127.0.0.1"
    port: int = 1883
    devices: int = 100
    frequency: float = 1.0  # seconds between two publishes of one device; 0 for flat out
    duration: float = 10.0
    warmup: float = 2.0
    qos: int = 0
    scenario: str = "steady"
    fields: int = 4
    field_bytes: int = 0  # 0: numeric fields, else strings of this many characters
    processes: int = 0  # 0: one per CPU
    engine_pid: int | None = None
    client_prefix: str = "swarm-"
    abrupt: bool = False
    ramp_rate: float = 1000.0
    share: float = 0.1
    max_in_flight: int = 10
    keep_alive: int = 60
    connect_timeout: float = 60.0
    ceiling: bool = False
    json: bool = False
    # MQTT credentials of every device and the observer. "{client_id}" in either is replaced
    # by the client's id, so each device can have its own user.
    username: str | None = None
    password: str | None = None

    def credentials(self, client_id: str) -> tuple[str | None, bytes | None]:
        """Return the user name and password that ``client_id`` sends in CONNECT."""
        username = self.username
        if username is not None:
            username = username.replace("{client_id}", client_id)
        password = None
        if self.password is not None:
            password = self.password.replace("{client_id}", client_id).encode()
        return username, password

    @property
    def offered_rate(self) -> float:
        """Messages per second that the devices offer together (inf when flat out)."""
        return math.inf if self.frequency == 0 else self.devices / self.frequency

    def process_count(self) -> int:
        wanted = self.processes or os.cpu_count() or 1
        return max(1, min(wanted, self.devices))


def check(options: SwarmOptions) -> None:
    """Raise SwarmUsageError for options that cannot work, with what to change."""
    if options.password is not None and options.username is None:
        raise SwarmUsageError(
            "--password without --username: MQTT 3.1.1 sends a password only with a user name"
        )
    if options.devices < 1:
        raise SwarmUsageError(f"--devices {options.devices}: give at least 1 device")
    if options.qos not in (0, 1):
        raise SwarmUsageError(f"--qos {options.qos}: the swarm publishes at QoS 0 or 1")
    if options.frequency < 0:
        raise SwarmUsageError(f"--frequency {options.frequency}: must not be negative")
    if options.duration <= 0:
        raise SwarmUsageError(f"--duration {options.duration:g}: must be more than 0 s")
    if not 0 < options.share <= 1:
        raise SwarmUsageError(f"--share {options.share:g}: give a fraction above 0, at most 1")
    if options.fields < 1 or options.field_bytes < 0:
        raise SwarmUsageError(
            f"--fields {options.fields} --field-bytes {options.field_bytes}: give at least one "
            "field and a size of 0 (numbers) or more"
        )
    if options.engine_pid is not None and not os.path.exists(f"/proc/{options.engine_pid}"):
        raise SwarmUsageError(
            f"--engine-pid {options.engine_pid}: no such process on this machine; give the PID "
            "of the local engine or broker, or leave the option out"
        )
    processes = options.process_count()
    limit = processes * MAX_RATE_PER_PROCESS
    if options.offered_rate > limit and options.frequency > 0:
        raise SwarmUsageError(
            f"--devices {options.devices} at --frequency {options.frequency * 1000:g}ms offer "
            f"{options.offered_rate:,.0f} messages/s, more than {processes} generator processes "
            f"can send (about {MAX_RATE_PER_PROCESS:,} each); lower --devices, raise "
            "--frequency, or use --frequency 0 to publish as fast as possible"
        )
    per_process = math.ceil(options.devices / processes)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    available = (hard if hard != resource.RLIM_INFINITY else 1 << 20) - FD_RESERVE
    if per_process > available:
        raise SwarmUsageError(
            f"--devices {options.devices} over {processes} processes needs {per_process} open "
            f"files per process, but the file limit is {hard}; use more --processes (each "
            "process has its own limit) or raise the hard limit (ulimit -Hn)"
        )
    if options.devices > EPHEMERAL_PORTS_DEFAULT:
        raise SwarmUsageError(
            f"--devices {options.devices}: one source address has about "
            f"{EPHEMERAL_PORTS_DEFAULT:,} local ports for connections to one server port; "
            f"use at most {EPHEMERAL_PORTS_DEFAULT:,} devices"
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = SwarmOptions()
    parser.add_argument(
        "--host", default=defaults.host, help="engine or broker address (default %(default)s)"
    )
    parser.add_argument(
        "--port", type=int, default=defaults.port, help="MQTT port (default %(default)s)"
    )
    parser.add_argument(
        "--devices",
        type=int,
        default=defaults.devices,
        help="simulated devices, one MQTT connection and client id each (default %(default)s)",
    )
    parser.add_argument(
        "--frequency",
        type=parse_duration,
        default=defaults.frequency,
        help="time between two publishes of one device, such as 100ms; 0 publishes as fast "
        "as possible (default 1s)",
    )
    parser.add_argument(
        "--duration",
        type=parse_duration,
        default=defaults.duration,
        help="measurement window after the warm-up (default 10s)",
    )
    parser.add_argument(
        "--warmup",
        type=parse_duration,
        default=defaults.warmup,
        help="load before the window, not measured (default 2s)",
    )
    parser.add_argument("--qos", type=int, default=defaults.qos, choices=(0, 1))
    parser.add_argument("--scenario", default=defaults.scenario, choices=SCENARIOS)
    parser.add_argument(
        "--fields",
        type=int,
        default=defaults.fields,
        help="reported fields per update (default %(default)s)",
    )
    parser.add_argument(
        "--field-bytes",
        type=int,
        default=defaults.field_bytes,
        help="0 for numeric fields, or the length of string fields (default 0)",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=defaults.processes,
        help="generator processes (default: one per CPU)",
    )
    parser.add_argument(
        "--engine-pid",
        type=int,
        default=None,
        help="PID of a local engine or broker, to report its CPU and memory",
    )
    parser.add_argument(
        "--client-prefix",
        default=defaults.client_prefix,
        help="client id and thing name prefix; device i is PREFIX + i (default %(default)s)",
    )
    parser.add_argument(
        "--abrupt",
        action="store_true",
        help="storm: reset the connections without DISCONNECT, as a network drop does",
    )
    parser.add_argument(
        "--ramp-rate",
        type=float,
        default=defaults.ramp_rate,
        help="ramp: new connections per second (default %(default)g)",
    )
    parser.add_argument(
        "--share",
        type=float,
        default=defaults.share,
        help="desired: fraction of the devices whose desired state changes (default 0.1)",
    )
    parser.add_argument(
        "--connect-timeout",
        type=parse_duration,
        default=defaults.connect_timeout,
        help="time allowed for all devices to connect (default 60s)",
    )
    parser.add_argument(
        "--ceiling",
        action="store_true",
        help="measure the generator's own ceiling: run the same load against a discard server "
        "that this command starts on the loopback interface, instead of --host and --port",
    )
    parser.add_argument(
        "--username",
        help="user name that every device and the observer send in CONNECT; {client_id} is "
        "replaced by each client's id (default: none)",
    )
    parser.add_argument(
        "--password",
        help="password sent with --username; {client_id} is replaced as there. Other users of "
        "this machine can read it in the process list, so use a test user",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object last")


def from_arguments(arguments: argparse.Namespace) -> SwarmOptions:
    return SwarmOptions(
        host=arguments.host,
        port=arguments.port,
        devices=arguments.devices,
        frequency=arguments.frequency,
        duration=arguments.duration,
        warmup=arguments.warmup,
        qos=arguments.qos,
        scenario=arguments.scenario,
        fields=arguments.fields,
        field_bytes=arguments.field_bytes,
        processes=arguments.processes,
        engine_pid=arguments.engine_pid,
        client_prefix=arguments.client_prefix,
        abrupt=arguments.abrupt,
        ramp_rate=arguments.ramp_rate,
        share=arguments.share,
        connect_timeout=arguments.connect_timeout,
        ceiling=arguments.ceiling,
        json=arguments.json,
        username=arguments.username,
        password=arguments.password,
    )
