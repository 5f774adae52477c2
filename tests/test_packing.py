"""Exact packing: uneven partitions give exact, contiguous shards in row order; each image
is encoded once; the merge's memory does not grow with the number of partitions."""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import threading
import time
import tracemalloc
from functools import partial
from pathlib import Path

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import webdataset as wds
from distributed import Client, LocalCluster
from helpers import claimed_job, file_bytes, frame_ddf, gated_ddf, make_ddf, make_frame, read_dataset

import dask_imgsink.core.encode as encode_module
from dask_imgsink.core.tarshard import hex_digest
from dask_imgsink.job.packing import assemble_group, assemble_shards, runs_by_partition, summarize
from dask_imgsink.job.plan import plan_shards
from dask_imgsink.job.write import PartitionWriter
from dask_imgsink.read.verify import verify_dataset

UNEVEN = [0, 23, 0, 0, 3, 1, 0, 41, 7, 0, 0, 2]  # 77 rows; one partition spans 4+ shards


def test_uneven_partitions_give_exact_contiguous_shards_in_row_order(client, tmp_path):
    ddf = make_ddf("from_map", UNEVEN, tmp_path)
    out = tmp_path / "out"
    tasks = ddf.imgsink.to_webdataset(str(out), key_column="key", images_per_tar=10,
                                      text_column="caption", compute=True)
    data = read_dataset(out)
    names = [f"shard-{i:06d}.tar" for i in range(8)]
    assert data["shards"] == names
    assert sorted(p.name for p in out.glob("*.tar")) == names  # nothing else under a final name
    assert [t.task_id for t in tasks] == [n[:-4] for n in names]
    counts = [len([1 for _ in t.to_pylist()]) for t in data["tables"]]
    assert counts == [10] * 7 + [7]
    assert [e["nsamples"] for e in data["index"]["shardlist"]] == counts
    assert [e["filesize"] for e in data["index"]["shardlist"]] == [(out / n).stat().st_size for n in names]
    keys = [k for k, _ in data["samples"]]
    assert keys == [f"img{i:05d}" for i in range(77)]  # row order, each image exactly once
    assert data["index"]["totals"] == {"rows": 77, "images": 77, "skipped": 0, "shards": 8}
    # a shard that spans partitions says so
    spans = {t.task_id: t.metadata["partitions"] for t in tasks}
    assert spans["shard-000002"] == [1, 4, 5, 7]
    # a real loader reads the brace pattern
    loaded = list(wds.WebDataset(str(out / "shard-{000000..000007}.tar"), shardshuffle=False))
    assert [s["__key__"] for s in loaded] == keys


def test_filtered_data_is_repacked_into_full_shards(client, tmp_path):
    ddf = make_ddf("from_pandas", [30] * 6, tmp_path)
    ddf = ddf[ddf.score >= 8.0]  # keeps 2 rows in 10: 36 rows, 6 per partition
    out = tmp_path / "out"
    ddf.imgsink.to_webdataset(str(out), key_column="key", images_per_tar=16, compute=True)
    data = read_dataset(out)
    assert [e["nsamples"] for e in data["index"]["shardlist"]] == [16, 16, 4]
    per_part = tmp_path / "per_partition"
    ddf.imgsink.to_webdataset(str(per_part), key_column="key", images_per_tar=16,
                              packing="per_partition", compute=True)
    assert [e["nsamples"] for e in read_dataset(per_part)["index"]["shardlist"]] == [6] * 6


def test_each_image_is_encoded_exactly_once(tmp_path, monkeypatch):
    # Instrumentation, not a mock: the real encoder runs, wrapped to count its calls
    # (threads scheduler, so the count lives in this process).
    calls = []
    lock = threading.Lock()
    real = encode_module.ENCODERS["jpeg"]

    def counting(pixels, quality):
        with lock:
            calls.append(1)
        return real(pixels, quality)

    monkeypatch.setitem(encode_module.ENCODERS, "jpeg", counting)
    ddf = make_ddf("from_pandas", UNEVEN, tmp_path)
    ddf.imgsink.to_webdataset(str(tmp_path / "out"), key_column="key", images_per_tar=10, compute=True)
    assert len(calls) == 77


