"""Putting AutoTP slices back together from the full shapes alone (the real checkpoint path is
covered by tests/distributed/test_parallel_axes.py): the dim is the one the slices are short
in, uneven slices are fine, and slices that cannot make the full tensor are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bigscale.checkpoint.tp_merge import merge_slices
from bigscale.errors import CheckpointError

WHERE = Path("ckpt")


@pytest.mark.parametrize(
    ("shape", "sizes", "dim"),
    [
        ((128, 128), [64, 64], 0),  # column parallel: q/k/v, gate/up
        ((101, 128), [51, 50], 0),  # an LM head over an odd vocabulary
        ((128, 384), [192, 192], 1),  # row parallel: o_proj, down_proj
        ((3, 4), [2, 1, 1], 1),
    ],
)
def test_slices_concatenate_along_the_short_dim(
    shape: tuple[int, int], sizes: list[int], dim: int
) -> None:
    full = torch.randn(shape)
    parts = list(full.split(sizes, dim=dim))
    merged = merge_slices("w", parts, full.shape, WHERE)
    assert merged.shape == full.shape
    assert torch.equal(merged.contiguous(), full)


def test_replicated_tensors_are_taken_once() -> None:
    norm = torch.randn(128)
    assert merge_slices("norm", [norm, norm.clone()], norm.shape, WHERE) is norm


def test_slices_that_do_not_make_the_full_shape_are_refused() -> None:
    with pytest.raises(CheckpointError, match=r"\(128, 256\)"):
        merge_slices(
            "w", [torch.zeros(64, 128), torch.zeros(64, 128)], torch.Size([128, 256]), WHERE
        )
    with pytest.raises(CheckpointError, match="does not match the model config"):
        merge_slices(
            "w", [torch.zeros(64, 128), torch.zeros(32, 128)], torch.Size([128, 128]), WHERE
        )
