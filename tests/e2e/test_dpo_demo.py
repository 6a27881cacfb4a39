"""The DPO demo (``bigscale train experiment=dpo_demo``) on the real model, shortened: SmolLM2-135M-
Instruct from the packaged GGUF file, 2 ranks, ZeRO-2, preference-tuned on the dates pairs. The
suite's one real-model DPO run: held-out preference accuracy rises, the before/after exact match
is reported, and the run ends with an export that plain transformers loads.

The 8 steps read 64 pairs, so the training file is cut to those 64: the reference pass scores
the whole training split before step 1, and on a CPU without bf16 units the demo's 256 pairs
cost minutes of forwards the steps never use."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli import bigscale, explain, metrics

pytestmark = pytest.mark.e2e

SHORT = [
    "experiment=dpo_demo",
    "trainer.max_steps=8",
    "trainer.eval_every=2",
    "trainer.eval_batches=2",  # 16 held-out pairs per evaluation
    "trainer.progress_bar=false",
    "eval.max_examples=20",
    "logger=disabled",
]


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory: pytest.TempPathFactory, bigscale_home: Path, smollm2_dir: Path):
    # smollm2_dir: the model converted once per session, shared with the other real-model tests.
    from bigscale.data.preference_task import write_pairs_task

    work = tmp_path_factory.mktemp("dpo_demo")
    pairs = [work / f"{split}.jsonl" for split in ("train", "validation", "test")]
    write_pairs_task("dates", *pairs, seed=0)  # what data=dates_pairs generates
    train = pairs[0].read_text().splitlines(keepends=True)
    assert len(train) == 256
    pairs[0].write_text("".join(train[:64]))
    files = [
        f"data.{key}={path}"
        for key, path in zip(("path", "validation_path", "test_path"), pairs, strict=True)
    ]
    run_dir = work / "run"
    proc = bigscale(
        ["train", *SHORT, "data.generate=null", *files, f"run_dir={run_dir}"],
        cwd=work,
        home=bigscale_home,
        timeout=1200,
    )
    assert proc.returncode == 0, explain(proc)
    return proc, run_dir


def test_held_out_preference_accuracy_rises(dpo_run) -> None:
    proc, run_dir = dpo_run
    assert "reference pass: 64 train pairs scored by the initial model" in proc.stderr
    evals = [r for r in metrics(run_dir) if "eval_rewards/accuracy" in r]
    assert [r["step"] for r in evals] == [2, 4, 6, 8]
    first, last = evals[0], evals[-1]
    # Before step 1 the policy is the reference: every implicit reward is 0 and no pair counts
    # as won, so any share above 0 is learned; the margin keeps widening after the first eval.
    assert last["eval_rewards/accuracy"] >= 0.8
    assert last["eval_rewards/accuracy"] >= first["eval_rewards/accuracy"]
    assert last["eval_rewards/margin"] > first["eval_rewards/margin"] > 0
    assert last["eval_rewards/chosen"] > last["eval_rewards/rejected"]


def test_reports_exact_match_before_and_after_and_exports(dpo_run) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    proc, run_dir = dpo_run
    assert "held-out exact match before training" in proc.stderr
    assert "held-out exact match after training" in proc.stderr
    final = metrics(run_dir)[-1]
    assert {"final/exact_match_before", "final/exact_match_after"} <= set(final)
    export = run_dir / "export"
    model = AutoModelForCausalLM.from_pretrained(export)
    tokenizer = AutoTokenizer.from_pretrained(export)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer  # preference-tuned on dates, still the chat model it was
