"""Causal-LM loss computed a chunk of tokens at a time, so the full logits never exist.

The usual loss builds logits for every token (``tokens x vocab``), upcasts them to fp32 and keeps
log-softmax's fp32 output for backward: for Llama-3's 128k vocabulary at 8k tokens that is about
4 GiB per copy, often more than all the layers' activations together. Here the LM head and the
cross-entropy run on ``chunk_tokens`` tokens at a time under activation checkpointing: forward
keeps only the head's input (already held by the model), and backward recomputes one chunk's
logits at a time. The price is one extra head matmul per token in backward (for a 1B Llama about
7% more FLOPs). The loss is the model's own: the mean over labelled tokens of the next-token
cross-entropy, with the logits taken in the compute dtype and upcast to fp32, as transformers does.

Under ZeRO-3 the head's weight is used outside the head's own forward; DeepSpeed notices the
access during the model's forward and gathers it as an external parameter of the model.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from bigscale.data.tokenize import IGNORE_INDEX
from bigscale.errors import ModelError

# Config attributes of models whose forward transforms the logits before the loss (Gemma-2's
# soft-capping, Cohere's and Granite's scaling): the head alone would give a different loss.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def chunked_cross_entropy(
    hidden: torch.Tensor, labels: torch.Tensor, head: nn.Linear, chunk_tokens: int
) -> torch.Tensor:
    """Mean next-token cross-entropy of ``head(hidden)`` against ``labels`` (``-100``: no loss),
    equal to transformers' ``ForCausalLMLoss`` on the full logits."""
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]  # position t predicts t + 1
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    total = hidden.new_zeros((), dtype=torch.float32)
    # Chunks by position, not by labelled token: selecting the labelled ones would need their
    # count on the host, a device sync every micro batch.
    for h, y in zip(hidden.split(chunk_tokens), targets.split(chunk_tokens), strict=True):
        total = total + checkpoint(_loss_sum, h, y, head.weight, head.bias, use_reentrant=False)
    return total / (targets != IGNORE_INDEX).sum()


def chunked_token_logps(
    hidden: torch.Tensor, labels: torch.Tensor, head: nn.Linear, chunk_tokens: int
) -> torch.Tensor:
    """Log-probability of each next token under ``head(hidden)``, 0 where the label is -100:
    ``[batch, length]``, position t scoring the token at t + 1 (a preference objective sums
    them per sequence), a chunk of positions at a time as ``chunked_cross_entropy``."""
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    flat = hidden.reshape(-1, hidden.shape[-1])
    parts = [
        checkpoint(_token_logps, h, y, head.weight, head.bias, use_reentrant=False)
        for h, y in zip(
            flat.split(chunk_tokens), targets.reshape(-1).split(chunk_tokens), strict=True
        )
    ]
    return torch.cat(parts).view(targets.shape)


def _token_logps(
    hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias).float()
    return -F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none")


def _loss_sum(
    hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def install_chunked_loss(model: PreTrainedModel, chunk_tokens: int) -> None:
    """Replace ``model``'s forward, when it is given labels, by the decoder plus the chunked
    loss; without labels (generation) the model's own forward runs. Parameters and state dict
    are untouched, so checkpoints and exports are the same as without it."""
    for attribute in _LOGIT_TRANSFORMS:
        if getattr(model.config, attribute, None) not in (None, 1, 1.0):
            raise ModelError(
                f"model.loss_chunk_tokens: {type(model).__name__} applies "
                f"config.{attribute}={getattr(model.config, attribute)} to its logits, which the "
                "chunked loss does not reproduce; set model.loss_chunk_tokens=0"
            )
    own_forward = model.forward

    # generate() reads the forward's signature to decide what to pass (logits_to_keep, ...).
    @functools.wraps(own_forward)
    def forward(
        input_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        token_logps: bool = False,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        if labels is None:
            return own_forward(input_ids=input_ids, **kwargs)
        head = model.get_output_embeddings()
        if type(head) is not nn.Linear:
            # peft's wrappers (LoRA or modules_to_save on the head) change what the head computes.
            raise ModelError(
                f"model.loss_chunk_tokens needs the output layer to be a plain nn.Linear, not "
                f"{type(head).__name__}; leave lm_head out of finetune.target_modules and "
                "finetune.modules_to_save, or set model.loss_chunk_tokens=0"
            )
        hidden = model.base_model(input_ids=input_ids, **kwargs).last_hidden_state
        if token_logps:  # a preference objective's per-token log-probs, in the logits' place
            return CausalLMOutputWithPast(
                logits=chunked_token_logps(hidden, labels, head, chunk_tokens)
            )
        return CausalLMOutputWithPast(
            loss=chunked_cross_entropy(hidden, labels, head, chunk_tokens)
        )

    model.forward = forward
