"""The path a user takes on a real cluster: `dask scheduler`, `dask worker` and a separate client
process, each a real process of its own, on loopback only."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import read_tar_samples

from dask_imgsink import verify_dataset
from dask_imgsink.cluster import MALLOC_TRIM_THRESHOLD

TESTS = Path(__file__).resolve().parent
DASK = Path(sys.executable).with_name("dask")  # the console script installed beside this Python
IMAGES, PER_TAR = 110, 25

# The client: a process of its own that only connects, as a user's script does.
CLIENT_SCRIPT = """
import json, os, sys
sys.path.insert(0, sys.argv[3])
import dask
import dask.dataframe as dd
from distributed import Client
import dask_imgsink  # registers the accessor
from helpers import make_frame

address, out = sys.argv[1], sys.argv[2]
with Client(address, timeout=30) as client:
    with dask.config.set({"dataframe.convert-string": False}):
        ddf = dd.from_pandas(make_frame(%(images)d), npartitions=4, sort=False)
    written = ddf.imgsink.to_webdataset(out, key_column="key", text_column="caption",
                                        images_per_tar=%(per_tar)d, compute=True)
    print(json.dumps({
        "written": sum(t.metadata["num_images"] for t in written),
        "trim": sorted(set(client.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_")).values())),
        "prefixes": sorted(client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.task_prefixes))),
    }))
""" % {"images": IMAGES, "per_tar": PER_TAR}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Processes:
    """Started processes and their log files; :meth:`stop` ends every one of them."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, args: list[str], env: dict | None = None) -> subprocess.Popen:
        with open(self.logs / f"{name}.out", "wb") as out, open(self.logs / f"{name}.err", "wb") as err:
            proc = subprocess.Popen(args, stdout=out, stderr=err, env=env, cwd=self.logs)
        self.procs[name] = proc
        return proc

    def output(self, name: str) -> str:
        return "".join((self.logs / f"{name}.{s}").read_text(errors="replace") for s in ("out", "err"))

    def stop(self) -> None:
        """Terminate the workers, then the scheduler (the order a clean shutdown takes); kill what lingers."""
        procs = sorted(self.procs.values(), key=lambda p: p is self.procs.get("scheduler"))
        for group in (procs[:-1], procs[-1:]):
            for proc in group:
                if proc.poll() is None:
                    proc.terminate()
            deadline = time.monotonic() + 10
            for proc in group:
                try:
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)


@pytest.fixture
def deployed(tmp_path):
    """A scheduler and two workers started as a user starts them; yields ``(address, processes)``."""
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = Processes(logs)
    address = f"tcp://127.0.0.1:{_free_port()}"
    # the allocator setting the README gives for `dask worker`: the nanny passes an exported
    # MALLOC_TRIM_THRESHOLD_ on ahead of its own 65536 (DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON__...
    # would not do: Dask lower-cases the names of DASK_* variables)
    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": str(MALLOC_TRIM_THRESHOLD)}
    try:
        procs.start("scheduler", [str(DASK), "scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1],
                                  "--dashboard-address", "127.0.0.1:0"], env)
        for i in range(2):
            procs.start(f"worker{i}", [str(DASK), "worker", address, "--host", "127.0.0.1", "--nthreads", "1",
                                       "--nworkers", "1", "--no-dashboard", "--name", f"worker{i}",
                                       "--local-directory", str(tmp_path / "scratch")], env)
        yield address, procs
    finally:
        procs.stop()


def _wait_for_workers(address: str, procs: Processes, n: int, timeout: float = 30) -> None:
    from distributed import Client

    deadline = time.monotonic() + timeout
    while True:
        for name, proc in procs.procs.items():
            assert proc.poll() is None, f"{name} exited early:\n{procs.output(name)[-3000:]}"
        try:
            # a short-lived Client, closed before the job so nothing later picks it up as the default
            with Client(address, timeout=5) as client:
                client.wait_for_workers(n, timeout=max(1.0, deadline - time.monotonic()))
            return
        except (OSError, TimeoutError) as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"the scheduler did not see {n} workers: {exc}\n"
                                     f"{procs.output('scheduler')[-3000:]}") from exc
            time.sleep(0.2)


def test_write_from_a_separate_client_on_a_deployed_cluster(tmp_path, deployed):
    address, procs = deployed
    _wait_for_workers(address, procs, 2)

    out = tmp_path / "dataset"
    client = subprocess.run([sys.executable, "-c", CLIENT_SCRIPT, address, str(out), str(TESTS)],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert client.returncode == 0, client.stdout + client.stderr
    assert "Traceback" not in client.stdout + client.stderr
    seen = json.loads(client.stdout.strip().splitlines()[-1])
    assert seen["written"] == IMAGES
    assert seen["trim"] == [str(MALLOC_TRIM_THRESHOLD)]  # the environment variable reached every worker
    # the task groups the README says the dashboard shows
    for prefix in ("imgsink-claim", "imgsink-encode-write", "imgsink-pack-shards", "imgsink-commit",
                   "imgsink-tasks"):
        assert prefix in seen["prefixes"]

    report = verify_dataset(str(out), client=None)
    assert report.ok, [str(p) for p in report.problems]
    assert (report.images, report.shards) == (IMAGES, -(-IMAGES // PER_TAR))
    shards = [e["url"] for e in json.loads((out / "_index.json").read_text())["shardlist"]]
    counts = [len(read_tar_samples(out / name)) for name in shards]
    assert counts == [PER_TAR] * (len(shards) - 1) + [IMAGES - PER_TAR * (len(shards) - 1)]
    assert not (out / ".imgsink").exists()

    for name, proc in procs.procs.items():
        assert proc.poll() is None, f"{name} exited:\n{procs.output(name)[-3000:]}"
        assert "Traceback" not in procs.output(name), procs.output(name)
    assert "Port 8787" not in procs.output("scheduler")
