"""Every reader loads the output, in every state a dataset can be in.

States: fresh; after skipped rows; after an append; after a failed job and its
rerun. Each dataset mixes JPEG (encoded from pixels) and pass-through PNG
images, and has null captions and labels, so the Hugging Face and DALI cases that broke
(field sets that differ between samples, formats first seen in later shards)
are in every state. Each reader is called the way its README line says and
must return exactly the images written, once each.

Hugging Face ``datasets``, DALI and wids run in a subprocess each: the first two
start thread pools that can abort the interpreter at exit (apache/arrow#34314),
which is not what these tests check, and wids imports PyTorch (the CPU build of
the test extra). DALI runs CPU-only (``device_id=None``).
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import dask
import dask.dataframe as dd
import duckdb
import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

import dask_imgsink  # noqa: F401
from dask_imgsink import BadRowError, verify_dataset

STATES = ["fresh", "skipped", "appended", "rerun"]


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _frame(start: int, n: int) -> pd.DataFrame:
    """Rows ``start..start+n``: PNG bytes in every third row and in the last rows (a format first seen late),
    JPEG pixels elsewhere; a null caption in every fourth row, a null label in every sixth."""
    rng = np.random.default_rng(start)
    rows = []
    for i in range(start, start + n):
        pixels = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
        late_png = i - start >= n - 4
        rows.append({
            "key": f"s{i:05d}",
            "image": _png(pixels) if i % 3 == 0 or late_png else pixels,
            "caption": None if i % 4 == 0 else f"caption {i}",
            "label": None if i % 6 == 5 else i % 5,
            "uid": f"s{i:05d}",
            "score": i / 10,
        })
    return pd.DataFrame(rows)


def _ddf(pdf: pd.DataFrame, npartitions: int = 3) -> dd.DataFrame:
    with dask.config.set({"dataframe.convert-string": False}):
        return dd.from_pandas(pdf, npartitions=npartitions, sort=False)


WRITE = dict(key_column="key", text_column="caption", label_column="label", images_per_tar=5, compute=True)


def _build(state: str, out: Path) -> list[str]:
    """Write the dataset of ``state`` to ``out``; return the keys written, in order."""
    first = _frame(0, 23)
    if state == "fresh":
        _ddf(first).imgsink.to_webdataset(str(out), **WRITE)
        return list(first.key)
    if state == "skipped":
        bad = first.copy()
        bad.at[4, "image"] = _png(np.zeros((4, 4, 3), np.uint8))[:-20]  # a truncated PNG
        bad.at[11, "image"] = None
        _ddf(bad).imgsink.to_webdataset(str(out), on_error="skip", **WRITE)
        return [k for i, k in enumerate(first.key) if i not in (4, 11)]
    if state == "appended":
        second = _frame(100, 9)
        _ddf(first).imgsink.to_webdataset(str(out), **WRITE)
        _ddf(second, 2).imgsink.to_webdataset(str(out), mode="append", **WRITE)
        return list(first.key) + list(second.key)
    if state == "rerun":
        _ddf(_frame(200, 6), 1).imgsink.to_webdataset(str(out), **WRITE)
        failing = first.copy()
        failing.at[7, "image"] = np.zeros((4, 4, 4), np.uint8)  # alpha into JPEG: the job fails
        with pytest.raises(BadRowError):
            _ddf(failing).imgsink.to_webdataset(str(out), mode="overwrite", **WRITE)
        _ddf(first).imgsink.to_webdataset(str(out), mode="overwrite", **WRITE)
        return list(first.key)
    raise ValueError(state)


@pytest.fixture(scope="module")
def datasets_by_state(tmp_path_factory) -> dict[str, tuple[Path, list[str]]]:
    built = {}
    for state in STATES:
        out = tmp_path_factory.mktemp(state) / "out"
        built[state] = (out, _build(state, out))
        assert verify_dataset(str(out), decode=True).ok
    return built


def _shard_pattern(out: Path) -> str:
    shards = json.loads((out / "_index.json").read_text())["shardlist"]
    return str(out / f"shard-{{000000..{len(shards) - 1:06d}}}.tar")


def _run(script: str, tmp_path: Path) -> dict:
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- Parquet readers


@pytest.mark.parametrize("state", STATES)
def test_dask_read_parquet_on_the_dataset_root(datasets_by_state, state):
    out, keys = datasets_by_state[state]
    frame = dd.read_parquet(str(out)).compute()
    assert sorted(frame.key) == sorted(keys) and len(frame) == len(keys)
    schema = pq.read_schema(out / "metadata" / "shard-000000.parquet")
    assert list(frame.columns) == schema.names


@pytest.mark.parametrize("state", STATES)
def test_pandas_pyarrow_polars_duckdb_on_the_metadata_folder(datasets_by_state, state):
    out, keys = datasets_by_state[state]
    meta = out / "metadata"
    assert sorted(pd.read_parquet(meta).key) == sorted(keys)
    assert sorted(pq.read_table(meta).column("key").to_pylist()) == sorted(keys)
    assert sorted(ds.dataset(meta, format="parquet").to_table().column("key").to_pylist()) == sorted(keys)
    assert sorted(pl.read_parquet(f"{meta}/*.parquet")["key"].to_list()) == sorted(keys)
    found = duckdb.sql(f"SELECT key FROM '{meta}/*.parquet'").fetchall()
    assert sorted(k for (k,) in found) == sorted(keys)


def test_skipped_rows_are_json_lines_that_every_tool_reads(datasets_by_state):
    out, _ = datasets_by_state["skipped"]
    errors = pd.read_json(out / "_errors.jsonl", lines=True)
    assert errors[["partition", "row", "key", "column"]].values.tolist() == [
        [0, 4, "s00004", "image"], [1, 3, "s00011", "image"]]
    assert "truncated" in errors.reason[0] and "missing" in errors.reason[1]
    assert pl.read_ndjson(out / "_errors.jsonl").height == 2
    assert duckdb.sql(f"SELECT count(*) FROM read_json('{out}/_errors.jsonl')").fetchall() == [(2,)]


# ----------------------------------------------------------------------------- WebDataset readers


@pytest.mark.parametrize("state", STATES)
def test_webdataset_reads_every_sample(datasets_by_state, state):
    out, keys = datasets_by_state[state]
    loader = wds.WebDataset(_shard_pattern(out), shardshuffle=False).decode("pil").to_tuple(
        "__key__", "jpg;png", "json")
    seen = [(key, image.size, meta["uid"]) for key, image, meta in loader]
    assert [k for k, _, _ in seen] == keys
    assert all(size == (10, 12) and uid == key for key, size, uid in seen)


@pytest.mark.parametrize("state", STATES)
def test_huggingface_load_dataset_returns_every_image(datasets_by_state, state, tmp_path):
    out, keys = datasets_by_state[state]
    result = _run(f"""
        import datasets, json, os
        d = datasets.load_dataset({str(out)!r}, split="train", cache_dir="hf")
        rows = [(r["__key__"], [f for f in ("jpg", "png") if r[f] is not None], r["txt"], r["cls"]) for r in d]
        sizes = sorted({{(r["jpg"] or r["png"]).size for r in d}})
        print(json.dumps({{"rows": rows, "sizes": sizes, "columns": sorted(d.column_names)}}), flush=True)
        os._exit(0)
    """, tmp_path)
    assert [r[0] for r in result["rows"]] == keys
    assert all(len(formats) == 1 for _, formats, _, _ in result["rows"])  # never an image silently None
    assert {f for _, formats, _, _ in result["rows"] for f in formats} == {"jpg", "png"}
    assert [r[2] for r in result["rows"]] == [None if int(k[1:]) % 4 == 0 else f"caption {int(k[1:])}"
                                              for k in keys]  # a null caption stays None, not ""
    assert [r[3] for r in result["rows"]] == [None if int(k[1:]) % 6 == 5 else int(k[1:]) % 5 for k in keys]
    assert result["sizes"] == [[10, 12]]
    assert result["columns"] == ["__key__", "__url__", "cls", "jpg", "json", "png", "txt"]


@pytest.mark.parametrize("state", STATES)
def test_wids_reads_every_sample_by_index_from_our_index_file(datasets_by_state, state, tmp_path):
    """wids opens ``_index.json`` as its shard list (relative URLs resolve beside it) and reads samples by index."""
    if importlib.util.find_spec("wids") is None or importlib.util.find_spec("torch") is None:
        pytest.skip("wids and PyTorch are not installed (the test extra installs them on Linux x86_64)")
    out, keys = datasets_by_state[state]
    result = _run(f"""
        import json, wids
        d = wids.ShardListDataset({str(out / "_index.json")!r}, cache_dir="wids-cache")
        rows = []
        for i in range(len(d)):
            s = d[i]
            images = [f for f in (".jpg", ".png") if f in s]
            rows.append((s["__key__"], images, s[images[0]].size, s.get(".txt"), s.get(".cls"), s[".json"]["uid"]))
        print(json.dumps({{"length": len(d), "rows": rows}}), flush=True)
    """, tmp_path)
    rows = result["rows"]
    assert result["length"] == len(keys) and [r[0] for r in rows] == keys
    assert all(len(images) == 1 and size == [10, 12] for _, images, size, _, _, _ in rows)
    assert {images[0] for _, images, _, _, _, _ in rows} == {".jpg", ".png"}
    assert [r[3] for r in rows] == [None if int(k[1:]) % 4 == 0 else f"caption {int(k[1:])}" for k in keys]
    assert [r[4] for r in rows] == [None if int(k[1:]) % 6 == 5 else int(k[1:]) % 5 for k in keys]
    assert [r[5] for r in rows] == keys


@pytest.mark.parametrize("state", STATES)
def test_dali_reads_every_sample_with_our_index_files(datasets_by_state, state, tmp_path):
    pytest.importorskip("nvidia.dali")
    out, keys = datasets_by_state[state]
    result = _run(f"""
        import glob, json, os
        from nvidia.dali import fn, pipeline_def
        tars = sorted(glob.glob({str(out)!r} + "/*.tar"))
        @pipeline_def(batch_size=4, num_threads=1, device_id=None)
        def pipe():
            image, meta = fn.readers.webdataset(paths=tars, index_paths=[t[:-4] + ".idx" for t in tars],
                                                ext=["jpg;png", "json"], missing_component_behavior="error",
                                                name="reader")
            return fn.decoders.image(image, device="cpu"), meta
        p = pipe()
        p.build()
        total = p.epoch_size("reader")
        uids, shapes = [], set()
        while len(uids) < total:
            images, metas = p.run()
            for i in range(len(images)):
                shapes.add(tuple(images.at(i).shape))
                uids.append(json.loads(bytes(metas.at(i)))["uid"])
        print(json.dumps({{"total": total, "uids": uids[:total], "shapes": sorted(shapes)}}), flush=True)
        os._exit(0)
    """, tmp_path)
    assert result["total"] == len(keys)
    assert result["uids"] == keys
    assert result["shapes"] == [[12, 10, 3]]


def test_dali_follows_the_index_we_wrote(datasets_by_state, tmp_path):
    """A damaged index breaks DALI's reading: so the tests above ran on our index, not on a scan of the tars."""
    pytest.importorskip("nvidia.dali")
    out, _ = datasets_by_state["fresh"]
    broken = tmp_path / "broken"
    broken.mkdir()
    tar = broken / "shard-000000.tar"
    tar.write_bytes((out / "shard-000000.tar").read_bytes())
    lines = (out / "shard-000000.idx").read_text().splitlines()
    first = lines[1].split()
    first[1] = str(int(first[1]) + 512)  # the first image's offset now points one block too far
    (broken / "shard-000000.idx").write_text("\n".join([lines[0], " ".join(first), *lines[2:]]) + "\n")
    script = f"""
        import os
        from nvidia.dali import fn, pipeline_def
        @pipeline_def(batch_size=5, num_threads=1, device_id=None)
        def pipe():
            image, = fn.readers.webdataset(paths=[{str(tar)!r}], index_paths=[{str(tar)[:-4] + '.idx'!r}],
                                           ext=["jpg;png"])
            return fn.decoders.image(image, device="cpu")
        p = pipe()
        p.build()
        p.run()
        print("{{}}", flush=True)
        os._exit(0)
    """
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode != 0


