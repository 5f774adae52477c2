"""Every input is written exactly as its value says, or refused with an error that names its row.

The bad-input matrix runs through the stage and the accessor (threads and a
LocalCluster), under ``on_error="raise"`` (each case alone: the error names the
partition, row, key and column) and ``"skip"`` (all cases in one job: each is
recorded, the rest is written, and rows in = written + skipped).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import decode, make_image, png_bytes, read_dataset
from PIL import Image

import dask_imgsink  # noqa: F401
from dask_imgsink import BadRowError, ImageBatch, ImageObject, ImageWriterStage
from dask_imgsink.core.encode import EncodeOptions, encode_image


def _jpeg(arr: np.ndarray) -> bytes:
    return encode_image(arr, EncodeOptions()).data


def _webp(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="WEBP", quality=80)
    return buf.getvalue()


def _recursive_dict() -> dict:
    value: dict = {"path": None}
    value["bytes"] = value
    return value


def _pil(mode: str, array: np.ndarray) -> Image.Image:
    return Image.fromarray(array, mode=mode) if mode != "I" else Image.fromarray(array.astype(np.int32), "I")


GOOD = make_image(1, 8, 8)

#: name -> (column, value, what the error must say). ``column`` is the column whose value is bad.
BAD = {
    "jpeg cut to 70%": ("image", _jpeg(make_image(2))[: int(len(_jpeg(make_image(2))) * 0.7)], "truncated"),
    "png cut in half": ("image", png_bytes(make_image(3))[: len(png_bytes(make_image(3))) // 2], "truncated"),
    "webp cut short": ("image", _webp(make_image(4))[:-30], "truncated"),
    "gif bytes": ("image", b"GIF89a" + bytes(40), "not a JPEG, PNG or WebP"),
    "none image": ("image", None, "missing"),
    "nan image": ("image", float("nan"), "missing"),
    "text image": ("image", "[[1, 2], [3, 4]]", "convert-string"),
    "int image": ("image", 12, "type int"),
    "zero-size float": ("image", np.zeros((0, 5, 3), np.float32), "empty"),
    "zero-size uint8": ("image", np.zeros((4, 0), np.uint8), "empty"),
    "float above 1": ("image", np.full((4, 4), 2.0), r"\[0, 1\]"),
    "float nan": ("image", np.full((4, 4), np.nan, np.float32), "NaN"),
    "int64 in byte range": ("image", make_image(5, 8, 8).astype(np.int64), "no declared image range"),
    "int8": ("image", np.zeros((4, 4), np.int8), "no declared image range"),
    "pil mode I": ("image", _pil("I", np.full((4, 4), 1020)), "no declared image range"),
    "chw array": ("image", np.zeros((3, 8, 8), np.uint8), "shaped"),
    "rgba into jpeg": ("image", np.zeros((4, 4, 4), np.uint8), "alpha"),
    "jpeg wider than 65500": ("image", np.zeros((1, 65501), np.uint8), "at most 65500"),
    "more than max_pixels": ("image", np.zeros((300, 300), np.uint8), "max_pixels"),
    "dict holding itself": ("image", _recursive_dict(), "'bytes' holds a dict"),
    "dict without bytes or path": ("image", {"bytes": None, "path": None}, "neither"),
    "dict with unreadable path": ("image", {"bytes": None, "path": "/nonexistent/x.jpg"}, "cannot be read"),
    "key with a dot": ("key", "a.b", "forbidden character '.'"),
    "key with a slash": ("key", "x/y", "forbidden character '/'"),
    "key with a space (DALI index)": ("key", "a b", "space, which DALI's index cannot"),
    "empty key": ("key", "", "empty"),
    "missing key": ("key", None, "missing"),
    "non-ascii key": ("key", "caf\u00e9", "not ASCII"),
    "overlong key": ("key", "k" * 200, "bytes long"),
    "text bytes not utf-8": ("caption", b"caf\xe9", "not UTF-8"),
    "text not a string": ("caption", 5, "must be a str"),
    "text with a lone surrogate": ("caption", "caf\udce9", "UTF-8"),
    "label a word": ("label", "cat", "integer class id"),
    "label a fraction": ("label", 2.5, "integer class id"),
    "label beyond int64": ("label", 2**63, "outside the 64-bit signed integers"),
    "label a huge float": ("label", 1e20, "outside the 64-bit signed integers"),
    "metadata not fitting its type": ("score", "high", "does not fit"),
}

MAX_PIXELS = 70_000  # every good image here is 8x8; "more than max_pixels" is 300x300


def _row(i: int, key: str) -> dict:
    return {"key": key, "image": make_image(i, 8, 8), "caption": f"caption {i}", "label": i % 3, "score": i / 2}


def _frame_with(cases: list[str], good_before: int = 2) -> tuple[pd.DataFrame, dict[str, int]]:
    """Good rows, then one row per case (its bad value in its column); returns the row of each case."""
    rows = [_row(i, f"good{i:03d}") for i in range(good_before)]
    where = {}
    for n, case in enumerate(cases):
        column, value, _ = BAD[case]
        row = _row(100 + n, f"case{n:03d}")
        row[column] = value
        where[case] = len(rows)
        rows.append(row)
    rows.append(_row(999, "good999"))
    # object columns from the start: pandas would store text as Arrow strings, which refuse a lone surrogate
    frame = pd.DataFrame({c: pd.Series([r[c] for r in rows], dtype=object) for c in rows[0]})
    return frame, where


def _part(bounds: tuple[int, int], frame: pd.DataFrame) -> pd.DataFrame:
    return frame.iloc[bounds[0]:bounds[1]].reset_index(drop=True)


def _ddf(frame: pd.DataFrame, npartitions: int = 1) -> dd.DataFrame:
    """Partitions cut from ``frame`` as they are (``from_pandas`` converts strings with pyarrow,
    which refuses a lone surrogate before our writer could)."""
    edges = np.linspace(0, len(frame), npartitions + 1).astype(int)
    with dask.config.set({"dataframe.convert-string": False}):
        return dd.from_map(_part, list(zip(edges[:-1], edges[1:])), frame=frame, meta=frame.iloc[:0],
                           enforce_metadata=False)


WRITE = dict(key_column="key", text_column="caption", label_column="label", max_pixels=MAX_PIXELS,
             metadata_columns=["score"], metadata_schema={"score": pa.float64()}, images_per_tar=4)


@pytest.mark.parametrize("case", sorted(BAD))
def test_the_accessor_refuses_each_bad_value_naming_its_row(case, tmp_path):
    frame, where = _frame_with([case])
    column, _, message = BAD[case]
    with pytest.raises(BadRowError, match=message) as caught:
        _ddf(frame).imgsink.to_webdataset(str(tmp_path / "out"), compute=True, **WRITE)
    err = caught.value
    assert (err.partition, err.row, err.column) == (0, where[case], column)
    assert err.key == (frame.key[where[case]] if column != "key" else str(frame.key[where[case]]))
    assert err.fix  # every refusal says how to fix it
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def _check_skipped(out, frame: pd.DataFrame, where: dict[str, int], partitions: dict[int, tuple[int, int]]):
    """Rows in = written + skipped; ``_errors.jsonl`` lists each skipped row with its column and reason."""
    data = read_dataset(out)
    errors = pd.read_json(out / "_errors.jsonl", lines=True, dtype={"key": str})
    assert data["index"]["totals"]["rows"] == len(frame)
    assert data["index"]["totals"]["images"] + data["index"]["totals"]["skipped"] == len(frame)
    assert len(errors) == len(where) == data["index"]["totals"]["skipped"]
    by_place = {(r.partition, r.row): r for r in errors.itertuples()}
    for case, row in where.items():
        column, _, message = BAD[case]
        record = by_place[partitions[row]]
        assert record.column == column, case
        assert pd.Series([record.reason]).str.contains(message).all(), (case, record.reason)
    written = [k for k, _ in data["samples"]]
    assert written == [k for i, k in enumerate(frame.key) if i not in set(where.values())]


def test_the_accessor_skips_and_records_every_bad_value_on_threads(tmp_path):
    frame, where = _frame_with(sorted(BAD))
    out = tmp_path / "out"
    _ddf(frame).imgsink.to_webdataset(str(out), on_error="skip", compute=True, **WRITE)
    _check_skipped(out, frame, where, {i: (0, i) for i in range(len(frame))})


def test_the_accessor_skips_and_records_every_bad_value_on_a_cluster(tmp_path, client):
    frame, where = _frame_with(sorted(BAD))
    out = tmp_path / "out"
    ddf = _ddf(frame, npartitions=4)
    sizes = [len(p) for p in ddf.to_delayed() for p in [p.compute()]]
    partitions, row = {}, 0
    for p, size in enumerate(sizes):
        for r in range(size):
            partitions[row] = (p, r)
            row += 1
    client.compute(ddf.imgsink.to_webdataset(str(out), on_error="skip", **WRITE)).result(timeout=120)
    _check_skipped(out, frame, where, partitions)


@pytest.mark.parametrize("case", ["dict holding itself", "zero-size float", "jpeg wider than 65500",
                                  "metadata not fitting its type", "text bytes not utf-8"])
def test_the_accessor_refuses_on_a_cluster_with_the_row_named(case, tmp_path, client):
    """These once escaped as bare errors (or a hang, for the dict holding itself) on a cluster."""
    frame, where = _frame_with([case])
    bag = _ddf(frame).imgsink.to_webdataset(str(tmp_path / "out"), **WRITE)
    with pytest.raises(BadRowError, match=BAD[case][2]) as caught:
        client.compute(bag).result(timeout=120)
    assert (caught.value.row, caught.value.column) == (where[case], BAD[case][0])


STAGE_CASES = sorted(c for c in BAD if BAD[c][0] == "image")


def _batch(frame: pd.DataFrame, task_id: str = "batch") -> ImageBatch:
    return ImageBatch(task_id=task_id, data=[
        ImageObject(image_path=f"/src/{k}.jpg", image_id=str(k), image_data=img, metadata={"score": 1.0})
        for k, img in zip(frame.key, frame.image)])


@pytest.mark.parametrize("case", STAGE_CASES)
def test_the_stage_refuses_each_bad_image_naming_its_row(case, tmp_path):
    frame, where = _frame_with([case])
    stage = ImageWriterStage(str(tmp_path / "out"), images_per_tar=4,
                             encode_options=EncodeOptions(max_pixels=MAX_PIXELS))
    with pytest.raises(BadRowError, match=BAD[case][2]) as caught:
        stage.process(_batch(frame))
    assert (caught.value.row, caught.value.column) == (where[case], "image_data")
    assert [p.name for p in (tmp_path / "out").iterdir()] == []


def test_the_stage_skips_and_records_every_bad_image(tmp_path):
    frame, where = _frame_with(STAGE_CASES)
    stage = ImageWriterStage(str(tmp_path / "out"), images_per_tar=4, on_error="skip",
                             encode_options=EncodeOptions(max_pixels=MAX_PIXELS))
    result = stage.process(_batch(frame))
    assert result.metadata["num_images"] + result.metadata["num_skipped"] == len(frame)
    assert sorted(r["row"] for r in result.metadata["skipped_rows"]) == sorted(where.values())
    assert all(r["column"] == "image_data" for r in result.metadata["skipped_rows"])
    written = pd.concat([pq.read_table(p).to_pandas() for p in result.data if p.endswith(".parquet")])
    assert list(written.key) == [k for i, k in enumerate(frame.key) if i not in set(where.values())]


# ----------------------------------------------------------------------------- written exactly


def _written_pixels(value, image_format: str = "png") -> np.ndarray:
    return decode(encode_image(value, EncodeOptions(image_format=image_format)).data)


def test_big_endian_uint16_means_what_its_values_say():
    native = np.arange(256, dtype=np.uint16).reshape(16, 16)
    big = native.astype(">u2")
    assert big.tobytes() != native.tobytes()
    np.testing.assert_array_equal(_written_pixels(big), _written_pixels(native))
    full = (np.arange(256, dtype=np.uint32) * 257).astype(np.uint16).reshape(16, 16)
    np.testing.assert_array_equal(_written_pixels(full.astype(">u2")), np.arange(256).reshape(16, 16))


def test_values_are_scaled_by_the_dtype_range_not_by_what_they_hold():
    dim = np.full((4, 4), 255, np.uint16)  # 255 of 65535: nearly black, never stretched to white
    assert _written_pixels(dim).max() == 1
    assert _written_pixels(np.full((4, 4), 0.5, np.float16)).max() == 128
    np.testing.assert_array_equal(_written_pixels(np.eye(4, dtype=bool)), np.eye(4, dtype=np.uint8) * 255)


def test_pil_modes_are_read_in_their_own_range():
    values = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000
    big_endian = Image.frombytes("I;16B", (8, 8), values.astype(">u2").tobytes())
    np.testing.assert_array_equal(_written_pixels(big_endian), _written_pixels(values))
    np.testing.assert_array_equal(_written_pixels(Image.fromarray(np.full((4, 4), 0.25, np.float32), "F")),
                                  np.full((4, 4), 64))
    palette = Image.fromarray(make_image(3, 8, 8)).convert("P")
    np.testing.assert_array_equal(_written_pixels(palette), np.asarray(palette.convert("RGB")))
    cmyk = Image.fromarray(make_image(4, 8, 8)).convert("CMYK")
    np.testing.assert_array_equal(_written_pixels(cmyk), np.asarray(cmyk.convert("RGB")))


def test_strided_and_fortran_order_arrays_are_written_exactly():
    base = make_image(6, 16, 16)
    np.testing.assert_array_equal(_written_pixels(base[::2, ::2]), base[::2, ::2])
    np.testing.assert_array_equal(_written_pixels(np.asfortranarray(base)), base)


def test_encoded_bytes_with_trailing_padding_pass_through_unchanged():
    data = _jpeg(make_image(7)) + b"\x00\x00"
    assert encode_image(data, EncodeOptions()).data == data


def test_validate_decode_catches_damage_inside_the_data():
    data = bytearray(png_bytes(make_image(8, 64, 64)))
    start = data.index(b"IDAT") + 200
    data[start:start + 50] = bytes(50)  # compressed data zeroed; every chunk length still intact
    assert encode_image(bytes(data), EncodeOptions()).data == bytes(data)  # the structural check passes
    with pytest.raises(Exception, match="PNG bytes cannot be read"):
        encode_image(bytes(data), EncodeOptions(validate="decode"))


def test_webp_wider_than_its_limit_is_refused(tmp_path):
    frame = pd.DataFrame({"key": ["a", "b"], "image": pd.Series([GOOD, np.zeros((1, 16384), np.uint8)],
                                                                  dtype=object)})
    with pytest.raises(BadRowError, match="WEBP stores at most 16383") as caught:
        _ddf(frame).imgsink.to_webdataset(str(tmp_path / "out"), key_column="key", image_format="webp",
                                         compute=True)
    assert caught.value.row == 1


def test_text_bytes_are_decoded_as_utf8(tmp_path):
    frame = pd.DataFrame({"key": ["a"], "image": pd.Series([GOOD], dtype=object),
                          "caption": pd.Series([b"caf\xc3\xa9"], dtype=object)})
    out = tmp_path / "out"
    _ddf(frame).imgsink.to_webdataset(str(out), key_column="key", text_column="caption", metadata_columns=[],
                                     compute=True)
    (_, members), = read_dataset(out)["samples"]
    assert members["txt"] == "café".encode()


def test_hugging_face_image_structs_from_read_parquet_just_work(tmp_path):
    structs = pa.array([{"bytes": png_bytes(make_image(i, 8, 8)), "path": f"{i}.png"} for i in range(5)],
                       pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    source = tmp_path / "hf.parquet"
    pq.write_table(pa.table({"key": [f"k{i}" for i in range(5)], "image": structs}), source)
    ddf = dd.read_parquet(str(source), dtype_backend="pyarrow")
    assert str(ddf.image.dtype).startswith("struct<bytes: binary, path: string>")
    out = tmp_path / "out"
    ddf.imgsink.to_webdataset(str(out), key_column="key", compute=True)
    samples = read_dataset(out)["samples"]
    assert [members["png"] for _, members in samples] == [png_bytes(make_image(i, 8, 8)) for i in range(5)]


# ----------------------------------------------------------------------------- options, strictly


@pytest.mark.parametrize("name, value, error", [
    ("images_per_tar", 2.5, TypeError), ("images_per_tar", True, TypeError), ("images_per_tar", "10", TypeError),
    ("images_per_tar", 0, ValueError), ("quality", 92.5, TypeError), ("quality", True, TypeError),
    ("quality", "90", TypeError), ("quality", 101, ValueError), ("max_pixels", 1.5, TypeError),
    ("encode_threads", 1.0, TypeError), ("reencode", 1, TypeError), ("deterministic_name", "yes", TypeError),
    ("validate", "full", ValueError), ("unique_keys", "global", ValueError), ("dali_index", None, TypeError),
    ("packing", "EXACT", ValueError), ("compute", "true", TypeError), ("storage_options", "anon", TypeError),
])
def test_options_are_checked_strictly_at_call_time(name, value, error, tmp_path):
    ddf = _ddf(pd.DataFrame({"key": ["a"], "image": pd.Series([GOOD], dtype=object)}))
    with pytest.raises(error, match=name):
        ddf.imgsink.to_webdataset(str(tmp_path / "out"), key_column="key", **{name: value})


def _frame_of(columns: dict) -> pd.DataFrame:
    frame = pd.DataFrame({"key": ["a", "b"], "image": pd.Series([GOOD] * 2, dtype=object)})
    for name, values in columns.items():
        frame[name] = values
    return frame


def _interval_column() -> pd.Series:
    kind = pd.ArrowDtype(pa.month_day_nano_interval())
    return pd.Series(pa.array([pa.MonthDayNano([1, 2, 3]), None], type=kind.pyarrow_dtype), dtype=kind)


@pytest.mark.parametrize("frame, options, error, message", [
    (_frame_of({"a": [1, 2], "b": [3, 4]}).set_axis(["key", "image", "a", "a"], axis=1), {}, ValueError,
     r"more than one column named \['a'\]"),
    (_frame_of({0: [1, 2]}), {}, TypeError, r"column names \[0\] are not strings"),
    (_frame_of({"a": [1, 2]}), {"metadata_columns": ["a", "a"]}, ValueError, r"names \['a'\] more than once"),
    (_frame_of({"n": [1, 2]}), {"label_column": "key"}, ValueError, "key_column='key' is also the label_column"),
    (_frame_of({"n": [1, 2]}), {"text_column": "key"}, ValueError, "is also the text_column"),
    (_frame_of({"gap": _interval_column()}), {}, TypeError, "'gap' has Arrow type month_day_nano_interval, which "
                                                            "Parquet cannot store"),
    (_frame_of({"month": pd.period_range("2020-01", periods=2, freq="M")}), {}, TypeError,
     "'month' has the Arrow extension type"),
    (_frame_of({"span": pd.interval_range(0, 2)}), {}, TypeError, "'span' has the Arrow extension type"),
], ids=["duplicate column names", "a name not a string", "a metadata column twice", "label is the key",
        "text is the key", "a type Parquet cannot store", "a pandas Period", "a pandas Interval"])
def test_columns_the_job_cannot_write_as_given_are_refused_at_call_time(frame, options, error, message, tmp_path):
    """Each of these wrote an unreadable dataset, or failed mid-job with an error naming no column."""
    with pytest.raises(error, match=message):
        _ddf(frame).imgsink.to_webdataset(str(tmp_path / "out"), key_column="key", **options)
    assert not (tmp_path / "out").exists()


def test_a_column_the_job_does_not_write_may_have_any_name(tmp_path):
    frame = _frame_of({0: [1, 2], "n": [3, 4]})
    _ddf(frame).imgsink.to_webdataset(str(tmp_path / "out"), key_column="key", metadata_columns=["n"],
                                      compute=True)
    assert read_dataset(tmp_path / "out")["tables"][0].column("n").to_pylist() == [3, 4]


@pytest.mark.parametrize("name, value", [("images_per_tar", 2.5), ("images_per_tar", "10"), ("verbose", 1),
                                         ("on_error", "ignore")])
def test_stage_options_are_checked_strictly(name, value, tmp_path):
    with pytest.raises((TypeError, ValueError), match=name):
        ImageWriterStage(str(tmp_path / "out"), **{name: value})


def test_a_string_label_column_is_refused_at_call_time(tmp_path):
    ddf = _ddf(pd.DataFrame({"key": ["a"], "image": pd.Series([GOOD], dtype=object),
                             "label": pd.Series(["cat"], dtype="string")}))
    with pytest.raises(TypeError, match="integer class id"):
        ddf.imgsink.to_webdataset(str(tmp_path / "out"), key_column="key", label_column="label")


# ----------------------------------------------------------------------------- the stage's metadata and names


def test_the_stage_takes_the_union_of_metadata_keys(tmp_path):
    stage = ImageWriterStage(str(tmp_path / "out"))
    batch = ImageBatch(task_id="t", data=[ImageObject(image_id="a", image_data=GOOD, metadata={}),
                                          ImageObject(image_id="b", image_data=GOOD, metadata={"a": 0})])
    result = stage.process(batch)
    table = pq.read_table(next(p for p in result.data if p.endswith(".parquet")))
    assert table.column("a").to_pylist() == [None, 0]
    samples = read_dataset_files(result.data)
    assert [json.loads(m["json"]) for _, m in samples] == [{"image_path": "", "a": None},
                                                           {"image_path": "", "a": 0}]


def read_dataset_files(paths: list[str]):
    from helpers import read_tar_samples

    return [s for p in paths if p.endswith(".tar") for s in read_tar_samples(p)]


def test_the_stage_refuses_metadata_that_drifts_between_batches(tmp_path):
    stage = ImageWriterStage(str(tmp_path / "out"))
    stage.process(ImageBatch(task_id="1", data=[ImageObject(image_id="a", image_data=GOOD, metadata={"n": 1})]))
    with pytest.raises(ValueError, match="metadata key 'n'.*int64"):
        stage.process(ImageBatch(task_id="2", data=[ImageObject(image_id="b", image_data=GOOD,
                                                                metadata={"n": "one"})]))
    with pytest.raises(ValueError, match=r"\['extra'\] were not in the stage's first batch"):
        stage.process(ImageBatch(task_id="3", data=[ImageObject(image_id="c", image_data=GOOD,
                                                                metadata={"n": 2, "extra": 1})]))
    declared = ImageWriterStage(str(tmp_path / "declared"), metadata_schema={"n": pa.float64()})
    declared.process(ImageBatch(task_id="1", data=[ImageObject(image_id="a", image_data=GOOD, metadata={"n": 1})]))
    declared.process(ImageBatch(task_id="2", data=[ImageObject(image_id="b", image_data=GOOD,
                                                               metadata={"n": 2.5})]))
    schemas = {str(pq.read_schema(p).field("n").type) for p in (tmp_path / "declared" / "metadata").iterdir()}
    assert schemas == {"double"}


def test_the_stage_default_names_never_collide_between_batches(tmp_path):
    stage = ImageWriterStage(str(tmp_path / "out"))
    first = stage.process(ImageBatch(data=[ImageObject(image_data=make_image(1, 8, 8))]))
    second = stage.process(ImageBatch(data=[ImageObject(image_data=make_image(2, 8, 8))]))
    assert set(first.data).isdisjoint(second.data)
    again = stage.process(ImageBatch(data=[ImageObject(image_data=make_image(1, 8, 8))]))
    assert again.data == first.data  # the same batch gives the same names (a rerun replaces its files)
    assert len(list((tmp_path / "out").glob("*.tar"))) == 2


NESTED = {"tags": pa.list_(pa.string()), "box": pa.struct([("w", pa.int64()), ("h", pa.int64())]),
          "boxes": pa.list_(pa.struct([("w", pa.int64())])), "groups": pa.list_(pa.list_(pa.string()))}
#: A value Arrow would reshape to fit its nested type (not refuse): column -> (value, what the error says).
RESHAPED = {"tags": ("abc", "a str is not a list"),
            "box": ({"w": 1, "h": 2, "depth": 3}, r"\['depth'\] are not fields"),
            "boxes": ([{"w": 1}, {"w": 2, "x": 0}], r"\['x'\] are not fields"),
            "groups": ([["a"], "bc"], "a str is not a list")}


@pytest.mark.parametrize("column", sorted(RESHAPED))
def test_a_value_arrow_would_reshape_to_fit_its_nested_type_is_a_bad_row(column, tmp_path):
    """Arrow takes a str for a list of its characters and drops a dict's keys a struct has no field
    for: the value written would not be the value given, so the row is refused (or skipped)."""
    good = {"tags": ["x", "y"], "box": {"w": 1, "h": 2}, "boxes": [{"w": 1}], "groups": [["a"], []]}
    rows = [dict(good) for _ in range(3)]
    rows[1][column] = RESHAPED[column][0]
    frame = pd.DataFrame({"key": ["a", "b", "c"], "image": pd.Series([GOOD] * 3, dtype=object),
                          **{c: pd.Series([r[c] for r in rows], dtype=object) for c in NESTED}})
    options = dict(key_column="key", metadata_schema=NESTED, compute=True)
    with pytest.raises(BadRowError, match=RESHAPED[column][1]) as caught:
        _ddf(frame).imgsink.to_webdataset(str(tmp_path / "raise"), **options)
    assert (caught.value.row, caught.value.key, caught.value.column) == (1, "b", column)
    out = tmp_path / "skip"
    _ddf(frame).imgsink.to_webdataset(str(out), on_error="skip", **options)
    table = read_dataset(out)["tables"][0]
    assert table.column("key").to_pylist() == ["a", "c"]
    assert table.select(list(NESTED)).to_pylist() == [good, good]
    assert [json.loads(m["json"]) for _, m in read_dataset(out)["samples"]] == [good, good]


def test_the_stage_refuses_a_value_arrow_would_reshape(tmp_path):
    stage = ImageWriterStage(str(tmp_path / "out"))
    stage.process(ImageBatch(task_id="1", data=[ImageObject(image_id="a", image_data=GOOD,
                                                            metadata={"box": {"w": 1}, "tags": ["x"]})]))
    with pytest.raises(ValueError, match=r"'box'.*\['h'\] are not fields"):
        stage.process(ImageBatch(task_id="2", data=[ImageObject(image_id="b", image_data=GOOD,
                                                                metadata={"box": {"w": 1, "h": 2}, "tags": ["y"]})]))
    with pytest.raises(ValueError, match="'tags'.*a str is not a list"):
        stage.process(ImageBatch(task_id="3", data=[ImageObject(image_id="c", image_data=GOOD,
                                                                metadata={"box": {"w": 1}, "tags": "yz"})]))


def test_categories_dask_does_not_know_are_text_with_wide_codes_and_other_values_are_refused(tmp_path):
    """``ddf[col].astype('category')`` (and ``dd.read_parquet`` of a dictionary column) leaves the
    categories unknown: such a column is written as a dictionary of text with 32-bit codes (int8 codes,
    from the meta, failed a partition of more than 127 categories). Categories that are not text would
    be cast to it: they are refused, naming the fix; made known, they keep their type."""
    n = 200
    frame = pd.DataFrame({"key": [f"k{i}" for i in range(n)], "image": pd.Series([GOOD] * n, dtype=object),
                          "tag": [f"tag{i % 150}" for i in range(n)], "kind": [i % 150 for i in range(n)]})
    ddf = _ddf(frame, 2)
    for column in ("tag", "kind"):
        ddf[column] = ddf[column].astype("category")
    out = tmp_path / "text"
    ddf.drop(columns="kind").imgsink.to_webdataset(str(out), key_column="key", images_per_tar=60, compute=True)
    data = read_dataset(out)
    assert str(data["tables"][0].schema.field("tag").type) == "dictionary<values=string, indices=int32, ordered=0>"
    assert [v for t in data["tables"] for v in t.column("tag").to_pylist()] == list(frame.tag)
    # dd.read_parquet gives a dictionary column as a categorical whose meta holds no category at all
    back = dd.read_parquet(str(out), columns=["key", "tag"])
    assert isinstance(back["tag"].dtype, pd.CategoricalDtype) and len(back._meta["tag"].cat.categories) == 0
    back = back.assign(image=back["key"].map(lambda _: GOOD, meta=("image", object)))
    back.imgsink.to_webdataset(str(tmp_path / "again"), key_column="key", images_per_tar=60, compute=True)
    again = read_dataset(tmp_path / "again")["tables"]
    assert [v for t in again for v in t.column("tag").to_pylist()] == list(frame.tag)
    with pytest.raises(BadRowError, match=r"categories are int64, not text.*as_known") as caught:
        ddf.imgsink.to_webdataset(str(tmp_path / "ints"), key_column="key", compute=True)
    assert (caught.value.column, caught.value.row) == ("kind", 0)
    with pytest.raises(TypeError, match=r"'kind': none of its 200 values fits.*the first: .*cat.as_known"):
        ddf.imgsink.to_webdataset(str(tmp_path / "ints"), key_column="key", on_error="skip", compute=True)
    ddf["kind"] = ddf["kind"].cat.as_known()
    out = tmp_path / "known"
    ddf.imgsink.to_webdataset(str(out), key_column="key", images_per_tar=60, compute=True)
    data = read_dataset(out)
    rows = [row for table in data["tables"] for row in table.select(["tag", "kind"]).to_pylist()]
    assert rows == frame[["tag", "kind"]].to_dict("records")
    assert [json.loads(m["json"]) for _, m in data["samples"]] == rows


def test_an_infinity_inside_a_map_value_is_written_as_in_any_other_column(tmp_path):
    """Arrow gives a map's entries as tuples: an infinity inside one is 1e999 in key.json too."""
    frame = pd.DataFrame({"key": ["a"], "image": pd.Series([GOOD], dtype=object),
                          "weights": pd.Series([[("x", float("inf")), ("y", 0.5)]], dtype=object)})
    out = tmp_path / "out"
    _ddf(frame).imgsink.to_webdataset(str(out), key_column="key", compute=True,
                                      metadata_schema={"weights": pa.map_(pa.string(), pa.float64())})
    (_, members), = read_dataset(out)["samples"]
    assert members["json"] == b'{"weights": [["x", 1e999], ["y", 0.5]]}'


