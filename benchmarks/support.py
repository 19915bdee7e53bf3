"""Code shared by the broker benchmarks broker.py, connect_storm.py and shadow.py.

It contains the MQTT 3.1.1 packet encoding of the load generators and the plumbing
between the parent and its load-generator processes. It reads CPU times and kernel
counters from /proc, and starts each broker under test on a free loopback port and stops
it by its PID. Command-line and table helpers complete it.

The scripts import it as a plain module: Python puts the folder of the script it runs
first on sys.path, and spawned worker processes get the parent's sys.path.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import multiprocessing
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnContext
from pathlib import Path
from typing import Any

try:
    import uvloop
except ImportError:  # The benchmark still runs, only with a slower generator.
    uvloop = None

# All brokers listen on loopback only, and no option changes this.
BROKER_HOST = "127.0.0.1"

DEFAULT_MOSQUITTO = "/usr/sbin/mosquitto"
# One process, so that its PID is the whole engine's CPU and memory.
DEFAULT_IRONSHADOW_CMD = (
    "{python} -m ironshadow serve --workers 1 --host {host} --mqtt-port {mqtt_port}"
    " --http-port {http_port} --data-dir {data_dir}"
)

PORT_POLL_INTERVAL_S = 0.1

CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
BYTES_PER_KIB = 1024  # the unit of the memory fields in /proc/<pid>/status

# MQTT 3.1.1 control packet types (the high nibble of the first byte).
CONNACK = 2
PUBLISH = 3
PUBACK = 4
SUBACK = 9

MQTT_PROTOCOL_LEVEL_3_1_1 = 4
CONNECT_FLAG_CLEAN_SESSION = 0x02
SUBACK_FAILURE = 0x80
MAX_PACKET_ID = 0xFFFF
DISCONNECT_PACKET = b"\xe0\x00"
PUBACK_HEADER = b"\x40\x02"

# Messages on the control pipe between the parent and a worker process.
READY = "ready"
START = "start"
RESULT = "result"
STOP = "stop"
ERROR = "error"


class BenchmarkError(Exception):
    """A broker or a load-generator process failed, so one run has no result."""


class ProtocolError(Exception):
    """The broker sent bytes that are not a valid MQTT 3.1.1 packet for this client."""


# --- MQTT 3.1.1 packet encoding ------------------------------------------------------


def encode_remaining_length(length: int) -> bytes:
    """Encode the Remaining Length field: 7 bits per byte, high bit set on all but the last."""
    if not 0 <= length <= 268_435_455:
        raise ValueError(f"remaining length {length} is outside 0..268435455")
    encoded = bytearray()
    while True:
        digit, length = length % 128, length // 128
        if length:
            encoded.append(digit | 0x80)
        else:
            encoded.append(digit)
            return bytes(encoded)


def encode_string(text: str) -> bytes:
    """Encode a UTF-8 string with its two-byte big-endian length prefix."""
    data = text.encode()
    return len(data).to_bytes(2, "big") + data


def encode_packet(first_byte: int, body: bytes) -> bytes:
    return bytes([first_byte]) + encode_remaining_length(len(body)) + body


def encode_connect(client_id: str, keepalive_s: int) -> bytes:
    variable_header = (
        encode_string("MQTT")
        + bytes([MQTT_PROTOCOL_LEVEL_3_1_1, CONNECT_FLAG_CLEAN_SESSION])
        + keepalive_s.to_bytes(2, "big")
    )
    return encode_packet(0x10, variable_header + encode_string(client_id))


def encode_subscribe(packet_id: int, topic_filters: Sequence[str], qos: int) -> bytes:
    body = packet_id.to_bytes(2, "big")
    for topic_filter in topic_filters:
        body += encode_string(topic_filter) + bytes([qos])
    return encode_packet(0x82, body)


def encode_publish(topic: str, payload: bytes, qos: int, packet_id: int = 0) -> bytes:
    body = encode_string(topic)
    if qos > 0:
        body += packet_id.to_bytes(2, "big")
    return encode_packet(0x30 | (qos << 1), body + payload)


def decode_remaining_length(data: bytes, index: int) -> tuple[int, int] | None:
    """Decode the Remaining Length that starts at data[index].

    Returns (length, index of the first byte after the field), or None when the field
    is not complete yet. Raises ProtocolError when the field is longer than 4 bytes.
    """
    length = 0
    for shift in (0, 7, 14, 21):
        if index >= len(data):
            return None
        digit = data[index]
        index += 1
        length |= (digit & 0x7F) << shift
        if digit < 0x80:
            return length, index
    raise ProtocolError("remaining length field is longer than 4 bytes")


def split_packets(data: bytes, handle_packet: Callable[[int, bytes, int, int], None]) -> int:
    """Pass each complete packet in data to handle_packet, and return the bytes consumed.

    handle_packet gets (first byte, data, body start, body end), so no packet is copied.
    The bytes after the returned index are the start of a packet that is not complete yet.
    """
    end = len(data)
    position = 0
    while end - position >= 2:
        first_byte = data[position]
        remaining_length = data[position + 1]
        body_start = position + 2
        if remaining_length >= 0x80:
            decoded = decode_remaining_length(data, position + 1)
            if decoded is None:
                break
            remaining_length, body_start = decoded
        body_end = body_start + remaining_length
        if body_end > end:
            break
        handle_packet(first_byte, data, body_start, body_end)
        position = body_end
    return position


# --- Worker processes: the worker's side ---------------------------------------------


class ControlChannel:
    """The worker's end of the pipe to the parent, readable without blocking the event loop."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    def send(self, kind: str, detail: object = "") -> None:
        self.connection.send((kind, detail))

    async def receive(self, timeout_s: float) -> str | None:
        """Return the next command, or None after timeout_s or when the parent is gone."""
        loop = asyncio.get_running_loop()
        command: asyncio.Future[str | None] = loop.create_future()

        def on_readable() -> None:
            if command.done():
                return
            try:
                kind, _ = self.connection.recv()
            except EOFError:
                command.set_result(None)
            else:
                command.set_result(kind)

        loop.add_reader(self.connection.fileno(), on_readable)
        try:
            return await asyncio.wait_for(command, timeout_s)
        except TimeoutError:
            return None
        finally:
            loop.remove_reader(self.connection.fileno())


