"""Whether a model keeps packed documents apart.

A packed row holds several documents. bigscale passes their restarting ``position_ids`` and no
attention mask; transformers' mask builder (``masking_utils.create_causal_mask``) reads document
boundaries from them and builds a block-diagonal causal mask for sdpa, eager and flex attention,
and flash_attention_2 turns them into variable-length sequences. A model whose code does not go
through that builder (older or ``trust_remote_code`` models) would let a document attend to the
ones before it in the row, so the trainer warns.
"""

from __future__ import annotations

import sys

from torch import nn

_MASK_BUILDERS = ("create_causal_mask", "create_sliding_window_causal_mask")
_VARLEN_KERNELS = ("flash_attention_2", "flash_attention_3")


def separates_packed_documents(model: nn.Module) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    implementation = getattr(base.config, "_attn_implementation", None)
    if implementation in _VARLEN_KERNELS:
        return True
    module = sys.modules.get(type(base).__module__)
    return any(callable(getattr(module, name, None)) for name in _MASK_BUILDERS)
