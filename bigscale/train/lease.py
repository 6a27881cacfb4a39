"""One owner per run directory: a lease file, ``RUN_DIR/lease.json``.

Two launches into the same run directory (a double submit, a manual resubmit while Slurm's
requeued job waits) would interleave ``train.log`` and overwrite each other's checkpoints. The
lease makes the second one stop before it writes anything.

It has to work on the shared filesystems clusters use (NFS, Lustre), where ``flock`` may be a
no-op or local to one client. So the lease is a plain JSON file, taken with the operations those
filesystems keep atomic: ``link()`` of a fully written private file onto the lease name (fails if
the name exists) to acquire, ``rename()`` of a private file over it to refresh the heartbeat.

Who holds it, and so who is "the same owner" on a restart:

* ``bigscale train`` with ``launcher=local`` or ``launcher=multinode``: the launcher process on
  the machine where it was typed (for multinode, the node with ``launcher.node_rank=0``; the other
  nodes' launchers neither take nor check it). It passes its token to its ranks in
  ``BIGSCALE_RUN_DIR_LEASE``, so they know their run directory is owned and do nothing. The
  launcher refreshes the heartbeat while it waits; its ranks die with it (``dist/parent_death``).
  A torchrun restart (``launcher.max_restarts``) happens under the same launcher.
* a Slurm job: rank 0 of the job takes it, and the identity is the job id. A requeued job keeps
  its id, so it continues under the same lease; ``bigscale train launcher=slurm`` only checks that
  no live owner holds the run directory before submitting.
* a user's own torchrun: rank 0 takes it.

A holder is presumed dead when its Slurm job is no longer queued or running (asked with
``squeue`` where there is one), when its process is gone (same host), or when its heartbeat is
older than ``STALE_S`` (another host). A dead holder's lease is taken over, with a log line: that
is how a run resumes after a crash."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from bigscale.errors import LaunchError
from bigscale.logging import get_logger

log = get_logger(__name__)

LEASE_FILE = "lease.json"
ENV_TOKEN = "BIGSCALE_RUN_DIR_LEASE"
"""Set by a launcher that holds the lease, for its ranks: ownership is settled."""
HEARTBEAT_S = 30.0
STALE_S = 300.0
"""A holder on another host whose heartbeat is older than this is presumed dead: ten missed
heartbeats, so a slow shared filesystem or a short network partition does not hand a live run
directory to a second job."""
# Slurm states in which a job may still (again) write into its run directory.
_ACTIVE_SLURM_STATES = {
    "PENDING",
    "RUNNING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "CONFIGURING",
    "COMPLETING",
    "SUSPENDED",
    "RESIZING",
    "SIGNALING",
    "STAGE_OUT",
    "STOPPED",
}


class RunDirBusyError(LaunchError):
    """Another live job holds the run directory."""


@dataclass
class Holder:
    host: str
    pid: int
    job: str | None
    """The Slurm job id: the same id is the same owner (a requeue)."""
    since: float
    heartbeat: float
    token: str
    pid_start: str | None = None
    """The process's start time from /proc, so a recycled pid is not mistaken for the holder."""

    @classmethod
    def me(cls, job: str | None) -> Holder:
        now = time.time()
        pid = os.getpid()
        return cls(
            host=socket.gethostname(),
            pid=pid,
            job=job or None,
            since=now,
            heartbeat=now,
            token=uuid.uuid4().hex,
            pid_start=_pid_start(pid),
        )

    def describe(self) -> str:
        job = f"Slurm job {self.job}, " if self.job else ""
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return f"{job}pid {self.pid} on {self.host}, since {when}"