def run_worker(
    control: ControlChannel,
    main: Callable[[], Coroutine[Any, Any, None]],
    describe_error: Callable[[Exception], str] = str,
) -> None:
    """Run main() on uvloop (on asyncio without it) and report a failure to the parent.

    A BenchmarkError, ProtocolError or OSError goes to the parent as an ERROR message,
    with the error's type and describe_error(error), and ends the process with status 1.
    """
    try:
        if uvloop is not None:
            uvloop.run(main())
        else:
            asyncio.run(main())
    except (BenchmarkError, ProtocolError, OSError) as error:
        control.send(ERROR, f"{type(error).__name__}: {describe_error(error)}")
        sys.exit(1)


# --- Worker processes: the parent's side ---------------------------------------------


@dataclass
class Worker:
    """A worker process as seen from the parent."""

    name: str
    process: multiprocessing.Process
    control: Connection

    @property
    def pid(self) -> int:
        assert self.process.pid is not None, "the worker process was never started"
        return self.process.pid


def start_worker(
    context: SpawnContext, name: str, target: Callable[..., None], *args: Any
) -> Worker:
    """Start target(connection, *args) in a new process, with its end of the pipe."""
    parent_end, child_end = context.Pipe()
    process = context.Process(target=target, args=(child_end, *args), name=name, daemon=True)
    process.start()
    child_end.close()
    return Worker(name, process, parent_end)


def receive_message(worker: Worker, expected: str, timeout_s: float, task: str = "") -> Any:
    """Wait for a message of kind `expected` from the worker and return its detail.

    task names what the worker does before it sends that message, for example "connect",
    in the error messages. Without it they name the message kind.
    """
    waiting_for = task or f"send its {expected} message"
    if not worker.control.poll(max(0.0, timeout_s)):
        raise BenchmarkError(f"{worker.name} did not {waiting_for} within {timeout_s:.0f} s")
    try:
        kind, detail = worker.control.recv()
    except (EOFError, OSError):
        worker.process.join(1.0)
        raise BenchmarkError(
            f"{worker.name} exited with code {worker.process.exitcode} before it could"
            f" {waiting_for}"
        ) from None
    if kind != expected:
        raise BenchmarkError(f"{worker.name} failed: {detail}")
    return detail


def send_command(worker: Worker, command: str) -> None:
    # An OSError means the worker has exited already, and stop_workers() reports that.
    with contextlib.suppress(OSError):
        worker.control.send((command, ""))


