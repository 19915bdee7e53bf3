"""Per-worker folders of the embedded stores, and the worker count recorded beside them.

With the embedded stores, worker ``i`` of N keeps its shadows, history and MQTT state in
``{data_dir}/worker-{i}/``, and ``{data_dir}/workers.json`` records N. A single-process engine
keeps them in ``{data_dir}`` itself and records nothing. Each worker holds only the shadows it
owns, so a start with another N first moves them to their new owners (see reshard.py).
"""

from __future__ import annotations

import json
from pathlib import Path

RECORD_NAME = "workers.json"
# Entries that a single-process engine with embedded stores leaves in the data folder.
SINGLE_PROCESS_ENTRIES = ("shadows", "history.sqlite3", "mqtt-state.sqlite3")


class WorkerCountError(Exception):
    """The data folder belongs to an engine that ran with another number of workers."""


def worker_data_dir(data_dir: Path, index: int) -> Path:
    return data_dir / f"worker-{index}"


def recorded_workers(data_dir: Path) -> int | None:
    """Return the worker count recorded in ``data_dir``, or None when there is no record."""
    path = data_dir / RECORD_NAME
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise WorkerCountError(f"cannot read {path}: {exc}") from None
    workers = document.get("workers") if isinstance(document, dict) else None
    if not isinstance(workers, int) or workers < 1:
        raise WorkerCountError(f"{path} does not contain a worker count: {document!r}")
    return workers


def record_worker_count(data_dir: Path, workers: int) -> None:
    """Write ``workers`` to the data folder's record, unless it is there already."""
    if recorded_workers(data_dir) == workers:
        return
    path = data_dir / RECORD_NAME
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps({"workers": workers}) + "\n")
    temporary.replace(path)
