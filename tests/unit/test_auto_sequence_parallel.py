"""``strategy=auto`` choosing a sequence-parallel size: the smallest that fits a requested
``data.max_length`` in a given memory per device, as a pure function of the model's shape, the
micro batch, the memory and the ranks (no GPU needed: the tests hand it the memory), and the
plan that passes the choice to the ranks as overrides."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from transformers import LlamaConfig

from bigscale.config.compose import compose_config
from bigscale.config.schema import Precision
from bigscale.config.validate import Hardware
from bigscale.errors import ConfigError
from bigscale.launch import auto_strategy
from bigscale.launch.auto_strategy import (
    choose_layout,
    may_split_sequences,
    sequence_parallel_sizes,
)
from bigscale.launch.memory import ModelShape, Workload, estimate
from bigscale.launch.plan import make_plan, render
from bigscale.model.shapes import LLAMA_3_2_1B, LLAMA_3_2_1B_PARAMS

LLAMA_1B = ModelShape.from_config(LlamaConfig(**LLAMA_3_2_1B), params=LLAMA_3_2_1B_PARAMS)
LONG = Workload(micro_batch=1, seq_len=32768, checkpointing=True)
SIZES = [1, 2, 4, 8]


def test_sizes_follow_the_heads_the_node_and_the_packed_length() -> None:
    assert (LLAMA_1B.heads, LLAMA_1B.kv_heads) == (32, 8)
    assert sequence_parallel_sizes(LLAMA_1B, 8, 32768, packed=True) == SIZES
    # Groups stay inside a node: sizes divide the ranks per node.
    assert sequence_parallel_sizes(LLAMA_1B, 6, 32768, packed=True) == [1, 2]
    # 12 query heads split 2 or 4 ways, not 8; 2 key-value heads are replicated for 4.
    twelve = dataclasses.replace(LLAMA_1B, heads=12, kv_heads=2)
    assert sequence_parallel_sizes(twelve, 8, 4096, packed=False) == [1, 2, 4]
    # Packed rows of 4098 tokens cut into 2 equal parts, not 4 or 8.
    assert sequence_parallel_sizes(LLAMA_1B, 8, 4098, packed=True) == [1, 2]
    assert sequence_parallel_sizes(LLAMA_1B, 8, 4098, packed=False) == SIZES
    assert sequence_parallel_sizes(dataclasses.replace(LLAMA_1B, heads=0), 8, 64, False) == [1]


@pytest.mark.parametrize(
    ("budget_gib", "strategy", "sp"),
    # 8 ranks, 32k tokens, checkpointed: activations 44.7 GiB whole, / 2, / 4, / 8 split; with
    # whole sequences ddp needs 63.1 GiB and zero3 47.0 (so 80 GiB fits ddp, 40 GiB nothing).
    [
        (80.0, "ddp", 1),
        (40.0, "zero1", 2),  # zero1 split in 2: 28.7 GiB <= 34
        (24.0, "zero1", 4),  # split in 2 needs >= 24.7 GiB; in 4, zero1 17.5 <= 20.4
        (16.0, "zero3", 4),  # in 4, zero3 13.5 <= 13.6
        (12.0, "zero2", 8),
        (8.0, "zero3_offload", 8),  # only offload with every split fits 6.8 GiB
    ],
)
def test_auto_splits_sequences_only_as_far_as_the_memory_needs(
    budget_gib: float, strategy: str, sp: int
) -> None:
    choice = choose_layout(LLAMA_1B, LONG, Precision.bf16, 8, budget_gib, SIZES)
    assert (choice.strategy, choice.sequence_parallel_size) == (strategy, sp)
    assert choice.estimate.total_gib <= auto_strategy.MARGIN * budget_gib
    # The estimate is the layout's own: activations divided along the sequence axis.
    whole = estimate(LLAMA_1B, auto_strategy.CANDIDATES[strategy], Precision.bf16, 8, LONG)
    assert choice.estimate.activations_gib == pytest.approx(whole.activations_gib / sp)
    assert (choice.whole is None) == (sp == 1)
    if choice.whole is not None:
        assert choice.whole.total_gib > auto_strategy.MARGIN * budget_gib


def test_without_sizes_to_choose_from_auto_keeps_whole_sequences() -> None:
    choice = choose_layout(LLAMA_1B, LONG, Precision.bf16, 8, 80.0)
    assert (choice.strategy, choice.sequence_parallel_size) == ("ddp", 1)
    with pytest.raises(ConfigError, match="Even zero3_offload needs about 45.0 GiB"):
        choose_layout(LLAMA_1B, LONG, Precision.bf16, 8, 40.0)
    with pytest.raises(ConfigError, match="split across 8 ranks needs about 5.9 GiB"):
        choose_layout(LLAMA_1B, LONG, Precision.bf16, 8, 6.0, SIZES)


@pytest.mark.parametrize(
    "overrides",
    [
        ["strategy.sequence_parallel_size=2"],  # the user's own size stays
        ["strategy.tensor_parallel_size=2"],
        ["data.streaming=true", "trainer.max_steps=10"],
        ["model.attn_implementation=eager"],
        ["model.loss_chunk_tokens=1024"],
        ["experiment=demo", "objective=dpo", "data=arithmetic_pairs"],
    ],
)
def test_auto_splits_sequences_only_where_a_split_run_could_train(overrides: list[str]) -> None:
    assert may_split_sequences(compose_config(["strategy=auto"]))
    assert not may_split_sequences(compose_config(["strategy=auto", *overrides]))


def test_plan_passes_the_chosen_split_to_the_ranks_and_keeps_the_global_batch(
    plan_llama: Path,
) -> None:
    overrides = [
        "strategy=auto",
        f"model.name_or_path={plan_llama}",
        "data=arithmetic",
        "data.max_length=65536",
        "trainer.micro_batch_size=2",
        "trainer.grad_accum=2",
    ]
    # A micro batch of 2 x 64k tokens keeps 5.3 GiB of activations whole: a 4 GiB GPU (3.4
    # usable) needs them split in 2 (2.7 GiB), an 8 GiB one does not.
    gpus = Hardware(cuda_devices=8, bf16_supported=True, gpu_memory_gib=4.0)
    plan = make_plan(compose_config(overrides), overrides, hw=gpus)
    assert plan.cfg.strategy.sequence_parallel_size == 2
    assert plan.cfg.strategy.zero_stage >= 1
    ranks = plan.rank_overrides
    assert "strategy.sequence_parallel_size=2" in ranks and "strategy=auto" not in ranks
    assert [o for o in ranks if o.startswith("trainer.grad_accum=")] == ["trainer.grad_accum=4"]
    assert plan.global_batch == 2 * 2 * 8  # what 8 data-parallel ranks would take
    text = render(plan)
    assert "4 data-parallel x 2 sequence-parallel = 8 ranks" in text
    assert "activations / 2 sequence ranks" in text
    assert "split across 2 ranks (strategy.sequence_parallel_size=2" in text
    roomy = Hardware(cuda_devices=8, bf16_supported=True, gpu_memory_gib=8.0)
    whole = make_plan(compose_config(overrides), overrides, hw=roomy)
    assert whole.cfg.strategy.sequence_parallel_size == 1
    assert whole.global_batch == plan.global_batch
    assert "split across" not in render(whole)