class Lease:
    """A lease this process holds; ``release`` it at the end (a crash leaves it to be taken over
    as a dead holder's)."""

    def __init__(self, run_dir: Path, holder: Holder, note: str | None = None):
        self.path = Path(run_dir) / LEASE_FILE
        self.holder = holder
        self.note = note
        """How it was taken, for the log, when not simply new: continued by the same job, or
        taken over from a dead holder."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._kept = False
        self.created_dirs: list[Path] = []
        """Directories made for the lease, deepest first: removed again if a run that failed
        before writing anything releases it (a pre-flight error leaves no run directory)."""

    def start_heartbeat(self, every_s: float = HEARTBEAT_S) -> None:
        self._thread = threading.Thread(
            target=self._beat, args=(every_s,), name="bigscale-lease", daemon=True
        )
        self._thread.start()

    def _beat(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            current = read_holder(self.path)
            if current is None or current.token != self.holder.token:
                # Taken over (this process looked dead to someone) or removed by hand: writing
                # now would steal it back; the run goes on and the log says so.
                log.warning("the lease %s is no longer this run's; not refreshing it", self.path)
                return
            self.holder.heartbeat = time.time()
            with contextlib.suppress(OSError):
                _write_replace(self.path, self.holder)

    def keep(self) -> None:
        """Stop refreshing but leave the lease: a requeued Slurm job comes back to it, and while
        the job waits in the queue, no other run may take the directory."""
        self._stop.set()
        self._kept = True

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._kept:
            return
        current = read_holder(self.path)
        if current is not None and current.token == self.holder.token:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            for directory in self.created_dirs:
                try:
                    directory.rmdir()  # only if empty
                except OSError:
                    break


def acquire(run_dir: Path, job: str | None = None) -> Lease:
    """Take the run directory (creating it) for this process, or raise ``RunDirBusyError`` naming
    the live holder. ``job``: the Slurm job id, when the holder is a job's rank 0."""
    run_dir = Path(run_dir)
    created = [d for d in (run_dir, *run_dir.parents) if not d.exists()]
    run_dir.mkdir(parents=True, exist_ok=True)
    me = Holder.me(job)
    path = run_dir / LEASE_FILE
    for _ in range(3):  # lost races against another taker are retried, then refused
        if _link_new(path, me):
            held = Lease(run_dir, me)
            held.created_dirs = created
            return held
        current = read_holder(path)
        if current is None:
            continue  # released meanwhile, or unreadable: see below
        if job and current.job == job:
            # The same Slurm job again: a requeue or a torchrun restart of its ranks.
            me.since = current.since
            _write_replace(path, me)
            return Lease(run_dir, me, f"lease: Slurm job {job} continues in {run_dir} (requeued)")
        if holder_alive(current):
            raise RunDirBusyError(busy_message(run_dir, current))
        if _take_over(path, current, me):
            note = f"lease: took over {run_dir} from a run that is gone ({current.describe()})"
            return Lease(run_dir, me, note)
    _refuse_unreadable(path)
    raise RunDirBusyError(f"{run_dir} is being claimed by another job at this moment; try again")


def check_free(run_dir: Path) -> None:
    """Raise ``RunDirBusyError`` if a live holder has the run directory (a Slurm submission
    checks before writing its job script; the job takes the lease when it starts)."""
    current = read_holder(Path(run_dir) / LEASE_FILE)
    if current is not None and holder_alive(current):
        raise RunDirBusyError(busy_message(Path(run_dir), current))


def busy_message(run_dir: Path, holder: Holder) -> str:
    cancel = f"scancel {holder.job}" if holder.job else f"kill {holder.pid} on {holder.host}"
    return (
        f"run_dir {run_dir} is in use by another run ({holder.describe()}); two runs in one "
        f"directory would overwrite each other's checkpoints. Wait for it to end (or stop it: "
        f"{cancel}) and run the same command again to resume, or choose another run_dir"
    )


def read_holder(path: Path) -> Holder | None:
    try:
        data = json.loads(path.read_text())
        return Holder(**data)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError):
        return None


def holder_alive(holder: Holder) -> bool:
    if holder.job:
        active = slurm_job_active(holder.job)
        if active is not None:
            return active
    if holder.host == socket.gethostname():
        return _pid_alive(holder.pid, holder.pid_start)
    return time.time() - holder.heartbeat < STALE_S


def slurm_job_active(job: str) -> bool | None:
    """Whether Slurm still has the job queued or running; None where Slurm cannot tell (no
    ``squeue`` here, or the controller did not answer)."""
    squeue = shutil.which("squeue")
    if squeue is None:
        return None
    try:
        proc = subprocess.run(
            [squeue, "-h", "-j", job, "-o", "%T"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        # squeue fails for a job id it no longer knows; anything else is "cannot tell".
        return False if "Invalid job id" in proc.stderr else None
    states = {s.strip() for s in proc.stdout.split()}
    return bool(states & _ACTIVE_SLURM_STATES)


def _pid_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, another user's
    return start is None or _pid_start(pid) in (None, start)


def _pid_start(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22, counted after the command name, which may itself hold spaces and parentheses.
    return stat.rsplit(")", 1)[1].split()[19]


def _private_copy(path: Path, holder: Holder) -> Path:
    tmp = path.with_name(f".{path.name}.{holder.token}.{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(asdict(holder), f)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def _link_new(path: Path, holder: Holder) -> bool:
    tmp = _private_copy(path, holder)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink()


def _write_replace(path: Path, holder: Holder) -> None:
    os.replace(_private_copy(path, holder), path)


def _take_over(path: Path, dead: Holder, me: Holder) -> bool:
    """Move the dead holder's lease aside and link ours. Two takers racing: only one moves the
    dead lease (the other's rename fails or moves the winner's, which it puts back)."""
    aside = path.with_name(f".{path.name}.dead.{me.token}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return _link_new(path, me)
    moved = read_holder(aside)
    if moved is None or moved.token != dead.token:
        # Not the lease judged dead: another taker's fresh one. Put it back untouched.
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)
        aside.unlink()
        return False
    aside.unlink()
    return _link_new(path, me)


def _refuse_unreadable(path: Path) -> None:
    if path.exists() and read_holder(path) is None:
        raise RunDirBusyError(
            f"{path} exists but is not a bigscale lease this version can read; if no run uses "
            "this directory, delete the file and run the same command again"
        )
