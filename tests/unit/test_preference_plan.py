"""DPO in the plan and in ``strategy=auto``: a preference micro batch puts both sides of its pairs
through one forward; the reference pass that runs before step 1 adds a forward's activations
(measured here on a real model's allocations) but no second model; its table's size on disk and
its compute share are printed; and auto never gives a preference run a layout it refuses."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaConfig, LlamaForCausalLM

from bigscale.config.compose import compose_config
from bigscale.config.derived import DataStats, derive
from bigscale.config.schema import Precision
from bigscale.config.validate import Hardware
from bigscale.data.collate import model_inputs
from bigscale.errors import ConfigError
from bigscale.launch import auto_strategy
from bigscale.launch.auto_strategy import choose_layout
from bigscale.launch.memory import (
    ModelShape,
    Workload,
    estimate,
    reference_activations,
    reference_table_bytes,
)
from bigscale.launch.plan import make_plan, memory_estimate, objective_lines, render
from bigscale.model.chunked_loss import install_chunked_loss
from bigscale.model.shapes import LLAMA_3_2_1B, LLAMA_3_2_1B_PARAMS
from bigscale.train.objectives import sequence_logps
from bigscale.train.reference import _save
from tests.models import plan_llama_config

LLAMA_1B = ModelShape.from_config(LlamaConfig(**LLAMA_3_2_1B), params=LLAMA_3_2_1B_PARAMS)
PAIRS = ["experiment=demo", "data=arithmetic_pairs"]
LONG = ["data.max_length=2048"]


def _config(*overrides: str, checkpointing: bool = True):
    cfg = compose_config([*PAIRS, *overrides] if "objective=sft" not in overrides else overrides)
    cfg.model.gradient_checkpointing = checkpointing
    return cfg


def _peak_bytes(fn: Any) -> int:
    """The most bytes ``fn`` holds at once beyond what existed before it: every CPU allocation
    and free the profiler records (kernel temporaries included), in time order."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    now = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        now += e.nbytes()
        peak = max(peak, now)
    return peak


@pytest.mark.parametrize(
    ("vocab", "chunk", "dtype"),
    [
        (1000, 0, torch.float32),  # a decoder layer sets the peak
        (8000, 0, torch.float32),  # the logits do
        (8000, 0, torch.bfloat16),  # ... with their fp32 copy
        (32000, 256, torch.float32),  # one chunk of them does
        (32000, 256, torch.bfloat16),
    ],
)
def test_reference_forward_peak_is_what_the_estimate_says(
    vocab: int, chunk: int, dtype: torch.dtype
) -> None:
    config = plan_llama_config(vocab_size=vocab)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype).eval()
    if chunk:
        install_chunked_loss(model, chunk)
    # What the reference pass runs: sequence_logps without gradients, through Engine.outputs'
    # merge of the batch's model inputs and the extra arguments.
    engine = SimpleNamespace(
        device=torch.device("cpu"),
        outputs=lambda batch, **extra: model(**{**model_inputs(batch), **extra}),
    )
    sequences, seq_len = 8, 128
    ids = torch.randint(0, vocab, (sequences, seq_len))
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}

    def forward() -> None:
        with torch.no_grad():
            sequence_logps(engine, batch, chunk)

    measured = _peak_bytes(forward)
    shape = ModelShape.from_config(config, sum(p.numel() for p in model.parameters()))
    work = Workload(sequences, seq_len, loss_chunk_tokens=chunk, reference_batch=sequences)
    precision = Precision.bf16 if dtype == torch.bfloat16 else Precision.fp32
    estimated = reference_activations(shape, work, precision)
    assert measured <= estimated <= 1.15 * measured, (measured, estimated)


@pytest.mark.parametrize("pairs", [1, 256, 9000])
def test_the_table_on_disk_is_no_larger_than_the_plan_says(tmp_path: Path, pairs: int) -> None:
    path = tmp_path / "reference" / f"{'0' * 32}.pt"  # the cache's name: a 32-digit key
    _save(torch.randn(pairs, 2, dtype=torch.float64), path)
    assert 16 * pairs < path.stat().st_size <= reference_table_bytes(pairs)


