"""Hydra's Optuna sweeper over bigscale (``python -m bigscale.sweep``): each trial is one real
training through the normal launcher, in its own run directory, and the study's best value is
a trial's final eval_loss."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.cli import env_for, explain
from tests.e2e.test_multirun_and_entrypoints import SHORT

pytestmark = pytest.mark.e2e


def test_two_trial_study_returns_a_trials_final_eval_loss(
    tmp_path: Path, bigscale_home: Path
) -> None:
    study = tmp_path / "study"
    args = [
        "-m",
        "hydra/sweeper=optuna",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.seed=0",
        f"hydra.sweep.dir={study}",
        "optim.lr=tag(log, interval(1e-4, 1e-2))",
        "launcher.nproc_per_node=1",
        *SHORT,
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "bigscale.sweep", *args],
        cwd=tmp_path,
        env=env_for(bigscale_home),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, explain(proc)

    trials = sorted(p for p in study.iterdir() if (p / "config.yaml").is_file())
    assert [t.name for t in trials] == ["0", "1"]
    configs = [yaml.safe_load((t / "config.yaml").read_text()) for t in trials]
    assert [c["run_dir"] for c in configs] == [str(t.resolve()) for t in trials]
    assert {c["logger"]["group"] for c in configs} == {"study"}
    lrs = [c["optim"]["lr"] for c in configs]
    assert lrs[0] != lrs[1] and all(1e-4 <= lr <= 1e-2 for lr in lrs), lrs

    finals = []
    for t in trials:
        rows = [json.loads(line) for line in (t / "metrics.jsonl").read_text().splitlines()]
        finals.append(next(r["final/eval_loss"] for r in rows if "final/eval_loss" in r))
    result = yaml.safe_load((study / "optimization_results.yaml").read_text())
    best = finals.index(min(finals))
    assert result["best_value"] == pytest.approx(finals[best], rel=1e-12), (result, finals)
    assert result["best_params"]["optim.lr"] == pytest.approx(lrs[best])
