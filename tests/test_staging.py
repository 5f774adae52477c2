"""Staging never leaks and never misleads: readers never see it, and no failure leaves it behind."""

from __future__ import annotations

import errno
import glob
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import dask
import dask.dataframe as dd
import duckdb
import fsspec
import numpy as np
import pandas as pd
import polars as pl
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from helpers import (
    claimed_job,
    dataset_names,
    frame_ddf,
    make_frame,
    read_dataset,
    shard_names,
)

import dask_imgsink  # noqa: F401
from dask_imgsink import BadRowError, verify_dataset
from dask_imgsink.cli import main

TESTS = Path(__file__).parent


def _stage_without_commit(ddf, out, **options):
    """Run a job's claim, writes and assembly in this process, as if it were stopped before its commit."""
    from dask_imgsink.job.packing import assemble_shards, runs_by_partition
    from dask_imgsink.job.plan import plan_shards
    from dask_imgsink.job.write import PartitionWriter

    opts, claim = claimed_job(ddf, out, key_column="key", images_per_tar=4, **options)
    frames = [part.compute() for part in ddf.to_delayed()]
    results = [PartitionWriter(opts)(frame, i, claim) for i, frame in enumerate(frames)]
    assemble_shards(plan_shards(results, claim, opts), range(len(frames)), opts, runs_by_partition(results))
    staged = list((Path(out) / ".imgsink").rglob("*.part"))
    assert any(p.name.endswith(".parquet.part") for p in staged) and any(p.name.endswith(".tar.part") for p in staged)


def test_readers_see_nothing_of_a_job_in_flight_on_a_new_directory(tmp_path):
    out = tmp_path / "out"
    _stage_without_commit(frame_ddf(10, 0), out)
    assert glob.glob(f"{out}/*.tar") == [] and glob.glob(f"{out}/*.parquet") == []
    assert ds.dataset(str(out), format="parquet").files == []
    assert pd.read_parquet(out).shape == (0, 0)
    assert pq.read_table(out).num_rows == 0
    with pytest.raises(ValueError, match="No files satisfy"):
        dd.read_parquet(str(out))  # dask reads every *.parquet below, hidden folders too: staged ones end in .part


def test_readers_see_only_the_dataset_while_an_append_is_in_flight(tmp_path):
    out = tmp_path / "out"
    frame_ddf(9, 0).imgsink.to_webdataset(str(out), key_column="key", images_per_tar=4, compute=True)
    _stage_without_commit(frame_ddf(10, 100), out, mode="append")
    assert len(dd.read_parquet(str(out)).compute()) == 9
    assert pl.read_parquet(f"{out}/metadata/*.parquet").height == 9
    assert duckdb.sql(f"select count(*) from '{out}/metadata/*.parquet'").fetchall() == [(9,)]
    assert pd.read_parquet(out / "metadata").shape[0] == 9
    assert sorted(Path(p).name for p in glob.glob(f"{out}/*.tar")) == [f"shard-00000{i}.tar" for i in range(3)]
    files = ds.dataset(str(out / "metadata"), format="parquet").files
    assert sorted(Path(f).name for f in files) == [f"shard-00000{i}.parquet" for i in range(3)]
    script = textwrap.dedent(f"""
        import datasets, os
        d = datasets.load_dataset({str(out)!r}, split="train", cache_dir={str(tmp_path / 'hf')!r})
        print(d.num_rows, flush=True)
        os._exit(0)
    """)
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.stdout.strip().splitlines()[-1] == "9", proc.stderr[-2000:]


def _with_bad_row(n_parts: int = 4) -> dd.DataFrame:
    pdf = make_frame(n_parts * 6)
    pdf.at[n_parts * 6 - 4, "image"] = np.zeros((8, 8, 4), np.uint8)  # RGBA into JPEG, in the last partition
    with dask.config.set({"dataframe.convert-string": False}):
        return dd.from_pandas(pdf, npartitions=n_parts, sort=False)


@pytest.mark.parametrize("how", ["bag.compute", "dask.compute", "client.compute"])
def test_a_failed_lazy_compute_leaves_no_staging(tmp_path, client, how):
    out = tmp_path / "out"
    bag = _with_bad_row().imgsink.to_webdataset(str(out), key_column="key", images_per_tar=4)
    with pytest.raises(BadRowError):
        if how == "bag.compute":
            bag.compute(scheduler="threads")
        elif how == "dask.compute":
            dask.compute(bag)
        else:
            client.compute(bag).result(timeout=120)
    assert not (out / ".imgsink").exists() and (not out.exists() or list(out.iterdir()) == [])


def test_an_overwrite_leaves_no_staging(tmp_path):
    out = tmp_path / "out"
    for start in (0, 100):
        frame_ddf(6, start).imgsink.to_webdataset(str(out), key_column="key", mode="overwrite", compute=True)
        assert not (out / ".imgsink").exists()
    assert [k for k, _ in read_dataset(out)["samples"]][0] == "img00100"


