"""Chat SFT end to end on 2 ranks: alpaca data through a built-in template, the generation eval
at every evaluation with a user metric function, and early stopping that ends the run before
max_steps with the usual ending (final eval, checkpoint, export)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.cli import bigscale, explain, metrics
from tests.e2e.test_multirun_and_entrypoints import quick

pytestmark = pytest.mark.e2e

METRICS_MODULE = '''
def score(predictions, references):
    """A constant (so it never improves) and how many answers came back from all ranks."""
    assert all(isinstance(p, str) for p in predictions)
    return {"constant": 0.5, "answered": float(len(predictions))}
'''


def alpaca_rows(numbers: range) -> list[dict]:
    return [
        {"instruction": "Add the numbers.", "input": f"{i}+{i % 7}", "output": str(i + i % 7)}
        for i in numbers
    ]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_alpaca_chat_run_stops_early_on_a_metric_fn(tmp_path: Path, bigscale_home: Path) -> None:
    (tmp_path / "my_metrics.py").write_text(METRICS_MODULE)  # imported from the working dir
    run_dir = tmp_path / "run"
    args = quick(
        "data=alpaca_files",
        f"data.path={write_jsonl(tmp_path / 'train.jsonl', alpaca_rows(range(10, 170)))}",
        f"data.test_path={write_jsonl(tmp_path / 'test.jsonl', alpaca_rows(range(200, 212)))}",
        "data.validation_fraction=0.1",
        "data.max_length=96",
        "data.chat_template=chatml",
        "trainer.max_steps=12",
        "trainer.eval_every=2",
        "checkpoint.every_steps=0",
        "optim.warmup_steps=1",
        "eval.during_training=true",
        # ZeRO-3's synced generation with the text end-of-turn marker the tiny model spells
        # in characters, and the budget sized from the test set.
        "strategy=zero3",
        "eval.metric_fn=my_metrics:score",
        "eval.early_stopping.metric=constant",
        "eval.early_stopping.patience=1",
        f"run_dir={run_dir}",
    )
    proc = bigscale(["train", *args], cwd=tmp_path, home=bigscale_home)
    assert proc.returncode == 0, explain(proc)
    assert re.search(r"(?m)^ranks\s+2\b", proc.stdout), proc.stdout  # 2 ranks under torchrun

    rows = metrics(run_dir)
    # The first evaluation sets the best value; the second cannot beat it: stop at step 4.
    evals = [r for r in rows if "constant" in r]
    assert [r["step"] for r in evals] == [2, 4], rows
    for r in evals:
        assert r["constant"] == 0.5 and r["answered"] == 12.0  # every example, from both ranks
        assert {"eval_loss", "eval_ppl", "exact_match"} <= set(r)
        assert 0 <= r["exact_match_budget_hits"] <= 12
    assert max(r["step"] for r in rows if "loss" in r) == 4
    (final,) = [r for r in rows if "final/early_stopped_at_step" in r]
    assert final["final/early_stopped_at_step"] == 4
    assert {"final/eval_loss", "final/constant_after", "final/exact_match_after"} <= set(final)
    # The usual ending: a final checkpoint and an export whose tokenizer carries the template.
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    exported = json.loads((run_dir / "export" / "tokenizer_config.json").read_text())
    template = exported.get("chat_template") or (run_dir / "export" / "chat_template.jinja")
    template = template if isinstance(template, str) else template.read_text()
    assert "<|im_start|>" in template
    log = (run_dir / "train.log").read_text()
    assert "early stopping at step 4: constant has not improved" in log, log[-3000:]
    # Three-digit answers, then "<|im_end|>" and a newline, one character per token.
    assert "held-out answers: up to 14 new tokens each (eval.max_new_tokens=null" in log
    assert "stopping at the end-of-turn marker '<|im_end|>'" in log
    assert re.search(r"held-out exact match after training: [\d.]+% \(\d+ of 12 answers", log)
    assert "final/exact_match_budget_hits_after" in final

    # The decision is in the checkpoint: the same command again resumes and trains no further.
    again = bigscale(["train", *args], cwd=tmp_path, home=bigscale_home)
    assert again.returncode == 0, explain(again)
    assert max(r["step"] for r in metrics(run_dir) if "loss" in r) == 4
    log = (run_dir / "train.log").read_text()
    assert "not training further: the run ended by early stopping at step 4" in log, log[-3000:]


def test_a_conversation_not_ending_with_the_assistant_fails_before_any_rank(
    tmp_path: Path, bigscale_home: Path
) -> None:
    chats = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"messages": [{"role": "user", "content": "hi"}]},
    ]
    args = [
        "model=tiny",
        "data=chat_files",
        f"data.path={write_jsonl(tmp_path / 'chats.jsonl', chats)}",
        "logger=disabled",
        f"run_dir={tmp_path / 'run'}",
    ]
    proc = bigscale(["train", *args], cwd=tmp_path, home=bigscale_home, timeout=120)
    assert proc.returncode == 2, explain(proc)
    assert "chats.jsonl:2: the conversation ends with a 'user' message" in proc.stderr
    assert not (tmp_path / "run" / "train.log").exists(), "no rank may have started"


def test_a_template_that_raises_stops_the_rank_naming_the_example(
    tmp_path: Path, bigscale_home: Path
) -> None:
    """Valid roles, so the pre-flight passes; the built-in alpaca template has no tool role and
    says so through raise_exception, which only rendering (in the rank) finds."""
    turn = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    tool = [{"role": "tool", "content": "42"}, {"role": "assistant", "content": "ok"}]
    chats = [{"messages": turn}] * 2 + [{"messages": tool}] + [{"messages": turn}] * 7
    args = [
        "model=tiny",
        "data=chat_files",
        f"data.path={write_jsonl(tmp_path / 'chats.jsonl', chats)}",
        "data.validation_fraction=0",
        "data.chat_template=alpaca",
        "launcher.nproc_per_node=1",
        "logger=disabled",
        f"run_dir={tmp_path / 'run'}",
    ]
    proc = bigscale(["train", *args], cwd=tmp_path, home=bigscale_home, timeout=180)
    assert proc.returncode == 2, explain(proc)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, explain(proc)
    assert errors[0].startswith("error: example 2: the chat template failed"), errors
    assert "the alpaca template has no tool role" in errors[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
