"""One writer at a time: racing jobs, a held directory, dead holders, breaking a lock on purpose."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import (
    comparable_dataset,
    failing_ddf,
    frame_ddf,
    gated_ddf,
    job_options,
    race_for_the_lock,
    read_dataset,
)

import dask_imgsink
from dask_imgsink import OutputLockedError, clean, verify_dataset
from dask_imgsink.cli import main
from dask_imgsink.job.lock import LockInfo, ProcessId

MODES = ["error", "overwrite", "append"]
TESTS = Path(__file__).parent


def _write(ddf, out, mode, **kwargs):
    return ddf.imgsink.to_webdataset(str(out), key_column="key", text_column="caption", images_per_tar=4,
                                     mode=mode, compute=True, **kwargs)


def _initial(out) -> None:
    _write(frame_ddf(6, 1000), out, "error")


@pytest.mark.parametrize("mode_a", MODES)
@pytest.mark.parametrize("mode_b", MODES)
def test_two_jobs_racing_for_the_lock_never_both_succeed(tmp_path, monkeypatch, mode_a, mode_b):
    """Both jobs reach the create-if-absent at the same instant (a barrier): one wins, one is refused."""
    start_with_dataset = "error" not in (mode_a, mode_b)
    out = tmp_path / "race" / "out"
    if start_with_dataset:
        _initial(out)
    inputs = {"a": frame_ddf(10, 0), "b": frame_ddf(7, 500)}
    modes = {"a": mode_a, "b": mode_b}
    outcome = race_for_the_lock(monkeypatch, {
        name: (lambda name=name: _write(inputs[name], out, modes[name])) for name in inputs})
    won = [n for n, v in outcome.items() if isinstance(v, list)]
    lost = [n for n, v in outcome.items() if isinstance(v, Exception)]
    assert len(won) == 1 and len(lost) == 1, outcome
    error = outcome[lost[0]]
    assert isinstance(error, OutputLockedError), repr(error)
    winner_job = json.loads((out / "_SUCCESS").read_text())["job_id"]
    assert f"held by job {winner_job}" in str(error) and "Wait for it to finish" in str(error), str(error)

    # the dataset is exactly the winner's (on top of the first dataset when appending): nothing lost, nothing mixed
    reference = tmp_path / "reference" / "out"
    if start_with_dataset:
        _initial(reference)
    _write(inputs[won[0]], reference, modes[won[0]])
    assert comparable_dataset(out) == comparable_dataset(reference)
    assert verify_dataset(str(out)).ok


def test_jobs_racing_from_two_processes(tmp_path):
    """The same race between two processes: O_EXCL decides, and the loser names the winner."""
    out, go = tmp_path / "out", tmp_path / "go"
    script = textwrap.dedent(f"""
        import sys, time, pathlib
        sys.path.insert(0, {str(TESTS)!r})
        from helpers import frame_ddf
        import dask_imgsink
        ddf = frame_ddf(20, int(sys.argv[1]))
        pathlib.Path(sys.argv[2]).touch()
        while not pathlib.Path({str(go)!r}).exists():
            time.sleep(0.001)
        try:
            ddf.imgsink.to_webdataset({str(out)!r}, key_column="key", images_per_tar=8, mode="append", compute=True)
            print("WON")
        except dask_imgsink.OutputLockedError as exc:
            print("LOST", exc)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(start), str(tmp_path / f"ready{start}")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for start in (0, 100)]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready{s}").exists() for s in (0, 100)):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    go.touch()
    results = [p.communicate(timeout=180)[0].strip().splitlines()[-1] for p in procs]
    data = read_dataset(out)
    keys = [k for k, _ in data["samples"]]
    if sorted(r.split()[0] for r in results) == ["WON", "WON"]:
        # the first finished before the second started: appends serialised, both whole
        assert sorted(keys) == sorted([f"img{i:05d}" for i in (*range(20), *range(100, 120))])
    else:
        assert sorted(r.split()[0] for r in results) == ["LOST", "WON"], results
        assert len(keys) == 20 and len(set(k[:5] for k in keys)) == 1  # one job's rows only
        assert "is held by job" in next(r for r in results if r.startswith("LOST"))
    assert verify_dataset(str(out)).ok