def test_a_pair_batch_is_both_sides_and_the_reference_adds_no_model() -> None:
    sft = Workload.from_config(_config("objective=sft", "trainer.micro_batch_size=4", *LONG))
    dpo = Workload.from_config(
        _config(
            "objective=dpo", "trainer.micro_batch_size=2", "objective.reference_batch_size=3", *LONG
        )
    )
    assert (sft.micro_batch, sft.reference_batch) == (4, 0)
    assert (dpo.micro_batch, dpo.reference_batch) == (4, 6)  # pairs x (chosen, rejected)
    for name in ("simpo", "orpo", "reward"):  # reference-free
        assert Workload.from_config(_config(f"objective={name}")).reference_batch == 0
    # By default the pass runs the training micro batch's pairs, as many as a training forward.
    ipo = Workload.from_config(_config("objective=ipo", "trainer.micro_batch_size=5", *LONG))
    assert (ipo.micro_batch, ipo.reference_batch) == (10, 10)
    for shape in (LLAMA_1B, dataclasses.replace(LLAMA_1B, vocab=8)):
        for chunk in (0, 256):
            for checkpointing in (False, True):
                work = dataclasses.replace(
                    ipo, loss_chunk_tokens=chunk, checkpointing=checkpointing
                )
                zero3 = estimate(shape, auto_strategy.CANDIDATES["zero3"], Precision.bf16, 8, work)
                assert zero3.reference_gib < zero3.activations_gib
    zero2 = auto_strategy.CANDIDATES["zero2"]
    ours = estimate(LLAMA_1B, zero2, Precision.bf16, 8, dpo)
    theirs = estimate(LLAMA_1B, zero2, Precision.bf16, 8, dataclasses.replace(dpo, seq_len=64))
    plain = estimate(LLAMA_1B, zero2, Precision.bf16, 8)
    # The same weights, gradients and optimizer state as the policy alone: no reference model.
    for e in (ours, theirs):
        assert (e.weights_gib, e.grads_gib, e.optimizer_gib) == (
            plain.weights_gib,
            plain.grads_gib,
            plain.optimizer_gib,
        )
        # The pass runs before training, not beside a micro batch: the larger one counts.
        states = plain.weights_gib + plain.grads_gib + plain.optimizer_gib
        assert e.total_gib == pytest.approx(states + max(e.activations_gib, e.reference_gib))
    assert ours.activations_gib == pytest.approx(
        estimate(LLAMA_1B, zero2, Precision.bf16, 8, sft).activations_gib
    )


# 8 ranks, bf16, data.max_length=2048, activation checkpointing, a 1B Llama. Estimates in GiB:
#   2 SFT sequences (or 1 pair):  ddp 24.0, zero1 11.9, zero2 9.9, zero3 7.9 (activations 5.6)
#   2 pairs (4 sequences):        ddp 29.6, zero1 17.5, zero2 15.5, zero3 13.5 (activations 11.2)
#   the reference pass's forward of 1 pair: 3.9; of 4 pairs: 15.8 (then ddp 34.2, zero1 22.1);
#   of 32 pairs: 126
DPO, REF = "objective=dpo", "objective.reference_batch_size"
ONE, TWO = "trainer.micro_batch_size=1", "trainer.micro_batch_size=2"


@pytest.mark.parametrize(
    ("overrides", "budget_gib", "chosen"),
    [
        (["objective=sft", TWO], 16.0, "zero1"),
        # Twice the sequences of the same micro batch size: a stage further.
        ([DPO, TWO, f"{REF}=1"], 16.0, "zero3"),
        (["objective=simpo", TWO], 16.0, "zero3"),
        # One pair is two sequences: as SFT's two.
        ([DPO, ONE, f"{REF}=1"], 16.0, "zero1"),
        ([DPO, ONE, f"{REF}=1"], 30.0, "ddp"),
        # The reference pass's batch, not training's, sets the peak.
        ([DPO, ONE, f"{REF}=4"], 30.0, "zero1"),
    ],
)
def test_auto_sizes_a_preference_run_by_both_sides_and_the_reference_pass(
    overrides: list[str], budget_gib: float, chosen: str
) -> None:
    work = Workload.from_config(_config(*LONG, *overrides))
    choice = choose_layout(LLAMA_1B, work, Precision.bf16, 8, budget_gib)
    assert (choice.strategy, choice.sequence_parallel_size) == (chosen, 1)
    assert choice.estimate.total_gib <= auto_strategy.MARGIN * budget_gib


