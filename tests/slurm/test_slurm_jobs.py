"""bigscale on a real Slurm: `bigscale train launcher=slurm` submits a job that trains and
finishes; a job warned with SIGUSR1 (what `--signal` sends before the time limit) checkpoints,
requeues itself, resumes from that step into the same W&B run and ends with the same losses as
the uninterrupted job; the requeue cap is respected. A DPO job requeued the same way resumes
exactly from the reference table its first attempt computed, without a second reference pass."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bigscale.data.tasks import arithmetic_rows
from tests.cli import QUICK, env_for, explain, train_rows
from tests.slurm.cluster import SlurmCluster

# W&B offline in every job, so the runs compared step by step are set up identically.
JOB = [*[q for q in QUICK if not q.startswith("logger=")], "logger=wandb", "logger.mode=offline"]


def _submit(
    cluster: SlurmCluster,
    home: Path,
    cwd: Path,
    run_dir: Path,
    *extra: str,
    env: dict[str, str] | None = None,
    base: list[str] = JOB,
) -> str:
    args = ["train", "launcher=slurm", "launcher.nproc_per_node=2", f"run_dir={run_dir}"]
    proc = subprocess.run(
        [sys.executable, "-m", "bigscale.cli", *args, *base, *extra],
        cwd=cwd,
        env={**env_for(home), **cluster.env, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, explain(proc)
    for sentinel in SENTINELS:
        assert sentinel not in proc.stdout + proc.stderr, sentinel
    found = re.search(r"submitted Slurm job (\d+)\nlog +(\S+)", proc.stdout)
    assert found, proc.stdout
    assert Path(found[2]) == run_dir / f"slurm-{found[1]}.out"
    return found[1]


def _wait_for_checkpoint(cluster: SlurmCluster, job: str, run_dir: Path, tag: str) -> None:
    latest = run_dir / "checkpoints" / "latest"
    cluster.wait_for(
        lambda: latest.is_file() and latest.read_text().strip() == tag,
        timeout=300,
        what=lambda: f"{tag} of job {job} ({cluster.state(job)})",
    )


def _slurm_log(run_dir: Path, job: str) -> str:
    return (run_dir / f"slurm-{job}.out").read_text()


def _warn_and_requeue(cluster: SlurmCluster, job: str, run_dir: Path) -> tuple[str, re.Match]:
    """SIGUSR1 to a running job (what ``--signal`` sends before the time limit): it must stop
    between steps 8 and 24 with a checkpoint, requeue once and complete. Returns its log and the
    match of the stop line."""
    cluster.run(["scancel", "--signal=USR1", job])
    state = cluster.wait_job(job, timeout=400)
    log = _slurm_log(run_dir, job)
    assert state == "COMPLETED", (state, log[-6000:])
    assert cluster.restarts(job) == 1
    stopped = re.search(r"stopped at step (\d+) on SIGUSR1: checkpoint saved; requeued", log)
    assert stopped, log[-6000:]
    assert 8 <= int(stopped[1]) < 24
    return log, stopped


def _fields(run_dir: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in train_rows(run_dir)]


# The uninterrupted job also carries secrets in its overrides: a token-shaped tag and the value
# of a secret-named variable. The script in the run directory must not hold them, yet the job
# must get them (from the environment sbatch saved: the script stops at once when they are not
# there).
SENTINELS = ["sk-live-SENTINEL123", "envkeySENTINEL321"]
SECRET_ARGS = [f"logger.tags=[{SENTINELS[0]}]", f"logger.group=g-{SENTINELS[1]}"]


@pytest.fixture(scope="module")
def straight(slurm_cluster: SlurmCluster, bigscale_home: Path, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("slurm_straight")
    run_dir = work / "run"
    job = _submit(
        slurm_cluster,
        bigscale_home,
        work,
        run_dir,
        *SECRET_ARGS,
        env={"MY_API_KEY": SENTINELS[1]},
    )
    state = slurm_cluster.wait_job(job, timeout=400)
    assert state == "COMPLETED", (state, _slurm_log(run_dir, job)[-6000:])
    return run_dir


def test_submitted_job_trains_to_the_end(straight: Path) -> None:
    assert [r["step"] for r in train_rows(straight)] == list(range(2, 25, 2))
    assert (straight / "export" / "model.safetensors").is_file()
    assert (straight / "train.sbatch").is_file() and (straight / "node.sh").is_file()


def test_secret_overrides_reach_the_job_but_no_file(straight: Path) -> None:
    script = (straight / "train.sbatch").read_text()
    assert "BIGSCALE_SECRET_OVERRIDE_" in script  # read from the job's environment
    files = [p for p in straight.rglob("*") if p.is_file()]  # slurm-*.out and W&B's included
    for sentinel in SENTINELS:
        leaked = [p for p in files if sentinel.encode() in p.read_bytes()]
        assert not leaked, (sentinel, leaked)


def test_warned_job_checkpoints_requeues_and_resumes_exactly(
    slurm_cluster: SlurmCluster, straight: Path, bigscale_home: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    # With the secret overrides too: the requeued attempt gets them from the saved environment.
    job = _submit(
        slurm_cluster,
        bigscale_home,
        tmp_path,
        run_dir,
        *SECRET_ARGS,
        env={"MY_API_KEY": SENTINELS[1]},
    )
    _wait_for_checkpoint(slurm_cluster, job, run_dir, "step_00000008")
    log, stopped = _warn_and_requeue(slurm_cluster, job, run_dir)
    step = int(stopped[1])
    assert re.search(rf"resumed from \S+step_{step:08d} at step {step}\b", log), log[-6000:]
    # The requeued job is the run directory's owner still (the same job id), and let it go at
    # the end.
    assert f"lease: Slurm job {job} continues in {run_dir} (requeued)" in log, log[-6000:]
    assert not (run_dir / "lease.json").exists()
    assert _fields(run_dir) == _fields(straight)
    # One W&B run across both attempts: every local W&B directory carries the same run id.
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    attempts = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(attempts) == 2 and all(p.name.endswith(f"-{run_id}") for p in attempts), attempts


def test_requeue_cap_is_respected(
    slurm_cluster: SlurmCluster, bigscale_home: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    job = _submit(slurm_cluster, bigscale_home, tmp_path, run_dir, "launcher.max_requeues=0")
    _wait_for_checkpoint(slurm_cluster, job, run_dir, "step_00000008")
    slurm_cluster.run(["scancel", "--signal=USR1", job])
    state = slurm_cluster.wait_job(job, timeout=300)
    log = _slurm_log(run_dir, job)
    assert state == "COMPLETED", (state, log[-6000:])
    time.sleep(1)  # a requeue, had there been one, shows within the scheduler's interval
    assert slurm_cluster.restarts(job) == 0
    assert "has been requeued 0 time(s), launcher.max_requeues=0" in log, log[-6000:]
    assert not (run_dir / "export").exists()  # stopped early, not finished


# DPO on a small file of pairs (an answer preferred over the same answer badly formatted), on
# QUICK's steps without W&B: the claim is the reference table across a requeue, not logging.
DPO = [
    "objective=dpo",
    "strategy=ddp",
    "optim.lr=1e-3",
    "data=preference_files",
    "data.max_length=16",
    "objective.reference_batch_size=16",
]


@pytest.fixture(scope="module")
def dpo_args(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    work = tmp_path_factory.mktemp("slurm_dpo_data")
    rows = arithmetic_rows(seed=3)
    for name, part in (("train", rows[:256]), ("validation", rows[256:320])):
        pairs = [
            {"prompt": r["prompt"], "chosen": r["response"], "rejected": f"{r['response']}!?"}
            for r in part
        ]
        (work / f"{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return [
        *DPO,
        f"data.path={work / 'train.jsonl'}",
        f"data.validation_path={work / 'validation.jsonl'}",
    ]


@pytest.fixture(scope="module")
def dpo_straight(
    slurm_cluster: SlurmCluster, bigscale_home: Path, tmp_path_factory, dpo_args: list[str]
) -> Path:
    # A directory of its own: the reference table is cached beside the run directories
    # (<run_dir>/../.tokenized), and the warned job must compute its own.
    work = tmp_path_factory.mktemp("slurm_dpo_straight")
    run_dir = work / "run"
    job = _submit(slurm_cluster, bigscale_home, work, run_dir, *dpo_args, base=QUICK)
    state = slurm_cluster.wait_job(job, timeout=400)
    assert state == "COMPLETED", (state, _slurm_log(run_dir, job)[-6000:])
    return run_dir


def _reference_tables(cache: Path) -> dict[Path, int]:
    """The cached reference tables and when each was written."""
    return {p: p.stat().st_mtime_ns for p in cache.rglob("*.pt") if p.parent.name == "reference"}


def _dpo_fields(run_dir: Path) -> list[tuple]:
    keys = ("step", "loss", "grad_norm", "lr", "rewards/margin", "logps/chosen", "logps/rejected")
    return [tuple(r[k] for k in keys) for r in train_rows(run_dir)]


def test_requeued_dpo_job_resumes_exactly_without_a_second_reference_pass(
    slurm_cluster: SlurmCluster,
    dpo_straight: Path,
    dpo_args: list[str],
    bigscale_home: Path,
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    job = _submit(slurm_cluster, bigscale_home, tmp_path, run_dir, *dpo_args, base=QUICK)
    _wait_for_checkpoint(slurm_cluster, job, run_dir, "step_00000008")
    tables = _reference_tables(tmp_path / ".tokenized")
    assert len(tables) == 2, tables  # the training and the validation pairs'
    log, stopped = _warn_and_requeue(slurm_cluster, job, run_dir)
    step = int(stopped[1])
    first, second = log[: stopped.end()], log[stopped.end() :]
    assert re.search(rf"resumed from \S+step_{step:08d} at step {step}\b", second), log[-6000:]
    # The first attempt scored the pairs; the requeued one read that table and scored nothing.
    assert "reference pass: 256 train pairs scored" in first, first[-6000:]
    assert "reference pass:" not in second, second[-6000:]
    assert "reference log-probs of the train pairs read from" in second, second[-6000:]
    assert _reference_tables(tmp_path / ".tokenized") == tables
    assert _dpo_fields(run_dir) == _dpo_fields(dpo_straight)
