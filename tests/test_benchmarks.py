"""The benchmark runs end to end (``--quick``): a smoke test that never looks at the timings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def test_the_benchmark_runs_quick(tmp_path):
    pytest.importorskip("skimage")
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "run.py"), "--quick"], capture_output=True, text=True,
                          timeout=600, cwd=BENCHMARKS, env={**os.environ, "IMGSINK_BENCH_DIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout
    assert "cores" in table and "encode only" in table and "per_partition" in table and "raw sequential" in table
    assert table.count("Dask alone") == 3  # threads, 2 x 1, 1 x 2: what Dask costs before the writer
    assert "the nanny's default (64 KiB), jobs alternated" in table  # the allocator rows, paired
    assert "bytes uploaded" in table and "requests per shard" in table and "peak bytes" in table
    assert list(tmp_path.iterdir()) == []  # it cleaned up after itself


def test_the_overhead_benchmark_runs(tmp_path):
    pytest.importorskip("skimage")
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "bench_overhead.py"), "--images", "20", "--repeats", "1"],
                          capture_output=True, text=True, timeout=300, cwd=BENCHMARKS,
                          env={**os.environ, "IMGSINK_BENCH_DIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "encoding alone" in proc.stdout and "the writer's own work" in proc.stdout
    assert list(tmp_path.iterdir()) == []  # it cleaned up after itself


def test_the_partitions_benchmark_runs(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "bench_partitions.py"), "--partitions", "4", "8",
                           "--per", "3", "--repeats", "1", "--cluster"],
                          capture_output=True, text=True, timeout=300, cwd=BENCHMARKS,
                          env={**os.environ, "IMGSINK_BENCH_DIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "threaded scheduler" in proc.stdout and "LocalCluster" in proc.stdout and "ms/partition" in proc.stdout
    assert list(tmp_path.iterdir()) == []  # it cleaned up after itself


def test_the_timeline_benchmark_runs(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "bench_timeline.py"), "--images", "40", "--partitions", "4",
                           "--repeats", "1", "--timeline"],
                          capture_output=True, text=True, timeout=300, cwd=BENCHMARKS,
                          env={**os.environ, "IMGSINK_BENCH_DIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for line in ("the limit", "task time, imgsink-encode-write", "task time, imgsink-pack-shards",
                 "moving results between workers", "tail: last encoding task", "3P@"):
        assert line in proc.stdout, proc.stdout
    assert list(tmp_path.iterdir()) == []  # it cleaned up after itself


def test_the_passthrough_benchmark_runs(tmp_path):
    pytest.importorskip("skimage")
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "bench_passthrough.py"), "--images", "40",
                           "--partitions", "4", "--repeats", "2"],
                          capture_output=True, text=True, timeout=300, cwd=BENCHMARKS,
                          env={**os.environ, "IMGSINK_BENCH_DIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "raw wall" in proc.stdout and "job sys" in proc.stdout and proc.stdout.count("\n") == 5, proc.stdout
    assert proc.stdout.splitlines()[-1].startswith("medians")
    assert list(tmp_path.iterdir()) == []  # it cleaned up after itself


def test_the_carry_benchmark_runs(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "bench_carry.py"), "--images", "40", "--partitions", "4",
                           "--repeats", "2", "--settings", "threads", "2x1"],
                          capture_output=True, text=True, timeout=300, cwd=BENCHMARKS,
                          env={**os.environ, "IMGSINK_BENCH_DIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = proc.stdout.splitlines()[1:]
    assert len(rows) == 4 and all("ratio to the limit median" in row for row in rows), proc.stdout
    assert sum("RSS rise" in row for row in rows) == 2  # memory on the cluster only: one process on threads
    assert list(tmp_path.iterdir()) == []  # it cleaned up after itself


def test_the_trust_benchmark_runs():
    """It switches the checksums off by patching where they are taken: a move of that code broke it once."""
    pytest.importorskip("skimage")
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "bench_trust.py"), "--images", "20", "--repeats", "1"],
                          capture_output=True, text=True, timeout=300, cwd=BENCHMARKS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for line in ("checksums while writing", "accessor, exact packing", "verify --decode", "baseline: sha256"):
        assert line in proc.stdout, proc.stdout
