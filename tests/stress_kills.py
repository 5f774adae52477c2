"""Random jobs, workers SIGKILLed at random moments, each dataset compared with an undisturbed run's.

Not collected by pytest (it runs for minutes): ``python tests/stress_kills.py [--jobs 40] [--seed 0]``.
The tests that kill a worker at chosen steps (``test_commit_kills.py``, ``test_worker_loss.py``) show
that each step can be rerun; this runs many random jobs, so that the kills land where nobody chose:

- each job has 4-13 partitions of 0-39 rows: noise pixels (PNG-encoded, so the job lasts), PNG bytes
  passed through, empty images (bad rows, skipped), null captions, and, in some jobs, keys repeated
  across the job; random ``images_per_tar``, ``max_shard_bytes``, packing, ``unique_keys`` and carry
  budget; some jobs append to a dataset written first;
- each runs once undisturbed on threads, then on a 2 x 1 LocalCluster where a busy worker is killed
  after a random part of the undisturbed run's time, or the moment the commit first publishes a file
  or writes its journal, or both workers are killed then;
- the two datasets must be the same file for file (job ids and times aside), ``verify`` must pass,
  and no staging may be left.

It prints one line per job (``OK``, ``DIFF`` with what differs, or ``ERROR``) and a summary.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
from distributed import Client, LocalCluster

sys.path.insert(0, str(Path(__file__).parent))
from helpers import comparable_dataset, make_image, png_bytes  # noqa: E402

import dask_imgsink  # noqa: E402,F401
from dask_imgsink.read.verify import verify_dataset  # noqa: E402

BAD_IMAGE = np.zeros((0, 4, 3), np.uint8)
TRIGGERS = ("time", "commit", "commit", "both")


def _partition(spec: tuple) -> pd.DataFrame:
    seed, n, start, repeat_every, bad = spec
    rng = np.random.default_rng(seed)
    images, keys = [], []
    for i in range(n):
        row = start + i
        if bad and i % 7 == 3:
            images.append(BAD_IMAGE)
        elif i % 5 == 2:
            images.append(png_bytes(make_image(row, 40, 40)))
        else:
            images.append(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8))
        keys.append(f"k{row % repeat_every if repeat_every else row:05d}")
    return pd.DataFrame({"key": pd.Series(keys, dtype=object), "image": pd.Series(images, dtype=object),
                         "caption": pd.Series([None if i % 4 == 0 else f"c{start + i}" for i in range(n)],
                                              dtype=object),
                         "score": np.arange(start, start + n, dtype=float)})


def _frame(specs: list[tuple]) -> dd.DataFrame:
    with dask.config.set({"dataframe.convert-string": False}):
        return dd.from_map(_partition, specs, meta=_partition((0, 0, 0, 0, False)), enforce_metadata=False)


def _specs(rng: random.Random, start: int, partitions: int, repeat_every: int, bad: bool) -> list[tuple]:
    specs, row = [], start
    for p in range(partitions):
        n = rng.randint(0, 39)
        specs.append((start * 1000 + p, n, row, repeat_every, bad))
        row += n
    return specs


def _comparable(out: Path) -> dict:
    """``comparable_dataset`` with the job ids in the errors file and the card taken out too."""
    found = comparable_dataset(out)
    files = found["files"]
    if "_errors.jsonl" in files:
        records = [json.loads(line) for line in files["_errors.jsonl"].splitlines()]
        files["_errors.jsonl"] = [{k: v for k, v in r.items() if k != "job_id"} for r in records]
    if "README.md" in files:
        files["README.md"] = re.sub(rb"[0-9a-f]{32}", b"<job>", files["README.md"])
    return found


def _job(rng: random.Random) -> tuple[dict, list[tuple], list[tuple] | None, int | None]:
    """Options, partitions, the partitions of a dataset to append to (or None), and the carry budget."""
    repeat_every = rng.choice([0, 0, 150])
    bad = rng.random() < 0.5
    options = dict(key_column="key", text_column="caption", image_format="png", on_error="skip",
                   images_per_tar=rng.choice([7, 25, 60]), max_shard_bytes=rng.choice([None, None, 300_000]),
                   packing=rng.choice(["exact", "exact", "per_partition"]),
                   unique_keys=rng.choice(["dataset", "shard"]))
    if repeat_every and options["packing"] == "per_partition" and options["unique_keys"] == "dataset":
        options["unique_keys"] = "shard"  # such a job fails by design (a repeat cannot be left out)
    append = rng.random() < 0.4
    first = _specs(rng, 0, 3, repeat_every, bad) if append else None
    specs = _specs(rng, 100_000 if append else 0, rng.randint(4, 13), repeat_every, bad)
    return options, specs, first, rng.choice([None, 0, 100_000])


def _kill(client: Client, pids: dict, trigger: str, rng: random.Random, future, out: Path,
          seconds: float) -> str | None:
    """Kill a busy worker (or both) at the moment ``trigger`` names; what was killed, or None."""
    before = len(list(out.glob("*.tar"))) if out.exists() else 0
    if trigger == "time":
        time.sleep(rng.uniform(0.05, 1.0) * seconds)
    else:
        deadline = time.monotonic() + 120
        while not future.done() and time.monotonic() < deadline:
            try:
                if len(list(out.glob("*.tar"))) > before or any(out.glob(".imgsink/jobs/*/commit.json")):
                    break
            except FileNotFoundError:
                pass
            time.sleep(0.0005)
    if future.done():
        return None
    if trigger == "both":
        for pid in pids.values():
            os.kill(pid, signal.SIGKILL)
        return "both workers"
    busy = [address for address, keys in client.processing().items() if keys and address in pids]
    victim = rng.choice(busy or list(pids))
    os.kill(pids[victim], signal.SIGKILL)
    return f"a worker, at {trigger}"


def run_one(client: Client, rng: random.Random, case: Path) -> tuple[str, str]:
    options, specs, first, carry = _job(rng)
    reference, out = case / "reference" / "ds", case / "disturbed" / "ds"
    mode = "append" if first else "error"
    if first:
        with dask.config.set(scheduler="threads"):
            _frame(first).imgsink.to_webdataset(str(reference), compute=True, **options)
        shutil.copytree(reference, out)
    start = time.monotonic()
    with dask.config.set({"scheduler": "threads", "imgsink.carry-bytes": carry}):
        _frame(specs).imgsink.to_webdataset(str(reference), mode=mode, compute=True, **options)
    seconds = time.monotonic() - start
    with dask.config.set({"imgsink.carry-bytes": carry}):
        bag = _frame(specs).imgsink.to_webdataset(str(out), mode=mode, **options)
    client.wait_for_workers(2, timeout=60)
    time.sleep(1)
    pids = client.run(os.getpid)
    future = client.compute(bag)
    killed = _kill(client, pids, rng.choice(TRIGGERS), rng, future, out, seconds)
    future.result(timeout=300)
    what = f"killed {killed or 'nothing (the job ended first)'}; {mode}, {len(specs)} partitions, carry {carry}, {options}"
    expected, found = _comparable(reference), _comparable(out)
    problems = [k for k in expected if expected[k] != found[k]]
    if not verify_dataset(str(out)).ok:
        problems.append("verify")
    if (out / ".imgsink").exists():
        problems.append("staging left")
    return ("DIFF " + ", ".join(problems) if problems else "OK"), what


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    # LocalCluster closes the nanny of a worker whose name is still absent this long after a removal
    # (15 s by default): kills less than that apart let an earlier kill's timer close a nanny whose
    # worker had just been killed again, and the job then waited for workers forever
    dask.config.set({"distributed.deploy.lost-worker-timeout": "1h"})
    counts: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as scratch, \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                         scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
                         silence_logs=logging.CRITICAL) as cluster, Client(cluster) as client:
        for job in range(args.jobs):
            rng = random.Random(args.seed + job)
            try:
                verdict, what = run_one(client, rng, Path(scratch) / f"job-{job}")
            except Exception:
                verdict, what = "ERROR", traceback.format_exc().strip().splitlines()[-1]
            counts[verdict.split()[0]] = counts.get(verdict.split()[0], 0) + 1
            print(f"{verdict:<5} job {job} (seed {args.seed + job}): {what}", flush=True)
            shutil.rmtree(Path(scratch) / f"job-{job}", ignore_errors=True)
    print(", ".join(f"{n} {verdict}" for verdict, n in sorted(counts.items())))


if __name__ == "__main__":
    main()
