"""What a dataset directory holds, by name: shards, index files, and the hidden work area.

The one place that says where every file of a dataset lives, so the writer,
the commit, ``verify`` and ``clean`` can never disagree::

    out/
      shard-000000.tar, shard-000000.idx, ...       the shards and their DALI indexes
      metadata/shard-000000.parquet, ...            one Parquet per shard, same stem
      _index.json, README.md, _SUCCESS, _errors.jsonl
      .imgsink/                                      present only while a job runs
        lock.json                                    the owning job (create-if-absent)
        jobs/<job id>/...                            that job's staged files

Why the Parquet files have a folder of their own: Arrow's directory discovery
(``pd.read_parquet``, ``pq.read_table``, ``pyarrow.dataset``) tries every file
whose name does not start with ``.`` or ``_``, so a tar, an ``.idx`` or the
card's ``README.md`` beside the Parquet files makes ``pd.read_parquet(dir)``
fail; ``metadata/`` holds nothing else, so every reader's plain call works on
it, and ``dd.read_parquet(out)`` (which reads every ``*.parquet`` below
``out``, recursively, hidden and ``_`` names included) finds exactly these.
For that same reason nothing else in the tree ends in ``.parquet``: skipped
rows are recorded as JSON Lines, and staged files end in ``.part``.

Datasets written before this layout (``layout`` absent from the index) kept
each Parquet beside its tar; the index says which, so verify, overwrite and
append read both.
"""

from __future__ import annotations

import posixpath
import re
import uuid

from ..storage import join

INDEX_FILE = "_index.json"
SUCCESS_FILE = "_SUCCESS"
ERRORS_FILE = "_errors.jsonl"
CARD_FILE = "README.md"
METADATA_DIR = "metadata"
#: What older releases called the skipped-rows file (``overwrite`` removes it).
LEGACY_ERRORS_FILE = "_errors.parquet"
#: A dataset with no shard holds this Parquet file of no row in its shards' schema, so that the
#: Parquet readers' natural calls (``dd.read_parquet(out)``, ``pd.read_parquet("out/metadata")``, a
#: glob in polars or duckdb) give an empty frame with the dataset's columns, not an error.
EMPTY_PARQUET = f"{METADATA_DIR}/empty.parquet"
FIXED_FILES = (INDEX_FILE, SUCCESS_FILE, ERRORS_FILE, CARD_FILE, LEGACY_ERRORS_FILE, EMPTY_PARQUET)

#: The dataset layout this release writes (recorded in ``_index.json``): 2 puts
#: the Parquet files in ``metadata/``; 1 (no ``layout`` field) kept them beside the tars.
LAYOUT_VERSION = 2

WORK_DIR = ".imgsink"
LOCK_FILE = f"{WORK_DIR}/lock.json"
JOBS_DIR = f"{WORK_DIR}/jobs"
BREAK_PREFIX = "break-"
STAGED_SUFFIX = ".part"

#: Old releases staged in ``_temporary/``; ``clean`` removes it.
LEGACY_STAGING_DIR = "_temporary"

#: What a shard's tar may be called: a plain name in the dataset directory.
SHARD_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*\.tar$")


def parquet_name(tar_name: str, layout: int = LAYOUT_VERSION) -> str:
    """The Parquet file of the tar ``tar_name``, relative to the dataset directory."""
    stem = tar_name[: -len(".tar")]
    return f"{METADATA_DIR}/{stem}.parquet" if layout >= 2 else f"{stem}.parquet"


def idx_name(tar_name: str) -> str:
    """The DALI index beside the tar ``tar_name`` (same stem, as DALI's ``wds2idx`` names it)."""
    return tar_name[: -len(".tar")] + ".idx"


def index_layout(index: dict | None) -> int:
    """The layout of the dataset this index describes (1 when it does not say)."""
    layout = (index or {}).get("layout", 1)
    return layout if isinstance(layout, int) and not isinstance(layout, bool) else 1


_LEGACY_JOB_ID = re.compile(r"^[0-9a-f]{32}$")


def legacy_staging(fs, folder: str) -> bool:
    """Whether ``folder`` (a ``_temporary/``) is staging an older dask-imgsink left: empty, or only
    ``<job id>/`` folders (32 hex digits). Hadoop and Spark stage in ``_temporary/0/...``: not ours."""
    try:
        entries = [posixpath.basename(p.rstrip("/")) for p in fs.ls(folder, detail=False)]
    except (FileNotFoundError, NotADirectoryError):
        return False
    return all(_LEGACY_JOB_ID.match(name) for name in entries)


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
    """The tar, Parquet and DALI index names the index lists (plain names only)."""
    layout = index_layout(index)
    names = []
    for entry in index.get("shardlist", []):
        url = entry.get("url") if isinstance(entry, dict) else None
        if isinstance(url, str) and SHARD_NAME.match(url):
            names += [url, parquet_name(url, layout)]
            if entry.get("idx"):
                names.append(idx_name(url))
    return names


def dataset_files(index: dict | None) -> set[str]:
    """Every name a dataset owns: its shards (from its index) and the fixed files."""
    return set(FIXED_FILES) | (set(shard_files(index)) if index else set())


def dataset_listing(fs, root: str) -> list[str]:
    """Every name in ``root``, with the ``metadata/`` folder's files listed as ``metadata/<name>``."""
    names = []
    for entry in fs.ls(root, detail=True):
        name = posixpath.basename(entry["name"].rstrip("/"))
        if name == METADATA_DIR and entry.get("type") == "directory":
            names += [f"{METADATA_DIR}/{posixpath.basename(p.rstrip('/'))}"
                      for p in fs.ls(join(root, METADATA_DIR), detail=False)]
        else:
            names.append(name)
    return sorted(names)
