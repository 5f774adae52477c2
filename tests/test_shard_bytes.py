"""``max_shard_bytes``: a shard closes at whichever limit, images or bytes, comes first."""

from __future__ import annotations

import json
import logging

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from helpers import png_bytes, read_dataset
from hypothesis import given, settings
from hypothesis import strategies as st

import dask_imgsink  # noqa: F401
from dask_imgsink import ImageBatch, ImageObject, ImageWriterStage, verify_dataset
from dask_imgsink.core.tarshard import archive_size, content_limit
from dask_imgsink.job.plan import cut_shards
from dask_imgsink.job.unique import find_duplicates, key_hashes

CAP = 64 * 1024


def _images(sizes: list[int]) -> list[bytes]:
    """PNG images of noise, ``side`` pixels square each: incompressible, so their size is known roughly."""
    rng = np.random.default_rng(0)
    return [png_bytes(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for side in sizes]


def _ddf(images: list[bytes], npartitions: int) -> dd.DataFrame:
    frame = pd.DataFrame({"key": [f"k{i:04d}" for i in range(len(images))],
                          "image": pd.Series(images, dtype=object)})
    with dask.config.set({"dataframe.convert-string": False}):
        return dd.from_pandas(frame, npartitions=npartitions, sort=False)


def _greedy(sizes: list[int], n: int, cap: int) -> list[list[int]]:
    """The shards a row-by-row fill would make (rows as indexes), the reference for both packings."""
    shards, limit = [], content_limit(cap)
    for i, size in enumerate(sizes):
        if not shards or len(shards[-1]) >= n or (sum(sizes[j] for j in shards[-1]) + size > limit):
            shards.append([])
        shards[-1].append(i)
    return shards


def _sample_sizes(out) -> list[int]:
    return [size for table in read_dataset(out)["tables"] for size in table.column("sample_size").to_pylist()]


@pytest.mark.parametrize("packing", ["exact", "per_partition"])
def test_shards_close_at_whichever_limit_comes_first(tmp_path, packing, client):
    images = _images([20, 60, 30, 90, 40, 10, 70, 50, 25, 80, 35, 15] * 2)
    out = tmp_path / "out"
    client.compute(_ddf(images, 3).imgsink.to_webdataset(
        str(out), key_column="key", images_per_tar=5, max_shard_bytes=CAP, packing=packing)).result(timeout=120)
    index = json.loads((out / "_index.json").read_text())
    assert all(e["filesize"] <= CAP or e.get("oversized") for e in index["shardlist"])
    assert all(e["nsamples"] <= 5 for e in index["shardlist"])
    sizes = _sample_sizes(out)
    counts = [e["nsamples"] for e in index["shardlist"]]
    if packing == "exact":  # as full as the limits allow, over the whole job
        assert counts == [len(s) for s in _greedy(sizes, 5, CAP)]
    else:  # the same rule, within each partition
        per_part = [sizes[a:b] for a, b in ((0, 8), (8, 16), (16, 24))]
        assert counts == [len(s) for part in per_part for s in _greedy(part, 5, CAP)]
    assert [k for k, _ in read_dataset(out)["samples"]] == [f"k{i:04d}" for i in range(24)]
    assert verify_dataset(str(out)).ok


@pytest.mark.parametrize("packing", ["exact", "per_partition"])
def test_an_image_larger_than_the_cap_gets_a_shard_of_its_own_clearly(tmp_path, packing, caplog):
    images = _images([20, 200, 20, 20])  # a 200x200 noise PNG is ~120 kB, twice the cap
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="dask_imgsink"):
        _ddf(images, 1).imgsink.to_webdataset(str(out), key_column="key", max_shard_bytes=CAP, packing=packing,
                                              compute=True)
    index = json.loads((out / "_index.json").read_text())
    assert [e["nsamples"] for e in index["shardlist"]] == [1, 1, 2]
    assert [bool(e.get("oversized")) for e in index["shardlist"]] == [False, True, False]
    assert index["shardlist"][1]["filesize"] > CAP
    assert any("more than max_shard_bytes" in r.getMessage() for r in caplog.records)
    assert verify_dataset(str(out)).ok


