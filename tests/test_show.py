"""show: a thumbnail grid of a dataset, a frame read back, or a frame about to be written."""

from __future__ import annotations

import dask
import dask.dataframe as dd
import numpy as np
import pytest
from helpers import frame_ddf, make_frame
from PIL import Image

from dask_imgsink import read_webdataset, show
from dask_imgsink.read.show import LINE_HEIGHT, PADDING


def tiles_with_pixels(grid: Image.Image, size: int, lines: int) -> list[bool]:
    """For each cell of the grid, whether its thumbnail area holds anything but background."""
    cell_w, cell_h = size + 2 * PADDING, size + 2 * PADDING + lines * LINE_HEIGHT
    pixels = np.asarray(grid)
    cells = []
    for top in range(0, grid.height, cell_h):
        for left in range(0, grid.width, cell_w):
            area = pixels[top + PADDING:top + PADDING + size, left + PADDING:left + PADDING + size]
            cells.append(bool((area != 255).any()))
    return cells


@pytest.fixture
def dataset(tmp_path):
    out = str(tmp_path / "ds")
    frame_ddf(30, 0, npartitions=3).imgsink.to_webdataset(out, key_column="key", images_per_tar=8, compute=True)
    return out


def test_a_dataset_path_gives_one_tile_per_image_with_captions(dataset):
    grid = show(dataset, n=5, columns=["key", "caption"], size=64)
    assert grid.size == (3 * (64 + 2 * PADDING), 2 * (64 + 2 * PADDING + 2 * LINE_HEIGHT))
    assert tiles_with_pixels(grid, 64, 2) == [True] * 5 + [False]


def test_a_frame_read_back_and_a_frame_about_to_be_written_show_the_same_grid(dataset):
    from_disk = show(read_webdataset(dataset), n=9, size=48)
    assert tiles_with_pixels(from_disk, 48, 1) == [True] * 9
    # the frame before writing holds pixel arrays; its first 9 rows span two partitions
    before = show(frame_ddf(30, 0, npartitions=6), n=9, size=48)
    assert before.size == from_disk.size and tiles_with_pixels(before, 48, 1) == [True] * 9


def test_more_tiles_than_rows_shows_every_row(dataset):
    grid = show(read_webdataset(dataset, filters=[("score", "==", 1)]), n=16, size=32)
    assert tiles_with_pixels(grid, 32, 1) == [True] * 3 + [False]


def test_an_unreadable_image_is_a_labelled_gray_tile_not_an_error():
    frame = make_frame(2)
    frame.loc[1, "image"] = b"not an image"
    grid = show(frame, n=2, size=32)
    cell = np.asarray(grid)[PADDING:PADDING + 32, 32 + 3 * PADDING:32 + 3 * PADDING + 32]
    assert (cell == 215).mean() > 0.5


def test_a_damaged_or_missing_shard_gives_gray_tiles_not_an_error(dataset):
    """A preview of a damaged dataset shows what it can: the first shard cut short, the second gone."""
    from pathlib import Path

    first = Path(dataset) / "shard-000000.tar"
    first.write_bytes(first.read_bytes()[:600])  # the first image's header and a few of its bytes
    (Path(dataset) / "shard-000001.tar").unlink()
    grid = show(dataset, n=20, size=32)
    pixels = np.asarray(grid)
    cell_w, cell_h = 32 + 2 * PADDING, 32 + 2 * PADDING + LINE_HEIGHT
    gray = [(pixels[top + PADDING:top + PADDING + 32, left + PADDING:left + PADDING + 32] == 215).mean() > 0.5
            for top in range(0, grid.height, cell_h) for left in range(0, grid.width, cell_w)][:20]
    assert gray == [True] * 16 + [False] * 4  # shards 0 and 1 hold 8 images each; shard 2 is intact


@pytest.mark.parametrize("kwargs, match", [({"n": 0}, "positive"), ({"size": 2}, "at least 16"),
                                           ({"columns": ["nope"]}, "not in the data")])
def test_bad_arguments_are_clear_errors(kwargs, match):
    with dask.config.set({"dataframe.convert-string": False}):
        frame = dd.from_pandas(make_frame(3), npartitions=1)
    with pytest.raises(ValueError, match=match):
        show(frame, **kwargs)