@pytest.mark.parametrize("kind, value, message", [
    (pa.int64(), 2.5, "truncated"),
    (pa.date32(), pd.Timestamp("2020-01-01 23:59"), "time of day"),
    (pa.timestamp("us"), pd.Timestamp("2020-01-01 00:00:00.000000123"), "lose data"),
], ids=["a fraction into integers", "a time of day into dates", "nanoseconds into microseconds"])
def test_a_number_or_time_its_type_would_change_is_a_bad_row_not_cut(kind, value, message, tmp_path):
    """Arrow casts numbers and times to a column's type without checking: 2.5 became 2, a datetime
    its date. The value is refused (or skipped); a value the type holds exactly is written."""
    exact = {pa.int64(): 2.0, pa.date32(): pd.Timestamp("2020-01-02"),
             pa.timestamp("us"): pd.Timestamp("2020-01-01 00:00:00.000001")}[kind]
    frame = pd.DataFrame({"key": ["a", "b", "c"], "image": pd.Series([GOOD] * 3, dtype=object),
                          "v": pd.Series([exact, value, None], dtype=object)})
    options = dict(key_column="key", metadata_schema={"v": kind}, compute=True)
    with pytest.raises(BadRowError, match=message) as caught:
        _ddf(frame).imgsink.to_webdataset(str(tmp_path / "raise"), **options)
    assert (caught.value.row, caught.value.column) == (1, "v")
    _ddf(frame).imgsink.to_webdataset(str(tmp_path / "skip"), on_error="skip", **options)
    table = read_dataset(tmp_path / "skip")["tables"][0]
    assert table.column("key").to_pylist() == ["a", "c"]
    assert table.column("v").to_pylist()[1] is None
    written = table.column("v").to_pylist()[0]
    assert written == (2 if kind == pa.int64() else exact.date() if kind == pa.date32() else exact.to_pydatetime())


