"""Per-shard Parquet metadata: one schema for every shard, typed user columns, key.json.

Every shard's Parquet holds the writer's columns (:data:`WRITER_FIELDS`) followed
by the user's metadata columns with their real Arrow types. The schema is fixed
before any data is seen (from the DataFrame's ``meta``), so every shard, and an
empty dataset, agree and ``dd.read_parquet(out)`` reads them together.
"""

from __future__ import annotations

import base64
from typing import Mapping

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import RowProblem
from .checksums import SAMPLE_CHECKSUM_COLUMN, sha256_hex
from .index import last_job
from .shapes import exact_array, is_nested, reshaped

#: The writer's own columns, first in every shard's Parquet.
WRITER_FIELDS = [
    pa.field("key", pa.string(), nullable=False),
    pa.field("tar_file", pa.string(), nullable=False),
    pa.field("member", pa.string(), nullable=False),
    pa.field("offset", pa.int64(), nullable=False),
    pa.field("size", pa.int64(), nullable=False),
    pa.field("sample_offset", pa.int64(), nullable=False),
    pa.field("sample_size", pa.int64(), nullable=False),
    pa.field(SAMPLE_CHECKSUM_COLUMN, pa.string(), nullable=False),
    pa.field("format", pa.string(), nullable=False),
    pa.field("width", pa.int32(), nullable=False),
    pa.field("height", pa.int32(), nullable=False),
    pa.field("channels", pa.int8(), nullable=False),
]
WRITER_COLUMNS = [f.name for f in WRITER_FIELDS]

#: Where a sample lives in a dataset; a DataFrame holding all of these was read from one (``read_webdataset``).
LOCATION_COLUMNS = ("tar_file", "member", "offset", "size", "sample_offset", "sample_size", SAMPLE_CHECKSUM_COLUMN)

#: What Dask's meta holds as the categories of a categorical column whose categories it does not know
#: (``dask.dataframe.utils.UNKNOWN_CATEGORIES``).
UNKNOWN_CATEGORIES = "__UNKNOWN_CATEGORIES__"

#: The Arrow type of such a column: its values are usually text, and no partition overflows 32-bit codes.
UNKNOWN_CATEGORIES_TYPE = pa.dictionary(pa.int32(), pa.string())

SCHEMA_FIX = "pass metadata_schema={'column': pa.list_(pa.string()), ...} to give its Arrow type"


def check_metadata_names(columns: list[str]) -> None:
    """Raise ``ValueError`` if a metadata column would clash with a writer column."""
    clash = [c for c in columns if c in WRITER_COLUMNS]
    if clash:
        raise ValueError(
            f"metadata column(s) {clash} clash with columns the writer adds to each shard's "
            f"Parquet ({WRITER_COLUMNS}); rename them (ddf.rename(columns=...)) or choose "
            "metadata_columns=[...] without them"
            + (" (to use the 'key' column as the sample keys, pass key_column='key')" if "key" in clash else "")
        )


def read_from_dataset(columns: list[str]) -> bool:
    """Whether a DataFrame with ``columns`` was read from a written dataset (it holds every location column)."""
    return set(LOCATION_COLUMNS) <= set(columns)


def default_metadata_columns(columns: list[str], image_column: str, key_column: str | None) -> list[str]:
    """Every column but the image and the key; of a frame read from a dataset, none of the writer's columns.

    The writer's columns of a re-written dataset are recomputed from the images,
    not copied: their old offsets and checksums would be wrong in the new shards.
    """
    chosen = [c for c in columns if c not in (image_column, key_column)]
    if read_from_dataset(columns):
        chosen = [c for c in chosen if c not in WRITER_COLUMNS]
    return chosen


