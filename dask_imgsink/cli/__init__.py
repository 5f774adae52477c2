"""The dask-imgsink command: write, demo, verify, info, clean.

Exit codes: 0 all well, 1 a problem found (or the command failed), 2 a usage
error. No user error ends in a traceback.
"""

from __future__ import annotations

import argparse
import sys

from . import demo, info, maintain, write
from .common import UsageError, storage_options
from .demo import demo_dataframe

DESCRIPTION = ("Write Dask DataFrames of images as WebDataset shards with Parquet metadata, "
               "and check, summarise and clean such datasets.")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="dask-imgsink", description=DESCRIPTION,
                                     epilog="Exit codes: 0 ok, 1 a problem found or the job failed, 2 usage error.")
    parser.add_argument("--version", action="version", version=f"dask-imgsink {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    write.add_parser(sub)
    demo.add_parser(sub)
    maintain.add_parsers(sub)
    info.add_parser(sub)
    return parser


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


__all__ = ["UsageError", "build_parser", "demo_dataframe", "main", "storage_options"]
