"""Checks that an exported model directory is ready for plain transformers inference."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Cache


def assert_generates_with_cache(export: Path, eos_ids: list[int] | None = None) -> None:
    """``export`` loads with the KV cache on and a generation config whose EOS ids include
    ``eos_ids`` (default: the exported tokenizer's EOS), and a plain ``generate()`` on it
    builds and returns a cache."""
    tokenizer = AutoTokenizer.from_pretrained(export)
    want = eos_ids if eos_ids is not None else [tokenizer.eos_token_id]
    assert json.loads((export / "config.json").read_text()).get("use_cache") is True
    saved = json.loads((export / "generation_config.json").read_text())
    eos = saved["eos_token_id"]
    assert set(want) <= set(eos if isinstance(eos, list) else [eos]), saved
    assert saved["pad_token_id"] == tokenizer.pad_token_id, saved

    model = AutoModelForCausalLM.from_pretrained(export).eval()
    assert model.config.use_cache is True
    assert model.generation_config.use_cache is True
    prompt = torch.tensor([tokenizer("1+2=", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model.generate(
            prompt, max_new_tokens=3, do_sample=False, return_dict_in_generate=True
        )
    assert isinstance(out.past_key_values, Cache), type(out.past_key_values)
    assert out.past_key_values.get_seq_length() >= prompt.shape[1]
