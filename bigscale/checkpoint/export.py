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


# The Hugging Face files (config, tokenizer) saved beside DeepSpeed's shards, so a checkpoint
# can be exported on its own without the original model source.
HF_SUBDIR = "hf"


def find_checkpoint(source: Path) -> tuple[Path, str]:
    """(checkpoint root, tag) for a run directory, a checkpoints/ folder or one checkpoint."""
    source = Path(source)
    for root in (source / "checkpoints", source):
        latest = root / "latest"
        if latest.is_file():
            return root, latest.read_text().strip()
    if any(source.glob("*model_states.pt")):
        return source.parent, source.name
    raise FileNotFoundError(
        f"no checkpoint under {source}: expected a run directory (with checkpoints/latest), a "
        "checkpoints/ folder, or a checkpoint directory holding *model_states.pt"
    )


def export_run(source: Path, out_dir: Path) -> Path:
    """A checkpoint (any ZeRO stage) to a Hugging Face directory, on one CPU process."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from bigscale.dist.engine import load_consolidated_weights

    root, tag = find_checkpoint(source)
    hf_dir = root / tag / HF_SUBDIR
    config = AutoConfig.from_pretrained(hf_dir)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    state = load_consolidated_weights(root, tag)
    return save_pretrained_dir(model, state, tokenizer, out_dir)