def test_exact_and_per_partition_hold_the_same_samples(tmp_path):
    ddf = make_ddf("from_map", [5, 9, 0, 4], tmp_path)
    for packing in ("exact", "per_partition"):
        ddf.imgsink.to_webdataset(str(tmp_path / packing), key_column="key", images_per_tar=4,
                                  packing=packing, compute=True)
    exact, per = read_dataset(tmp_path / "exact"), read_dataset(tmp_path / "per_partition")
    assert exact["samples"] == per["samples"]
    assert per["shards"][:3] == ["shard-000000-000000.tar", "shard-000000-000001.tar", "shard-000001-000000.tar"]


def _noise_partition(seed: int, rows: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "key": [f"n{seed:04d}_{i:05d}" for i in range(rows)],
        "image": pd.Series([rng.integers(0, 256, (96, 96, 3), dtype=np.uint8) for _ in range(rows)], dtype=object),
    })


def _merge_peak(tmp_path, partitions: int, total: int) -> tuple[int, int]:
    """Write ``total`` noise images in ``partitions`` runs, then measure the merge's peak."""
    per = total // partitions
    frames = [_noise_partition(p, per) for p in range(partitions)]
    with dask.config.set({"dataframe.convert-string": False}):
        ddf = dd.from_pandas(frames[0], npartitions=1)
    out = tmp_path / f"p{partitions}"
    opts, claim = claimed_job(ddf, out, key_column="key", images_per_tar=total // 2)
    writer = PartitionWriter(opts)
    results = [writer(frame, p, claim) for p, frame in enumerate(frames)]
    run_bytes = sum(r.shards[0].tar_bytes for r in results)
    plan = plan_shards(results, claim, opts)
    runs = runs_by_partition(results)
    tracemalloc.start()
    try:
        for p in range(partitions):
            assemble_shards(plan, range(p, p + 1), opts, runs)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak, run_bytes


def test_merge_peak_memory_does_not_grow_with_partitions(tmp_path):
    few, data_bytes = _merge_peak(tmp_path, 4, 2400)
    many, _ = _merge_peak(tmp_path, 240, 2400)
    assert data_bytes > 20e6  # the merge moves far more than it may hold
    # the runs are in memory already: assembly writes slices of them, holding one shard's metadata at most
    assert few < 4e6 and many < 4e6
    assert many <= few * 1.5


def test_each_group_hands_on_only_the_runs_of_its_open_shard(tmp_path):
    """A run's bytes reach its own assembly group and, while its rows are in a shard still open, the
    next: never more than one shard's rows plus one partition, however many partitions came before."""
    frames = [_noise_partition(p, 3) for p in range(40)]  # 120 images; shards of 10 span 4 partitions
    with dask.config.set({"dataframe.convert-string": False}):
        ddf = dd.from_pandas(frames[0], npartitions=1)
    opts, claim = claimed_job(ddf, tmp_path / "out", key_column="key", images_per_tar=10)
    results = [PartitionWriter(opts)(frame, p, claim) for p, frame in enumerate(frames)]
    assert all(run.run_blocks is None and run.run_index is None for r in map(summarize, results)
               for run in r.shards)
    carried, built = None, []
    for p in range(40):  # one group per partition: the longest chain
        shards, carried, summaries = assemble_group(carried, [results[p]], claim, range(p, p + 1), opts=opts,
                                                    last=p == 39)
        built += shards
        assert [r.partition for r in summaries] == [p]
        assert sum(run.num_images for run in carried.runs.values()) < 10 + 3
        assert all(p - 4 < q <= p for q in carried.runs)
        # the next plan starts from the open shard's writes, not from every write so far
        window = [r.partition for r in carried.window.summaries]
        assert window == sorted(carried.runs) and all(p - 4 < q <= p for q in window)
        assert all(run.run_blocks is None for r in carried.window.summaries for run in r.shards)  # summaries only
    assert carried.runs == {}
    assert [index for index, _, _ in built] == list(range(12))
    assert [shard.num_images for _, shard, _ in built] == [10] * 12
    assert built[1][2] == [3, 4, 5, 6]  # shard 1 holds rows 10-19: partitions 3 to 6


def test_dask_counts_write_results_and_carries_by_the_bytes_they_hold(client, tmp_path):
    """Dask sizes task results with dask.sizeof (sys.getsizeof for a dataclass: a 56-byte write
    result holding a whole run). Wrong sizes misplace assembly groups and hide runs from a worker's
    memory accounting, so what it spills under pressure; the sizes must be the bytes held."""
    from dask.sizeof import sizeof

    frames = [_noise_partition(p, 6) for p in range(4)]
    with dask.config.set({"dataframe.convert-string": False}):
        ddf = dd.from_pandas(frames[0], npartitions=1)
    opts, claim = claimed_job(ddf, tmp_path / "out", key_column="key", images_per_tar=10)
    results = [PartitionWriter(opts)(frame, p, claim) for p, frame in enumerate(frames)]
    run_bytes = [run.tar_bytes for r in results for run in r.shards]
    assert min(run_bytes) > 6 * 5_000  # each run holds its six JPEGs of noise (about 10 kB each)
    for result, held in zip(results, run_bytes):
        assert held <= sizeof(result) <= held * 1.1 + 20_000
        assert sizeof(summarize(result)) < 20_000  # the run's bytes dropped: what the commit gets
    _, carried, _ = assemble_group(None, results[:2], claim, range(0, 2), opts=opts, last=False)
    held = sum(run.tar_bytes for run in carried.runs.values())
    assert held > 0 and held <= sizeof(carried) <= held * 1.1 + 50_000  # the open shard's runs
    assert sizeof(carried.window.keys) >= 12 * 16  # every key kept so far: 16-byte hashes

    # and a worker holding a write result counts it in its managed memory (a real LocalCluster)
    before = sum(client.run(lambda dask_worker: dask_worker.state.nbytes).values())
    future = client.submit(PartitionWriter(opts), frames[3], 3, claim, pure=False)
    assert future.result().num_images == 6
    after = sum(client.run(lambda dask_worker: dask_worker.state.nbytes).values())
    assert after - before >= run_bytes[3]
    del future


@pytest.mark.parametrize("images", ["array", "png"])
def test_runs_spilled_to_disk_under_memory_pressure_make_the_same_dataset(tmp_path, images):
    """Runs are task results so that Dask can spill them under memory pressure: here every result
    larger than 200 kB goes to the worker's disk the moment it is stored (and pass-through runs
    hold the partition's own bytes, which are spilled too). The dataset is the same, byte for byte."""
    sizes = [150, 90, 160, 120]
    reference = tmp_path / "reference"
    with dask.config.set(scheduler="threads"):
        make_ddf("from_map", sizes, tmp_path, images).imgsink.to_webdataset(
            str(reference), key_column="key", text_column="caption", images_per_tar=100, compute=True)
    spill_at_once = {"distributed.worker.memory.target": 0.0002, "distributed.worker.memory.spill": False,
                     "distributed.worker.memory.pause": False, "distributed.worker.memory.terminate": False}
    out = tmp_path / "out"
    with dask.config.set(spill_at_once), LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, memory_limit="1GB", dashboard_address=None,
            silence_logs=logging.CRITICAL) as cluster, Client(cluster) as client:
        make_ddf("from_map", sizes, tmp_path, images).imgsink.to_webdataset(
            str(out), key_column="key", text_column="caption", images_per_tar=100, compute=True)
        written = client.run(lambda dask_worker: dask_worker.data.cumulative_metrics[("disk-write", "bytes")])
    starts = np.cumsum([0, *sizes[:-1]])
    partition_bytes = [len(pickle.dumps(make_frame(n, start, images), protocol=5)) for n, start in zip(sizes, starts)]
    run_bytes = sum(p.stat().st_size for p in reference.glob("*.tar"))
    # Partitions and runs went through the disk. In some runs one of the eight results (four
    # partitions, four runs) was not spilled, so the floor is below their sum: the runs' bytes
    # and the smallest partition's.
    assert sum(written.values()) >= run_bytes + min(partition_bytes)
    assert file_bytes(out) == file_bytes(reference)
    assert verify_dataset(str(out)).ok


