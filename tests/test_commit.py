"""The job commit: atomic publication, output modes, skipped-row accounting, empty input."""

from __future__ import annotations

import hashlib
import json

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from helpers import (
    claimed_job,
    comparable_dataset,
    dataset_names,
    make_ddf,
    make_frame,
    read_dataset,
    shard_names,
    staged_job,
)

from dask_imgsink import BadRowError, verify_dataset


def _final_looking(out) -> list[str]:
    return dataset_names(out)


def _with_bad_row(n_parts: int = 4, bad_partition: int = 3, per: int = 6) -> dd.DataFrame:
    pdf = make_frame(n_parts * per)
    pdf.at[bad_partition * per + 2, "image"] = np.zeros((8, 8, 4), np.uint8)  # RGBA into JPEG
    with dask.config.set({"dataframe.convert-string": False}):
        return dd.from_pandas(pdf, npartitions=n_parts, sort=False)


@pytest.mark.parametrize("packing", ["exact", "per_partition"])
def test_failed_job_leaves_nothing_that_looks_like_a_dataset(client, tmp_path, packing):
    out = tmp_path / "out"
    bag = _with_bad_row().imgsink.to_webdataset(str(out), key_column="key", images_per_tar=4, packing=packing)
    with pytest.raises(BadRowError) as info:
        bag.compute()
    assert info.value.partition == 3 and info.value.key == "img00020" and "alpha" in str(info.value)
    assert _final_looking(out) == []  # no _SUCCESS, no _index.json, no shard under a final name


