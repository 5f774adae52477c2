"""What a dataset directory holds, by name: shards, index files, and the hidden work area.

The one place that says where every file of a dataset lives, so the writer,
the commit, ``verify`` and ``clean`` can never disagree::

    out/
      shard-000000.tar, shard-000000.parquet, ...   the shards
      _index.json, README.md, _SUCCESS, _errors.parquet
      .imgsink/                                      present only while a job runs
        lock.json                                    the owning job (create-if-absent)
        jobs/<job id>/...                            that job's staged files

Staged files sit in a dot folder, which Arrow, Hugging Face ``datasets`` and
Spark skip, and end in ``.part`` rather than ``.parquet``, because
``dd.read_parquet(out)`` reads every ``*.parquet``/``*.parq``/``*.pq`` below
``out``, hidden folders included.
"""

from __future__ import annotations

import re
import uuid

from ..storage import join

INDEX_FILE = "_index.json"
SUCCESS_FILE = "_SUCCESS"
ERRORS_FILE = "_errors.parquet"
CARD_FILE = "README.md"
FIXED_FILES = (INDEX_FILE, SUCCESS_FILE, ERRORS_FILE, CARD_FILE)

WORK_DIR = ".imgsink"
LOCK_FILE = f"{WORK_DIR}/lock.json"
JOBS_DIR = f"{WORK_DIR}/jobs"
BREAK_PREFIX = "break-"
STAGED_SUFFIX = ".part"

#: Old releases staged in ``_temporary/``; ``clean`` removes it.
LEGACY_STAGING_DIR = "_temporary"

#: What a shard's tar may be called: a plain name in the dataset directory.
SHARD_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*\.tar$")


def parquet_name(tar_name: str) -> str:
    """The Parquet file beside the tar ``tar_name``."""
    return tar_name[: -len(".tar")] + ".parquet"


def lock_path(root: str) -> str:
    return join(root, LOCK_FILE)


def breaker_path(root: str, run_id: str) -> str:
    """The create-if-absent marker whose creator may remove the dead lock of run ``run_id``."""
    return join(root, WORK_DIR, f"{BREAK_PREFIX}{run_id}")


def jobs_root(root: str) -> str:
    return join(root, JOBS_DIR)


def job_dir(root: str, job_id: str) -> str:
    """Everything a job stages lives here, and nowhere else."""
    return join(root, JOBS_DIR, job_id)


def journal_path(root: str, job_id: str) -> str:
    """The commit's journal: what it planned and decided, so a rerun finishes the same dataset."""
    return join(job_dir(root, job_id), "commit.json")


def failed_marker(root: str, job_id: str) -> str:
    """Present once a task of the job has failed: the job's other tasks stop early."""
    return join(job_dir(root, job_id), "FAILED")


def new_attempt_dir(root: str, job_id: str, label: str) -> str:
    """A fresh folder for one attempt of one task (reruns never collide)."""
    return join(job_dir(root, job_id), f"{label}-{uuid.uuid4().hex[:12]}")


def staged(folder: str, name: str) -> str:
    """Where ``name`` is staged in ``folder``; the suffix keeps Parquet readers off it."""
    return join(folder, name + STAGED_SUFFIX)


def shard_files(index: dict) -> list[str]:
    """The tar and Parquet names the index lists (plain names only)."""
    names = []
    for entry in index.get("shardlist", []):
        url = entry.get("url") if isinstance(entry, dict) else None
        if isinstance(url, str) and SHARD_NAME.match(url):
            names += [url, parquet_name(url)]
    return names


def dataset_files(index: dict | None) -> set[str]:
    """Every name a dataset owns: its shards (from its index) and the fixed files."""
    return set(FIXED_FILES) | (set(shard_files(index)) if index else set())
