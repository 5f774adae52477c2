"""The ``dask-imgsink`` command: demo, verify, clean, info.

Exit codes: 0 all well, 1 a problem found (or the command failed), 2 a usage
error. No user error ends in a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

import numpy as np
import pandas as pd


def _demo_partition(seed: int, rows: int, size: int) -> pd.DataFrame:
    """Make one partition of synthetic photos (gradients, discs, grain) and metadata."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    images = []
    for _ in range(rows):
        base = rng.uniform(0, 1, 3).astype(np.float32)
        tilt = rng.uniform(-0.5, 0.5, (2, 3)).astype(np.float32)
        img = base + yy[..., None] * tilt[0] + xx[..., None] * tilt[1]
        for _ in range(3):
            cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
            disc = ((yy - cy) ** 2 + (xx - cx) ** 2) < r * r
            img[disc] = rng.uniform(0, 1, 3)
        img += rng.normal(0, 0.02, img.shape).astype(np.float32)
        images.append((np.clip(img, 0, 1) * 255).astype(np.uint8))
    words = np.array(["red", "blue", "calm", "sunny", "disc", "field", "still", "bright"])
    return pd.DataFrame(
        {
            "key": [f"demo_{seed:04d}_{i:05d}" for i in range(rows)],
            "image": pd.Series(images, dtype=object),
            "caption": [" ".join(rng.choice(words, 4)) for _ in range(rows)],
            "aesthetic": rng.uniform(0, 10, rows).round(3),
            "label": rng.integers(0, 10, rows),
        }
    )


