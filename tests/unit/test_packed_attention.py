"""Padding-free packing: a document's logits are the same packed with others as alone."""

from __future__ import annotations

import importlib.util
import itertools

import datasets
import pytest
import torch
from transformers import LlamaConfig

from bigscale.config.schema import AttnImplementation
from bigscale.data.collate import model_inputs, pack_collate, pack_examples
from bigscale.errors import ModelError
from bigscale.model.attention import attention_kernel, separates_packed_documents
from tests.models import tiny_gpt2, tiny_llama

LENGTHS = [5, 9, 3, 6]  # packed into rows of 16: [5, 9] + padding, [3, 6] + padding


def llama(attn: str) -> torch.nn.Module:
    return tiny_llama(vocab_size=50, attn_implementation=attn).eval()


def gpt2(attn: str) -> torch.nn.Module:
    return tiny_gpt2(vocab_size=50, attn_implementation=attn).eval()


def packed_batch() -> tuple[dict[str, torch.Tensor], list[tuple[int, int, int]]]:
    """A padded batch of packed rows, and the (row, start, end) of every real document."""
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(1, 50, (n,), generator=g).tolist() for n in LENGTHS]
    ds = datasets.Dataset.from_dict({"input_ids": docs, "labels": docs})
    packed = pack_examples(ds, max_length=16)
    assert packed["num_docs"] == [2, 2]  # several documents share a row, with a padding tail
    batch = pack_collate(list(packed), pad_id=0, max_length=16)
    spans = []
    for row, (positions, n_docs) in enumerate(
        zip(batch["position_ids"].tolist(), packed["num_docs"], strict=True)
    ):
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
        spans += [(row, a, b) for a, b in itertools.pairwise(starts[: n_docs + 1])]
    assert sorted(b - a for _, a, b in spans) == sorted(LENGTHS)
    return batch, spans


@pytest.mark.parametrize(
    ("build", "attn"),
    [(llama, "sdpa"), (llama, "eager"), (gpt2, "sdpa"), (gpt2, "eager")],
    ids=["llama-sdpa", "llama-eager", "gpt2-sdpa", "gpt2-eager"],
)
@torch.no_grad()
def test_packed_document_logits_equal_the_document_alone(build, attn: str) -> None:
    torch.manual_seed(0)
    model = build(attn)
    assert separates_packed_documents(model)
    batch, spans = packed_batch()
    assert "attention_mask" not in batch
    packed_logits = model(**model_inputs(batch)).logits
    for row, start, end in spans:
        ids = batch["input_ids"][row, start:end]
        alone = model(input_ids=ids[None]).logits[0]
        torch.testing.assert_close(packed_logits[row, start:end], alone, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_a_plain_attention_mask_would_leak_across_documents() -> None:
    """The control: with the padding-style mask the second document of a row sees the first, so
    the comparison above is one that fails when documents are not kept apart."""
    torch.manual_seed(0)
    model = llama("sdpa")
    batch, spans = packed_batch()
    leaky = {**model_inputs(batch), "attention_mask": torch.ones_like(batch["input_ids"])}
    row, start, end = spans[1]  # the second document of row 0
    assert start > 0
    alone = model(input_ids=batch["input_ids"][row, start:end][None]).logits[0]
    leaked = model(**leaky).logits[row, start:end]
    assert not torch.allclose(leaked, alone, atol=1e-3)
    # And with the model's default KV cache on, transformers skips the document mask.
    cached = model(**{**model_inputs(batch), "use_cache": True}).logits[row, start:end]
    assert not torch.allclose(cached, alone, atol=1e-3)


def test_a_model_without_transformers_mask_builder_is_reported() -> None:
    class Custom(torch.nn.Module):
        config = LlamaConfig(attn_implementation="sdpa")

    assert not separates_packed_documents(Custom())
    assert separates_packed_documents(llama("eager"))


def test_auto_attention_takes_flash_attention_only_where_it_runs() -> None:
    usable = importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()
    want = "flash_attention_2" if usable else "sdpa"
    assert attention_kernel(AttnImplementation.auto, torch.bfloat16) == want
    assert attention_kernel(AttnImplementation.auto, torch.float32) == "sdpa"
    assert attention_kernel(AttnImplementation.eager, torch.float32) == "eager"
    # fp32 weights rule flash attention out on any machine; the error gives the fix.
    with pytest.raises(ModelError, match="flash_attention_2: .*use model.attn_implementation=auto"):
        attention_kernel(AttnImplementation.flash_attention_2, torch.float32)
