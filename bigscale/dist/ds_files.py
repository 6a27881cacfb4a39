"""DeepSpeed's checkpoint files on disk: reading them safely, converting them to the universal
(world-size independent) format, and reading the full weights lazily, one tensor at a time.

With ``engine.py``, the only place that touches DeepSpeed; this half never needs a live engine
or a process group beyond the universal conversion's broadcast."""

from __future__ import annotations

import argparse
import io
import math
import os
import pickle
import shutil
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any, Protocol

import torch

from bigscale.errors import CheckpointError

UNIVERSAL = "universal"


def zero_partitions(checkpoint: Path) -> int:
    """How many ranks the checkpoint's ZeRO optimizer state is partitioned over (0: stage 0,
    whose optimizer state is whole)."""
    return len(list(checkpoint.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt")))


def universal_copy(checkpoint: Path) -> Path:
    """``checkpoint`` in DeepSpeed's universal format, independent of the world size: one
    directory per parameter with its fp32 weights and Adam moments. Rank 0 converts while the
    others wait; every rank gets rank 0's error if the conversion fails."""
    target = checkpoint / UNIVERSAL
    error: tuple[bool, str] | None = None
    if torch.distributed.get_rank() == 0 and not target.is_dir():
        work = checkpoint / f".{UNIVERSAL}-partial"
        shutil.rmtree(work, ignore_errors=True)
        try:
            _convert_to_universal(checkpoint, work / UNIVERSAL)
            os.replace(work / UNIVERSAL, target)
        except Exception as exc:  # every rank must hear of it, not only this one
            error = (isinstance(exc, pickle.UnpicklingError), f"{type(exc).__name__}: {exc}")
        finally:
            shutil.rmtree(work, ignore_errors=True)
    box = [error]
    torch.distributed.broadcast_object_list(box, src=0)
    if box[0] is not None:
        unsafe, message = box[0]
        if unsafe:  # refused by weights_only_loading, like any other load
            raise pickle.UnpicklingError(message)
        raise CheckpointError(
            f"could not convert {checkpoint} to DeepSpeed's universal format to resume it on "
            f"{torch.distributed.get_world_size()} ranks ({message}); resume with the number "
            "of ranks that wrote it"
        )
    return target


def _convert_to_universal(checkpoint: Path, out: Path) -> None:
    # DeepSpeed's converter (its ``ds_to_universal`` script) taken as a library: one process
    # (worker pools would unpickle outside weights_only_loading), its progress output hushed.
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(
        input_folder=str(checkpoint),
        output_folder=str(out),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        # A plain Hugging Face model carries no Megatron-style tensor-parallel merge rules.
        inject_missing_state=True,
    )
    sink = io.StringIO()
    with weights_only_loading(), redirect_stdout(sink), redirect_stderr(sink):
        staged = _with_true_tensor_degree(checkpoint, out.parent / "staged")
        args.input_folder = str(staged or checkpoint)
        ds_to_universal.main(args)


PARALLEL_DIMS = "checkpoint_parallel_dimensions"


def _with_true_tensor_degree(checkpoint: Path, staging: Path) -> Path | None:
    """A view of ``checkpoint`` whose recorded tensor-parallel degree matches its files, or
    None when it already does. DeepSpeed 0.19.8 records the Ulysses sequence-parallel size as
    the tensor-parallel degree (the sequence-parallel state answers the model-parallel size
    query) while writing one model-state file, as the weights are not split; its converter
    then refuses the count. The view links every file and rewrites only the small model-state
    file, without the module weights, which a universal load takes from the fp32 state."""
    model_files = sorted(checkpoint.glob("mp_rank_*_model_states.pt"))
    if len(model_files) != 1:
        return None
    states = _mmap_load(model_files[0])
    dims = dict(states.get(PARALLEL_DIMS) or {})
    if dims.get("pp_degree", 1) != 1 or dims.get("tp_degree", 1) == 1:
        return None
    staging.mkdir(parents=True)
    for item in checkpoint.iterdir():
        if item.is_file() and item != model_files[0]:
            (staging / item.name).symlink_to(item.resolve())
    torch.save(
        {**states, "module": {}, PARALLEL_DIMS: {**dims, "tp_degree": 1}},
        staging / model_files[0].name,
    )
    return staging


@contextmanager
def weights_only_loading() -> Iterator[None]:
    """Every ``torch.load`` inside, DeepSpeed's included, unpickles with ``weights_only=True``
    (DeepSpeed asks for full unpickling), with only DeepSpeed's plain data classes (loss scaler,
    stage enum, fragment address) allowed, so a tampered checkpoint cannot run code."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
            yield
    finally:
        if previous is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


class LazyTensor(Protocol):
    """A tensor described by shape and dtype, read from disk only by ``contiguous()``."""

    shape: torch.Size
    dtype: torch.dtype

    def contiguous(self) -> torch.Tensor: ...


class _SpanOfPartitions:
    """One parameter inside a ZeRO-1/2 flat group: the group is the concatenation of every rank's
    partition, and the parameter a span of it that may cross from one rank's part to the next.
    DeepSpeed's own converter concatenates whole groups, a full fp32 copy of the model."""

    def __init__(self, parts: list[torch.Tensor], offset: int, shape: torch.Size):
        self.parts, self.offset, self.shape = parts, offset, torch.Size(shape)
        self.dtype = parts[0].dtype

    def contiguous(self) -> torch.Tensor:
        start, end = self.offset, self.offset + math.prod(self.shape)
        pieces, base = [], 0
        for part in self.parts:
            lo, hi = max(start, base), min(end, base + part.numel())
            if lo < hi:
                pieces.append(part[lo - base : hi - base])
            base += part.numel()
        return torch.cat(pieces).view(self.shape)


def tensor_parallel_size(tag_dir: Path) -> int:
    """How many tensor-parallel ranks wrote the checkpoint: one ``mp_rank_NN_model_states.pt``
    each, holding that rank's slice of every split weight."""
    return max(1, len(list(Path(tag_dir).glob("mp_rank_*_model_states.pt"))))


def lazy_consolidated_weights(checkpoint_root: Path, tag: str) -> dict[str, LazyTensor]:
    """The full fp32 weights of a checkpoint of any ZeRO stage, by name, each read only when
    asked for. The shard files are memory-mapped, so exporting a model needs about one tensor
    (or one output shard) of memory, not the model. Tied parameters map to the same object.
    A tensor-parallel checkpoint is refused here: its slices need the model's full shapes to be
    put together (``bigscale.checkpoint.tp_merge``)."""
    tag_dir = Path(checkpoint_root) / tag
    if tensor_parallel_size(tag_dir) > 1:
        raise CheckpointError(
            f"{tag_dir} was written with strategy.tensor_parallel_size > 1: each rank holds a "
            "slice of the weights; read it with bigscale.checkpoint.tp_merge"
        )
    with weights_only_loading():
        optim_files = sorted(tag_dir.glob("*optim_states.pt"))
        if not optim_files:  # ZeRO stage 0 keeps the whole module in one file
            states = _mmap_load(tag_dir / "mp_rank_00_model_states.pt")
            return dict(states["module"].items())
        first = _mmap_load(optim_files[0])["optimizer_state_dict"]
        if int(first["zero_stage"]) == 3:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            with redirect_stdout(io.StringIO()):
                return get_fp32_state_dict_from_zero_checkpoint(
                    str(checkpoint_root), tag=tag, lazy_mode=True
                )
        return _zero12_lazy(tag_dir, optim_files)


def universal_checkpoint_info(tag_dir: Path) -> dict[str, Any]:
    """What DeepSpeed recorded of how AutoTP split each parameter (empty when it did not)."""
    with weights_only_loading():
        states = _mmap_load(Path(tag_dir) / "mp_rank_00_model_states.pt")
    return dict(states.get("universal_checkpoint_info") or {})


def lazy_rank_weights(tag_dir: Path, mp_rank: int) -> dict[str, LazyTensor]:
    """The fp32 weights one tensor-parallel rank held (ZeRO 0-2, the stages AutoTP trains
    with), by name, read lazily: split matrices as that rank's slice, the rest whole."""
    tag_dir = Path(tag_dir)
    with weights_only_loading():
        optim_files = sorted(tag_dir.glob(f"*_mp_rank_{mp_rank:02d}_optim_states.pt"))
        if not optim_files:
            states = _mmap_load(tag_dir / f"mp_rank_{mp_rank:02d}_model_states.pt")
            return dict(states["module"].items())
        return _zero12_lazy(tag_dir, optim_files, mp_rank)


def _zero12_lazy(
    tag_dir: Path, optim_files: list[Path], mp_rank: int = 0
) -> dict[str, LazyTensor]:
    optim = [_mmap_load(f)["optimizer_state_dict"] for f in _by_rank(optim_files)]
    model = _mmap_load(tag_dir / f"mp_rank_{mp_rank:02d}_model_states.pt")
    out: dict[str, Any] = {
        name: tensor for name, tensor in model["module"].items() if name in model["buffer_names"]
    }
    out.update(model.get("frozen_param_fragments") or {})
    paddings = optim[0].get("param_alignment_paddings")
    for group, shapes in enumerate(model["param_shapes"]):
        parts = [o["single_partition_of_fp32_groups"][group] for o in optim]
        offset = 0
        for index, (name, shape) in enumerate(shapes.items()):
            out[name] = _SpanOfPartitions(parts, offset, shape)
            offset += math.prod(shape) + (paddings[group][index] if paddings else 0)
    for name, source in model["shared_params"].items():
        if source in out:
            out[name] = out[source]
    return out


def _by_rank(files: list[Path]) -> list[Path]:
    # zero_pp_rank_<N>_mp_rank_00_optim_states.pt: order by N, not as text (rank 10 < rank 2).
    return sorted(files, key=lambda f: int(f.name.split("zero_pp_rank_")[1].split("_")[0]))


def _mmap_load(path: Path) -> Any:
    # Only torch's zip format can be memory-mapped; anything else (an old format, or a file
    # planted in the checkpoint) is read whole, still with weights_only.
    return torch.load(path, map_location="cpu", mmap=zipfile.is_zipfile(path), weights_only=True)


def load_consolidated_weights(checkpoint_root: Path, tag: str) -> dict[str, torch.Tensor]:
    """All of :func:`lazy_consolidated_weights` read into memory (for small models and tests)."""
    lazy = lazy_consolidated_weights(checkpoint_root, tag)
    return {name: tensor.contiguous().float() for name, tensor in lazy.items()}
