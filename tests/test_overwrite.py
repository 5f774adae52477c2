"""Overwrite removes only what a dataset owns; append refuses a different schema."""

from __future__ import annotations

import os

import dask
import dask.dataframe as dd
import pandas as pd

import pyarrow as pa
import pytest
from helpers import dataset_names, frame_ddf, make_frame, read_dataset, shard_names

import dask_imgsink  # noqa: F401
from dask_imgsink import verify_dataset


def _write(out, start=0, n=6, mode="error", **kwargs):
    return frame_ddf(n, start).imgsink.to_webdataset(str(out), key_column="key", images_per_tar=4, mode=mode,
                                                    compute=True, **kwargs)


def _tree(path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_overwrite_refuses_files_no_dataset_owns_and_lists_them(tmp_path):
    out = tmp_path / "out"
    _write(out)
    (out / "notes.txt").write_text("mine")
    (out / "shard-000007.tar").write_bytes(b"not listed in the index")
    before = _tree(out)
    with pytest.raises(ValueError) as info:
        _write(out, 100, mode="overwrite")
    assert "notes.txt, shard-000007.tar" in str(info.value) and "only removes the files" in str(info.value)
    assert _tree(out) == before


def test_overwrite_through_a_symlink_to_the_working_directory_is_refused(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "precious.txt").write_text("keep")
    (tmp_path / "beside.txt").write_text("keep too")
    link = tmp_path / "link"
    link.symlink_to(work)
    monkeypatch.chdir(work)
    for target in (link, tmp_path, tmp_path / "link" / ".."):
        with pytest.raises(ValueError, match="working directory"):
            _write(target, mode="overwrite")
    assert (work / "precious.txt").read_text() == "keep" and (tmp_path / "beside.txt").exists()


@pytest.mark.parametrize("where", ["home", "root"])
def test_overwrite_refuses_home_and_the_filesystem_root(tmp_path, monkeypatch, where):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    target = tmp_path / "home" if where == "home" else "/"
    with pytest.raises(ValueError, match="home directory" if where == "home" else "filesystem root"):
        _write(target, mode="overwrite")


def test_overwrite_through_a_symlink_to_a_dataset_replaces_only_the_dataset(tmp_path):
    real = tmp_path / "real"
    _write(real, n=10)
    link = tmp_path / "link"
    link.symlink_to(real)
    (tmp_path / "beside.txt").write_text("keep")
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"data a symlinked shard points at")
    _write(link, 100, n=3, mode="overwrite")
    assert [k for k, _ in read_dataset(real)["samples"]] == ["img00100", "img00101", "img00102"]
    assert dataset_names(real) == ["README.md", "_SUCCESS", "_index.json"] + shard_names("shard-000000")
    assert (tmp_path / "beside.txt").read_text() == "keep" and link.is_symlink()
    assert outside.read_bytes() == b"data a symlinked shard points at"
    assert verify_dataset(str(link)).ok


def test_overwrite_removes_a_symlinked_shard_but_not_what_it_points_to(tmp_path):
    out = tmp_path / "out"
    _write(out, n=10)
    target = tmp_path / "kept-elsewhere.tar"
    os.replace(out / "shard-000002.tar", target)
    (out / "shard-000002.tar").symlink_to(target)
    _write(out, 100, n=3, mode="overwrite")
    assert target.exists() and not (out / "shard-000002.tar").exists()


def test_overwrite_of_a_dataset_with_leftovers_of_an_old_release_says_how_to_clean(tmp_path):
    out = tmp_path / "out"
    _write(out)
    (out / "_temporary" / ("ab" * 16)).mkdir(parents=True)  # an older release's job folder
    with pytest.raises(ValueError, match="dask-imgsink clean"):
        _write(out, 100, mode="overwrite")


def test_append_refuses_a_different_schema(tmp_path):
    out = tmp_path / "out"
    _write(out)
    before = _tree(out)
    ddf = frame_ddf(4, 100)
    ddf["extra"] = 1
    with pytest.raises(ValueError) as info:
        ddf.imgsink.to_webdataset(str(out), key_column="key", mode="append")
    assert "extra: int64" in str(info.value) and "schema differs" in str(info.value)
    with pytest.raises(ValueError, match="score: double"):
        _write(out, 100, mode="append", metadata_schema={"score": pa.float32()})
    assert _tree(out) == before
    _write(out, 100, n=4, mode="append")  # the same schema appends
    assert len(read_dataset(out)["samples"]) == 10 and verify_dataset(str(out)).ok


def test_append_to_a_dataset_with_no_shard_checks_the_schema_its_job_recorded(tmp_path):
    """A filter that kept nothing writes an empty dataset; it still has a schema (recorded in its
    job's record of ``_index.json``), so an append with other columns is refused there too."""
    out = tmp_path / "out"
    ddf = frame_ddf(6, 0)
    ddf[ddf["key"] == "none of them"].imgsink.to_webdataset(str(out), key_column="key", compute=True)
    assert read_dataset(out)["shards"] == []
    ddf = frame_ddf(4, 100)
    ddf["extra"] = 1
    with pytest.raises(ValueError, match="extra: int64"):
        ddf.imgsink.to_webdataset(str(out), key_column="key", mode="append")
    assert (out / "metadata" / "empty.parquet").exists()
    _write(out, 100, n=4, mode="append")
    assert len(read_dataset(out)["samples"]) == 4 and verify_dataset(str(out)).ok
    assert not (out / "metadata" / "empty.parquet").exists()  # the stand-in goes with the first shards
    assert len(dd.read_parquet(str(out)).compute()) == 4


