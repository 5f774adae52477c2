"""The job commit: output-directory policy, publishing staged shards, index, card, _SUCCESS.

Modelled on Hadoop/Spark output committers: tasks only ever write below
``<output>/_temporary/<job id>/``; the single commit task, which runs after
every shard is staged, moves them to their final names, then writes
``_errors.parquet`` (if rows were skipped), ``_index.json`` (a wids shard index
with our totals beside it), the dataset card ``README.md``, and ``_SUCCESS``
last, and finally removes the job's staging folder.
"""

from __future__ import annotations

import json
import logging
import posixpath

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..format.schema import read_parquet
from ..format.index import build_index, dataset_card, next_numbers, read_index
from ..format.layout import CARD_FILE, ERRORS_FILE, INDEX_FILE, SUCCESS_FILE
from .options import STAGING_DIR, WriteOptions
from ..storage import is_local, join, publish, remove_quietly, resolve, write_bytes_atomic
from ..core.tasks import FileGroupTask
from ..core.writer import SkippedRow, WrittenShard

logger = logging.getLogger("dask_imgsink")

ERRORS_SCHEMA = pa.schema(
    [("job_id", pa.string()), ("partition", pa.int64()), ("row", pa.int64()),
     ("key", pa.string()), ("reason", pa.string())]
)


def existing_entries(fs, root: str) -> list[str]:
    """Names in the output directory, ignoring the staging folder."""
    if not fs.exists(root):
        return []
    if not fs.isdir(root):
        raise NotADirectoryError(f"the output path {root!r} exists and is not a directory")
    names = [posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False)]
    return sorted(n for n in names if n != STAGING_DIR)




def _not_empty_error(url: str, names: list[str]) -> FileExistsError:
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return FileExistsError(
        f"the output directory {url!r} is not empty ({len(names)} entries: {shown}); "
        "pass mode='overwrite' to replace what is there, or mode='append' to add shards "
        "to the dataset there"
    )


def prepare_output(fs, root: str, url: str, mode: str, name_prefix: str) -> tuple[int, int]:
    """Check the output directory against ``mode`` before any work is scheduled.

    Returns
    -------
    first_shard, first_partition : int
        Where numbering starts: 0, or after the dataset already there (append).

    Raises
    ------
    FileExistsError
        ``mode="error"`` and the directory holds anything (besides ``_temporary``).
    ValueError
        ``mode="append"`` onto a directory that holds files but no ``_index.json``,
        or ``mode="overwrite"`` of a directory holding the working directory.
    """
    if mode == "overwrite" and is_local(fs):
        import os

        cwd = os.path.abspath(os.getcwd())
        target = os.path.abspath(root)
        if cwd == target or cwd.startswith(target.rstrip(os.sep) + os.sep):
            raise ValueError(
                f"mode='overwrite' would delete {url!r}, which holds the current working "
                "directory; write the dataset to a directory of its own"
            )
    names = existing_entries(fs, root)
    if mode == "error" and names:
        raise _not_empty_error(url, names)
    if mode != "append" or not names:
        return 0, 0
    index = read_index(fs, root)
    if index is None:
        raise ValueError(
            f"mode='append' needs the dataset's {INDEX_FILE} in {url!r}, and there is none: "
            "it is not a complete dask-imgsink dataset. Use mode='overwrite' to replace it"
        )
    return next_numbers(index, name_prefix)




def _clear_output(fs, root: str, keep: set[str] = frozenset()) -> None:
    """Remove an old dataset (but ``keep``): its completion marker first, so it never looks whole."""
    for name in (SUCCESS_FILE, INDEX_FILE):
        remove_quietly(fs, join(root, name))
    for name in existing_entries(fs, root):
        if name not in keep:
            remove_quietly(fs, join(root, name), recursive=True)


def _display_path(fs, path: str) -> str:
    return path if is_local(fs) else fs.unstrip_protocol(path)




