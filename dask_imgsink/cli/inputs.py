"""What ``dask-imgsink write`` reads: a dataset of ours, a Parquet dataset, or a folder of image files.

- A directory holding ``_index.json`` is a dataset written by dask-imgsink: it is
  read with :func:`~dask_imgsink.read_webdataset` and re-sharded; its keys are
  kept, and the text and label columns of the job that wrote it are used again.
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

from ..format.schema import default_metadata_columns
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
    metadata_columns: list[str] | None = None  # None: every column but the image and the key
    notes: list[str] = field(default_factory=list)


def key_for_path(relative: str) -> str:
    """The sample key of an image file at ``relative`` (see the module docstring)."""
    stem = relative[: -len(posixpath.splitext(relative)[1]) or None]
    return "".join(c if _KEPT.fullmatch(c) else "".join(f"~{b:02X}" for b in c.encode()) for c in stem)


def open_input(path: str, *, storage_options: dict | None, image_column: str | None,
               files_per_partition: int) -> Input:
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
        return _dataset_input(path, storage_options)
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


#: The columns a re-shard of a dataset whose jobs wrote different text or label columns builds: each
#: sample's text and label from the column its own job wrote them from.
SAMPLE_TEXT, SAMPLE_LABEL = "__imgsink_text__", "__imgsink_label__"


def _dataset_input(path: str, storage_options: dict | None) -> Input:
    from ..format.index import read_index
    from ..read.dataset import read_webdataset

    fs, root = resolve(path, storage_options)
    index = read_index(fs, root) or {}
    frame = read_webdataset(path, storage_options=storage_options)
    roles = _roles_by_tar(index, set(frame.columns))
    if len(set(roles.values())) <= 1:  # one text and one label column for every sample (or no shard)
        text, label = next(iter(roles.values()), (None, None))
        return Input(frame, "dataset", key_column="key", text_column=text, label_column=label)
    columns = list(frame.columns)
    frame = frame.map_partitions(_sample_roles, roles, meta=_sample_roles(frame._meta, roles))
    return Input(frame, "dataset", key_column="key",
                 text_column=SAMPLE_TEXT if any(t for t, _ in roles.values()) else None,
                 label_column=SAMPLE_LABEL if any(lb for _, lb in roles.values()) else None,
                 metadata_columns=default_metadata_columns(columns, "image", "key"),
                 notes=["its jobs wrote different text or label columns: each sample keeps its own job's"])


def _roles_by_tar(index: dict, columns: set[str]) -> dict[str, tuple[str | None, str | None]]:
    """Each shard's tar name -> the text and label columns of the job that wrote it (those the frame has)."""
    from ..format.index import job_for_shard

    roles = {}
    for position, entry in enumerate(index.get("shardlist") or []):
        options = job_for_shard(index, position).get("options") or {}
        text, label = options.get("text_column"), options.get("label_column")
        roles[entry.get("url")] = (text if text in columns else None, label if label in columns else None)
    return roles


def _sample_roles(part: pd.DataFrame, roles: dict[str, tuple[str | None, str | None]]) -> pd.DataFrame:
    """``part`` with :data:`SAMPLE_TEXT` and :data:`SAMPLE_LABEL`: each row's text and label, taken from
    the columns its shard's job wrote them from (null where that job wrote none)."""
    text = pd.Series(None, index=part.index, dtype=object)
    label = pd.Series(pd.NA, index=part.index, dtype="Int64")
    for tar, (text_column, label_column) in roles.items():
        rows = (part["tar_file"] == tar).to_numpy()
        if text_column is not None and rows.any():
            text[rows] = part.loc[rows, text_column].astype(object)
        if label_column is not None and rows.any():
            label[rows] = part.loc[rows, label_column]
    return part.assign(**{SAMPLE_TEXT: text, SAMPLE_LABEL: label})


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
        found = self.fs.cat(paths, on_error="raise") if paths else {}  # concurrent GETs on object stores
        data = [found[p] for p in paths]
        return pd.DataFrame({
            "key": pd.Series(keys, dtype=pd.StringDtype("pyarrow")),
            "image": pd.Series(pd.arrays.ArrowExtensionArray(pa.array(data, type=pa.large_binary()))),
            "path": pd.Series(relative, dtype=pd.StringDtype("pyarrow")),
        })