def test_past_the_carry_budget_a_group_writes_the_open_shard_ahead_and_carries_no_runs(tmp_path):
    """With large shards a group would carry up to a whole shard's runs. Past the carry budget
    (0 here) it writes them into the shard's staged tar and hands on only where they are; the
    shard's last group writes the rest after them. Same bytes as with every run carried."""
    frames = [_noise_partition(p, 3) for p in range(12)]  # 36 images; shards of 25 span up to 9 partitions
    with dask.config.set({"dataframe.convert-string": False}):
        ddf = dd.from_pandas(frames[0], npartitions=1)
    built = {}
    for budget in (None, 0):
        opts, claim = claimed_job(ddf, tmp_path / f"out-{budget}", key_column="key", images_per_tar=25)
        results = [PartitionWriter(opts)(frame, p, claim) for p, frame in enumerate(frames)]
        carried, shards = None, []
        for p in range(12):
            done, carried, _ = assemble_group(carried, [results[p]], claim, range(p, p + 1), opts=opts,
                                              last=p == 11, carry_bytes=budget)
            shards += done
            if budget == 0 and p < 11:
                assert carried.runs == {}  # nothing but the head's place
                assert carried.head.rows == (3 * (p + 1)) % 25 and carried.head.shard == (3 * (p + 1)) // 25
                assert carried.head.size == os.path.getsize(carried.head.path)
        assert carried.runs == {} and carried.head is None
        built[budget] = [(i, Path(s.target.tar_path).read_bytes(), hex_digest(s.tar_sha256), s.num_images, sources,
                          Path(s.target.parquet_path).read_bytes(), Path(s.target.idx_path).read_bytes())
                         for i, s, sources in shards]
    assert [b[3] for b in built[0]] == [25, 11]
    assert built[0] == built[None]
    assert built[0][0][4] == list(range(9))  # shard 0 holds rows 0-24: partitions 0 to 8, 24 rows ahead
    assert hashlib.sha256(built[0][0][1]).hexdigest() == built[0][0][2]


