"""Show that routing cost does not grow with the number of subscriptions on other topics.

Builds the broker's subscription index with two subscriptions per simulated device (one
exact filter, ``$aws/things/{device}/shadow/update/delta``, and one wildcard filter,
``$aws/things/{device}/shadow/name/+/update/delta``) for growing fleets, then times the
lookup of one device's topic and reports the memory the index takes per subscription.

Usage::

    python benchmarks/subscription_index.py [--devices 1000,100000,1000000] [--lookups 200000]
"""

from __future__ import annotations

import argparse
import gc
import resource
import time

from ironshadow.broker.session import Session
from ironshadow.broker.subscriptions import SubscriptionIndex, SubscriptionRecord

DEFAULT_FLEETS = "1000,100000,1000000"
DEFAULT_LOOKUPS = 200_000


def peak_rss_bytes() -> int:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        resident_pages = int(statm.read().split()[1])
    return resident_pages * resource.getpagesize()


def build(devices: int) -> tuple[SubscriptionIndex, list[Session]]:
    index = SubscriptionIndex()
    sessions = []
    for number in range(devices):
        name = f"device-{number:07d}"
        session = Session(name)
        sessions.append(session)
        for topic_filter in (
            f"$aws/things/{name}/shadow/update/delta",
            f"$aws/things/{name}/shadow/name/+/update/delta",
        ):
            record = SubscriptionRecord(session, topic_filter, 1)
            session.subscriptions[topic_filter] = record
            index.add(topic_filter, record)
    return index, sessions


def time_lookups(index: SubscriptionIndex, topics: list[str], lookups: int) -> float:
    """Return the mean time of match() plus walking its records, in microseconds."""
    count = len(topics)
    started = time.perf_counter()
    for step in range(lookups):
        for _record in index.iter_records(index.match(topics[step % count])):
            pass
    return (time.perf_counter() - started) / lookups * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default=DEFAULT_FLEETS,
                        help="comma-separated fleet sizes (default: %(default)s)")
    parser.add_argument("--lookups", type=int, default=DEFAULT_LOOKUPS,
                        help="lookups timed per fleet size (default: %(default)s)")
    args = parser.parse_args()

    print(f"{'devices':>10} {'subscriptions':>14} {'exact µs':>9} {'wildcard µs':>12} "
          f"{'bytes/subscription':>19}")
    for devices in (int(value) for value in args.devices.split(",")):
        gc.collect()
        before = current_rss_bytes()
        index, sessions = build(devices)
        gc.collect()
        grown = current_rss_bytes() - before
        # A spread of devices, so the lookups do not all hit one cached path.
        picks = [f"device-{(n * 7919) % devices:07d}" for n in range(1000)]
        exact = [f"$aws/things/{name}/shadow/update/delta" for name in picks]
        named = [f"$aws/things/{name}/shadow/name/cfg/update/delta" for name in picks]
        exact_us = time_lookups(index, exact, args.lookups)
        wildcard_us = time_lookups(index, named, args.lookups)
        per_subscription = grown / index.count
        print(f"{devices:>10,} {index.count:>14,} {exact_us:>9.2f} {wildcard_us:>12.2f} "
              f"{per_subscription:>19,.0f}")
        del index, sessions
    print(f"peak RSS {peak_rss_bytes() / 2**20:.0f} MiB; bytes/subscription includes the "
          "Session objects of the simulated devices")


if __name__ == "__main__":
    main()