def stop_workers(workers: Sequence[Worker], timeout_s: float) -> list[str]:
    """Stop the workers, ending any that hang by PID, and return their error reports.

    Each worker gets timeout_s to exit after STOP, and again after SIGTERM.
    """
    for worker in workers:
        send_command(worker, STOP)
    errors = []
    for worker in workers:
        worker.process.join(timeout_s)
        if worker.process.is_alive():
            errors.append(f"{worker.name} did not stop within {timeout_s:.0f} s")
            worker.process.terminate()
            worker.process.join(timeout_s)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
        while True:
            try:
                if not worker.control.poll():
                    break
                kind, detail = worker.control.recv()
            except (EOFError, OSError):  # the worker has exited and closed its end
                break
            if kind == ERROR:
                errors.append(f"{worker.name} failed: {detail}")
        worker.control.close()
    return errors


# --- CPU and kernel counters from /proc ----------------------------------------------


def read_proc_stat_fields(pid: int) -> list[str] | None:
    """Return the fields of /proc/<pid>/stat after the command name, or None if pid is gone.

    The command name is in parentheses and may contain spaces, so the fields are split
    after the last ')'. Field 3 of proc(5), the state, is at index 0.
    """
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text[text.rindex(")") + 2 :].split()


def process_cpu_seconds(pid: int, include_reaped_children: bool = False) -> float:
    """Return utime + stime of a process (all its threads), or 0.0 once it has exited.

    With include_reaped_children, add cutime + cstime, which is the CPU time of the
    children that the process has waited for.
    """
    fields = read_proc_stat_fields(pid)
    if fields is None:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])
    if include_reaped_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLOCK_TICKS_PER_S


def descendant_pids(root_pid: int) -> list[int]:
    """Return the PIDs of all live descendants of root_pid, from the ppid in /proc/*/stat."""
    children_by_parent: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = read_proc_stat_fields(int(entry.name))
        if fields is not None:
            children_by_parent.setdefault(int(fields[1]), []).append(int(entry.name))
    descendants = []
    pending = [root_pid]
    while pending:
        children = children_by_parent.get(pending.pop(), [])
        descendants.extend(children)
        pending.extend(children)
    return descendants


def process_tree_cpu_seconds(root_pid: int) -> float:
    """Return the CPU seconds of root_pid and its descendants, live or reaped.

    A descendant that exits is counted through the cutime and cstime of the process that
    reaps it. NOTE: the time of a descendant that outlives its parent, and so is reaped
    outside the tree, is lost.
    """
    tree = [root_pid, *descendant_pids(root_pid)]
    return sum(process_cpu_seconds(pid, include_reaped_children=True) for pid in tree)


def process_memory_bytes(pid: int, field_name: str) -> int | None:
    """Return a memory field of /proc/<pid>/status (VmRSS, VmHWM) in bytes, or None."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    match = re.search(rf"^{field_name}:\s+(\d+) kB$", text, re.MULTILINE)
    return int(match.group(1)) * BYTES_PER_KIB if match else None


def host_cpu_ticks() -> tuple[int, int]:
    """Return (busy, total) clock ticks summed over all CPUs, from /proc/stat."""
    values = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle_ticks = values[3] + values[4]  # idle + iowait
    # guest and guest_nice (fields 9 and 10) are already included in user and nice.
    total_ticks = sum(values[:8])
    return total_ticks - idle_ticks, total_ticks


def read_netstat_counters(names: Iterable[str]) -> dict[str, int]:
    """Return the named TcpExt counters from /proc/net/netstat, for the whole host.

    The file has pairs of lines per group: a line of names, then a line of values. A
    counter that the kernel does not have is left out, and so is every counter if the
    file cannot be read.
    """
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return {}
    for names_line, values_line in zip(lines[::2], lines[1::2], strict=False):
        if names_line.startswith("TcpExt:"):
            values = dict(zip(names_line.split()[1:], values_line.split()[1:], strict=False))
            return {name: int(values[name]) for name in names if name in values}
    return {}


TCP_LISTEN_STATE = "0A"  # st column of /proc/net/tcp, see include/net/tcp_states.h
TCP_TIME_WAIT_STATE = "06"


def port_is_listening(port: int) -> bool:
    """Return True if a socket listens on BROKER_HOST:port, from /proc/net/tcp.

    Reading the kernel's table, not connecting, keeps a probe connection without CONNECT
    out of the broker's log.
    """
    # The kernel prints the address as the 32-bit value in the host's byte order.
    address = int.from_bytes(socket.inet_aton(BROKER_HOST), sys.byteorder)
    local_address = f"{address:08X}:{port:04X}"
    with open("/proc/net/tcp") as table:
        next(table)  # the header line
        for line in table:
            fields = line.split()
            if fields[1] == local_address and fields[3] == TCP_LISTEN_STATE:
                return True
    return False


def sockets_in_time_wait() -> int:
    """Return the number of IPv4 TCP sockets in TIME-WAIT, from /proc/net/tcp."""
    with open("/proc/net/tcp") as table:
        next(table)
        return sum(1 for line in table if line.split()[3] == TCP_TIME_WAIT_STATE)


def wait_for_free_ports(most: int, timeout_s: float = 90.0) -> None:
    """Wait until at most ``most`` sockets are in TIME-WAIT, or ``timeout_s`` has passed.

    A closed loopback connection keeps its ephemeral port for 60 s, and one source address
    has about 28,000 of them here, so a 19,000 device case run right after another fails to
    connect part of its devices.
    """
    deadline = time.monotonic() + timeout_s
    while sockets_in_time_wait() > most and time.monotonic() < deadline:
        time.sleep(1.0)


# --- Brokers -------------------------------------------------------------------------


def find_free_port() -> int:
    """Return a loopback TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((BROKER_HOST, 0))
        return probe.getsockname()[1]