def demo_dataframe(images: int, partitions: int, size: int):
    """A Dask DataFrame whose images are generated inside the workers."""
    from functools import partial

    import dask
    import dask.dataframe as dd

    per_part = -(-images // partitions)
    counts = [max(0, min(per_part, images - p * per_part)) for p in range(partitions)]
    meta = _demo_partition(0, 1, 8).iloc[:0]
    # from_map would turn the object image column into strings under the default
    # 'dataframe.convert-string'; keep it an object column.
    with dask.config.set({"dataframe.convert-string": False}):
        return dd.from_map(partial(_demo_partition, size=size), range(partitions), counts, meta=meta,
                           divisions=[None] * (partitions + 1), enforce_metadata=False)


class UsageError(Exception):
    """A command line that cannot be run as given (exit code 2)."""


def _print_report(report, prefix: str = "") -> int:
    """Print a verify report; return the exit code (0 when the dataset is complete and intact)."""
    if report.ok:
        state = "all consistent"
    else:
        count = len(report.problems)
        state = f"{'complete' if report.complete else 'INCOMPLETE'}, {count} problem{'s' * (count != 1)}:"
    print(f"{prefix}{report.shards} shards, {report.images} images, {report.bytes / 1e6:.1f} MB, {state}")
    for problem in report.problems:
        print(f"  {problem}")
    return 0 if report.ok else 1


def storage_options(pairs: list[str] | None) -> dict | None:
    """``KEY=VALUE`` pairs as fsspec storage options; dotted keys nest, values parse as JSON when they can.

    ``client_kwargs.endpoint_url=http://127.0.0.1:9000`` gives
    ``{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}``; ``anon=true`` gives ``{"anon": True}``.
    """
    if not pairs:
        return None
    options: dict = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--storage-option {pair!r} must look like KEY=VALUE")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        *parents, last = key.split(".")
        target = options
        for part in parents:
            target = target.setdefault(part, {})
        target[last] = value
    return options


@contextlib.contextmanager
def dask_client(scheduler: str, workers: int | None = None):
    """A Client for ``scheduler``: "local" starts a LocalCluster, "threads" runs in this process (None)."""
    if scheduler == "threads":
        yield None
        return

    from distributed import Client

    from .cluster import local_cluster

    if scheduler == "local":
        with local_cluster(n_workers=workers, threads_per_worker=1) as cluster, Client(cluster) as client:
            yield client
    else:
        with Client(scheduler, timeout=30) as client:
            yield client


def _cmd_demo(args: argparse.Namespace) -> int:
    from distributed import Client

    from .cluster import local_cluster
    from .format.index import read_index
    from .job.accessor import to_webdataset
    from .job.output import existing_entries
    from .read.verify import verify_dataset
    from .storage import resolve

    fs, root = resolve(args.output_dir)
    mode = args.mode
    if mode is None:
        index = read_index(fs, root) if fs.exists(root) else None
        mode = "overwrite" if index and index.get("writer") == "dask-imgsink" else "error"
    if mode == "error" and existing_entries(fs, root):
        print(f"dask-imgsink demo: {args.output_dir} is not empty and holds no earlier demo dataset; "
              "choose an empty directory or pass --mode overwrite", file=sys.stderr)
        return 2
    with local_cluster(n_workers=args.workers, threads_per_worker=args.threads_per_worker) as cluster, \
            Client(cluster) as client:
        print(f"local Dask cluster: {len(client.scheduler_info()['workers'])} worker processes")
        ddf = demo_dataframe(args.images, args.partitions, args.size)
        ddf = ddf[ddf.aesthetic > args.min_aesthetic]
        start = time.perf_counter()
        tasks = to_webdataset(
            ddf, args.output_dir, key_column="key", text_column="caption", label_column="label",
            images_per_tar=args.images_per_tar, image_format=args.format, packing=args.packing,
            mode=mode, compute=True,
        )
        elapsed = time.perf_counter() - start
        report = verify_dataset(args.output_dir, decode=True, client=client)
    written = sum(t.metadata["num_images"] for t in tasks)
    size = sum(t.metadata["bytes"] for t in tasks)
    print(f"wrote {len(tasks)} shards, {written} images, {size / 1e6:.1f} MB to {args.output_dir} "
          f"in {elapsed:.1f} s ({written / elapsed:.0f} images/s, generating included)")
    return _print_report(report, "read back: ")


def _cmd_verify(args: argparse.Namespace) -> int:
    from .read.verify import verify_dataset

    options = storage_options(args.storage_option)
    with dask_client(args.scheduler) as client:
        try:
            report = verify_dataset(args.path, storage_options=options, decode=args.decode, client=client,
                                    max_pixels=args.max_pixels)
        except FileNotFoundError as exc:
            raise UsageError(str(exc)) from None
    return _print_report(report)


def _cmd_clean(args: argparse.Namespace) -> int:
    from .job.cleanup import clean
    from .job.lock import OutputLockedError

    try:
        report = clean(args.path, break_lock=args.break_lock, storage_options=storage_options(args.storage_option))
    except OutputLockedError as exc:
        print(f"dask-imgsink clean: {exc}", file=sys.stderr)
        return 1
    except FileNotFoundError as exc:
        raise UsageError(str(exc)) from None
    if report.broke_lock:
        print(f"broke the lock of {report.broke_lock}")
    for path in report.removed:
        print(f"removed {path}")
    if not report.broke_lock and not report.removed:
        print("nothing to clean")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from .format.index import read_index
    from .storage import resolve

    fs, root = resolve(args.path)
    index = read_index(fs, root)
    if index is None:
        print(f"no _index.json in {args.path}", file=sys.stderr)
        return 1
    summary = {k: index.get(k) for k in ("name", "num_samples", "totals", "next_shard")}
    summary["shards"] = len(index["shardlist"])
    summary["jobs"] = len(index.get("jobs", []))
    print(json.dumps(summary, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dask-imgsink", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo",
        help="generate images on a local Dask cluster, filter them, write shards, read them back",
        description="Start a local Dask cluster, generate synthetic images inside its workers, "
        "keep those with aesthetic > --min-aesthetic, write them as WebDataset shards with "
        "Parquet metadata, then read every shard back and print a summary. Nothing is downloaded.",
    )
    demo.add_argument("output_dir", help="where to write the dataset (local path or fsspec URL)")
    demo.add_argument("--images", type=int, default=3000, help="images to generate (default 3000)")
    demo.add_argument("--partitions", type=int, default=12, help="DataFrame partitions (default 12)")
    demo.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    demo.add_argument("--min-aesthetic", type=float, default=3.0,
                      help="filter: keep rows with aesthetic above this, 0-10 (default 3.0)")
    demo.add_argument("--images-per-tar", type=int, default=500, help="images per shard (default 500)")
    demo.add_argument("--format", default="jpeg", choices=["jpeg", "png", "webp"], help="default jpeg")
    demo.add_argument("--packing", default="exact", choices=["exact", "per_partition"], help="default exact")
    demo.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    demo.add_argument("--threads-per-worker", type=int, default=1, help="threads per worker (default 1)")
    demo.add_argument("--mode", choices=["error", "overwrite", "append"], default=None,
                      help="what to do with an existing output directory; default: overwrite an "
                      "earlier demo dataset, refuse anything else")
    demo.set_defaults(func=_cmd_demo)

    verify = sub.add_parser(
        "verify", help="check every byte of a dataset against its checksums and index",
        description="Check a dataset: every tar and Parquet against the SHA-256 and size in _index.json, "
        "every tar header, every Parquet row against its sample (byte ranges, sample checksum, "
        "text/label/json members), missing and stray files, leftover staging. One Dask task per shard. "
        "Exit 0 when intact, 1 naming each problem's shard and member, 2 for a usage error.",
    )
    verify.add_argument("path", help="the dataset directory (local path or fsspec URL)")
    verify.add_argument("--decode", action="store_true", help="also decode every image")
    verify.add_argument("--max-pixels", type=int, default=None,
                        help="largest image to decode (default: the limit the dataset was written with)")
    _add_common(verify)
    verify.set_defaults(func=_cmd_verify)

    clean = sub.add_parser(
        "clean", help="remove staging and locks that no live job owns",
        description="Remove what a dead job left in a dataset directory (its lock and staged files under "
        ".imgsink/). A lock whose job is known dead is broken; one whose job may still run (say, on "
        "another machine) only with --break-lock; one whose job is running never.",
    )
    clean.add_argument("path", help="the dataset directory (local path or fsspec URL)")
    clean.add_argument("--break-lock", action="store_true",
                       help="also break a lock whose job cannot be shown dead")
    clean.add_argument("--storage-option", action="append", metavar="KEY=VALUE",
                       help="fsspec storage option (repeatable; dotted keys nest, values parse as JSON)")
    clean.set_defaults(func=_cmd_clean)

    info = sub.add_parser("info", help="print a dataset's index summary")
    info.add_argument("path")
    info.set_defaults(func=_cmd_info)
    return parser


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scheduler", default="local", metavar="ADDR",
                        help="Dask scheduler address, 'local' to start a local cluster (default) or "
                        "'threads' to run in this process")
    parser.add_argument("--storage-option", action="append", metavar="KEY=VALUE",
                        help="fsspec storage option (repeatable; dotted keys nest, values parse as JSON)")


def main(argv: list[str] | None = None) -> int:
    """Run the command; return its exit code (0 ok, 1 problem, 2 usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as exc:
        parser.error(str(exc))  # exits with 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        print(f"dask-imgsink {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