# ----------------------------------------------------------------------------- a full disk


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB filesystem: a real tmpfs when this process may mount one (root, as in CI here),
    else an fsspec filesystem that raises ENOSPC past 3 MiB (registered as ``enospc://``)."""
    mount = tmp_path / "small"
    if _mount_tmpfs(mount, "3m"):
        yield str(mount), "tmpfs"
        subprocess.run(["umount", "-l", str(mount)], check=False)
    else:
        from helpers import register_enospc_filesystem

        register_enospc_filesystem(3 << 20)
        yield f"enospc://{mount}", "fsspec"


def _noise_ddf(rows: int):
    rng = np.random.default_rng(0)
    pdf = pd.DataFrame({"key": [f"n{i:04d}" for i in range(rows)],
                        "image": pd.Series([rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(rows)],
                                           dtype=object)})
    with dask.config.set({"dataframe.convert-string": False}):
        return dd.from_pandas(pdf, npartitions=4, sort=False)


def _deleted_files_held_open(under: str) -> list[str]:
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if under in target and target.endswith("(deleted)"):
            held.append(target)
    return held


@pytest.mark.parametrize("carry_bytes", ["64 MiB", 0], ids=["carried", "written-ahead"])
def test_a_full_disk_fails_cleanly_and_frees_its_space(small_disk, carry_bytes):
    """Whether an open shard's rows are carried to the next group in memory or written ahead
    into its staged tar at every group (budget 0, a cluster's default) and continued there."""
    root, kind = small_disk
    out = f"{root}/out"
    # 800 PNGs of noise, ~4.8 kB each: the shards (3.9 MB; runs stay in memory) do not fit in 3 MiB;
    # 4 partitions, 230 images a shard: every group but the last leaves its last shard open
    with pytest.raises(OSError) as info, dask.config.set({"imgsink.carry-bytes": carry_bytes}):
        _noise_ddf(800).imgsink.to_webdataset(out, key_column="key", image_format="png", images_per_tar=230,
                                             compute=True, compute_kwargs={"scheduler": "threads"})
    assert info.value.errno == errno.ENOSPC, repr(info.value)
    if kind == "tmpfs":
        leftovers = [str(p) for p in Path(out).rglob("*")]
        assert leftovers == [], leftovers
        usage = os.statvfs(root)
        assert (usage.f_blocks - usage.f_bfree) * usage.f_frsize < 64 << 10  # the space is free again
        assert _deleted_files_held_open(root) == []
    # a job that fits now succeeds: the failed one left nothing in its way
    _noise_ddf(40).imgsink.to_webdataset(out, key_column="key", image_format="png", images_per_tar=50,
                                        compute=True, compute_kwargs={"scheduler": "threads"})
    report = verify_dataset(out)
    assert report.ok and report.images == 40, report.problems


def test_exact_packing_needs_no_more_disk_than_its_dataset(small_disk):
    """Each byte is written once, to its shard: a dataset of over 80% of the disk fits (runs stay in memory)."""
    root, _ = small_disk
    out = f"{root}/out"
    _noise_ddf(480).imgsink.to_webdataset(out, key_column="key", image_format="png", images_per_tar=50,
                                         compute=True, compute_kwargs={"scheduler": "threads"})
    report = verify_dataset(out)
    assert report.ok and report.images == 480, report.problems
    fs, path = fsspec.core.url_to_fs(out)
    size = sum(info["size"] for info in fs.find(path, detail=True).values())
    assert size > 0.8 * (3 << 20)  # staging every byte twice would need 1.6x the disk


# ----------------------------------------------------------------------------- killed clients


def _start_client_job(tmp_path: Path, out: Path, gate: Path, scheduler: str | None) -> subprocess.Popen:
    """A client process computing a job whose second partition waits on ``gate``; on ``scheduler``
    or on its own LocalCluster. The first partition goes through, so staged files appear."""
    script = textwrap.dedent(f"""
        import sys, logging
        sys.path.insert(0, {str(TESTS)!r})
        from distributed import Client, LocalCluster
        from helpers import gated_ddf
        import dask_imgsink, pathlib
        scheduler = {scheduler!r}
        if scheduler is None:
            cluster = LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None,
                                   scheduler_kwargs={{"dashboard_address": "127.0.0.1:0"}},
                                   silence_logs=logging.CRITICAL)
            client = Client(cluster)
        else:
            client = Client(scheduler)
        ddf = gated_ddf([6, 6], pathlib.Path({str(gate)!r}), open_partitions=1)
        client.compute(ddf.imgsink.to_webdataset({str(out)!r}, key_column="key", images_per_tar=4)).result()
    """)
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, "the client process ended early"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_a_killed_client_with_its_local_cluster_then_a_rerun(tmp_path):
    out, gate = tmp_path / "out", tmp_path / "gate"
    proc = _start_client_job(tmp_path, out, gate, None)
    _wait_for(out / ".imgsink" / "lock.json", proc)
    deadline = time.monotonic() + 60
    while not list((out / ".imgsink").rglob("*.part")):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the client, its scheduler and its workers: a crashed notebook
    proc.wait()
    time.sleep(0.5)
    assert (out / ".imgsink" / "lock.json").exists()  # nothing of ours ran after the kill
    # the rerun finds the holder dead (its scheduler on this machine is gone), breaks the lock, removes its staging
    frame_ddf(7, 0).imgsink.to_webdataset(str(out), key_column="key", images_per_tar=4, compute=True)
    assert not (out / ".imgsink").exists()
    report = verify_dataset(str(out))
    assert report.ok and report.images == 7, report.problems


def test_a_killed_client_of_a_surviving_cluster_then_a_rerun(tmp_path, client):
    out, gate = tmp_path / "out", tmp_path / "gate"
    proc = _start_client_job(tmp_path, out, gate, client.scheduler.address)
    _wait_for(out / ".imgsink" / "lock.json", proc)
    os.killpg(proc.pid, signal.SIGKILL)  # only the client: the scheduler forgets its job
    proc.wait()
    gate.touch()  # tasks already running on the workers finish (they cannot be interrupted)
    deadline = time.monotonic() + 60
    while any(client.processing().values()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    frame_ddf(7, 0).imgsink.to_webdataset(str(out), key_column="key", images_per_tar=4, compute=True)
    assert not (out / ".imgsink").exists()
    assert verify_dataset(str(out)).ok


def test_clean_removes_leftovers_that_no_lock_owns(tmp_path, capsys):
    out = tmp_path / "out"
    frame_ddf(5, 0).imgsink.to_webdataset(str(out), key_column="key", compute=True)
    job = out / ".imgsink" / "jobs" / uuid.uuid4().hex / "write-000000-abc"
    job.mkdir(parents=True)
    (job / "run-000000.parquet.part").write_bytes(b"x")
    (out / "_temporary" / uuid.uuid4().hex / "attempt").mkdir(parents=True)  # staging of releases before 0.2
    (out / f"._SUCCESS.{uuid.uuid4().hex}.tmp").write_bytes(b"")
    assert not verify_dataset(str(out)).ok
    assert main(["clean", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "removed" in printed and "_temporary" in printed
    assert dataset_names(out) == ["README.md", "_SUCCESS", "_index.json"] + shard_names("shard-000000")
    assert verify_dataset(str(out)).ok
    assert main(["clean", str(out)]) == 0 and "nothing to clean" in capsys.readouterr().out


def test_clean_leaves_a_temporary_folder_that_is_not_ours(tmp_path, capsys):
    """Hadoop and Spark stage in ``_temporary/0/...`` too: only ours (``_temporary/<job id>/``) goes."""
    foreign = tmp_path / "spark-output"
    part = foreign / "_temporary" / "0" / "_temporary" / "attempt_1" / "part-00000.parquet"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"someone else's data")
    assert main(["clean", str(foreign)]) == 0
    assert "nothing to clean" in capsys.readouterr().out
    assert part.read_bytes() == b"someone else's data"
    assert sorted(p.name for p in foreign.iterdir()) == ["_temporary"]


def test_verify_and_clean_agree_on_which_temporary_folder_is_ours(tmp_path, capsys):
    """An empty ``_temporary`` (an older release's aborted job) is ours: verify says to clean it and
    clean does. Spark's ``_temporary/0`` is not: verify says so, and clean leaves it."""
    out = tmp_path / "out"
    frame_ddf(5, 0).imgsink.to_webdataset(str(out), key_column="key", compute=True)
    (out / "_temporary").mkdir()
    assert [str(p) for p in verify_dataset(str(out)).problems] == [
        "_temporary: a job's staging or lock is present: a job is writing this dataset, or died (remove it "
        "with dask-imgsink clean)"]
    assert main(["clean", str(out)]) == 0 and "_temporary" in capsys.readouterr().out
    assert verify_dataset(str(out)).ok
    (out / "_temporary" / "0").mkdir(parents=True)
    assert [p.message for p in verify_dataset(str(out)).problems] == [
        "is a stray folder, another tool's staging (Hadoop's and Spark's are named so): not ours to remove"]
    assert main(["clean", str(out)]) == 0 and (out / "_temporary" / "0").is_dir()


def test_the_next_job_removes_staging_no_lock_owns(tmp_path):
    out = tmp_path / "out"
    orphan = out / ".imgsink" / "jobs" / uuid.uuid4().hex / "assemble-000000-abc"
    orphan.mkdir(parents=True)
    (orphan / "shard-000000.tar.part").write_bytes(b"x" * 1000)
    frame_ddf(5, 0).imgsink.to_webdataset(str(out), key_column="key", compute=True)
    assert not (out / ".imgsink").exists()
