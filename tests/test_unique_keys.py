"""Duplicate keys: a row error that ``skip`` records, and a documented policy across the dataset."""

from __future__ import annotations

import logging
from pathlib import Path

import dask
import dask.dataframe as dd
import pandas as pd
import pytest
from distributed import Client, LocalCluster
from helpers import make_frame, read_dataset
from hypothesis import given, settings
from hypothesis import strategies as st

import dask_imgsink  # noqa: F401
from dask_imgsink import BadRowError
from dask_imgsink.errors import MissingDependencyError
from dask_imgsink.job.unique import find_duplicates, key_hashes


def _ddf(keys: list[str], npartitions: int) -> dd.DataFrame:
    pdf = make_frame(len(keys))
    pdf["key"] = pd.Series(keys, dtype=object)
    with dask.config.set({"dataframe.convert-string": False}):
        return dd.from_pandas(pdf, npartitions=npartitions, sort=False)


def _errors(out: Path) -> pd.DataFrame:
    return pd.read_json(out / "_errors.jsonl", lines=True)


def test_a_duplicate_in_one_exact_shard_is_skipped_and_recorded_and_shards_stay_exact(tmp_path, client):
    keys = [f"k{i}" for i in range(12)]
    keys[7] = "k2"  # partition 1 repeats a key of partition 0; both would land in shard 0
    out = tmp_path / "out"
    client.compute(_ddf(keys, 3).imgsink.to_webdataset(
        str(out), key_column="key", images_per_tar=5, on_error="skip")).result(timeout=120)
    data = read_dataset(out)
    assert [k for k, _ in data["samples"]] == [k for i, k in enumerate(keys) if i != 7]
    assert [e["nsamples"] for e in data["index"]["shardlist"]] == [5, 5, 1]
    errors = _errors(out)
    assert errors[["partition", "row", "key", "column"]].values.tolist() == [[1, 3, "k2", "key"]]
    assert "first at partition 0, row 2" in errors.reason[0]
    assert data["index"]["totals"] == {"rows": 12, "images": 11, "skipped": 1, "shards": 3}


@pytest.mark.parametrize("npartitions", [1, 2])
@pytest.mark.parametrize("packing", ["exact", "per_partition"])
def test_a_row_left_out_does_not_take_its_key_wherever_the_partitions_split(tmp_path, npartitions, packing):
    """Row 2 has a bad image and rows 3 and 4 repeat its key: row 3 is the key's first written
    row and is kept, row 4 is the repeat. Before, one partition left out rows 2, 3 and 4 (the
    key counted as taken by row 2, which was never written) and two partitions kept row 3."""
    keys = ["k0", "k1", "kx", "kx", "kx", "k5"]
    pdf = make_frame(len(keys))
    pdf["key"] = pd.Series(keys, dtype=object)
    pdf.loc[2, "image"] = "not an image"
    with dask.config.set({"dataframe.convert-string": False}):
        ddf = dd.from_pandas(pdf, npartitions=npartitions, sort=False)  # 2 partitions: rows 0-2 and 3-5
    out = tmp_path / "out"
    ddf.imgsink.to_webdataset(str(out), key_column="key", text_column="caption", packing=packing,
                              on_error="skip", compute=True)
    samples = read_dataset(out)["samples"]
    assert [k for k, _ in samples] == ["k0", "k1", "kx", "k5"]
    assert samples[2][1]["txt"] == b"caption number 3"  # row 3's sample, not row 4's
    assert _errors(out)[["row", "key"]].values.tolist() == (
        [[2, "kx"], [4, "kx"]] if npartitions == 1 else [[2, "kx"], [1, "kx"]])


def test_unique_keys_dataset_leaves_out_copies_in_other_shards_too(tmp_path):
    keys = [f"k{i}" for i in range(10)]
    keys[9] = "k0"  # shard 2 repeats a key of shard 0
    out = tmp_path / "out"
    _ddf(keys, 2).imgsink.to_webdataset(str(out), key_column="key", images_per_tar=4, on_error="skip",
                                        compute=True)
    assert [k for k, _ in read_dataset(out)["samples"]] == keys[:9]
    with pytest.raises(BadRowError, match="used twice"):
        _ddf(keys, 2).imgsink.to_webdataset(str(tmp_path / "raise"), key_column="key", images_per_tar=4,
                                            compute=True)


def test_unique_keys_shard_only_refuses_copies_that_share_a_shard(tmp_path):
    keys = [f"k{i}" for i in range(10)]
    keys[9] = "k0"  # another shard: allowed
    keys[3] = "k1"  # the same shard: left out
    out = tmp_path / "out"
    _ddf(keys, 2).imgsink.to_webdataset(str(out), key_column="key", images_per_tar=4, on_error="skip",
                                        unique_keys="shard", compute=True)
    written = [k for k, _ in read_dataset(out)["samples"]]
    assert written == [k for i, k in enumerate(keys) if i != 3] and written.count("k0") == 2
    assert _errors(out).key.tolist() == ["k1"]


@pytest.mark.parametrize("packing, npartitions", [("exact", 1), ("exact", 2), ("exact", 6), ("per_partition", 1)])
def test_unique_keys_shard_allows_a_key_again_in_a_later_shard_within_a_partition_too(tmp_path, packing,
                                                                                       npartitions):
    """The shard rule is one rule, whatever the partitions: before, a repeat within a partition
    was always left out (one partition wrote [a, b], [c], [d]), across partitions only in the same shard."""
    keys = ["a", "b", "a", "c", "a", "a", "d"]
    out = tmp_path / "out"
    _ddf(keys, npartitions).imgsink.to_webdataset(str(out), key_column="key", images_per_tar=2, packing=packing,
                                                  unique_keys="shard", on_error="skip", compute=True)
    data = read_dataset(out)
    assert [t.column("key").to_pylist() for t in data["tables"]] == [["a", "b"], ["a", "c"], ["a", "d"]]
    errors = _errors(out)
    assert errors.key.tolist() == ["a"] and "used twice" in errors.reason[0]  # row 5, in shard 2 with row 4


