"""The swarm's options: parsing, validation and the checks that turn bad input into advice."""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import re
import resource
import socket
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
# from the default net.ipv4.ip_local_port_range of 32768 to 60999. It is the fallback when
# the range cannot be read from /proc.
EPHEMERAL_PORTS_DEFAULT = 28_232
EPHEMERAL_PORT_RANGE_PATH = "/proc/sys/net/ipv4/ip_local_port_range"
# Ephemeral ports of a source address left to other sockets: the swarm's observer, other
# programs' connections from the same address, and connections of an earlier run that still
# hold their port in TIME-WAIT.
PORTS_RESERVE = 2_000
# Source addresses accepted in --source-addresses. The largest fleet worth simulating needs a
# few dozen; the cap stops a mistyped range from building a list of millions.
MAX_SOURCE_ADDRESSES = 1_024

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
    # storm: keep the old connections open and silent instead of closing them.
    silent: bool = False
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
    # Local addresses the devices bind to before connecting, device i to the address at
    # i modulo their count. Empty: chosen by default_source_addresses().
    source_addresses: tuple[str, ...] = ()

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
        """Return the generator processes: --processes, else one per CPU, and more when the
        devices of one per CPU would exceed a process's file limit."""
        wanted = self.processes
        if not wanted:
            wanted = max(os.cpu_count() or 1, math.ceil(self.devices / devices_per_process()))
        return max(1, min(wanted, self.devices))