def user_schema_from_meta(
    meta: pd.DataFrame,
    columns: list[str],
    overrides: Mapping[str, pa.DataType] | pa.Schema | None = None,
) -> pa.Schema:
    """The Arrow schema of the user's metadata columns, from an empty frame.

    Object columns hold no type information; they become ``string`` (what text
    columns are when ``dataframe.convert-string`` is off) unless ``overrides``
    names their type. A categorical column whose categories Dask does not know
    (``astype('category')``) is a dictionary of strings with 32-bit codes: the
    width its partitions' categories need is not known either. pandas' string columns (``str``, ``string[pyarrow]``, which
    Arrow would give as ``large_string``) are ``string`` too, so a frame read
    back from a dataset writes the types it was read with.

    Raises
    ------
    ValueError
        If a column clashes with one of :data:`WRITER_COLUMNS`.
    """
    check_metadata_names(columns)
    if isinstance(overrides, pa.Schema):
        overrides = {f.name: f.type for f in overrides}
    overrides = dict(overrides or {})
    unknown = set(overrides) - set(columns)
    if unknown:
        raise ValueError(f"metadata_schema names column(s) {sorted(unknown)} that are not metadata columns {columns}")
    fields = []
    for col in columns:
        if col in overrides:
            fields.append(pa.field(col, overrides[col]))
        elif _unknown_categories(meta[col].dtype):  # astype('category'); dd.read_parquet of a dictionary column
            fields.append(pa.field(col, UNKNOWN_CATEGORIES_TYPE))
        elif meta[col].dtype == object or isinstance(meta[col].dtype, pd.StringDtype):
            fields.append(pa.field(col, pa.string()))  # pandas' strings are Arrow's string, whatever their storage
        else:
            inferred = pa.Schema.from_pandas(meta[[col]], preserve_index=False).field(col)
            fields.append(inferred)
    return pa.schema(fields)


def narrowed(type_: pa.DataType) -> pa.DataType:
    """``type_`` with its 64-bit-offset variants (``large_string``, ``large_binary``, ``large_list``) made 32-bit,
    at any depth: two types alike but for those hold the same values."""
    if pa.types.is_large_string(type_):
        return pa.string()
    if pa.types.is_large_binary(type_):
        return pa.binary()
    if pa.types.is_large_list(type_) or pa.types.is_list(type_):
        return pa.list_(type_.value_field.with_type(narrowed(type_.value_type)))
    if pa.types.is_fixed_size_list(type_):
        return pa.list_(type_.value_field.with_type(narrowed(type_.value_type)), type_.list_size)
    if pa.types.is_struct(type_):
        return pa.struct([type_.field(i).with_type(narrowed(type_.field(i).type)) for i in range(type_.num_fields)])
    if pa.types.is_map(type_):
        return pa.map_(narrowed(type_.key_type), type_.item_field.with_type(narrowed(type_.item_type)),
                       keys_sorted=type_.keys_sorted)
    return type_


def _categories_cast(dtype, type_: pa.DataType) -> bool:
    """Whether Arrow would cast a categorical's non-text categories to the text values of ``type_``."""
    return (isinstance(dtype, pd.CategoricalDtype) and pa.types.is_dictionary(type_)
            and pa.types.is_string(type_.value_type) and dtype.categories.dtype != object
            and not isinstance(dtype.categories.dtype, pd.StringDtype))


def _unknown_categories(dtype) -> bool:
    """Whether ``dtype`` is a categorical whose categories the meta does not give: Dask's marker for
    unknown categories (``astype('category')``), or none at all (``dd.read_parquet`` of a dictionary column)."""
    return isinstance(dtype, pd.CategoricalDtype) and list(dtype.categories) in ([UNKNOWN_CATEGORIES], [])


def shard_schema(user_schema: pa.Schema) -> pa.Schema:
    """Writer columns followed by the user's columns."""
    return pa.schema(WRITER_FIELDS + list(user_schema))


def schema_record(schema: pa.Schema) -> str:
    """``schema`` as text for ``_index.json`` (Arrow IPC, base64): a dataset with no shard still has its columns."""
    return base64.b64encode(schema.serialize().to_pybytes()).decode("ascii")


def recorded_schema(index: dict) -> pa.Schema | None:
    """The shards' Parquet schema as the last job of ``index`` recorded it (``None``: written before it did)."""
    return schema_from_record(last_job(index).get("parquet_schema"))


def schema_from_record(record) -> pa.Schema | None:
    """The schema :func:`schema_record` wrote, or ``None`` when ``record`` is absent or not one."""
    if not isinstance(record, str):
        return None
    try:
        return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(record, validate=True)))
    except (ValueError, pa.ArrowException):
        return None


