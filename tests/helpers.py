"""Test data makers and independent readers (tarfile, pyarrow, webdataset), not our own code."""

from __future__ import annotations

import inspect
import io
import json
import tarfile
from pathlib import Path

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def make_image(i: int, h: int = 48, w: int = 64, channels: int = 3) -> np.ndarray:
    """A smooth, deterministic test image that differs with ``i``."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    planes = [128 + 70 * np.sin(yy / 9.0 + i * 0.7 + c) * np.cos(xx / 11.0 - i * 0.3 + 2 * c) for c in range(channels)]
    img = np.rint(np.stack(planes, axis=-1))
    return img.astype(np.uint8)


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr.squeeze()).save(buf, format="PNG")
    return buf.getvalue()


def make_frame(n: int, start: int = 0, images: str = "array") -> pd.DataFrame:
    """Rows ``start..start+n``: key, image, caption, score, label."""
    idx = range(start, start + n)
    if images == "array":
        values = pd.Series([make_image(i) for i in idx], dtype=object)
    elif images == "png":
        values = pd.Series([png_bytes(make_image(i)) for i in idx], dtype=object)
    elif images == "arrow-binary":
        values = pd.Series([png_bytes(make_image(i)) for i in idx], dtype=pd.ArrowDtype(pa.binary()))
    else:
        raise ValueError(images)
    return pd.DataFrame(
        {
            "key": pd.Series([f"img{i:05d}" for i in idx], dtype=object),
            "image": values,
            "caption": pd.Series([f"caption number {i}" for i in idx], dtype=object),
            "score": [float(i % 10) for i in idx],
            "label": [i % 4 for i in idx],
        }
    )


def _partition_frame(bounds: tuple[int, int], images: str) -> pd.DataFrame:
    lo, hi = bounds
    return make_frame(hi - lo, lo, images)


def make_ddf(source: str, sizes: list[int], tmp_path: Path, images: str = "array"):
    """A Dask DataFrame of ``sum(sizes)`` rows built by ``source``.

    Every source but ``from_pandas`` keeps the partition sizes; ``from_pandas``
    splits the rows evenly over ``len(sizes)`` partitions.
    """
    bounds, lo = [], 0
    for n in sizes:
        bounds.append((lo, lo + n))
        lo += n
    meta = make_frame(1, images=images).iloc[:0]
    with dask.config.set({"dataframe.convert-string": False}):
        if source == "from_pandas":
            pdf = pd.concat([_partition_frame(b, images) for b in bounds], ignore_index=True)
            return dd.from_pandas(pdf, npartitions=len(sizes), sort=False)
        if source == "from_map":
            return dd.from_map(_partition_frame, bounds, images=images, meta=meta, enforce_metadata=False)
        if source == "from_delayed":
            parts = [dask.delayed(_partition_frame)(b, images) for b in bounds]
            return dd.from_delayed(parts, meta=meta, verify_meta=False)
        if source == "read_parquet":
            folder = tmp_path / "source-parquet"
            folder.mkdir()
            for i, b in enumerate(bounds):
                frame = _partition_frame(b, "png")
                frame["image"] = pd.Series(list(frame["image"]), dtype=pd.ArrowDtype(pa.binary()))
                pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), folder / f"part-{i:03d}.parquet")
            return dd.read_parquet(str(folder), split_row_groups=False)
    raise ValueError(source)


def read_tar_samples(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    """Samples of a tar in order, read with the standard library."""
    samples: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(path) as tf:
        for member in tf.getmembers():
            key, ext = member.name.split(".", 1)
            data = tf.extractfile(member).read()
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            samples[-1][1][ext] = data
    return samples


def read_dataset(out: Path) -> dict:
    """Everything written: index, shard names, samples in order, Parquet tables."""
    out = Path(out)
    index = json.loads((out / "_index.json").read_text())
    shards = [e["url"] for e in index["shardlist"]]
    samples = []
    tables = []
    for name in shards:
        samples.extend(read_tar_samples(out / name))
        tables.append(pq.read_table(out / metadata_of(name)))
    return {"index": index, "shards": shards, "samples": samples, "tables": tables}


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def file_bytes(out: Path, suffixes=(".tar", ".parquet", ".idx")) -> dict[str, bytes]:
    """Every shard file's bytes by its path relative to ``out``."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(Path(out).rglob("*"))
            if p.suffix in suffixes and ".imgsink" not in p.parts}


def metadata_of(tar_name: str) -> str:
    """Where the Parquet of the shard ``tar_name`` lives, relative to the dataset."""
    return "metadata/" + tar_name.replace(".tar", ".parquet")


