"""The accessor end to end on a real LocalCluster: every DataFrame source, filtered and mapped,
read back with tarfile, pyarrow, dask and webdataset."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import webdataset as wds
from helpers import (
    decode,
    file_bytes,
    make_ddf,
    make_frame,
    make_image,
    psnr,
    read_dataset,
)

import dask_imgsink
from dask_imgsink import BadRowError, FileGroupTask, WriteBag

SOURCES = ["from_pandas", "from_map", "read_parquet", "from_delayed"]
SIZES = [9, 0, 14, 5, 1]


def _add_double(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.assign(double_score=frame["score"] * 2)


def _expected_rows(sizes: list[int]) -> list[int]:
    return [i for i in range(sum(sizes)) if float(i % 10) != 3.0]


@pytest.mark.parametrize("source", SOURCES)
def test_every_source_filtered_and_mapped_round_trips_on_a_cluster(client, tmp_path, source):
    ddf = make_ddf(source, SIZES, tmp_path)
    ddf = ddf[ddf.score != 3.0].map_partitions(_add_double)
    out = tmp_path / "out"
    bag = ddf.imgsink.to_webdataset(str(out), key_column="key", text_column="caption",
                                    label_column="label", images_per_tar=8)
    assert isinstance(bag, WriteBag) and not out.exists()  # lazy: nothing written yet
    tasks = bag.compute()
    rows = _expected_rows(SIZES)

    assert all(isinstance(t, FileGroupTask) for t in tasks)
    assert sum(t.metadata["num_images"] for t in tasks) == len(rows)
    assert all({"num_images", "bytes", "partition"} <= set(t.metadata) for t in tasks)

    data = read_dataset(out)
    assert [key for key, _ in data["samples"]] == [f"img{i:05d}" for i in rows]
    ext = "png" if source == "read_parquet" else "jpg"  # encoded bytes pass through unchanged
    for (key, members), i in zip(data["samples"], rows):
        assert set(members) == {ext, "txt", "cls", "json"}
        assert members["txt"].decode() == f"caption number {i}"
        assert members["cls"] == str(i % 4).encode()
        meta = json.loads(members["json"])
        assert meta["double_score"] == 2 * float(i % 10) and meta["caption"] == f"caption number {i}"
        pixels = decode(members[ext])
        if ext == "png":
            np.testing.assert_array_equal(pixels, make_image(i))
        else:
            assert psnr(pixels, make_image(i)) > 40

    # Parquet: offset/size point at the exact image bytes in the tar
    for name, table in zip(data["shards"], data["tables"]):
        raw = (out / name).read_bytes()
        samples = dict(data["samples"])
        for row in table.to_pylist():
            assert raw[row["offset"]: row["offset"] + row["size"]] == samples[row["key"]][ext]
            assert row["tar_file"] == name and row["member"] == f"{row['key']}.{ext}"
            assert (row["width"], row["height"], row["channels"]) == (64, 48, 3)

    # dask reads every shard's Parquet together (one schema)
    back = dd.read_parquet(str(out)).compute()
    assert back["key"].tolist() == [f"img{i:05d}" for i in rows]
    assert {"double_score", "caption", "score", "label"} <= set(back.columns)

    # webdataset, the training loader, reads every sample
    urls = [str(out / name) for name in data["shards"]]
    loaded = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in loaded] == [f"img{i:05d}" for i in rows]
    assert all(ext in s and "txt" in s for s in loaded)


@pytest.mark.parametrize("image_format", ["png", "webp"])
def test_png_is_exact_and_webp_is_close(client, tmp_path, image_format):
    ddf = make_ddf("from_pandas", [6, 4], tmp_path)
    ddf.imgsink.to_webdataset(str(tmp_path / "out"), key_column="key", image_format=image_format,
                              images_per_tar=4, compute=True)
    samples = read_dataset(tmp_path / "out")["samples"]
    assert len(samples) == 10
    for i, (_, members) in enumerate(samples):
        pixels = decode(members[image_format])
        if image_format == "png":
            np.testing.assert_array_equal(pixels, make_image(i))
        else:
            assert psnr(pixels, make_image(i)) > 35


@pytest.mark.parametrize("packing", ["exact", "per_partition"])
def test_reruns_give_identical_names_and_bytes(client, tmp_path, packing):
    for name in ("a", "b"):
        ddf = make_ddf("from_map", SIZES, tmp_path)
        ddf.imgsink.to_webdataset(str(tmp_path / name), key_column="key", text_column="caption",
                                  images_per_tar=4, packing=packing, compute=True)
    first, second = file_bytes(tmp_path / "a"), file_bytes(tmp_path / "b")
    assert list(first) == list(second) and len(first) > 4
    assert first == second


def test_generated_keys_are_unique_and_deterministic(tmp_path):
    runs = []
    for name in ("a", "b"):
        ddf = make_ddf("from_pandas", [5, 0, 7], tmp_path).drop(columns="key")
        ddf.imgsink.to_webdataset(str(tmp_path / name), images_per_tar=5, compute=True)
        runs.append([k for k, _ in read_dataset(tmp_path / name)["samples"]])
    assert runs[0] == runs[1] and len(set(runs[0])) == 12
    assert all("." not in k and "/" not in k for k in runs[0])


def test_without_a_client_it_runs_on_threads_in_this_process(tmp_path):
    bag = make_ddf("from_pandas", [3], tmp_path).imgsink.to_webdataset(str(tmp_path / "out"), key_column="key")
    assert dask.base.get_scheduler(collections=[bag]) is dask_imgsink.job.bag.local_get  # dask.threaded.get, tracked
    # A script without an `if __name__ == "__main__"` guard: the multiprocessing
    # scheduler a plain Bag defaults to would fail to start its workers here.
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path.parent)!r})
        sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parent)!r})
        import dask, threading
        from helpers import make_ddf
        import dask_imgsink
        ddf = make_ddf("from_pandas", [4, 4], __import__("pathlib").Path({str(tmp_path)!r}))
        tasks = ddf.imgsink.to_webdataset({str(tmp_path / 'script-out')!r}, key_column="key", images_per_tar=3).compute()
        print(sum(t.metadata["num_images"] for t in tasks))
    """))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "8"


