"""One owner per output directory: the job lock, whether its holder still lives, and breaking it.

A job creates ``<out>/.imgsink/lock.json`` with an atomic create-if-absent
(:func:`~dask_imgsink.storage.create_exclusive`) before it stages anything, and
removes it after its commit, or when it fails. The lock says which job holds the
directory, which process claimed it and, under ``distributed``, which scheduler
runs the job, so a later job can tell a live holder from a dead one:

- the holder's scheduler is reachable and still knows the job's tasks: running;
  it does not (they failed, or their client went away), or another scheduler
  now answers at that address, or it was on this machine and cannot be reached: dead;
- a job run on a local scheduler (threads) by a process on this machine: dead when
  that process is gone, or when it is this process and the job is not computing;
- otherwise: unknown.

A dead holder's lock is broken by the next job on its own (its staging goes with
it); an unknown one only on purpose (``dask-imgsink clean OUT --break-lock``).
Breaking uses a create-if-absent marker per dead run, so two jobs that find the
same dead lock cannot both take the directory.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

from ..format.layout import breaker_path, lock_path
from ..storage import create_exclusive, forget_listings, read_bytes, remove_file, write_small

#: Tokens of jobs this process is computing on a local scheduler (see ``accessor.WriteBag``).
ACTIVE_LOCAL_JOBS: set[str] = set()
_ACTIVE_LOCK = threading.Lock()


def _read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot), or ``None`` if there is no such process."""
    stat = _read_text(f"/proc/{pid}/stat")
    if not stat:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


@dataclass(frozen=True)
class ProcessId:
    """A process, identified so that a reused PID or another machine is never mistaken for it."""

    host: str
    boot_id: str
    pid_ns: str
    pid: int
    started: int

    @classmethod
    def current(cls) -> ProcessId:
        pid_ns = ""
        try:
            pid_ns = os.readlink("/proc/self/ns/pid")
        except OSError:
            pass
        return cls(socket.gethostname(), _read_text("/proc/sys/kernel/random/boot_id"), pid_ns,
                   os.getpid(), _start_ticks(os.getpid()) or 0)

    def on_this_machine(self) -> bool:
        """Same host, same boot, same PID namespace: its PID means the same thing here."""
        me = ProcessId.current()
        return bool(self.boot_id) and (self.host, self.boot_id, self.pid_ns) == (me.host, me.boot_id, me.pid_ns)

    def is_running(self) -> bool | None:
        """Whether the process still runs; ``None`` when that cannot be told from here."""
        if not self.on_this_machine():
            return None
        return _start_ticks(self.pid) == self.started

    def describe(self) -> str:
        return f"process {self.pid} on {self.host}"


@dataclass(frozen=True)
class LockInfo:
    """The content of ``lock.json``: who holds the directory, and where numbering starts."""

    job_id: str
    run_id: str
    token: str
    mode: str
    created: str
    process: ProcessId
    scheduler: dict | None = None  # {"address", "id"} under distributed
    tracked: bool = False  # computed by WriteBag's local scheduler in ``process``
    numbering: dict | None = None  # {"first_shard", "first_partition"} once decided
    extra: dict = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> LockInfo:
        raw = json.loads(data)
        raw["process"] = ProcessId(**raw["process"])
        return cls(**raw)

    def describe(self) -> str:
        where = f" on the Dask scheduler at {self.scheduler['address']}" if self.scheduler else ""
        return (f"job {self.job_id} (mode={self.mode!r}, started {self.created} by "
                f"{self.process.describe()}{where})")


class OutputLockedError(RuntimeError):
    """Another job holds the output directory."""


class LostLockError(RuntimeError):
    """The job's lock was broken or replaced while it ran."""


def new_lock(job_id: str, token: str, mode: str) -> LockInfo:
    """A lock for a job claiming the directory from this process."""
    with _ACTIVE_LOCK:
        tracked = token in ACTIVE_LOCAL_JOBS
    return LockInfo(job_id=job_id, run_id=uuid.uuid4().hex, token=token, mode=mode,
                    created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    process=ProcessId.current(), scheduler=_scheduler_here(), tracked=tracked)


def _scheduler_here() -> dict | None:
    """The distributed scheduler running this task, if it runs on a distributed worker."""
    try:
        from distributed import get_client, get_worker

        get_worker()
        client = get_client()
        return {"address": client.scheduler.address, "id": client.scheduler_info()["id"]}
    except (ImportError, ValueError):
        return None


def read_lock(fs, root: str) -> LockInfo | None:
    """The lock in ``root``, or ``None``. A lock that cannot be parsed reads as held by nobody known."""
    forget_listings(fs, lock_path(root))
    data = read_bytes(fs, lock_path(root))
    if data is None:
        return None
    try:
        return LockInfo.from_bytes(data)
    except (ValueError, TypeError, KeyError):
        return LockInfo(job_id="(unreadable lock)", run_id=f"unreadable-{len(data)}", token="", mode="?",
                        created="?", process=ProcessId("?", "", "", 0, 0))


def try_claim(fs, root: str, info: LockInfo) -> bool:
    """Create the lock for ``info``; ``False`` when another lock is there."""
    try:
        create_exclusive(fs, lock_path(root), info.to_bytes())
        return True
    except FileExistsError:
        return False


