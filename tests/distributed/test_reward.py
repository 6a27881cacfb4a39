"""A reward model end to end: real torchrun, 2 processes on gloo, real DeepSpeed (ZeRO-2; and
LoRA with the merged export), on the preference test's pairs. The held-out margin rises and
the pairs end ranked (accuracy >= 0.9; on these pairs, whose rejected side always ends "!?",
even the random initial head often ranks them all, so accuracy itself cannot be shown to
rise), and the export, loaded with ``AutoModelForSequenceClassification``, scores the held-out pairs
as the run's final evaluation did."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bigscale.config.schema import DataConfig, DataStyle
from bigscale.data.preference import encode_pair, pair_collate
from bigscale.data.tasks import arithmetic_rows
from tests.cli import QUICK, bigscale, explain, metrics, train_rows
from tests.distributed.test_preference import _write_pairs

pytestmark = pytest.mark.distributed

RUNS = {
    "reward-zero2": ["strategy=zero2", "optim.lr=1e-3"],
    "reward-zero2-lora": [
        "strategy=zero2",
        "finetune=lora",
        "optim.lr=3e-3",
        "export.merge_lora=true",
    ],
}
VALIDATION_PAIRS = 32  # = eval_batches x micro batch x ranks: every evaluation sees them all


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, bigscale_home: Path) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("reward")
    rows = arithmetic_rows(seed=3)
    _write_pairs(work / "train.jsonl", rows[:384])
    _write_pairs(work / "validation.jsonl", rows[384 : 384 + VALIDATION_PAIRS])
    out = {}
    for name, extra in RUNS.items():
        run_dir = work / name
        args = [
            "train",
            "launcher.nproc_per_node=2",
            f"run_dir={run_dir}",
            *QUICK,
            "objective=reward",
            "data=preference_files",
            f"data.path={work / 'train.jsonl'}",
            f"data.validation_path={work / 'validation.jsonl'}",
            "data.max_length=16",
            *extra,
        ]
        proc = bigscale(args, cwd=work, home=bigscale_home)
        assert proc.returncode == 0, explain(proc)
        assert "reference" not in proc.stderr  # a reward model has no reference pass
        out[name] = run_dir
    return out


def _evals(run_dir: Path) -> list[dict]:
    return [r for r in metrics(run_dir) if "eval_rewards/accuracy" in r]


@pytest.mark.parametrize("name", list(RUNS))
def test_held_out_margin_rises_and_pairs_are_ranked(runs: dict[str, Path], name: str) -> None:
    rows = train_rows(runs[name])
    for row in rows:
        for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin"):
            assert key in row, row
        assert "logps/chosen" not in row  # a classifier has no completion log-probs
    evals = _evals(runs[name])
    assert [e["step"] for e in evals] == [12, 24], evals
    first, last = evals[0], evals[-1]
    assert last["eval_rewards/accuracy"] >= 0.9, evals
    assert last["eval_rewards/margin"] > first["eval_rewards/margin"], evals
    assert rows[-1]["loss"] < rows[0]["loss"], rows


@pytest.mark.parametrize("name", list(RUNS))
def test_export_scores_held_out_pairs_as_the_run_did(runs: dict[str, Path], name: str) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    export = runs[name] / "export"
    model = AutoModelForSequenceClassification.from_pretrained(export, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id
    assert not (export / "generation_config.json").exists()
    model.eval()
    lines = (runs[name].parent / "validation.jsonl").read_text().splitlines()
    data = DataConfig(path="x", style=DataStyle.preference)
    # Encoded and padded as training does (the test is of the exported weights and config).
    examples = [
        {**encode_pair(json.loads(line), tokenizer, data, i), "pair_index": i}
        for i, line in enumerate(lines)
    ]
    assert max(len(e["rejected_input_ids"]) for e in examples) <= 16  # data.max_length: no cut
    batch = pair_collate(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    chosen, rejected = scores.logits[:, 0].chunk(2)
    wins = int((chosen > rejected).sum())
    accuracy = wins / len(lines)
    final = _evals(runs[name])[-1]["eval_rewards/accuracy"]
    assert accuracy > 0.5, accuracy
    assert abs(accuracy - final) <= 1 / len(lines), (accuracy, final)
