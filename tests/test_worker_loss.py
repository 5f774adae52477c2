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
from helpers import file_bytes, gated_ddf, read_dataset

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
                      scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
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


def _carried_holder(client: Client, group: int) -> str | None:
    """The worker holding assembly group ``group``'s carried runs, once they are in memory."""
    for key, workers in client.who_has().items():
        if isinstance(key, tuple) and key[0].startswith("imgsink-runs-carried-") and key[1] == group and workers:
            return next(iter(workers))
    return None


@pytest.mark.parametrize("carry_bytes", [None, 0], ids=["runs-carried", "head-written-ahead"])
def test_a_worker_holding_the_runs_of_an_open_shard_dies_and_the_dataset_is_the_same(tmp_path, carry_bytes):
    """The runs of a shard still open live only in memory, carried from one assembly group to the next.
    Kill the worker holding them while the next group waits: Dask recomputes them (re-encoding those
    partitions), and the dataset is byte for byte the one an undisturbed run writes. With a carry
    budget of 0, every group writes the open shard's rows ahead into its tar and carries only where
    they are: the recomputed groups write the same bytes to the same places again."""
    sizes, per_tar = [6] * 8, 10  # shards of 10 span partitions of 6: every group carries an open shard
    reference = tmp_path / "undisturbed"
    gated_ddf(sizes, tmp_path / "open", open_partitions=8).imgsink.to_webdataset(
        str(reference), key_column="key", images_per_tar=per_tar, compute=True)

    gate, out = tmp_path / "gate", tmp_path / "disturbed"
    with LocalCluster(n_workers=2, threads_per_worker=3, processes=True, dashboard_address=None,
                      scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
                      silence_logs=logging.CRITICAL) as cluster, Client(cluster) as client:
        pids = client.run(os.getpid)
        # the last 2 partitions wait for the gate, holding 2 of the 6 threads; groups are one partition each
        with dask.config.set({"imgsink.carry-bytes": carry_bytes}):  # read where the graph is built
            bag = gated_ddf(sizes, gate, open_partitions=6).imgsink.to_webdataset(
                str(out), key_column="key", images_per_tar=per_tar)
        future = client.compute(bag)
        deadline = time.monotonic() + 60
        while (holder := _carried_holder(client, 5)) is None:  # group 6 waits on a gated partition
            assert time.monotonic() < deadline and not future.done(), "the carried runs never appeared"
            time.sleep(0.02)
        os.kill(pids[holder], signal.SIGKILL)
        gate.touch()
        future.result(timeout=180)
        assert pids[holder] not in client.run(os.getpid).values()  # it really died
    assert (out / "_SUCCESS").exists() and not (out / ".imgsink").exists()
    assert file_bytes(out) == file_bytes(reference)
