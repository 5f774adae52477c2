"""Read a written dataset back as a Dask DataFrame: one partition per shard.

Each partition reads its shard's Parquet file (only the columns asked for, rows
filtered by ``filters`` before anything else is read) and then, only if the
image column is wanted, the image bytes from the tar by their recorded
``offset``/``size`` as byte-range reads (:mod:`~dask_imgsink.read.ranges`). A
query on metadata alone never opens a tar; Dask's column projection
(``ddf[["key", "aesthetic"]]``) reaches the read, so it holds for projections
made after the call too.

The index is the sample's position in the dataset (``sample``: 0 for the first
sample of the first shard), and the divisions come from ``_index.json``'s sample
counts, so ``npartitions`` and ``divisions`` are known without reading a byte
of the shards.

Column types: the writer's columns keep theirs (``offset``/``size`` int64,
``width``/``height`` int32, ...); strings are ``string[pyarrow]`` and floats
``float64`` as in ``dd.read_parquet``; every other user column (integers,
booleans, lists, structs, timestamps) is a ``pd.ArrowDtype`` of its Parquet
type, so nulls never change a dtype between partitions and writing the frame
again keeps each column's Arrow type. The image column is ``large_binary`` bytes
(``pd.ArrowDtype``), or with ``decode=True`` an object column of ``uint8``
arrays (H, W, C), or (H, W) for grayscale images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..core.encode import DEFAULT_MAX_PIXELS, decode_encoded
from ..core.pixels import pil_to_array
from ..errors import CorruptSampleError
from ..format.checksums import SAMPLE_CHECKSUM_COLUMN, sample_checksum
from ..format.index import last_job, read_index
from ..format.layout import index_layout, parquet_name
from ..format.schema import WRITER_FIELDS, recorded_schema
from ..storage import join, resolve
from .ranges import read_ranges

#: The name of the image column ``read_webdataset`` adds.
IMAGE_COLUMN = "image"
#: The name of the index: the sample's position in the dataset.
INDEX_NAME = "sample"
_WRITER_NAMES = {f.name for f in WRITER_FIELDS}


@dataclass(frozen=True)
class ShardRef:
    """One shard to read: its files, and where its samples start in the dataset."""

    tar: str
    parquet: str
    first_sample: int
    nsamples: int


def column_dtype(field: pa.Field) -> Any:
    """The pandas dtype a Parquet column gets (see the module docstring)."""
    kind = field.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return pd.StringDtype("pyarrow")
    if pa.types.is_floating(kind):
        return np.dtype(kind.to_pandas_dtype())
    if field.name in _WRITER_NAMES and pa.types.is_integer(kind) and not field.nullable:
        return np.dtype(kind.to_pandas_dtype())
    return pd.ArrowDtype(kind)


def to_frame(table: pa.Table, dtypes: dict[str, Any]) -> pd.DataFrame:
    """``table`` as pandas with ``dtypes`` (Arrow-backed columns without a copy through Python)."""
    data = {}
    for name in table.column_names:
        dtype = dtypes[name]
        column = table.column(name)
        if isinstance(dtype, pd.ArrowDtype):
            data[name] = pd.Series(pd.arrays.ArrowExtensionArray(column), copy=False)
        else:
            data[name] = column.to_pandas().astype(dtype, copy=False)
    return pd.DataFrame(data)


class ShardReader:
    """Reads one shard into a pandas DataFrame; Dask projects columns through ``columns=``."""

    def __init__(self, fs, schema: pa.Schema, *, images: bool, decode: bool, verify: bool,
                 filters: Any, max_pixels: int) -> None:
        self.fs = fs
        self.schema = schema
        self.images = images
        self.decode = decode
        self.verify = verify
        self.filters = filters
        self.max_pixels = max_pixels
        self.dtypes = {f.name: column_dtype(f) for f in schema}
        self.meta = self._empty_frame()

    def _empty_frame(self) -> pd.DataFrame:
        """The empty frame every partition matches."""
        frame = to_frame(self.schema.empty_table(), self.dtypes)
        if self.images:
            frame[IMAGE_COLUMN] = pd.Series([], dtype=object if self.decode else pd.ArrowDtype(pa.large_binary()))
        frame.index = pd.Index([], dtype="int64", name=INDEX_NAME)
        return frame

    def __call__(self, shard: ShardRef, columns: Sequence[str] | None = None) -> pd.DataFrame:
        wanted = list(columns) if columns is not None else list(self.meta.columns)
        with_images = IMAGE_COLUMN in wanted
        table, positions = self._rows(shard, [c for c in wanted if c != IMAGE_COLUMN], with_images)
        frame = to_frame(table.select([c for c in wanted if c != IMAGE_COLUMN]), self.dtypes)
        if with_images:
            frame[IMAGE_COLUMN] = self._images(shard, table)
        frame.index = pd.Index(shard.first_sample + positions, dtype="int64", name=INDEX_NAME)
        return frame[wanted]

    def _rows(self, shard: ShardRef, metadata: list[str], with_images: bool) -> tuple[pa.Table, np.ndarray]:
        """The shard's rows that pass ``filters``: the wanted columns and what reading images needs."""
        needed = list(metadata)
        if with_images:
            needed += ["key", "offset", "size", "format"]
            if self.verify:
                needed += ["sample_offset", "sample_size", SAMPLE_CHECKSUM_COLUMN]
        expression = None if self.filters is None else pq.filters_to_expression(self.filters)
        if expression is not None:
            needed += _filter_columns(self.filters, self.schema)
        needed = list(dict.fromkeys(needed))
        with self.fs.open(shard.parquet, "rb") as f:
            table = pq.ParquetFile(f, pre_buffer=False).read(columns=needed, use_threads=False)
        positions = np.arange(table.num_rows, dtype="int64")
        if expression is not None:
            table = table.append_column("__position__", pa.array(positions)).filter(expression)
            positions = table.column("__position__").to_numpy()
        return table, positions

    def _images(self, shard: ShardRef, table: pa.Table) -> pd.Series:
        keys = table.column("key").to_pylist()
        if self.verify:
            images = self._verified_images(shard, table, keys)
        else:
            starts = table.column("offset").to_pylist()
            ends = [s + n for s, n in zip(starts, table.column("size").to_pylist())]
            images = read_ranges(self.fs, shard.tar, list(zip(starts, ends)))
        if self.decode:
            formats = table.column("format").to_pylist()
            return pd.Series([self._decoded(data, fmt, shard, key) for data, fmt, key in zip(images, formats, keys)],
                             dtype=object)
        return pd.Series(pd.arrays.ArrowExtensionArray(pa.array(images, type=pa.large_binary())), copy=False)

    def _verified_images(self, shard: ShardRef, table: pa.Table, keys: list[str]) -> list[bytes]:
        """Read whole samples, check each against its XXH3-64, and cut the image out of it."""
        starts = table.column("sample_offset").to_pylist()
        sizes = table.column("sample_size").to_pylist()
        samples = read_ranges(self.fs, shard.tar, [(s, s + n) for s, n in zip(starts, sizes)])
        images = []
        for sample, start, offset, size, expected, key in zip(
                samples, starts, table.column("offset").to_pylist(), table.column("size").to_pylist(),
                table.column(SAMPLE_CHECKSUM_COLUMN).to_pylist(), keys):
            if sample_checksum(sample) != expected:
                raise CorruptSampleError(shard.tar, key, f"its bytes do not match their recorded "
                                         f"checksum (XXH3-64 {expected})")
            images.append(sample[offset - start:offset - start + size])
        return images

    def _decoded(self, data: bytes, fmt: str, shard: ShardRef, key: str) -> np.ndarray:
        try:
            return pil_to_array(decode_encoded(data, fmt, self.max_pixels))
        except Exception as exc:
            raise CorruptSampleError(shard.tar, key, f"its {fmt.upper()} image cannot be decoded "
                                     f"({type(exc).__name__}: {exc})") from None


