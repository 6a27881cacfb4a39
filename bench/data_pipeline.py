"""The data pipeline alone on mixed-length chat: tokenization, packing and collation throughput,
and the share of real (non-padding) tokens in the batches, packing against padding to the longest
example of each batch. Several rounds, median.

    .venv/bin/python bench/data_pipeline.py [--examples 20000 --min-tokens 20 --max-tokens 400
                                             --max-length 2048 --pack-rows 2
                                             --pad-batches 8,16,32 --rounds 3]

Data: conversations generated here (a seeded mix of one to four user/assistant exchanges, a
system message in some), sized so that each renders to ``--min-tokens`` to ``--max-tokens``
tokens with the character tokenizer and ChatML-style template of bigscale's tiny model
(``bigscale.model.tiny.build_char_tokenizer``), the same one ``model=tiny`` loads.

Everything goes through bigscale's own functions, as a training run calls them:
``tokenize_split`` (``data.style=chat``: the template rendered prefix by prefix to find the
assistant turns, loss only on them), ``pack_examples`` (first fit into ``--max-length`` rows),
and ``build_loader`` (the shuffling ``ResumableDistributedSampler`` and a DataLoader) with
``pack_collate`` (rows padded to ``--max-length``) or ``pad_collate`` (examples padded to the
longest in the batch). Collation is timed twice: the collate function alone on batches fetched
beforehand, and the loader end to end (index sampling, fetching rows from the Arrow table,
collation), which is what a training step waits for."""

from __future__ import annotations

import argparse
import functools
import random
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import datasets
import torch

from bigscale.config.schema import DataConfig, DataStyle
from bigscale.data.collate import pack_collate, pack_examples, pad_collate
from bigscale.data.pipeline import build_loader, pad_token_id
from bigscale.data.tokenize import IGNORE_INDEX, tokenize_split
from bigscale.dist.env import DistEnv
from bigscale.model.tiny import build_char_tokenizer

WORDS = [
    "the",
    "a",
    "of",
    "to",
    "and",
    "in",
    "is",
    "it",
    "for",
    "on",
    "with",
    "as",
    "that",
    "this",
    "model",
    "data",
    "train",
    "token",
    "batch",
    "loss",
    "step",
    "please",
    "explain",
    "why",
    "how",
    "what",
    "when",
    "sure",
    "here",
    "answer",
    "question",
    "python",
    "code",
    "error",
    "value",
    "list",
    "number",
    "function",
    "return",
    "result",
    "example",
    "first",
    "second",
    "then",
    "because",
    "so",
    "can",
    "will",
    "would",
    "could",
]
# Template tokens around each message's content with the tiny model's template:
# "<|role|>" (one token per character) before, "</s>" (one special token) after.
OVERHEAD = {"system": 11, "user": 9, "assistant": 14}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=20000)
    parser.add_argument("--min-tokens", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=400)
    parser.add_argument("--max-length", type=int, default=2048, help="packed row length")
    parser.add_argument("--pack-rows", type=int, default=2, help="packed rows per micro batch")
    parser.add_argument("--pad-batches", default="8,16,32", help="examples per padded batch")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    pad_batches = [int(b) for b in args.pad_batches.split(",")]

    # No cache files: every round tokenizes and packs from scratch, in memory.
    datasets.disable_caching()
    datasets.logging.disable_progress_bar()
    tokenizer = build_char_tokenizer()
    cfg = DataConfig(path="generated", style=DataStyle.chat, max_length=args.max_length)
    raw = datasets.Dataset.from_list(conversations(args, random.Random(0)))

    tok_s: list[float] = []
    pack_s: list[float] = []
    collate_s: dict[str, list[float]] = {}
    loader_s: dict[str, list[float]] = {}
    shares: dict[str, tuple[float, float, int]] = {}
    tokenized = packed = None
    for r in range(args.rounds):
        t0 = time.perf_counter()
        tokenized, report = tokenize_split(raw, tokenizer, cfg, cache_file=None)
        t1 = time.perf_counter()
        packed = pack_examples(tokenized, args.max_length)
        t2 = time.perf_counter()
        tok_s.append(t1 - t0)
        pack_s.append(t2 - t1)
        pad_id = pad_token_id(tokenizer)
        cases: list[tuple[str, datasets.Dataset, int, Callable[..., dict[str, torch.Tensor]]]] = [
            (
                f"pack {args.pack_rows} x {args.max_length}",
                packed,
                args.pack_rows,
                functools.partial(pack_collate, pad_id=pad_id, max_length=args.max_length),
            ),
            *(
                (
                    f"pad to longest, {b} examples",
                    tokenized,
                    b,
                    functools.partial(pad_collate, pad_id=pad_id),
                )
                for b in pad_batches
            ),
        ]
        # Alternate the order of the cases by round, so drifting machine load hits all alike.
        for name, ds, batch, collate in cases if r % 2 == 0 else cases[::-1]:
            alone, end_to_end, share = time_collation(ds, batch, collate)
            collate_s.setdefault(name, []).append(alone)
            loader_s.setdefault(name, []).append(end_to_end)
            shares[name] = share
        print(
            f"round {r + 1}: tokenize {tok_s[-1]:.2f} s, pack {pack_s[-1]:.2f} s",
            flush=True,
        )
    assert tokenized is not None and packed is not None
    print_report(args, report, tokenized, packed, tok_s, pack_s, collate_s, loader_s, shares)


