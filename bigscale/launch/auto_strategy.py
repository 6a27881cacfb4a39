"""``strategy=auto``: the fastest strategy whose estimated memory fits the devices found.

Strategies are tried from least to most communication and host traffic: plain data parallel,
ZeRO-1, -2, -3, then ZeRO-3 with CPU offload. The budget is a GPU's memory (the smallest one on
this machine) or, on a CPU-only machine, host memory shared by the local ranks; a margin is
kept for what the estimate does not count (allocator fragmentation, communication buckets,
temporary buffers)."""

from __future__ import annotations

from bigscale.config.schema import Precision, StrategyConfig, TrainConfig
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
    """The first candidate that fits, and every candidate's estimate (for the plan's reasons)."""
    work = Workload.from_config(cfg)
    estimates = {
        name: estimate(shape, strategy, precision, world_size, work)
        for name, strategy in CANDIDATES.items()
    }
    for name, mem in estimates.items():
        if mem.total_gib <= MARGIN * budget_gib:
            return name, estimates
    smallest = min(estimates.values(), key=lambda m: m.total_gib)
    raise ConfigError(
        f"strategy=auto: no strategy fits. Even zero3_offload needs about "
        f"{smallest.total_gib:.1f} GiB per rank ({smallest.activations_gib:.1f} GiB of it "
        f"activations) against {MARGIN * budget_gib:.1f} GiB available. Lower "
        f"trainer.micro_batch_size (raise trainer.grad_accum to keep the batch), set "
        f"model.gradient_checkpointing=true, lower data.max_length, use finetune=lora, or add "
        f"ranks."
    )
