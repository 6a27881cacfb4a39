"""The other ways in: a Hydra sweep (``bigscale train -m``), ``bigscale plan``, the rank entry
under a user's own torchrun, and ``bigscale --help``."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest
import yaml

from tests.cli import QUICK, bigscale, explain, torchrun, train_rows
from tests.wandb_log import run_record

pytestmark = pytest.mark.e2e


def quick(*changes: str) -> list[str]:
    """QUICK with some keys replaced."""
    keys = {c.split("=", 1)[0] for c in changes}
    return [o for o in QUICK if o.split("=", 1)[0] not in keys] + list(changes)


# Four steps, no held-out exact match, no export: only the plumbing is under test.
SHORT = quick(
    "trainer.max_steps=4",
    "trainer.log_every=2",
    "trainer.eval_every=0",
    "optim.warmup_steps=1",
    "eval.exact_match=false",
    "export.at_end=false",
)


def test_sweep_runs_each_job_in_its_own_run_dir(tmp_path: Path, bigscale_home: Path) -> None:
    sweep = tmp_path / "sweep"
    sweep_args = ["-m", "optim.lr=1e-3,3e-3", "launcher.nproc_per_node=1", f"run_dir={sweep}"]
    with_wandb = [o for o in SHORT if o != "logger=disabled"] + ["logger.mode=offline"]
    proc = bigscale(["train", *sweep_args, *with_wandb], cwd=tmp_path, home=bigscale_home)
    assert proc.returncode == 0, explain(proc)
    jobs = sorted(p for p in sweep.iterdir() if (p / "config.yaml").is_file())
    assert len(jobs) == 2, sorted(p.name for p in sweep.iterdir())
    configs = [yaml.safe_load((job / "config.yaml").read_text()) for job in jobs]
    assert [c["optim"]["lr"] for c in configs] == [pytest.approx(1e-3), pytest.approx(3e-3)]
    assert [c["run_dir"] for c in configs] == [str(job.resolve()) for job in jobs]
    groups = {c["logger"]["group"] for c in configs}
    assert len(groups) == 1 and None not in groups, groups
    # One W&B run per job (its own id and name, the job's run dir name), all in the one group.
    run_ids = [(job / "wandb_run_id").read_text().strip() for job in jobs]
    assert len(set(run_ids)) == 2, run_ids
    for job, run_id in zip(jobs, run_ids, strict=True):
        (log,) = (job / "wandb").glob(f"offline-run-*/run-{run_id}.wandb")
        run = run_record(log)
        assert (run.run_id, run.display_name, run.run_group) == (run_id, job.name, *groups)

    rows = [train_rows(job) for job in jobs]
    for job_rows in rows:
        assert [r["step"] for r in job_rows] == [2, 4]
    # The swept value is what trained: same schedule, three times the learning rate.
    assert rows[1][0]["lr"] == pytest.approx(3 * rows[0][0]["lr"])


def test_plan_prints_batch_math_and_the_exact_command(tmp_path: Path, bigscale_home: Path) -> None:
    run_dir = tmp_path / "run"
    proc = bigscale(["plan", f"run_dir={run_dir}"], cwd=tmp_path, home=bigscale_home)
    assert proc.returncode == 0, explain(proc)
    lines = proc.stdout.splitlines()
    batch = next(line for line in lines if line.startswith("batch"))
    assert "4 micro x 1 accum x 2 ranks = 8 sequences/step" in batch, batch  # the demo's
    assert "experiment      demo" in lines
    command = next(line for line in lines if line.startswith("command"))
    expected = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    expected += ["--nproc_per_node", "2", "-m", "bigscale.train", f"run_dir={run_dir.resolve()}"]
    assert shlex.split(command.removeprefix("command")) == expected, command
    assert not run_dir.exists(), "plan must not create the run directory or train"


def test_users_own_torchrun_agrees_on_one_run_dir(tmp_path: Path, bigscale_home: Path) -> None:
    """No run_dir and no launcher: rank 0 names the timestamped directory and the other rank
    writes into the same one."""
    proc = torchrun(2, SHORT, cwd=tmp_path, home=bigscale_home)
    assert proc.returncode == 0, explain(proc)
    experiment = tmp_path / "outputs" / "arithmetic"
    runs = [p for p in experiment.iterdir() if not p.name.startswith(".")]  # .tokenized: cache
    assert len(runs) == 1, sorted(p.name for p in experiment.iterdir())
    assert (runs[0] / "train.log").is_file()
    assert [r["step"] for r in train_rows(runs[0])] == [2, 4]


def test_help_lists_the_commands(tmp_path: Path, bigscale_home: Path) -> None:
    proc = bigscale(["--help"], cwd=tmp_path, home=bigscale_home)
    assert proc.returncode == 0, explain(proc)
    for command in ("bigscale train", "bigscale plan", "bigscale export"):
        assert command in proc.stdout, proc.stdout
