"""Packed pairs (``data.packing=true`` with a preference objective): the chosen and rejected
sequences of a micro batch's pairs, packed padding-free into rows of at most ``data.max_length``.

Packing happens per micro batch, in the collate, not ahead over the whole split as SFT packs: a
step then trains on exactly the pairs the padded run would (same sampler, same reference rows),
so every loss and metric equals the padded computation; only the padding goes. Within a row the
sequences are kept apart as SFT packing keeps documents apart: ``position_ids`` restart at 0 for
each, no ``attention_mask`` (see ``bigscale.data.collate.pack_collate``), and no label on a
sequence's first token (the padded computation never predicts it either). ``segment_ids`` say
which sequence each position belongs to (chosen ``i`` is ``i``, rejected ``i`` is
``pairs + i``: the padded batch's row order; -1 on the padding tail), so
``bigscale.train.objectives.sequence_logps`` sums each sequence's log-probs on its own.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from bigscale.data.chat import IGNORE_INDEX
from bigscale.data.preference import pair_collate

SEGMENT_IDS = "segment_ids"
"""Batch key of the sequence index of every position of a packed pair batch."""


def pack_pair_collate(
    examples: list[dict[str, Any]], pad_id: int, max_length: int
) -> dict[str, torch.Tensor]:
    """The pairs' 2N sequences packed first-fit decreasing (longest first, ties in batch order:
    deterministic) into rows of at most ``max_length`` tokens, each row padded to the longest
    row. Returns ``input_ids``, ``labels``, ``position_ids``, ``segment_ids``, ``pair_index``
    and ``num_tokens``."""
    seqs = [(e["input_ids"], e["labels"]) for e in examples]
    seqs += [(e["rejected_input_ids"], e["rejected_labels"]) for e in examples]
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    rows: list[list[int]] = []  # the sequence indices in each row, in packing order
    free: list[int] = []
    for i in order:
        n = len(seqs[i][0])
        if n > max_length:  # tokenization fits each side to data.max_length; guard the invariant
            raise ValueError(f"a sequence of {n} tokens does not fit a packed row of {max_length}")
        target = next((r for r, f in enumerate(free) if f >= n), None)
        if target is None:
            rows.append([])
            free.append(max_length)
            target = len(rows) - 1
        rows[target].append(i)
        free[target] -= n
    length = max(max_length - f for f in free)
    shape = (len(rows), length)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    segments = torch.full(shape, -1, dtype=torch.long)
    # The padding tail gets positions 0, 1, ... too: one more document, attending to itself.
    positions = torch.zeros(shape, dtype=torch.long)
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            ids, lab = seqs[i]
            n = len(ids)
            input_ids[r, at : at + n] = torch.as_tensor(ids, dtype=torch.long)
            labels[r, at + 1 : at + n] = torch.as_tensor(lab[1:], dtype=torch.long)
            positions[r, at : at + n] = torch.arange(n)
            segments[r, at : at + n] = i
            at += n
        positions[r, at:] = torch.arange(length - at)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": positions,
        SEGMENT_IDS: segments,
        "pair_index": torch.tensor([int(e["pair_index"]) for e in examples], dtype=torch.long),
        "num_tokens": torch.tensor(sum(len(s[0]) for s in seqs)),
    }


def padded_pair_collate(collate: Callable[..., Any]) -> Callable[..., Any]:
    """``collate`` with packing undone: the padded pair collate with the same pad id. The
    reference pass scores pairs with it whatever ``data.packing`` says, so its table is the
    same, bit for bit, for a packed and a padded run (and one cached table serves both)."""
    if isinstance(collate, functools.partial) and collate.func is pack_pair_collate:
        return functools.partial(pair_collate, pad_id=collate.keywords["pad_id"])
    return collate
