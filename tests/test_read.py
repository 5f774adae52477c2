"""read_webdataset: the dataset back as a Dask DataFrame, bytes exact, metadata typed, only the needed bytes read."""

from __future__ import annotations

import tarfile

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem
from helpers import S3Requests, make_frame
from PIL import Image

import dask_imgsink
from dask_imgsink import CorruptSampleError, read_webdataset


def written(tmp_path, n=40, per_tar=8, npartitions=3, **kwargs):
    """Write ``n`` rows (with list and timestamp metadata) and return the dataset's path."""
    frame = make_frame(n)
    frame["tags"] = [["a", "b"][: i % 3] for i in range(n)]
    frame["taken"] = pd.Timestamp("2024-01-01", tz="UTC") + pd.to_timedelta(np.arange(n), unit="h")
    frame["maybe"] = pd.array([i if i % 5 else None for i in range(n)], dtype="Int64")
    with dask.config.set({"dataframe.convert-string": False}):
        ddf = dd.from_pandas(frame, npartitions=npartitions, sort=False)
    out = str(tmp_path / "a")
    ddf.imgsink.to_webdataset(out, key_column="key", text_column="caption", images_per_tar=per_tar,
                              metadata_schema={"tags": pa.list_(pa.string())}, compute=True, **kwargs)
    return out


def tar_members(out: str) -> dict[str, bytes]:
    """Every ``.jpg`` member of the dataset's tars, by key, read with the standard library."""
    import glob

    members = {}
    for path in sorted(glob.glob(f"{out}/*.tar")):
        with tarfile.open(path) as tar:
            for info in tar.getmembers():
                if info.name.endswith(".jpg"):
                    members[info.name[:-4]] = tar.extractfile(info).read()
    return members


def test_round_trip_on_a_cluster_gives_the_written_bytes_and_typed_metadata(client, tmp_path):
    out = written(tmp_path)
    ddf = read_webdataset(out)
    assert ddf.npartitions == 5 and ddf.divisions == (0, 8, 16, 24, 32, 39)
    frame = ddf.compute()
    assert list(frame.index) == list(range(40)) and frame.index.name == "sample"
    assert list(frame["key"]) == [f"img{i:05d}" for i in range(40)]
    members = tar_members(out)
    assert {k: bytes(v) for k, v in zip(frame["key"], frame["image"])} == members
    assert frame["image"].dtype == pd.ArrowDtype(pa.large_binary())
    dtypes = frame.dtypes
    assert dtypes["score"] == np.float64 and dtypes["width"] == np.int32 and dtypes["offset"] == np.int64
    assert dtypes["caption"] == pd.StringDtype("pyarrow")
    assert dtypes["label"] == pd.ArrowDtype(pa.int64())
    assert dtypes["tags"] == pd.ArrowDtype(pa.list_(pa.string()))
    assert pa.types.is_timestamp(dtypes["taken"].pyarrow_dtype) and dtypes["taken"].pyarrow_dtype.tz == "UTC"
    assert frame["maybe"].isna().sum() == 8 and frame["maybe"].dtype == pd.ArrowDtype(pa.int64())
    assert frame["tags"].iloc[2] == ["a", "b"]
    # every partition agrees with the meta Dask was promised
    assert (ddf._meta.dtypes == dtypes).all()


def test_decode_gives_the_pixels_of_each_image(tmp_path):
    out = written(tmp_path, n=10)
    frame = read_webdataset(out, decode=True, columns=["key", "image"]).compute(scheduler="sync")
    members = tar_members(out)
    for key, pixels in zip(frame["key"], frame["image"]):
        expected = np.asarray(Image.open(__import__("io").BytesIO(members[key])).convert("RGB"))
        assert pixels.dtype == np.uint8 and np.array_equal(pixels, expected)


class CountingFileSystem(LocalFileSystem):
    """The local filesystem, counting the files it opens (to prove which files a read touches)."""

    protocol = "countingfs"
    opened: list[str] = []

    def _open(self, path, *args, **kwargs):
        CountingFileSystem.opened.append(str(path))
        return super()._open(path, *args, **kwargs)


@pytest.fixture
def counting_fs():
    import fsspec

    fsspec.register_implementation("countingfs", CountingFileSystem, clobber=True)
    CountingFileSystem.opened = []
    yield CountingFileSystem.opened


