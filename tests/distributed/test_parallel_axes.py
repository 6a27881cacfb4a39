"""Sequence and tensor parallelism on real DeepSpeed engines on gloo: a run whose every sequence
is split across 2 ranks (Ulysses), one whose every weight matrix is (AutoTP), and a 4-rank run of
2 data-parallel replicas each splitting its sequences across 2 ranks train exactly as one rank
holding everything (same global batch, per-step losses equal to float32 rounding); the split
runs resume from their own checkpoints to the same losses, bit for bit.

Micro batches hold one row, so every layout groups the step's 8 rows the same way (a step's
loss is the mean of its micro batches' token means): the data-parallel run's two replicas take
rows 0, 2, 4, 6 and 1, 3, 5, 7 of the step where one rank takes all 8 in order, and only the
summation order differs.

The data is packed (2-3 documents per row), so this also shows that packed documents stay apart
under sequence parallelism: the 1-rank run keeps them apart with transformers' block-diagonal
mask, and the split run's attention sees the whole sequence only after DeepSpeed's all-to-all,
where bigscale rebuilds the mask from the gathered position ids. A document attending to
another would change the loss far beyond the tolerance below. Likewise a label shifted after the
cut instead of before would lose the prediction at each slice boundary."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.cli import bigscale, explain, metrics, train_rows
from tests.distributed.test_multinode import run_two_nodes
from tests.e2e.test_bad_input import assert_user_error

pytestmark = pytest.mark.distributed

ARGS = [
    "experiment=arithmetic",  # the tiny model and the arithmetic task, not the default demo
    "model.name_or_path=${oc.env:BIGSCALE_HOME}/models/tiny-nodropout",
    "model.create_if_missing.dropout=0.0",  # dropout masks would differ between the layouts
    "trainer.precision=fp32",
    "trainer.max_steps=4",
    "optim.warmup_steps=1",
    "trainer.micro_batch_size=1",
    "trainer.grad_accum=8",
    "trainer.log_every=1",
    "checkpoint.every_steps=2",
    "trainer.eval_batches=2",
    "trainer.progress_bar=false",
    "eval.exact_match=false",
    "export.at_end=false",
    "logger=disabled",
    "data.packing=true",
    "data.max_length=32",
    "strategy=zero2",
]
SP2 = ["strategy.sequence_parallel_size=2", "launcher.nproc_per_node=2"]
TP2 = ["strategy.tensor_parallel_size=2", "launcher.nproc_per_node=2"]
# 2 replicas x 2 sequence ranks; half the accumulation keeps the global batch at 1 x 8 x 1.
SPLIT_HALF_ACCUM = ["strategy.sequence_parallel_size=2", "trainer.grad_accum=4"]
# The held-out generation eval, small: a tensor group generates its prompts together, and under
# sequence parallelism each rank generates whole sequences of its own.
GENERATE = ["eval.exact_match=true", "eval.max_examples=8"]


def train(run_dir: Path, home: Path, *extra: str) -> Path:
    proc = bigscale(["train", f"run_dir={run_dir}", *ARGS, *extra], cwd=run_dir.parent, home=home)
    assert proc.returncode == 0, explain(proc)
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, bigscale_home: Path) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("sequence_parallel")
    out = {
        "one": train(
            work / "one", bigscale_home, "launcher.nproc_per_node=1", "export.at_end=true"
        ),
        "sp2": train(work / "sp2", bigscale_home, *SP2, *GENERATE),
        "tp2": train(work / "tp2", bigscale_home, *TP2, "export.at_end=true", *GENERATE),
        # ZeRO-3 builds the model under zero.Init, which must know of the sequence ranks.
        "sp2-zero3": train(
            work / "sp2-zero3", bigscale_home, *SP2, "strategy=zero3", "checkpoint.every_steps=0"
        ),
    }
    # 2 data-parallel replicas x 2 sequence ranks, as 2 "nodes" of 2 on loopback (real torchrun
    # rendezvous): each node's ranks are one sequence group, the replicas meet across nodes.
    # 4 ranks on 2 cores are slow: no checkpoint, evaluation only the final one.
    out["nodes"] = work / "nodes"
    texts = run_two_nodes(
        [f"run_dir={out['nodes']}", *ARGS, *SPLIT_HALF_ACCUM, "checkpoint.every_steps=0"],
        work,
        bigscale_home,
    )
    (out["nodes"] / "nodes-output.txt").write_text("\n".join(texts))
    # The split runs again from their step-2 checkpoints, into new run directories.
    for name, layout in (("sp2", SP2), ("tp2", TP2)):
        step2 = out[name] / "checkpoints" / "step_00000002"
        out[f"{name}-resumed"] = train(
            work / f"{name}-resumed", bigscale_home, *layout, f"resume={step2}"
        )
    # And on the other layouts, same global batch, through DeepSpeed's universal checkpoint:
    # the split sequences continue as split weights (SP 2 -> 1, TP 1 -> 2), the split weights
    # on one rank holding everything (TP 2 -> 1, 2 ranks -> 1).
    for name, source, layout in (
        ("sp2-as-tp2", "sp2", TP2),
        ("tp2-on-one", "tp2", ["launcher.nproc_per_node=1"]),
    ):
        step2 = out[source] / "checkpoints" / "step_00000002"
        out[name] = train(work / name, bigscale_home, *layout, f"resume={step2}")
    return out


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in train_rows(run_dir)}


def real_tokens_per_step(run_dir: Path) -> list[float]:
    """Tokens with a label per step, summed over the ranks (rate x seconds per step: the
    seconds cancel)."""
    return [r["real_tokens_per_s"] * r["step_time_s"] for r in train_rows(run_dir)]


def eval_loss(run_dir: Path) -> float:
    return next(r["eval_loss"] for r in reversed(metrics(run_dir)) if "eval_loss" in r)


def test_split_sequences_train_as_whole_ones(runs: dict[str, Path]) -> None:
    one, sp2 = losses(runs["one"]), losses(runs["sp2"])
    assert list(one) == list(sp2) == [1, 2, 3, 4]
    assert one[4] < one[1]  # it learns
    for step in one:
        assert sp2[step] == pytest.approx(one[step], rel=1e-5, abs=1e-6), (one, sp2)
    assert eval_loss(runs["sp2"]) == pytest.approx(eval_loss(runs["one"]), rel=1e-5)


def test_split_sequences_under_zero3_train_as_whole_ones(runs: dict[str, Path]) -> None:
    one, sp2 = losses(runs["one"]), losses(runs["sp2-zero3"])
    assert list(sp2) == [1, 2, 3, 4]
    for step in one:
        assert sp2[step] == pytest.approx(one[step], rel=1e-5, abs=1e-6), (one, sp2)


def test_data_parallel_replicas_of_split_sequences_on_two_nodes_train_as_one_rank(
    runs: dict[str, Path],
) -> None:
    one, dpsp = losses(runs["one"]), losses(runs["nodes"])
    assert list(dpsp) == [1, 2, 3, 4]
    for step in one:
        assert dpsp[step] == pytest.approx(one[step], rel=1e-5, abs=1e-6), (one, dpsp)
    # Each replica counts its rows once, not once per sequence rank.
    share = [r["real_token_share"] for r in train_rows(runs["nodes"])]
    assert share == pytest.approx([r["real_token_share"] for r in train_rows(runs["one"])])
    assert real_tokens_per_step(runs["nodes"]) == pytest.approx(real_tokens_per_step(runs["one"]))
    # The sequence groups are the nodes' own ranks: a group spanning the nodes, or a node
    # training alone, would print another layout or change the losses.
    text = (runs["nodes"] / "nodes-output.txt").read_text()
    assert "2 data-parallel x 2 sequence-parallel = 4 ranks" in text
    assert "node.sh: node 1 of 2" in text


def test_split_weights_train_as_whole_ones(runs: dict[str, Path]) -> None:
    one, tp2 = losses(runs["one"]), losses(runs["tp2"])
    assert list(tp2) == [1, 2, 3, 4]
    for step in one:
        assert tp2[step] == pytest.approx(one[step], rel=1e-5, abs=1e-6), (one, tp2)
    assert eval_loss(runs["tp2"]) == pytest.approx(eval_loss(runs["one"]), rel=1e-5)


def test_tensor_parallel_export_is_the_whole_model(runs: dict[str, Path]) -> None:
    # Each tensor rank saved slices (q/k/v/gate/up and the 101-row LM head cut 51 + 50 along
    # their rows, o/down along their columns); the export puts them back together. The two runs
    # trained to the same weights up to float32 rounding (Adam turns it into ~1e-4 on a few
    # entries whose gradient is near zero); a slice put in the wrong place or along the wrong
    # dim would be off by the weights' own size (~2e-2) nearly everywhere.
    tp2 = load_file(runs["tp2"] / "export" / "model.safetensors")
    one = load_file(runs["one"] / "export" / "model.safetensors")
    assert tp2.keys() == one.keys()
    for name, tensor in one.items():
        assert tp2[name].shape == tensor.shape, name
        torch.testing.assert_close(tp2[name], tensor, rtol=0, atol=1e-3, msg=name)
        assert (tp2[name] - tensor).abs().mean() < 1e-6, name
    ids = torch.arange(3, 27).view(2, 12)
    with torch.no_grad():
        logits = [
            AutoModelForCausalLM.from_pretrained(runs[r] / "export").eval()(input_ids=ids).logits
            for r in ("tp2", "one")
        ]
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4)


def test_generation_eval_runs_under_split_layouts(runs: dict[str, Path]) -> None:
    # Under tensor parallelism every forward is a collective of the tensor group: the run only
    # finishes if both ranks generated the same prompts, and bigscale checks that their answers
    # agree before scoring them.
    for name in ("tp2", "sp2"):
        final = metrics(runs[name])[-1]
        for when in ("before", "after"):
            assert 0.0 <= final[f"final/exact_match_{when}"] <= 1.0, (name, final)
            assert final[f"final/exact_match_budget_hits_{when}"] <= 8, (name, final)


def test_tokens_are_counted_once_per_sequence(runs: dict[str, Path]) -> None:
    # Two ranks hold halves of the same sequences: the real-token share is the unsplit run's.
    share = {name: [r["real_token_share"] for r in train_rows(runs[name])] for name in runs}
    assert share["sp2"] == pytest.approx(share["one"])
    assert share["tp2"] == pytest.approx(share["one"])


@pytest.mark.parametrize("layout", ["sp2", "tp2"])
def test_resume_under_split_layouts_is_exact(runs: dict[str, Path], layout: str) -> None:
    resumed = losses(runs[f"{layout}-resumed"])
    assert list(resumed) == [3, 4]
    assert resumed == {step: losses(runs[layout])[step] for step in (3, 4)}
    assert eval_loss(runs[f"{layout}-resumed"]) == eval_loss(runs[layout])


@pytest.mark.parametrize("layout", ["sp2-as-tp2", "tp2-on-one"])
def test_resume_on_another_layout_continues_the_run(runs: dict[str, Path], layout: str) -> None:
    resumed, one = losses(runs[layout]), losses(runs["one"])
    assert list(resumed) == [3, 4]
    # Restored the step-2 weights and Adam moments: a layout that lost the moments, or took
    # a slice as the whole weight, would be off by far more than float32 rounding.
    for step in resumed:
        assert resumed[step] == pytest.approx(one[step], rel=1e-6, abs=1e-7), (one, resumed)
    assert eval_loss(runs[layout]) == pytest.approx(eval_loss(runs["one"]), rel=1e-5)
    assert "resumed from" in (runs[layout] / "train.log").read_text()


def test_resume_on_another_layout_must_keep_the_global_batch(
    runs: dict[str, Path], bigscale_home: Path
) -> None:
    checkpoints = runs["sp2"] / "checkpoints"
    before = {p: p.stat().st_mtime_ns for p in checkpoints.rglob("*")}
    step2 = checkpoints / "step_00000002"
    # The 2 ranks no longer split sequences: 2 replicas of 1 x 8 double the global batch.
    proc = bigscale(
        ["train", f"run_dir={runs['sp2'].parent / 'relayout'}", *ARGS, f"resume={step2}"],
        cwd=runs["sp2"].parent,
        home=bigscale_home,
    )
    assert_user_error(proc, "global batch (micro_batch_size x grad_accum x ranks): 8 in the")
    assert {p: p.stat().st_mtime_ns for p in checkpoints.rglob("*")} == before


def test_sequence_parallel_with_zero_stage_0_is_refused_before_any_rank(
    runs: dict[str, Path], bigscale_home: Path
) -> None:
    proc = bigscale(
        ["train", f"run_dir={runs['sp2'].parent / 'stage0'}", *ARGS, *SP2, "strategy.zero_stage=0"],
        cwd=runs["sp2"].parent,
        home=bigscale_home,
    )
    assert_user_error(proc, "ZeRO stage 1, 2 or 3", "7833")
    assert not (runs["sp2"].parent / "stage0" / "metrics.jsonl").exists()