def test_per_partition_packing_cannot_leave_out_a_copy_so_it_fails_the_job(tmp_path):
    keys = [f"k{i}" for i in range(6)]
    keys[4] = "k0"
    with pytest.raises(BadRowError, match="per_partition.*cannot be left out") as caught:
        _ddf(keys, 2).imgsink.to_webdataset(str(tmp_path / "out"), key_column="key", packing="per_partition",
                                            on_error="skip", compute=True)
    assert (caught.value.partition, caught.value.row) == (1, 1)
    assert "packing='exact', where on_error='skip' leaves later copies out" in caught.value.fix  # not: use skip
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
    _ddf(keys, 2).imgsink.to_webdataset(str(tmp_path / "shard"), key_column="key", packing="per_partition",
                                        unique_keys="shard", compute=True)  # each partition its own shard


def test_appending_a_key_already_in_the_dataset(tmp_path):
    out = tmp_path / "out"
    _ddf([f"k{i}" for i in range(5)], 1).imgsink.to_webdataset(str(out), key_column="key", compute=True)
    with pytest.raises(BadRowError, match="already in the dataset"):
        _ddf(["n0", "k3"], 1).imgsink.to_webdataset(str(out), key_column="key", mode="append", compute=True)
    _ddf(["n0", "k3", "n1"], 1).imgsink.to_webdataset(str(out), key_column="key", mode="append",
                                                      on_error="skip", compute=True)
    assert [k for k, _ in read_dataset(out)["samples"]] == ["k0", "k1", "k2", "k3", "k4", "n0", "n1"]
    assert _errors(out).key.tolist() == ["k3"]


def _brute_force_shard_policy(keys: list[str], n: int) -> list[int]:
    """Walk rows in order, dropping a row whose key is already in the shard it would land in."""
    dropped, shard_keys, kept = [], set(), 0
    for position, key in enumerate(keys):
        if kept % n == 0:
            shard_keys = set()
        if key in shard_keys:
            dropped.append(position)
            continue
        shard_keys.add(key)
        kept += 1
    return dropped


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from("abcdefg"), max_size=40), st.integers(1, 6))
def test_the_shard_policy_matches_a_row_by_row_walk(keys, n):
    found = find_duplicates(key_hashes(keys), "shard", n)
    assert [d.position for d in found] == _brute_force_shard_policy(keys, n)
    assert all(keys[d.first] == keys[d.position] and d.first < d.position for d in found)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=3), max_size=40))
def test_the_dataset_policy_keeps_exactly_the_first_copy(keys):
    found = find_duplicates(key_hashes(keys), "dataset", 1000)
    dropped = {d.position for d in found}
    assert [k for i, k in enumerate(keys) if i not in dropped] == list(dict.fromkeys(keys))


PRELOAD = Path(__file__).parent / "preload" / "no_simplejpeg.py"


def test_a_worker_without_simplejpeg_fails_the_job_at_the_client(tmp_path):
    """Once, the workers died importing it and the compute hung; now the job fails, saying what to install."""
    ddf = _ddf([f"k{i}" for i in range(4)], 2)
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), \
            LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                         scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
                         silence_logs=logging.CRITICAL, preload=[str(PRELOAD)]) as cluster, \
            Client(cluster) as client:
        assert client.run(lambda: __import__("sys").modules.get("simplejpeg", "absent")) == {
            w: None for w in client.scheduler_info()["workers"]}
        with pytest.raises(MissingDependencyError, match="pip install simplejpeg"):
            client.compute(ddf.imgsink.to_webdataset(str(tmp_path / "out"), key_column="key",
                                                     on_error="skip")).result(timeout=120)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_the_key_log_finds_every_first_copy_across_many_merges():
    """A job's key log, added to group by group (chunks merged as they grow), finds the first copy of
    every key seen, including keys equal in their high 64 bits only, and nothing else; adding never
    changes an earlier log (Dask may rerun a group from it)."""
    import numpy as np

    from dask_imgsink.job.unique import dataset_log

    rng = np.random.default_rng(7)
    log, first, logs = dataset_log(np.array([[5, 6]], np.uint64)), {(5, 6): (-1, -1)}, []
    for group in range(300):
        hashes = rng.integers(0, 2**63, (int(rng.integers(0, 12)), 2), dtype=np.uint64)
        if group == 70 and len(hashes):
            hashes[0] = [5, 7]  # the high bits of the dataset's key, other low bits
        hashes = np.array([h for h in hashes if tuple(h) not in first], np.uint64).reshape(-1, 2)
        rows = np.arange(len(hashes))
        logs.append((log, dict(first)))
        log = log.adding(hashes, np.full(len(hashes), group), rows)
        first.update({tuple(int(x) for x in h): (group, int(r)) for h, r in zip(hashes, rows)})
    assert len(log.chunks) <= 2 * np.log2(len(first)) + 2
    queries = np.array([*first, (5, 8), (1, 2)], np.uint64)
    partitions, rows = log.first_copies(queries)
    assert list(zip(partitions.tolist(), rows.tolist())) == [*first.values(), (-2, 0), (-2, 0)]
    old_log, old_first = logs[150]
    partitions, _ = old_log.first_copies(queries)
    assert (partitions != -2).sum() == len(old_first)
