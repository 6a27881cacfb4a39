"""``eval.harness.tasks`` during a 2-rank LoRA run under ZeRO-2: a local multiple-choice task
(offline) scored on rank 0 at every evaluation on the live model, its scores in every
evaluation row of metrics.jsonl and in ``RUN_DIR/eval/``, and early stopping watching one of
them accepted and judged."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.cli import bigscale, explain, metrics
from tests.e2e.test_eval_report import OFFLINE, write_tasks
from tests.e2e.test_multirun_and_entrypoints import quick

pytestmark = pytest.mark.e2e


def test_harness_scores_every_evaluation(tmp_path: Path, bigscale_home: Path) -> None:
    write_tasks(tmp_path / "tasks")
    run_dir = tmp_path / "run"
    args = quick(
        "strategy=zero2",
        "finetune=lora",
        "trainer.max_steps=6",
        "trainer.eval_every=2",
        "checkpoint.every_steps=0",
        "optim.warmup_steps=1",
        "eval.exact_match=false",
        "export.at_end=false",
        "eval.harness.tasks=[bs_mc]",
        f"eval.harness.include_path=[{tmp_path / 'tasks'}]",
        "eval.early_stopping.metric=harness/bs_mc/acc",
        "eval.early_stopping.patience=5",  # judged at each evaluation, never reached here
        f"run_dir={run_dir}",
    )
    proc = bigscale(["train", *args], cwd=tmp_path, home=bigscale_home, extra_env=OFFLINE)
    assert proc.returncode == 0, explain(proc)
    assert re.search(r"(?m)^ranks\s+2\b", proc.stdout), proc.stdout

    evals = [r for r in metrics(run_dir) if "eval_loss" in r and "final/eval_loss" not in r]
    harness = [r for r in evals if "harness/bs_mc/acc" in r]
    assert [r["step"] for r in harness] == [2, 4], evals
    for row in harness:
        # 6 questions: a share of them, and acc_norm beside acc, as lm-eval names its scores.
        assert row["harness/bs_mc/acc"] * 6 == pytest.approx(round(row["harness/bs_mc/acc"] * 6))
        assert 0.0 <= row["harness/bs_mc/acc_norm"] <= 1.0
    saved = sorted((run_dir / "eval").glob("step_*.json"))
    assert [json.loads(p.read_text())["step"] for p in saved] == [2, 4]
    for path, row in zip(saved, harness, strict=True):
        scores = json.loads(path.read_text())["results"]["bs_mc"]
        assert scores["acc,none"] == row["harness/bs_mc/acc"]
    # Early stopping judged the score: its state rides in the final checkpoint's metadata.
    meta = json.loads((run_dir / "checkpoints" / "step_00000006" / "meta.json").read_text())
    assert meta["early_stopping"]["metric"] == "harness/bs_mc/acc"
    assert meta["early_stopping"]["best"] == max(r["harness/bs_mc/acc"] for r in harness)
