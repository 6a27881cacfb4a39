"""LoRA on models built from a config (no files, no processes): which layers ``all-linear``
means, the error for targets that match nothing, seeded adapters, the config checks and the
resume fingerprint."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from bigscale.checkpoint.compat import changes, fingerprint
from bigscale.config.compose import compose_config
from bigscale.config.schema import FinetuneConfig, FinetuneMethod
from bigscale.config.validate import Hardware, validate
from bigscale.errors import ConfigError, ModelError
from bigscale.model.lora import apply_lora, linear_layer_names, resolve_targets
from tests.models import tiny_gpt2, tiny_llama

LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama() -> LlamaForCausalLM:
    return tiny_llama(tie_word_embeddings=False)


def lora(**kwargs: object) -> FinetuneConfig:
    return FinetuneConfig(method=FinetuneMethod.lora, r=4, **kwargs)  # type: ignore[arg-type]


def test_linear_layer_names_are_leaf_names_once_without_the_lm_head() -> None:
    assert linear_layer_names(llama()) == LLAMA_LINEAR
    gpt2 = tiny_gpt2()
    assert linear_layer_names(gpt2) == ["c_attn", "c_proj", "c_fc"]  # Conv1D counts as linear


def test_all_linear_adapts_every_linear_layer_but_the_lm_head() -> None:
    model = apply_lora(llama(), lora(), seed=0, gradient_checkpointing=False)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    adapted = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in trainable}
    assert adapted == set(LLAMA_LINEAR)
    assert not any("lm_head" in name for name in trainable)
    assert isinstance(model.base_model.model.lm_head, torch.nn.Linear)  # not wrapped


def test_targets_that_match_nothing_name_the_layers_found() -> None:
    with pytest.raises(ModelError) as err:
        resolve_targets(llama(), lora(target_modules=["q_proj", "query"]))
    message = str(err.value)
    assert "finetune.target_modules: query match no module of LlamaForCausalLM" in message
    assert ", ".join(LLAMA_LINEAR) in message and "the LM head is lm_head" in message
    with pytest.raises(ModelError, match="finetune.modules_to_save: head match no module"):
        resolve_targets(llama(), lora(modules_to_save=["head"]))
    assert resolve_targets(llama(), lora(target_modules=["self_attn.q_proj"])) == [
        "self_attn.q_proj"
    ]


def test_adapters_depend_on_the_seed_alone() -> None:
    def lora_a(noise: int) -> list[torch.Tensor]:
        torch.manual_seed(noise)  # the RNG as data loading or another rank left it
        model = apply_lora(llama(), lora(), seed=7, gradient_checkpointing=False)
        return [p for n, p in model.named_parameters() if "lora_A" in n]

    assert all(torch.equal(a, b) for a, b in zip(lora_a(1), lora_a(2), strict=True))


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["finetune.r=0"], "finetune.r=0 must be at least 1"),
        (["finetune.alpha=0"], "finetune.alpha=0 must be positive"),
        (["finetune.dropout=1.0"], "finetune.dropout=1 must be in [0, 1)"),
        (["finetune.target_modules=[]"], "finetune.target_modules is empty"),
        (["finetune.target_modules=[all-linear,q_proj]"], "give it alone"),
    ],
)
def test_bad_lora_settings_fail_validation(overrides: list[str], fragment: str) -> None:
    cfg = compose_config(["finetune=lora", *overrides])
    with pytest.raises(ConfigError) as err:
        validate(cfg, 2, Hardware())
    assert fragment in str(err.value)


def test_a_lora_checkpoint_does_not_resume_as_another_finetune() -> None:
    lora_run = fingerprint(compose_config(["finetune=lora"]), 2)
    full = changes(lora_run, fingerprint(compose_config([]), 2))
    assert "finetune.method: 'lora' in the checkpoint, 'full' now" in full
    rank = changes(lora_run, fingerprint(compose_config(["finetune=lora", "finetune.r=8"]), 2))
    assert rank == ["finetune.r: 16 in the checkpoint, 8 now"]
    dropout = compose_config(["finetune=lora", "finetune.dropout=0.2"])
    assert changes(lora_run, fingerprint(dropout, 2)) == []
