"""``ironshadow swarm``: a load generator of simulated devices, for any MQTT broker.

Each simulated device is its own MQTT connection and client id and publishes reported state
to its AWS shadow topic. Generator processes share the devices; the coordinator runs a
scenario (steady load, a reconnect storm, a connection ramp, or desired-state convergence)
and reports the rate the broker achieved, acknowledgement latencies, and the CPU and memory
of the engine and of the generator. It speaks plain MQTT and knows nothing of the engine's
internals, so the same run measures Mosquitto too.
"""

from __future__ import annotations

import argparse

from .options import SwarmOptions, add_arguments, from_arguments
from .runner import SwarmResult, main, run_swarm

__all__ = ["SwarmOptions", "SwarmResult", "add_command", "run_swarm"]


def add_command(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``swarm`` with the ``ironshadow`` command line."""
    parser = commands.add_parser(
        "swarm",
        help="simulate devices and measure an engine or broker under their load",
        description="Simulate devices, each its own MQTT connection, publishing reported "
        "state to their shadow topics, and report the rate the broker achieved, latencies, "
        "and engine and generator CPU and memory.",
        epilog="Example: ironshadow swarm --devices 5000 --frequency 100ms --duration 30s "
        "--engine-pid $(pgrep -o -f 'ironshadow serve'), where -o picks the oldest "
        "process, the one that started the workers, which are counted with it. The achieved "
        "rate is read from the "
        "broker's $SYS/broker/publish/messages/received, so run the broker with a $SYS "
        "interval of 1 s (ironshadow serve --sys-interval 1).",
    )
    add_arguments(parser)
    parser.set_defaults(handler=lambda arguments: main(from_arguments(arguments)))
