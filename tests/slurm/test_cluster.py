"""The test cluster is a real one: multi-task steps, requeue that restarts within seconds, signals
that reach step tasks, and a stop() that leaves nothing running."""

from __future__ import annotations

from pathlib import Path

from tests.slurm.cluster import SlurmCluster, _pids_with_env, start_cluster


def test_two_task_step_runs_on_the_node(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    job = slurm_cluster.sbatch(
        [
            "--ntasks=2",
            f"--output={tmp_path / 'out'}",
            "--wrap",
            "srun bash -c 'echo $SLURM_PROCID $SLURM_NODEID $SLURM_JOB_NODELIST'",
        ],
        cwd=tmp_path,
    )
    assert slurm_cluster.wait_job(job, timeout=30) == "COMPLETED", slurm_cluster.job(job)
    node = slurm_cluster.node
    lines = sorted((tmp_path / "out").read_text().splitlines())
    assert lines == [f"0 0 {node}", f"1 0 {node}"]


REQUEUE_SELF = """\
#!/bin/bash
date +%s.%N >> starts
if [ -z "${SLURM_RESTART_COUNT:-}" ]; then
    scontrol requeue "$SLURM_JOB_ID"
    sleep 120
else
    echo "$SLURM_RESTART_COUNT" > restarted
fi
"""


def test_requeued_job_restarts_promptly(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    script = tmp_path / "job.sh"
    script.write_text(REQUEUE_SELF)
    job = slurm_cluster.sbatch(["--requeue", f"--output={tmp_path / 'out'}", str(script)], tmp_path)
    assert slurm_cluster.wait_job(job, timeout=60) == "COMPLETED", slurm_cluster.job(job)
    assert slurm_cluster.restarts(job) == 1
    assert (tmp_path / "restarted").read_text().strip() == "1"
    first, second = (float(t) for t in (tmp_path / "starts").read_text().split())
    # Slurm's own defaults hold a requeued job for 2 minutes.
    assert second - first < 20, f"requeued job restarted after {second - first:.1f}s"


TRAP_USR1 = """\
trap 'echo got $SLURM_PROCID >> got; exit 0' USR1
touch ready.$SLURM_PROCID
while true; do sleep 0.2; done
"""


def test_signal_reaches_step_tasks(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    (tmp_path / "task.sh").write_text(TRAP_USR1)
    job = slurm_cluster.sbatch(
        [
            "--ntasks=2",
            f"--output={tmp_path / 'out'}",
            "--wrap",
            "srun bash task.sh; echo step exited $?",
        ],
        cwd=tmp_path,
    )
    slurm_cluster.wait_for(
        lambda: all((tmp_path / f"ready.{rank}").exists() for rank in (0, 1)),
        timeout=30,
        what=lambda: f"both tasks to set their trap; job: {slurm_cluster.job(job)}",
    )
    # Without --batch or --full scancel signals the job's steps, not the batch shell, which
    # would die of USR1.
    slurm_cluster.run(["scancel", "--signal=USR1", job])
    assert slurm_cluster.wait_job(job, timeout=30) == "COMPLETED", slurm_cluster.job(job)
    assert sorted((tmp_path / "got").read_text().splitlines()) == ["got 0", "got 1"]
    assert "step exited 0" in (tmp_path / "out").read_text()


def test_stop_leaves_no_process_behind(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """A second cluster next to the session's one; its job ignores SIGTERM."""
    other = start_cluster(tmp_path / "cluster")
    marker = f"SLURM_CONF={other.conf}"
    try:
        job = other.sbatch(
            ["--output=/dev/null", "--wrap", "trap '' TERM; srun sleep 300"], cwd=tmp_path
        )
        other.wait_state(job, {"RUNNING"}, timeout=30)
        other.wait_for(lambda: len(_pids_with_env(marker)) > 4, 10, "the job's processes")
    finally:
        other.stop()
    assert _pids_with_env(marker) == []
    # The session's cluster was left alone.
    assert slurm_cluster.run(["sinfo", "--noheader", "--format=%t"]).stdout.split() == ["idle"]