@dataclass
class BrokerSpec:
    """How to start one broker under test."""

    name: str
    build_command: Callable[[int, Path], list[str]]  # (MQTT port, temporary dir) -> argv
    extra_env: dict[str, str] = field(default_factory=dict)
    # Counts the shadow rows the broker stored, from its temporary dir after it stopped.
    count_store_rows: Callable[[Path], int | None] | None = None


def mosquitto_config_lines(port: int, settings: Mapping[str, str]) -> list[str]:
    """Return a Mosquitto config for a loopback listener on port, with extra settings.

    Mosquitto 2.0.11's default log types write 2 lines for every new client ("New
    connection from", "New client connected from"), so it logs errors and warnings only.
    IronShadow at its default level INFO logs no line per client either.
    """
    return [
        f"listener {port} {BROKER_HOST}",
        "allow_anonymous true",
        *(f"{name} {value}" for name, value in settings.items()),
        "persistence false",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
    ]


def make_mosquitto_spec(executable: str, settings: Mapping[str, str]) -> BrokerSpec:
    def build(port: int, workdir: Path) -> list[str]:
        config_path = workdir / "mosquitto.conf"
        config_path.write_text("\n".join(mosquitto_config_lines(port, settings)) + "\n")
        return [executable, "-c", str(config_path)]

    return BrokerSpec("mosquitto", build)


def make_ironshadow_spec(command_template: str, extra_args: str = "") -> BrokerSpec:
    """Return IronShadow started by command_template, with extra_args appended (shell words)."""

    def build(port: int, workdir: Path) -> list[str]:
        data_dir = workdir / "data"
        data_dir.mkdir()
        placeholders = {
            "python": shlex.quote(sys.executable),
            "host": BROKER_HOST,
            "mqtt_port": str(port),
            "http_port": str(find_free_port()),
            "data_dir": shlex.quote(str(data_dir)),
        }
        return shlex.split(command_template.format(**placeholders)) + shlex.split(extra_args)

    # Let `python -m ironshadow` find the package in this checkout even if it is not installed.
    source_dir = Path(__file__).resolve().parents[1] / "src"
    python_path = os.pathsep.join(filter(None, [str(source_dir), os.environ.get("PYTHONPATH")]))
    return BrokerSpec("ironshadow", build, {"PYTHONPATH": python_path})


PR_SET_PDEATHSIG = 1  # prctl(2) option, from <linux/prctl.h>


