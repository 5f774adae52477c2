"""``dask-imgsink verify`` and ``dask-imgsink clean``."""

from __future__ import annotations

import argparse
import sys

from .common import (
    UsageError,
    add_scheduler,
    add_storage_option,
    dask_client,
    positive_int,
    print_report,
    storage_options,
)


def run_verify(args: argparse.Namespace) -> int:
    from ..read.verify import verify_dataset

    options = storage_options(args.storage_option)
    with dask_client(args.scheduler, args.workers) as client:
        try:
            report = verify_dataset(args.path, storage_options=options, decode=args.decode, client=client,
                                    max_pixels=args.max_pixels)
        except FileNotFoundError as exc:
            raise UsageError(str(exc)) from None
    return print_report(report)


def run_clean(args: argparse.Namespace) -> int:
    from ..job.cleanup import clean
    from ..job.lock import OutputLockedError

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


def add_parsers(sub) -> None:
    verify = sub.add_parser(
        "verify", help="check every byte of a dataset against its checksums and index",
        description="Check a dataset: every tar and Parquet against the SHA-256 and size in _index.json, "
        "every tar header, every Parquet row against its sample (byte ranges, sample checksum, "
        "text/label/json members), missing and stray files, leftover staging. One Dask task per shard. "
        "Exit 0 when intact, 1 naming each problem's shard and member, 2 for a usage error.",
    )
    verify.add_argument("path", help="the dataset directory (local path or fsspec URL)")
    verify.add_argument("--decode", action="store_true", help="also decode every image")
    verify.add_argument("--max-pixels", type=positive_int, default=None,
                        help="largest image to decode (default: the limit the dataset was written with)")
    add_scheduler(verify)
    add_storage_option(verify)
    verify.set_defaults(func=run_verify)

    clean = sub.add_parser(
        "clean", help="remove staging and locks that no live job owns",
        description="Remove what a dead job left in a dataset directory (its lock and staged files under "
        ".imgsink/). A lock whose job is known dead is broken; one whose job may still run (say, on "
        "another machine) only with --break-lock; one whose job is running never.",
    )
    clean.add_argument("path", help="the dataset directory (local path or fsspec URL)")
    clean.add_argument("--break-lock", action="store_true",
                       help="also break a lock whose job cannot be shown dead")
    add_storage_option(clean)
    clean.set_defaults(func=run_clean)