def _assert_our_index_files_are_what_wds2idx_writes(out: Path, tmp_path: Path) -> None:
    for tar in sorted(out.glob("*.tar")):
        theirs = tmp_path / (tar.stem + ".idx")
        proc = subprocess.run([sys.executable, "-m", "wds2idx", str(tar), str(theirs)], capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert theirs.read_bytes() == (out / f"{tar.stem}.idx").read_bytes()


def test_our_index_files_are_what_dalis_wds2idx_writes(datasets_by_state, tmp_path):
    pytest.importorskip("nvidia.dali")
    out, _ = datasets_by_state["appended"]
    _assert_our_index_files_are_what_wds2idx_writes(out, tmp_path)


def test_huggingface_loads_nested_and_temporal_metadata_through_the_declared_features(tmp_path):
    frame = pd.DataFrame({
        "key": ["a", "b", "c"],
        "image": pd.Series([np.zeros((4, 4, 3), np.uint8)] * 3, dtype=object),
        "tags": pd.Series([["x", "y"], [], None], dtype=object),
        "info": pd.Series([{"w": 1, "ok": True}, {"w": 2, "ok": False}, None], dtype=object),
        "when": pd.to_datetime(["2026-01-01", "2026-06-30", None]),
        "nested": pd.Series([[[1, 2]], [], [[3]]], dtype=object),
    })
    out = tmp_path / "out"
    schema = {"tags": pa.list_(pa.string()), "info": pa.struct([("w", pa.int64()), ("ok", pa.bool_())]),
              "nested": pa.list_(pa.list_(pa.int64()))}
    _ddf(frame, 1).imgsink.to_webdataset(str(out), key_column="key", metadata_schema=schema, compute=True)
    result = _run(f"""
        import datasets, json, os
        d = datasets.load_dataset({str(out)!r}, split="train", cache_dir="hf")
        print(json.dumps([r["json"] for r in d]), flush=True)
        os._exit(0)
    """, tmp_path)
    assert [r["tags"] for r in result] == [["x", "y"], [], None]
    assert [r["info"] for r in result] == [{"w": 1, "ok": True}, {"w": 2, "ok": False}, None]
    assert [r["when"] for r in result] == ["2026-01-01T00:00:00", "2026-06-30T00:00:00", None]
    assert [r["nested"] for r in result] == [[[1, 2]], [], [[3]]]


def test_infinities_in_key_json_read_back_as_infinities_in_every_json_reader(tmp_path):
    """JSON has no infinity: key.json holds ``1e999`` (valid JSON, which decoders read as infinity), so
    it says what the Parquet says. NaN has no JSON form at all: null in both."""
    frame = pd.DataFrame({"key": ["a", "b", "c", "d"], "image": pd.Series([np.zeros((4, 4, 3), np.uint8)] * 4,
                                                                          dtype=object),
                          "score": [1.5, np.inf, -np.inf, np.nan],
                          "steps": pd.Series([[0.5, np.inf], [-np.inf], [], None], dtype=object)})
    out = tmp_path / "out"
    _ddf(frame, 2).imgsink.to_webdataset(str(out), key_column="key", metadata_schema={"steps": pa.list_(pa.float64())},
                                         compute=True)
    expected = [{"score": 1.5, "steps": [0.5, np.inf]}, {"score": np.inf, "steps": [-np.inf]},
                {"score": -np.inf, "steps": []}, {"score": None, "steps": None}]
    table = pq.read_table(out / "metadata", columns=["score", "steps"])
    assert table.to_pylist() == expected
    assert [json.loads(s["json"]) for s in wds.WebDataset(str(out / "shard-000000.tar"), shardshuffle=False)] == expected
    assert b"1e999" in (out / "shard-000000.tar").read_bytes()
    result = _run(f"""
        import datasets, json, os
        d = datasets.load_dataset({str(out)!r}, split="train", cache_dir="hf")
        print(json.dumps([r["json"] for r in d]), flush=True)  # json.dumps writes infinity as Infinity
        os._exit(0)
    """, tmp_path)
    assert result == expected
    assert verify_dataset(str(out)).ok


@pytest.mark.parametrize("packing", ["exact", "per_partition"])
def test_keys_holding_commas_and_colons_are_indexed_as_wds2idx_does_and_dali_reads_them(packing, tmp_path):
    """A key may hold ',' and ':' (DALI's index only separates fields by spaces). The writer keeps
    each sample's member layout until its index line is known (it used to separate the members with
    ',', and a key holding one failed the job)."""
    pytest.importorskip("nvidia.dali")
    keys = ["a,b", "c:d", "e,f:g,h", "plain"]
    frame = pd.DataFrame({"key": keys, "image": pd.Series([np.full((6, 5, 3), 40 * i, np.uint8) for i in range(4)],
                                                            dtype=object),
                          "caption": [f"caption {i}" for i in range(4)], "uid": keys})
    out = tmp_path / "out"
    _ddf(frame, 2).imgsink.to_webdataset(str(out), key_column="key", text_column="caption", images_per_tar=3,
                                         packing=packing, compute=True)
    assert verify_dataset(str(out)).ok
    _assert_our_index_files_are_what_wds2idx_writes(out, tmp_path)
    result = _run(f"""
        import glob, json, os
        from nvidia.dali import fn, pipeline_def
        tars = sorted(glob.glob({str(out)!r} + "/*.tar"))
        @pipeline_def(batch_size=1, num_threads=1, device_id=None)
        def pipe():
            text, meta = fn.readers.webdataset(paths=tars, index_paths=[t[:-4] + ".idx" for t in tars],
                                               ext=["txt", "json"], missing_component_behavior="error", name="r")
            return text, meta
        p = pipe()
        p.build()
        rows = []
        for _ in range(p.epoch_size("r")):
            text, meta = p.run()
            rows.append([bytes(text.at(0)).decode(), json.loads(bytes(meta.at(0)))["uid"]])
        print(json.dumps(rows), flush=True)
        os._exit(0)
    """, tmp_path)
    assert result == [[f"caption {i}", key] for i, key in enumerate(keys)]


def test_a_key_with_a_space_is_written_when_no_dali_index_is(tmp_path):
    """Only DALI's index cannot hold a space (the writer refuses it there, naming the row):
    webdataset reads such a key as it is."""
    frame = pd.DataFrame({"key": ["a b", "c"], "image": pd.Series([np.zeros((4, 4, 3), np.uint8)] * 2, dtype=object)})
    out = tmp_path / "out"
    with dask.config.set({"dataframe.convert-string": False}):
        ddf = dd.from_pandas(frame, npartitions=1)
    with pytest.raises(BadRowError, match="space"):
        ddf.imgsink.to_webdataset(str(out), key_column="key", compute=True)
    ddf.imgsink.to_webdataset(str(out), key_column="key", dali_index=False, mode="overwrite", compute=True)
    assert [s["__key__"] for s in wds.WebDataset(str(out / "shard-000000.tar"), shardshuffle=False)] == ["a b", "c"]
    assert verify_dataset(str(out)).ok and not list(out.glob("*.idx"))