@pytest.mark.parametrize("options", [{"images_per_tar": 7}, {"images_per_tar": 40, "max_shard_bytes": 60_000},
                                     {"images_per_tar": 9, "unique_keys": "dataset"}])
def test_writing_ahead_gives_the_same_dataset_whatever_cuts_the_shards(tmp_path, options):
    """Shards cut by count, by bytes, and around duplicate keys (left out): written ahead at every
    group (budget 0) or carried whole, the files are the same, byte for byte."""
    sizes = [5, 0, 13, 2, 9, 1, 11, 4]
    datasets = []
    for budget in (None, 0):
        out = tmp_path / f"out-{budget}"
        ddf = make_ddf("from_map", sizes, tmp_path)
        if options.get("unique_keys"):
            keys = ddf["key"].map(lambda key: f"k{int(key[3:]) % 20:02d}", meta=("key", object))
            ddf = ddf.assign(key=keys)  # 20 keys over 45 rows: the later copies are left out
        with dask.config.set({"imgsink.carry-bytes": budget, "scheduler": "threads"}):
            ddf.imgsink.to_webdataset(str(out), key_column="key", compute=True,
                                      **{"on_error": "skip", **options})
        assert verify_dataset(str(out)).ok
        datasets.append(file_bytes(out))
    assert datasets[0] == datasets[1] and len(datasets[0]) > 3


def _group_carry_budgets(bag) -> set:
    """The carry budget each assembly group of a job's graph was given."""
    return {task[0].keywords["carry_bytes"] for key, task in dict(bag.__dask_graph__()).items()
            if isinstance(key, tuple) and key[0].startswith("imgsink-pack-shards-")}


