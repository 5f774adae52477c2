"""Rows -> tar shards + Parquet: the engine-free write loop under the stage and the accessor.

Images are encoded on the process's encoder pool with a bounded window and
written as they arrive, in row order; each sample's members (``key.jpg``,
``key.txt``, ``key.cls``, ``key.json``) are adjacent. A bad row raises
:class:`~dask_imgsink.errors.BadRowError` naming it, or is recorded as skipped.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import pandas as pd
import pyarrow as pa

from .encode import EncodeOptions, encode_image
from ..errors import BadRowError, RowProblem
from .keys import check_key
from ..format.schema import SAMPLE_RANGE_FIELDS, WRITER_FIELDS, json_rows, write_parquet
from .pool import map_ordered
from ..storage import remove_quietly
from .tarshard import TarShardWriter

logger = logging.getLogger("dask_imgsink")

ON_ERROR_CHOICES = ("raise", "skip")


@dataclass
class Rows:
    """The rows of one partition or batch, column by column.

    ``keys`` are raw (validated while writing); ``meta`` holds the user's
    metadata columns as Arrow, one row per image, or ``None`` for none.
    """

    images: Sequence[Any]
    keys: Sequence[Any]
    texts: Sequence[Any] | None = None
    labels: Sequence[Any] | None = None
    meta: pa.Table | None = None

    def __len__(self) -> int:
        return len(self.images)


@dataclass(frozen=True)
class ShardTarget:
    """Where one shard goes: the files to write and the tar name recorded in Parquet."""

    tar_path: str
    parquet_path: str
    tar_file: str


@dataclass
class WrittenShard:
    """A shard written by :func:`write_rows`."""

    target: ShardTarget
    num_images: int
    tar_bytes: int


@dataclass(frozen=True)
class SkippedRow:
    """A row left out with ``on_error="skip"``, and why."""

    partition: int | str
    row: int
    key: str | None
    reason: str


@dataclass
class _OpenShard:
    target: ShardTarget
    handle: Any
    tar: TarShardWriter
    records: dict[str, list] = field(default_factory=lambda: {f.name: [] for f in WRITER_FIELDS})
    meta_rows: list[int] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.meta_rows)


def _is_null(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def _label_text(value: Any) -> str:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def write_rows(
    rows: Rows,
    *,
    fs,
    target_for: Callable[[int], ShardTarget],
    images_per_tar: int | None,
    options: EncodeOptions,
    on_error: str = "raise",
    partition: int | str = 0,
    encode_threads: int | None = None,
    sample_ranges: bool = False,
    verbose: bool = False,
) -> tuple[list[WrittenShard], list[SkippedRow]]:
    """Encode and write ``rows`` as shards of at most ``images_per_tar`` images.

    Parameters
    ----------
    rows : Rows
    fs : fsspec filesystem
    target_for : callable
        ``target_for(i)`` names the ``i``-th shard of these rows.
    images_per_tar : int or None
        Images per shard; ``None`` writes one shard of every row.
    options : EncodeOptions
    on_error : {"raise", "skip"}
    partition : int or str
        Named in errors and skip records.
    encode_threads : int, optional
        Encoder pool size (default: the process's CPUs).
    sample_ranges : bool
        Add ``_sample_start``/``_sample_end`` (each sample's byte range) to the
        Parquet, for exact packing's byte-range copies.
    verbose : bool
        Log each shard at INFO level (DEBUG otherwise).

    Returns
    -------
    shards : list of WrittenShard
    skipped : list of SkippedRow

    Raises
    ------
    BadRowError
        For the first bad row when ``on_error="raise"``; files this call
        started are removed first.
    """
    if on_error not in ON_ERROR_CHOICES:
        raise ValueError(f"on_error={on_error!r} is not one of {list(ON_ERROR_CHOICES)}")
    n = len(rows)
    keys: list[str | None] = []
    problems: dict[int, RowProblem] = {}
    seen: dict[str, int] = {}
    for i, raw in enumerate(rows.keys):
        try:
            key = check_key(raw)
        except RowProblem as problem:
            problems[i] = problem
            keys.append(None)
            continue
        if key in seen:
            problems[i] = RowProblem(
                f"the key is used twice (rows {seen[key]} and {i} of this partition)",
                "make keys unique, e.g. ddf.drop_duplicates(subset='key')",
            )
        else:
            seen[key] = i
        keys.append(key)
    json_members = json_rows(rows.meta) if rows.meta is not None and rows.meta.num_columns else None

    def encode(i: int):
        if i in problems:
            return None
        return encode_image(rows.images[i], options)

    shards: list[WrittenShard] = []
    skipped: list[SkippedRow] = []
    created: list[str] = []
    current: _OpenShard | None = None

    def finish(shard: _OpenShard) -> None:
        size = shard.tar.close()
        shard.handle.close()
        columns = [pa.array(shard.records[f.name], f.type) for f in WRITER_FIELDS]
        fields = list(WRITER_FIELDS)
        if rows.meta is not None and rows.meta.num_columns:
            taken = rows.meta.take(pa.array(shard.meta_rows, pa.int64()))
            columns += list(taken.columns)
            fields += list(taken.schema)
        if sample_ranges:
            columns += [pa.array(shard.starts, pa.int64()), pa.array(shard.ends, pa.int64())]
            fields += SAMPLE_RANGE_FIELDS
        created.append(shard.target.parquet_path)
        write_parquet(pa.Table.from_arrays(columns, schema=pa.schema(fields)), fs, shard.target.parquet_path)
        shards.append(WrittenShard(shard.target, shard.count, size))
        logger.log(
            logging.INFO if verbose else logging.DEBUG,
            "wrote %s (%d images, %d bytes)", shard.target.tar_path, shard.count, size,
        )

    try:
        for i, fut in enumerate(map_ordered(encode, range(n), encode_threads)):
            problem = problems.get(i)
            encoded = None
            if problem is None:
                try:
                    encoded = fut.result()
                except RowProblem as exc:
                    problem = exc
            if problem is not None:
                shown_key = keys[i] if keys[i] is not None else str(rows.keys[i])
                if on_error == "raise":
                    raise BadRowError(problem.reason, fix=problem.fix, partition=partition, row=i, key=shown_key)
                skipped.append(SkippedRow(partition, i, shown_key, problem.reason))
                continue
            if current is None or (images_per_tar and current.count >= images_per_tar):
                if current is not None:
                    finish(current)
                target = target_for(len(shards))
                created.append(target.tar_path)
                handle = fs.open(target.tar_path, "wb")
                current = _OpenShard(target, handle, TarShardWriter(handle))
            key = keys[i]
            start = current.tar.position
            member = f"{key}.{encoded.extension}"
            offset, size = current.tar.add(member, encoded.data)
            if rows.texts is not None and not _is_null(rows.texts[i]):
                current.tar.add(f"{key}.txt", str(rows.texts[i]).encode("utf-8"))
            if rows.labels is not None and not _is_null(rows.labels[i]):
                current.tar.add(f"{key}.cls", _label_text(rows.labels[i]).encode("utf-8"))
            if json_members is not None:
                current.tar.add(f"{key}.json", json_members[i])
            rec = current.records
            rec["key"].append(key)
            rec["tar_file"].append(current.target.tar_file)
            rec["member"].append(member)
            rec["offset"].append(offset)
            rec["size"].append(size)
            rec["format"].append(encoded.format)
            rec["width"].append(encoded.width)
            rec["height"].append(encoded.height)
            rec["channels"].append(encoded.channels)
            current.meta_rows.append(i)
            current.starts.append(start)
            current.ends.append(current.tar.position)
        if current is not None:
            finish(current)
            current = None
    except BaseException:
        if current is not None:
            current.handle.close()
        for path in created:
            remove_quietly(fs, path)
        raise
    return shards, skipped
