"""Fuzzing the broker's connection state machine in process: fuzz_scripts draws the inputs and
connection_fuzz runs and checks them. benchmarks/fuzz_long.py runs this test for a million
inputs."""

from __future__ import annotations

from connection_fuzz import checked_broker_logs, run_script
from fuzz_scripts import Open, Script, Send, scripts
from hypothesis import HealthCheck, example, given, settings

from ironshadow.mqtt import Connect, PropertyId, Publish

# Enough examples to reach every step kind and broker set-up, in about 10 s on a 2-core machine
# shared with other jobs. Derandomized, so that CI runs are repeatable, while the long run sets
# a new seed for each call.
CONNECTION_FUZZ_SETTINGS = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

_SMALL_PACKETS = {PropertyId.MAXIMUM_PACKET_SIZE: 16}


def _script(config: str, *steps, consumer: str = "none", access: bool = False) -> Script:
    return Script(config, consumer, False, access, (5, 5, 5), steps, 5)


# Inputs that found bugs, run on every test run.
SECOND_CONNECT_UNKNOWN_LEVEL = _script(
    "default",
    Open(0, True, Connect("dev-1", 5).encode()),
    Send(0, (Connect("again", 3).encode(),)),
)
RETRANSMISSIONS_WHILE_HELD = _script(
    "tight",
    Open(0, True, Connect("dev-1", 5).encode()),
    Send(0, (Publish("t/1", b"x", 2, packet_id=1).encode(5),)),
    *[Send(0, (Publish("t/1", b"x", 2, dup=True, packet_id=1).encode(5),))] * 5,
    consumer="holding",
)
REJECTING_CONNACK_TOO_LARGE = _script(
    "default", Open(0, True, Connect("$internal/fuzz", 5, properties=_SMALL_PACKETS).encode())
)
DENIED_PUBACK_TOO_LARGE = _script(
    "default",
    Open(0, True, Connect("dev-1", 5, username="device", properties=_SMALL_PACKETS).encode()),
    Send(0, (Publish("a/b", b"x", 1, packet_id=1).encode(5),)),
    access=True,
)
SYS_PUBLISHES_OVER_RECEIVE_MAXIMUM = _script(
    "tight",
    Open(0, True, Connect("dev-1", 4).encode()),
    Send(0, tuple(Publish("$SYS/fuzz", b"x", 2, packet_id=n).encode(4) for n in (1, 2, 3))),
)

REGRESSION_SCRIPTS = (
    SECOND_CONNECT_UNKNOWN_LEVEL,
    RETRANSMISSIONS_WHILE_HELD,
    REJECTING_CONNACK_TOO_LARGE,
    DENIED_PUBACK_TOO_LARGE,
    SYS_PUBLISHES_OVER_RECEIVE_MAXIMUM,
)


@CONNECTION_FUZZ_SETTINGS
@given(script=scripts())
@example(script=SECOND_CONNECT_UNKNOWN_LEVEL)
@example(script=RETRANSMISSIONS_WHILE_HELD)
@example(script=REJECTING_CONNACK_TOO_LARGE)
@example(script=DENIED_PUBACK_TOO_LARGE)
@example(script=SYS_PUBLISHES_OVER_RECEIVE_MAXIMUM)
def test_connection_fuzz(script):
    with checked_broker_logs():
        run_script(script)
