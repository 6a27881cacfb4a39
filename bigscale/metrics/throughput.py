"""Honest speed figures for a training step: tokens per second (all and real, non-padding),
where the step's time went, peak memory, and model FLOPs utilization (MFU) on a GPU.

MFU follows the PaLM convention: 6N + 12·L·H·Q·T FLOPs per token (N parameters with the LM head
counted as computed even when tied to the embedding; L layers, H heads, Q head size, T sequence
length), counted on real tokens only so padding never inflates it, against the GPU's dense bf16
peak. On a CPU there is no meaningful peak, so MFU is left out rather than invented."""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

# Dense bf16 peak TFLOP/s per GPU (no sparsity), by a substring of torch.cuda.get_device_name().
# Longer names first: "H100 PCIe" must not match the SXM figure.
PEAK_BF16_TFLOPS: dict[str, float] = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,
    "H200": 989.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 70.0,
    "A10": 125.0,
    "RTX 4090": 165.0,
    "MI300X": 1307.0,
}


def peak_tflops(device_name: str) -> float | None:
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in device_name:
            return PEAK_BF16_TFLOPS[key]
    return None


def flops_per_token(config: Any, parameters: int, seq_len: float) -> float:
    """Training FLOPs (forward + backward) per token of a decoder with ``parameters`` weights."""
    hidden = int(config.hidden_size)
    layers = int(config.num_hidden_layers)
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    n = parameters
    if getattr(config, "tie_word_embeddings", False):
        n += int(config.vocab_size) * hidden  # the LM head's matmul still runs
    return 6.0 * n + 12.0 * layers * heads * head_dim * seq_len


@dataclass
class Window:
    """What the steps since the last logged row did: times on this rank, tokens summed over all
    ranks; ``row`` turns it into per-step averages and rates."""

    steps: int = 0
    real_tokens: int = 0
    all_tokens: int = 0
    data_s: float = 0.0
    compute_s: float = 0.0
    optimizer_s: float = 0.0
    seq_len_sum: float = 0.0
    micro_batches: int = 0
    started: float = field(default_factory=lambda: time.perf_counter())

    def add_micro_batch(self, seq_len: int) -> None:
        self.seq_len_sum += seq_len
        self.micro_batches += 1

    def end_step(self, real_tokens: int, all_tokens: int) -> None:
        """One optimizer step done; its token counts are all ranks' sums."""
        self.steps += 1
        self.real_tokens += real_tokens
        self.all_tokens += all_tokens

    def row(self, world_size: int, mfu_of: MfuFormula | None) -> dict[str, float]:
        real_tokens, all_tokens = self.real_tokens, self.all_tokens
        seconds = max(time.perf_counter() - self.started, 1e-9)
        steps = max(self.steps, 1)
        out = {
            "tokens_per_s": all_tokens / seconds,
            "real_tokens_per_s": real_tokens / seconds,
            "real_token_share": real_tokens / max(all_tokens, 1),
            "step_time_s": seconds / steps,
            "data_wait_s": self.data_s / steps,
            "forward_backward_s": self.compute_s / steps,
            "optimizer_s": self.optimizer_s / steps,
            "peak_mem_gib": peak_memory_gib(),
        }
        if mfu_of is not None and self.micro_batches:
            per_gpu = real_tokens / seconds / world_size
            out["mfu"] = mfu_of(per_gpu, self.seq_len_sum / self.micro_batches)
        return out


@dataclass(frozen=True)
class MfuFormula:
    config: Any
    parameters: int
    peak_tflops: float

    def __call__(self, tokens_per_s_per_gpu: float, seq_len: float) -> float:
        achieved = tokens_per_s_per_gpu * flops_per_token(self.config, self.parameters, seq_len)
        return achieved / (self.peak_tflops * 1e12)


def mfu_formula(
    config: Any, parameters: int, override_tflops: float | None
) -> tuple[MfuFormula | None, str]:
    """The MFU formula for this machine, or None with the reason it is left out."""
    if not torch.cuda.is_available():
        return None, "MFU is not reported on CPU (no meaningful peak)"
    name = torch.cuda.get_device_name()
    peak = override_tflops or peak_tflops(name)
    if peak is None:
        return None, f"MFU is not reported: no peak known for {name!r}; set trainer.peak_tflops"
    return MfuFormula(config, parameters, peak), f"MFU against {peak:g} TFLOP/s ({name})"


def peak_memory_gib() -> float:
    """GPU: the most memory torch has allocated on this device; CPU: the process's peak RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**30 if sys.platform == "darwin" else 2**20)  # bytes on macOS, KiB on Linux


def sync() -> None:
    """Wait for queued GPU work, so a timed phase includes it (nothing to wait for on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
