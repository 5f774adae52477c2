"""Exact packing against an independent oracle, end to end, for any partitioning.

Exact packing cuts shards across partitions (``job/plan.py`` and ``job/window.py``,
group by group, with an open shard carried or written ahead); per-partition packing
of one partition cuts them row by row (``ShardRoller``). The two share no cutting
code, and both promise the same thing: shards filled in row order, each closed at
whichever limit comes first, bad rows and later copies of a key left out. So the
shards of any partitioning, packed exactly, must hold byte for byte the samples of
the same rows written as one partition per partition — and the same metadata.

The rows mix pixel arrays, PNG bytes passed through and bad images, captions and
metadata values with nulls, and repeated keys; the shards are capped by count and by
bytes, and the open shard is carried whole or written ahead.
"""

from __future__ import annotations

import json
from pathlib import Path

import dask
import fsspec
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from helpers import make_image, png_bytes, read_dataset

import dask_imgsink
from dask_imgsink.read.verify import verify_dataset

BAD_IMAGE = np.zeros((0, 4, 3), np.uint8)  # a row error: refused, and left out under on_error="skip"
ROW = st.tuples(st.sampled_from(["array", "png", "bad"]),  # the image: pixels, PNG bytes passed through, or bad
                st.none() | st.sampled_from(["a cat", "", "é 🐈"]),  # the caption (key.txt; None: no member)
                st.none() | st.floats(-1e3, 1e3, allow_nan=False),  # a float metadata column with nulls
                st.none() | st.sampled_from(["x", "yy"]))  # a string metadata column with nulls


def _image(i: int, kind: str):
    if kind == "bad":
        return BAD_IMAGE
    return make_image(i, 24, 32) if kind == "array" else png_bytes(make_image(i, 24, 32))


def _frame(keys: list[int], rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame({"key": pd.Series([f"k{k:03d}" for k in keys], dtype=object),
                         "image": pd.Series([_image(i, r[0]) for i, r in enumerate(rows)], dtype=object),
                         "caption": pd.Series([r[1] for r in rows], dtype=object),
                         "score": pd.Series([r[2] for r in rows], dtype="float64"),
                         "tag": pd.Series([r[3] for r in rows], dtype=object)})


def _same(part: pd.DataFrame) -> pd.DataFrame:
    return part


def _partitioned(frame: pd.DataFrame, sizes: list[int]) -> dd.DataFrame:
    edges = np.cumsum([0, *sizes])
    parts = [frame.iloc[a:b].reset_index(drop=True) for a, b in zip(edges[:-1], edges[1:])]
    with dask.config.set({"dataframe.convert-string": False}):
        return dd.from_map(_same, parts, meta=frame.iloc[:0], enforce_metadata=False)


def _shards(out, storage_options: dict | None = None) -> list[tuple[bytes, str, list[dict]]]:
    """Each shard in order: its tar's bytes, its Parquet schema and rows (less the tar's own name)."""
    fs, root = fsspec.core.url_to_fs(str(out), **(storage_options or {}))
    index = json.loads(fs.cat_file(f"{root}/_index.json"))
    shards = []
    for entry in index["shardlist"]:
        name = entry["url"]
        with fs.open(f"{root}/metadata/{name.replace('.tar', '.parquet')}", "rb") as f:
            rows = pq.read_table(f).drop_columns(["tar_file"])
        shards.append((fs.cat_file(f"{root}/{name}"), str(rows.schema), rows.to_pylist()))
    return shards


def _write_both(data, tmp_path: Path, config: dict, exact_url: str | None = None, storage_options=None):
    """Draw a case, write it packed exactly over its partitions (to ``exact_url``, default a
    local folder) and per partition as one (locally); check them."""
    sizes = data.draw(st.lists(st.integers(0, 7), min_size=1, max_size=9), label="partition sizes")
    rows = sum(sizes)
    keys = data.draw(st.lists(st.integers(0, rows + 2), min_size=rows, max_size=rows), label="keys")
    values = data.draw(st.lists(ROW, min_size=rows, max_size=rows), label="rows")
    bad = {i for i, row in enumerate(values) if row[0] == "bad"}
    options = {"images_per_tar": data.draw(st.integers(1, 6), label="images_per_tar"),
               "max_shard_bytes": data.draw(st.none() | st.integers(9_000, 30_000), label="max_shard_bytes"),
               "key_column": "key", "text_column": "caption", "metadata_columns": ["score", "tag"],
               "unique_keys": data.draw(st.sampled_from(["dataset", "shard"]), label="unique_keys"),
               "on_error": "skip", "compute": True}
    frame = _frame(keys, values)
    case = tmp_path / f"case-{len(list(tmp_path.iterdir()))}"
    exact, oracle = exact_url or str(case / "exact"), case / "oracle"
    with dask.config.set(config):
        exact_tasks = _partitioned(frame, sizes).imgsink.to_webdataset(
            exact, packing="exact", storage_options=storage_options, **options)
        _partitioned(frame, [rows]).imgsink.to_webdataset(str(oracle), packing="per_partition", **options)

    assert _shards(exact, storage_options) == _shards(oracle)
    fs, root = fsspec.core.url_to_fs(exact, **(storage_options or {}))
    index = json.loads(fs.cat_file(f"{root}/_index.json"))
    images = sum(e["nsamples"] for e in index["shardlist"])
    assert index["totals"] == {"rows": rows, "images": images, "skipped": rows - images,
                               "shards": len(index["shardlist"])}
    assert sum(task.metadata["num_images"] for task in exact_tasks) == images
    if options["unique_keys"] == "dataset":  # a key's first good row is kept, later copies left out
        assert images == len({keys[i] for i in range(rows) if i not in bad})
    assert [e["url"] for e in index["shardlist"]] == [f"shard-{i:06d}.tar" for i in range(len(index["shardlist"]))]
    assert verify_dataset(exact, storage_options=storage_options).ok
    assert not [p for p in fs.find(root) if p.endswith(".tar") and "/.imgsink/" in p]  # no staged shard outlives the job


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_exact_shards_of_any_partitioning_hold_what_one_partition_gives(tmp_path, data):
    """On threads; the open shard carried whole, written ahead at every group, or past 3,000 bytes."""
    budget = data.draw(st.sampled_from([None, 0, 3_000]), label="carry budget")
    _write_both(data, tmp_path, {"scheduler": "threads", "imgsink.carry-bytes": budget})


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_the_same_on_a_cluster_of_two_worker_processes(tmp_path, client, data):
    """Runs moved between processes, groups on either worker, the cluster's default carry budget (0)."""
    _write_both(data, tmp_path, {})


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_the_same_on_s3(tmp_path, s3, data):
    """On an object store a group keeps its open shard's bytes in memory (no write ahead) and
    uploads each shard once, under a staging name the commit copies from."""
    prefix, options, _ = s3
    _write_both(data, tmp_path, {"scheduler": "threads"}, f"{prefix}/case-{len(list(tmp_path.iterdir()))}", options)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_an_append_writes_the_samples_one_partition_of_both_jobs_rows_gives(tmp_path, data):
    """``mode="append"``, ``unique_keys="dataset"``: the appended job leaves out the keys the
    dataset already holds (read once, handed from group to group) and its own repeats, over any
    partitioning. Its samples follow the first job's, as when both jobs' rows are one partition."""
    first = data.draw(st.lists(ROW, max_size=6), label="first job's rows")
    sizes = data.draw(st.lists(st.integers(0, 6), min_size=1, max_size=8), label="appended partition sizes")
    second = data.draw(st.lists(ROW, min_size=sum(sizes), max_size=sum(sizes)), label="appended rows")
    keys = data.draw(st.lists(st.integers(0, len(first) + len(second)), min_size=len(first) + len(second),
                              max_size=len(first) + len(second)), label="keys")
    options = {"images_per_tar": data.draw(st.integers(1, 5), label="images_per_tar"),
               "key_column": "key", "text_column": "caption", "metadata_columns": ["score", "tag"],
               "on_error": "skip", "compute": True}
    both = _frame(keys, first + second)
    case = tmp_path / f"case-{len(list(tmp_path.iterdir()))}"
    appended, oracle = case / "appended", case / "oracle"
    with dask.config.set({"scheduler": "threads", "imgsink.carry-bytes": data.draw(st.sampled_from([None, 0]))}):
        _partitioned(both.iloc[:len(first)], [len(first)]).imgsink.to_webdataset(str(appended), **options)
        _partitioned(both.iloc[len(first):].reset_index(drop=True), sizes).imgsink.to_webdataset(
            str(appended), mode="append", **options)
        _partitioned(both, [len(both)]).imgsink.to_webdataset(str(oracle), packing="per_partition", **options)

    assert read_dataset(appended)["samples"] == read_dataset(oracle)["samples"]
    index = json.loads((appended / "_index.json").read_text())
    assert index["totals"]["rows"] == len(both)
    assert index["totals"]["images"] == len({k for k, row in zip(keys, first + second) if row[0] != "bad"})
    assert verify_dataset(str(appended)).ok


def _shard_policy_model(keys: list[str], bad: set[int], images_per_tar: int) -> list[list[str]]:
    """``unique_keys="shard"``, row by row: a bad row is left out; a key already in the shard being
    filled is a repeat, left out, whichever partitions the rows are in; any other row goes into
    that shard, which closes at ``images_per_tar`` rows."""
    shards, filling = [], []
    for row, key in enumerate(keys):
        if row not in bad and key not in filling:
            filling.append(key)
            if len(filling) == images_per_tar:
                shards.append(filling)
                filling = []
    return shards + ([filling] if filling else [])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_unique_keys_shard_leaves_out_what_a_row_by_row_model_does(tmp_path, data):
    """The shard policy allows a key again in a later shard; a model of the rule, row by row,
    whatever the partitions (the partitioning is not an argument of the model)."""
    sizes = data.draw(st.lists(st.integers(0, 7), min_size=1, max_size=9), label="partition sizes")
    rows = sum(sizes)
    keys = [f"k{k:03d}" for k in data.draw(st.lists(st.integers(0, 5), min_size=rows, max_size=rows), label="keys")]
    values = data.draw(st.lists(ROW, min_size=rows, max_size=rows), label="rows")
    bad = {i for i, row in enumerate(values) if row[0] == "bad"}
    images_per_tar = data.draw(st.integers(1, 6), label="images_per_tar")
    frame = _frame([int(k[1:]) for k in keys], values)
    out = tmp_path / f"case-{len(list(tmp_path.iterdir()))}"
    with dask.config.set({"scheduler": "threads", "imgsink.carry-bytes": data.draw(st.sampled_from([None, 0]))}):
        _partitioned(frame, sizes).imgsink.to_webdataset(
            str(out), key_column="key", images_per_tar=images_per_tar, unique_keys="shard", on_error="skip",
            compute=True)
    written = read_dataset(out)
    shard_keys = [table.column("key").to_pylist() for table in written["tables"]]
    assert shard_keys == _shard_policy_model(keys, bad, images_per_tar)
    assert [k for k, _ in written["samples"]] == [k for shard in shard_keys for k in shard]
    assert verify_dataset(str(out)).ok


@pytest.fixture(scope="module")
def columns_with_rows(tmp_path_factory) -> dict:
    """The columns and dtypes ``read_webdataset`` gives for the frames above, read from a dataset with rows."""
    out = tmp_path_factory.mktemp("with-rows") / "out"
    with dask.config.set({"scheduler": "threads"}):
        _partitioned(_frame([0], [("png", "a", 1.0, "x")]), [1]).imgsink.to_webdataset(
            str(out), key_column="key", text_column="caption", metadata_columns=["caption", "score", "tag"],
            compute=True)
        return dict(dask_imgsink.read_webdataset(str(out)).dtypes)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_read_webdataset_gives_back_the_rows_written_for_any_rows(tmp_path, columns_with_rows, data):
    """What ``read_webdataset`` reads is what was written: the good rows in order, their keys,
    captions and metadata with their nulls, and passed-through image bytes unchanged; also when
    no row is good (an empty dataset still has its columns and their types)."""
    sizes = data.draw(st.lists(st.integers(0, 5), min_size=1, max_size=5), label="partition sizes")
    values = data.draw(st.lists(ROW, min_size=sum(sizes), max_size=sum(sizes)), label="rows")
    frame = _frame(list(range(sum(sizes))), values)
    out = tmp_path / f"case-{len(list(tmp_path.iterdir()))}"
    with dask.config.set({"scheduler": "threads"}):
        _partitioned(frame, sizes).imgsink.to_webdataset(
            str(out), key_column="key", text_column="caption", metadata_columns=["caption", "score", "tag"],
            images_per_tar=data.draw(st.integers(1, 4), label="images_per_tar"), on_error="skip", compute=True)
        read = dask_imgsink.read_webdataset(str(out), verify=True)
        got = read.compute()
    written = frame[np.array([row[0] != "bad" for row in values], dtype=bool)].reset_index(drop=True)
    assert list(read.columns) == list(columns_with_rows) and dict(read.dtypes) == columns_with_rows
    assert got["key"].tolist() == written["key"].tolist()
    for name in ("caption", "score", "tag"):
        assert [None if pd.isna(v) else v for v in got[name]] == [None if pd.isna(v) else v for v in written[name]]
    for image, value in zip(got["image"], written["image"]):
        if isinstance(value, bytes):
            assert image == value  # passed through: the same bytes
