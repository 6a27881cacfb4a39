"""Published model shapes, for building a same-shaped model from a config where the hub is out
of reach: benchmarks (random weights are fine for speed and memory) and the tests of the memory
and FLOP arithmetic."""

from __future__ import annotations

LLAMA_3_2_1B: dict[str, int | bool] = {
    "vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": True,
}
"""The size-setting fields of meta-llama/Llama-3.2-1B's config.json (head_dim 64 follows)."""
LLAMA_3_2_1B_PARAMS = 1_235_814_400
"""Its parameter count, the tied embedding counted once."""
