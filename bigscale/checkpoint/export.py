"""Write a Hugging Face model directory (sharded safetensors + config + tokenizer) that
``AutoModelForCausalLM.from_pretrained`` loads, from a checkpoint of any ZeRO stage.

The weights stream: each tensor is read from the memory-mapped shard files when its output shard
is written, so the memory an export needs is about one output shard (``max_shard_size``), not the
model; no rank gathers the whole model."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

from bigscale.logging import get_logger

log = get_logger(__name__)

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


@contextmanager
def atomic_dir(out_dir: Path) -> Iterator[Path]:
    """A staging directory that becomes ``out_dir`` only when the block completes: an
    interrupted export never leaves a directory that looks complete, and an existing one is
    replaced only once the new one is whole."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        yield staging
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


def parse_size(text: str) -> int:
    """``"2GB"``, ``"500MB"``, ``"64KB"`` or a byte count, in bytes (powers of 1000, as
    Hugging Face counts shard sizes)."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    value = str(text).strip().upper()
    for suffix, factor in units.items():
        if value.endswith(suffix):
            return int(float(value[: -len(suffix)]) * factor)
    return int(value)


def write_weights(weights: dict, out_dir: Path, dtype: torch.dtype | None, shard_bytes: int) -> int:
    """Write ``weights`` (lazy tensors: shape, dtype, ``contiguous()``) as safetensors shards of
    at most ``shard_bytes`` each (a single tensor larger than that gets a shard of its own), plus
    the index Hugging Face reads when there is more than one. Tied weights are written once;
    ``from_pretrained`` ties them again. Returns the number of shards."""
    shards: list[list[str]] = [[]]
    size, seen, total = 0, set(), 0
    for name, tensor in weights.items():
        key = _identity(tensor)
        if key in seen:
            continue
        seen.add(key)
        target = dtype if dtype is not None and tensor.dtype.is_floating_point else tensor.dtype
        nbytes = math.prod(tensor.shape) * target.itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
        total += nbytes
    names = (
        [WEIGHTS]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map = {}
    for file, members in zip(names, shards, strict=True):
        tensors = {}
        for name in members:
            t = weights[name].contiguous()
            tensors[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        save_file(tensors, out_dir / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(members, file))
        del tensors  # the next shard reuses this memory
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / INDEX).write_text(json.dumps(index, indent=2))
    return len(shards)


def _identity(tensor: object) -> tuple:
    if isinstance(tensor, torch.Tensor):  # tied weights of a stage-0 checkpoint share storage
        return ("storage", tensor.untyped_storage().data_ptr(), tensor.storage_offset())
    return ("object", id(tensor))


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


def export_checkpoint(
    source: Path, out_dir: Path, max_shard_size: str = "2GB", merge_lora: bool = False
) -> Path:
    """A checkpoint (any ZeRO stage) to a Hugging Face directory, on one CPU process, in the
    dtype the model was trained in. A LoRA checkpoint gives the adapter in peft's layout, or
    with ``merge_lora`` the base model with the adapter merged in."""
    from transformers import AutoConfig, AutoTokenizer

    from bigscale.dist.ds_files import lazy_consolidated_weights
    from bigscale.model.lora import is_lora_checkpoint

    root, tag = find_checkpoint(source)
    hf_dir = root / tag / HF_SUBDIR
    config = AutoConfig.from_pretrained(hf_dir)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    weights = lazy_consolidated_weights(root, tag)
    if is_lora_checkpoint(hf_dir):
        from bigscale.model.lora import adapter_state_dict, merged_state_dict, write_adapter

        adapter = adapter_state_dict(weights, hf_dir)
        with atomic_dir(out_dir) as staging:
            if merge_lora:
                # peft merges the adapter exactly as PeftModel.from_pretrained would apply it.
                with tempfile.TemporaryDirectory() as tmp:
                    write_adapter(adapter, hf_dir, Path(tmp))
                    merged = merged_state_dict(Path(tmp), len(tokenizer))
                write_weights(merged, staging, _dtype(config), parse_size(max_shard_size))
                config.save_pretrained(staging)
            else:
                write_adapter(adapter, hf_dir, staging)
            tokenizer.save_pretrained(staging)
        what = "merged model" if merge_lora else "LoRA adapter"
        log.info("exported %s/%s to %s (%s)", root, tag, out_dir, what)
        return Path(out_dir)
    with atomic_dir(out_dir) as staging:
        shards = write_weights(weights, staging, _dtype(config), parse_size(max_shard_size))
        config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    log.info("exported %s/%s to %s (%d weight file(s))", root, tag, out_dir, shards)
    return Path(out_dir)


def _dtype(config: object) -> torch.dtype | None:
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else None
