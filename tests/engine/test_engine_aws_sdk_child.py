"""Run test_engine_aws_sdk.py in a child pytest process.

The AWS IoT Device SDK's native library has crashed its process with a segmentation fault now
and then, inside its own threads and during connects that otherwise succeed. In the main test
process such a crash would end the whole run, so the module runs here, in a child process.
A child that a signal killed is run again, up to ATTEMPTS runs, and any other failure fails
this test. Run alone in a loop, the module crashed in 2 of 60 runs, each time while a test
connected just after the previous test had stopped an MQTT 5 client. Since the fixture waits
for the client's stopped event, no crash was seen in 100 runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import scaled

MODULE = Path(__file__).with_name("test_engine_aws_sdk.py")
ROOT = Path(__file__).resolve().parents[2]
# Runs of the module allowed when a signal ends the child; any other failure ends the test.
ATTEMPTS = 3


def run_module() -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(MODULE)],
        cwd=ROOT,
        env={**os.environ, "IRONSHADOW_AWS_SDK_CHILD": "1"},
        capture_output=True,
        text=True,
        timeout=scaled(600),
    )


def test_aws_sdk_module_in_child_process():
    completed = run_module()
    for _ in range(ATTEMPTS - 1):
        if completed.returncode >= 0:
            break
        # Killed by a signal, such as SIGSEGV in the SDK's native threads.
        print(f"the child pytest died of signal {-completed.returncode}; running it again")
        completed = run_module()
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    assert " passed" in completed.stdout
    assert " skipped" not in completed.stdout
