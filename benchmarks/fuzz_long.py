"""Run the codec and connection fuzz tests for a million inputs and check that memory stays flat.

The CI suite runs each fuzz test once with a fixed example count. This script runs the same
tests, with the same strategies and checks, in rounds: a round calls every test of
tests/mqtt/test_codec_fuzz.py (each parametrization) and tests/fuzz/test_fuzz_connection.py
``--connection-calls`` times, each with a new seed, until ``--inputs`` inputs have run. An
input is one generated example, a byte stream for a codec test or a script of connections
and steps for the connection test. Each call runs the example count that the test's own
settings give (300 per codec test, 200 for the connection test).

After every round the script collects garbage and reads the resident set size from
/proc/self/statm. Memory criterion: the rounds after ``--warmup-rounds`` are split into a
first and a second half, and the largest RSS of the second half may exceed the largest RSS of
the first half by at most ``--max-growth-mib``. Over a million inputs, the default of 8 MiB
catches a leak of about 17 bytes per input (8 MiB over the half million inputs of the second
half), or of about 350 bytes per connection input, since those are about one in twenty.

Usage (from the repository root)::

    nice -n 10 .venv/bin/python benchmarks/fuzz_long.py
    .venv/bin/python benchmarks/fuzz_long.py --inputs 50000 --max-minutes 5

The exit status is 1 when a test fails (its falsifying example is printed) or when memory
grows past the limit, and 0 otherwise. With ``--max-minutes`` the run stops after the first
round that ends past the limit and reports how many inputs it ran.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import seed
from hypothesis.errors import FailedHealthCheck

ROOT = Path(__file__).resolve().parents[1]
# The tests import their helpers as top-level modules, as pytest does for them.
for folder in ("tests/mqtt", "tests/fuzz"):
    sys.path.insert(0, str(ROOT / folder))

import test_codec_fuzz  # noqa: E402
import test_fuzz_connection  # noqa: E402

REGRESSION_SCRIPTS = test_fuzz_connection.REGRESSION_SCRIPTS
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
MIB = 1024 * 1024


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE_SIZE


@dataclass
class FuzzCall:
    """One fuzz test with one set of parameters, and the inputs it has run."""

    name: str
    test: Any
    parameters: dict[str, Any]
    inputs: int = 0
    seconds: float = 0.0


class InputCounter:
    """Counts the examples that each :class:`FuzzCall` runs.

    It wraps the inner function of each test, which Hypothesis documents as reassignable
    (``test.hypothesis.inner_test``) for wrappers like this one.
    """

    def __init__(self) -> None:
        self.current: FuzzCall | None = None
        self.wrapped: set[int] = set()

    def wrap(self, test: Any) -> None:
        if id(test) in self.wrapped:
            return
        self.wrapped.add(id(test))
        inner = test.hypothesis.inner_test

        def counted(*args: Any, **kwargs: Any) -> Any:
            # Counted once it completes: Hypothesis aborts an example that draws past its
            # size limit, and such an example was never a whole input. The fixed regression
            # inputs that every call runs first are not generated ones.
            result = inner(*args, **kwargs)
            assert self.current is not None
            if not any(kwargs.get("script") is script for script in REGRESSION_SCRIPTS):
                self.current.inputs += 1
            return result

        test.hypothesis.inner_test = counted

    def run(self, call: FuzzCall, seed_value: int) -> None:
        """Run ``call`` once with ``seed_value``: as many inputs as its settings give."""
        self.current = call
        seed(seed_value)(call.test)
        started = time.monotonic()
        try:
            call.test(**call.parameters)
        finally:
            call.seconds += time.monotonic() - started


def _parametrizations(test: Any) -> Iterator[dict[str, Any]]:
    """Yield the keyword arguments of each case of the test's ``pytest.mark.parametrize``."""
    marks = [mark for mark in getattr(test, "pytestmark", []) if mark.name == "parametrize"]
    if not marks:
        yield {}
        return
    (mark,) = marks
    names, values = mark.args[0], mark.args[1]
    if isinstance(names, str):
        names = [name.strip() for name in names.split(",")]
    for value in values:
        yield dict(zip(names, value if len(names) > 1 else [value], strict=True))


def collect_calls(counter: InputCounter) -> tuple[list[FuzzCall], FuzzCall]:
    """Return a call for each parametrization of each codec fuzz test, and the connection one."""
    codec_calls = []
    for name in sorted(vars(test_codec_fuzz)):
        test = getattr(test_codec_fuzz, name)
        if not name.startswith("test_") or not hasattr(test, "hypothesis"):
            continue
        counter.wrap(test)
        for parameters in _parametrizations(test):
            label = ",".join(str(value) for value in parameters.values())
            codec_calls.append(FuzzCall(f"{name}[{label}]", test, parameters))
    connection_test = test_fuzz_connection.test_connection_fuzz
    counter.wrap(connection_test)
    return codec_calls, FuzzCall("test_connection_fuzz", connection_test, {})


