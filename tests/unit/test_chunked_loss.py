"""model.loss_chunk_tokens: the chunked loss equals the model's own, in value and gradients,
without keeping the full logits for backward."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig

from bigscale.config.compose import compose_config
from bigscale.config.schema import Precision
from bigscale.config.validate import Hardware, validate
from bigscale.errors import ConfigError, ModelError
from bigscale.launch.memory import ModelShape, Workload, activations, saved_activation_bytes
from bigscale.model.chunked_loss import install_chunked_loss
from bigscale.model.shapes import LLAMA_3_2_1B, LLAMA_3_2_1B_PARAMS
from tests.models import tiny_gpt2, tiny_llama

VOCAB = 64


def batch(padded: bool) -> dict[str, torch.Tensor]:
    """Two rows of 12 tokens; labels -100 on a prompt span, and with ``padded`` on a padding tail
    masked out of attention (otherwise packed: position ids restart at a document boundary)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 12), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100
    if padded:
        mask = torch.ones_like(ids)
        mask[1, 9:] = 0
        labels[1, 9:] = -100
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
    positions = torch.cat([torch.arange(5), torch.arange(7)]).repeat(2, 1)
    labels[:, 5] = -100
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def loss_and_grads(model: torch.nn.Module, inputs: dict) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    loss = model(**inputs, use_cache=False).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize("chunk", [5, 24, 1000], ids=["uneven-chunks", "one-per-row", "one"])
@pytest.mark.parametrize("padded", [True, False], ids=["padded", "packed"])
@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama-untied", "gpt2-tied"])
def test_chunked_loss_equals_the_model_loss_and_its_gradients(build, padded, chunk) -> None:
    extra = {"tie_word_embeddings": False} if build is tiny_llama else {}
    reference = build(vocab_size=VOCAB, **extra).eval()  # GPT-2 has dropout
    chunked = copy.deepcopy(reference)
    install_chunked_loss(chunked, chunk)
    inputs = batch(padded)
    want_loss, want_grads = loss_and_grads(reference, inputs)
    got_loss, got_grads = loss_and_grads(chunked, inputs)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-6)
    assert got_grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    assert chunked.state_dict().keys() == reference.state_dict().keys()


def test_lora_adapters_get_the_same_gradients() -> None:
    """peft calls the wrapped model's forward, which is the chunked one."""
    lora = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    reference = get_peft_model(tiny_llama(vocab_size=VOCAB), lora)
    inner = tiny_llama(vocab_size=VOCAB)
    install_chunked_loss(inner, 5)
    chunked = get_peft_model(inner, lora)
    chunked.load_state_dict(reference.state_dict())
    want_loss, want_grads = loss_and_grads(reference, batch(padded=True))
    got_loss, got_grads = loss_and_grads(chunked, batch(padded=True))
    torch.testing.assert_close(got_loss, want_loss)
    lora_grads = [n for n in want_grads if "lora_" in n]
    assert lora_grads
    for name in lora_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], msg=name)


def test_forward_keeps_no_logits_for_backward() -> None:
    """Chunked, forward keeps only the head's input, which the model keeps anyway: the
    checkpointed chunks save nothing of their own."""
    reference = tiny_llama(vocab_size=4096, tie_word_embeddings=False)
    chunked = copy.deepcopy(reference)
    install_chunked_loss(chunked, 8)
    inputs = batch(padded=True)
    logits_fp32 = inputs["input_ids"].numel() * 4096 * 4
    inputs["use_cache"] = False
    standard = saved_activation_bytes(reference, **inputs)
    small = saved_activation_bytes(chunked, **inputs)
    # Exactly the fp32 log-softmax output is gone (a few scalars of per-chunk sums remain).
    assert logits_fp32 - 64 <= standard - small <= logits_fp32


def test_generation_without_labels_runs_the_model_own_forward() -> None:
    reference = tiny_llama(vocab_size=VOCAB).eval()
    chunked = copy.deepcopy(reference)
    install_chunked_loss(chunked, 4)
    prompt = torch.tensor([[1, 2, 3, 4]])
    want = reference.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    got = chunked.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)
    assert chunked(prompt).logits.shape == (1, 4, VOCAB)


def test_models_that_transform_their_logits_are_refused() -> None:
    model = tiny_llama(vocab_size=VOCAB)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ModelError, match=r"final_logit_softcapping=30.0.*loss_chunk_tokens=0"):
        install_chunked_loss(model, 8)


def test_a_lora_adapted_head_is_refused_with_the_fix() -> None:
    model = tiny_llama(vocab_size=VOCAB, tie_word_embeddings=False)
    install_chunked_loss(model, 8)
    model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ModelError, match=r"plain nn.Linear.*finetune.target_modules"):
        model(**batch(padded=True))


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["model.loss_chunk_tokens=-1"], "model.loss_chunk_tokens=-1 must be 0 (off)"),
        (
            ["finetune=lora", "finetune.target_modules=[lm_head]", "model.loss_chunk_tokens=64"],
            "remove it from finetune.target_modules",
        ),
        (
            ["finetune=lora", "finetune.modules_to_save=[lm_head]", "model.loss_chunk_tokens=64"],
            "remove it from finetune.target_modules and finetune.modules_to_save",
        ),
    ],
    ids=["negative", "lora-on-head", "trained-head-copy"],
)
def test_bad_settings_fail_before_launch(overrides: list[str], fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate(compose_config(overrides), 2, Hardware())
    assert fragment in str(err.value)


def test_the_plan_counts_one_chunk_of_logits() -> None:
    """Llama-3.2-1B's shape at 4 x 2048 tokens: the full loss needs 10 bytes per logit in bf16
    (9.8 GiB: bf16, fp32, the fp32 log-softmax kept); chunked at 1024 tokens, an 8th of that and
    nothing kept."""
    shape = ModelShape.from_config(LlamaConfig(**LLAMA_3_2_1B), LLAMA_3_2_1B_PARAMS)
    full = activations(shape, Workload(4, 2048), Precision.bf16)
    chunked = activations(shape, Workload(4, 2048, loss_chunk_tokens=1024), Precision.bf16)
    logits = 4 * 2048 * 128256
    assert full.peak - chunked.peak == logits * 10 - logits // 8 * 10
    assert full.stored - chunked.stored == logits * 4


def test_the_forward_keeps_the_model_signature_for_generate() -> None:
    model = tiny_llama(vocab_size=VOCAB)
    before = inspect.signature(model.forward)
    install_chunked_loss(model, 4)
    assert inspect.signature(model.forward) == before
    assert "logits_to_keep" in inspect.signature(model.forward).parameters
