"""The worker count recorded in the data folder, and the checks against it."""

from __future__ import annotations

from pathlib import Path

import pytest

from ironshadow.cluster import (
    WorkerCountError,
    check_worker_count,
    record_worker_count,
    worker_data_dir,
)
from ironshadow.cluster.datadir import recorded_workers


def test_empty_folder_accepts_any_count(tmp_path: Path) -> None:
    for workers in (1, 2, 8):
        check_worker_count(tmp_path, workers)
    assert recorded_workers(tmp_path) is None


def test_record_then_same_count_passes(tmp_path: Path) -> None:
    record_worker_count(tmp_path, 3)
    assert recorded_workers(tmp_path) == 3
    check_worker_count(tmp_path, 3)


def test_other_count_is_rejected(tmp_path: Path) -> None:
    record_worker_count(tmp_path, 3)
    for workers in (1, 2, 4):
        with pytest.raises(WorkerCountError) as error:
            check_worker_count(tmp_path, workers)
        assert "--workers 3" in str(error.value)
        assert f"--workers is {workers}" in str(error.value)


def test_single_process_data_blocks_workers(tmp_path: Path) -> None:
    (tmp_path / "history.sqlite3").write_bytes(b"")
    check_worker_count(tmp_path, 1)
    with pytest.raises(WorkerCountError, match="single-process engine"):
        check_worker_count(tmp_path, 2)


def test_invalid_record_is_reported(tmp_path: Path) -> None:
    (tmp_path / "workers.json").write_text('{"workers": "three"}')
    with pytest.raises(WorkerCountError, match="does not contain a worker count"):
        check_worker_count(tmp_path, 3)
    (tmp_path / "workers.json").write_text("not json")
    with pytest.raises(WorkerCountError, match="cannot read"):
        check_worker_count(tmp_path, 3)


def test_worker_folders_are_apart(tmp_path: Path) -> None:
    folders = {worker_data_dir(tmp_path, index) for index in range(4)}
    assert len(folders) == 4
    assert all(folder.parent == tmp_path for folder in folders)
