"""Requeueing a stopped Slurm job from rank 0. The real ``scontrol`` against a real controller is
exercised by ``tests/slurm``; here a script stands in for it to force the race that one run in CI
hit by chance: the requeue ends the job step with SIGTERM, which reaches ``scontrol`` itself."""

from __future__ import annotations

import os
import signal
import stat
from pathlib import Path

from bigscale.train.preemption import requeue_slurm_job


def _scontrol(bin_dir: Path, body: str) -> dict[str, str]:
    bin_dir.mkdir()
    script = bin_dir / "scontrol"
    script.write_text(f"#!/bin/bash\n{body}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "41",
        "SLURM_RESTART_COUNT": "1",
    }


def test_scontrol_hit_by_the_requeues_own_sigterm_still_reports_the_requeue(
    tmp_path: Path,
) -> None:
    # The controller has accepted the requeue; then the job step's SIGTERM arrives before exit 0.
    env = _scontrol(tmp_path / "bin", 'echo "$@" > "$(dirname "$0")/args"; kill -TERM $$; exit 0')
    before = signal.getsignal(signal.SIGTERM)
    message = requeue_slurm_job(3, env)
    assert message == "requeued Slurm job 41 (requeue 2 of at most 3)", message
    assert (tmp_path / "bin" / "args").read_text().split() == ["requeue", "41"]
    assert signal.getsignal(signal.SIGTERM) is before  # this process's own handler is back


def test_a_refused_requeue_names_the_reason_and_the_way_to_resume(tmp_path: Path) -> None:
    env = _scontrol(tmp_path / "bin", 'echo "Job is not requeueable" >&2; exit 1')
    message = requeue_slurm_job(3, env)
    assert "scontrol requeue 41 failed (Job is not requeueable)" in message
    assert "resubmit the same command to resume" in message


def test_the_requeue_limit_is_kept_without_calling_scontrol(tmp_path: Path) -> None:
    env = _scontrol(tmp_path / "bin", 'touch "$(dirname "$0")/called"; exit 0')
    message = requeue_slurm_job(1, env)
    assert message.startswith("not requeued: job 41 has been requeued 1 time(s)"), message
    assert not (tmp_path / "bin" / "called").exists()