def test_the_stage_caps_its_tars_too(tmp_path):
    images = _images([100, 100, 100, 100])  # ~30 kB each: two to a tar
    stage = ImageWriterStage(str(tmp_path / "out"), images_per_tar=10, max_shard_bytes=CAP)
    result = stage.process(ImageBatch(task_id="t", data=[ImageObject(image_id=f"i{i}", image_data=img)
                                                         for i, img in enumerate(images)]))
    tars = [p for p in result.data if p.endswith(".tar")]
    assert len(tars) > 1 and all(archive_size(0) < len(open(t, "rb").read()) <= CAP for t in tars)


@pytest.mark.parametrize("size, error", [
    (2.5, ValueError), (True, TypeError), (0, ValueError), (-1, ValueError), ("1 banana", ValueError),
    ("-5MB", ValueError), ([1000], TypeError),
])
def test_max_shard_bytes_that_is_not_a_size_is_refused_at_call_time(tmp_path, size, error):
    ddf = _ddf(_images([8]), 1)
    with pytest.raises(error, match="max_shard_bytes"):
        ddf.imgsink.to_webdataset(str(tmp_path / "out"), key_column="key", max_shard_bytes=size)
    with pytest.raises(error, match="max_shard_bytes"):
        ImageWriterStage(str(tmp_path / "stage"), max_shard_bytes=size)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("packing", ["exact", "per_partition"])
def test_max_shard_bytes_takes_a_size_string_or_a_whole_float_as_dask_and_webdataset_write_them(tmp_path, packing):
    images = _images([20, 60, 30, 90, 40, 10, 70, 50, 25, 80, 35, 15])
    cap, cuts = 32 * 1024, []
    for n, size in enumerate((cap, "32KiB", "32 KiB", float(cap))):
        out = tmp_path / f"{packing}-{n}"
        _ddf(images, 3).imgsink.to_webdataset(str(out), key_column="key", images_per_tar=5, max_shard_bytes=size,
                                              packing=packing, compute=True)
        index = json.loads((out / "_index.json").read_text())
        assert index["jobs"][-1]["options"]["max_shard_bytes"] == cap  # recorded as the bytes it means
        assert all(e["filesize"] <= cap for e in index["shardlist"])
        cuts.append([e["nsamples"] for e in index["shardlist"]])
    assert all(cut == cuts[0] for cut in cuts) and len(cuts[0]) > 3  # more shards than the count alone makes (3)
    assert ImageWriterStage(str(tmp_path / "stage"), max_shard_bytes="32KiB").max_shard_bytes == cap


@pytest.mark.parametrize("budget", [-1, "-1", "lots", 2.5, True])
def test_a_carry_budget_that_is_not_a_size_is_refused_where_the_graph_is_built(tmp_path, budget):
    with dask.config.set({"imgsink.carry-bytes": budget}), pytest.raises(ValueError, match="imgsink.carry-bytes"):
        _ddf(_images([8]), 1).imgsink.to_webdataset(str(tmp_path / "out"), key_column="key")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(512, 40_000), max_size=60), st.integers(1, 8), st.integers(10_240, 100_000))
def test_cut_shards_matches_a_row_by_row_fill(sizes, n, cap):
    sizes = [s - s % 512 or 512 for s in sizes]  # sample blocks are whole 512-byte blocks
    expected = [shard[0] for shard in _greedy(sizes, n, cap)]
    assert cut_shards(np.asarray(sizes, np.int64), n, cap) == expected


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abcde"), st.integers(1, 30)), max_size=40), st.integers(1, 5))
def test_the_shard_key_policy_with_a_byte_cap_matches_a_row_by_row_walk(rows, n):
    keys, sizes = [k for k, _ in rows], [s * 512 for _, s in rows]
    cap = 20 * 1024
    dropped, shard, shard_keys, limit = [], [], set(), content_limit(cap)
    for i, (key, size) in enumerate(zip(keys, sizes)):
        if shard and (len(shard) >= n or sum(shard) + size > limit):
            shard, shard_keys = [], set()
        if key in shard_keys:
            dropped.append(i)
            continue
        shard.append(size)
        shard_keys.add(key)
    found = find_duplicates(key_hashes(keys), "shard", n, sizes=np.asarray(sizes), max_shard_bytes=cap)
    assert [d.position for d in found] == dropped
