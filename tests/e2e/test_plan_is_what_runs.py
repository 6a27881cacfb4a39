"""`bigscale plan` prints what the ranks then do: one real 2-rank run (ZeRO-2, LoRA, a model with
tied embeddings, trainer.epochs, a user DeepSpeed JSON) is compared with the plan made for the
same command: the steps derived from the epochs, the global batch, the parameter counts, the
ZeRO stage and the JSON's own knob. A JSON that sets the ZeRO stage is refused before anything
runs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.cli import QUICK, bigscale, explain, train_rows
from tests.conftest import build_char_tokenizer

pytestmark = pytest.mark.e2e

# zero_optimization.allgather_bucket_size: a knob the user JSON may set (DeepSpeed wants it even).
KNOB = 1_234_568


def tied_model(directory: Path) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(build_char_tokenizer(directory))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, bigscale_home: Path):
    work = tmp_path_factory.mktemp("plan_is_what_runs")
    ds_json = work / "ds.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"allgather_bucket_size": KNOB}}))
    args = [
        *(o for o in QUICK if not o.startswith(("model.", "trainer.max_steps"))),
        f"model.name_or_path={tied_model(work / 'tied')}",
        "model.create_if_missing=null",
        "strategy=zero2",
        f"strategy.deepspeed_config={ds_json}",
        "finetune=lora",
        "finetune.r=4",
        "trainer.epochs=0.05",
        "eval.exact_match=false",
        "export.at_end=false",
        f"run_dir={work / 'run'}",
    ]
    plan = bigscale(["plan", *args], cwd=work, home=bigscale_home)
    assert plan.returncode == 0, explain(plan)
    train = bigscale(["train", *args], cwd=work, home=bigscale_home, timeout=900)
    assert train.returncode == 0, explain(train)
    return plan.stdout, train, work / "run"


def field(text: str, name: str) -> str:
    found = re.search(rf"^{name} +(.+)$", text, re.MULTILINE)
    assert found, text
    return found[1]


def test_ranks_train_for_the_planned_steps(run) -> None:
    plan, train, run_dir = run
    steps = field(plan, "steps")
    assert steps.split(" ", 1)[1].startswith("(from trainer.epochs=0.05:")
    assert field(train.stdout, "steps") == steps  # `bigscale train` prints the same plan
    log = (run_dir / "train.log").read_text()
    assert f"steps {steps}\n" in log  # the rank derived the same, in the same words
    assert train_rows(run_dir)[-1]["step"] == int(steps.split()[0])


def test_ranks_get_the_planned_batch_stage_and_json(run) -> None:
    plan, _, run_dir = run
    ds = json.loads((run_dir / "deepspeed_config.json").read_text())
    batch = re.search(r"= (\d+) sequences/step", field(plan, "batch"))
    assert batch and ds["train_batch_size"] == int(batch[1])
    assert f"ZeRO stage {ds['zero_optimization']['stage']}," in field(plan, "strategy")
    assert ds["zero_optimization"]["allgather_bucket_size"] == KNOB


def test_ranks_count_the_planned_parameters(run) -> None:
    """Tied embeddings once, and LoRA's adapters as the only trainable parameters."""
    plan, _, run_dir = run
    counts = re.fullmatch(r"([\d,]+) \(([\d,]+) trainable\)", field(plan, "parameters"))
    assert counts, plan
    total, trainable = counts.groups()
    log = (run_dir / "train.log").read_text()
    assert f"model: {total} parameters" in log
    assert re.search(rf"LoRA r=4 alpha=\S+ on .*: {trainable} trainable parameters", log)


def test_a_json_that_sets_the_zero_stage_is_refused(tmp_path: Path, bigscale_home: Path) -> None:
    path = tmp_path / "stage.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "allgather_bucket_size": 9}}))
    proc = bigscale(
        ["plan", "strategy=zero2", f"strategy.deepspeed_config={path}"], tmp_path, bigscale_home
    )
    assert proc.returncode == 2, explain(proc)
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: {path} sets keys that bigscale derives")
    assert "zero_optimization.stage -> strategy.zero_stage" in line
