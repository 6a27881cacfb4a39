"""Write a Hugging Face model directory (sharded safetensors + config + tokenizer) that
``AutoModelForCausalLM.from_pretrained`` loads, from a checkpoint of any ZeRO stage.

The weights stream: each tensor is read from the memory-mapped shard files when its output shard
is written, so the memory an export needs is about one output shard (``max_shard_size``), not the
model; no rank gathers the whole model."""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from bigscale.checkpoint.select import (
    LATEST,
    MANIFEST,
    check_files,
    complete_tags,
    select_resume_point,
)
from bigscale.checkpoint.storage import storage_failure
from bigscale.errors import BigscaleError, CheckpointError
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


@dataclass(frozen=True)
class Found:
    root: Path
    tag: str
    notes: list[str] = field(default_factory=list)
    """What the user should know about the choice: damaged checkpoints passed over, a
    ``latest`` naming a checkpoint that is not there."""

    @property
    def directory(self) -> Path:
        return self.root / self.tag


def find_checkpoint(source: Path, sha256: bool = True) -> Found:
    """The intact checkpoint to export from a run directory, a checkpoints/ folder or one
    checkpoint, checked against its manifest (sizes, and contents with ``sha256``).

    One named checkpoint must be intact. A run directory gives the newest intact complete one
    (the choice ``resume=auto`` makes), saying which newer ones it passed over and why."""
    source = Path(source)
    if (source / MANIFEST).is_file() or any(source.glob("*model_states.pt")):
        problem = check_files(source, sha256)
        if problem:
            raise CheckpointError(f"refusing to export {source}: {problem}")
        return Found(source.parent, source.name)
    for root in (source / "checkpoints", source):
        latest = root / LATEST
        if not (latest.is_file() or complete_tags(root)):
            continue
        choice = select_resume_point(root, "auto", sha256)
        notes = [f"skipped {p.tag}, which is damaged: {p.message}" for p in choice.skipped]
        named = latest.read_text().strip() if latest.is_file() else None
        if choice.point is None:
            why = "; ".join(notes) if notes else f"{root} holds no complete checkpoint"
            if named and not (root / named).is_dir():
                why = f"{latest} names {named}, which does not exist; " + why
            raise CheckpointError(f"no intact checkpoint to export under {root}: {why}")
        tag = choice.point.name
        if named and named != tag and not (root / named).is_dir():
            notes.append(f"{latest} names {named}, which does not exist")
        if notes:
            notes.append(f"exporting {tag}, the newest intact checkpoint")
        return Found(root, tag, notes)
    raise CheckpointError(
        f"no checkpoint under {source}: expected a run directory (with checkpoints/), a "
        "checkpoints/ folder, or a checkpoint directory (with manifest.json)"
    )


def export_checkpoint(
    source: Path,
    out_dir: Path,
    max_shard_size: str = "2GB",
    merge_lora: bool = False,
    sha256: bool = True,
) -> Found:
    """A checkpoint (any ZeRO stage, any tensor-parallel size), verified first (see
    ``find_checkpoint``), to a Hugging Face directory, on one CPU process, in the dtype the model
    was trained in. A LoRA checkpoint gives the adapter in peft's layout, or with
    ``merge_lora`` the base model with the adapter merged in. Returns what it exported, with
    notes for the caller to show; refusals are CheckpointErrors."""
    found = find_checkpoint(source, sha256)
    try:
        _export(found.root, found.tag, Path(out_dir), max_shard_size, merge_lora)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refusing to load {found.directory}: it holds objects other than tensors and plain "
            f"data, which could run code ({str(exc).splitlines()[0]})"
        ) from None
    except OSError as exc:
        if exc.filename is not None and Path(exc.filename).is_relative_to(found.root):
            raise  # reading the verified checkpoint failed: not a user's mistake
        reason = storage_failure(exc, Path(out_dir)) or f"{exc.strerror or exc}"
        raise CheckpointError(f"cannot write the export to {out_dir}: {reason}") from None
    return found


def _export(root: Path, tag: str, out_dir: Path, max_shard_size: str, merge_lora: bool) -> None:
    from transformers import AutoConfig, AutoTokenizer

    from bigscale.checkpoint.tp_merge import merged_tensor_parallel_weights
    from bigscale.dist.ds_files import lazy_consolidated_weights, tensor_parallel_size
    from bigscale.model.lora import is_lora_checkpoint

    hf_dir = root / tag / HF_SUBDIR
    config = AutoConfig.from_pretrained(hf_dir)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    weights = (
        merged_tensor_parallel_weights(root / tag, config)
        if tensor_parallel_size(root / tag) > 1
        else lazy_consolidated_weights(root, tag)
    )
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
                inference_config(config).save_pretrained(staging)
            else:
                write_adapter(adapter, hf_dir, staging)
            if not is_classifier_config(config):
                generation_config(hf_dir, config, tokenizer).save_pretrained(staging)
            tokenizer.save_pretrained(staging)
        what = "merged model" if merge_lora else "LoRA adapter"
        log.info("exported %s/%s to %s (%s)", root, tag, out_dir, what)
        return
    with atomic_dir(out_dir) as staging:
        shards = write_weights(weights, staging, _dtype(config), parse_size(max_shard_size))
        inference_config(config).save_pretrained(staging)
        if not is_classifier_config(config):
            generation_config(hf_dir, config, tokenizer).save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    log.info("exported %s/%s to %s (%d weight file(s))", root, tag, out_dir, shards)


def _dtype(config: object) -> torch.dtype | None:
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else None


def is_classifier_config(config: Any) -> bool:
    """A reward model's (``objective=reward``): its export is a sequence classifier, loaded
    with ``AutoModelForSequenceClassification``, its config carrying ``num_labels=1`` and the
    pad id it pools at; it generates nothing, so it gets no generation config."""
    return any(a.endswith("ForSequenceClassification") for a in config.architectures or [])


GENERATION_CONFIG = "generation_config.json"


def save_generation_config(model: object, directory: Path) -> None:
    """The model's generation settings (the source's ``generation_config.json`` when it had
    one) beside its config in a checkpoint, for the export to carry on."""
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(directory)


def inference_config(config: Any) -> Any:
    """``config`` as inference wants it: training with gradient checkpointing turned the KV
    cache off, and an export that kept that would recompute every prefix in ``generate()``."""
    if hasattr(config, "use_cache"):
        config.use_cache = True
    return config


def generation_config(hf_dir: Path, config: Any, tokenizer: Any) -> Any:
    """The checkpoint's generation config (or one derived from the model config, for
    checkpoints saved without it), with the cache on and the tokenizer's ends added: EOS and
    the chat template's end-of-turn marker when that is one token, so a plain ``generate()``
    stops where the fine-tuned model ends its answers."""
    from transformers import GenerationConfig

    from bigscale.generation import answer_end

    if (hf_dir / GENERATION_CONFIG).is_file():
        generation = GenerationConfig.from_pretrained(hf_dir)
    else:
        generation = GenerationConfig.from_model_config(config)
    generation.use_cache = True
    try:
        ends = answer_end(tokenizer, chat=bool(getattr(tokenizer, "chat_template", None)))
    except BigscaleError:  # a template that cannot render the probe conversation: EOS only
        ends = answer_end(tokenizer, chat=False)
    eos = generation.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    eos += [i for i in ends.eos_ids if i not in eos]
    if eos:
        generation.eos_token_id = eos[0] if len(eos) == 1 else eos
    if generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id
    if generation.bos_token_id is None:
        generation.bos_token_id = tokenizer.bos_token_id
    return generation
