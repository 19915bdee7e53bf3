"""``ironshadow serve --workers N``: N engine processes that behave as one engine.

Layers: this package sits above the broker, the engine and the storage, and below the API
and the command line. ``ownership`` decides which worker owns a name, ``supervisor`` starts
and restarts the workers, ``worker`` joins one engine to its peers through ``bus`` (topic
filters and messages) and ``handoff`` (TCP connections), ``datadir`` keeps each worker's
embedded stores apart, and ``reshard`` moves them when the worker count changes.
docs/workers.md describes the whole.
"""

from .datadir import WorkerCountError, record_worker_count, worker_data_dir
from .ownership import owner_of
from .worker import ClusterWorker, PeerCallError, WorkerSpec, owner_not_responding

__all__ = [
    "ClusterWorker",
    "PeerCallError",
    "WorkerCountError",
    "WorkerSpec",
    "owner_not_responding",
    "owner_of",
    "record_worker_count",
    "worker_data_dir",
]
