"""Optional mypyc build of the modules on the path of every MQTT message.

The package is plain Python and installs as such. With ``IRONSHADOW_MYPYC=1`` the modules
below are compiled to C extensions with mypyc, next to their sources, which lowers the
engine's CPU per message (docs/benchmarks.md, "A compiled build"). Build it with mypy and
a recent setuptools installed in the same environment:

    .venv/bin/python -m pip install mypy 'setuptools>=77'
    IRONSHADOW_MYPYC=1 .venv/bin/python -m pip install --no-build-isolation -e '.[test]'

mypy reads its options from ``[tool.mypy]`` in pyproject.toml.
"""

import os

from setuptools import setup

# The modules that one shadow update passes through: the packet stream reader, routing,
# sessions, the shadow service and the shadow documents. Storage, the HTTP API and the
# cluster stay interpreted. The cluster's classes may extend SubscriptionIndex and
# MQTTConnection because those two allow interpreted subclasses. The packet classes stay
# interpreted too, because PUBACK, PUBREC, PUBREL and PUBCOMP set their own class attributes
# on a shared base, which mypyc's native classes do not support.
COMPILED_MODULES = [
    "src/ironshadow/mqtt/decoder.py",
    "src/ironshadow/mqtt/encoding.py",
    "src/ironshadow/mqtt/properties.py",
    "src/ironshadow/broker/connection.py",
    "src/ironshadow/broker/core.py",
    "src/ironshadow/broker/message.py",
    "src/ironshadow/broker/session.py",
    "src/ironshadow/broker/subscriptions.py",
    "src/ironshadow/engine/service.py",
    "src/ironshadow/engine/topics.py",
    "src/ironshadow/shadow/delta.py",
    "src/ironshadow/shadow/document.py",
    "src/ironshadow/shadow/jsonbytes.py",
    "src/ironshadow/shadow/merge.py",
    "src/ironshadow/shadow/metadata.py",
    "src/ironshadow/shadow/names.py",
    "src/ironshadow/shadow/operations.py",
]

ext_modules = []
if os.environ.get("IRONSHADOW_MYPYC") == "1":
    from mypyc.build import mypycify

    ext_modules = mypycify(COMPILED_MODULES, opt_level="3")

setup(ext_modules=ext_modules)
