"""Surviving worker loss: a worker process killed for real mid-job still gives the same dataset."""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from distributed import Client, LocalCluster
from helpers import file_bytes, read_dataset

import dask_imgsink  # noqa: F401

PARTS, ROWS = 16, 40


def _noisy_partition(seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (112, 112, 3), dtype=np.uint8) for _ in range(ROWS)]
    return pd.DataFrame({
        "key": [f"p{seed:03d}_{i:03d}" for i in range(ROWS)],
        "image": pd.Series(images, dtype=object),
        "caption": [f"noise {seed} {i}" for i in range(ROWS)],
    })


def _ddf():
    meta = _noisy_partition(0).iloc[:0]
    with dask.config.set({"dataframe.convert-string": False}):
        return dd.from_map(_noisy_partition, range(PARTS), meta=meta, enforce_metadata=False)


def _write(out: Path, packing: str):
    # PNG of noise is slow enough that the job is still running when the kill lands
    return _ddf().imgsink.to_webdataset(str(out), key_column="key", text_column="caption",
                                        image_format="png", images_per_tar=50, packing=packing)


def _staged_tars(out: Path) -> list[Path]:
    staging = out / ".imgsink"
    try:
        return list(staging.rglob("*.tar.part"))
    except FileNotFoundError:  # the job removed a folder while we looked
        return []


@pytest.mark.parametrize("packing", ["exact", "per_partition"])
def test_worker_death_gives_identical_shards(tmp_path, packing):
    reference = tmp_path / "undisturbed"
    _write(reference, packing).compute()  # threads, no cluster

    out = tmp_path / "disturbed"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=logging.CRITICAL) as cluster, Client(cluster) as client:
        pids_before = client.run(os.getpid)
        future = client.compute(_write(out, packing))
        deadline = time.monotonic() + 60
        while not _staged_tars(out):
            assert time.monotonic() < deadline, "no staged file appeared"
            time.sleep(0.01)
        # kill the process that is writing, for real, while the job runs
        busy = [addr for addr, keys in client.processing().items() if keys] or list(pids_before)
        os.kill(pids_before[busy[0]], signal.SIGKILL)
        assert not future.done(), "the job ended before the kill; make it longer"
        future.result(timeout=180)
        pids_after = client.run(os.getpid)
    assert pids_before[busy[0]] not in pids_after.values()  # the worker really died

    assert (out / "_SUCCESS").exists() and not (out / ".imgsink").exists()
    assert file_bytes(out) == file_bytes(reference)  # same names, same bytes: no duplicates, no gaps
    data = read_dataset(out)
    keys = [k for k, _ in data["samples"]]
    assert keys == [f"p{p:03d}_{i:03d}" for p in range(PARTS) for i in range(ROWS)]
    assert data["index"]["totals"]["images"] == PARTS * ROWS