def shard_names(*stems: str) -> list[str]:
    """The files of shards with these stems: ``metadata/<stem>.parquet``, ``<stem>.idx``, ``<stem>.tar``."""
    return sorted(name for stem in stems for name in (f"metadata/{stem}.parquet", f"{stem}.idx", f"{stem}.tar"))


def dataset_names(out: Path) -> list[str]:
    """Every file of the dataset directory, relative to it, without the hidden work folder."""
    out = Path(out)
    if not out.exists():
        return []
    return sorted(str(p.relative_to(out)) for p in out.rglob("*")
                  if p.is_file() and ".imgsink" not in p.relative_to(out).parts)


def claimed_job(ddf, out, **overrides):
    """Options for a job and its claim on ``out``, to drive its steps in this process."""
    from dask.base import tokenize

    from dask_imgsink.job.claim import claim_output

    opts = job_options(ddf, out, **overrides)
    return opts, claim_output(opts, tokenize(*opts.token()))


def job_options(ddf, out, **overrides):
    """The validated WriteOptions ``to_webdataset`` would use, to drive its steps in-process."""
    from dask_imgsink.job.accessor import _build_options, to_webdataset

    defaults = {
        name: p.default for name, p in inspect.signature(to_webdataset).parameters.items()
        if p.kind is p.KEYWORD_ONLY and name not in ("compute", "compute_kwargs")
    }
    return _build_options(ddf, str(out), **{**defaults, **overrides})[1]


JOB_FIELDS = ("job_id", "run_id", "committed_at")


def comparable_dataset(out, fs=None) -> dict:
    """Everything a dataset holds, with what names its job (ids, commit time) taken out.

    Two runs of the same job on the same input must give equal values: the same
    files with the same bytes, the same index but for job ids, a ``_SUCCESS``.
    ``fs`` reads a dataset on another fsspec filesystem (``out`` is then its path there).
    """
    if fs is None:
        import fsspec

        fs, out = fsspec.filesystem("file"), str(Path(out))
    names = {p.rstrip("/").rsplit("/", 1)[-1]: p for p in fs.find(out, withdirs=True, maxdepth=1)
             if p.rstrip("/") != out.rstrip("/")}
    files = {n: fs.cat_file(p) for n, p in sorted(names.items())
             if fs.isfile(p) and n not in ("_index.json", "_SUCCESS")}
    if "metadata" in names:
        files.update({f"metadata/{p.rsplit('/', 1)[-1]}": fs.cat_file(p)
                      for p in sorted(fs.find(names["metadata"]))})
    index = json.loads(fs.cat_file(names["_index.json"]))
    for job in index.get("jobs", []):
        for name in JOB_FIELDS:
            job.pop(name, None)
    hidden = sorted(n for n in names if n.startswith("."))
    return {"files": files, "index": index, "success": "_SUCCESS" in names, "hidden": hidden}


def _gated_partition(bounds: tuple[int, int], wait: bool, gate: str) -> pd.DataFrame:
    """A partition that waits until the file ``gate`` exists: holds a job in flight on purpose."""
    import time

    while wait and not Path(gate).exists():
        time.sleep(0.02)
    return _partition_frame(bounds, "array")


def gated_ddf(sizes: list[int], gate: Path, start: int = 0, open_partitions: int = 0):
    """Like ``make_ddf("from_map", ...)``, but partitions after the first ``open_partitions``
    wait for ``gate`` to exist. Leave the cluster a free thread for the job's claim."""
    bounds, lo = [], start
    for n in sizes:
        bounds.append((lo, lo + n))
        lo += n
    waits = [i >= open_partitions for i in range(len(sizes))]
    meta = make_frame(1).iloc[:0]
    with dask.config.set({"dataframe.convert-string": False}):
        return dd.from_map(_gated_partition, bounds, waits, gate=str(gate), meta=meta, enforce_metadata=False)


def _failing_partition(bounds: tuple[int, int]) -> pd.DataFrame:
    if bounds[0] > 0:
        raise RuntimeError("upstream failure in the user's own partition function")
    return _partition_frame(bounds, "array")


def failing_ddf(sizes: list[int]):
    """A DataFrame whose partitions after the first fail before our write tasks see them."""
    bounds, lo = [], 0
    for n in sizes:
        bounds.append((lo, lo + n))
        lo += n
    meta = make_frame(1).iloc[:0]
    with dask.config.set({"dataframe.convert-string": False}):
        return dd.from_map(_failing_partition, bounds, meta=meta, enforce_metadata=False)


