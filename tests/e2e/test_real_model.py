"""A real pretrained model (SmolLM2-135M-Instruct from the packaged GGUF file) fine-tuned with
LoRA on 2 ranks: the held-out metric rises, and the merged export is a plain Hugging Face model
that keeps the chat template and answers. (The full fine-tune is the default job's test.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli import bigscale, explain, metrics

pytestmark = pytest.mark.e2e

LORA = [
    "experiment=demo",
    "finetune=lora",
    "optim.lr=2e-3",
    "trainer.max_steps=16",
    "trainer.log_every=4",
    "trainer.eval_batches=2",
    "trainer.progress_bar=false",
    "eval.max_examples=40",
    "eval.sample_prompts=[]",
    "export.merge_lora=true",
    "logger=disabled",
]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory, bigscale_home: Path):
    work = tmp_path_factory.mktemp("lora_real")
    run_dir = work / "run"
    proc = bigscale(
        ["train", *LORA, f"run_dir={run_dir}"], cwd=work, home=bigscale_home, timeout=1200
    )
    assert proc.returncode == 0, explain(proc)
    return run_dir


def test_lora_raises_the_held_out_metric(lora_run: Path) -> None:
    final = metrics(lora_run)[-1]
    assert final["final/exact_match_after"] > final["final/exact_match_before"] + 0.2


def test_merged_export_loads_in_plain_transformers_and_answers(lora_run: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export = lora_run / "export"
    model = AutoModelForCausalLM.from_pretrained(export)
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert type(model).__name__ == "LlamaForCausalLM"
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>assistant\n")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