def test_the_carry_budget_defaults_to_zero_on_a_cluster_of_several_workers(tmp_path, client):
    """Carried runs pull the next group to the worker holding them and the workers drift apart
    (README, *Memory*): on several workers a group writes its open shard ahead by default; on
    one process it carries up to 64 MiB (the next test); a budget set in the config wins."""
    ddf = make_ddf("from_pandas", [3] * 20, tmp_path)
    write = partial(ddf.imgsink.to_webdataset, str(tmp_path / "out"), key_column="key")
    assert len(client.nthreads()) == 2 and _group_carry_budgets(write()) == {0}
    with dask.config.set({"imgsink.carry-bytes": "1 MiB"}):
        assert _group_carry_budgets(write()) == {2**20}
    with dask.config.set({"imgsink.carry-bytes": None}):
        assert _group_carry_budgets(write()) == {None}


def test_a_local_scheduler_named_beside_a_client_gets_the_one_process_settings(tmp_path, client):
    """``dask.config.set(scheduler="threads")`` (or ``compute_kwargs={"scheduler": "sync"}``) runs the
    job in this process even while a Client is active: its groups and carry budget are this
    process's, not the cluster's. Naming the Client, or "distributed", keeps the cluster's."""
    ddf = make_ddf("from_pandas", [3] * 20, tmp_path)
    write = partial(ddf.imgsink.to_webdataset, str(tmp_path / "out"), key_column="key")
    assert len(client.nthreads()) == 2
    for named in ("threads", "sync", "processes"):
        with dask.config.set(scheduler=named):
            assert _group_carry_budgets(write()) == {64 * 2**20}, named
    for named in ("distributed", client):
        with dask.config.set(scheduler=named):
            assert _group_carry_budgets(write()) == {0}
    from dask_imgsink.job import accessor

    assert accessor._client_nthreads("sync") is None
    assert accessor._client_nthreads(client) == client.nthreads()
    tasks = write(compute=True, compute_kwargs={"scheduler": "sync"})
    assert sum(t.metadata["num_images"] for t in tasks) == 60


def test_on_one_worker_or_without_a_client_the_carry_budget_is_64_mib(tmp_path):
    """One process: nothing moves between workers. A cluster with no worker yet (adaptive) will
    have several."""
    ddf = make_ddf("from_pandas", [3] * 20, tmp_path)
    write = partial(ddf.imgsink.to_webdataset, str(tmp_path / "out"), key_column="key")
    assert _group_carry_budgets(write()) == {64 * 2**20}
    for workers, budget in [(1, 64 * 2**20), (0, 0)]:
        with LocalCluster(n_workers=workers, threads_per_worker=2, processes=False, dashboard_address=None,
                          silence_logs=logging.ERROR) as cluster, Client(cluster):
            assert _group_carry_budgets(write()) == {budget}


def test_groups_of_a_job_of_few_large_partitions_hold_four_and_of_many_small_ones_eight():
    """A group's runs meet on the worker that assembles it: four partitions' runs lowered the
    largest worker's peak on twice the memory row's job (48 partitions, README *Memory*); past
    64 partitions, groups of eight keep the group tasks few (500 partitions of 10 images)."""
    from dask_imgsink.job.accessor import _assembly_groups, group_cap

    assert [group_cap(n) for n in (1, 48, 64, 65, 500)] == [4, 4, 4, 8, 8]
    assert [len(g) for g in _assembly_groups(48, 2)] == [4] * 11 + [2, 1, 1]
    assert max(len(g) for g in _assembly_groups(500, 2)) == 8