def test_the_stage_refuses_a_number_its_type_would_cut(tmp_path):
    stage = ImageWriterStage(str(tmp_path / "out"))
    stage.process(ImageBatch(task_id="1", data=[ImageObject(image_id="a", image_data=GOOD, metadata={"n": 1})]))
    with pytest.raises(ValueError, match="'n'.*truncated"):
        stage.process(ImageBatch(task_id="2", data=[ImageObject(image_id="b", image_data=GOOD, metadata={"n": 0.5})]))
    stage.process(ImageBatch(task_id="3", data=[ImageObject(image_id="c", image_data=GOOD, metadata={"n": 3.0})]))


def test_the_stage_keeps_an_id_of_0_and_never_names_two_different_batches_alike(tmp_path):
    """``image_id=0`` is a key like 1 (only None or "" get a generated one). Batches that differ only in
    the middle of a long array of metadata, or in a "P" image's palette, got one name, and the second
    replaced the first."""
    stage = ImageWriterStage(str(tmp_path / "out"))
    written = stage.process(ImageBatch(data=[ImageObject(image_id=0, image_data=GOOD)]))
    assert [s[0] for s in read_dataset_files(written.data)] == ["0"]
    stage = ImageWriterStage(str(tmp_path / "vectors"))
    vector = np.zeros(2000)
    other = vector.copy()
    other[1000] = 1.0
    first = stage.process(ImageBatch(data=[ImageObject(image_id="v", image_data=GOOD, metadata={"v": vector})]))
    second = stage.process(ImageBatch(data=[ImageObject(image_id="v", image_data=GOOD, metadata={"v": other})]))
    assert set(first.data).isdisjoint(second.data)
    red, blue = (Image.new("P", (4, 4), 0) for _ in range(2))
    red.putpalette([255, 0, 0] * 256)
    blue.putpalette([0, 0, 255] * 256)
    named = [set(stage.process(ImageBatch(data=[ImageObject(image_id="p", image_data=img, metadata={"v": vector})])).data)
             for img in (red, blue)]
    assert named[0].isdisjoint(named[1])


