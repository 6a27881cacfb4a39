"""Preference tuning end to end: real torchrun, 2 processes on gloo, real DeepSpeed engines.

DPO on ddp with packed pairs, ZeRO-2 (with LoRA) and ZeRO-3 (with the chunked head and
activation checkpointing), SimPO and ORPO on ddp, all on one small file of pairs (a sum's answer
preferred over the same answer badly formatted): held-out preference accuracy rises, the
reference pass runs once for all the DPO runs on one model (they share the tokenization cache
it is stored in), a packed run's first step equals the padded computation, and a DPO run killed
after a checkpoint and resumed ends bitwise as the uninterrupted one."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bigscale.data.tasks import arithmetic_rows
from tests.cli import QUICK, bigscale, explain, kill_after_checkpoint, metrics, start, train_rows

pytestmark = pytest.mark.distributed

# The model without dropout (dropout masks depend on the batch's shape) for the ddp run, which
# packs its pairs and logs every step: its first step is compared with the padded computation.
# It is also the plain ddp DPO run (a separate padded ddp run trained the same objective on the
# same strategy again, one launch more): LoRA reads the table it computed, so shares its model.
NO_DROPOUT = [
    "model.name_or_path=${oc.env:BIGSCALE_HOME}/models/tiny-no-dropout",
    "model.create_if_missing.dropout=0.0",
]
RUNS = {
    "dpo-ddp-packed": [
        "objective=dpo",
        "strategy=ddp",
        "optim.lr=1e-3",
        "data.packing=true",
        *NO_DROPOUT,
        "trainer.log_every=1",
    ],
    "dpo-zero2-lora": [
        "objective=dpo",
        "strategy=zero2",
        "finetune=lora",
        "optim.lr=3e-3",
        *NO_DROPOUT,
    ],
    # The DPO run with dropout on.
    "dpo-zero3": [
        "objective=dpo",
        "strategy=zero3",
        "optim.lr=1e-3",
        "model.gradient_checkpointing=true",
        "model.loss_chunk_tokens=48",
    ],
    "simpo-ddp": ["objective=simpo", "strategy=ddp", "optim.lr=1e-3"],
    "orpo-ddp": ["objective=orpo", "strategy=ddp", "objective.lambda_=1.0", "optim.lr=1e-3"],
}
DPO_RUNS = [name for name in RUNS if name.startswith("dpo")]


def _write_pairs(path: Path, rows: list[dict[str, str]]) -> None:
    path.write_text(
        "".join(
            json.dumps(
                {"prompt": r["prompt"], "chosen": r["response"], "rejected": f"{r['response']}!?"}
            )
            + "\n"
            for r in rows
        )
    )


def _args(work: Path, run_dir: Path, name: str) -> list[str]:
    return [
        "train",
        "launcher.nproc_per_node=2",
        f"run_dir={run_dir}",
        *QUICK,
        "data=preference_files",
        f"data.path={work / 'train.jsonl'}",
        f"data.validation_path={work / 'validation.jsonl'}",
        "data.max_length=16",
        "objective.reference_batch_size=16",
        *RUNS[name],
    ]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("preference")
    rows = arithmetic_rows(seed=3)
    _write_pairs(work / "train.jsonl", rows[:384])
    _write_pairs(work / "validation.jsonl", rows[384:448])
    return work


@pytest.fixture(scope="module")
def runs(work: Path, bigscale_home: Path) -> dict[str, tuple[Path, str]]:
    out = {}
    for name in RUNS:
        run_dir = work / name
        proc = bigscale(_args(work, run_dir, name), cwd=work, home=bigscale_home)
        assert proc.returncode == 0, explain(proc)
        out[name] = (run_dir, proc.stderr)
    return out


def _evals(run_dir: Path) -> list[dict]:
    return [r for r in metrics(run_dir) if "eval_rewards/accuracy" in r]


@pytest.mark.parametrize("name", list(RUNS))
def test_held_out_preference_accuracy_rises(runs: dict[str, tuple[Path, str]], name: str) -> None:
    run_dir = runs[name][0]
    rows = train_rows(run_dir)
    for row in rows:
        for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin"):
            assert key in row, row
        assert row["logps/chosen"] < 0 and row["logps/rejected"] < 0
    evals = _evals(run_dir)
    assert [e["step"] for e in evals] == [12, 24]  # periodic, then the final evaluation
    first, last = evals[0], evals[-1]
    assert last["eval_rewards/accuracy"] >= 0.9, evals
    assert last["eval_rewards/margin"] > first["eval_rewards/margin"] > 0, evals
    assert rows[-1]["loss"] < rows[0]["loss"], rows


def test_reference_pass_runs_once(runs: dict[str, tuple[Path, str]]) -> None:
    """The first DPO run scores the pairs; every later one on its model (another strategy,
    LoRA, padded where the first packed: the table does not depend on data.packing) reads them.
    The chunked head changes the numerics, so its table is keyed apart."""
    computed = {n: "reference pass:" in runs[n][1] for n in DPO_RUNS}
    expected = {"dpo-ddp-packed": True, "dpo-zero2-lora": False, "dpo-zero3": True}
    assert computed == expected, computed
    assert "reference log-probs of the train pairs read from" in runs["dpo-zero2-lora"][1]
    for name in ("simpo-ddp", "orpo-ddp"):  # reference-free
        assert "reference pass" not in runs[name][1]
        assert "reference log-probs" not in runs[name][1]


def test_packed_pairs_first_step_equals_the_padded_computation(
    runs: dict[str, tuple[Path, str]],
) -> None:
    """data.packing=true: at step 1 the policy is the initial model and, without dropout, the
    padded computation gives exactly the reference table (DPO loss log 2, rewards 0). The
    reference pass pads whatever data.packing says, the training forward packs: the packed
    run's first DPO loss equals the padded one within 1e-5 only if every packed sequence's
    log-prob sum equals its padded one."""
    rows = train_rows(runs["dpo-ddp-packed"][0])
    first = rows[0]
    assert first["step"] == 1, rows[:2]
    assert abs(first["loss"] - math.log(2)) < 1e-5, first
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margin"):
        assert abs(first[key]) < 1e-5, first
    assert rows[-1]["loss"] < first["loss"]  # and it trains


def test_killed_and_resumed_dpo_run_matches_uninterrupted(
    runs: dict[str, tuple[Path, str]], work: Path, bigscale_home: Path
) -> None:
    """Against the packed ddp run: no dropout there, so this resume does not show the random
    state restored (test_resume_failures' damaged-checkpoint resume does, bitwise, through the
    same trainer), but it shows a packed run's data order resumed exactly."""
    run_dir = work / "dpo-resumed"
    args = _args(work, run_dir, "dpo-ddp-packed")
    kill_after_checkpoint(start(args, work, bigscale_home), run_dir, "step_00000008")
    proc = bigscale(args, work, bigscale_home)
    assert proc.returncode == 0, explain(proc)
    assert re.search(r"resumed from .*step_000000(08|16) at step (8|16)", proc.stderr)
    assert "reference pass:" not in proc.stderr  # the cached table, as the first run's

    def fields(rows: list[dict]) -> list[tuple]:
        keys = ("step", "loss", "grad_norm", "rewards/accuracy", "rewards/margin", "logps/chosen")
        return [tuple(r[k] for k in keys) for r in rows]

    straight = runs["dpo-ddp-packed"][0]
    assert fields(train_rows(run_dir)) == fields(train_rows(straight))
    assert _evals(run_dir)[-1] == _evals(straight)[-1]
    resumed = load_file(run_dir / "export" / "model.safetensors")
    for key, tensor in load_file(straight / "export" / "model.safetensors").items():
        assert torch.equal(resumed[key], tensor), key


