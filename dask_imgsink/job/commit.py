"""The job commit: publish staged shards, then ``_index.json``, ``_errors.jsonl``, card, ``_SUCCESS``.

Only the commit changes the dataset, and only while its job holds the lock.
Dask may run it again after a worker died at any point, so every step is
idempotent and decided from a *journal* the first attempt writes to the job's
staging folder before it touches the directory:

- the files the job plans to publish (names, sizes, SHA-256s), over all attempts:
  these names are ours, never a foreign dataset;
- what the mode decided: the old dataset's files to remove (``overwrite``), the
  index to extend (``append``), the commit time.

Then: ``_SUCCESS`` goes first, the old files go (``overwrite``), each staged file
replaces its final name (a staged file is moved at most once, so a final file
whose staged copy is gone came from it), and the small files are written
through the staging folder (locally) or in one PUT, so no temporary file is ever
left in the dataset. ``_SUCCESS`` (which records the index's SHA-256) is last;
then the staging folder and the lock go. A commit that fails (rather than dies)
takes back what it published and restores an appended dataset's ``_SUCCESS``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

from ..core.pool import run_beside
from ..core.tasks import FileGroupTask
from ..core.writer import SkippedRow, WrittenShard
from ..format.card import dataset_card
from ..format.checksums import SAMPLE_CHECKSUM, SHARD_CHECKSUM, sha256_hex
from ..format.index import build_index, last_job, read_index, success_record
from ..format.layout import (
    CARD_FILE,
    EMPTY_PARQUET,
    ERRORS_FILE,
    INDEX_FILE,
    METADATA_DIR,
    SUCCESS_FILE,
    WORK_DIR,
    idx_name,
    job_dir,
    jobs_root,
    journal_path,
    lock_path,
    parquet_name,
)
from ..format.schema import parquet_bytes, schema_record, shard_schema
from ..format.skipped import errors_jsonl, read_errors
from ..storage import (
    files_below,
    forget_listings,
    is_local,
    is_s3,
    join,
    publish,
    read_bytes,
    read_many,
    remove_empty_dir,
    remove_file,
    remove_many,
    remove_quietly,
    resolve,
    write_small,
    write_small_many,
)
from .claim import Claim
from .cleanup import dead_files_below, sweep_dead_staging
from .lock import LostLockError, holds_lock, lock_read_holds, read_lock, release
from .output import existing_entries, not_empty_error, overwrite_removals
from .spread import publish_spread

logger = logging.getLogger("dask_imgsink")


@dataclass
class Journal:
    """What the first attempt of the commit planned and decided (see the module docstring)."""

    run_id: str
    committed_at: str
    planned: dict[str, list] = field(default_factory=dict)  # name -> [size, sha256]
    remove: list[str] = field(default_factory=list)
    base_index: dict | None = None
    old_success: str | None = None

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self)).encode()


@dataclass(frozen=True)
class PlannedFile:
    name: str
    staged: str
    size: int
    sha256: str


def planned_files(shards: list[tuple[WrittenShard, list[int]]]) -> list[PlannedFile]:
    """Each shard's Parquet, DALI index (if any), then its tar, in shard order."""
    files = []
    for shard, _ in shards:
        tar = shard.target.tar_file
        files.append(PlannedFile(parquet_name(tar), shard.target.parquet_path, shard.parquet_bytes,
                                 shard.parquet_sha256))
        if shard.target.idx_path is not None:
            files.append(PlannedFile(idx_name(tar), shard.target.idx_path, shard.idx_bytes, shard.idx_sha256))
        files.append(PlannedFile(tar, shard.target.tar_path, shard.tar_bytes, shard.tar_sha256))
    return files


# --------------------------------------------------------------------------- journal


def _parse_journal(data: bytes | None) -> Journal | None:
    return None if data is None else Journal(**json.loads(data))