def conversations(args: argparse.Namespace, rng: random.Random) -> list[dict[str, Any]]:
    """Conversations whose rendered length is spread evenly over [min_tokens, max_tokens]."""
    out = []
    for _ in range(args.examples):
        target = rng.randint(args.min_tokens, args.max_tokens)
        roles = ["system"] if rng.random() < 0.3 else []
        exchanges = rng.randint(1, 4)
        roles += ["user", "assistant"] * exchanges
        # Short targets cannot carry many messages' template overhead: trim to what fits.
        while len(roles) > 2 and sum(OVERHEAD[r] + 1 for r in roles) > target:
            roles = roles[2:] if roles[0] != "system" else roles[1:]
        budget = max(len(roles), target - sum(OVERHEAD[r] for r in roles))
        cuts = sorted(rng.sample(range(1, budget), len(roles) - 1)) if len(roles) > 1 else []
        sizes = [b - a for a, b in zip([0, *cuts], [*cuts, budget], strict=True)]
        out.append(
            {
                "messages": [
                    {"role": r, "content": text(rng, n)} for r, n in zip(roles, sizes, strict=True)
                ]
            }
        )
    return out


def text(rng: random.Random, chars: int) -> str:
    words: list[str] = []
    while sum(len(w) + 1 for w in words) < chars:
        words.append(rng.choice(WORDS))
    return " ".join(words)[: max(1, chars)]


def time_collation(
    ds: datasets.Dataset, batch: int, collate: Callable[..., dict[str, torch.Tensor]]
) -> tuple[float, float, tuple[float, float, int]]:
    """Seconds for one epoch of batches: the collate function alone, then bigscale's loader end
    to end; and the (real-token share, loss-token share, positions) of what came out."""
    loader, sampler = build_loader(
        ds, collate, DistEnv(), batch, seed=0, num_workers=0, shuffle=True
    )
    order = list(sampler)
    fetched = [ds.__getitems__(order[i : i + batch]) for i in range(0, len(order), batch)]
    t0 = time.perf_counter()
    out = [collate(examples) for examples in fetched]
    alone = time.perf_counter() - t0
    sampler.set_epoch(1)  # a fresh epoch for the loader (a different but equally random order)
    t0 = time.perf_counter()
    for _ in loader:
        pass
    end_to_end = time.perf_counter() - t0
    positions = sum(b["input_ids"].numel() for b in out)
    real = sum(int(b["num_tokens"]) for b in out)
    loss = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in out)
    return alone, end_to_end, (real / positions, loss / positions, positions)


def print_report(
    args: argparse.Namespace,
    report: Any,
    tokenized: datasets.Dataset,
    packed: datasets.Dataset,
    tok_s: list[float],
    pack_s: list[float],
    collate_s: dict[str, list[float]],
    loader_s: dict[str, list[float]],
    shares: dict[str, tuple[float, float, int]],
) -> None:
    lengths = sorted(len(ids) for ids in tokenized["input_ids"])
    tokens = sum(lengths)
    tok, pack = statistics.median(tok_s), statistics.median(pack_s)
    print(
        f"\n{args.examples} chat conversations, {tokens:,} tokens (char tokenizer, ChatML-style "
        f"template): {lengths[0]} to {lengths[-1]} tokens each, median "
        f"{lengths[len(lengths) // 2]}; {report.loss_tokens:,} tokens carry loss (assistant "
        f"turns); {report.truncated} truncated; packed into {len(packed):,} rows of "
        f"{args.max_length}. Median of {args.rounds} rounds "
        f"({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC)."
    )
    print(f"\ntokenize (tokenize_split, chat)  {tok:6.2f} s  {tokens / tok:>12,.0f} tokens/s")
    print(f"pack (pack_examples, first fit)  {pack:6.2f} s  {tokens / pack:>12,.0f} tokens/s")
    header = "real tokens  loss tokens  collate alone, real tok/s  loader end to end, real tok/s"
    print(f"\n{'batches':<32}{header}")
    for name, (real, loss, positions) in shares.items():
        real_tokens = real * positions
        alone = statistics.median(collate_s[name])
        through = statistics.median(loader_s[name])
        print(
            f"{name:<32}{real:>10.2%}  {loss:>11.2%}  {real_tokens / alone:>26,.0f}  "
            f"{real_tokens / through:>29,.0f}"
        )


if __name__ == "__main__":
    main()
