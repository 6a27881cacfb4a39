"""Small transformers models built from a config in memory, for tests that need a real forward."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM


def tiny_llama(seed: int = 0, **overrides: object) -> LlamaForCausalLM:
    """Two layers, width 32, 4 heads; ``overrides`` go to ``LlamaConfig``."""
    torch.manual_seed(seed)
    dims: dict[str, object] = {
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 64,
    }
    return LlamaForCausalLM(LlamaConfig(**{**dims, **overrides}))


def plan_llama_config(**changes: object) -> LlamaConfig:
    """Three layers, width 256, 4 query and 2 key-value heads, sdpa: big enough for the memory
    estimate's terms to be measurable, small enough to build on a CPU; ``changes`` go to
    ``LlamaConfig``."""
    dims: dict[str, object] = {
        "vocab_size": 1000,
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "attn_implementation": "sdpa",
    }
    return LlamaConfig(**{**dims, **changes})


def tiny_gpt2(seed: int = 0, **overrides: object) -> GPT2LMHeadModel:
    """Two layers, width 32, 4 heads; ``overrides`` go to ``GPT2Config``."""
    torch.manual_seed(seed)
    dims: dict[str, object] = {"vocab_size": 64, "n_embd": 32, "n_layer": 2, "n_head": 4}
    return GPT2LMHeadModel(GPT2Config(**{**dims, **overrides}))