def _check_filters(schema: pa.Schema, filters: Any) -> None:
    """Refuse, at call time, filters pyarrow cannot read or that name a column the dataset lacks."""
    if filters is None or isinstance(filters, pc.Expression):
        return
    try:
        pq.filters_to_expression(filters)
        names = _filter_columns(filters, schema)
    except (TypeError, ValueError, IndexError) as exc:
        raise ValueError(f"filters={filters!r:.200} is not pyarrow's DNF form, a list of (column, op, value) "
                         f"tuples or a list of such lists ({exc})") from None
    missing = [n for n in names if n not in schema.names]
    if missing:
        raise ValueError(f"filters name column(s) {missing} the dataset does not have; columns: {schema.names}")


def _filter_columns(filters: Any, schema: pa.Schema) -> list[str]:
    """The columns ``filters`` (DNF tuples, or an Arrow expression: then every column) refer to."""
    if isinstance(filters, pc.Expression):
        return list(schema.names)
    groups = filters if isinstance(filters[0], list) else [filters]
    return [term[0] for group in groups for term in group]


def read_webdataset(
    path: str,
    *,
    columns: Sequence[str] | None = None,
    images: bool = True,
    decode: bool = False,
    filters: Any = None,
    verify: bool = False,
    storage_options: dict[str, Any] | None = None,
):
    """Read a dataset written by dask-imgsink as a Dask DataFrame, one partition per shard.

    Parameters
    ----------
    path : str
        The dataset directory (local path or fsspec URL, e.g. ``"s3://bucket/out"``).
    columns : list of str, optional
        Columns to read: any of the Parquet columns (the writer's ``key``,
        ``tar_file``, ``offset``, ``size``, ``format``, ``width``, ... and your
        metadata columns) and ``"image"``. Default: all of them, and the
        image when ``images`` is true. Without ``"image"`` no tar is opened.
    images : bool, default True
        Add the image column (by default) at all. ``False`` reads metadata only.
    decode : bool, default False
        Give the images as decoded ``uint8`` arrays instead of their encoded bytes.
    filters : list of tuples or list of lists of tuples, optional
        Row filters in pyarrow's DNF form (``[("aesthetic", ">", 5)]``), applied to
        each shard's Parquet before any image byte is read.
    verify : bool, default False
        Read each sample whole and check it against its recorded XXH3-64 checksum;
        a mismatch raises :class:`~dask_imgsink.errors.CorruptSampleError` naming
        the shard and key.
    storage_options : dict, optional
        Passed to fsspec (credentials, endpoint, ...).

    Returns
    -------
    dask.dataframe.DataFrame
        Indexed by ``sample`` (the sample's position in the dataset), with known
        divisions; ``npartitions`` is the number of non-empty shards.

    Raises
    ------
    FileNotFoundError
        ``path`` holds no ``_index.json`` (no dataset, or its job never committed).
    ValueError
        A column asked for does not exist.
    """
    import dask
    import dask.dataframe as dd

    fs, root = resolve(path, storage_options)
    index = read_index(fs, root)
    if index is None:
        raise FileNotFoundError(f"{path} holds no _index.json: it is not a dataset written by dask-imgsink, "
                                "or the job writing it has not committed yet")
    shards = _shard_refs(index, root)
    schema = _dataset_schema(fs, shards, index)
    _check_columns(schema, columns, images)
    if isinstance(filters, (list, tuple)) and not filters:
        filters = None  # no condition: every row, as pyarrow reads it
    _check_filters(schema, filters)
    wants_images = images and (columns is None or IMAGE_COLUMN in columns)
    reader = ShardReader(fs, schema, images=wants_images, decode=decode, verify=verify, filters=filters,
                         max_pixels=_max_pixels(index))
    meta = reader.meta
    if not shards:
        frame = dd.from_pandas(meta, npartitions=1, sort=False)
    else:
        divisions = [s.first_sample for s in shards] + [shards[-1].first_sample + shards[-1].nsamples - 1]
        # Strings are already string[pyarrow]; Dask's convert-string would turn decoded arrays into text.
        with dask.config.set({"dataframe.convert-string": False}):
            frame = dd.from_map(reader, shards, meta=meta, divisions=divisions, label="read-webdataset",
                                enforce_metadata=False)
    return frame if columns is None else frame[list(columns)]


