"""Fixtures shared by the unit tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def plan_llama(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A planning setup with no GPU: the test's own BIGSCALE_HOME and working directory, and
    the path of a tiny Llama's config (all the memory estimate reads; no weights), long enough
    for 64k-token sequences. The tests hand ``make_plan`` the hardware they pretend to have."""
    from transformers import LlamaConfig

    monkeypatch.setenv("BIGSCALE_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "llama"
    LlamaConfig(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=65536,
        attn_implementation="sdpa",
    ).save_pretrained(path)
    return path
