"""What ``dask-imgsink write`` reads: a dataset of ours, a Parquet dataset, or a folder of image files.

- A directory holding ``_index.json`` is a dataset written by dask-imgsink: it is
  read with :func:`~dask_imgsink.read_webdataset` and re-sharded; its keys are
  kept, and the text and label columns its jobs wrote members from are used again.
  Jobs that used different ones cannot be re-sharded under one rule without
  adding or dropping members: the command then asks for ``--text-column`` and
  ``--label-column``, which apply to every sample.
- A ``.parquet`` file, or a directory holding ``.parquet`` files, is read with
  ``dd.read_parquet``; the image column is ``--image-column``, else ``image``, else
  the only column of encoded bytes or Hugging Face ``{"bytes", "path"}`` structs.
- A directory of ``.jpg``/``.jpeg``/``.png``/``.webp`` files (searched
  recursively) gives one row per file, its bytes passed through unchanged.

Keys of image files come from their paths relative to the folder, without the
extension, by a rule that never maps two paths to one key: letters, digits,
``_`` and ``-`` stay; every other character (``/``, ``.``, space, ``~``,
non-ASCII) becomes ``~`` and the two hex digits of each of its UTF-8 bytes.
``photos/cat 1.jpg`` is ``photos~2Fcat~201``. Only files whose paths differ
in their extension alone (``cat.jpg`` and ``cat.png``) would share a key; the
command refuses them, naming both.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import pyarrow as pa

from ..storage import join, resolve
from .common import UsageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
_KEPT = re.compile(r"[A-Za-z0-9_-]")


@dataclass
class Input:
    """A DataFrame to write and the column roles it suggests."""

    frame: Any
    kind: str
    image_column: str = "image"
    key_column: str | None = None
    text_column: str | None = None
    label_column: str | None = None
    notes: list[str] = field(default_factory=list)


def key_for_path(relative: str) -> str:
    """The sample key of an image file at ``relative`` (see the module docstring)."""
    stem = relative[: -len(posixpath.splitext(relative)[1]) or None]
    return "".join(c if _KEPT.fullmatch(c) else "".join(f"~{b:02X}" for b in c.encode()) for c in stem)


def open_input(path: str, *, storage_options: dict | None, image_column: str | None,
               files_per_partition: int, text_column: str | None = None,
               label_column: str | None = None) -> Input:
    """Recognise ``path`` and open it as a Dask DataFrame (see the module docstring)."""
    fs, root = resolve(path, storage_options)
    if not fs.exists(root):
        raise UsageError(f"the input {path!r} does not exist")
    if fs.isfile(root):
        if root.endswith(".parquet"):
            return _parquet_input(path, storage_options, image_column)
        raise UsageError(f"the input {path!r} is a file but not .parquet; pass a Parquet file or dataset, "
                         "a folder of images, or a dataset written by dask-imgsink")
    if fs.exists(join(root, "_index.json")):
        if image_column not in (None, "image"):
            raise UsageError(f"the input {path!r} is a dataset written by dask-imgsink: its images are its "
                             f"tars' images, not a column; leave out --image-column {image_column}")
        return _dataset_input(path, storage_options, text_column, label_column)
    files = [p for p in sorted(fs.find(root)) if not _hidden(p, root)]
    if any(p.endswith(".parquet") for p in files):
        return _parquet_input(path, storage_options, image_column)
    images = [p for p in files if p.lower().endswith(IMAGE_EXTENSIONS)]
    if images:
        return _folder_input(fs, root, images, files_per_partition)
    raise UsageError(f"the input {path!r} holds no _index.json, no .parquet file and no "
                     f"{'/'.join(IMAGE_EXTENSIONS)} file")


def _hidden(path: str, root: str) -> bool:
    relative = path[len(root):].lstrip("/")
    return any(part.startswith((".", "_")) for part in relative.split("/"))


def _dataset_input(path: str, storage_options: dict | None, text_column: str | None = None,
                   label_column: str | None = None) -> Input:
    from ..format.index import read_index
    from ..read.dataset import read_webdataset

    fs, root = resolve(path, storage_options)
    index = read_index(fs, root) or {}
    frame = read_webdataset(path, storage_options=storage_options)
    roles = _roles_by_job(index, set(frame.columns))
    if len(roles) > 1:
        if text_column is not None or label_column is not None:  # the user's rule for every sample
            return Input(frame, "dataset", key_column="key")
        raise UsageError(
            f"the jobs that wrote {path!r} wrote text and label members from different columns "
            f"({', '.join(f'text {t!r}, label {lb!r}' for t, lb in sorted(roles, key=str))}): a re-shard, which "
            "applies one rule to every sample, would add or drop some samples' .txt/.cls members. Choose the "
            "rule with --text-column and/or --label-column (a role not given then writes no member), or "
            "re-shard each job's shards apart with read_webdataset and to_webdataset"
        )
    text, label = next(iter(roles), (None, None))
    return Input(frame, "dataset", key_column="key", text_column=text, label_column=label)


def _roles_by_job(index: dict, columns: set[str]) -> set[tuple[str | None, str | None]]:
    """The (text column, label column) pairs the dataset's jobs that wrote shards used (those the frame has)."""
    roles = set()
    for job in index.get("jobs") or []:
        lo, hi = (job.get("shard_range") or [0, 0]) if isinstance(job, dict) else (0, 0)
        if hi > lo:
            options = job.get("options") or {}
            text, label = options.get("text_column"), options.get("label_column")
            roles.add((text if text in columns else None, label if label in columns else None))
    return roles


