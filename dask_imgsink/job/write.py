"""The per-partition write task: encode its rows, then stage its shards or (exact packing) keep its run."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from ..core.keys import generated_key
from ..core.writer import Rows, ShardTarget, write_rows
from ..format.layout import failed_marker, new_attempt_dir, staged
from ..format.schema import user_table
from ..storage import remove_quietly, resolve
from .claim import Claim
from .cleanup import discard_staging
from .lock import aborted_here
from .options import WriteOptions
from .results import PartitionResult, TaskFailed, cancelled, failure
from .unique import key_hashes

CONVERT_STRING_HELP = (
    "Dask converts object columns to strings by default (the 'dataframe.convert-string' "
    "setting), which turns arrays into their text repr and cannot hold encoded bytes. Fix: "
    "build the DataFrame under `with dask.config.set({'dataframe.convert-string': False}): "
    "ddf = dd.from_pandas(pdf, npartitions=...)`, or create the image column inside "
    "`map_partitions` with an object `meta`, or hold encoded bytes in a "
    "`pd.ArrowDtype(pa.binary())` column"
)


def _is_binary(arrow: pa.DataType) -> bool:
    return pa.types.is_binary(arrow) or pa.types.is_large_binary(arrow) or pa.types.is_binary_view(arrow)


def _is_image_struct(arrow: pa.DataType) -> bool:
    """``struct<bytes: binary, path: string>``, as Hugging Face stores images (path optional)."""
    if not pa.types.is_struct(arrow):
        return False
    names = [f.name for f in arrow]
    return "bytes" in names and _is_binary(arrow.field("bytes").type)


def check_image_dtype(dtype: Any, column: str, where: str = "") -> None:
    """Raise ``TypeError`` unless ``dtype`` can hold images (object, Arrow binary, or an image struct)."""
    arrow = dtype.pyarrow_dtype if isinstance(dtype, pd.ArrowDtype) else None
    if arrow is not None and (_is_binary(arrow) or _is_image_struct(arrow)):
        return
    if isinstance(dtype, pd.StringDtype) or (
        arrow is not None and (pa.types.is_string(arrow) or pa.types.is_large_string(arrow))
    ):
        raise TypeError(f"{where}the image column {column!r} has a string dtype ({dtype}). {CONVERT_STRING_HELP}")
    if dtype == object:
        return
    raise TypeError(
        f"{where}the image column {column!r} has dtype {dtype}; it must be an object column "
        "(NumPy arrays, encoded bytes, PIL images or {'bytes', 'path'} dicts), a "
        "pd.ArrowDtype(pa.binary()) column of encoded bytes, or an Arrow struct<bytes: binary, "
        "path: string> column of Hugging Face images"
    )


def check_label_dtype(dtype: Any, column: str) -> None:
    """Raise ``TypeError`` if ``dtype`` cannot hold integer class ids (strings, say)."""
    arrow = dtype.pyarrow_dtype if isinstance(dtype, pd.ArrowDtype) else None
    is_text = isinstance(dtype, pd.StringDtype) or (
        arrow is not None and (pa.types.is_string(arrow) or pa.types.is_large_string(arrow)))
    if is_text or (arrow is None and dtype != object and not pd.api.types.is_numeric_dtype(dtype)):
        raise TypeError(
            f"label_column {column!r} has dtype {dtype}; WebDataset's key.cls holds an integer class id "
            "(readers decode it with int()). Map names to ids (ddf[col].astype('category').cat.codes), "
            "or write the names with text_column or as a metadata column"
        )


def _column_values(frame: pd.DataFrame, column: str | None) -> list | None:
    return None if column is None else frame[column].tolist()


def writes_need_claim(opts: WriteOptions) -> bool:
    """Whether the write tasks wait for the claim (the job's first task, which takes the directory).

    Per-partition packing stages files, which only the directory's holder may do,
    and keys generated for an append are numbered after the dataset's partitions,
    which the claim reads. Exact packing otherwise writes nothing (runs stay in
    memory) and needs nothing of the claim. Not waiting for it keeps each write
    task where its partition is: once both workers held the claim, both were
    candidates for every task, and Dask sent a small partition to the less busy
    one (383 of 1,000 partitions of 25 small images moved on a 2 x 1 cluster).
    """
    return opts.packing != "exact" or (opts.key_column is None and opts.mode == "append")


def mark_failed(opts: WriteOptions) -> None:
    """Leave the job's failure marker: its write tasks that have not started yet stop early."""
    try:
        fs, root = resolve(opts.url, opts.storage_options)
        fs.pipe_file(failed_marker(root, opts.job_id), b"")
    except Exception:
        pass  # the marker only saves time; the commit still sees the failure


class PartitionWriter:
    """Write one partition: encode its rows and stage its shards (or, for exact packing, make its run).

    An exact-packing run is the partition's samples as tar bytes in memory
    (:class:`~dask_imgsink.core.writer.ShardTarget`): Dask keeps it as this task's
    result, moves it to the assembling worker, and spills it to the worker's
    local disk only under memory pressure, so each shard's bytes are written
    once, to the shard.

    Called by Dask as ``writer(partition_frame, partition_index, claim)``; returns a
    :class:`~dask_imgsink.job.results.PartitionResult`, or a
    :class:`~dask_imgsink.job.results.TaskFailed` (see :mod:`~dask_imgsink.job.results`).
    ``claim`` is ``None`` when the task does not wait for the claim (:func:`writes_need_claim`):
    it then writes nothing into the output directory, not even the marker of a failure.
    Each call (each attempt, should Dask rerun it) writes to a fresh staging
    folder, so a rerun never collides with a lost attempt's files.
    """

    def __init__(self, opts: WriteOptions) -> None:
        self.opts = opts

    def __dask_tokenize__(self):
        return ("dask_imgsink.PartitionWriter", *self.opts.token())

    def __call__(self, frame: pd.DataFrame, partition: int, claim: Claim | None) -> PartitionResult | TaskFailed:
        opts = self.opts
        if claim is not None and claim.done:  # the job committed before this computation began: nothing to write
            return PartitionResult(partition, len(frame), [], [])
        fs, root = resolve(opts.url, opts.storage_options)
        if fs.exists(failed_marker(root, opts.job_id)):
            return cancelled(f"partition {partition}")
        try:
            result = self._write(fs, root, frame, partition, claim)
        except Exception as exc:
            if claim is not None:  # without the claim the directory is not ours yet: the assembly marks it
                mark_failed(opts)
            return failure(exc, f"the write task of partition {partition}")
        if aborted_here(opts.job_id):  # the job failed meanwhile and was cleaned up: leave nothing
            discard_staging(fs, root, opts.job_id)
            return cancelled(f"partition {partition}")
        return result

    def _rows(self, frame: pd.DataFrame, partition: int, claim: Claim | None) -> tuple[Rows, dict | None]:
        """The partition's rows for the writer, and its metadata columns' tally (see ``user_table``)."""
        opts = self.opts
        check_image_dtype(frame[opts.image_column].dtype, opts.image_column, f"partition {partition}: ")
        if opts.key_column is None:
            first = claim.first_partition if claim is not None else 0  # numbered from 0 unless appending
            keys = [generated_key(first + partition, r) for r in range(len(frame))]
        else:
            keys = frame[opts.key_column].tolist()
        meta, problems, fitting = user_table(frame, opts.user_schema) if opts.metadata_columns else (None, {}, None)
        return Rows(
            images=frame[opts.image_column].tolist(),
            keys=keys,
            texts=_column_values(frame, opts.text_column),
            labels=_column_values(frame, opts.label_column),
            columns={"image": opts.image_column, "key": opts.key_column, "text": opts.text_column,
                     "label": opts.label_column},
            meta=meta,
            problems=problems,
        ), fitting

    def _write(self, fs, root: str, frame: pd.DataFrame, partition: int, claim: Claim | None) -> PartitionResult:
        opts = self.opts
        rows, fitting = self._rows(frame, partition, claim)
        exact = opts.packing == "exact"
        attempt: list[str] = []

        def target_for(chunk: int) -> ShardTarget:
            if exact:
                return ShardTarget("", "", "", run=True)  # the partition's run, in memory: no file
            if not attempt:
                attempt.append(new_attempt_dir(root, opts.job_id, f"write-{partition:06d}"))
                fs.makedirs(attempt[0], exist_ok=True)
            stem = opts.partition_stem(claim.first_partition + partition, chunk)
            return ShardTarget(staged(attempt[0], f"{stem}.tar"), staged(attempt[0], f"{stem}.parquet"),
                               f"{stem}.tar", idx_path=staged(attempt[0], f"{stem}.idx") if opts.dali_index else None)

        try:
            shards, skipped = write_rows(
                rows, fs=fs, target_for=target_for,
                images_per_tar=None if exact else opts.images_per_tar,
                options=opts.encode, on_error=opts.on_error, partition=partition,
                encode_threads=opts.encode_threads, shard_checksums=not exact,
                max_shard_bytes=None if exact else opts.max_shard_bytes, repeats=_repeat_rule(opts),
                dali_index=opts.dali_index,
            )
        except BaseException:
            if attempt:
                remove_quietly(fs, attempt[0], recursive=True)
            raise
        result = PartitionResult(partition, len(frame), shards, skipped, fitting=fitting)
        if opts.key_column is not None:
            left_out = {s.row for s in skipped}
            written = [i for i in range(len(frame)) if i not in left_out]
            result.written_rows = np.asarray(written, dtype=np.int64)
            result.key_hashes = key_hashes([str(rows.keys[i]) for i in written])
        return result


def _repeat_rule(opts: WriteOptions) -> str:
    """How a write task finds a repeated key in its partition (see :data:`~dask_imgsink.core.writer.REPEAT_RULES`).

    ``unique_keys="dataset"``: any repeat, as the plan would. ``"shard"``: only one in the same
    shard, the rule the plan applies across partitions, so that which rows are written does
    not depend on where the partitions split: the partition's own shards decide it under
    per-partition packing, the job's plan under exact packing.
    """
    if opts.unique_keys != "shard":
        return "rows"
    return "plan" if opts.packing == "exact" else "shard"
