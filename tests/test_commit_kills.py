"""Survives workers dying: a worker process killed at any step of the commit, in each mode, gives the same dataset.

The workers load ``preload/kill_in_commit.py``, which counts every filesystem
step of a commit and makes the worker ``os._exit`` at the step the test names:
a real process death at an exact moment, with nothing of ours running after
it. Dask then reruns the commit (and whatever results died with the worker) on
a live worker; the dataset must be byte for byte what an undisturbed run
gives, with no staging and no temporary file left anywhere.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import dask
import pytest
from distributed import Client, LocalCluster
from helpers import comparable_dataset, frame_ddf

import dask_imgsink  # noqa: F401
from dask_imgsink import verify_dataset

PRELOAD = Path(__file__).parent / "preload" / "kill_in_commit.py"
MODES = ["error", "overwrite", "append"]


@pytest.fixture(scope="module")
def kill_control(tmp_path_factory):
    control = tmp_path_factory.mktemp("kill") / "control.json"
    old = os.environ.get("IMGSINK_KILL_CONTROL")
    os.environ["IMGSINK_KILL_CONTROL"] = str(control)  # worker processes inherit it
    yield control
    if old is None:
        del os.environ["IMGSINK_KILL_CONTROL"]
    else:
        os.environ["IMGSINK_KILL_CONTROL"] = old


@pytest.fixture(scope="module")
def kill_client(kill_control):
    # LocalCluster closes a worker's nanny for good when, `lost-worker-timeout` after a death,
    # a worker of that name is again down; with a death every second here, that would happen.
    with dask.config.set({"distributed.deploy.lost-worker-timeout": "1h"}), \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                         scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
                         silence_logs=logging.CRITICAL, preload=[str(PRELOAD)]) as cluster, \
            Client(cluster) as client:
        yield client


def _prepare(out: Path, mode: str) -> None:
    if mode != "error":  # a dataset to overwrite or append to, written on threads here
        frame_ddf(9, 1000).imgsink.to_webdataset(str(out), key_column="key", text_column="caption",
                                                 images_per_tar=4, compute=True)


def _job(out: Path, mode: str):
    return frame_ddf(10, 0, npartitions=3).imgsink.to_webdataset(
        str(out), key_column="key", text_column="caption", images_per_tar=4, mode=mode)


def _kill_points(steps: list[str]) -> list[int]:
    """Steps (1-based) to die before: the first and last of each kind, the middle publish, and after the end."""
    points = set()
    for name in set(steps):
        where = [i + 1 for i, s in enumerate(steps) if s == name]
        points |= {where[0], where[-1], where[len(where) // 2]}
    return sorted(points)


def _no_temporaries(out: Path) -> list[str]:
    return [str(p) for p in out.rglob("*") if p.name.endswith((".part", ".tmp")) or ".imgsink" in p.parts]


@pytest.mark.parametrize("mode", MODES)
def test_a_worker_killed_at_any_step_of_the_commit_gives_the_same_dataset(tmp_path, kill_client, kill_control,
                                                                          mode):
    kill_control.write_text(json.dumps({"armed": False}))
    reference = tmp_path / "reference" / "out"
    _prepare(reference, mode)
    kill_client.compute(_job(reference, mode)).result(timeout=120)
    steps = json.loads(kill_control.with_suffix(".steps").read_text())
    assert steps[-1] == "end" and "publish" in steps and "release" in steps, steps  # locally: one per file
    expected = comparable_dataset(reference)

    for point in _kill_points(steps):
        out = tmp_path / f"killed-at-{point}" / "out"
        _prepare(out, mode)
        kill_control.write_text(json.dumps({"armed": True, "kill_at": point}))
        tasks = kill_client.compute(_job(out, mode)).result(timeout=180)
        state = json.loads(kill_control.read_text())
        assert state.get("killed_at") == steps[point - 1], (point, state)  # the worker really died there
        assert comparable_dataset(out) == expected, f"killed before step {point} ({steps[point - 1]})"
        assert _no_temporaries(out) == []
        assert [t.metadata["num_images"] for t in tasks] == [4, 4, 2]
        assert verify_dataset(str(out)).ok


@pytest.mark.parametrize("mode", MODES)
def test_a_worker_killed_inside_the_commit_on_s3_gives_the_same_dataset(s3, kill_client, kill_control, mode):
    prefix, options, fs = s3

    def job(url):
        return frame_ddf(10, 0, npartitions=3).imgsink.to_webdataset(
            url, key_column="key", text_column="caption", images_per_tar=4, mode=mode, storage_options=options)

    def prepare(url):
        if mode != "error":
            frame_ddf(9, 1000).imgsink.to_webdataset(url, key_column="key", text_column="caption", images_per_tar=4,
                                                     storage_options=options, compute=True)

    kill_control.write_text(json.dumps({"armed": False}))
    reference = f"{prefix}/reference/out"
    prepare(reference)
    kill_client.compute(job(reference)).result(timeout=120)
    steps = json.loads(kill_control.with_suffix(".steps").read_text())
    expected = comparable_dataset(reference.removeprefix("s3://"), fs)
    publishes = [i + 1 for i, s in enumerate(steps) if s in ("publish", "publish_spread")]
    index_write = [i + 1 for i, s in enumerate(steps) if s == "write_small"][-2]  # then the card, then _SUCCESS
    removals = [i + 1 for i, s in enumerate(steps) if s == "remove_file"]
    for point in sorted({publishes[0], publishes[len(publishes) // 2], index_write, steps.index("release") + 1,
                         len(steps), removals[-1]}):
        url = f"{prefix}/killed-at-{point}/out"
        prepare(url)
        kill_control.write_text(json.dumps({"armed": True, "kill_at": point}))
        kill_client.compute(job(url)).result(timeout=180)
        assert json.loads(kill_control.read_text()).get("killed_at") == steps[point - 1]
        assert comparable_dataset(url.removeprefix("s3://"), fs) == expected, f"killed before step {point}"
        assert not fs.find(f"{url.removeprefix('s3://')}/.imgsink")
        assert verify_dataset(url, storage_options=options).ok


@pytest.mark.parametrize("where", ["beside", "under"])
def test_a_worker_killed_while_copying_its_share_of_a_spread_commit_gives_the_same_dataset(s3, kill_client,
                                                                                            kill_control, where):
    """The commit spreads its copies over both workers (a share of at least 2 files each here); the first
    worker to start a share dies there: one not running the commit ("beside": Dask reruns the share), or the
    one whose commit task waits for the shares ("under": Dask reruns the commit, which spreads again)."""
    prefix, options, fs = s3

    def job(url):
        with dask.config.set({"imgsink.commit-spread-files": 2}):  # read where the graph is built
            return frame_ddf(10, 0, npartitions=3).imgsink.to_webdataset(
                url, key_column="key", text_column="caption", images_per_tar=4, storage_options=options)

    kill_control.write_text(json.dumps({"armed": False}))
    reference = f"{prefix}/reference/out"
    kill_client.compute(job(reference)).result(timeout=120)
    expected = comparable_dataset(reference.removeprefix("s3://"), fs)
    url = f"{prefix}/killed/out"
    kill_control.write_text(json.dumps({"armed": True, "kill_share": where}))
    kill_client.compute(job(url)).result(timeout=180)
    assert json.loads(kill_control.read_text()).get("killed_at") == f"share {where} the commit"
    assert comparable_dataset(url.removeprefix("s3://"), fs) == expected
    assert not fs.find(f"{url.removeprefix('s3://')}/.imgsink")
    assert verify_dataset(url, storage_options=options).ok
