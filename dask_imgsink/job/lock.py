"""One owner per output directory: the job lock, whether its holder still lives, and breaking it.

A job creates ``<out>/.imgsink/lock.json`` with an atomic create-if-absent
(:func:`~dask_imgsink.storage.create_exclusive`) before it stages anything, and
removes it after its commit, or when it fails. The lock says which job holds the
directory, which process claimed it and, under ``distributed``, which scheduler
runs the job, so a later job can tell a live holder from a dead one:

- under ``distributed``: running while the scheduler that ran it (same id) holds
  a live task of the job or a worker still executes one; dead when that
  scheduler holds none (they failed, or their client went away), or when the
  claim ran on this machine and its scheduler is gone (unreachable, or another
  answers at its address: a loopback address means this machine only then);
- on a local scheduler: dead when the process is gone (this machine only), or
  when it is this process and it no longer computes the job, or gave it up;
- otherwise: unknown.

A dead holder's lock is broken by the next job on its own (its staging goes with
it); an unknown one only on purpose (``dask-imgsink clean OUT --break-lock``).
Breaking uses a create-if-absent marker per dead run, so two jobs that find the
same dead lock cannot both take the directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

from ..format.layout import breaker_path, lock_path
from ..storage import (
    create_exclusive,
    forget_listings,
    read_bytes,
    remove_file,
    write_small,
)

_HEX32 = re.compile(r"^[0-9a-f]{32}$")

#: Tokens of jobs this process is computing on a local scheduler (see ``job.bag``).
ACTIVE_LOCAL_JOBS: set[str] = set()
#: Ids of jobs whose local computation failed: their tasks still running must let go.
ABORTED_LOCAL_JOBS: set[str] = set()
_ACTIVE_LOCK = threading.Lock()


def aborted_here(job_id: str) -> bool:
    """Whether this process gave up on the job (its local computation failed)."""
    with _ACTIVE_LOCK:
        return job_id in ABORTED_LOCAL_JOBS


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
        """Parse ``lock.json``; ids must be what we write (32 hex digits: they name folders we delete).

        Raises
        ------
        ValueError, TypeError, KeyError
            Not a lock we could have written.
        """
        raw = json.loads(data)
        raw["process"] = ProcessId(**raw["process"])
        info = cls(**raw)
        if not (_HEX32.match(info.job_id) and _HEX32.match(info.run_id)):
            raise ValueError("job_id and run_id must be 32 hex digits")
        return info

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
    """The lock in ``root``, or ``None``.

    A lock that still does not parse after a second (one being written where
    hard links are not supported appears empty for a moment) reads as held by
    an unknown job: never judged dead, broken only on purpose.
    """
    for _ in range(10):
        forget_listings(fs, lock_path(root))
        data = read_bytes(fs, lock_path(root))
        if data is None:
            return None
        try:
            return LockInfo.from_bytes(data)
        except (ValueError, TypeError, KeyError):
            time.sleep(0.1)
    return LockInfo(job_id="(unreadable lock)", run_id=f"unreadable-{hashlib.sha256(data).hexdigest()[:16]}",
                    token="", mode="?", created="?", process=ProcessId("?", "", "", 0, 0))


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


def lock_read_holds(fs, root: str, run_id: str, lock_bytes: bytes | None) -> bool:
    """Whether ``lock_bytes`` (``root``'s lock file as just read; ``None``: there was none) is run
    ``run_id``'s lock. Read again if it does not parse (one being written may not yet)."""
    try:
        current = None if lock_bytes is None else LockInfo.from_bytes(lock_bytes)
    except (ValueError, TypeError, KeyError):
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
    certainly ``dead``'s. A marker whose breaker died (a break takes
    milliseconds) is removed and the break tried again. Returns whether this
    call removed the lock.
    """
    marker = breaker_path(root, dead.run_id)
    mine = json.dumps({"process": asdict(ProcessId.current()), "time": time.time()}).encode()
    for _ in range(2):
        try:
            create_exclusive(fs, marker, mine)
            break
        except FileExistsError:
            if not _stale_marker(fs, marker):
                return False
            remove_file(fs, marker)
    else:
        return False
    try:
        if not holds_lock(fs, root, dead.run_id):
            return False
        remove_file(fs, lock_path(root))
        return True
    finally:
        remove_file(fs, marker)


def _stale_marker(fs, marker: str, max_age: float = 60.0) -> bool:
    """A breaker marker left by a breaker that died: its process is gone, or it is old."""
    for _ in range(2):
        data = read_bytes(fs, marker)
        if data is None:
            return False  # gone: its breaker finished
        try:
            raw = json.loads(data)
            breaker = ProcessId(**raw["process"])
            return breaker.is_running() is False or time.time() - float(raw["time"]) > max_age
        except (ValueError, TypeError, KeyError):
            time.sleep(1.0)  # being written (no hard links here), or damaged: look once more
    return True


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
    """Ask the scheduler at ``address``; "dead" only from the scheduler that ran the job (same id)."""
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
            return "other", f"another scheduler now answers at {address}"
        if client.run_on_scheduler(_job_tasks_alive, token=token):
            return "running", f"its scheduler at {address} is still running its tasks"
        if any(client.run(_job_tasks_executing, token=token).values()):
            return "running", f"a worker of the scheduler at {address} is still executing one of its tasks"
        return "dead", f"its scheduler at {address} no longer runs any of its tasks"
    finally:
        if own:
            client.close()


def _scheduler_liveness(info: LockInfo) -> tuple[str, str]:
    """A distributed job: ask its scheduler, trusting an absent one only when it ran on this machine.

    The scheduler's address alone (``tcp://127.0.0.1:...``, a container's
    bridge address) may name another machine's scheduler; the claiming worker
    process being on this machine tells that the address is ours.
    """
    address = info.scheduler["address"]
    local = info.process.on_this_machine()
    try:
        state, why = _ask_scheduler(address, info.scheduler["id"], info.token)
    except (OSError, TimeoutError) as exc:
        if local:
            return "dead", f"its scheduler at {address} on this machine is gone ({type(exc).__name__})"
        return "unknown", f"its scheduler at {address} cannot be reached from here ({type(exc).__name__})"
    except Exception as exc:  # a scheduler that cannot run our check
        return "unknown", f"its scheduler at {address} could not be asked ({type(exc).__name__}: {exc})"
    if state == "other":
        if local:
            return "dead", f"{why}: its own scheduler on this machine is gone"
        return "unknown", f"{why}, which may not be the one that ran it (it ran on {info.process.host})"
    return state, why


def liveness(info: LockInfo) -> tuple[str, str]:
    """``("running" | "dead" | "unknown", why)`` for the job holding ``info``."""
    if info.scheduler:
        return _scheduler_liveness(info)
    running = info.process.is_running()
    if running is False:
        return "dead", f"{info.process.describe()} is no longer running"
    if info.process == ProcessId.current() and aborted_here(info.job_id):
        return "dead", "its computation in this process failed; a task still finishing lets go of it"
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
