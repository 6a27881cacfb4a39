"""``strategy=auto``: the fastest strategy whose estimated memory fits the devices found.

Strategies are tried from least to most communication and host traffic: plain data parallel,
ZeRO-1, -2, -3, then ZeRO-3 with CPU offload. The budget is a GPU's memory (the smallest one on
this machine) or, on a CPU-only machine, host memory shared by the local ranks; a margin is
kept for what the estimate does not count (allocator fragmentation, communication buckets,
temporary buffers).

A sequence too long for one GPU's activations can instead be split across the ranks of a node
(Ulysses sequence parallelism): ``choose_layout`` tries sequence-parallel sizes from the
smallest up, each with the strategies in the order above (ZeRO-1 at least: DeepSpeed's stage 0
crashes under Ulysses), and CPU offload only when no size fits on the GPUs, since moving the
optimizer over PCIe every step costs more than an all-to-all inside a node. It is a pure
function of the model's shape, the micro batch, the memory per device and the ranks: the unit
tests feed it a memory, and the plan feeds it the GPUs it finds."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from bigscale.config.schema import AttnImplementation, Precision, StrategyConfig, TrainConfig
from bigscale.config.validate import Hardware
from bigscale.errors import ConfigError
from bigscale.launch.memory import GIB, MemoryEstimate, ModelShape, Workload, estimate

CANDIDATES: dict[str, StrategyConfig] = {
    "ddp": StrategyConfig(name="ddp", zero_stage=0),
    "zero1": StrategyConfig(name="zero1", zero_stage=1),
    "zero2": StrategyConfig(name="zero2", zero_stage=2),
    "zero3": StrategyConfig(name="zero3", zero_stage=3),
    "zero3_offload": StrategyConfig(
        name="zero3_offload", zero_stage=3, offload_optimizer=True, offload_params=True
    ),
}
"""Mirrors conf/strategy/*.yaml (a unit test checks that they agree)."""

AUTO = "auto"
"""``strategy.name`` of conf/strategy/auto.yaml."""

MARGIN = 0.85
"""Share of the budget the estimate may fill."""


def memory_budget_gib(hw: Hardware, local_ranks: int) -> tuple[float, str]:
    """Memory one rank may use, and where the figure comes from."""
    if hw.cuda_devices:
        return hw.gpu_memory_gib, f"{hw.gpu_memory_gib:.0f} GiB per GPU"
    import psutil

    total = psutil.virtual_memory().total / GIB
    return total / local_ranks, f"{total:.0f} GiB host memory / {local_ranks} local ranks"


def choose(
    cfg: TrainConfig,
    shape: ModelShape,
    precision: Precision,
    world_size: int,
    budget_gib: float,
) -> tuple[str, dict[str, MemoryEstimate]]:
    """The first candidate that fits with whole sequences, and every candidate's estimate (for
    the plan's reasons)."""
    work = Workload.from_config(cfg)
    estimates = {
        name: estimate(shape, strategy, precision, world_size, work)
        for name, strategy in CANDIDATES.items()
    }
    return choose_layout(shape, work, precision, world_size, budget_gib).strategy, estimates


@dataclass(frozen=True)
class LayoutChoice:
    strategy: str
    """A key of ``CANDIDATES``."""
    sequence_parallel_size: int
    estimate: MemoryEstimate
    whole: MemoryEstimate | None
    """The smallest estimate with whole sequences (sequence-parallel size 1), when the choice
    splits them: what did not fit."""


def sequence_parallel_sizes(
    shape: ModelShape, local_ranks: int, max_length: int, packed: bool
) -> list[int]:
    """Sequence-parallel sizes a run may take, smallest first: groups inside one node (a size
    dividing the ranks per node, hence the world), heads split as Ulysses splits them (query
    heads evenly; key-value heads evenly or replicated), and packed rows of ``max_length``
    cut into equal parts. 1 always."""
    sizes = [1]
    if shape.heads <= 0:
        return sizes  # heads unknown: no split the ranks might refuse
    kv = shape.kv_heads or shape.heads
    for n in range(2, local_ranks + 1):
        if local_ranks % n or shape.heads % n or (kv % n and n % kv):
            continue
        if packed and max_length % n:
            continue
        sizes.append(n)
    return sizes


def may_split_sequences(cfg: TrainConfig) -> bool:
    """Whether ``strategy=auto`` may choose a sequence-parallel size for this config: only where
    the user left it (and the tensor-parallel size) at 1 and the run is one that sequence
    parallelism trains (bigscale.config.parallel words why each other one is refused)."""
    s, m = cfg.strategy, cfg.model
    return (
        s.sequence_parallel_size == 1
        and s.tensor_parallel_size == 1
        and not cfg.data.streaming
        and cfg.objective.name.value == "sft"
        and m.attn_implementation != AttnImplementation.eager
        and not m.loss_chunk_tokens
    )


def choose_layout(
    shape: ModelShape,
    work: Workload,
    precision: Precision,
    world_size: int,
    budget_gib: float,
    sp_sizes: Sequence[int] = (1,),
) -> LayoutChoice:
    """The smallest sequence-parallel size of ``sp_sizes`` and the fastest strategy with it
    whose estimate fits ``budget_gib`` per device (offload last, over every size)."""
    fits = MARGIN * budget_gib
    order = [(sp, n) for sp in sp_sizes for n in CANDIDATES if n != "zero3_offload"]
    order += [(sp, "zero3_offload") for sp in sp_sizes]
    estimates: dict[tuple[int, str], MemoryEstimate] = {}
    for sp, name in order:
        if sp > 1 and CANDIDATES[name].zero_stage == 0:
            continue  # DeepSpeed issue 7833
        strategy = dataclasses.replace(CANDIDATES[name], sequence_parallel_size=sp)
        mem = estimates[sp, name] = estimate(shape, strategy, precision, world_size, work)
        if mem.total_gib <= fits:
            whole = [m for (n, _), m in estimates.items() if n == 1]
            smallest = min(whole, key=lambda m: m.total_gib) if sp > 1 and whole else None
            return LayoutChoice(name, sp, mem, smallest)
    smallest = min(estimates.values(), key=lambda m: m.total_gib)
    largest = max(sp_sizes)
    split = f" with sequences split across {largest} ranks" if largest > 1 else ""
    if smallest.reference_gib > smallest.activations_gib:
        # The one-off reference pass, not training, sets the peak: its batch is the fix.
        raise ConfigError(
            f"strategy=auto: no strategy fits. Even zero3_offload{split} needs about "
            f"{smallest.total_gib:.1f} GiB per rank, {smallest.reference_gib:.1f} GiB of it the "
            f"reference pass's forward of {work.reference_batch // 2} pairs (training's "
            f"activations: {smallest.activations_gib:.1f} GiB) against {fits:.1f} GiB "
            "available. Lower objective.reference_batch_size (or set model.loss_chunk_tokens, "
            "which bounds the logits of both)."
        )
    raise ConfigError(
        f"strategy=auto: no strategy fits. Even zero3_offload{split} needs "
        f"about {smallest.total_gib:.1f} GiB per rank ({smallest.activations_gib:.1f} GiB of it "
        f"activations) against {fits:.1f} GiB available. Lower trainer.micro_batch_size (raise "
        "trainer.grad_accum to keep the batch), set model.gradient_checkpointing=true, lower "
        "data.max_length, use finetune=lora, or add ranks."
    )
