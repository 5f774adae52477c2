"""What every subcommand shares: usage errors, argument types, storage options, the Dask client."""

from __future__ import annotations

import argparse
import contextlib
import json

from ..core.argcheck import check_byte_size


class UsageError(Exception):
    """A command line that cannot be run as given (exit code 2)."""


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def byte_size(text: str) -> int:
    """An argparse type: a size in bytes, as ``1000000``, ``500MB`` or ``1GiB``."""
    try:
        return check_byte_size("size", text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size of at least 1 byte (e.g. 500MB, 1GiB, "
                                         "1000000)") from None


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


def add_storage_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage-option", action="append", metavar="KEY=VALUE",
                        help="fsspec storage option (repeatable; dotted keys nest, values parse as JSON)")


def add_scheduler(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scheduler", default="local", metavar="ADDR",
                        help="Dask scheduler address (tcp://host:8786), 'local' to start a local cluster "
                        "(default) or 'threads' to run in this process")
    parser.add_argument("--workers", type=positive_int, default=None,
                        help="worker processes of the local cluster (default: one per core)")


@contextlib.contextmanager
def dask_client(scheduler: str, workers: int | None = None):
    """A Client for ``scheduler``: "local" starts a LocalCluster, "threads" runs in this process (None)."""
    if scheduler == "threads":
        yield None
        return

    from distributed import Client

    from ..cluster import local_cluster

    if scheduler == "local":
        with local_cluster(n_workers=workers, threads_per_worker=1) as cluster, Client(cluster) as client:
            yield client
        return
    try:
        client = Client(scheduler)  # waits distributed.comm.timeouts.connect (30 s unless configured)
    except (OSError, TimeoutError, ValueError) as exc:
        raise UsageError(f"cannot reach the Dask scheduler at {scheduler!r} ({exc})") from None
    with client:
        yield client


def print_report(report, prefix: str = "") -> int:
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


def run_with_progress(collection, client, progress: bool):
    """Compute ``collection`` with a text progress bar on stderr (``distributed.progress`` under a
    Client, ``dask.diagnostics.ProgressBar`` on threads)."""
    import sys

    if not progress:
        return collection.compute()
    if client is None:
        from dask.diagnostics import ProgressBar

        with ProgressBar(out=sys.stderr):
            result = collection.compute()
        print(file=sys.stderr)
        return result
    from distributed import progress as distributed_progress

    persisted = collection.persist()
    with contextlib.redirect_stdout(sys.stderr):  # the text bar writes to stdout; keep stdout for results
        distributed_progress(persisted, notebook=False)
        print()
    return persisted.compute()