def test_auto_names_the_reference_batch_when_the_reference_pass_does_not_fit() -> None:
    cfg = _config(DPO, *LONG, ONE, f"{REF}=32")
    work = Workload.from_config(cfg)
    fix = r"of it the reference pass's forward of 32 pairs.*objective\.reference_batch_size"
    with pytest.raises(ConfigError, match=fix):
        choose_layout(LLAMA_1B, work, Precision.bf16, 8, 80.0)
    smaller = dataclasses.replace(work, reference_batch=2)
    assert choose_layout(LLAMA_1B, smaller, Precision.bf16, 8, 80.0).strategy == "ddp"


def test_auto_never_splits_the_sequences_of_a_preference_run(plan_llama: Path) -> None:
    """Where an SFT run of the same activations gets sequence parallelism, which preference
    objectives refuse, a DPO run is sized with whole sequences (and refused when they do not
    fit), so auto never hands the ranks a layout validation refuses."""
    common = ["strategy=auto", f"model.name_or_path={plan_llama}", "data.max_length=65536"]
    sft = [*common, "data=arithmetic", "trainer.micro_batch_size=2"]
    dpo = [*common, "data=arithmetic_pairs", "objective=dpo", "trainer.micro_batch_size=1"]
    dpo.append("objective.reference_batch_size=1")
    small = Hardware(cuda_devices=8, bf16_supported=True, gpu_memory_gib=4.0)
    assert make_plan(compose_config(sft), sft, hw=small).cfg.strategy.sequence_parallel_size == 2
    with pytest.raises(ConfigError, match="no strategy fits"):
        make_plan(compose_config(dpo), dpo, hw=small)
    roomy = Hardware(cuda_devices=8, bf16_supported=True, gpu_memory_gib=8.0)
    plan = make_plan(compose_config(dpo), dpo, hw=roomy)  # validated for the ranks
    assert plan.cfg.strategy.sequence_parallel_size == 1
    assert plan.cfg.strategy.tensor_parallel_size == 1
    assert not [o for o in plan.rank_overrides if "parallel_size" in o or "grad_accum" in o]
    assert plan.global_batch == 8  # pairs: one per rank


def test_plan_prints_the_reference_pass_cost(plan_llama: Path) -> None:
    overrides = [
        "strategy=zero2",
        f"model.name_or_path={plan_llama}",
        "data=arithmetic_pairs",
        "objective=dpo",
        "data.max_length=64",
        "trainer.micro_batch_size=4",
        "trainer.grad_accum=2",
        "trainer.max_steps=50",
        "objective.reference_batch_size=16",
    ]
    cpu = Hardware(cuda_devices=0, bf16_supported=True, gpu_memory_gib=0.0)
    plan = make_plan(compose_config(overrides), overrides, hw=cpu)
    # The counts the plan's tokenization gives (bigscale plan measures them; given here).
    data = DataStats(rows=1000, longest=40, packed=False, validation_rows=100)
    plan = dataclasses.replace(plan, shape=derive(plan.cfg, plan.world_size, data))
    (line,) = [ln for ln in objective_lines(plan) if ln.startswith("reference")]
    trained = 50 * plan.global_batch
    assert (
        "over the 1,000 training and 100 validation pairs before step 1, 16 pairs "
        "(objective.reference_batch_size) at a time" in line
    )
    assert f"about {100 * 1100 / (3 * trained):.1f}% of the training's compute" in line
    assert f"(1,100 pairs forwarded once against {trained:,} trained" in line
    disk = reference_table_bytes(1000) + reference_table_bytes(100)
    assert f"{disk / 1e3:.1f} KB on disk" in line
    est, work = memory_estimate(plan)
    assert work.reference_batch == 32 and est.reference_gib > 0
    text = render(plan)
    peak = r"the reference pass before step 1 (sets the peak|stays below it): ([\d.]+) GiB"
    shown = re.search(peak, text)
    assert shown, text
    assert float(shown[2]) == pytest.approx(est.reference_gib, abs=0.005)
    assert shown[1] == (
        "sets the peak" if est.reference_gib > est.activations_gib else "stays below it"
    )
    assert f"= {plan.global_batch} pairs/step ({2 * plan.global_batch} sequences)" in text
    # Left unset, the pass takes the training micro batch's pairs and stays below its peak.
    default = [o for o in overrides if not o.startswith(f"{REF}=")]
    plan = make_plan(compose_config(default), default, hw=cpu)
    assert "4 pairs (trainer.micro_batch_size) at a time" in "\n".join(objective_lines(plan))
    assert "the reference pass before step 1 stays below it" in render(plan)
