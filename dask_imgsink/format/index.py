"""The dataset's index files: ``_index.json`` (a wids shard index) and the dataset card.

``_index.json`` is what wids needs (``__kind__``, ``wids_version``, a
``shardlist`` of ``url``/``nsamples``/``filesize``, URLs relative to the
index) with our own fields beside it: totals, the jobs that wrote the dataset
and where numbering continues for ``mode="append"``.
"""

from __future__ import annotations

import json
import re
from typing import Any

from ..storage import join, read_bytes
from .layout import CARD_FILE, INDEX_FILE, LAYOUT_VERSION

WRITER_NAME = "dask-imgsink"


class IndexFormatError(ValueError):
    """``_index.json`` is not a readable shard index."""


def index_problems(index: object) -> list[str]:
    """What makes ``index`` unusable as a shard index (empty when it is fine)."""
    if not isinstance(index, dict):
        return ["it is not a JSON object"]
    shardlist = index.get("shardlist")
    if not isinstance(shardlist, list):
        return ["it has no 'shardlist' list"]
    problems = _jobs_problems(index.get("jobs", []))
    if not isinstance(index.get("totals", {}), dict):
        problems.append("its 'totals' is not an object")
    for i, entry in enumerate(shardlist):
        if not isinstance(entry, dict) or not isinstance(entry.get("url"), str):
            problems.append(f"shardlist entry {i} has no 'url'")
        elif not all(isinstance(entry.get(k), int) and not isinstance(entry.get(k), bool) and entry[k] >= 0
                     for k in ("nsamples", "filesize")):
            problems.append(f"shardlist entry {i} ({entry['url']}) lacks a valid 'nsamples' or 'filesize'")
    return problems


def _jobs_problems(jobs: object) -> list[str]:
    if not isinstance(jobs, list):
        return ["its 'jobs' is not a list"]
    problems = []
    for i, job in enumerate(jobs):
        if not isinstance(job, dict) or not isinstance(job.get("options", {}), dict):
            problems.append(f"jobs entry {i} is not an object with 'options'")
            continue
        span = job.get("shard_range", [0, 0])
        if not (isinstance(span, list) and len(span) == 2 and all(isinstance(v, int) for v in span)):
            problems.append(f"jobs entry {i} has a malformed 'shard_range'")
    return problems


def parse_index(data: bytes, where: str = INDEX_FILE) -> dict:
    """Parse ``_index.json`` bytes.

    Raises
    ------
    IndexFormatError
        The bytes are not JSON, or not a shard index.
    """
    try:
        index = json.loads(data)
    except ValueError as exc:
        raise IndexFormatError(f"{where} is not valid JSON ({exc})") from None
    problems = index_problems(index)
    if problems:
        raise IndexFormatError(f"{where} is not a shard index: {'; '.join(problems)}")
    return index


def read_index(fs, root: str) -> dict | None:
    """The dataset's ``_index.json`` as a dict, or ``None`` when there is none.

    Raises
    ------
    IndexFormatError
        It exists but is not a readable shard index.
    """
    path = join(root, INDEX_FILE)
    data = read_bytes(fs, path)
    return None if data is None else parse_index(data, path)


def job_for_shard(index: dict, position: int) -> dict:
    """The record of the job that wrote the ``position``-th shard of the index (the last job if unknown)."""
    jobs = index.get("jobs") or [{}]
    for job in jobs:
        lo, hi = (job.get("shard_range") or [0, 0])
        if lo <= position < hi:
            return job
    return last_job(index)


def last_job(index: dict) -> dict:
    """The record of the job that committed last (``{}`` if the index holds none it can read)."""
    jobs = index.get("jobs") or [{}]
    return jobs[-1] if isinstance(jobs, list) and isinstance(jobs[-1], dict) else {}


#: What a commit writes into ``_SUCCESS``: the job that committed and the index it wrote ...
SUCCESS_FIELDS = ("job_id", "run_id", "committed_at", "index_sha256")
#: ... and, when the dataset has an ``_errors.jsonl``, its SHA-256 (datasets written before it was added lack it).
SUCCESS_ERRORS_FIELD = "errors_sha256"


def success_record(job: dict, index_sha256: str, errors_sha256: str | None) -> dict:
    """``_SUCCESS``'s content for the job record ``job`` (see :data:`SUCCESS_FIELDS`)."""
    record = {"job_id": job["job_id"], "run_id": job["run_id"], "committed_at": job["committed_at"],
              "index_sha256": index_sha256}
    if errors_sha256 is not None:
        record[SUCCESS_ERRORS_FIELD] = errors_sha256
    return record


def next_numbers(index: dict, name_prefix: str) -> tuple[int, int]:
    """Where shard and partition numbering continue after the dataset ``index`` describes."""
    shard = index.get("next_shard")
    part = index.get("next_partition")
    if shard is None:  # an index written by another tool: continue after its numbers
        pattern = re.compile(rf"^{re.escape(name_prefix)}-(\d+)\.tar$")
        found = [int(m.group(1)) for e in index.get("shardlist", []) if (m := pattern.match(e["url"]))]
        shard = max(found) + 1 if found else len(index.get("shardlist", []))
    return int(shard), int(part or 0)


def build_index(
    old: dict | None,
    entries: list[dict],
    totals: dict[str, int],
    job: dict[str, Any],
    *,
    name: str,
    next_shard: int,
    next_partition: int,
) -> dict:
    """The new ``_index.json``: ``old``'s shards (when appending) then ``entries``."""
    old = old or {}
    shardlist = list(old.get("shardlist", [])) + entries
    old_totals = old.get("totals", {})
    return {
        "__kind__": "wids-shard-index-v1",
        "wids_version": 1,
        "name": name,
        "layout": LAYOUT_VERSION,
        "shardlist": shardlist,
        "num_samples": sum(e["nsamples"] for e in shardlist),
        "totals": {k: old_totals.get(k, 0) + v for k, v in totals.items()},
        "next_shard": next_shard,
        "next_partition": next_partition,
        "jobs": list(old.get("jobs", [])) + [job],
        "writer": WRITER_NAME,
    }


__all__ = ["CARD_FILE", "SUCCESS_ERRORS_FIELD", "SUCCESS_FIELDS", "IndexFormatError", "build_index",
           "job_for_shard", "last_job", "success_record", "next_numbers",
           "parse_index", "read_index"]