@pytest.mark.parametrize("how", ["images=False", "columns=", "projection after the call", "filters"])
def test_a_metadata_query_never_opens_a_tar(tmp_path, counting_fs, how):
    out = written(tmp_path)
    url = f"countingfs://{out}"
    if how == "images=False":
        ddf = read_webdataset(url, images=False)
    elif how == "columns=":
        ddf = read_webdataset(url, columns=["key", "score"])
    elif how == "filters":
        ddf = read_webdataset(url, columns=["key"], filters=[("score", ">=", 8)])
    else:
        ddf = read_webdataset(url)[["key", "score"]]
    frame = ddf.compute(scheduler="sync")
    assert len(frame) == (8 if how == "filters" else 40)
    assert any(p.endswith(".parquet") for p in counting_fs)
    assert not any(p.endswith(".tar") for p in counting_fs), counting_fs
    assert "image" not in frame.columns


def test_filters_are_applied_before_images_are_read_and_keep_the_sample_positions(tmp_path, counting_fs):
    out = written(tmp_path)
    frame = read_webdataset(f"countingfs://{out}", filters=[("score", "==", 3)],
                            columns=["key", "image"]).compute(scheduler="sync")
    assert list(frame["key"]) == ["img00003", "img00013", "img00023", "img00033"]
    assert list(frame.index) == [3, 13, 23, 33]
    assert sum(p.endswith(".tar") for p in counting_fs) == 4  # one open per shard holding a match
    assert frame["image"].map(len).gt(0).all()


def test_filters_as_an_arrow_expression_or_in_dnf_and_bad_ones_refused_at_call_time(tmp_path):
    import pyarrow.compute as pc

    out = written(tmp_path)
    by_expression = read_webdataset(out, filters=pc.field("score") == 3, columns=["key"]).compute(scheduler="sync")
    by_dnf = read_webdataset(out, filters=[("score", "==", 3)], columns=["key"]).compute(scheduler="sync")
    assert list(by_expression["key"]) == list(by_dnf["key"]) == ["img00003", "img00013", "img00023", "img00033"]
    assert len(read_webdataset(out, filters=[], columns=["key"]).compute(scheduler="sync")) == 40  # no condition
    with pytest.raises(ValueError, match=r"filters name column\(s\) \['scroe'\] the dataset does not have"):
        read_webdataset(out, filters=[("scroe", ">", 3)])
    with pytest.raises(ValueError, match="not pyarrow's DNF form"):
        read_webdataset(out, filters=[("score", ">")])


