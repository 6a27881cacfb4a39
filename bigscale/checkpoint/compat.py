"""Which settings a checkpoint may not silently change on resume.

A different model, dataset, sequence shaping, global batch, ZeRO stage or seed would make the
resumed run something other than a continuation; the user gets the list of what changed and
can say it is intended with ``checkpoint.allow_config_change=true``. Other settings (max_steps,
logging, eval cadence) may change freely, and so may how the global batch is split into micro
batch x accumulation x ranks, as long as the product stays: every step still takes the same
samples, so a run may resume on another number of ranks, and on another sequence- or
tensor-parallel size (see ``_axis_may_change``).

The data is compared by content as well as by path: new contents under an old path are another
dataset. Its key is the one the tokenization cache names the data by (``files_fingerprint`` for
local files; ``datasets``' fingerprint, which follows the revision, for a hub dataset). A hub
dataset read as a stream has no such key without downloading it, so only its name is compared.
A checkpoint written before the key existed lacks it, and a missing key is not a change."""

from __future__ import annotations

from typing import Any

from bigscale.config.schema import DataConfig, FinetuneConfig, FinetuneMethod, TrainConfig
from bigscale.dist.layout import data_parallel_size

GLOBAL_BATCH = "global batch (micro_batch_size x grad_accum x ranks)"
LAYOUT = ("trainer.micro_batch_size", "trainer.grad_accum", "ranks")
"""The factors of the global batch: free to change while it stays, shown when it does not."""
CONTENTS = "contents of "
"""Prefix of the fingerprint keys holding a source's content key (``contents of data.path``)."""


def data_contents(cfg: DataConfig, known: dict[str, str]) -> dict[str, str]:
    """The content key of each training source, by the config key naming its path: the ones
    the data pipeline computed (``known``), else the hash of its local files (a stream's);
    none for a streamed hub dataset."""
    from bigscale.data.mixture import files_fingerprint, mixture_sources
    from bigscale.data.sources import is_hub, resolve_files

    out = {}
    for source in mixture_sources(cfg):
        if source.key in known:
            out[source.key] = known[source.key]
        elif not is_hub(source.cfg):
            out[source.key] = files_fingerprint(resolve_files(source.cfg.path))
    return out


def fingerprint(
    cfg: TrainConfig, world_size: int, contents: dict[str, str] | None = None
) -> dict[str, Any]:
    """What a resume compares; ``contents``: ``data_contents``, computed once per run."""
    t = cfg.trainer
    return {
        "model.name_or_path": cfg.model.name_or_path,
        "model.revision": cfg.model.revision,
        "model.gguf_file": cfg.model.gguf_file,
        "data.path": cfg.data.path,
        "data.style": cfg.data.style.value,
        "data.max_length": cfg.data.max_length,
        "data.packing": cfg.data.packing,
        "data.streaming": cfg.data.streaming,
        "data.mixture": [[m.path, m.weight] for m in cfg.data.mixture],
        **{f"{CONTENTS}{key}": value for key, value in (contents or {}).items()},
        GLOBAL_BATCH: t.global_batch(data_parallel_size(cfg.strategy, world_size)),
        "trainer.micro_batch_size": t.micro_batch_size,
        "trainer.grad_accum": t.grad_accum,
        "ranks": world_size,
        "strategy.zero_stage": cfg.strategy.zero_stage,
        **_axes(cfg),
        "trainer.seed": t.seed,
        **_finetune(cfg.finetune),
    }


AXES = ("strategy.sequence_parallel_size", "strategy.tensor_parallel_size")


def _axes(cfg: TrainConfig) -> dict[str, int]:
    """The model-parallel sizes: only recorded when used, so checkpoints of plain data-parallel
    runs (and older ones) compare as before."""
    s = cfg.strategy
    sizes = dict(zip(AXES, (s.sequence_parallel_size, s.tensor_parallel_size), strict=True))
    return {k: v for k, v in sizes.items() if v > 1}


def _finetune(f: FinetuneConfig) -> dict[str, Any]:
    """What is trained: a LoRA checkpoint holds no base weights, so it must not resume as full
    fine-tuning, nor as adapters of another shape or on other layers. Dropout may change."""
    lora = f.method == FinetuneMethod.lora
    return {
        "finetune.method": f.method.value,
        "finetune.r": f.r if lora else None,
        "finetune.alpha": f.alpha if lora else None,
        "finetune.target_modules": list(f.target_modules) if lora else None,
        "finetune.modules_to_save": list(f.modules_to_save) if lora else None,
    }


SEQUENCE_AXIS, TENSOR_AXIS = AXES
STAGE = "strategy.zero_stage"


def _axis_may_change(key: str, saved: dict[str, Any]) -> bool:
    """Whether a resume may change this axis's size (the global batch staying): both go through
    DeepSpeed's universal checkpoint, which holds every parameter whole with its fp32 weights
    and Adam moments. Ulysses does not split weights: ZeRO partitions them over every rank of
    the sequence-data-parallel world, so another sequence-parallel size is only another ZeRO
    world size. AutoTP's conversion merges each rank's slices from ZeRO's partitioned state,
    which stage 0 does not write (its optimizer lives whole in each tensor rank's file)."""
    return key == SEQUENCE_AXIS or saved.get(STAGE, 0) != 0


def changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    now = current.get(GLOBAL_BATCH)
    same_global_batch = saved.get(GLOBAL_BATCH, now) == now
    found = [
        _describe(key, saved[key], value)
        for key, value in current.items()
        if key in saved
        and saved[key] != value
        and not (same_global_batch and key in LAYOUT)
        and key not in AXES
    ]
    # Absent means 1 (not recorded for plain data parallel, nor before the axes existed).
    for key in AXES:
        if saved.get(key, 1) != current.get(key, 1) and not _axis_may_change(key, saved):
            found.append(_describe(key, saved.get(key, 1), current.get(key, 1)))
    return found


def _describe(key: str, saved: Any, now: Any) -> str:
    if key.startswith(CONTENTS):
        return (
            f"the contents of {key.removeprefix(CONTENTS)} changed since the checkpoint was "
            f"written (content key {str(saved)[:12]} then, {str(now)[:12]} now)"
        )
    if key == TENSOR_AXIS:
        return (
            f"{key}: {saved!r} in the checkpoint, {now!r} now (DeepSpeed's universal checkpoint, "
            "which re-slices the weights, is built from ZeRO's partitioned optimizer files, and "
            "ZeRO stage 0 writes none: the tensor-parallel size may change only for a checkpoint "
            f"of strategy=zero1 or zero2, so resume with {key}={saved!r}; what may change here, "
            "while the global batch stays, is strategy.sequence_parallel_size, the number of "
            "data-parallel ranks, trainer.micro_batch_size and trainer.grad_accum; `bigscale "
            "export` reads a checkpoint of any layout)"
        )
    return f"{key}: {saved!r} in the checkpoint, {now!r} now"
