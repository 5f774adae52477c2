"""ImageWriterStage alone: parity with NeMo Curator's contract, every input kind, bad inputs."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import decode, make_image, png_bytes, psnr, read_tar_samples
from PIL import Image

from dask_imgsink import (
    BadRowError,
    FileGroupTask,
    ImageBatch,
    ImageObject,
    ImageWriterStage,
)


def _batch(n: int, task_id: str = "task-1") -> ImageBatch:
    return ImageBatch(
        task_id=task_id,
        dataset_name="ds",
        data=[
            ImageObject(image_path=f"/src/{i}.jpg", image_id=f"id{i:03d}", image_data=make_image(i),
                        metadata={"score": i / 2, "source": f"s{i}"})
            for i in range(n)
        ],
    )


def test_signature_matches_the_reference():
    fields = [(f.name, f.default) for f in dataclasses.fields(ImageWriterStage)][:6]
    assert fields == [
        ("output_dir", dataclasses.MISSING), ("images_per_tar", 1000), ("verbose", False),
        ("deterministic_name", True), ("remove_image_data", False), ("name", "image_writer"),
    ]


def test_process_writes_tars_then_parquets_with_at_most_images_per_tar(tmp_path):
    stage = ImageWriterStage(str(tmp_path), images_per_tar=3)
    batch = _batch(7)
    result = stage.process(batch)
    assert isinstance(result, FileGroupTask)
    assert (result.task_id, result.dataset_name) == ("task-1", "ds")
    tars = [p for p in result.data if p.endswith(".tar")]
    parquets = [p for p in result.data if p.endswith(".parquet")]
    assert result.data == tars + parquets and len(tars) == 3
    assert result.metadata["num_images"] == 7 and result.metadata["images_per_tar"] == 3
    assert result.metadata["output_dir"] == str(tmp_path)
    counts = [len(read_tar_samples(t)) for t in tars]
    assert counts == [3, 3, 1]
    keys = [k for t in tars for k, _ in read_tar_samples(t)]
    assert keys == [o.image_id for o in batch.data]
    for tar, parquet in zip(tars, parquets):
        table = pq.read_table(parquet)
        assert table.column("tar_file").to_pylist() == [tar.rsplit("/", 1)[1]] * table.num_rows  # relative
        assert table.column("image_path").to_pylist()[0].startswith("/src/")
        assert table.schema.field("score").type == "double"  # typed, not a repr string
        raw = open(tar, "rb").read()
        for row in table.to_pylist():
            assert psnr(decode(raw[row["offset"]: row["offset"] + row["size"]]), make_image(int(row["key"][2:]))) > 40
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_deterministic_name_gives_same_names_and_bytes(tmp_path):
    a = ImageWriterStage(str(tmp_path / "a")).process(_batch(4))
    b = ImageWriterStage(str(tmp_path / "b")).process(_batch(4))
    names = lambda r: [p.rsplit("/", 1)[1] for p in r.data]  # noqa: E731
    assert names(a) == names(b)
    assert [open(p, "rb").read() for p in a.data] == [open(p, "rb").read() for p in b.data]
    other = ImageWriterStage(str(tmp_path / "c")).process(_batch(4, task_id="task-2"))
    assert names(other) != names(a)


def test_non_deterministic_names_differ_per_call(tmp_path):
    stage = ImageWriterStage(str(tmp_path), deterministic_name=False)
    first, second = stage.process(_batch(2)), stage.process(_batch(2))
    assert set(first.data).isdisjoint(second.data)


def test_remove_image_data_drops_pixels_after_writing(tmp_path):
    batch = _batch(3)
    ImageWriterStage(str(tmp_path), remove_image_data=True).process(batch)
    assert all(o.image_data is None for o in batch.data)
    batch = _batch(3)
    ImageWriterStage(str(tmp_path / "keep")).process(batch)
    assert all(o.image_data is not None for o in batch.data)


def test_verbose_logs_each_shard(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="dask_imgsink"):
        ImageWriterStage(str(tmp_path), images_per_tar=2, verbose=True).process(_batch(3))
    assert len([r for r in caplog.records if "wrote" in r.message]) == 2


def test_every_input_kind(tmp_path):
    rgba = np.concatenate([make_image(1), np.full((48, 64, 1), 255, np.uint8)], axis=2)
    png_path = tmp_path / "on-disk.png"
    png_path.write_bytes(png_bytes(make_image(9)))
    values = {
        "rgb": make_image(0),
        "gray": make_image(1)[:, :, 0],
        "gray1": make_image(2)[:, :, :1],
        "uint16": make_image(3).astype(np.uint16) * 257,
        "float": make_image(4) / 255.0,
        "pil": Image.fromarray(make_image(5)),
        "pngbytes": png_bytes(make_image(6)),
        "hfdict": {"bytes": png_bytes(make_image(7)), "path": None},
        "hfpath": {"bytes": None, "path": str(png_path)},
    }
    batch = ImageBatch(task_id="kinds", data=[ImageObject(image_id=k, image_data=v) for k, v in values.items()])
    result = ImageWriterStage(str(tmp_path / "out")).process(batch)
    samples = dict(read_tar_samples(result.data[0]))
    assert samples["pngbytes"]["png"] == values["pngbytes"]  # passed through unchanged
    assert samples["hfpath"]["png"] == png_path.read_bytes()
    assert psnr(decode(samples["rgb"]["jpg"]), make_image(0)) > 40
    assert psnr(decode(samples["uint16"]["jpg"]), make_image(3)) > 40
    assert psnr(decode(samples["float"]["jpg"]), make_image(4)) > 40
    assert decode(samples["gray"]["jpg"]).ndim == 2
    with pytest.raises(BadRowError, match="alpha"):
        ImageWriterStage(str(tmp_path / "rgba")).process(ImageBatch(data=[ImageObject(image_id="a", image_data=rgba)]))


@pytest.mark.parametrize(
    "image_id, image, match",
    [
        ("has.dot", make_image(0), "forbidden character '.'"),
        ("a/b", make_image(0), "forbidden character '/'"),
        ("k" * 96, make_image(0), "more than 95"),
        ("ok", np.zeros((4, 4, 4), np.uint8), "alpha"),
        ("ok", b"not an image", "not a JPEG"),
        ("ok", None, "missing"),
    ],
)
def test_bad_inputs_name_the_row_and_leave_no_files(tmp_path, image_id, image, match):
    batch = ImageBatch(task_id="bad", data=[ImageObject(image_id="good", image_data=make_image(0)),
                                            ImageObject(image_id=image_id, image_data=image)])
    with pytest.raises(BadRowError, match=match) as info:
        ImageWriterStage(str(tmp_path), images_per_tar=1).process(batch)
    assert "row 1" in str(info.value) and "Fix:" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_duplicate_keys_in_a_batch_are_an_error(tmp_path):
    batch = ImageBatch(data=[ImageObject(image_id="same", image_data=make_image(i)) for i in range(2)])
    with pytest.raises(BadRowError, match="used twice"):
        ImageWriterStage(str(tmp_path)).process(batch)


def test_empty_ids_get_generated_unique_keys(tmp_path):
    batch = ImageBatch(task_id="gen", data=[ImageObject(image_data=make_image(i)) for i in range(3)])
    result = ImageWriterStage(str(tmp_path)).process(batch)
    keys = [k for k, _ in read_tar_samples(result.data[0])]
    assert len(set(keys)) == 3 and all("." not in k for k in keys)


def test_metadata_keys_that_clash_with_writer_columns_are_refused(tmp_path):
    batch = ImageBatch(data=[ImageObject(image_id="a", image_data=make_image(0), metadata={"width": 3})])
    with pytest.raises(ValueError, match="clash"):
        ImageWriterStage(str(tmp_path)).process(batch)