@pytest.mark.parametrize("n", [0, 1, 3, 4, 17, 24, 200, 5000])
@pytest.mark.parametrize("threads", [1, 2, 64])
def test_assembly_groups_cover_every_partition_once_in_order(n, threads):
    from dask_imgsink.job.accessor import _assembly_groups, group_cap

    groups = _assembly_groups(n, threads)
    assert [p for g in groups for p in g] == list(range(n))
    assert all(0 < len(g) <= group_cap(n) for g in groups)  # few runs wait for their group
    if n:
        assert len(groups[-1]) == 1  # the tail after the last partition is its own shards only
        assert len(groups) <= max(2 * threads, -(-n // group_cap(n))) + 3 + int(np.log2(n))


def test_shards_of_early_partitions_are_assembled_while_later_ones_still_encode(tmp_path):
    """No barrier: the first group's assembly needs only its own partitions' write tasks.

    Partitions after the first two wait for a gate (a file); the first shards must
    be assembled while they wait. Its own cluster, with a thread for each waiting partition and two more.
    """
    gate = tmp_path / "gate"
    out = tmp_path / "out"
    ddf = gated_ddf([4] * 8, gate, open_partitions=2)
    with LocalCluster(n_workers=1, threads_per_worker=8, processes=True, dashboard_address=None,
                      scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
                      silence_logs=logging.CRITICAL) as cluster, Client(cluster) as client:
        future = client.compute(ddf.imgsink.to_webdataset(str(out), key_column="key", images_per_tar=4))
        try:
            deadline = time.monotonic() + 60
            while not list((out / ".imgsink").glob("jobs/*/assemble-*/shard-000000.tar.part")):
                assert time.monotonic() < deadline, "the first shard was not assembled before the gate opened"
                time.sleep(0.05)
            assert not future.done()  # the later partitions still wait for the gate
        finally:
            gate.write_text("open")
        tasks = future.result(timeout=120)
    assert [t.metadata["num_images"] for t in tasks] == [4] * 8
    assert [k for k, _ in read_dataset(out)["samples"]] == [f"img{i:05d}" for i in range(32)]


@pytest.mark.parametrize("sizes, cap", [([3, 0, 6, 0, 0, 0, 0, 0], None), ([3, 0, 6, 0, 0, 0, 0, 0], 30_000),
                                        ([0, 0, 0, 0, 0, 0, 0, 5], None), ([1, 1, 1, 1, 1, 1, 1, 1], None),
                                        ([3, 0, 6, 0, 0, 0, 0, 0], 1_000), ([2, 3, 2, 0, 3, 2, 1, 3], 1_000),
                                        ([2, 3, 2, 0, 3, 2, 1, 3], 30_000), ([2, 3, 2, 0, 3, 2, 1, 3], 12_000),
                                        ([4, 0, 0, 0, 0, 0, 0, 0], None), ([0, 4, 4, 0, 0, 0, 0, 0], None)])
def test_every_shard_is_assembled_once_whichever_group_holds_its_end(tmp_path, client, sizes, cap):
    """The job's last shard may end in a group whose later partitions are empty: the last group builds it.
    A shard closed by bytes before it is full by count may end a group: a later group builds it (1,000 bytes:
    every sample is larger than the cap and has a shard of its own)."""
    out = tmp_path / "out"
    client.compute(make_ddf("from_map", sizes, tmp_path).imgsink.to_webdataset(
        str(out), key_column="key", images_per_tar=4, max_shard_bytes=cap)).result(timeout=120)
    data = read_dataset(out)
    assert [k for k, _ in data["samples"]] == [f"img{i:05d}" for i in range(sum(sizes))]
    counts = [e["nsamples"] for e in data["index"]["shardlist"]]
    assert sum(counts) == sum(sizes)
    if cap is None:
        assert all(c == 4 for c in counts[:-1])
    else:  # every shard but the last is as full as both limits allow
        assert all(e["filesize"] <= cap or e["nsamples"] == 1 for e in data["index"]["shardlist"])
    assert verify_dataset(str(out)).ok


@pytest.mark.parametrize("packing", ["exact", "per_partition"])
def test_task_names_say_what_the_tasks_do_in_the_dashboard(tmp_path, packing):
    # The dashboard and progress bars group tasks by dask.utils.key_split, which drops
    # 8-letter words made of a-f ("assemble") as if they were hex tokens.
    from dask.utils import key_split

    bag = frame_ddf(20, 0, npartitions=4).imgsink.to_webdataset(str(tmp_path / "out"), images_per_tar=8, key_column="key",
                                                               packing=packing)
    groups = {key_split(k) for k in bag.__dask_graph__()}
    expected = {"imgsink-claim", "imgsink-encode-write", "imgsink-commit", "imgsink-tasks"}
    if packing == "exact":
        expected.add("imgsink-pack-shards")
    assert expected <= groups
    assert "imgsink" not in groups


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_every_shard_is_built_by_exactly_one_group_for_any_sizes_and_limits(data):
    """The groups' prefix plans together build each shard of the job's plan once (no I/O: plans only)."""
    from types import SimpleNamespace

    from dask_imgsink.job.plan import ShardPlan, cut_shards, shards_to_build

    counts = data.draw(st.lists(st.integers(0, 5), min_size=1, max_size=10), label="images per partition")
    sizes = data.draw(st.lists(st.integers(1, 9), min_size=sum(counts), max_size=sum(counts)), label="sample sizes")
    per_tar = data.draw(st.integers(1, 6), label="images_per_tar")
    cap = data.draw(st.none() | st.integers(0, 4), label="max bytes, in tar records")
    cuts = sorted(data.draw(st.sets(st.integers(1, len(counts) - 1) if len(counts) > 1 else st.nothing())))
    groups = [range(a, b) for a, b in zip([0] + cuts, cuts + [len(counts)])]

    def plan(partitions: int) -> ShardPlan:
        runs = [(p, SimpleNamespace(num_images=n)) for p, n in enumerate(counts[:partitions]) if n]
        starts = list(np.cumsum([0] + [r.num_images for _, r in runs])[:-1])
        rows = sum(counts[:partitions])
        shard_starts = None if cap is None else cut_shards(np.array(sizes[:rows]) * 1024, per_tar,
                                                               cap * 10240 + 5120)
        return ShardPlan(runs, per_tar, 0, rows, run_starts=starts, shard_starts=shard_starts)

    built = []
    for i, group in enumerate(groups):
        last = i == len(groups) - 1
        built += shards_to_build(plan(group.stop), group, prefix=not last, last=last)
    assert sorted(built) == list(range(plan(len(counts)).num_shards))


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_each_groups_window_plan_builds_the_job_plans_shards_for_any_keys_sizes_and_limits(data):
    """A group plans only from the shard the group before left open (and the keys kept so far), not
    from every partition before it. Over all groups, each shard of the job's plan is built once,
    from the same rows, around the same duplicate keys left out: both policies, cut by count or
    bytes, appending to a dataset that holds some of the keys (no I/O: plans only)."""
    from types import SimpleNamespace

    import pyarrow as pa

    from dask_imgsink.job.plan import ShardPlan, plan_shards, shards_to_build
    from dask_imgsink.job.results import PartitionResult
    from dask_imgsink.job.unique import key_hashes
    from dask_imgsink.job.window import first_window, next_window, plan_group

    counts = data.draw(st.lists(st.integers(0, 5), min_size=1, max_size=12), label="images per partition")
    rows = sum(counts)
    keys = data.draw(st.lists(st.integers(0, 12), min_size=rows, max_size=rows), label="keys")
    sizes = data.draw(st.lists(st.integers(1, 9), min_size=rows, max_size=rows), label="sample sizes, in KiB")
    policy = data.draw(st.sampled_from(["dataset", "shard", None]), label="unique_keys (None: no key column)")
    existing = data.draw(st.sets(st.integers(0, 12), max_size=4), label="keys already in the dataset")
    per_tar = data.draw(st.integers(1, 6), label="images_per_tar")
    cap = data.draw(st.none() | st.integers(0, 4), label="max bytes, in tar records")
    cuts = sorted(data.draw(st.sets(st.integers(1, len(counts) - 1) if len(counts) > 1 else st.nothing())))
    groups = [range(a, b) for a, b in zip([0] + cuts, cuts + [len(counts)])]
    opts = SimpleNamespace(key_column=policy and "key", unique_keys=policy or "dataset", images_per_tar=per_tar,
                           max_shard_bytes=None if cap is None else cap * 10240 + 5120, on_error="skip",
                           mode="append", url="memory://unused", storage_options=None)
    claim = SimpleNamespace(first_shard=3, done=False)
    existing_hashes = key_hashes([f"k{k}" for k in sorted(existing)]) if policy == "dataset" else None

    results, start = [], 0
    for p, n in enumerate(counts):
        names = [f"k{k}" for k in keys[start:start + n]]
        run = SimpleNamespace(num_images=n, sample_sizes=[s * 1024 for s in sizes[start:start + n]],
                              run_keys=pa.array(names))
        results.append(PartitionResult(p, n, [run] if n else [], [], key_hashes(names) if policy else None,
                                       np.arange(n) if policy else None))
        start += n

    def where(plan: ShardPlan, shard: int) -> list[tuple[int, int, int]]:
        return [(plan.runs[piece.run][0], piece.start, piece.stop) for piece in plan.pieces(shard)]

    full = plan_shards(results, claim, opts, existing_hashes)
    expected = {full.first_shard + s: where(full, s) for s in range(full.num_shards)}
    built, window = [], first_window(claim)
    for i, group in enumerate(groups):
        last = i == len(groups) - 1
        own = results[group.start:group.stop]
        plan, log = plan_group(window, own, claim, opts, existing_hashes if i == 0 else None)
        assert plan.failed is None
        built += [(plan.first_shard + s, where(plan, s))
                  for s in shards_to_build(plan, group, prefix=not last, last=last)]
        window = next_window(plan, window, own, log)
        # what the next group plans from: the writes holding the open shard's kept rows (and any
        # wholly left out between them), never the prefix
        holding = [r for r in window.summaries if len(window.dropped.get(r.partition, ())) < r.num_images]
        assert len(holding) <= per_tar and (not window.summaries or window.summaries[0] in holding)
    assert sorted(index for index, _ in built) == sorted(expected)
    assert dict(built) == expected


@pytest.mark.parametrize("packing, key_column, mode, waits", [
    ("exact", "key", "error", False), ("exact", None, "overwrite", False), ("exact", "key", "append", False),
    ("exact", None, "append", True),  # generated keys are numbered after the dataset's partitions
    ("per_partition", "key", "error", True),  # it stages files: only the directory's holder may
])
def test_write_tasks_wait_for_the_claim_only_when_they_need_it(tmp_path, packing, key_column, mode, waits):
    from dask.core import get_dependencies

    ddf = frame_ddf(20, 0, npartitions=4)
    ddf = ddf if key_column else ddf.drop(columns="key")
    bag = ddf.imgsink.to_webdataset(str(tmp_path / "out"), images_per_tar=8, key_column=key_column,
                                    packing=packing, mode=mode)
    graph = dict(bag.__dask_graph__())
    claim = next(k for k in graph if str(k).startswith("imgsink-claim"))
    writes = [k for k in graph if isinstance(k, tuple) and k[0].startswith("imgsink-encode-write")]
    assert len(writes) == 4
    assert all((claim in get_dependencies(graph, k)) == waits for k in writes)
    if not waits:  # the claim still comes before anything is staged: every assembly group waits for it
        groups = [k for k in graph if isinstance(k, tuple) and k[0].startswith("imgsink-pack-shards")]
        assert groups and all(claim in get_dependencies(graph, k) for k in groups)


def test_write_tasks_run_where_their_small_partitions_are(client, tmp_path):
    """Many small partitions on 2 workers: each write task runs on the worker holding its partition.
    When write tasks waited for the claim, both workers held it after the first fetch, so both were
    candidates for every task and Dask sent a small partition to the less busy one (383 of 1,000
    moved, each fetch waiting on a worker whose thread held the GIL)."""
    frame = frame_ddf(1000, 0, npartitions=200)
    with dask.config.set({"dataframe.convert-string": False}):
        persisted = client.persist(frame)
    wait_for = persisted.imgsink.to_webdataset(str(tmp_path / "out"), images_per_tar=100, key_column="key")

    def fetched(dask_worker) -> list:
        return [key for entry in dask_worker.transfer_incoming_log for key in entry["keys"]]

    before = {w: len(keys) for w, keys in client.run(fetched).items()}
    wait_for.compute()
    moved = [key for w, keys in client.run(fetched).items() for key in keys[before[w]:]]
    inputs = [key for key in moved if not str(key[0] if isinstance(key, tuple) else key).startswith("imgsink-")]
    assert len(inputs) <= 20, inputs[:10]  # Dask may still steal some tasks (81 of 200 moved before)
    assert verify_dataset(str(tmp_path / "out")).ok