def test_string_image_column_raises_the_convert_string_explanation(tmp_path):
    ddf = dd.from_pandas(make_frame(4), npartitions=2)  # default config: object -> string
    with pytest.raises(TypeError) as info:
        ddf.imgsink.to_webdataset(str(tmp_path / "out"))
    message = str(info.value)
    assert "dataframe.convert-string" in message and "map_partitions" in message
    assert not (tmp_path / "out").exists()


def test_arrow_binary_image_column_is_accepted(tmp_path):
    pdf = make_frame(6, images="arrow-binary")
    ddf = dd.from_pandas(pdf, npartitions=2)
    assert isinstance(ddf.dtypes["image"], pd.ArrowDtype)
    ddf.imgsink.to_webdataset(str(tmp_path / "out"), key_column="key", compute=True)
    samples = read_dataset(tmp_path / "out")["samples"]
    assert [m["png"] for _, m in samples] == list(pdf["image"])


def test_module_function_and_accessor_are_the_same_job(tmp_path):
    ddf = make_ddf("from_pandas", [4], tmp_path)
    dask_imgsink.to_webdataset(ddf, str(tmp_path / "a"), key_column="key", compute=True)
    ddf.imgsink.to_webdataset(str(tmp_path / "b"), key_column="key", compute=True)
    assert file_bytes(tmp_path / "a") == file_bytes(tmp_path / "b")


def test_bad_key_error_names_partition_and_key_through_the_cluster(client, tmp_path):
    pdf = make_frame(9)
    pdf.loc[7, "key"] = "bad.key"
    with dask.config.set({"dataframe.convert-string": False}):
        ddf = dd.from_pandas(pdf, npartitions=3, sort=False)
    with pytest.raises(BadRowError) as info:
        ddf.imgsink.to_webdataset(str(tmp_path / "out"), key_column="key", compute=True)
    assert info.value.partition == 2 and info.value.key == "bad.key" and info.value.row == 1
    assert "partition 2" in str(info.value) and "'bad.key'" in str(info.value)