def growth_check(samples: list[int], warmup: int, limit_mib: float) -> tuple[bool, str]:
    """Apply the memory criterion of the module docstring to RSS ``samples`` (bytes)."""
    steady = samples[warmup:]
    if len(steady) < 4:
        return True, f"only {len(steady)} samples after the warm-up; memory not judged"
    half = len(steady) // 2
    first, second = max(steady[:half]), max(steady[half:])
    growth = (second - first) / MIB
    verdict = "within" if growth <= limit_mib else "over"
    text = (
        f"largest RSS {first / MIB:.1f} MiB in the first half after the warm-up, "
        f"{second / MIB:.1f} MiB in the second: growth {growth:+.1f} MiB, {verdict} the "
        f"limit of {limit_mib} MiB"
    )
    return growth <= limit_mib, text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=1_000_000,
                        help="generated inputs to run, codec and connection together "
                        "(default: %(default)s)")
    parser.add_argument("--connection-calls", type=int, default=1,
                        help="calls of the connection fuzz test per round, 200 inputs each "
                        "(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=1,
                        help="seed of the first round; round r uses seed + r "
                        "(default: %(default)s)")
    parser.add_argument("--warmup-rounds", type=int, default=5,
                        help="rounds left out of the memory check (default: %(default)s)")
    parser.add_argument("--max-growth-mib", type=float, default=8.0,
                        help="allowed RSS growth after the warm-up, in MiB (default: %(default)s)")
    parser.add_argument("--max-minutes", type=float, default=0.0,
                        help="stop after the round that ends past this many minutes; 0 means "
                        "no limit (default: %(default)s)")
    parser.add_argument("--report-every", type=int, default=10,
                        help="print a progress line every this many rounds (default: %(default)s)")
    args = parser.parse_args()

    counter = InputCounter()
    codec_calls, connection = collect_calls(counter)
    calls: list[FuzzCall] = [*codec_calls] + [connection] * args.connection_calls
    print(f"{len(codec_calls)} codec fuzz cases and the connection fuzz test "
          f"({args.connection_calls} call(s) per round); target {args.inputs} inputs")

    samples: list[int] = []
    started = time.monotonic()
    round_number = 0
    stopped_early = False

    def total() -> int:
        return sum(call.inputs for call in codec_calls) + connection.inputs

    while total() < args.inputs:
        seed_value = args.seed + round_number
        for call in calls:
            try:
                counter.run(call, seed_value)
            except FailedHealthCheck as exc:
                # A slow machine can fail Hypothesis's health checks, which is no codec bug.
                print(f"round {round_number}: {call.name} skipped by a health check: {exc}")
            except Exception:
                print(f"FAILED: {call.name} in round {round_number} (seed {seed_value})")
                traceback.print_exc()
                return 1
        round_number += 1
        gc.collect()
        samples.append(rss_bytes())
        elapsed = time.monotonic() - started
        if round_number % args.report_every == 0:
            print(f"round {round_number}: {total()} inputs "
                  f"({connection.inputs} connection), {total() / elapsed:.0f} inputs/s, "
                  f"RSS {samples[-1] / MIB:.1f} MiB", flush=True)
        if args.max_minutes and elapsed > args.max_minutes * 60:
            stopped_early = True
            break

    elapsed = time.monotonic() - started
    codec_inputs = sum(call.inputs for call in codec_calls)
    codec_seconds = sum(call.seconds for call in codec_calls)
    print()
    if stopped_early:
        print(f"stopped after {args.max_minutes} minutes, before the target of {args.inputs}")
    print(f"inputs: {total()} in {round_number} rounds, {elapsed:.0f} s, "
          f"{total() / elapsed:.0f} inputs/s")
    print(f"  codec: {codec_inputs} inputs in {codec_seconds:.0f} s, "
          f"{codec_inputs / max(codec_seconds, 1e-9):.0f} inputs/s")
    for call in codec_calls:
        print(f"    {call.name}: {call.inputs}")
    print(f"  connection: {connection.inputs} inputs in {connection.seconds:.0f} s, "
          f"{connection.inputs / max(connection.seconds, 1e-9):.0f} inputs/s")
    step = max(1, len(samples) // 20)
    sample_indexes = sorted({*range(0, len(samples), step), len(samples) - 1})
    print("RSS after rounds (MiB): " + ", ".join(
        f"{index + 1}: {samples[index] / MIB:.1f}" for index in sample_indexes
    ))
    ok, text = growth_check(samples, args.warmup_rounds, args.max_growth_mib)
    print("memory: " + text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
