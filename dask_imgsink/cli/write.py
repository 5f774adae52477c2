"""``dask-imgsink write INPUT OUTPUT_DIR``: write images from Parquet, a folder or a dataset as shards."""

from __future__ import annotations

import argparse
import time

from .common import (
    UsageError,
    add_scheduler,
    add_storage_option,
    byte_size,
    dask_client,
    positive_int,
    run_with_progress,
    storage_options,
)
from .inputs import open_input


def _quality(text: str) -> int:
    value = positive_int(text)
    if value > 100:
        raise argparse.ArgumentTypeError(f"must be between 1 and 100, not {value}")
    return value


def _columns(text: str) -> list[str]:
    names = [c.strip() for c in text.split(",") if c.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give column names separated by commas")
    return names


def _filtered(frame, expression: str | None):
    """``frame.query(expression)``, refusing an expression that does not fit the columns."""
    if not expression:
        return frame
    try:
        frame._meta_nonempty.query(expression)  # Dask's stand-in rows: a type mismatch shows now, not mid-job
        return frame.query(expression)
    except Exception as exc:  # pandas raises many types for a bad expression
        raise UsageError(f"--filter {expression!r} cannot be applied ({type(exc).__name__}: {exc}); "
                         f"columns: {list(frame.columns)}") from None


def _skipped_rows(output_dir: str, options: dict | None) -> int:
    """How many rows the job that just committed to ``output_dir`` skipped (from its index record)."""
    from ..format.index import read_index
    from ..storage import resolve

    fs, root = resolve(output_dir, options)
    return ((read_index(fs, root) or {}).get("jobs") or [{}])[-1].get("skipped", 0)


def run(args: argparse.Namespace) -> int:
    from ..format.index import IndexFormatError
    from ..job.accessor import to_webdataset
    from ..job.output import OutputStateError

    options = storage_options(args.storage_option)
    source = open_input(args.input, storage_options=options, image_column=args.image_column,
                        files_per_partition=args.files_per_partition, text_column=args.text_column,
                        label_column=args.label_column)
    frame = _filtered(source.frame, args.filter)
    roles = {
        "image_column": source.image_column,
        "key_column": args.key_column or source.key_column,
        "text_column": args.text_column or source.text_column,
        "label_column": args.label_column or source.label_column,
    }
    with dask_client(args.scheduler, args.workers) as client:
        start = time.perf_counter()
        try:  # what to_webdataset checks before any work is about the arguments
            bag = to_webdataset(
                frame, args.output_dir, **roles,
                metadata_columns=args.columns,
                images_per_tar=args.images_per_tar, max_shard_bytes=args.max_shard_bytes,
                image_format=args.format, quality=args.quality, packing=args.packing, mode=args.mode,
                on_error=args.on_error, storage_options=options,
            )
        except (OutputStateError, IndexFormatError):
            raise  # the output's state, not the arguments: exit 1
        except (ValueError, TypeError) as exc:
            raise UsageError(str(exc)) from None
        tasks = run_with_progress(bag, client, progress=not args.no_progress)
        elapsed = time.perf_counter() - start
    images = sum(t.metadata["num_images"] for t in tasks)
    size = sum(t.metadata["bytes"] for t in tasks)
    skipped = _skipped_rows(args.output_dir, options)
    print(f"wrote {len(tasks)} shards, {images} images, {size / 1e6:.1f} MB from {source.kind} {args.input} "
          f"to {args.output_dir} in {elapsed:.1f} s")
    if skipped:
        print(f"skipped {skipped} rows (listed in {args.output_dir.rstrip('/')}/_errors.jsonl)")
    return 0


def add_parser(sub) -> None:
    write = sub.add_parser(
        "write", help="write images from Parquet, a folder of image files or a dataset as WebDataset shards",
        description="Write INPUT as WebDataset shards with Parquet metadata in OUTPUT_DIR. INPUT is a "
        "Parquet file or dataset with a column of encoded images (bytes or Hugging Face image structs), "
        "a folder of .jpg/.jpeg/.png/.webp files (bytes passed through; keys from the relative paths: "
        "letters, digits, _ and - kept, any other character as ~ and its UTF-8 bytes in hex, e.g. "
        "photos/cat 1.jpg is photos~2Fcat~201), or a dataset written by dask-imgsink (re-sharded, "
        "keys and bytes kept). Exit 0 when written, 1 when the job failed, 2 for a usage error.",
    )
    write.add_argument("input", help="Parquet file/dataset, image folder, or dask-imgsink dataset (path or URL)")
    write.add_argument("output_dir", help="where to write the dataset (local path or fsspec URL)")
    cols = write.add_argument_group("columns")
    cols.add_argument("--image-column", help="column of images (default: 'image', or the only binary column)")
    cols.add_argument("--key-column", help="column of sample keys (default: 'key' if there is one, else generated)")
    cols.add_argument("--text-column", help="column written as key.txt")
    cols.add_argument("--label-column", help="integer column written as key.cls")
    cols.add_argument("--columns", type=_columns, metavar="A,B,...",
                      help="metadata columns for the Parquet and key.json (default: all others)")
    cols.add_argument("--filter", metavar="EXPR", help="keep rows where this pandas query holds, "
                      "e.g. 'aesthetic > 5 and width >= 256'")
    shards = write.add_argument_group("shards")
    shards.add_argument("--images-per-tar", type=positive_int, default=1000, help="default 1000")
    shards.add_argument("--max-shard-bytes", type=byte_size, metavar="SIZE",
                        help="also close a shard before it exceeds SIZE (e.g. 500MB, 1GiB)")
    shards.add_argument("--format", default="jpeg", choices=["jpeg", "png", "webp"],
                        help="format for pixel arrays; encoded images pass through (default jpeg)")
    shards.add_argument("--quality", type=_quality, default=92, help="JPEG/WebP quality 1-100 (default 92)")
    shards.add_argument("--packing", default="exact", choices=["exact", "per_partition"], help="default exact")
    shards.add_argument("--mode", default="error", choices=["error", "overwrite", "append"],
                        help="what to do with an existing output directory (default error)")
    shards.add_argument("--on-error", default="raise", choices=["raise", "skip"],
                        help="a bad row fails the job (raise, default) or is skipped and recorded (skip)")
    shards.add_argument("--files-per-partition", type=positive_int, default=500,
                        help="image files per Dask partition, for a folder input (default 500)")
    run_opts = write.add_argument_group("running")
    add_scheduler(run_opts)
    add_storage_option(run_opts)
    run_opts.add_argument("--no-progress", action="store_true", help="no progress bar")
    write.set_defaults(func=run)
