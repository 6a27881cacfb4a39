"""Real-token share of preference batches: pairs padded side by side (``data.packing=false``)
against the same pairs packed (``data.packing=true``: ``pack_pair_collate``).

    PYTHONPATH=. .venv/bin/python bench/pair_padding.py [--pairs 2048 --micro-batch 8]

Two data sets, tokenized by bigscale's own ``encode_pair`` and batched in a seeded shuffled
order, ``--micro-batch`` pairs per batch:

- mixed: prompts and completions of long-tailed lengths (log-uniform, 4 to 400 words for the
  prompt, 1 to 300 for each completion, chosen and rejected drawn apart), as in chat preference
  sets such as UltraFeedback where one side is often several times the other; tokenized with the
  tiny preset's character tokenizer, ``data.max_length=1024`` (longer pairs truncated, as the
  run would).
- dates: the ``dates_pairs`` task (``experiment=dpo_demo``): near-uniform one-turn chats through
  SmolLM2's chat template, when the converted model is found under ``$BIGSCALE_HOME``.

Padded: ``pair_collate``'s batch (chosen rows then rejected rows, right-padded to the longest
of the 2 x micro-batch sequences), real tokens over positions. Packed: ``pack_pair_collate``'s
batch of the same micro batch (what a run with ``data.packing=true`` trains on: the 2 x
micro-batch sequences first-fit decreasing into rows of at most ``data.max_length``, padded to
the longest row), real tokens over positions. Split-wide (mixed only, for comparison): the same
sequences packed as SFT packs a split (``bigscale.data.collate._pack_batch``: first fit into
rows of ``data.max_length``, windows of 1,000 sequences), the share a packer free to mix pairs
across micro batches would reach. Nothing is timed."""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bigscale.config.schema import DataConfig  # noqa: E402
from bigscale.data.collate import _pack_batch, real_token_fraction  # noqa: E402
from bigscale.data.pair_packing import pack_pair_collate  # noqa: E402
from bigscale.data.preference import encode_pair, pair_collate  # noqa: E402

WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "with",
    "was",
    "on",
    "be",
    "by",
    "this",
    "are",
    "from",
    "or",
    "at",
    "an",
]


def _text(rng: random.Random, low: int, high: int) -> str:
    n = int(math.exp(rng.uniform(math.log(low), math.log(high))))
    return " ".join(rng.choice(WORDS) for _ in range(n))


def mixed_rows(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        chosen, rejected = _text(rng, 1, 300), _text(rng, 1, 300)
        if rejected == chosen:  # a pair must prefer something
            rejected += " no"
        rows.append({"prompt": _text(rng, 4, 400), "chosen": chosen, "rejected": rejected})
    return rows


def encoded(rows: list[dict[str, Any]], tokenizer: Any, cfg: DataConfig) -> list[dict]:
    out = []
    for i, row in enumerate(rows):
        e = encode_pair(row, tokenizer, cfg, i)
        for side in ("input_ids", "labels", "rejected_input_ids", "rejected_labels"):
            e[side] = e[side][: cfg.max_length]
        out.append({**e, "pair_index": i})
    return out


def shares(pairs: list[dict], micro_batch: int, pad_id: int, width: int, seed: int) -> tuple:
    """(padded share, packed share, split-wide packed share, median padded share per batch,
    median packed share per batch) over the shuffled pairs."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    real = padded_all = packed_all = 0
    per_batch: list[float] = []
    per_packed: list[float] = []
    for start in range(0, len(order) - micro_batch + 1, micro_batch):
        batch = [pairs[i] for i in order[start : start + micro_batch]]
        padded = pair_collate(batch, pad_id)
        packed_batch = pack_pair_collate(batch, pad_id, width)
        assert int(packed_batch["num_tokens"]) == int(padded["num_tokens"])
        per_batch.append(real_token_fraction(padded))
        per_packed.append(real_token_fraction(packed_batch))
        real += int(padded["num_tokens"])
        padded_all += padded["input_ids"].numel()
        packed_all += packed_batch["input_ids"].numel()
    # The same sequences (both sides of the same pairs, in the same order) packed as SFT packs a
    # split: first fit into rows of data.max_length, in windows of 1,000 sequences.
    used = [pairs[i] for i in order[: len(per_batch) * micro_batch]]
    seqs = [(p["input_ids"], p["labels"]) for p in used]
    seqs += [(p["rejected_input_ids"], p["rejected_labels"]) for p in used]
    rows = 0
    for start in range(0, len(seqs), 1000):
        window = seqs[start : start + 1000]
        packed = _pack_batch(
            {"input_ids": [s[0] for s in window], "labels": [s[1] for s in window]}, width
        )
        rows += len(packed["input_ids"])
    return (
        real / padded_all,
        real / packed_all,
        real / (rows * width),
        statistics.median(per_batch),
        statistics.median(per_packed),
    )


def padded_all_ratio(padded_share: float, packed_share: float) -> float:
    """Positions of the padded batches over those of the packed ones (same real tokens)."""
    return packed_share / padded_share


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args()
    import tempfile

    from bigscale.model.tiny import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    cfg = DataConfig(style="preference", max_length=1024)
    pairs = encoded(mixed_rows(a.pairs, a.seed), tokenizer, cfg)
    lengths = [len(p["input_ids"]) for p in pairs] + [len(p["rejected_input_ids"]) for p in pairs]
    padded, packed, wide, median, packed_median = shares(
        pairs, a.micro_batch, tokenizer.pad_token_id, 1024, a.seed
    )
    print(
        f"mixed: {a.pairs} pairs, sequence length median {statistics.median(lengths):.0f}, "
        f"p90 {sorted(lengths)[int(0.9 * len(lengths))]}, max {max(lengths)} tokens; "
        f"{a.micro_batch} pairs per batch"
    )
    print(f"  padded pairs: {padded:.1%} real tokens (median batch {median:.1%})")
    print(
        f"  packed pairs (data.packing=true, rows of at most 1024): {packed:.1%} real tokens "
        f"(median batch {packed_median:.1%}), {padded_all_ratio(padded, packed):.2f}x fewer "
        "positions than padded"
    )
    print(f"  split-wide packing into rows of 1024 (SFT's rule, for comparison): {wide:.1%}")
    home = Path(os.environ.get("BIGSCALE_HOME", REPO / ".cache" / "bigscale"))
    models = sorted((home / "models" / "gguf").glob("*/tokenizer_config.json"))
    if not models:
        print("dates: skipped (no converted SmolLM2 under $BIGSCALE_HOME/models/gguf)")
        return
    from transformers import AutoTokenizer

    from bigscale.data.preference_task import dates_preference_rows

    smol = AutoTokenizer.from_pretrained(models[0].parent)
    cfg = DataConfig(style="preference", max_length=128)
    with tempfile.TemporaryDirectory():
        pairs = encoded(dates_preference_rows(0)[400:912], smol, cfg)
    padded, packed, _, median, packed_median = shares(
        pairs, a.micro_batch, smol.pad_token_id, 128, a.seed
    )
    print(
        f"dates_pairs (512 pairs, SmolLM2 chat template): padded {padded:.1%} real tokens, "
        f"packed {packed:.1%}"
    )


if __name__ == "__main__":
    main()