def stop_with_parent() -> None:
    """Ask Linux to send this process SIGTERM when its parent dies.

    It runs in the broker's process between fork and exec, so that a benchmark killed
    before it could stop the broker leaves no broker behind.
    NOTE: Linux clears this setting when a process changes its user ID (prctl(2)), so it
    does not cover Mosquitto 2.0.11 started as root, which switches to the mosquitto user.
    """
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class RunningBroker:
    """A broker process started for one run, and stopped by its PID on exit.

    Its stdout and stderr go to log_path. That is a file in the run's temporary folder,
    deleted on exit, unless the caller passes a path, which outlives the run. The name of
    the temporary folder starts with tempdir_prefix and the broker's name.
    """

    def __init__(
        self,
        spec: BrokerSpec,
        *,
        start_timeout_s: float,
        stop_timeout_s: float,
        tempdir_prefix: str,
        log_path: Path | None = None,
    ) -> None:
        self.spec = spec
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.port = find_free_port()
        self._tempdir = tempfile.TemporaryDirectory(prefix=f"{tempdir_prefix}-{spec.name}-")
        self.workdir = Path(self._tempdir.name)
        self.log_path = self.workdir / "broker.log" if log_path is None else log_path
        self.command: list[str] = []
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> RunningBroker:
        self.command = self.spec.build_command(self.port, self.workdir)
        try:
            with self.log_path.open("wb") as log:
                self.process = subprocess.Popen(
                    self.command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, **self.spec.extra_env},
                    preexec_fn=stop_with_parent,  # safe: the benchmarks start no threads
                )
        except OSError as error:
            self._tempdir.cleanup()
            raise BenchmarkError(f"cannot start {shlex.join(self.command)}: {error}") from error
        try:
            self._wait_for_port()
        except BaseException:
            self.stop()
            self._tempdir.cleanup()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
        self._tempdir.cleanup()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def _wait_for_port(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchmarkError(
                    f"{self.spec.name} exited with code {self.process.returncode} at start."
                    f" Output:\n{self.log_tail()}"
                )
            if port_is_listening(self.port):
                return
            time.sleep(PORT_POLL_INTERVAL_S)
        raise BenchmarkError(
            f"{self.spec.name} did not listen on port {self.port} within"
            f" {self.start_timeout_s:.0f} s. Output:\n{self.log_tail()}"
        )

    def exit_code(self) -> int | None:
        assert self.process is not None
        return self.process.poll()

    def check_running(self) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            raise BenchmarkError(
                f"{self.spec.name} exited with code {self.process.returncode} during the run."
                f" Output:\n{self.log_tail()}"
            )

    def stop(self) -> None:
        """Send SIGTERM to the broker and its descendants by PID, then SIGKILL after a timeout."""
        if self.process is None or self.process.poll() is not None:
            return
        descendants = descendant_pids(self.process.pid)
        self.process.terminate()
        try:
            self.process.wait(self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        # Workers that the broker started and that outlived it would load the next run.
        for pid in descendants:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no output)"
        return "\n".join(text.splitlines()[-lines:]) or "(no output)"

    def store_rows(self) -> int | None:
        if self.spec.count_store_rows is None:
            return None
        return self.spec.count_store_rows(self.workdir)


def matching_log_lines(log_path: Path, pattern: re.Pattern[str]) -> list[str]:
    """Return the lines of a broker log that match pattern, or [] if there is no log."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []
    return [line for line in lines if pattern.search(line)]


# --- Command line and report ---------------------------------------------------------


def split_evenly(total: int, parts: int) -> list[tuple[int, int]]:
    """Split range(total) into `parts` contiguous (start, count) slices of nearly equal size."""
    slices = []
    start = 0
    for part in range(parts):
        count = total // parts + (1 if part < total % parts else 0)
        slices.append((start, count))
        start += count
    return slices


def format_table(columns: Sequence[tuple[str, int]], rows: Iterable[Sequence[str]]) -> str:
    """Format rows of cells under a header, right-aligned to the (heading, width) columns."""
    header = "  ".join(f"{heading:>{width}}" for heading, width in columns)
    lines = [header, "-" * len(header)]
    for cells in rows:
        lines.append(
            "  ".join(f"{cell:>{width}}" for cell, (_, width) in zip(cells, columns, strict=True))
        )
    return "\n".join(lines)


def parse_qos_list(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        levels = []
    if not levels or any(level not in (0, 1) for level in levels):
        raise argparse.ArgumentTypeError(f"invalid QoS list {text!r}: use 0, 1 or 0,1")
    return list(dict.fromkeys(levels))


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


def add_window_arguments(
    parser: argparse.ArgumentParser, duration_s: float, warmup_s: float
) -> None:
    """Add --duration and --warmup, with their defaults in seconds."""
    parser.add_argument(
        "--duration",
        type=positive_float,
        default=duration_s,
        help=f"measurement window per run in seconds (default {duration_s:g})",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=warmup_s,
        help=f"load before each window in seconds (default {warmup_s:g})",
    )


def add_qos_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--qos",
        type=parse_qos_list,
        default=[0, 1],
        help="comma-separated QoS levels to run (default 0,1)",
    )


def add_ironshadow_cmd_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ironshadow-cmd",
        default=DEFAULT_IRONSHADOW_CMD,
        help="command that starts IronShadow, with the placeholders {python}, {host},"
        " {mqtt_port}, {http_port} and {data_dir} (default: %(default)r)",
    )


def add_mosquitto_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mosquitto",
        default=DEFAULT_MOSQUITTO,
        help=f"Mosquitto executable (default {DEFAULT_MOSQUITTO})",
    )
