"""The writer's own CPU per image, beside encoding, on one thread: where the last 10-20 % go.

Wall-time ratios on this project's shared 2-core machine move by 10-20 % between
runs; CPU seconds on one thread, alternated, move by a few percent. So this script
measures, for one partition of real photographs (512x512, JPEG q92 4:2:0):

- encoding alone: ``encode_image`` over the images on this thread;
- the whole job on the same images (accessor, synchronous scheduler,
  ``encode_threads=1``, so encoding runs on this thread too): every CPU second of
  the process, the SHA-256 helper thread included;
- the per-byte work any checksummed writer does, each on its own: SHA-256 of every
  byte, XXH3-64 of every sample, the write of every byte into the page cache (a
  fresh file in a folder removed afterwards, as a job's shards are here; gathered
  into ``os.writev`` calls, the cheapest plain write, as the writer's own are);
- the same write over a file the page cache already holds: no new pages. The two
  page-cache rows differ by what new pages cost, which on this project's machine
  moves from run to run (a virtual machine that hands freed memory back to its host).

Inside the job, each ``encode_image`` call's thread CPU is summed too (the writer's
reference to it is wrapped here, for this measurement only), so the job's CPU splits
into its encoding and the writer's own work. The writer's work less the per-byte work
is what is left to cut (tar headers, index rows, Parquet, the commit, Python).

Usage: ``python benchmarks/bench_overhead.py [--images 800] [--repeats 10]``.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time

import dask
import dask.dataframe as dd
import pandas as pd
from bench_encode import photographs
from measure import write_gathered
from run import scratch

import dask_imgsink  # noqa: F401
import dask_imgsink.core.writer as writer_module
from dask_imgsink.core.encode import EncodeOptions, encode_image
from dask_imgsink.format.checksums import sample_checksum


class EncodeClock:
    """Wraps the writer's ``encode_image``: sums the thread CPU of every call."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._encode = writer_module.encode_image
        writer_module.encode_image = self

    def __call__(self, value, options):
        start = time.thread_time()
        try:
            return self._encode(value, options)
        finally:
            self.seconds += time.thread_time() - start


def cpu_seconds(fn) -> float:
    """Process CPU seconds (every thread) of one call of ``fn``."""
    start = time.process_time()
    fn()
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=800)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    images = photographs(args.images)
    options = EncodeOptions()
    encoded = [encode_image(img, options).data for img in images]
    frame = pd.DataFrame({"key": [f"img{i:07d}" for i in range(len(images))],
                          "image": pd.Series(images, dtype=object)})
    with dask.config.set({"dataframe.convert-string": False}):
        ddf = dd.from_pandas(frame, npartitions=1)

    def alone() -> None:
        for img in images:
            encode_image(img, options)

    def job(packing: str):
        def run() -> None:
            with scratch() as folder:
                ddf.imgsink.to_webdataset(f"{folder}/out", key_column="key", packing=packing, images_per_tar=500,
                                          encode_threads=1, compute=True)
        return run

    def sha256() -> None:
        digest = hashlib.sha256()
        for blob in encoded:
            digest.update(blob)

    def xxh3() -> None:
        for blob in encoded:
            sample_checksum(blob)

    def page_cache() -> None:
        with scratch() as folder:
            write_gathered(f"{folder}/shard.tar", encoded)

    def page_cache_again(folder: str):
        def run() -> None:  # over the same file: its pages stay in the page cache, no new ones
            write_gathered(f"{folder}/again.tar", encoded, truncate=False)
        return run

    clock = EncodeClock()
    kinds = {"encoding alone": alone, "job, exact": job("exact"), "job, per_partition": job("per_partition"),
             "SHA-256 of every byte": sha256, "XXH3-64 of every sample": xxh3,
             "page-cache write of every byte": page_cache}
    with dask.config.set(scheduler="sync"), scratch() as kept:
        kinds["page-cache write, over a file already cached"] = page_cache_again(kept)
        for fn in kinds.values():
            fn()  # warm up
        cpu: dict[str, list[float]] = {name: [] for name in kinds}
        encoding_in: dict[str, list[float]] = {"job, exact": [], "job, per_partition": []}
        for _ in range(args.repeats):
            for name, fn in kinds.items():  # alternated: the machine's drift moves every kind alike
                clock.seconds = 0.0
                cpu[name].append(cpu_seconds(fn))
                if name in encoding_in:
                    encoding_in[name].append(clock.seconds)
    per_image = {name: statistics.median(times) / len(images) * 1e6 for name, times in cpu.items()}
    for name, times in encoding_in.items():
        per_image[f"{name}: its encoding"] = statistics.median(times) / len(images) * 1e6
    per_byte = sum(per_image[name] for name in list(kinds)[3:6])
    megabytes = sum(map(len, encoded)) / 1e6
    print(f"{len(images)} photographs 512x512 ({megabytes:.0f} MB as JPEG), one thread, CPU microseconds per image,"
          f" medians of {args.repeats} alternated runs")
    for name, value in per_image.items():
        print(f"{name:<48}{value:>8.1f}")
    for packing in ("exact", "per_partition"):
        encoding = per_image[f"job, {packing}: its encoding"]
        beyond = statistics.median(c - e for c, e in zip(cpu[f"job, {packing}"], encoding_in[f"job, {packing}"]))
        beyond = beyond / len(images) * 1e6
        print(f"job, {packing}: the writer's own work {beyond:.1f} ({beyond / encoding:.1%} of the job's encoding;"
              f" per-byte work {per_byte:.1f}, the rest {beyond - per_byte:.1f})")


if __name__ == "__main__":
    main()
