"""Per-GPU memory for model states under each ZeRO stage, from the model's config alone.

The model is instantiated on the meta device (no memory, no weights) to count parameters. The
arithmetic follows the ZeRO paper: with mixed precision, 2 bytes of weights and 2 of gradients
per parameter plus 12 of fp32 optimizer state (master weights, Adam m and v); fp32 training
keeps 4 + 4 + 8. Stage 1 partitions the optimizer state across data-parallel ranks, stage 2
also the gradients, stage 3 also the weights; CPU offload moves optimizer state (and, for
params, the weights) off the GPU. Activations are not included."""

from __future__ import annotations

from dataclasses import dataclass

from bigscale.config.schema import Precision, StrategyConfig

GIB = 1024**3


@dataclass(frozen=True)
class MemoryEstimate:
    params: int
    weights_gib: float
    grads_gib: float
    optimizer_gib: float

    @property
    def total_gib(self) -> float:
        return self.weights_gib + self.grads_gib + self.optimizer_gib


def count_parameters(name_or_path: str, revision: str | None, trust_remote_code: bool) -> int:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(
        name_or_path, revision=revision, trust_remote_code=trust_remote_code
    )
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return sum(p.numel() for p in model.parameters())


def estimate(
    params: int, strategy: StrategyConfig, precision: Precision, dp_ranks: int
) -> MemoryEstimate:
    half = precision in (Precision.bf16, Precision.fp16)
    weight_bytes, grad_bytes = (2, 2) if half else (4, 4)
    optim_bytes = 12 if half else 8
    stage = strategy.zero_stage
    weights = params * weight_bytes / (dp_ranks if stage >= 3 else 1)
    grads = params * grad_bytes / (dp_ranks if stage >= 2 else 1)
    optim = params * optim_bytes / (dp_ranks if stage >= 1 else 1)
    if strategy.offload_optimizer:
        optim = 0.0
    if strategy.offload_params:
        weights = 0.0
    return MemoryEstimate(params, weights / GIB, grads / GIB, optim / GIB)
