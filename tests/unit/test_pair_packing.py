"""Packed pairs (data.packing=true with a preference objective): the per-sequence log-prob sums
from a packed batch equal those from the padded batch of the same pairs, on a real tiny model."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from bigscale.data.chat import IGNORE_INDEX
from bigscale.data.collate import model_inputs
from bigscale.data.pair_packing import (
    SEGMENT_IDS,
    pack_pair_collate,
    padded_pair_collate,
)
from bigscale.data.pipeline import make_collate
from bigscale.data.preference import pair_collate
from bigscale.model.chunked_loss import install_chunked_loss
from bigscale.train.objectives import sequence_logps
from tests.models import tiny_llama

MAX_LENGTH = 24
# (prompt, chosen completion, rejected completion) lengths: very different, as real pairs are.
SHAPES = [(5, 2, 9), (3, 12, 1), (8, 1, 1), (2, 6, 15), (10, 4, 3)]


def _pairs() -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for index, (prompt, chosen, rejected) in enumerate(SHAPES):
        p = torch.randint(1, 50, (prompt,), generator=g).tolist()
        sides = []
        for n in (chosen, rejected):
            c = torch.randint(1, 50, (n,), generator=g).tolist()
            sides.append((p + c, [IGNORE_INDEX] * prompt + c))
        (ids, labels), (r_ids, r_labels) = sides
        out.append(
            {
                "input_ids": ids,
                "labels": labels,
                "rejected_input_ids": r_ids,
                "rejected_labels": r_labels,
                "pair_index": index,
            }
        )
    return out


def _engine(model: torch.nn.Module) -> SimpleNamespace:
    def outputs(batch: dict[str, torch.Tensor], **extra: Any) -> Any:
        return model(**{**model_inputs(batch), **extra})  # as Engine.outputs merges them

    return SimpleNamespace(device=torch.device("cpu"), outputs=outputs)


def test_packed_rows_hold_several_sequences_each_with_its_own_positions() -> None:
    pairs = _pairs()
    batch = pack_pair_collate(pairs, pad_id=0, max_length=MAX_LENGTH)
    lengths = [len(p[k]) for k in ("input_ids", "rejected_input_ids") for p in pairs]
    assert batch["input_ids"].shape[0] < len(lengths)  # packing put several sequences in a row
    assert batch["input_ids"].shape[1] <= MAX_LENGTH
    assert int(batch["num_tokens"]) == sum(lengths)
    assert "attention_mask" not in batch
    segments, positions = batch[SEGMENT_IDS], batch["position_ids"]
    for i, n in enumerate(lengths):
        assert int((segments == i).sum()) == n
        assert positions[segments == i].tolist() == list(range(n))  # restart at 0 per sequence
    # Fewer positions than the padded batch of the same pairs (2N rows of the longest side).
    assert batch["input_ids"].numel() < pair_collate(pairs, pad_id=0)["input_ids"].numel()


@pytest.mark.parametrize("chunk_tokens", [0, 5], ids=["full-logits", "chunked-head"])
@torch.no_grad()
def test_packed_sequence_logps_equal_padded(chunk_tokens: int) -> None:
    model = tiny_llama(vocab_size=50, attn_implementation="sdpa").eval()
    if chunk_tokens:
        install_chunked_loss(model, chunk_tokens)
    engine = _engine(model)
    pairs = _pairs()
    padded, tokens = sequence_logps(engine, pair_collate(pairs, pad_id=0), chunk_tokens)
    packed_batch = pack_pair_collate(pairs, pad_id=0, max_length=MAX_LENGTH)
    packed, packed_tokens = sequence_logps(engine, packed_batch, chunk_tokens)
    assert packed_tokens.tolist() == tokens.tolist()
    assert (padded < 0).all()
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=0)


def test_packed_sequence_logps_carry_the_gradient_of_padded() -> None:
    """Training backpropagates through the per-segment sums as through the padded row sums."""
    pairs = _pairs()
    grads = []
    for batch in (
        pair_collate(pairs, pad_id=0),
        pack_pair_collate(pairs, pad_id=0, max_length=MAX_LENGTH),
    ):
        model = tiny_llama(vocab_size=50, attn_implementation="sdpa").eval()
        logps, _ = sequence_logps(_engine(model), batch, 0)
        chosen, rejected = logps.chunk(2)
        (chosen - rejected).sigmoid().log().neg().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)


def test_reference_pass_pads_whatever_the_packing() -> None:
    """The reference table is independent of data.packing: its pass always uses the padded
    collate, so a packed and a padded run compute (and share) the same table bit for bit."""
    cfg = SimpleNamespace(style="preference", packing=True, max_length=MAX_LENGTH)
    tokenizer = SimpleNamespace(pad_token_id=3, eos_token_id=4)
    packed = make_collate(cfg, tokenizer)  # type: ignore[arg-type]
    assert SEGMENT_IDS in packed(_pairs())
    reference = padded_pair_collate(packed)
    cfg.packing = False
    unpacked = make_collate(cfg, tokenizer)  # type: ignore[arg-type]
    for key, value in unpacked(_pairs()).items():
        assert torch.equal(reference(_pairs())[key], value), key
