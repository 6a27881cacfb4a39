"""Cut a micro batch along the sequence for one rank of a sequence-parallel group.

Every rank of the group reads the same micro batch (the sampler shards by data-parallel rank)
and keeps its own slice of the positions. The labels are shifted first, so the last token of
a slice is still trained to predict the first token of the next slice, which lives on another
rank. Position ids travel with the slice: attention gathers them back into the whole
sequence's, which keeps packed documents apart.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bigscale.data.tokenize import IGNORE_INDEX

SHIFT_LABELS = "shift_labels"
"""Label of the next position, for each position of the slice (-100: no loss)."""
LOSS_TOKENS = "loss_tokens"
"""Tokens with a loss in the whole micro batch: each slice's summed loss is divided by it."""


def padded_length(length: int, sp: int) -> int:
    return -(-length // sp) * sp


def shard_batch(batch: dict[str, torch.Tensor], sp_rank: int, sp: int) -> dict[str, torch.Tensor]:
    """This rank's slice of ``batch``; ``num_tokens`` (throughput) stays the whole batch's."""
    ids = batch["input_ids"]
    rows, length = ids.shape
    if "position_ids" in batch:
        positions = batch["position_ids"]
    else:  # right-padded rows: one document each, padding at the end where no one looks back
        positions = torch.arange(length).expand(rows, length)
    shifted = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
    full = padded_length(length, sp)
    extra = full - length
    if extra:
        # The tail continues its row's positions, like padding does, and has no loss.
        tail = positions[:, -1:] + torch.arange(1, extra + 1)
        ids = F.pad(ids, (0, extra), value=int(ids[0, -1]))
        positions = torch.cat([positions, tail], dim=1)
        shifted = F.pad(shifted, (0, extra), value=IGNORE_INDEX)
    part = slice(sp_rank * full // sp, (sp_rank + 1) * full // sp)
    return {
        "input_ids": ids[:, part].contiguous(),
        "position_ids": positions[:, part].contiguous(),
        SHIFT_LABELS: shifted[:, part].contiguous(),
        LOSS_TOKENS: (shifted != IGNORE_INDEX).sum(),
        "num_tokens": batch["num_tokens"],
    }
