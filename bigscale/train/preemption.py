"""Stopping early on request: Slurm's SIGUSR1 before the time limit, or SIGTERM (preemption,
``scancel``, torchrun passing on its own SIGTERM).

The handler only records the signal; the training loop notices it after the current step (every
rank learns of any rank's signal through the step's all-reduce), saves a checkpoint on all ranks
and ends. Under Slurm, rank 0 then requeues the job, which resumes from that checkpoint into the
same run directory and W&B run."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator

from bigscale.logging import get_logger

log = get_logger(__name__)

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopSignals:
    """Records the first stop signal this process receives."""

    def __init__(self) -> None:
        self.received: int = 0
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                signal.signal(sig, self._record)

    def _record(self, signum: int, _frame: object) -> None:
        self.received = self.received or signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name if signum > 0 else "a stop signal on another rank"


def requeue_slurm_job(max_requeues: int, environ: dict[str, str] | None = None) -> str:
    """Requeue this Slurm job (rank 0 only, after the checkpoint is complete) unless it has been
    requeued ``max_requeues`` times already. Returns what happened, for the log."""
    env = os.environ if environ is None else environ
    job = env.get("SLURM_JOB_ID")
    if not job:
        return "not a Slurm job: run the same command again to resume"
    restarts = int(env.get("SLURM_RESTART_COUNT", "0") or 0)
    if restarts >= max_requeues:
        return (
            f"not requeued: job {job} has been requeued {restarts} time(s), "
            f"launcher.max_requeues={max_requeues}; resubmit the same command to resume"
        )
    scontrol = shutil.which("scontrol", path=env.get("PATH"))
    if scontrol is None:
        return (
            f"could not requeue job {job}: scontrol is not on PATH on this node; resubmit the "
            "same command to resume"
        )
    with _sigterm_ignored():
        proc = subprocess.run(
            [scontrol, "requeue", job], capture_output=True, text=True, check=False, env=dict(env)
        )
    if proc.returncode != 0:
        return (
            f"scontrol requeue {job} failed ({proc.stderr.strip() or proc.returncode}); "
            "resubmit the same command to resume"
        )
    return f"requeued Slurm job {job} (requeue {restarts + 1} of at most {max_requeues})"


@contextlib.contextmanager
def _sigterm_ignored() -> Iterator[None]:
    """SIGTERM ignored here and in the children started meanwhile (an ignored signal stays ignored
    across exec). The requeue that ``scontrol`` asks for ends this job step with SIGTERM to each of
    its processes, ``scontrol`` included: unprotected, it can die of its own request before it
    exits 0, and the log would call a requeue that happened a failure. This process is already
    stopping, so a SIGTERM it misses meanwhile changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)