def test_verify_names_the_shard_and_key_of_a_damaged_sample(tmp_path):
    out = written(tmp_path, n=16)
    frame = read_webdataset(out, images=False).compute(scheduler="sync")
    row = frame.iloc[11]
    with open(f"{out}/{row['tar_file']}", "r+b") as f:  # flip one byte in the middle of an image
        f.seek(row["offset"] + row["size"] // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert len(read_webdataset(out).compute(scheduler="sync")) == 16  # without verify, read as it is
    with pytest.raises(CorruptSampleError, match=rf"{row['tar_file']}: sample '{row['key']}'.*dask-imgsink verify"):
        read_webdataset(out, verify=True).compute(scheduler="sync")


def test_unknown_columns_and_missing_datasets_are_clear_errors(tmp_path):
    out = written(tmp_path, n=4)
    with pytest.raises(ValueError, match=r"\['nope'\] are not in the dataset"):
        read_webdataset(out, columns=["key", "nope"])
    with pytest.raises(ValueError, match="pass images=True"):
        read_webdataset(out, columns=["image"], images=False)
    with pytest.raises(FileNotFoundError, match="no _index.json"):
        read_webdataset(str(tmp_path))


def test_an_empty_dataset_reads_as_an_empty_frame(tmp_path):
    with dask.config.set({"dataframe.convert-string": False}):
        empty = dd.from_pandas(make_frame(4).iloc[:0], npartitions=1)
    out = str(tmp_path / "empty")
    empty.imgsink.to_webdataset(out, key_column="key", compute=True)
    frame = read_webdataset(out).compute(scheduler="sync")
    assert len(frame) == 0 and "image" in frame.columns and "key" in frame.columns


def test_re_sharding_keeps_bytes_keys_order_and_types(client, tmp_path):
    out = written(tmp_path)
    source = read_webdataset(out)
    kept = source[source.score >= 2]
    resharded = str(tmp_path / "b")
    tasks = kept.imgsink.to_webdataset(resharded, text_column="caption", images_per_tar=7, compute=True)
    assert [t.metadata["num_images"] for t in tasks] == [7, 7, 7, 7, 4]
    assert dask_imgsink.verify_dataset(resharded).ok
    before = source.compute()
    before = before[before.score >= 2]
    after = read_webdataset(resharded).compute()
    assert list(after["key"]) == list(before["key"])
    assert [bytes(b) for b in after["image"]] == [bytes(b) for b in before["image"]]  # passed through
    # the samples are the same bytes (headers, .txt and .json too), so their checksums are the same
    assert list(after["sample_xxh3_64"]) == list(before["sample_xxh3_64"])
    user = ["caption", "score", "label", "tags", "taken", "maybe"]
    assert after[user].dtypes.equals(before[user].dtypes)
    pd.testing.assert_frame_equal(after[user].reset_index(drop=True), before[user].reset_index(drop=True))
    # and the same Arrow types in the Parquet: the copy and its source take each other's appends
    assert pq.read_schema(f"{resharded}/metadata/shard-000000.parquet").remove_metadata() == \
        pq.read_schema(f"{out}/metadata/shard-000000.parquet").remove_metadata()


@pytest.mark.parametrize("dtype", [object, "str", "string[pyarrow]", "string[python]", pd.ArrowDtype(pa.string())])
def test_pandas_strings_of_any_storage_are_written_as_arrow_strings(dtype, tmp_path):
    """pandas gives text columns one dtype or another depending on how a frame was built (pandas 3's
    ``str`` is Arrow-backed, and Arrow would give it as large_string): all are the same text."""
    frame = make_frame(4)
    frame["tag"] = pd.Series(["a", None, "b", "c"], dtype=dtype)
    with dask.config.set({"dataframe.convert-string": False}):
        ddf = dd.from_pandas(frame, npartitions=2, sort=False)
    ddf.imgsink.to_webdataset(str(tmp_path / "out"), key_column="key", compute=True)
    assert pq.read_schema(tmp_path / "out" / "metadata" / "shard-000000.parquet").field("tag").type == pa.string()


def test_an_append_takes_the_datasets_offset_width_for_the_same_values(tmp_path):
    """A dataset whose text columns are large_string (written from pd.ArrowDtype(pa.large_string()), or by
    releases that wrote pandas' Arrow-backed strings so) takes appends of plain string columns, in its types."""
    out = str(tmp_path / "out")
    first = make_frame(4)
    first["tag"] = pd.Series(list("abcd"), dtype=pd.ArrowDtype(pa.large_string()))
    then = make_frame(4, start=4)
    then["tag"] = pd.Series(list("efgh"), dtype="string[pyarrow]")
    with dask.config.set({"dataframe.convert-string": False}):
        dd.from_pandas(first, npartitions=1).imgsink.to_webdataset(out, key_column="key", compute=True)
        dd.from_pandas(then, npartitions=1).imgsink.to_webdataset(out, key_column="key", mode="append",
                                                                  compute=True)
    schemas = {pq.read_schema(p).field("tag").type for p in (tmp_path / "out" / "metadata").iterdir()}
    assert schemas == {pa.large_string()}
    assert list(read_webdataset(out, images=False).compute().tag) == list("abcdefgh")
    assert dask_imgsink.verify_dataset(out).ok


def test_s3_reads_move_only_the_needed_bytes_as_range_requests(s3, tmp_path):
    prefix, options, fs = s3
    frame = make_frame(40)
    with dask.config.set({"dataframe.convert-string": False}):
        ddf = dd.from_pandas(frame, npartitions=2, sort=False)
    out = f"{prefix}/ds"
    ddf.imgsink.to_webdataset(out, key_column="key", images_per_tar=10, storage_options=options, compute=True)
    tar_bytes = sum(fs.size(p) for p in fs.glob(f"{out}/*.tar"))

    with S3Requests(options) as requests:
        meta = read_webdataset(out, images=False, storage_options=options).compute(scheduler="sync")
    assert len(meta) == 40 and not [url for url, _ in requests.gets if url.endswith(".tar")]

    with S3Requests(options) as requests:
        full = read_webdataset(out, columns=["key", "image"], storage_options=options).compute(scheduler="sync")
    tar_gets = [(url, rng) for url, rng in requests.gets if url.endswith(".tar")]
    assert tar_gets and all(rng and rng.startswith("bytes=") for _, rng in tar_gets)
    fetched = sum(_range_length(rng) for _, rng in tar_gets)
    assert full["image"].map(len).sum() <= fetched <= tar_bytes

    with S3Requests(options) as requests:
        one = read_webdataset(out, filters=[("key", "==", "img00017")], storage_options=options,
                              columns=["image"]).compute(scheduler="sync")
    tar_gets = [rng for url, rng in requests.gets if url.endswith(".tar")]
    assert len(one) == 1 and len(tar_gets) == 1 and _range_length(tar_gets[0]) == len(one["image"].iloc[0])


def _range_length(header: str) -> int:
    start, end = header.removeprefix("bytes=").split("-")
    return int(end) - int(start) + 1