def _parquet_input(path: str, storage_options: dict | None, image_column: str | None) -> Input:
    import dask.dataframe as dd

    # Arrow-backed columns keep every Parquet type: binary stays bytes, image structs stay structs,
    # nullable integers stay integers, lists keep their item type.
    frame = dd.read_parquet(path, storage_options=storage_options, dtype_backend="pyarrow")
    column = image_column or _guess_image_column(frame)
    if column not in frame.columns:
        raise UsageError(f"--image-column {column!r} is not a column of {path}; columns: {list(frame.columns)}")
    return Input(frame, "parquet", image_column=column, key_column="key" if "key" in frame.columns else None)


def _guess_image_column(frame) -> str:
    if "image" in frame.columns:
        return "image"
    candidates = [c for c in frame.columns if _holds_images(frame._meta[c])]
    if len(candidates) == 1:
        return candidates[0]
    raise UsageError(f"cannot tell which column holds the images (candidates: {candidates or 'none'}; columns: "
                     f"{list(frame.columns)}); pass --image-column NAME")


def _holds_images(column: pd.Series) -> bool:
    dtype = column.dtype
    if isinstance(dtype, pd.ArrowDtype):
        kind = dtype.pyarrow_dtype
        return pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or (
            pa.types.is_struct(kind) and {"bytes", "path"} <= {f.name for f in kind})
    return False


def _folder_input(fs, root: str, paths: list[str], files_per_partition: int) -> Input:
    import dask
    import dask.dataframe as dd

    relative = [p[len(root):].lstrip("/") for p in paths]
    keys = [key_for_path(r) for r in relative]
    seen: dict[str, str] = {}
    for key, rel in zip(keys, relative):
        if key in seen:
            raise UsageError(f"{seen[key]!r} and {rel!r} differ only in their extension and would share the "
                             f"key {key!r}; keep one of them (or move one to another folder)")
        seen[key] = rel
    chunks = [slice(i, i + files_per_partition) for i in range(0, len(paths), files_per_partition)]
    reader = FileReader(fs)
    meta = reader([], [], [])
    with dask.config.set({"dataframe.convert-string": False}):
        frame = dd.from_map(reader, [paths[c] for c in chunks], [keys[c] for c in chunks],
                            [relative[c] for c in chunks], meta=meta, label="read-image-files",
                            enforce_metadata=False)
    return Input(frame, "folder", key_column="key")


class FileReader:
    """Reads one partition of image files: key, image bytes (passed through), relative path."""

    def __init__(self, fs) -> None:
        self.fs = fs

    def __call__(self, paths: list[str], keys: list[str], relative: list[str]) -> pd.DataFrame:
        found = self.fs.cat(paths, on_error="return") if paths else {}  # concurrent GETs on object stores
        # a file that cannot be read (gone, a dangling link) is a missing image: a bad row, whose key
        # names the file, and which on_error="skip" leaves out and records like any other
        data = [None if isinstance(found.get(p), Exception) else found[p] for p in paths]
        return pd.DataFrame({
            "key": pd.Series(keys, dtype=pd.StringDtype("pyarrow")),
            "image": pd.Series(pd.arrays.ArrowExtensionArray(pa.array(data, type=pa.large_binary()))),
            "path": pd.Series(relative, dtype=pd.StringDtype("pyarrow")),
        })
