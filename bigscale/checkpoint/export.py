"""Write a Hugging Face model directory (safetensors + config + tokenizer) that
``AutoModelForCausalLM.from_pretrained`` loads and can ``generate`` with."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase


def save_pretrained_dir(
    model: PreTrainedModel,
    state_dict: dict[str, torch.Tensor],
    tokenizer: PreTrainedTokenizerBase,
    out_dir: Path,
) -> Path:
    """Save under a temporary name, then rename: an interrupted export never leaves a directory
    that looks complete. An existing export at ``out_dir`` is replaced only once the new one is
    whole."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        # The model object only supplies config and naming; the weights come from state_dict
        # (under ZeRO-3 the module's own parameters are empty partitions).
        model.save_pretrained(staging, state_dict=state_dict)
        tokenizer.save_pretrained(staging)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            os.replace(staging, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir
