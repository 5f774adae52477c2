"""Exact packing against an independent oracle, end to end, for any partitioning.

Exact packing cuts shards across partitions (``job/plan.py`` and ``job/window.py``,
group by group, with an open shard carried or written ahead); per-partition packing
of one partition cuts them row by row (``ShardRoller``). The two share no cutting
code, and both promise the same thing: shards filled in row order, each closed at
whichever limit comes first, bad rows and later copies of a key left out. So the
shards of any partitioning, packed exactly, must hold byte for byte the samples of
the same rows written as one partition per partition — and the same metadata.
"""

from __future__ import annotations

import json
from pathlib import Path

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from helpers import make_image

from dask_imgsink.read.verify import verify_dataset

BAD_IMAGE = np.zeros((0, 4, 3), np.uint8)  # a row error: refused, and left out under on_error="skip"


def _frame(keys: list[int], bad: set[int]) -> pd.DataFrame:
    images = [BAD_IMAGE if i in bad else make_image(i, 24, 32) for i in range(len(keys))]
    return pd.DataFrame({"key": pd.Series([f"k{k:03d}" for k in keys], dtype=object),
                         "image": pd.Series(images, dtype=object),
                         "score": [float(i) for i in range(len(keys))]})


def _same(part: pd.DataFrame) -> pd.DataFrame:
    return part


def _partitioned(frame: pd.DataFrame, sizes: list[int]) -> dd.DataFrame:
    edges = np.cumsum([0, *sizes])
    parts = [frame.iloc[a:b].reset_index(drop=True) for a, b in zip(edges[:-1], edges[1:])]
    with dask.config.set({"dataframe.convert-string": False}):
        return dd.from_map(_same, parts, meta=frame.iloc[:0], enforce_metadata=False)


def _shards(out: Path) -> list[tuple[bytes, list[dict]]]:
    """Each shard in order: its tar's bytes and its Parquet rows (less the tar's own name)."""
    index = json.loads((out / "_index.json").read_text())
    shards = []
    for entry in index["shardlist"]:
        name = entry["url"]
        rows = pq.read_table(out / "metadata" / name.replace(".tar", ".parquet")).drop_columns(["tar_file"])
        shards.append(((out / name).read_bytes(), rows.to_pylist()))
    return shards


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_exact_shards_of_any_partitioning_hold_what_one_partition_gives(tmp_path, data):
    sizes = data.draw(st.lists(st.integers(0, 7), min_size=1, max_size=9), label="partition sizes")
    rows = sum(sizes)
    keys = data.draw(st.lists(st.integers(0, rows + 2), min_size=rows, max_size=rows), label="keys")
    bad = data.draw(st.sets(st.integers(0, max(rows - 1, 0)), max_size=rows // 3), label="bad rows") if rows else set()
    options = {"images_per_tar": data.draw(st.integers(1, 6), label="images_per_tar"),
               "max_shard_bytes": data.draw(st.none() | st.integers(9_000, 30_000), label="max_shard_bytes"),
               "key_column": "key", "on_error": "skip", "compute": True}
    budget = data.draw(st.sampled_from([None, 0, 3_000]), label="carry budget")
    frame = _frame(keys, bad)
    case = tmp_path / f"case-{len(list(tmp_path.iterdir()))}"
    exact, oracle = case / "exact", case / "oracle"
    with dask.config.set({"scheduler": "threads", "imgsink.carry-bytes": budget}):
        exact_tasks = _partitioned(frame, sizes).imgsink.to_webdataset(str(exact), packing="exact", **options)
        _partitioned(frame, [rows]).imgsink.to_webdataset(str(oracle), packing="per_partition", **options)

    assert _shards(exact) == _shards(oracle)
    index = json.loads((exact / "_index.json").read_text())
    good_keys = {keys[i] for i in range(rows) if i not in bad}  # a key's first good row is kept, later copies left out
    assert index["totals"] == {"rows": rows, "images": len(good_keys), "skipped": rows - len(good_keys),
                               "shards": len(index["shardlist"])}
    assert sum(e["nsamples"] for e in index["shardlist"]) == len(good_keys)
    assert sum(task.metadata["num_images"] for task in exact_tasks) == len(good_keys)
    assert [e["url"] for e in index["shardlist"]] == [f"shard-{i:06d}.tar" for i in range(len(index["shardlist"]))]
    assert verify_dataset(str(exact)).ok
    assert not any((exact / ".imgsink").rglob("*.tar"))  # no staged shard outlives the job
