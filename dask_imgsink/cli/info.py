"""``dask-imgsink info``: what a dataset holds, from its index and its Parquet metadata."""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from .common import UsageError, add_storage_option, storage_options

#: Upper bounds of the image-size histogram's buckets (the longer side, in pixels).
SIDE_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096)
BAR_WIDTH = 40


def summary(path: str, options: dict | None) -> dict:
    """Shards, samples, bytes, formats, image-size histogram and jobs of the dataset at ``path``."""
    from ..format.index import IndexFormatError, read_index
    from ..read.dataset import read_webdataset
    from ..storage import resolve

    fs, root = resolve(path, options)
    try:
        index = read_index(fs, root)
    except IndexFormatError as exc:
        raise UsageError(f"{exc}; run `dask-imgsink verify {path}` for a full report") from None
    if index is None:
        raise UsageError(f"{path} holds no _index.json: not a dataset written by dask-imgsink "
                         "(or its job has not committed)")
    shards = index["shardlist"]
    formats: dict[str, int] = {}
    for entry in shards:
        for fmt, count in (entry.get("formats") or {}).items():
            formats[fmt] = formats.get(fmt, 0) + count
    sizes = read_webdataset(path, columns=["width", "height", "size"], images=False,
                            storage_options=options).compute(scheduler="threads")
    return {
        "path": path,
        "name": index.get("name"),
        "shards": len(shards),
        "samples": index.get("num_samples", sum(e["nsamples"] for e in shards)),
        "tar_bytes": sum(e["filesize"] for e in shards),
        "metadata_bytes": sum(e.get("parquet_filesize", 0) for e in shards),
        "image_bytes": int(sizes["size"].sum()),
        "formats": formats,
        "sides": _side_histogram(np.maximum(sizes["width"].to_numpy(), sizes["height"].to_numpy())),
        "skipped": index.get("totals", {}).get("skipped", 0),
        "jobs": [_job_line(job) for job in index.get("jobs", [])],
    }


def _side_histogram(sides: np.ndarray) -> list[dict]:
    """How many images have their longer side in each bucket (``<= 64``, ..., ``> 4096``)."""
    bounds = np.searchsorted(np.array(SIDE_BUCKETS), sides, side="left")
    counts = np.bincount(bounds, minlength=len(SIDE_BUCKETS) + 1)
    labels = [f"<= {b}" for b in SIDE_BUCKETS] + [f"> {SIDE_BUCKETS[-1]}"]
    return [{"longer_side": label, "images": int(n)} for label, n in zip(labels, counts)]


def _job_line(job: dict) -> dict:
    options = job.get("options", {})
    return {
        "job_id": job.get("job_id"), "committed_at": job.get("committed_at"), "mode": options.get("mode"),
        "packing": options.get("packing"), "images": job.get("images"), "skipped": job.get("skipped"),
        "shard_range": job.get("shard_range"),
    }


def print_summary(info: dict) -> None:
    total = max(1, info["samples"])
    print(f"{info['path']}: {info['name']}")
    print(f"  {info['shards']} shards, {info['samples']} samples, {info['tar_bytes'] / 1e6:.1f} MB of tars "
          f"({info['image_bytes'] / 1e6:.1f} MB images), {info['metadata_bytes'] / 1e6:.2f} MB of metadata"
          + (f", {info['skipped']} rows skipped" if info["skipped"] else ""))
    print("  formats: " + ", ".join(f"{fmt} {n} ({100 * n / total:.0f} %)"
                                    for fmt, n in sorted(info["formats"].items())))
    print("  images by longer side:")
    peak = max([b["images"] for b in info["sides"]] + [1])
    for bucket in info["sides"]:
        bar = "#" * round(BAR_WIDTH * bucket["images"] / peak)
        print(f"    {bucket['longer_side']:>8} px  {bar:<{BAR_WIDTH}} {bucket['images']}")
    print(f"  written by {len(info['jobs'])} job{'s' * (len(info['jobs']) != 1)}:")
    for job in info["jobs"]:
        lo, hi = job["shard_range"] if _is_range(job["shard_range"]) else (0, 0)
        shards = f"shards {lo}-{hi - 1}" if hi > lo else "no shard"
        print(f"    {job['committed_at']}  {(job['job_id'] or '?')[:12]}  mode={job['mode']} "
              f"packing={job['packing']}  {job['images']} images, {job['skipped']} skipped, {shards}")


def _is_range(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value)


def run(args: argparse.Namespace) -> int:
    try:
        info = summary(args.path, storage_options(args.storage_option))
    except FileNotFoundError as exc:
        print(f"dask-imgsink info: {exc}", file=sys.stderr)
        return 1
    except NotADirectoryError:
        raise UsageError(f"{args.path} is a file, not a dataset directory") from None
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        print_summary(info)
    return 0


def add_parser(sub) -> None:
    info = sub.add_parser(
        "info", help="summarise a dataset: shards, samples, bytes, formats, image sizes, jobs",
        description="Summarise a dataset from its _index.json and its Parquet metadata (no tar is read): "
        "shards, samples, bytes, image formats, a histogram of image sizes and the jobs that wrote it.",
    )
    info.add_argument("path", help="the dataset directory (local path or fsspec URL)")
    info.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_storage_option(info)
    info.set_defaults(func=run)
