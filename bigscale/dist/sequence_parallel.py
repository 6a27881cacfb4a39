"""Ulysses sequence parallelism through DeepSpeed (Arctic Long Sequence Training): one of the
modules that import ``deepspeed``.

Each rank of a sequence-parallel group holds 1/N of every sequence's tokens. Inside attention
DeepSpeed's ``UlyssesSPAttentionHF`` exchanges them for 1/N of the heads over the whole sequence
(all-to-all), runs the model's own kernel, and exchanges back; everything else (embeddings, MLP,
norms, the LM head and the loss) only ever sees the rank's slice. The batch itself is cut by
``bigscale.data.shard`` (labels shifted before the cut), for training only: evaluation and generation run
whole sequences with the model's own attention. The loss of a slice is its summed
token loss divided by the real tokens of the whole micro batch, so the slices add up to the
micro batch's mean and DeepSpeed's gradient reduction (summed over the group) gives exactly the
gradient of the unsplit run.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from bigscale.config.parallel import check_heads
from bigscale.data.tokenize import IGNORE_INDEX
from bigscale.errors import ConfigError

_KERNELS = ("sdpa", "flash_attention_2", "flash_attention_3")


def enable(model: torch.nn.Module, sp: int, micro_batch_size: int, name: str) -> Any:
    """Route the model's attention through Ulysses; returns the sequence-parallel state that
    ``deepspeed.initialize`` takes as ``mpu`` (its groups: consecutive ranks)."""
    config = model.config
    check_heads(config, sp, name)
    kernel = getattr(config, "_attn_implementation", None)
    if kernel not in _KERNELS:
        raise ConfigError(
            f"strategy.sequence_parallel_size={sp}: {name} runs attention with {kernel!r}, "
            f"which Ulysses cannot route; load it with model.attn_implementation=sdpa (or "
            "flash_attention_2 on a GPU)"
        )
    plain = ALL_ATTENTION_FUNCTIONS[kernel]
    if kernel == "sdpa":
        # DeepSpeed's wrapper drops the model's mask and gathers the position ids: sdpa on its
        # own would then be plainly causal and let packed documents see each other.
        ALL_ATTENTION_FUNCTIONS["sdpa"] = _document_sdpa
    mpu = UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=model,
        core_attn_implementation=kernel,
        sequence_parallel_size=sp,
        micro_batch_size=micro_batch_size,
        seq_length_is_variable=True,
    )
    ulysses = ALL_ATTENTION_FUNCTIONS[kernel]
    # Evaluation and generation run whole sequences on every rank (each rank its own examples,
    # with the model's own masks): the slices and the all-to-all are for training only.
    ALL_ATTENTION_FUNCTIONS[kernel] = functools.partial(_training_only, ulysses, plain)
    return mpu


def _training_only(
    ulysses: Callable[..., Any],
    plain: Callable[..., Any],
    module: torch.nn.Module,
    *args: Any,
    **kwargs: Any,
) -> Any:
    return (ulysses if module.training else plain)(module, *args, **kwargs)


def _document_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *args: Any,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """sdpa with a block-diagonal causal mask where the (gathered, whole-sequence) position ids
    restart inside a row, i.e. where the row packs several documents."""
    positions = kwargs.get("position_ids")
    if attention_mask is None and positions is not None and query.shape[2] > 1:
        attention_mask = document_mask(positions)
    return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)


def document_mask(position_ids: torch.Tensor) -> torch.Tensor | None:
    """``[batch, 1, seq, seq]`` True where a query may attend: same document, not ahead. None
    when no row restarts its positions (one document per row: plain causal is enough)."""
    starts = position_ids == 0
    if not bool(starts[:, 1:].any()):
        return None
    document = torch.cumsum(starts.long(), dim=1)
    same = document[:, :, None] == document[:, None, :]
    length = position_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    return (same & causal)[:, None]


def shard_loss(logits: torch.Tensor, shift_labels: torch.Tensor, loss_tokens: int) -> torch.Tensor:
    """This rank's part of the micro batch's mean token loss."""
    total = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        shift_labels.reshape(-1).to(logits.device),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return total / max(int(loss_tokens), 1)
