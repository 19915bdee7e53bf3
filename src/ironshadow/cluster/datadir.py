"""Per-worker folders of the embedded stores, and the worker count recorded beside them.

With the embedded stores, worker ``i`` of N keeps its shadows, history and MQTT state in
``{data_dir}/worker-{i}/``, and ``{data_dir}/workers.json`` records N. A single-process engine
keeps them in ``{data_dir}`` itself and records nothing. Each worker holds only the shadows it
owns, so starting with another N would hide shadows in the wrong folders: the engine stops
instead, with an error that names both counts.
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


def check_worker_count(data_dir: Path, workers: int) -> None:
    """Raise WorkerCountError when ``data_dir`` contains data of another worker count."""
    recorded = recorded_workers(data_dir)
    if recorded is None:
        if workers == 1:
            return
        found = [name for name in SINGLE_PROCESS_ENTRIES if (data_dir / name).exists()]
        if found:
            raise WorkerCountError(
                f"data folder {data_dir} contains the shadows of a single-process engine "
                f"({', '.join(found)}), but --workers is {workers}. Moving shadows between "
                "worker folders is not supported yet: start with --workers 1, or give an "
                "empty folder with --data-dir"
            )
        return
    if recorded != workers:
        raise WorkerCountError(
            f"data folder {data_dir} was used with --workers {recorded} (see "
            f"{data_dir / RECORD_NAME}), but --workers is {workers}. Each worker keeps the "
            "shadows it owns in its own folder, and moving them to another worker count is "
            f"not supported yet: start with --workers {recorded}, or give an empty folder "
            "with --data-dir"
        )


def record_worker_count(data_dir: Path, workers: int) -> None:
    """Write ``workers`` to the data folder's record, unless it is there already."""
    if recorded_workers(data_dir) == workers:
        return
    path = data_dir / RECORD_NAME
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps({"workers": workers}) + "\n")
    temporary.replace(path)
