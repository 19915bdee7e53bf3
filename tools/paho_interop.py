"""Run the Eclipse Paho MQTT interoperability client tests against a broker.

The Paho suites are not part of this repository. Point --suite at the
``interoperability`` folder of a checkout of
https://github.com/eclipse/paho.mqtt.testing, which contains
``client_test.py`` (MQTT 3.1.1) and ``client_test5.py`` (MQTT 5.0).

The suites' own command lines cannot be used as they are. client_test.py
passes its options on to ``unittest.main()``, which rejects ``-p``, and
client_test5.py takes ``-h HOST`` for ``--help`` and exits without running.
So this runner imports the suite modules instead and sets the module globals
that their ``__main__`` blocks would set: host, port, topics, wildtopics,
nosubscribe_topics and, for MQTT 5.0, topic_prefix.

Every test method runs in its own Python subprocess. A test that runs longer
than --timeout seconds is killed and reported as ``timeout``, so one hung test
does not stop the run. Each subprocess runs the suite's ``setUpClass``, which
ends the sessions of the client ids "myclientid" and "myclientid2" and deletes
every retained message on the broker, not only the suite's own, before the
test starts.

Usage::

    python tools/paho_interop.py --suite /tmp/paho/interoperability \\
        --host 127.0.0.1 --port 1883 --version both
    python tools/paho_interop.py --suite /tmp/paho/interoperability \\
        --version 5 -k flow_control --show-output

The runner prints one line per test (test id, result, seconds), where the
result is passed, failed, error or timeout. The last line is ``N passed,
M failed``, in which M counts every test that did not pass. The exit status
is 0 only when every selected test passed.

The suites' clients open IPv4 sockets, so --host must be an IPv4 address or a
name that resolves to one.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import subprocess
import sys
import time
import unittest
from pathlib import Path
from types import ModuleType

SUITE_MODULES = {"3": "client_test", "5": "client_test5"}

# Topic names and filters that both suites use by default. The tests rely on
# how these match each other, for example that wildtopics[5] ("+/+") matches
# topics[1], topics[2] and topics[3] but not topics[0].
DEFAULT_TOPICS = ("TopicA", "TopicA/B", "Topic/C", "TopicA/C", "/TopicA")
DEFAULT_WILDTOPICS = ("TopicA/+", "+/C", "#", "/#", "/+", "+/+", "TopicA/#")
DEFAULT_NOSUBSCRIBE_TOPIC = "test/nosubscribe"

# Value that client_test5.py's __main__ block sets. test_shared_subscriptions
# subscribes to "$share/sharename/" + topic_prefix + "x".
DEFAULT_V5_TOPIC_PREFIX = "client_test5/"

# Exit codes of a child process that runs one test.
EXIT_PASSED = 0
EXIT_FAILED = 1
EXIT_ERROR = 2
STATUS_BY_EXIT_CODE = {EXIT_PASSED: "passed", EXIT_FAILED: "failed", EXIT_ERROR: "error"}


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse the command line and check that the suite folder contains the test modules."""
    parser = argparse.ArgumentParser(
        description="Run the Eclipse Paho MQTT interoperability client tests "
        "against a broker, one subprocess per test.",
    )
    parser.add_argument(
        "--suite",
        type=Path,
        required=True,
        help="path to the 'interoperability' folder of a paho.mqtt.testing checkout",
    )
    parser.add_argument("--host", default="127.0.0.1", help="broker address (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=1883, help="broker TCP port (default: 1883)")
    parser.add_argument(
        "--version",
        choices=["3", "5", "both"],
        default="both",
        help="3 runs client_test.py (MQTT 3.1.1), 5 runs client_test5.py (MQTT 5.0), "
        "both runs 3 and then 5 (default: both)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds one test may run, including its setUpClass cleanup, "
        "before it is killed (default: 60)",
    )
    parser.add_argument(
        "-k",
        dest="keyword",
        default="",
        help="run only tests whose id (for example client_test5.Test.test_basic) "
        "contains this substring",
    )
    parser.add_argument(
        "--nosubscribe-topic",
        default=DEFAULT_NOSUBSCRIBE_TOPIC,
        help="topic filter that the broker rejects in SUBSCRIBE, used by "
        f"test_subscribe_failure (default: {DEFAULT_NOSUBSCRIBE_TOPIC})",
    )
    parser.add_argument(
        "--topic-prefix",
        default="",
        help="string put in front of every topic and wildcard filter, for example "
        "'interop/'; it should end with '/' so that '#' stays a valid filter. "
        "With a prefix, test_dollar_topics no longer checks that '+' skips topics "
        "starting with '$' (default: none, as in the suites)",
    )
    parser.add_argument(
        "--show-output",
        action="store_true",
        help="print the captured output of every test that did not pass",
    )
    # Set only when the runner starts itself to run a single test.
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.timeout <= 0:
        parser.error(f"--timeout must be positive, got {args.timeout}")
    args.suite = args.suite.expanduser().resolve()
    for version in selected_versions(args.version):
        module_file = args.suite / f"{SUITE_MODULES[version]}.py"
        if not module_file.is_file():
            parser.error(f"{module_file} not found; --suite must be the 'interoperability' folder")
    return args


def selected_versions(version: str) -> list[str]:
    """Return the protocol versions to run, in run order."""
    return ["3", "5"] if version == "both" else [version]


def import_suite(suite_dir: Path, version: str) -> ModuleType:
    """Import client_test or client_test5 from the suite folder."""
    if str(suite_dir) not in sys.path:
        # The suite imports its own 'mqtt' package, which must win over any other.
        sys.path.insert(0, str(suite_dir))
    return importlib.import_module(SUITE_MODULES[version])


def configure_suite(module: ModuleType, args: argparse.Namespace) -> None:
    """Set the module globals that the suite's __main__ block would set."""

    def apply_settings() -> None:
        module.host = args.host
        module.port = args.port
        module.topics = tuple(args.topic_prefix + topic for topic in DEFAULT_TOPICS)
        module.wildtopics = tuple(args.topic_prefix + topic for topic in DEFAULT_WILDTOPICS)
        module.nosubscribe_topics = (args.nosubscribe_topic,)
        module.topic_prefix = args.topic_prefix or DEFAULT_V5_TOPIC_PREFIX

    apply_settings()

    # client_test5's setUpClass calls setData(), which resets topics,
    # wildtopics and nosubscribe_topics to fixed values. Apply the settings
    # again after it so that the command line options take effect.
    original_set_data = getattr(module, "setData", None)
    if original_set_data is not None:

        def set_data() -> None:
            original_set_data()
            apply_settings()

        module.setData = set_data


def run_child(args: argparse.Namespace) -> int:
    """Run the single test named by --child in this process and return its exit code."""
    module = import_suite(args.suite, args.version)
    configure_suite(module, args)
    # The suites' __main__ blocks set the root logger to ERROR as well.
    logging.getLogger().setLevel(logging.ERROR)

    test = unittest.TestLoader().loadTestsFromName(f"Test.{args.child}", module)
    result = unittest.TextTestRunner(stream=sys.stdout, verbosity=2).run(test)
    if result.errors or result.testsRun == 0:
        return EXIT_ERROR
    if result.failures:
        return EXIT_FAILED
    return EXIT_PASSED


def child_command(args: argparse.Namespace, version: str, test_name: str) -> list[str]:
    """Build the command line that runs one test in a new Python process."""
    return [
        sys.executable,
        "-u",  # unbuffered, so the output of a killed test is not lost
        str(Path(__file__).resolve()),
        "--suite", str(args.suite),
        "--host", args.host,
        "--port", str(args.port),
        "--version", version,
        "--nosubscribe-topic", args.nosubscribe_topic,
        "--topic-prefix", args.topic_prefix,
        "--child", test_name,
    ]  # fmt: skip


def run_test(args: argparse.Namespace, version: str, test_name: str) -> tuple[str, float, str]:
    """Run one test in a subprocess and return its status, duration in seconds and output."""
    start = time.monotonic()
    try:
        completed = subprocess.run(
            child_command(args, version, test_name),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=args.timeout,
            check=False,
        )
        status = STATUS_BY_EXIT_CODE.get(completed.returncode, "error")
        output = completed.stdout or b""
    except subprocess.TimeoutExpired as timeout:
        # subprocess.run has already killed the child.
        status = "timeout"
        output = timeout.output or b""
    seconds = time.monotonic() - start
    return status, seconds, output.decode("utf-8", errors="replace")


def run_all(args: argparse.Namespace) -> int:
    """Run every selected test, print one line per test and the summary, return the exit status."""
    selected: list[tuple[str, str, str]] = []
    for version in selected_versions(args.version):
        module = import_suite(args.suite, version)
        for test_name in unittest.TestLoader().getTestCaseNames(module.Test):
            test_id = f"{module.__name__}.Test.{test_name}"
            if args.keyword in test_id:
                selected.append((version, test_name, test_id))

    if not selected:
        print(f"error: no test id contains {args.keyword!r}. Check the -k value.", file=sys.stderr)
        return EXIT_ERROR

    width = max(len(test_id) for _, _, test_id in selected)
    passed = 0
    for version, test_name, test_id in selected:
        status, seconds, output = run_test(args, version, test_name)
        print(f"{test_id:<{width}}  {status:<7}  {seconds:6.1f}s", flush=True)
        if status == "passed":
            passed += 1
        elif args.show_output:
            print("    " + output.rstrip().replace("\n", "\n    "), flush=True)

    not_passed = len(selected) - passed
    print(f"{passed} passed, {not_passed} failed")
    return EXIT_PASSED if not_passed == 0 else EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.child is None:
        return run_all(args)

    exit_code = run_child(args)
    sys.stdout.flush()
    sys.stderr.flush()
    # The suites' clients leave receiver threads blocked on sockets, so skip
    # the interpreter shutdown and exit at once.
    os._exit(exit_code)


if __name__ == "__main__":
    sys.exit(main())
