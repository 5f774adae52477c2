"""``dask-imgsink demo``: generate images on a local cluster, filter, write, read back."""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import pandas as pd

from .common import positive_int, print_report


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


def _side(text: str) -> int:
    value = positive_int(text)
    if not 8 <= value <= 8192:
        raise argparse.ArgumentTypeError(f"must be between 8 and 8192 pixels, not {value}")
    return value


def _aesthetic(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < 10:
        raise argparse.ArgumentTypeError(f"must be in [0, 10), not {value}")
    return value


def run(args: argparse.Namespace) -> int:
    from distributed import Client

    from ..cluster import local_cluster
    from ..format.index import read_index
    from ..job.accessor import to_webdataset
    from ..job.output import existing_entries
    from ..read.verify import verify_dataset
    from ..storage import resolve

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
    return print_report(report, "read back: ")


def add_parser(sub) -> None:
    demo = sub.add_parser(
        "demo",
        help="generate images on a local Dask cluster, filter them, write shards, read them back",
        description="Start a local Dask cluster, generate synthetic images inside its workers, "
        "keep those with aesthetic > --min-aesthetic, write them as WebDataset shards with "
        "Parquet metadata, then read every shard back and print a summary. Nothing is downloaded.",
    )
    demo.add_argument("output_dir", help="where to write the dataset (local path or fsspec URL)")
    demo.add_argument("--images", type=positive_int, default=3000, help="images to generate (default 3000)")
    demo.add_argument("--partitions", type=positive_int, default=12, help="DataFrame partitions (default 12)")
    demo.add_argument("--size", type=_side, default=256, help="image side in pixels, 8-8192 (default 256)")
    demo.add_argument("--min-aesthetic", type=_aesthetic, default=3.0,
                      help="filter: keep rows with aesthetic above this, 0-10 (default 3.0)")
    demo.add_argument("--images-per-tar", type=positive_int, default=500, help="images per shard (default 500)")
    demo.add_argument("--format", default="jpeg", choices=["jpeg", "png", "webp"], help="default jpeg")
    demo.add_argument("--packing", default="exact", choices=["exact", "per_partition"], help="default exact")
    demo.add_argument("--workers", type=positive_int, default=2, help="worker processes (default 2)")
    demo.add_argument("--threads-per-worker", type=positive_int, default=1, help="threads per worker (default 1)")
    demo.add_argument("--mode", choices=["error", "overwrite", "append"], default=None,
                      help="what to do with an existing output directory; default: overwrite an "
                      "earlier demo dataset, refuse anything else")
    demo.set_defaults(func=run)