def update_lock(fs, root: str, info: LockInfo, tmp_dir: str) -> None:
    """Rewrite our own lock (to record the numbering decided under it)."""
    write_small(fs, lock_path(root), info.to_bytes(), tmp_dir)


def holds_lock(fs, root: str, run_id: str) -> bool:
    current = read_lock(fs, root)
    return current is not None and current.run_id == run_id


def release(fs, root: str, run_id: str) -> None:
    """Remove the lock if it is still the one of run ``run_id``."""
    if holds_lock(fs, root, run_id):
        remove_file(fs, lock_path(root))


def break_lock(fs, root: str, dead: LockInfo) -> bool:
    """Remove ``dead``'s lock, unless someone else is breaking it or it was replaced.

    Whoever creates the breaker marker of ``dead``'s run may remove the lock;
    nobody else can then create a lock until it is gone, so the lock removed is
    certainly ``dead``'s. Returns whether this call removed it.
    """
    marker = breaker_path(root, dead.run_id)
    try:
        create_exclusive(fs, marker, b"")
    except FileExistsError:
        return False
    try:
        if not holds_lock(fs, root, dead.run_id):
            return False
        remove_file(fs, lock_path(root))
        return True
    finally:
        remove_file(fs, marker)


# ----------------------------------------------------------------------------- liveness


_LIVE_TASK_STATES = ("waiting", "queued", "no-worker", "processing", "memory")


def _job_tasks_alive(dask_scheduler, token: str) -> bool:
    """Run on the scheduler: is any task of the job still to run, running, or holding a result?"""
    return any(token in str(key) and ts.state in _LIVE_TASK_STATES for key, ts in dask_scheduler.tasks.items())


def _job_tasks_executing(dask_worker, token: str) -> bool:
    """Run on each worker: is a task of the job still executing here?

    A task the scheduler has released (its client went away) keeps running to
    its end on the worker, in state ``cancelled``; it may still write.
    """
    return any(token in str(ts.key) for ts in (*dask_worker.state.executing, *dask_worker.state.long_running))


def _ask_scheduler(address: str, expected_id: str, token: str) -> tuple[str, str]:
    from distributed import Client

    try:
        current = Client.current()
        if current.scheduler.address == address:
            client, own = current, False
        else:
            raise ValueError
    except ValueError:
        client, own = Client(address, timeout=5, set_as_default=False), True
    try:
        if client.scheduler_info()["id"] != expected_id:
            return "dead", f"the scheduler at {address} has restarted since, so the job is gone"
        if client.run_on_scheduler(_job_tasks_alive, token=token):
            return "running", f"its scheduler at {address} is still running its tasks"
        if any(client.run(_job_tasks_executing, token=token).values()):
            return "running", f"a worker of the scheduler at {address} is still executing one of its tasks"
        return "dead", f"its scheduler at {address} no longer runs any of its tasks"
    finally:
        if own:
            client.close()


def _is_loopback_or_here(address: str) -> bool:
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    if host in ("localhost", "127.0.0.1", "::1") or host.startswith("127."):
        return True
    try:
        return host in {socket.gethostname(), *socket.gethostbyname_ex(socket.gethostname())[2]}
    except OSError:
        return False


def liveness(info: LockInfo) -> tuple[str, str]:
    """``("running" | "dead" | "unknown", why)`` for the job holding ``info``."""
    if info.scheduler:
        address = info.scheduler["address"]
        try:
            return _ask_scheduler(address, info.scheduler["id"], info.token)
        except (OSError, TimeoutError) as exc:
            if _is_loopback_or_here(address):
                return "dead", f"its scheduler at {address} on this machine is gone ({type(exc).__name__})"
            return "unknown", f"its scheduler at {address} cannot be reached from here ({exc})"
        except Exception as exc:  # a scheduler that cannot run our check
            return "unknown", f"its scheduler at {address} could not be asked ({type(exc).__name__}: {exc})"
    running = info.process.is_running()
    if running is False:
        return "dead", f"{info.process.describe()} is no longer running"
    if running and info.tracked and info.process == ProcessId.current():
        with _ACTIVE_LOCK:
            active = info.token in ACTIVE_LOCAL_JOBS
        if active:
            return "running", "it is being computed by this process"
        return "dead", "this process started it and is no longer computing it"
    return "unknown", f"{info.process.describe()} may still be computing it"


def locked_error(url: str, info: LockInfo, state: str, why: str) -> OutputLockedError:
    """The error a second job gets: who holds the directory, and what to do."""
    if state == "running":
        advice = "Wait for it to finish and run again, or write to another directory."
    else:
        advice = (f"If that job is dead, remove its lock and staged files with "
                  f"`dask-imgsink clean {url} --break-lock` (or "
                  f"`dask_imgsink.clean({url!r}, break_lock=True)`), then run again.")
    return OutputLockedError(
        f"the output directory {url!r} is held by {info.describe()}; {why}. {advice}"
    )


def wait_briefly(attempt: int) -> None:
    time.sleep(0.05 * (attempt + 1))


__all__ = [
    "LockInfo", "LostLockError", "OutputLockedError", "ProcessId", "break_lock", "holds_lock",
    "liveness", "locked_error", "new_lock", "read_lock", "release", "try_claim", "update_lock", "wait_briefly",
]