def test_compute_true_failure_leaves_nothing_final_looking(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(BadRowError):
        _with_bad_row(n_parts=1, bad_partition=0).imgsink.to_webdataset(str(out), key_column="key", compute=True)
    assert _final_looking(out) == [] and not (out / ".imgsink").exists()


def test_success_publishes_everything_and_removes_staging(tmp_path):
    out = tmp_path / "out"
    make_ddf("from_pandas", [5, 5], tmp_path).imgsink.to_webdataset(
        str(out), key_column="key", images_per_tar=4, compute=True)
    assert _final_looking(out) == ["README.md", "_SUCCESS", "_index.json"] + shard_names(
        "shard-000000", "shard-000001", "shard-000002")
    assert not (out / ".imgsink").exists()
    index = json.loads((out / "_index.json").read_text())
    assert index["__kind__"] == "wids-shard-index-v1" and index["wids_version"] == 1
    tar, parquet = (out / "shard-000000.tar").read_bytes(), (out / "metadata/shard-000000.parquet").read_bytes()
    idx = (out / "shard-000000.idx").read_bytes()
    assert index["layout"] == 2
    assert index["shardlist"][0] == {
        "url": "shard-000000.tar", "nsamples": 4, "filesize": len(tar), "sha256": hashlib.sha256(tar).hexdigest(),
        "parquet": "metadata/shard-000000.parquet",
        "parquet_filesize": len(parquet), "parquet_sha256": hashlib.sha256(parquet).hexdigest(),
        "formats": {"jpeg": 4},
        "idx": "shard-000000.idx", "idx_filesize": len(idx), "idx_sha256": hashlib.sha256(idx).hexdigest()}
    success = json.loads((out / "_SUCCESS").read_text())
    assert success["index_sha256"] == hashlib.sha256((out / "_index.json").read_bytes()).hexdigest()
    card = (out / "README.md").read_text()
    assert card.startswith("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: '*.tar'\n")


def test_mode_error_refuses_a_non_empty_directory(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="mode='overwrite'"):
        make_ddf("from_pandas", [3], tmp_path).imgsink.to_webdataset(str(out), key_column="key")
    assert _final_looking(out) == ["notes.txt"]


def test_mode_overwrite_replaces_the_old_dataset_without_mixing(tmp_path):
    out = tmp_path / "out"
    make_ddf("from_pandas", [25], tmp_path).imgsink.to_webdataset(
        str(out), key_column="key", images_per_tar=10, compute=True)
    bag = make_ddf("from_pandas", [8], tmp_path).imgsink.to_webdataset(
        str(out), key_column="key", images_per_tar=10, mode="overwrite")
    assert (out / "shard-000002.tar").exists()  # nothing removed before the job commits
    bag.compute()
    data = read_dataset(out)
    assert data["shards"] == ["shard-000000.tar"] and len(data["samples"]) == 8
    assert _final_looking(out) == ["README.md", "_SUCCESS", "_index.json"] + shard_names("shard-000000")


def test_mode_overwrite_keeps_the_old_dataset_when_the_new_job_fails(tmp_path):
    out = tmp_path / "out"
    make_ddf("from_pandas", [12], tmp_path).imgsink.to_webdataset(str(out), key_column="key", compute=True)
    before = {name: (out / name).read_bytes() for name in _final_looking(out)}
    with pytest.raises(BadRowError):
        _with_bad_row().imgsink.to_webdataset(str(out), key_column="key", mode="overwrite", compute=True)
    assert {name: (out / name).read_bytes() for name in _final_looking(out)} == before


def test_mode_append_continues_numbering_and_extends_the_index(client, tmp_path):
    out = tmp_path / "out"
    first = make_ddf("from_pandas", [25], tmp_path).drop(columns="key")
    first.imgsink.to_webdataset(str(out), images_per_tar=10, compute=True)
    second = make_ddf("from_map", [7, 5], tmp_path).drop(columns="key")
    tasks = second.imgsink.to_webdataset(str(out), images_per_tar=10, mode="append", compute=True)
    assert [t.task_id for t in tasks] == ["shard-000003", "shard-000004"]
    data = read_dataset(out)
    assert data["shards"] == [f"shard-{i:06d}.tar" for i in range(5)]
    assert data["index"]["totals"] == {"rows": 37, "images": 37, "skipped": 0, "shards": 5}
    assert len(data["index"]["jobs"]) == 2 and data["index"]["num_samples"] == 37
    keys = [k for k, _ in data["samples"]]
    assert len(set(keys)) == 37  # generated keys stay unique across jobs
    loaded = list(wds.WebDataset(str(out / "shard-{000000..000004}.tar"), shardshuffle=False))
    assert len(loaded) == 37 and (out / "_SUCCESS").exists()


def test_mode_append_per_partition_names_do_not_collide(tmp_path):
    out = tmp_path / "out"
    for _ in range(2):
        make_ddf("from_pandas", [3, 3], tmp_path).drop(columns="key").imgsink.to_webdataset(
            str(out), packing="per_partition", mode="append", compute=True)
    data = read_dataset(out)
    assert data["shards"] == [f"shard-{p:06d}-000000.tar" for p in range(4)]
    assert len({k for k, _ in data["samples"]}) == 12


def test_mode_append_refuses_a_directory_that_is_not_a_dataset(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "x.tar").write_bytes(b"")
    with pytest.raises(ValueError, match="_index.json"):
        make_ddf("from_pandas", [3], tmp_path).imgsink.to_webdataset(str(out), key_column="key", mode="append")


def test_skip_records_bad_rows_and_the_counts_add_up(client, tmp_path):
    pdf = make_frame(20)
    pdf.at[2, "image"] = None
    pdf.at[9, "image"] = np.zeros((8, 8, 4), np.uint8)
    pdf.at[15, "key"] = "bad/key"
    out = tmp_path / "out"
    with dask.config.set({"dataframe.convert-string": False}):
        ddf = dd.from_pandas(pdf, npartitions=4, sort=False)
    tasks = ddf.imgsink.to_webdataset(str(out), key_column="key", images_per_tar=5,
                                      on_error="skip", compute=True)
    data = read_dataset(out)
    errors = pd.read_json(out / "_errors.jsonl", lines=True)
    assert errors[["partition", "row", "key", "column"]].values.tolist() == [
        [0, 2, "img00002", "image"], [1, 4, "img00009", "image"], [3, 0, "bad/key", "key"]]
    assert "missing" in errors.reason[0] and "alpha" in errors.reason[1] and "'/'" in errors.reason[2]
    assert data["index"]["totals"] == {"rows": 20, "images": 17, "skipped": 3, "shards": 4}
    assert len(data["samples"]) == 17
    assert [e["nsamples"] for e in data["index"]["shardlist"]] == [5, 5, 5, 2]
    for t in tasks:
        assert (t.metadata["job_rows_in"], t.metadata["job_images_written"], t.metadata["job_rows_skipped"]) == (20, 17, 3)


def test_duplicate_keys_across_partitions_in_one_shard_are_an_error(tmp_path):
    pdf = make_frame(6)
    pdf.at[4, "key"] = "img00001"
    with dask.config.set({"dataframe.convert-string": False}):
        ddf = dd.from_pandas(pdf, npartitions=2, sort=False)
    with pytest.raises(BadRowError, match=r"partition 1, row 1, key 'img00001', column 'key'.*used twice "
                                          r"\(first at partition 0, row 1\)"):
        ddf.imgsink.to_webdataset(str(tmp_path / "out"), key_column="key", compute=True)
    assert _final_looking(tmp_path / "out") == []


@pytest.mark.parametrize("packing", ["exact", "per_partition"])
def test_empty_dataframe_gives_a_valid_empty_dataset(client, tmp_path, packing):
    ddf = make_ddf("from_pandas", [4, 4], tmp_path)
    ddf = ddf[ddf.score > 100]
    out = tmp_path / "out"
    tasks = ddf.imgsink.to_webdataset(str(out), key_column="key", packing=packing, compute=True)
    assert tasks == []
    # the stand-in Parquet of no row: the Parquet readers' natural calls give the columns, not an error
    assert _final_looking(out) == ["README.md", "_SUCCESS", "_index.json", "metadata/empty.parquet"]
    index = json.loads((out / "_index.json").read_text())
    assert index["shardlist"] == [] and index["totals"] == {"rows": 0, "images": 0, "skipped": 0, "shards": 0}
    frame = dd.read_parquet(str(out)).compute()
    assert len(frame) == 0 and list(frame.columns) == pq.read_schema(out / "metadata" / "empty.parquet").names
    assert "caption" in frame.columns and verify_dataset(str(out)).ok


def test_empty_partitions_write_no_files(tmp_path):
    out = tmp_path / "out"
    make_ddf("from_map", [0, 3, 0, 0, 2], tmp_path).imgsink.to_webdataset(
        str(out), key_column="key", packing="per_partition", compute=True)
    assert read_dataset(out)["shards"] == ["shard-000001-000000.tar", "shard-000004-000000.tar"]


def _staged_job(tmp_path, out, sizes, mode):
    """Run a job's claim, write, plan and assemble steps in this process; return the commit to call."""
    ddf = make_ddf("from_map", sizes, tmp_path)
    # appends the same keys as the dataset there: only unique per shard
    return staged_job(ddf, out, key_column="key", images_per_tar=4, text_column="caption", mode=mode,
                      unique_keys="shard")


@pytest.mark.parametrize("mode", ["error", "overwrite", "append"])
def test_a_commit_that_runs_again_gives_the_same_dataset(tmp_path, mode):
    reference, out = tmp_path / "reference" / "out", tmp_path / "disturbed" / "out"  # same name, same card
    for target in (reference, out):
        if mode != "error":  # something already there to overwrite or append to
            make_ddf("from_pandas", [9], tmp_path).imgsink.to_webdataset(
                str(target), key_column="key", images_per_tar=4, compute=True)
    _staged_job(tmp_path, reference, [3, 6], mode)()
    commit = _staged_job(tmp_path, out, [3, 6], mode)
    first = commit()
    second = commit()  # as when the worker died after the commit finished
    assert [t.data for t in first] == [t.data for t in second]
    assert comparable_dataset(out) == comparable_dataset(reference)


@pytest.mark.parametrize("mode", ["error", "overwrite", "append"])
def test_a_commit_that_died_after_publishing_completes_on_its_rerun(tmp_path, monkeypatch, mode):
    # Killing a worker exactly inside the commit cannot be timed from a test, so the
    # crash is an exception injected after every shard is published, before the index.
    import dask_imgsink.job.commit as commit_module

    reference, out = tmp_path / "reference" / "out", tmp_path / "disturbed" / "out"  # same name, same card
    for target in (reference, out):
        if mode != "error":
            make_ddf("from_pandas", [21], tmp_path).imgsink.to_webdataset(
                str(target), key_column="key", images_per_tar=4, compute=True)
    _staged_job(tmp_path, reference, [3, 6], mode)()
    commit = _staged_job(tmp_path, out, [3, 6], mode)
    real = commit_module.write_small

    def die_on_index(fs, path, data, tmp_dir):
        if path.endswith("_index.json"):
            raise KeyboardInterrupt("as if the worker died here")  # not an Exception: no rollback
        return real(fs, path, data, tmp_dir)

    monkeypatch.setattr(commit_module, "write_small", die_on_index)
    with pytest.raises(KeyboardInterrupt):
        commit()
    assert not (out / "_SUCCESS").exists()
    monkeypatch.setattr(commit_module, "write_small", real)
    commit()
    assert comparable_dataset(out) == comparable_dataset(reference)


def test_overwrite_refuses_the_directory_holding_the_working_directory(tmp_path, monkeypatch):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    monkeypatch.chdir(out / "sub")
    with pytest.raises(ValueError, match="working directory"):
        make_ddf("from_pandas", [3], tmp_path).imgsink.to_webdataset(str(out), key_column="key", mode="overwrite")


@pytest.mark.parametrize("mode", ["error", "overwrite", "append"])
def test_a_commit_that_fails_midway_undoes_what_it_published(tmp_path, monkeypatch, mode):
    """A failure, not a death (an I/O error the commit sees): it takes back its files and frees the directory."""
    import dask_imgsink.job.commit as commit_module
    from dask_imgsink import verify_dataset

    out = tmp_path / "out"
    if mode != "error":
        make_ddf("from_pandas", [9], tmp_path).imgsink.to_webdataset(
            str(out), key_column="key", images_per_tar=4, compute=True)
    before = {name: (out / name).read_bytes() for name in dataset_names(out)}
    commit = _staged_job(tmp_path, out, [3, 6], mode)
    real, calls = commit_module.publish, []

    def fail_third(fs, staged, final):
        calls.append(final)
        if len(calls) == 3:
            raise OSError(5, "Input/output error (injected)")
        return real(fs, staged, final)

    monkeypatch.setattr(commit_module, "publish", fail_third)
    with pytest.raises(OSError, match="injected"):
        commit()
    left = {name: (out / name).read_bytes() for name in dataset_names(out)}
    assert not (out / "metadata").exists() or mode == "append"
    if mode == "append":
        assert left == before and verify_dataset(str(out)).ok  # the old dataset, whole again
    else:
        assert left == {}  # error: as it was; overwrite: the old dataset was being replaced, nothing half-done


def test_a_commit_rerun_after_its_runs_are_gone_returns_what_it_committed(tmp_path):
    """A worker died after the commit finished: Dask recomputes the lost assembly and the commit;
    both must come back with what was committed."""
    import dask_imgsink.job.accessor as acc

    out = tmp_path / "out"
    ddf = make_ddf("from_map", [3, 6], tmp_path)
    opts, claim = claimed_job(ddf, out, key_column="key", images_per_tar=4)
    frames = [f.compute() for f in ddf.to_delayed()]
    results = [acc.PartitionWriter(opts)(frame, i, claim) for i, frame in enumerate(frames)]
    plan = acc.plan_shards(results, claim, opts)
    runs, summaries = acc.runs_by_partition(results), [acc.summarize(r) for r in results]
    first = acc._commit_exact(claim, summaries, [acc.assemble_shards(plan, range(2), opts, runs)], 2, opts)
    rerun_assembly = acc.assemble_shards(plan, range(2), opts, runs)  # the job has committed: nothing to build
    assert rerun_assembly == []
    again = acc._commit_exact(claim, summaries, [rerun_assembly], 2, opts)
    assert [(t.task_id, t.data, t.metadata) for t in again] == [(t.task_id, t.data, t.metadata) for t in first]
    from dask_imgsink import verify_dataset

    assert verify_dataset(str(out)).ok and not (out / ".imgsink").exists()
