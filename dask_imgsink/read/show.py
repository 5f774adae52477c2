"""A thumbnail grid of the first images of a dataset or DataFrame, as a PIL image.

Notebooks display the returned image inline (PIL images have a PNG repr).
Only the first rows are read: a dataset's first shards' Parquet and those images'
byte ranges; a DataFrame's first partitions, one at a time, until ``n`` rows.
"""

from __future__ import annotations

import io
import math
import os
from typing import Any, Sequence

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont, ImageOps

from ..core.encode import read_hf_dict
from ..core.pixels import pil_to_array, to_hwc, to_uint8

BACKGROUND = (255, 255, 255)
PLACEHOLDER = (215, 215, 215)
PADDING = 4
LINE_HEIGHT = 13


def show(
    data: Any,
    n: int = 16,
    *,
    columns: str | Sequence[str] | None = None,
    size: int = 128,
    image_column: str = "image",
    storage_options: dict[str, Any] | None = None,
) -> Image.Image:
    """A grid of the first ``n`` images with captions, as one PIL image.

    Parameters
    ----------
    data : str, os.PathLike, dask or pandas DataFrame
        A dataset directory (local path or fsspec URL), a DataFrame from
        :func:`~dask_imgsink.read_webdataset`, or a DataFrame about to be
        written (arrays, encoded bytes, PIL images or ``{"bytes", "path"}`` dicts).
    n : int, default 16
        How many images.
    columns : str or list of str, optional
        Column(s) whose values caption each tile, one line each; default the
        ``key`` column if there is one, else the index.
    size : int, default 128
        The longer side of each thumbnail, in pixels.
    image_column : str, default "image"
        The column holding the images.
    storage_options : dict, optional
        fsspec options, when ``data`` is a path.

    Returns
    -------
    PIL.Image.Image
        ``ceil(sqrt(n))`` tiles per row. An image that cannot be shown is a gray
        tile whose caption says why.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive integer, not {n!r}")
    if not isinstance(size, int) or isinstance(size, bool) or size < 16:
        raise ValueError(f"size must be an integer of at least 16 pixels, not {size!r}")
    captions = [columns] if isinstance(columns, str) else list(columns) if columns is not None else None
    rows = _first_rows(data, n, captions, image_column, storage_options)
    if captions is None:
        captions = ["key"] if "key" in rows.columns else []
    tiles = [_tile(value, size) for value in rows[image_column]]
    labels = [_caption(rows, i, captions) for i in range(len(rows))]
    return _grid(tiles, labels, size, lines=max(1, len(captions)))


def _first_rows(data: Any, n: int, captions: list[str] | None, image_column: str,
                storage_options: dict[str, Any] | None) -> pd.DataFrame:
    """The first ``n`` rows of ``data`` with the image and caption columns."""
    if isinstance(data, (str, os.PathLike)):
        return _first_dataset_rows(os.fspath(data), n, captions, image_column, storage_options)
    wanted = [image_column] + [c for c in (captions if captions is not None else ["key"]) if c in data.columns]
    missing = [c for c in [image_column] + (captions or []) if c not in data.columns]
    if missing:
        raise ValueError(f"columns {missing} are not in the data; it has {list(data.columns)}")
    return _head(data[list(dict.fromkeys(wanted))], n)


def _head(frame: Any, n: int) -> pd.DataFrame:
    """The first ``n`` rows of a pandas or Dask DataFrame, reading only the partitions that hold them."""
    if isinstance(frame, pd.DataFrame):
        return frame.head(n)
    parts, count = [], 0
    for i in range(frame.npartitions):
        part = frame.partitions[i].head(n - count, npartitions=1)
        parts.append(part)
        count += len(part)
        if count >= n:
            break
    return pd.concat(parts) if parts else frame._meta


def _first_dataset_rows(path: str, n: int, captions: list[str] | None, image_column: str,
                        storage_options: dict[str, Any] | None) -> pd.DataFrame:
    """The first ``n`` rows of the dataset at ``path``, each image read on its own: a damaged or missing
    tar makes gray tiles that say why, not an error (read_webdataset reads a shard's images together)."""
    from ..storage import join, resolve
    from .dataset import read_webdataset
    from .ranges import read_ranges

    if image_column != "image":
        raise ValueError(f"a dataset's images are its 'image' column, not {image_column!r}")
    meta = read_webdataset(path, images=False, storage_options=storage_options)
    missing = [c for c in captions or [] if c not in meta.columns]
    if missing:
        raise ValueError(f"columns {missing} are not in the data; it has {list(meta.columns) + ['image']}")
    shown = [c for c in (captions if captions is not None else ["key"]) if c in meta.columns]
    rows = _head(meta[list(dict.fromkeys(["tar_file", "offset", "size", *shown]))], n)
    fs, root = resolve(path, storage_options)

    def image(tar: str, offset: int, size: int) -> Any:
        try:
            return read_ranges(fs, join(root, tar), [(offset, offset + size)])[0]
        except Exception as exc:  # a preview shows what it cannot read
            return exc

    images = [image(*place) for place in rows[["tar_file", "offset", "size"]].itertuples(index=False)]
    return rows[shown].assign(image=images)


def _tile(value: Any, size: int) -> Image.Image:
    """A thumbnail of one image value, or a gray tile when it cannot be read."""
    try:
        return ImageOps.contain(_as_pil(value), (size, size)).convert("RGB")
    except Exception as exc:  # anything unreadable is shown, not raised: this is a preview
        tile = Image.new("RGB", (size, size), PLACEHOLDER)
        ImageDraw.Draw(tile).text((PADDING, size // 2 - 6), f"unreadable: {type(exc).__name__}", fill=(90, 0, 0),
                                  font=_font())
        return tile


def _as_pil(value: Any) -> Image.Image:
    if isinstance(value, Exception):  # the image could not be read at all
        raise value
    if isinstance(value, dict):
        value = read_hf_dict(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        value = Image.open(io.BytesIO(bytes(value)))
        value.draft("RGB", (512, 512))  # JPEGs decode at a reduced scale
    if isinstance(value, Image.Image):
        value = pil_to_array(value)
    if isinstance(value, np.ndarray):  # scaled by dtype, as the writer would
        pixels = to_hwc(to_uint8(value))
        return Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
    raise TypeError(f"not an image: {type(value).__name__}")


def _caption(rows: pd.DataFrame, i: int, columns: list[str]) -> list[str]:
    if not columns:
        return [str(rows.index[i])]
    return [_short(rows[c].iloc[i]) for c in columns]


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _grid(tiles: list[Image.Image], labels: list[list[str]], size: int, lines: int) -> Image.Image:
    count = max(1, len(tiles))
    per_row = math.ceil(math.sqrt(count))
    cell_w, cell_h = size + 2 * PADDING, size + 2 * PADDING + lines * LINE_HEIGHT
    grid = Image.new("RGB", (per_row * cell_w, math.ceil(count / per_row) * cell_h), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    font = _font()
    for i, (tile, label) in enumerate(zip(tiles, labels)):
        x, y = (i % per_row) * cell_w + PADDING, (i // per_row) * cell_h + PADDING
        grid.paste(tile, (x + (size - tile.width) // 2, y + (size - tile.height) // 2))
        for line, text in enumerate(label):
            draw.text((x, y + size + 1 + line * LINE_HEIGHT), _fit(text, size, font), fill=(0, 0, 0), font=font)
    return grid


def _fit(text: str, width: int, font) -> str:
    """``text`` cut (with an ellipsis) to fit ``width`` pixels."""
    text = text.replace("\n", " ")
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def _font():
    return ImageFont.load_default(size=11)