def open_file_limit() -> int:
    """Return this process's hard limit of open files, the maximum a generator process can use."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return hard if hard != resource.RLIM_INFINITY else 1 << 20


def devices_per_process() -> int:
    """Return the devices one generator process can hold within its open-file limit."""
    return max(1, open_file_limit() - FD_RESERVE)


def ephemeral_ports() -> int:
    """Return the ports in net.ipv4.ip_local_port_range, or the Linux default if unreadable."""
    try:
        with open(EPHEMERAL_PORT_RANGE_PATH) as range_file:
            low, high = (int(value) for value in range_file.read().split())
    except (OSError, ValueError):
        return EPHEMERAL_PORTS_DEFAULT
    return max(0, high - low + 1)


def devices_per_source_address() -> int:
    """Return the devices that one source address can connect, leaving PORTS_RESERVE ports."""
    return max(1, ephemeral_ports() - PORTS_RESERVE)


def devices_per_source_address_by_default() -> int:
    """Return the devices per address when the swarm picks the addresses: half the ports.

    Connecting 25,000 devices at once from each of two addresses kept the generator processes
    busy in the kernel for 10 to 20 s, picking local ports, so that the broker closed thousands
    of connections whose CONNECT came late. Spread over four addresses, at less than half the
    ports each, the same devices connected without that delay.
    NOTE: measured on Linux 6.18 only. Linux is thought to try even ports before odd ones
    in connect(), which would make half the range the point where the search slows down.
    """
    return max(1, min(devices_per_source_address(), ephemeral_ports() // 2))


def parse_source_addresses(text: str) -> tuple[str, ...]:
    """Parse a comma-separated list of addresses and FIRST-LAST ranges, such as
    ``127.0.0.1-127.0.0.4`` or ``127.0.0.1,127.0.0.9``."""
    addresses: list[str] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        first_text, dash, last_text = item.partition("-")
        try:
            first = ipaddress.ip_address(first_text.strip())
            last = ipaddress.ip_address(last_text.strip()) if dash else first
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"invalid source address {item!r}: give IP addresses or ranges FIRST-LAST, "
                "separated by commas, such as 127.0.0.1-127.0.0.4"
            ) from None
        if first.version != last.version or last < first:
            raise argparse.ArgumentTypeError(
                f"invalid source address range {item!r}: the last address must follow the "
                "first and be of the same IP version, such as 127.0.0.1-127.0.0.4"
            )
        count = int(last) - int(first) + 1
        if len(addresses) + count > MAX_SOURCE_ADDRESSES:
            raise argparse.ArgumentTypeError(
                f"--source-addresses {text!r} names more than {MAX_SOURCE_ADDRESSES:,} "
                "addresses; give fewer"
            )
        addresses.extend(str(first + offset) for offset in range(count))
    if not addresses:
        raise argparse.ArgumentTypeError(
            f"invalid source addresses {text!r}: give at least one address, such as 127.0.0.1"
        )
    if len(set(addresses)) != len(addresses):
        raise argparse.ArgumentTypeError(
            f"invalid source addresses {text!r}: an address is listed twice"
        )
    return tuple(addresses)


def _loopback_ipv4(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.version == 4 and address.is_loopback


def default_source_addresses(options: SwarmOptions) -> tuple[str, ...]:
    """Return the source addresses that the devices bind to.

    These are --source-addresses when given. Otherwise, when the devices exceed
    devices_per_source_address_by_default() and the target is an IPv4 loopback address, they
    are as many addresses from 127.0.0.1 on as the devices need (Linux routes all of
    127.0.0.0/8 to the loopback interface). Otherwise the result is empty and the kernel
    picks the address.
    """
    if options.source_addresses:
        return options.source_addresses
    per_address = devices_per_source_address_by_default()
    if options.devices <= per_address or not _loopback_ipv4(options.host):
        return ()
    count = math.ceil(options.devices / per_address)
    first = ipaddress.IPv4Address("127.0.0.1")
    return tuple(str(first + offset) for offset in range(count))


def _check_source_addresses(options: SwarmOptions, addresses: tuple[str, ...]) -> None:
    per_address = devices_per_source_address()
    if not addresses:
        if options.devices > per_address:
            raise SwarmUsageError(
                f"--devices {options.devices}: one source address has about {per_address:,} "
                f"free local ports for connections to one server port "
                f"({EPHEMERAL_PORT_RANGE_PATH} less {PORTS_RESERVE:,} kept free); give "
                "--source-addresses with addresses of this machine, or use at most "
                f"{per_address:,} devices"
            )
        return
    try:
        host_version = ipaddress.ip_address(options.host).version
    except ValueError:
        host_version = None  # a host name: its address family shows only when connecting
    for address in addresses:
        version = ipaddress.ip_address(address).version
        if host_version is not None and version != host_version:
            raise SwarmUsageError(
                f"--source-addresses: {address} is an IPv{version} address but --host "
                f"{options.host} is IPv{host_version}; give addresses of the same version"
            )
    needed = math.ceil(options.devices / len(addresses))
    if needed > per_address:
        raise SwarmUsageError(
            f"--devices {options.devices} over {len(addresses)} source addresses puts "
            f"{needed:,} devices on each, but one address has about {per_address:,} free local "
            f"ports ({EPHEMERAL_PORT_RANGE_PATH} less {PORTS_RESERVE:,} kept free); give at "
            f"least {math.ceil(options.devices / per_address)} addresses in --source-addresses"
        )
    for address in addresses[: options.devices]:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.bind((address, 0))
        except OSError as exc:
            raise SwarmUsageError(
                f"--source-addresses: cannot bind to {address}: {exc.strerror}; give "
                "addresses of this machine (any of 127.0.0.0/8 works for a local broker)"
            ) from None


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
    if not 0 <= options.keep_alive <= 65_535:
        raise SwarmUsageError(
            f"--keep-alive {options.keep_alive}: MQTT allows 0 to 65535 seconds; 0 turns it off"
        )
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
    for flag, enabled in (("--abrupt", options.abrupt), ("--silent", options.silent)):
        if enabled and options.scenario != "storm":
            raise SwarmUsageError(
                f"{flag} sets how --scenario storm drops the connections, but the scenario is "
                f"{options.scenario}; give --scenario storm or leave {flag} out"
            )
    if options.abrupt and options.silent:
        raise SwarmUsageError(
            "--abrupt resets the connections and --silent leaves them open: give one of them"
        )
    # With --silent each device keeps its old connection open beside the new one.
    sockets = options.devices * (2 if options.silent else 1)
    per_process = math.ceil(sockets / processes)
    if per_process > devices_per_process():
        raise SwarmUsageError(
            f"--devices {options.devices}{' --silent' if options.silent else ''} over "
            f"{processes} processes needs {per_process} open files per process, but the file "
            f"limit is {open_file_limit()}; use at least "
            f"{math.ceil(sockets / devices_per_process())} --processes (each process "
            "has its own limit) or raise the hard limit (ulimit -Hn)"
        )
    _check_source_addresses(options, default_source_addresses(options))


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
        help="generator processes (default: one per CPU, or more when the devices of one "
        f"process would exceed {devices_per_process():,}, its open-file limit less "
        f"{FD_RESERVE})",
    )
    parser.add_argument(
        "--engine-pid",
        type=int,
        default=None,
        help="PID of a local engine or broker, to report its CPU and memory (with those of "
        "its child processes, such as the workers of ironshadow serve)",
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
        "--silent",
        action="store_true",
        help="storm: leave the old connections open and send nothing more on them, as a "
        "network drop that the broker does not notice does; the devices reconnect beside "
        "them, so each holds two connections until the broker closes the old one",
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
        "--keep-alive",
        type=int,
        default=defaults.keep_alive,
        help="keep alive that every device sends in CONNECT, in seconds; a device that would "
        "stay silent for half of it sends PINGREQ (default 60, 0 for none)",
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
    parser.add_argument(
        "--source-addresses",
        type=parse_source_addresses,
        default=(),
        help="local addresses the devices connect from, device i from the (i modulo count)-th: "
        "a comma-separated list of addresses and ranges FIRST-LAST, such as "
        f"127.0.0.1-127.0.0.4. One address holds at most {devices_per_source_address():,} "
        f"devices here (the ports of net.ipv4.ip_local_port_range less {PORTS_RESERVE:,}). "
        "Default: the system's choice, or, when there are more than "
        f"{devices_per_source_address_by_default():,} devices (half the ports, because "
        "connecting is slow above that) and --host is an IPv4 loopback address, 127.0.0.1, "
        "127.0.0.2 and so on, as many as needed",
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
        silent=arguments.silent,
        ramp_rate=arguments.ramp_rate,
        share=arguments.share,
        connect_timeout=arguments.connect_timeout,
        keep_alive=arguments.keep_alive,
        ceiling=arguments.ceiling,
        json=arguments.json,
        username=arguments.username,
        password=arguments.password,
        source_addresses=arguments.source_addresses,
    )
