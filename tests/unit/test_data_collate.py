"""Padding, packing and the real-token share of a batch."""

from __future__ import annotations

import datasets
import pytest
import torch

from bigscale.data.collate import pack_collate, pack_examples, pad_collate, real_token_fraction

IGN = -100


def test_pad_collate_shapes_and_masks() -> None:
    batch = pad_collate(
        [
            {"input_ids": [5, 6, 7], "labels": [IGN, 6, 7]},
            {"input_ids": [8], "labels": [8]},
        ],
        pad_id=0,
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[IGN, 6, 7], [8, IGN, IGN]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())
    assert real_token_fraction(batch) == pytest.approx(4 / 6)


def docs_dataset(lengths: list[int]) -> datasets.Dataset:
    # Token values encode (document, position) so every token is distinguishable.
    ids = [[1000 * d + p for p in range(n)] for d, n in enumerate(lengths)]
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})


def test_packing_keeps_every_token_once_and_restarts_positions() -> None:
    lengths = [5, 3, 7, 2, 8, 1, 4, 6]
    ds = docs_dataset(lengths)
    packed = pack_examples(ds, max_length=8)

    rows = packed[:]
    assert all(len(r) <= 8 for r in rows["input_ids"])
    assert len(packed) < len(lengths)  # something was actually packed together
    flat = [t for r in rows["input_ids"] for t in r]
    assert sorted(flat) == sorted(t for doc in ds["input_ids"] for t in doc)
    assert sum(rows["num_docs"]) == len(lengths)
    columns = (rows["input_ids"], rows["position_ids"], rows["labels"])
    for ids, pos, labels in zip(*columns, strict=True):
        assert pos == [t % 1000 for t in ids]  # restarts at 0 for each document
        # each document is contiguous and whole within its row
        docs = [t // 1000 for t in ids]
        assert all(docs.count(d) == lengths[d] for d in set(docs))
        # no loss on a document's first token, loss kept elsewhere
        assert labels == [IGN if p == 0 else t for t, p in zip(ids, pos, strict=True)]


def test_packing_is_deterministic() -> None:
    ds = docs_dataset([3, 6, 2, 5, 5, 1])
    assert pack_examples(ds, 8)[:] == pack_examples(ds, 8)[:]


def test_pack_collate_pads_to_max_length() -> None:
    packed = pack_examples(docs_dataset([3, 4, 6]), max_length=8)
    batch = pack_collate([packed[i] for i in range(len(packed))], pad_id=0, max_length=8)
    assert batch["input_ids"].shape == (2, 8)
    # No attention mask: the restarting positions keep documents (and the padding tail) apart.
    assert "attention_mask" not in batch
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 0], [0, 1, 2, 3, 4, 5, 0, 1]]
    assert int(batch["num_tokens"]) == 13
    assert batch["labels"].tolist()[1][6:] == [IGN, IGN]
    assert real_token_fraction(batch) == pytest.approx(13 / 16)