def _start_journal(fs, root: str, opts, claim: Claim) -> Journal:
    """Check the directory once more and record what the mode decided, before changing anything."""
    journal = Journal(run_id=claim.run_id, committed_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    if opts.mode == "error":
        names = existing_entries(fs, root)
        if names:
            raise not_empty_error(opts.url, names)
    elif opts.mode == "overwrite":
        journal.remove = overwrite_removals(fs, root, opts.url)
    else:
        journal.base_index = read_index(fs, root)
        success = read_bytes(fs, join(root, SUCCESS_FILE))
        journal.old_success = None if success is None else success.decode("utf-8", "replace")
    return journal


def _save_journal(fs, root: str, job_id: str, journal: Journal) -> None:
    write_small(fs, journal_path(root, job_id), journal.to_bytes(), job_dir(root, job_id))


# --------------------------------------------------------------------------- steps


def _publish(fs, root: str, opts, files: list[PlannedFile]) -> None:
    """Give every staged file its final name.

    Elsewhere than S3 each file is moved in turn (a staged file is moved at most
    once, so a final file whose staged copy is gone came from it: a rerun skips it).
    On S3 all files are copied at once, one request each
    (:func:`~dask_imgsink.storage.publish_many`), with no listing first: a staged
    object stays until the commit is over, so a rerun copies again. Many files
    are copied from every worker process at once (:mod:`~dask_imgsink.job.spread`).
    """
    if is_s3(fs):
        try:
            publish_spread(fs, [(f.staged, join(root, f.name), f.size) for f in files], opts.commit_spread_files,
                           opts.commit_obstore)
        except FileNotFoundError as exc:
            raise _staging_gone(exc) from exc
        return
    if is_local(fs) and any(f.name.startswith(METADATA_DIR + "/") for f in files):
        fs.makedirs(join(root, METADATA_DIR), exist_ok=True)
    staged = files_below(fs, job_dir(root, opts.job_id))
    gone = {f.name for f in files if f.staged not in staged}
    if gone:
        published = files_below(fs, root)
        for f in files:
            if f.name in gone and published.get(join(root, f.name)) != f.size:
                raise _staging_gone(f"the staged file {f.staged!r} is gone and {f.name!r} was not published from it")
    for f in files:
        if f.name not in gone:
            publish(fs, f.staged, join(root, f.name))


def _staging_gone(what) -> FileNotFoundError:
    return FileNotFoundError(f"{what}; something removed the job's staging folder. Run the job again")


def _errors_records(fs, root: str, skipped: list[SkippedRow], job_id: str, append: bool) -> list[dict]:
    records = [{"job_id": job_id, "partition": s.partition, "row": s.row, "key": s.key, "column": s.column,
                "reason": s.reason} for s in skipped]
    old = read_bytes(fs, join(root, ERRORS_FILE)) if append else None
    if old is not None:
        previous = [r for r in read_errors(old) if r["job_id"] != job_id]  # a rerun replaces its rows
        records = previous + records
    return records


def _display_path(fs, path: str) -> str:
    return path if is_local(fs) else fs.unstrip_protocol(path)


def file_group_tasks(fs, root: str, entries: list[dict], partitions: list[list[int]], job: dict,
                     opts) -> list[FileGroupTask]:
    """One :class:`FileGroupTask` per shard pair of the job."""
    tasks = []
    for entry, parts in zip(entries, partitions):
        tar = entry["url"]
        tasks.append(FileGroupTask(
            task_id=tar[: -len(".tar")],
            dataset_name=opts.dataset_name,
            data=[_display_path(fs, join(root, tar)), _display_path(fs, join(root, parquet_name(tar)))],
            _metadata={
                "output_dir": opts.url, "images_per_tar": opts.images_per_tar,
                "num_images": entry["nsamples"], "bytes": entry["filesize"], "sha256": entry.get("sha256"),
                "partition": parts[0] if parts else None, "partitions": parts, "packing": opts.packing,
                "job_id": opts.job_id, "job_rows_in": job["rows"], "job_images_written": job["images"],
                "job_rows_skipped": job["skipped"],
            },
        ))
    return tasks


def committed_tasks(fs, root: str, opts) -> list[FileGroupTask]:
    """The :class:`FileGroupTask` list of a job that already committed, from its record in the index."""
    index = read_index(fs, root) or {}
    job = next(j for j in index.get("jobs", []) if j.get("job_id") == opts.job_id)
    lo, hi = job["shard_range"]
    partitions = job.get("shard_partitions") or [[]] * (hi - lo)
    return file_group_tasks(fs, root, index["shardlist"][lo:hi], partitions, job, opts)


def _index_entries(shards: list[tuple[WrittenShard, list[int]]], max_shard_bytes: int | None) -> list[dict]:
    entries = []
    for s, _ in shards:
        entry = {"url": s.target.tar_file, "nsamples": s.num_images, "filesize": s.tar_bytes,
                 "sha256": s.tar_sha256, "parquet": parquet_name(s.target.tar_file),
                 "parquet_filesize": s.parquet_bytes, "parquet_sha256": s.parquet_sha256,
                 "formats": dict(sorted(s.formats.items()))}
        if s.target.idx_path is not None:
            entry.update({"idx": idx_name(s.target.tar_file), "idx_filesize": s.idx_bytes,
                          "idx_sha256": s.idx_sha256})
        if max_shard_bytes is not None and s.tar_bytes > max_shard_bytes:
            entry["oversized"] = True  # one sample larger than the limit: a shard of its own
            logger.warning("%s holds one sample of %d bytes, more than max_shard_bytes=%d: it has a shard "
                           "of its own", s.target.tar_file, s.tar_bytes, max_shard_bytes)
        entries.append(entry)
    return entries


def _job_record(opts, claim: Claim, journal: Journal, totals: dict, shard_range: list[int],
                partitions: list[list[int]]) -> dict:
    return {
        "job_id": opts.job_id, "run_id": claim.run_id, "committed_at": journal.committed_at, **totals,
        "first_shard": claim.first_shard, "first_partition": claim.first_partition, "shard_range": shard_range,
        "shard_partitions": [list(p) for p in partitions],
        "checksums": {"shard": SHARD_CHECKSUM, "sample": SAMPLE_CHECKSUM},
        "options": opts.recorded(),
        # the shards' Parquet schema: what readers and appends take from a dataset that has no shard
        "parquet_schema": schema_record(shard_schema(opts.user_schema)),
    }


def _write_index(fs, root: str, opts, claim: Claim, journal: Journal, entries: list[dict], totals: dict,
                 partitions: list[list[int]], num_partitions: int) -> tuple[dict, str]:
    """Write ``_index.json``; return it and its SHA-256."""
    base = journal.base_index if opts.mode == "append" else None
    before = len((base or {}).get("shardlist", []))
    job = _job_record(opts, claim, journal, totals, [before, before + len(entries)], partitions)
    next_shard = claim.first_shard + (len(entries) if opts.packing == "exact" else 0)
    index = build_index(base, entries, totals, job, name=opts.dataset_name, next_shard=next_shard,
                        next_partition=claim.first_partition + num_partitions)
    index_bytes = json.dumps(index, indent=1).encode()
    write_small(fs, join(root, INDEX_FILE), index_bytes, job_dir(root, opts.job_id))
    return index, sha256_hex(index_bytes)


def _write_after_index(fs, root: str, opts, claim: Claim, journal: Journal, index: dict, index_sha256: str,
                       skipped: list[SkippedRow]) -> None:
    """``_errors.jsonl``, the card, then ``_SUCCESS`` (which names the index's and the errors file's SHA-256)."""
    tmp = job_dir(root, opts.job_id)
    card = dataset_card(opts.dataset_name, index, text_column=opts.text_column, label_column=opts.label_column,
                        user_schema=opts.user_schema)
    files = [(join(root, CARD_FILE), card)]
    if not index["shardlist"]:  # no shard: a Parquet of no row stands in, for the Parquet readers
        if is_local(fs):
            fs.makedirs(join(root, METADATA_DIR), exist_ok=True)
        files.append((join(root, EMPTY_PARQUET), parquet_bytes(shard_schema(opts.user_schema).empty_table())))
    elif opts.mode == "append" and (last_job(index).get("shard_range") or [0])[0] == 0:  # an empty one's first
        remove_file(fs, join(root, EMPTY_PARQUET))
    errors_sha256 = None  # the errors file is written after the index: _SUCCESS vouches for it
    if skipped or (opts.mode == "append" and fs.exists(join(root, ERRORS_FILE))):
        records = _errors_records(fs, root, skipped, opts.job_id, opts.mode == "append")
        errors = errors_jsonl(records)
        files.append((join(root, ERRORS_FILE), errors))
        errors_sha256 = sha256_hex(errors)
    write_small_many(fs, files, tmp)  # at once on object stores; _SUCCESS only after both
    success = success_record(last_job(index), index_sha256, errors_sha256)  # this job's record in the index
    write_small(fs, join(root, SUCCESS_FILE), json.dumps(success).encode(), tmp)


def finish_job(fs, root: str, job_id: str, run_id: str) -> None:
    """Remove the job's staging folder, then its lock, then the work folder if nothing else is in it.

    Staging that a dead job's straggling task wrote after this job swept at its
    claim goes too: while this job holds the lock, no other job stages. A rerun
    that finds the lock already released tidies the empty folders only while no
    other job holds the directory.
    """
    if is_s3(fs):
        return _finish_job_on_s3(fs, root, job_id, run_id)
    remove_quietly(fs, job_dir(root, job_id), recursive=True)
    if holds_lock(fs, root, run_id):
        sweep_dead_staging(fs, root, job_id, run_id)
        remove_empty_dir(fs, jobs_root(root))
        release(fs, root, run_id)
    elif read_lock(fs, root) is None:
        remove_empty_dir(fs, jobs_root(root))
    remove_empty_dir(fs, join(root, WORK_DIR))


def _finish_job_on_s3(fs, root: str, job_id: str, run_id: str) -> None:
    """:func:`finish_job` in three rounds of requests, not one per step: list the work folder while
    reading the lock; delete the job's staging (and, lock held, dead jobs' staging and stale
    markers) in one batch; then release the lock. S3 has no folders to remove."""
    listing = run_beside(_listing, fs, join(root, WORK_DIR))
    held = holds_lock(fs, root, run_id)
    below = listing.result()
    ours = job_dir(root, job_id).rstrip("/") + "/"
    doomed = [path for path in below if path.startswith(ours)]
    if held:
        doomed += dead_files_below(root, below, job_id, run_id)
    remove_many(fs, sorted(set(doomed)))
    if held:
        release(fs, root, run_id)


def _listing(fs, folder: str) -> dict[str, dict]:
    forget_listings(fs, folder)
    try:
        return fs.find(folder, detail=True)
    except FileNotFoundError:
        return {}


def _success_run(data: bytes | None) -> str | None:
    """The run that wrote this ``_SUCCESS``."""
    try:
        return json.loads(data).get("run_id") if data else None
    except ValueError:
        return None


def _rollback(fs, root: str, journal: Journal, opts) -> None:
    """Undo a commit that failed after it began changing the directory and before its index.

    Every planned name is then this job's or, under ``overwrite``, the old
    dataset's, whose index and ``_SUCCESS`` are already gone: both go, so no
    file is left that no index accounts for. An appended dataset gets its
    ``_SUCCESS`` back (its index, errors and shards were not touched).
    """
    remove_many(fs, [join(root, name) for name in [*journal.planned,
                                                    *(journal.remove if opts.mode == "overwrite" else [])]])
    remove_empty_dir(fs, join(root, METADATA_DIR))
    if opts.mode == "append" and journal.old_success is not None:
        write_small(fs, join(root, SUCCESS_FILE), journal.old_success.encode(), job_dir(root, opts.job_id))


def _replace_files(fs, root: str, opts, journal: Journal, files: list[PlannedFile], dropped: list[str]) -> None:
    """``_SUCCESS`` goes, then what the mode removes, then every staged file replaces its final name."""
    remove_file(fs, join(root, SUCCESS_FILE))  # the directory must not look complete while it changes
    if opts.mode == "overwrite":
        remove_file(fs, join(root, INDEX_FILE))
        remove_many(fs, [join(root, name) for name in journal.remove if name not in journal.planned])
    # names an earlier attempt planned from other input: they are ours
    remove_many(fs, [join(root, name) for name in dropped])
    _publish(fs, root, opts, files)


def commit_job(
    claim: Claim,
    shards: list[tuple[WrittenShard, list[int]]],
    rows_in: int,
    skipped: list[SkippedRow],
    num_partitions: int,
    opts,
) -> list[FileGroupTask]:
    """Publish the job's staged shards and write the dataset's index files (see the module docstring).

    Parameters
    ----------
    claim : Claim
        What the job's claim decided.
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

    Raises
    ------
    LostLockError
        The job's lock was broken while it ran; nothing was changed.
    """
    fs, root = resolve(opts.url, opts.storage_options)
    forget_listings(fs, root)
    entries = _index_entries(shards, opts.max_shard_bytes)
    num_images = sum(s.num_images for s, _ in shards)
    totals = {"rows": rows_in, "images": num_images, "skipped": len(skipped), "shards": len(shards)}
    partitions = [parts for _, parts in shards]
    success, lock, journal_bytes = (None, None, None) if claim.done else read_many(
        fs, [join(root, SUCCESS_FILE), lock_path(root), journal_path(root, opts.job_id)])  # one round on S3
    if claim.done or _success_run(success) == claim.run_id:
        # The job committed before: before this computation began, or this very commit,
        # which Dask runs again (its inputs may have been recomputed from runs already
        # removed). Its record in the index says what it wrote.
        finish_job(fs, root, opts.job_id, claim.run_id)
        return committed_tasks(fs, root, opts)
    if not lock_read_holds(fs, root, claim.run_id, lock):
        raise LostLockError(
            f"job {opts.job_id} no longer holds {opts.url!r}: its lock was broken or replaced while it ran "
            "(dask-imgsink clean --break-lock, or a job that judged it dead). Nothing was published; run it again"
        )
    files = planned_files(shards)
    journal = _parse_journal(journal_bytes)
    stage = "checking"
    try:
        if journal is None:
            journal = _start_journal(fs, root, opts, claim)
        dropped = [name for name in journal.planned if name not in {f.name for f in files}]
        journal.planned.update({f.name: [f.size, f.sha256] for f in files})
        _save_journal(fs, root, opts.job_id, journal)
        stage = "changing"
        _replace_files(fs, root, opts, journal, files, dropped)
        index, index_sha256 = _write_index(fs, root, opts, claim, journal, entries, totals, partitions,
                                           num_partitions)
        stage = "indexed"
        _write_after_index(fs, root, opts, claim, journal, index, index_sha256, skipped)
    except Exception:
        # A failure (not a death: a killed process runs nothing, and Dask reruns the
        # commit, which the journal lets finish): undo what was changed, free the directory.
        # Once the index is written every shard it lists is in place; the dataset then
        # only lacks _SUCCESS (verify says so; mode="overwrite" replaces it).
        try:
            if stage == "changing":
                _rollback(fs, root, journal, opts)
            finish_job(fs, root, opts.job_id, claim.run_id)
        except Exception:
            logger.exception("could not undo the failed commit of job %s in %s", opts.job_id, opts.url)
        raise
    finish_job(fs, root, opts.job_id, claim.run_id)
    logger.info("committed %d shards (%d images, %d rows skipped) to %s",
                len(shards), num_images, len(skipped), opts.url)
    return file_group_tasks(fs, root, entries, partitions, totals, opts)