def commit_job(
    shards: list[tuple[WrittenShard, list[int]]],
    rows_in: int,
    skipped: list[SkippedRow],
    num_partitions: int,
    opts: WriteOptions,
) -> list[FileGroupTask]:
    """Publish the job's staged shards and write the dataset's index files.

    Parameters
    ----------
    shards : list of (WrittenShard, source partitions)
        In final order; each ``target.tar_file`` is the final tar name.
    rows_in : int
        Rows the job read (images written + rows skipped).
    skipped : list of SkippedRow
    num_partitions : int
    opts : WriteOptions

    Returns
    -------
    list of FileGroupTask
        One per shard pair, naming the final paths.
    """
    fs, root = resolve(opts.url, opts.storage_options)
    fs.makedirs(root, exist_ok=True)
    moves = []
    for shard, _ in shards:
        stem = shard.target.tar_file[: -len(".tar")]
        moves.append((shard.target.parquet_path, join(root, f"{stem}.parquet")))
        moves.append((shard.target.tar_path, join(root, f"{stem}.tar")))
    # Dask may run this task again (its worker died): whatever an earlier attempt
    # already published is ours, and an index that lists this job was written by it.
    published = {posixpath.basename(final) for staged, final in moves
                 if not fs.exists(staged) and fs.exists(final)}
    old_index = read_index(fs, root)
    indexed = old_index is not None and any(j.get("job_id") == opts.job_id for j in old_index.get("jobs", []))
    if not indexed:
        _apply_mode(fs, root, opts, old_index, keep=published)
    for staged, final in moves:
        if posixpath.basename(final) in published:
            continue
        if not fs.exists(staged):
            raise FileNotFoundError(
                f"the staged file {staged!r} is gone before the commit published it; "
                "something removed the job's staging folder. Run the job again"
            )
        publish(fs, staged, final)

    num_images = sum(s.num_images for s, _ in shards)
    totals = {"rows": rows_in, "images": num_images, "skipped": len(skipped), "shards": len(shards)}
    tasks = []
    entries = []
    for shard, partitions in shards:
        stem = shard.target.tar_file[: -len(".tar")]
        tar_final = join(root, f"{stem}.tar")
        parquet_final = join(root, f"{stem}.parquet")
        entries.append({"url": f"{stem}.tar", "nsamples": shard.num_images, "filesize": shard.tar_bytes})
        tasks.append(
            FileGroupTask(
                task_id=stem,
                dataset_name=opts.dataset_name,
                data=[_display_path(fs, tar_final), _display_path(fs, parquet_final)],
                _metadata={
                    "output_dir": opts.url,
                    "images_per_tar": opts.images_per_tar,
                    "num_images": shard.num_images,
                    "bytes": shard.tar_bytes,
                    "partition": partitions[0] if partitions else None,
                    "partitions": partitions,
                    "packing": opts.packing,
                    "job_id": opts.job_id,
                    "job_rows_in": rows_in,
                    "job_images_written": num_images,
                    "job_rows_skipped": len(skipped),
                },
            )
        )

    if indexed:
        index = old_index
    else:
        if skipped or (opts.mode == "append" and fs.exists(join(root, ERRORS_FILE))):
            _write_errors(fs, root, skipped, opts)
        previous = old_index if opts.mode == "append" else None
        index = _new_index(previous, entries, totals, num_partitions, opts)
        write_bytes_atomic(fs, join(root, INDEX_FILE), json.dumps(index, indent=1).encode())
    write_bytes_atomic(fs, join(root, CARD_FILE), _card(index, opts))
    write_bytes_atomic(fs, join(root, SUCCESS_FILE), b"")
    remove_staging(fs, opts)
    logger.info("committed %d shards (%d images, %d rows skipped) to %s",
                len(shards), num_images, len(skipped), opts.url)
    return tasks


def _apply_mode(fs, root: str, opts: WriteOptions, old_index: dict | None, keep: set[str]) -> None:
    """Check or clear the output directory just before publishing, as ``mode`` says.

    ``keep`` names files an earlier attempt of this commit already published.
    """
    if opts.mode == "error":
        names = [n for n in existing_entries(fs, root) if n not in keep and n != ERRORS_FILE]
        if names:
            raise _not_empty_error(opts.url, names)
    elif opts.mode == "overwrite":
        _clear_output(fs, root, keep)
    else:
        if old_index is not None and next_numbers(old_index, opts.name_prefix) != (
            opts.first_shard, opts.first_partition
        ):
            raise RuntimeError(
                f"another job appended to {opts.url!r} after this one was planned; run the append again"
            )
        remove_quietly(fs, join(root, SUCCESS_FILE))


def remove_staging(fs, opts: WriteOptions) -> None:
    """Remove the job's staging folder, and the staging root if no other job uses it.

    Called by the commit, and after a failed ``compute=True`` run; after a failure
    it is best effort: a task of the failed job that is still running may write
    below ``_temporary`` afterwards, where nothing looks final.
    """
    try:
        remove_quietly(fs, opts.job_dir, recursive=True)
        if fs.exists(opts.staging_root) and not fs.ls(opts.staging_root, detail=False):
            fs.rmdir(opts.staging_root)
    except OSError:
        pass  # another job is staging there, or a straggling task of this one




def _write_errors(fs, root: str, skipped: list[SkippedRow], opts: WriteOptions) -> None:
    """Write the skipped rows to ``_errors.parquet``, after earlier jobs' rows when appending."""
    table = pa.table(
        {
            "job_id": [opts.job_id] * len(skipped),
            "partition": [int(s.partition) for s in skipped],
            "row": [s.row for s in skipped],
            "key": [s.key for s in skipped],
            "reason": [s.reason for s in skipped],
        },
        schema=ERRORS_SCHEMA,
    )
    path = join(root, ERRORS_FILE)
    if opts.mode == "append" and fs.exists(path):
        old = read_parquet(fs, path).cast(ERRORS_SCHEMA)
        old = old.filter(pc.not_equal(old.column("job_id"), opts.job_id))  # a rerun replaces its rows
        table = pa.concat_tables([old, table])
    staged = join(opts.job_dir, ERRORS_FILE)
    fs.makedirs(opts.job_dir, exist_ok=True)
    with fs.open(staged, "wb") as f:
        pq.write_table(table, f)
    publish(fs, staged, path)


def _card(index: dict, opts: WriteOptions) -> bytes:
    ext = {"jpeg": "jpg"}.get(opts.encode.image_format, opts.encode.image_format)
    return dataset_card(opts.dataset_name, index, image_extension=ext, text_column=opts.text_column,
                        label_column=opts.label_column, metadata_columns=opts.metadata_columns)


def _new_index(old: dict | None, entries: list[dict], totals: dict, num_partitions: int,
               opts: WriteOptions) -> dict:
    job = {
        "job_id": opts.job_id,
        **totals,
        "options": {
            "packing": opts.packing,
            "images_per_tar": opts.images_per_tar,
            "image_format": opts.encode.image_format,
            "quality": opts.encode.quality,
            "image_column": opts.image_column,
            "key_column": opts.key_column,
            "text_column": opts.text_column,
            "label_column": opts.label_column,
            "metadata_columns": list(opts.metadata_columns),
            "on_error": opts.on_error,
        },
    }
    next_shard = opts.first_shard + (totals["shards"] if opts.packing == "exact" else 0)
    return build_index(old, entries, totals, job, name=opts.dataset_name, next_shard=next_shard,
                       next_partition=opts.first_partition + num_partitions)