def _shard_refs(index: dict, root: str) -> list[ShardRef]:
    """The dataset's non-empty shards in order, with the position of each one's first sample."""
    layout = index_layout(index)
    refs, first = [], 0
    for entry in index["shardlist"]:
        parquet = entry.get("parquet") or parquet_name(entry["url"], layout)
        if entry["nsamples"]:
            refs.append(ShardRef(join(root, entry["url"]), join(root, parquet), first, entry["nsamples"]))
        first += entry["nsamples"]
    return refs


def _dataset_schema(fs, shards: list[ShardRef], index: dict) -> pa.Schema:
    """Every shard's Parquet schema (all shards share one); for a dataset with no shard, the one its
    job recorded (the writer's columns alone if it recorded none)."""
    if not shards:
        return recorded_schema(index) or pa.schema(WRITER_FIELDS)
    with fs.open(shards[0].parquet, "rb") as f:
        return pq.ParquetFile(f, pre_buffer=False).schema_arrow


def _check_columns(schema: pa.Schema, columns: Sequence[str] | None, images: bool) -> None:
    if IMAGE_COLUMN in schema.names and images:
        raise ValueError(f"the dataset has a metadata column named {IMAGE_COLUMN!r}, the name of the image column "
                         "read_webdataset adds; pass images=False to read the metadata")
    if columns is None:
        return
    if isinstance(columns, str):
        raise TypeError(f"columns must be a list of names, not the string {columns!r} (pass [{columns!r}])")
    known = list(schema.names) + ([IMAGE_COLUMN] if images else [])
    unknown = [c for c in columns if c not in known]
    if unknown:
        hint = " (pass images=True to read the image)" if IMAGE_COLUMN in unknown and not images else ""
        raise ValueError(f"columns {unknown} are not in the dataset; it has {known}{hint}")


def _max_pixels(index: dict) -> int:
    """The pixel limit the dataset was written with (decoding refuses larger images)."""
    options = last_job(index).get("options") or {}
    value = options.get("max_pixels")
    return value if isinstance(value, int) and value > 0 else DEFAULT_MAX_PIXELS