def test_a_second_job_is_refused_while_the_first_runs_on_the_cluster(tmp_path, client):
    out, gate = tmp_path / "out", tmp_path / "gate"
    # one gated partition: it holds one worker's thread, the claim runs on the other
    first = client.compute(gated_ddf([8], gate).imgsink.to_webdataset(str(out), key_column="key"))
    deadline = time.monotonic() + 60
    while not (out / ".imgsink" / "lock.json").exists():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    holder = json.loads((out / ".imgsink" / "lock.json").read_text())["job_id"]
    with pytest.raises(OutputLockedError) as info:
        frame_ddf(5, 50).imgsink.to_webdataset(str(out), key_column="key", mode="append")
    assert f"held by job {holder}" in str(info.value) and "still running its tasks" in str(info.value)
    assert "Wait for it to finish" in str(info.value)
    gate.touch()
    first.result(timeout=120)
    frame_ddf(5, 50).imgsink.to_webdataset(str(out), key_column="key", mode="append", compute=True)
    assert len(read_dataset(out)["samples"]) == 13


def test_a_job_that_failed_upstream_on_the_cluster_does_not_hold_the_directory(tmp_path, client):
    """The user's own partition function fails: our commit never runs, so the lock stays behind.
    The next job asks the scheduler, learns the holder is dead, and takes the directory."""
    out = tmp_path / "out"
    future = client.compute(failing_ddf([3, 3, 3]).imgsink.to_webdataset(str(out), key_column="key"))
    with pytest.raises(RuntimeError, match="upstream failure"):
        future.result(timeout=120)
    del future
    # Dask cannot stop the job's tasks already running: while one is, the job counts as live and the
    # next job is refused with "Wait for it to finish" (seen in CI on a loaded machine). Wait for them.
    deadline = time.monotonic() + 60
    while any(client.processing().values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    frame_ddf(5, 0).imgsink.to_webdataset(str(out), key_column="key", compute=True)
    assert [k for k, _ in read_dataset(out)["samples"]] == [f"img{i:05d}" for i in range(5)]
    assert not (out / ".imgsink").exists() and verify_dataset(str(out)).ok


def test_a_give_up_between_the_claims_writes_leaves_no_lock_behind(tmp_path, monkeypatch):
    """The local computation fails while the claim runs, and the give-up cleans up (releases the
    lock) between the claim taking the lock and rewriting it with its numbering. The rewrite
    recreated the lock, and nothing released it: ``.imgsink`` stayed behind (seen once in CI, in
    the threads case of the test below). The interleaving is forced here by running the give-up,
    as the local scheduler's hook does, from inside ``update_lock``: no real timing can hit it
    on demand. The claim must release the lock it rewrote and stop."""
    from dask.base import tokenize

    import dask_imgsink.job.claim as claim_module
    from dask_imgsink.job.bag import _abort, register_job
    from dask_imgsink.job.lock import ABORTED_LOCAL_JOBS

    out = tmp_path / "out"
    opts = job_options(frame_ddf(4, 0), out, key_column="key")
    token = tokenize(*opts.token())
    register_job(token, opts)
    rewrite = claim_module.update_lock

    def give_up_then_rewrite(*args, **kwargs):
        _abort([token])
        rewrite(*args, **kwargs)

    monkeypatch.setattr(claim_module, "update_lock", give_up_then_rewrite)
    try:
        with pytest.raises(RuntimeError, match="was stopped"):
            claim_module.claim_output(opts, token)
    finally:
        ABORTED_LOCAL_JOBS.discard(opts.job_id)
    assert not (out / ".imgsink").exists()
    monkeypatch.undo()
    frame_ddf(4, 0).imgsink.to_webdataset(str(out), key_column="key", compute=True)
    assert verify_dataset(str(out)).ok


@pytest.mark.parametrize("scheduler", [None, "threads", "sync"])
def test_a_failed_job_on_threads_frees_the_directory_at_once(tmp_path, scheduler):
    """The user's partition function fails: no task of ours sees it, the local scheduler's hooks clean up."""
    import dask

    out = tmp_path / "out"
    bag = failing_ddf([3, 3]).imgsink.to_webdataset(str(out), key_column="key")
    with pytest.raises(RuntimeError, match="upstream failure"):
        dask.compute(bag, scheduler=scheduler)  # None: the WriteBag's own scheduler
    if scheduler == "threads":
        # dask's shared pool returns at the first error while our other tasks still run;
        # each of them, finishing, sees the job given up and removes what it wrote
        deadline = time.monotonic() + 30
        while (out / ".imgsink").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    assert not (out / ".imgsink").exists()
    frame_ddf(4, 0).imgsink.to_webdataset(str(out), key_column="key", compute=True)
    assert verify_dataset(str(out)).ok


def _foreign_lock(out: Path, host: str = "elsewhere") -> None:
    """A lock as a job on another machine would leave it (no other machine can run here)."""
    info = LockInfo(job_id="f" * 32, run_id="b" * 32, token="t" * 32, mode="append", created="2026-01-01T00:00:00",
                    process=ProcessId(host, "another-boot", "pid:[1]", 4242, 1))
    (out / ".imgsink").mkdir(parents=True, exist_ok=True)
    (out / ".imgsink" / "lock.json").write_bytes(info.to_bytes())
    (out / ".imgsink" / "jobs" / info.job_id / "write-000000-abc").mkdir(parents=True)
    (out / ".imgsink" / "jobs" / info.job_id / "write-000000-abc" / "run-000000.tar.part").write_bytes(b"x" * 100)


def test_a_lock_whose_holder_cannot_be_shown_dead_is_broken_only_on_purpose(tmp_path, capsys):
    out = tmp_path / "out"
    _write(frame_ddf(4, 0), out, "error")
    _foreign_lock(out)
    with pytest.raises(OutputLockedError) as info:
        _write(frame_ddf(4, 100), out, "append")
    text = str(info.value)
    assert f"held by job {'f' * 32}" in text and "process 4242 on elsewhere" in text
    assert f"dask-imgsink clean {out} --break-lock" in text
    with pytest.raises(OutputLockedError):
        clean(str(out))
    assert main(["clean", str(out)]) == 1
    assert main(["clean", str(out), "--break-lock"]) == 0
    assert "broke the lock of job ffff" in capsys.readouterr().out
    assert not (out / ".imgsink").exists()
    _write(frame_ddf(4, 100), out, "append")
    assert len(read_dataset(out)["samples"]) == 8 and verify_dataset(str(out)).ok


def test_a_lock_naming_a_loopback_scheduler_of_another_machine_is_not_judged_dead(tmp_path):
    """``tcp://127.0.0.1:...`` on another machine is not our loopback: unknown, not dead."""
    out = tmp_path / "out"
    info = LockInfo(job_id="a" * 32, run_id="b" * 32, token="t" * 32, mode="error", created="2026-01-01T00:00:00",
                    process=ProcessId("laptop", "other-boot", "pid:[1]", 99, 1),
                    scheduler={"address": "tcp://127.0.0.1:1", "id": "Scheduler-elsewhere"})
    (out / ".imgsink").mkdir(parents=True)
    (out / ".imgsink" / "lock.json").write_bytes(info.to_bytes())
    with pytest.raises(OutputLockedError, match="cannot be reached from here.*--break-lock"):
        _write(frame_ddf(4, 0), out, "error")
    assert (out / ".imgsink" / "lock.json").exists()


def test_a_lock_of_a_dead_process_on_this_machine_is_taken_over(tmp_path, caplog):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = ProcessId.current()
    dead = ProcessId(dead.host, dead.boot_id, dead.pid_ns, int(proc.stdout), dead.started + 1)
    info = LockInfo(job_id="d" * 32, run_id="e" * 32, token="t" * 32, mode="error", created="2026-01-01T00:00:00",
                    process=dead)
    (out / ".imgsink" / "jobs" / info.job_id).mkdir(parents=True)
    (out / ".imgsink" / "lock.json").write_bytes(info.to_bytes())
    with caplog.at_level("WARNING", logger="dask_imgsink"):
        _write(frame_ddf(4, 0), out, "error")
    assert any("breaking the lock of job dddd" in r.message and "no longer running" in r.message
               for r in caplog.records)
    assert not (out / ".imgsink").exists() and verify_dataset(str(out)).ok


def test_lock_file_is_created_exclusively_and_released(tmp_path):
    out = tmp_path / "out"
    bag = frame_ddf(4, 0).imgsink.to_webdataset(str(out), key_column="key")
    assert not out.exists()  # building the job claims nothing
    bag.compute()
    assert not (out / ".imgsink").exists()
    assert socket.gethostname() and os.getpid()  # the identity a lock records
    assert dask_imgsink.OutputLockedError is OutputLockedError
