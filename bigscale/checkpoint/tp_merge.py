"""The full weights of a tensor-parallel (DeepSpeed AutoTP) checkpoint, put back together from the
slices each tensor rank saved (``mp_rank_NN_model_states.pt`` and its ZeRO 0-2 optimizer files).

AutoTP cuts a column-parallel linear layer (q/k/v, gate/up, the LM head) along its output rows,
dim 0, and a row-parallel one (o_proj, down_proj) along its input columns, dim 1; norms,
embeddings and row-parallel biases stay whole on every rank. The slices need not be equal (a
101-token vocabulary splits 51 + 50). Rather than re-deriving DeepSpeed's rules per layer type,
the dim is read off the model's own full shapes (its config, built on the meta device): the one
dim in which a rank's slice is smaller than the full tensor, the slices adding up to it. Each
merged tensor is still read lazily, so an export needs one full tensor of memory at a time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bigscale.dist.ds_files import (
    LazyTensor,
    lazy_rank_weights,
    tensor_parallel_size,
    universal_checkpoint_info,
)
from bigscale.errors import CheckpointError


class _Concatenated:
    """One weight as the concatenation of the tensor ranks' slices along ``dim``."""

    def __init__(self, parts: list[LazyTensor], dim: int, shape: torch.Size):
        self.parts, self.dim, self.shape = parts, dim, torch.Size(shape)
        self.dtype = parts[0].dtype

    def contiguous(self) -> torch.Tensor:
        return torch.cat([p.contiguous() for p in self.parts], dim=self.dim)


def full_shapes(config: Any) -> dict[str, torch.Size]:
    """Every weight's shape in the Hugging Face model ``config`` describes, without memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name: t.shape for name, t in model.state_dict().items()}


def merged_tensor_parallel_weights(tag_dir: Path, config: Any) -> dict[str, LazyTensor]:
    """The full weights of the tensor-parallel checkpoint ``tag_dir``, by name, lazily; tied
    weights stay one object. Refuses (CheckpointError) a layout a plain concatenation cannot
    undo: fused projections split per sub-parameter, or slices that do not add up."""
    tag_dir = Path(tag_dir)
    tp = tensor_parallel_size(tag_dir)
    _refuse_fused(tag_dir)
    ranks = [lazy_rank_weights(tag_dir, r) for r in range(tp)]
    expected = full_shapes(config)
    merged: dict[tuple[int, ...], LazyTensor] = {}
    out: dict[str, LazyTensor] = {}
    for name in ranks[0]:
        parts = [weights.get(name) for weights in ranks]
        if any(p is None for p in parts):
            raise CheckpointError(f"{tag_dir}: {name} is missing from some tensor-parallel ranks")
        key = tuple(id(p) for p in parts)
        if key not in merged:
            merged[key] = merge_slices(name, parts, expected.get(name), tag_dir)  # type: ignore[arg-type]
        out[name] = merged[key]
    return out


def merge_slices(
    name: str, parts: list[LazyTensor], full: torch.Size | None, tag_dir: Path
) -> LazyTensor:
    shapes = [tuple(p.shape) for p in parts]
    if full is None:  # not in the model's state dict (a buffer DeepSpeed kept): as saved
        if len(set(shapes)) == 1:
            return parts[0]
        raise CheckpointError(f"{tag_dir}: {name} has slices {shapes} and no known full shape")
    if all(s == tuple(full) for s in shapes):
        return parts[0]  # replicated on every tensor rank: each copy is the same
    differing = {
        d for s in shapes for d in range(len(full)) if len(s) != len(full) or s[d] != full[d]
    }
    if len(differing) == 1 and all(len(s) == len(full) for s in shapes):
        dim = differing.pop()
        if sum(s[dim] for s in shapes) == full[dim]:
            return _Concatenated(parts, dim, full)
    raise CheckpointError(
        f"{tag_dir}: the tensor-parallel slices of {name} {shapes} do not put together into "
        f"its full shape {tuple(full)} along one dim; the checkpoint does not match the model "
        "config saved beside it"
    )


def _refuse_fused(tag_dir: Path) -> None:
    # A fused projection (qkv in one matrix, gate+up) is cut per sub-parameter: each rank holds
    # its share of q, of k and of v, so concatenating the slices would interleave them wrongly.
    fused = list(universal_checkpoint_info(tag_dir).get("parameter_with_sub_params") or [])
    if fused:
        raise CheckpointError(
            f"{tag_dir}: the model's fused projections ({', '.join(fused[:3])}) were split per "
            "sub-parameter by tensor parallelism, which bigscale's export cannot put together "
            "yet; train this model with strategy.tensor_parallel_size=1 to export it"
        )
