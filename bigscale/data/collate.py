"""Batches from tokenized examples: right-padding per batch, or packing several examples per row.

A batch is a dict of the model's inputs (``MODEL_INPUTS``) plus ``num_tokens``, the count of real
(non-padding) tokens, which throughput accounting reads and the model never sees.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import datasets
import torch

from bigscale.data.tokenize import IGNORE_INDEX

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "labels")
"""Batch keys passed to the model's forward."""


def _pad(rows: Sequence[Sequence[int]], length: int, value: int) -> torch.Tensor:
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


def pad_collate(examples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example.

    Returns ``input_ids``, ``labels`` (-100 on pad) and ``attention_mask`` (0 on pad), all long,
    and ``num_tokens``.
    """
    ids = [e["input_ids"] for e in examples]
    length = max(len(r) for r in ids)
    return {
        "input_ids": _pad(ids, length, pad_id),
        "labels": _pad([e["labels"] for e in examples], length, IGNORE_INDEX),
        "attention_mask": _pad([[1] * len(r) for r in ids], length, 0),
        "num_tokens": torch.tensor(sum(len(r) for r in ids)),
    }


def _pack_batch(batch: dict[str, list], max_length: int) -> dict[str, list]:
    rows: list[dict[str, list]] = []
    free: list[int] = []  # tokens still free in each row, same order as rows
    for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True):
        n = len(ids)
        if n > max_length:
            raise ValueError(f"example of {n} tokens does not fit a packed row of {max_length}")
        # First fit: the earliest row with room, so the result depends only on the input order.
        target = next((i for i, f in enumerate(free) if f >= n), None)
        if target is None:
            rows.append({"input_ids": [], "labels": [], "position_ids": [], "num_docs": 0})
            free.append(max_length)
            target = len(rows) - 1
        row = rows[target]
        row["input_ids"].extend(ids)
        # No loss on a document's first token: in a packed row it would be predicted from the
        # previous document's last token.
        row["labels"].extend([IGNORE_INDEX, *labels[1:]])
        row["position_ids"].extend(range(n))
        row["num_docs"] += 1
        free[target] -= n
    return {k: [r[k] for r in rows] for k in ("input_ids", "labels", "position_ids", "num_docs")}


def pack_examples(
    ds: datasets.Dataset,
    max_length: int,
    cache_file: str | None = None,
    batch_size: int = 1000,
) -> datasets.Dataset:
    """Pack whole examples into rows of at most ``max_length`` tokens (first fit, deterministic).

    Rows carry ``input_ids``, ``labels``, ``position_ids`` and ``num_docs``. ``position_ids``
    restart at 0 for every document, which is how the model keeps documents apart (see
    ``pack_collate``). The first token of each document gets no loss. Packing works within windows
    of ``batch_size`` examples, so it scales linearly.
    """
    return ds.map(
        _pack_batch,
        batched=True,
        batch_size=batch_size,
        fn_kwargs={"max_length": max_length},
        remove_columns=ds.column_names,
        cache_file_name=cache_file,
        load_from_cache_file=True,
        features=datasets.Features(
            {
                "input_ids": datasets.List(datasets.Value("int32")),
                "labels": datasets.List(datasets.Value("int32")),
                "position_ids": datasets.List(datasets.Value("int32")),
                "num_docs": datasets.Value("int32"),
            }
        ),
        desc="Packing",
    )


def pack_collate(
    examples: list[dict[str, Any]], pad_id: int, max_length: int | None = None
) -> dict[str, torch.Tensor]:
    """Pad packed rows to ``max_length`` (default: the longest row) for a fixed batch shape.

    Returns ``input_ids``, ``labels`` (-100 on pad), ``position_ids`` and ``num_tokens``, and no
    ``attention_mask``: given position ids and no mask, transformers' attention (sdpa, eager,
    flex: a block-diagonal causal mask; flash_attention_2: variable-length kernels) keeps every
    document to itself, so a packed document's logits equal its logits alone. The padding tail
    of a row gets positions 0, 1, ... too: it is one more document, attending only to itself.
    """
    length = max_length or max(len(e["input_ids"]) for e in examples)
    ids = [e["input_ids"] for e in examples]
    positions = [
        list(e["position_ids"]) + list(range(length - len(e["position_ids"]))) for e in examples
    ]
    return {
        "input_ids": _pad(ids, length, pad_id),
        "labels": _pad([e["labels"] for e in examples], length, IGNORE_INDEX),
        "position_ids": torch.tensor(positions, dtype=torch.long),
        "num_tokens": torch.tensor(sum(len(r) for r in ids)),
    }


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The model's forward arguments for a training or evaluation batch.

    ``use_cache=False``: a model left at its default builds a KV cache even in training, and
    transformers only reads document boundaries from ``position_ids`` when there is no cache, so
    packed documents would attend to each other. No cache is wanted here anyway.
    """
    return {"use_cache": False, **{k: v for k, v in batch.items() if k in MODEL_INPUTS}}


def real_token_fraction(batch: dict[str, torch.Tensor]) -> float:
    """Share of the batch's positions that hold real tokens rather than padding."""
    return float(batch["num_tokens"]) / max(batch["input_ids"].numel(), 1)
