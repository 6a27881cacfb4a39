"""Which attention kernel to load a model with, and whether the model keeps packed documents
apart.

A packed row holds several documents. bigscale passes their restarting ``position_ids`` and no
attention mask; transformers' mask builder (``masking_utils.create_causal_mask``) reads document
boundaries from them and builds a block-diagonal causal mask for sdpa, eager and flex attention,
and flash_attention_2 turns them into variable-length sequences. A model whose code does not go
through that builder (older or ``trust_remote_code`` models) would let a document attend to the
ones before it in the row, so the trainer warns.
"""

from __future__ import annotations

import importlib.util
import sys

import torch
from torch import nn

from bigscale.config.schema import AttnImplementation
from bigscale.errors import ModelError

_MASK_BUILDERS = ("create_causal_mask", "create_sliding_window_causal_mask")
_VARLEN_KERNELS = ("flash_attention_2", "flash_attention_3")


def separates_packed_documents(model: nn.Module) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    implementation = getattr(base.config, "_attn_implementation", None)
    if implementation in _VARLEN_KERNELS:
        return True
    module = sys.modules.get(type(base).__module__)
    return any(callable(getattr(module, name, None)) for name in _MASK_BUILDERS)


def attention_kernel(requested: AttnImplementation, dtype: torch.dtype) -> str:
    """The ``attn_implementation`` to load with: ``auto`` resolved, ``flash_attention_2``
    refused with the fix where it cannot run."""
    flash_ok, why_not = _flash_attention_usable(dtype)
    if requested is AttnImplementation.auto:
        return "flash_attention_2" if flash_ok else "sdpa"
    if requested is AttnImplementation.flash_attention_2 and not flash_ok:
        raise ModelError(
            f"model.attn_implementation=flash_attention_2: {why_not}; use "
            "model.attn_implementation=auto (sdpa where flash attention cannot run) or sdpa"
        )
    return requested.value


def _flash_attention_usable(dtype: torch.dtype) -> tuple[bool, str]:
    if importlib.util.find_spec("flash_attn") is None:
        return False, "the flash-attn package is not installed (pip install flash-attn)"
    if not torch.cuda.is_available():
        return False, "it needs a CUDA GPU"
    if dtype not in (torch.bfloat16, torch.float16):
        return False, f"it needs bf16 or fp16 weights, not {dtype} (trainer.precision=bf16)"
    return True, ""