def test_the_stage_removes_the_image_data_of_written_objects_only(tmp_path):
    stage = ImageWriterStage(str(tmp_path / "out"), remove_image_data=True, on_error="skip")
    bad = np.zeros((0, 4, 3), np.uint8)
    objects = [ImageObject(image_id="a", image_data=GOOD), ImageObject(image_id="b", image_data=bad)]
    result = stage.process(ImageBatch(data=objects))
    assert result.metadata["num_skipped"] == 1
    assert objects[0].image_data is None and objects[1].image_data is bad  # not written: kept


@pytest.mark.parametrize("metadata, message", [({7: 1}, "metadata key 7 is not a string"),
                                               ({"image_path": "thumb.jpg"}, "would replace the object's image_path")])
def test_the_stage_refuses_metadata_keys_it_cannot_write_as_given(metadata, message, tmp_path):
    stage = ImageWriterStage(str(tmp_path / "out"))
    with pytest.raises(ValueError, match=message):
        stage.process(ImageBatch(data=[ImageObject(image_id="a", image_path="/data/a.jpg", image_data=GOOD,
                                                   metadata=metadata)]))


def test_the_stage_returns_paths_that_open_where_it_wrote(tmp_path):
    """Written to an fsspec URL, the result's paths keep its protocol (they opened as local paths)."""
    import fsspec

    stage = ImageWriterStage("memory://stage-paths/out")
    result = stage.process(ImageBatch(data=[ImageObject(image_id="a", image_data=GOOD)]))
    assert all(p.startswith("memory://") for p in result.data)
    with fsspec.open(result.data[0], "rb") as f:
        assert f.read(512)


def test_a_stage_rerun_with_fewer_shards_replaces_all_its_files(tmp_path):
    """The names hash the batch, not images_per_tar: a rerun that writes fewer shards removes the
    rest of its earlier run's, or the directory held each key twice."""
    objects = [ImageObject(image_id=f"k{i}", image_data=make_image(i, 8, 8)) for i in range(3)]
    ImageWriterStage(str(tmp_path / "out"), images_per_tar=1).process(ImageBatch(task_id="t", data=objects))
    assert len(list((tmp_path / "out").glob("*.tar"))) == 3
    result = ImageWriterStage(str(tmp_path / "out"), images_per_tar=10).process(ImageBatch(task_id="t", data=objects))
    assert {p.name for p in (tmp_path / "out").rglob("*") if p.is_file()} == {
        Path(p).name for p in result.data} | {Path(result.data[0]).name[:-4] + ".idx"}