def test_unknown_columns_and_options_are_rejected_up_front(tmp_path):
    ddf = make_ddf("from_pandas", [2], tmp_path)
    with pytest.raises(ValueError, match="key_column='key'"):
        ddf.imgsink.to_webdataset(str(tmp_path / "o"))  # a 'key' column that is not the key column
    with pytest.raises(ValueError, match="text_column='nope'"):
        ddf.imgsink.to_webdataset(str(tmp_path / "o"), text_column="nope")
    with pytest.raises(ValueError, match="packing='dense'"):
        ddf.imgsink.to_webdataset(str(tmp_path / "o"), key_column="key", packing="dense")
    with pytest.raises(ValueError, match="clash"):
        ddf.assign(width=1).imgsink.to_webdataset(str(tmp_path / "o"), key_column="key")
    with pytest.raises(ValueError, match="name_prefix"):
        ddf.imgsink.to_webdataset(str(tmp_path / "o"), key_column="key", name_prefix="a.b")


@pytest.mark.parametrize("npartitions", [1, 3])
def test_object_metadata_that_is_not_text_needs_a_schema(tmp_path, npartitions):
    """Lists in an object column do not fit its default type (string). A row names the fix; under
    on_error="skip" the job fails rather than leave out every row, whatever the partitions (the
    middle partition of 3 holds only a null)."""
    pdf = make_frame(3)
    pdf["tags"] = pd.Series([["a", "b"], None, ["c"]], dtype=object)
    with dask.config.set({"dataframe.convert-string": False}):
        ddf = dd.from_pandas(pdf, npartitions=npartitions, sort=False)
    with pytest.raises(BadRowError, match="metadata_schema") as info:
        ddf.imgsink.to_webdataset(str(tmp_path / "a"), key_column="key", compute=True)
    assert info.value.column == "tags"
    with pytest.raises(TypeError, match="'tags': none of its 2 values fits Arrow type string .the first: .*metadata_schema"):
        ddf.imgsink.to_webdataset(str(tmp_path / "a"), key_column="key", on_error="skip", compute=True)
    assert not list((tmp_path / "a").iterdir())
    ddf.imgsink.to_webdataset(str(tmp_path / "b"), key_column="key", compute=True,
                              metadata_schema={"tags": pa.list_(pa.string())})
    table = read_dataset(tmp_path / "b")["tables"][0]
    assert table.column("tags").to_pylist() == [["a", "b"], None, ["c"]]


@pytest.mark.parametrize("packing", ["exact", "per_partition"])
def test_a_value_that_does_not_fit_is_a_bad_row_wherever_the_partitions_split(tmp_path, packing):
    """A partition whose only value does not fit cannot tell a wrong value from a wrong type:
    the job judges the column over every partition, so the same rows are skipped either way."""
    pdf = make_frame(4)
    pdf["tag"] = pd.Series(["a", "b", 5, "c"], dtype=object)
    with dask.config.set({"dataframe.convert-string": False}):
        for npartitions in (1, 4):
            out = tmp_path / f"{npartitions}"
            dd.from_pandas(pdf, npartitions=npartitions, sort=False).imgsink.to_webdataset(
                str(out), key_column="key", on_error="skip", packing=packing, compute=True)
            errors = pd.read_json(out / "_errors.jsonl", lines=True)
            assert list(errors.key) == ["img00002"] and list(errors.column) == ["tag"]
            assert [k for k, _ in read_dataset(out)["samples"]] == ["img00000", "img00001", "img00003"]


def test_progress_bar_shows_the_write_tasks(tmp_path, capsys):
    from dask.diagnostics import ProgressBar

    bag = make_ddf("from_pandas", [3, 3], tmp_path).imgsink.to_webdataset(str(tmp_path / "out"), key_column="key")
    with ProgressBar(out=sys.stdout):
        bag.compute()
    assert "100%" in capsys.readouterr().out