@pytest.mark.parametrize("packing", ["exact", "per_partition"])
def test_an_empty_dataset_reads_in_every_parquet_reader_and_verify_checks_its_stand_in(tmp_path, packing):
    """No shard, no Parquet file: every Parquet reader's natural call failed. A Parquet file of no row
    in the shards' schema stands in; verify checks it when there, and that it is there only then."""
    import duckdb
    import polars as pl
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    out = tmp_path / "out"
    ddf = frame_ddf(6, 0)
    ddf[ddf["key"] == "none of them"].imgsink.to_webdataset(str(out), key_column="key", packing=packing,
                                                           compute=True)
    names = pq.read_schema(out / "metadata" / "empty.parquet").names
    assert "caption" in names and "key" in names
    assert list(dd.read_parquet(str(out)).compute().columns) == names
    assert len(pd.read_parquet(out / "metadata")) == 0 == pq.read_table(out / "metadata").num_rows
    assert pads.dataset(out / "metadata", format="parquet").to_table().num_rows == 0
    assert pl.read_parquet(f"{out}/metadata/*.parquet").columns == names
    assert duckdb.sql(f"SELECT count(*) FROM '{out}/metadata/*.parquet'").fetchall() == [(0,)]
    assert verify_dataset(str(out)).ok
    stand_in = (out / "metadata" / "empty.parquet").read_bytes()
    pq.write_table(pa.table({"key": ["x"]}), out / "metadata" / "empty.parquet")
    assert [p.message for p in verify_dataset(str(out)).problems] == [
        "is not the dataset's: it should hold no row, in the schema its last job recorded"]
    (out / "metadata" / "empty.parquet").unlink()
    assert verify_dataset(str(out)).ok  # releases before it wrote none: it holds no data
    (out / "metadata" / "empty.parquet").write_bytes(stand_in)
    assert verify_dataset(str(out)).ok
    _write(out, 100, n=4, mode="append")
    (out / "metadata" / "empty.parquet").write_bytes(stand_in)  # beside shards: a stray
    assert [p.message for p in verify_dataset(str(out)).problems] == [
        "is present, but the dataset has shards: it stands in only for a dataset with none"]


def test_verify_accepts_the_stand_in_of_types_parquet_stores_otherwise(tmp_path):
    """Parquet stores date64 as date32 and timestamp[s] as milliseconds: the stand-in read back is
    compared with the recorded schema as Parquet stores it."""
    frame = make_frame(2)
    frame["taken"] = pd.Series(pd.to_datetime(["2026-01-01", "2026-01-02"]).astype("datetime64[s]"))
    frame["day"] = pd.Series(pa.array([0, 1], pa.date64()).to_pandas(types_mapper=pd.ArrowDtype))
    with dask.config.set({"dataframe.convert-string": False}):
        ddf = dd.from_pandas(frame, npartitions=1)
    out = tmp_path / "out"
    ddf[ddf["key"] == "none"].imgsink.to_webdataset(str(out), key_column="key", compute=True)
    assert verify_dataset(str(out)).ok


def _as_layout_1(out) -> None:
    """Turn a dataset into what releases before the metadata/ folder wrote: Parquet beside the tars."""
    import hashlib
    import json

    index = json.loads((out / "_index.json").read_text())
    index.pop("layout")
    for entry in index["shardlist"]:
        for field in ("parquet", "idx", "idx_filesize", "idx_sha256", "formats"):
            entry.pop(field, None)
    for parquet in (out / "metadata").iterdir():
        parquet.rename(out / parquet.name)
    (out / "metadata").rmdir()
    for idx in out.glob("*.idx"):
        idx.unlink()
    data = json.dumps(index, indent=1).encode()
    (out / "_index.json").write_bytes(data)
    success = json.loads((out / "_SUCCESS").read_text())
    (out / "_SUCCESS").write_text(json.dumps({**success, "index_sha256": hashlib.sha256(data).hexdigest()}))


def test_a_dataset_of_the_older_layout_is_verified_overwritten_but_not_appended_to(tmp_path):
    from dask_imgsink import verify_dataset

    out = tmp_path / "out"
    frame_ddf(9, 0).imgsink.to_webdataset(str(out), key_column="key", images_per_tar=4, compute=True)
    _as_layout_1(out)
    assert (out / "shard-000000.parquet").exists()
    report = verify_dataset(str(out))
    assert report.ok and report.images == 9, report.problems
    with pytest.raises(ValueError, match="older dask-imgsink.*beside the tars"):
        frame_ddf(3, 100).imgsink.to_webdataset(str(out), key_column="key", mode="append")
    frame_ddf(3, 100).imgsink.to_webdataset(str(out), key_column="key", mode="overwrite", compute=True)
    assert dataset_names(out) == ["README.md", "_SUCCESS", "_index.json"] + shard_names("shard-000000")