def user_table(frame: pd.DataFrame, schema: pa.Schema) -> tuple[pa.Table, dict[int, RowProblem], dict[str, list]]:
    """Convert the user's metadata columns of a partition to Arrow with ``schema``.

    A value that does not fit its column's type is a problem of its row (named
    with the column and the fix); the row's value becomes null here, and the
    writer refuses or skips the row. Whether a column's type is wrong rather than
    some of its values is for the job to judge, from every partition's tally
    (:func:`unfit_column_error`): one partition cannot tell.

    Returns
    -------
    table : pyarrow.Table
    problems : dict of row -> RowProblem
    tally : dict of column -> [values that fit, values that do not (nulls not counted), why the first did not]
    """
    columns, problems, tally = [], {}, {}
    for field in schema:
        array, unfit = _column_array(frame[field.name], field)
        columns.append(array)
        first = unfit[min(unfit)].reason if unfit else ""
        tally[field.name] = [len(array) - array.null_count, len(unfit), first]
        for row, problem in unfit.items():
            problems.setdefault(row, problem)
    return pa.Table.from_arrays(columns, schema=schema), problems, tally


_ARROW_REFUSALS = (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, UnicodeError, OverflowError)


def _column_array(values: pd.Series, field: pa.Field) -> tuple[pa.Array, dict[int, RowProblem]]:
    """One metadata column as Arrow, and the problem of each row whose value does not fit (null in the array)."""
    reshapes: dict[int, str] = {}
    if is_nested(field.type) and values.dtype == object:  # Arrow reshapes some of these values rather than refuse
        reshapes = {row: why for row, value in enumerate(values.tolist()) if (why := reshaped(value, field.type))}
    elif _categories_cast(values.dtype, field.type):  # Arrow would write them as their text
        why = (f"its categories are {values.dtype.categories.dtype}, not text; make the categories known "
               "(ddf[col] = ddf[col].cat.as_known()) or give their type in metadata_schema")
        reshapes = {row: why for row in np.flatnonzero(values.notna().to_numpy())}
    if not reshapes:
        try:
            return exact_array(values, field.type), {}
        except _ARROW_REFUSALS:
            pass
    cleaned, unfit = [], {}
    for row, value in enumerate(values.tolist()):
        reason = reshapes.get(row)
        if reason is None:
            try:
                exact_array([value], field.type)
            except _ARROW_REFUSALS as exc:
                reason = str(exc)
        if reason is not None:
            unfit[row] = RowProblem(f"the value {value!r:.60} does not fit Arrow type {field.type} ({reason})",
                                    f"{SCHEMA_FIX}, clean the value, or leave the column out with "
                                    "metadata_columns=[...]", field.name)
            value = None
        cleaned.append(value)
    return pa.array(cleaned, type=field.type, from_pandas=True), unfit


def unfit_column_error(tallies: list[dict[str, list]], schema: pa.Schema) -> TypeError | None:
    """The error for a metadata column none of whose values fit its type in the whole job, if any.

    Such a column's type is wrong, not its rows: the job fails, under ``on_error="skip"`` too,
    rather than leave out every row that has a value. Judged over every partition's tally
    (:func:`user_table`), so it never depends on where the partitions split.
    """
    for field in schema:
        fit = sum(t[field.name][0] for t in tallies if field.name in t)
        unfit = sum(t[field.name][1] for t in tallies if field.name in t)
        if unfit and not fit:
            first = next(t[field.name][2] for t in tallies if field.name in t and t[field.name][2])
            return TypeError(
                f"metadata column {field.name!r}: none of its {unfit} values fits Arrow type {field.type} (the "
                f"first: {first}); {SCHEMA_FIX}, or leave it out with metadata_columns=[...]"
            )
    return None


def read_parquet(fs, path: str) -> pa.Table:
    """Read one small Parquet file on ``fs``, on this thread, checking its page CRCs.

    Arrow's reader thread pools can abort the interpreter at exit when torn down
    with a thread still alive (apache/arrow#34314, seen here in the CLI); these
    files are small, so they are read without them.
    """
    with fs.open(path, "rb") as f:
        return parquet_from_bytes(f.read())


def parquet_from_bytes(data: bytes) -> pa.Table:
    """Parse a whole Parquet file held in memory, checking its page CRCs."""
    reader = pq.ParquetFile(pa.BufferReader(data), pre_buffer=False, page_checksum_verification=True)
    return reader.read(use_threads=False)


def parquet_bytes(table: pa.Table) -> bytes:
    """``table`` as a Parquet file, with page CRCs."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, write_page_checksum=True)
    return sink.getvalue().to_pybytes()


def write_parquet(table: pa.Table, fs, path: str) -> tuple[int, str]:
    """Write ``table`` to ``path`` on ``fs``; return the file's size and SHA-256."""
    data = parquet_bytes(table)
    with fs.open(path, "wb") as f:
        f.write(data)
    return len(data), sha256_hex(data)
