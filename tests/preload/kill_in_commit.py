"""Dask worker preload for the commit-kill tests: the worker process dies (``os._exit``) at a chosen step of a commit.

Every filesystem step the commit takes (publishing a file, writing a small
file, removing one, releasing the lock...) is counted from the start of each
commit; when the count reaches the step named in the control file, the worker
exits at once, as a SIGKILL would leave it: nothing of ours runs after. The
control file is disarmed first, so the commit Dask reruns elsewhere is not
killed again. With no control file, nothing changes; steps are still counted
and logged, which is how the tests learn how many steps a commit takes.

A commit that spreads its copies over the workers (``dask_imgsink.job.spread``)
runs them as tasks of their own; ``"kill_share": "beside"`` (or ``"under"``)
makes the first worker to start a share die there when the commit's own task
is not (or is) waiting on that worker.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

STEPS = ("publish", "publish_spread", "write_small", "write_small_many", "read_many", "remove_file", "remove_many",
         "remove_quietly", "remove_empty_dir", "release", "sweep_dead_staging", "_save_journal", "read_lock")


def _control() -> Path:
    return Path(os.environ["IMGSINK_KILL_CONTROL"])


def _read() -> dict:
    try:
        return json.loads(_control().read_text())
    except (FileNotFoundError, ValueError):
        return {}


def dask_setup(worker) -> None:
    import dask_imgsink.job.accessor as accessor
    import dask_imgsink.job.commit as commit

    count = {"n": 0, "names": []}

    def step(name: str) -> None:
        count["n"] += 1
        count["names"].append(name)
        state = _read()
        if state.get("armed") and state.get("kill_at") == count["n"]:
            state.update(armed=False, killed_at=name)
            _control().write_text(json.dumps(state))
            os._exit(1)

    def counted(name, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            step(name)
            return fn(*args, **kwargs)
        return wrapper

    for name in STEPS:
        setattr(commit, name, counted(name, getattr(commit, name)))
    real_commit = accessor.commit_job

    @functools.wraps(real_commit)
    def commit_job(*args, **kwargs):
        count["n"], count["names"] = 0, []
        result = real_commit(*args, **kwargs)
        step("end")  # dying after the commit, before its result reaches the client
        log = _control().with_suffix(".steps")
        log.write_text(json.dumps(count["names"]))
        return result

    accessor.commit_job = commit_job
    _kill_in_shares(worker)


def _kill_in_shares(worker) -> None:
    import dask_imgsink.job.spread as spread
    import dask_imgsink.storage as storage

    real_publish_many = spread.publish_many

    @functools.wraps(real_publish_many)
    def publish_many(*args, **kwargs):
        state = _read()
        seceded = tuple(worker.state.long_running)  # a copy: the event loop changes the set meanwhile
        here = "under" if any(str(ts.key).startswith("imgsink-commit") for ts in seceded) else "beside"
        if state.get("armed") and state.get("kill_share") == here:
            state.update(armed=False, killed_at=f"share {here} the commit")
            _control().write_text(json.dumps(state))
            os._exit(1)
        return real_publish_many(*args, **kwargs)

    # both names: a share task pickles the function by reference to dask_imgsink.storage
    spread.publish_many = storage.publish_many = publish_many