def frame_ddf(n: int, start: int, npartitions: int = 2):
    """``n`` rows with keys ``img{start}...``, for jobs whose data must differ."""
    with dask.config.set({"dataframe.convert-string": False}):
        return dd.from_pandas(make_frame(n, start), npartitions=npartitions, sort=False)


def register_enospc_filesystem(limit: int) -> None:
    """Register ``enospc://``: the local filesystem, but writes fail with ENOSPC once the files
    under the written path's top folder would exceed ``limit`` bytes.

    Only a stand-in for a real small filesystem, used where this process may not mount a tmpfs.
    """
    import errno
    import os

    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    def used(path: str) -> int:
        top = os.path.dirname(os.path.dirname(path))
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(top) for f in files
                   if os.path.exists(os.path.join(d, f)))

    class _Full:
        def __init__(self, f, path):
            self._f, self._path = f, path

        def write(self, data):
            if used(self._path) + len(data) > limit:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._path)
            return self._f.write(data)

        def __getattr__(self, name):
            return getattr(self._f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

    class EnospcFileSystem(LocalFileSystem):
        protocol = "enospc"

        @classmethod
        def _strip_protocol(cls, path):
            return super()._strip_protocol(str(path).removeprefix("enospc://"))

        def _open(self, path, mode="rb", **kwargs):
            f = super()._open(path, mode, **kwargs)
            return _Full(f, self._strip_protocol(path)) if "w" in mode else f

    fsspec.register_implementation("enospc", EnospcFileSystem, clobber=True)


def race_for_the_lock(monkeypatch, jobs: dict) -> dict:
    """Run ``jobs`` (name -> callable) on threads that all reach the lock's create-if-absent at once.

    Returns name -> the job's result, or the exception it raised. Build the jobs'
    DataFrames beforehand: ``dask.config.set`` is process-wide, not per thread.
    """
    import threading

    import dask_imgsink.job.claim as claim_module

    barrier = threading.Barrier(len(jobs), timeout=60)
    real = claim_module.try_claim

    def together(fs, root, info):
        barrier.wait()
        return real(fs, root, info)

    outcome = {}

    def run(name):
        try:
            outcome[name] = jobs[name]()
        except Exception as exc:  # noqa: BLE001 - the loser's error is the point
            outcome[name] = exc

    monkeypatch.setattr(claim_module, "try_claim", together)
    threads = [threading.Thread(target=run, args=(name,)) for name in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    monkeypatch.setattr(claim_module, "try_claim", real)
    return outcome


def staged_job(ddf, out, **overrides):
    """Run a job's claim, write, plan and assemble steps in this process; return its commit to call."""
    import dask_imgsink.job.accessor as acc

    opts, claim = claimed_job(ddf, out, **overrides)
    frames = ddf.to_delayed()
    results = [acc.PartitionWriter(opts)(f.compute(), i, claim) for i, f in enumerate(frames)]
    plan = acc.plan_shards(results, claim, opts)
    assembled = [acc.assemble_shards(plan, range(len(frames)), opts, acc.runs_by_partition(results))]
    summaries = [acc.summarize(r) for r in results]
    return lambda: acc._commit_exact(claim, summaries, assembled, len(frames), opts)


class S3Requests:
    """Counts the HTTP requests this process's s3fs instance for ``options`` sends (each try, as the server
    sees it), by operation; ``latency`` seconds are added before each, to emulate a remote store."""

    def __init__(self, options: dict, latency: float = 0.0) -> None:
        import asyncio

        import s3fs

        self.counts: dict[str, int] = {}
        self.gets: list[tuple[str, str | None]] = []  # (URL, Range header) of each GetObject
        self.fs = s3fs.S3FileSystem(**options)  # the cached instance the job's own calls use
        self.fs.ls("")  # creates its client
        self.latency = latency

        async def before_send(request, **kwargs):
            if self.counting:
                operation = kwargs.get("event_name", "").rsplit(".", 1)[-1]
                self.counts[operation] = self.counts.get(operation, 0) + 1
                if operation == "GetObject":
                    byte_range = request.headers.get("Range")
                    self.gets.append((request.url, byte_range.decode() if isinstance(byte_range, bytes) else byte_range))
                if self.latency:
                    await asyncio.sleep(self.latency)

        self.counting = False
        self.fs.s3.meta.events.register("before-send.s3", before_send)

    def __enter__(self):
        self.counts.clear()
        self.gets.clear()
        self.counting = True
        return self

    def __exit__(self, *exc):
        self.counting = False

    @property
    def total(self) -> int:
        return sum(self.counts.values())