def test_dpo_checkpoint_of_two_ranks_resumes_on_one(
    runs: dict[str, tuple[Path, str]], work: Path, bigscale_home: Path
) -> None:
    """The packed DPO run's step-16 checkpoint (2 ranks, 8 pairs x 2 accum each) resumed on 1
    rank with the same global batch (16 x 2): the cached reference table serves the new layout
    (no second reference pass), and without dropout the steps log nearly the 2-rank run's
    losses (summation order and micro-batch grouping aside)."""
    straight = runs["dpo-ddp-packed"][0]
    run_dir = work / "dpo-one-rank"
    args = [a for a in _args(work, run_dir, "dpo-ddp-packed") if not a.startswith("launcher.")]
    args += [
        "launcher.nproc_per_node=1",
        "trainer.micro_batch_size=16",
        "trainer.grad_accum=2",
        f"resume={straight / 'checkpoints' / 'step_00000016'}",  # step 8's is rotated away
    ]
    args = [a for a in args if a != "trainer.micro_batch_size=8"]
    proc = bigscale(args, work, bigscale_home)
    assert proc.returncode == 0, explain(proc)
    assert re.search(r"resumed from .*step_00000016 at step 16", proc.stderr), proc.stderr
    assert "written by 2 ranks, this run has 1" in proc.stderr
    assert "reference pass:" not in proc.stderr
    assert "reference log-probs of the train pairs read from" in proc.stderr
    ours = {r["step"]: r["loss"] for r in train_rows(run_dir)}
    reference = {r["step"]: r["loss"] for r in train_rows(straight)}
    assert sorted(ours) == list(range(17, 25)), sorted(ours)
    for step, loss in ours.items():
        assert loss == pytest.approx(reference[step], rel=1e-2), (step, ours, reference)
