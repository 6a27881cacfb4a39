"""The plan's memory estimate and ``strategy=auto``.

The activation part is checked against what a real transformers Llama keeps for backward
(``saved_tensors_hooks``); the strategy choice against model-state arithmetic for a 1B model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from bigscale.config.compose import compose_config
from bigscale.config.schema import FinetuneConfig, FinetuneMethod, Precision
from bigscale.config.validate import Hardware, validate
from bigscale.errors import ConfigError
from bigscale.launch import auto_strategy
from bigscale.launch.memory import (
    ModelShape,
    Workload,
    activations,
    estimate,
    finetuned,
    model_shape,
    saved_activation_bytes,
)
from bigscale.launch.plan import make_plan, memory_estimate, render
from bigscale.model.chunked_loss import install_chunked_loss
from bigscale.model.load import select_checkpointed_layers
from bigscale.model.lora import apply_lora
from bigscale.model.shapes import LLAMA_3_2_1B, LLAMA_3_2_1B_PARAMS
from tests.models import plan_llama_config

CONF = Path(__file__).resolve().parents[2] / "conf"


@pytest.mark.parametrize(
    ("every", "chunk"),
    [(0, 0), (1, 0), (2, 0), (0, 128)],
    ids=["full", "checkpointed", "every-2nd-layer", "chunked-loss"],
)
@pytest.mark.parametrize(
    "changes", [{}, {"vocab_size": 8000, "hidden_size": 512, "intermediate_size": 1376}]
)
def test_stored_activations_match_what_backward_keeps(
    changes: dict, every: int, chunk: int
) -> None:
    """``every`` 0: no checkpointing; N: model.checkpoint_every=N. ``chunk``:
    model.loss_chunk_tokens."""
    config = plan_llama_config(**changes)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).train()
    if every:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        assert select_checkpointed_layers(model, every) == -(-config.num_hidden_layers // every)
    if chunk:
        install_chunked_loss(model, chunk)
    micro_batch, seq_len = 2, 256
    ids = torch.randint(0, config.vocab_size, (micro_batch, seq_len))
    shape = ModelShape.from_config(config, sum(p.numel() for p in model.parameters()))
    measured = saved_activation_bytes(model, input_ids=ids, labels=ids, use_cache=False)
    work = Workload(
        micro_batch,
        seq_len,
        checkpointing=every > 0,
        checkpoint_every=max(every, 1),
        loss_chunk_tokens=chunk,
    )
    estimated = activations(shape, work, Precision.fp32).stored
    assert estimated == pytest.approx(measured, rel=0.10)


LLAMA_1B = ModelShape.from_config(LlamaConfig(**LLAMA_3_2_1B), params=LLAMA_3_2_1B_PARAMS)


def test_model_states_shrink_with_each_stage() -> None:
    bf16 = Precision.bf16
    totals = [
        estimate(LLAMA_1B, s, bf16, dp_ranks=8).total_gib for s in auto_strategy.CANDIDATES.values()
    ]
    assert totals == sorted(totals, reverse=True) and len(set(totals)) == len(totals)
    ddp = estimate(LLAMA_1B, auto_strategy.CANDIDATES["ddp"], bf16, dp_ranks=8)
    assert ddp.total_gib == pytest.approx(LLAMA_3_2_1B_PARAMS * 16 / 1024**3)  # 2 + 2 + 12 bytes
    lora = ModelShape(**{**LLAMA_1B.__dict__, "trainable": 1_000_000})
    assert estimate(lora, auto_strategy.CANDIDATES["ddp"], bf16, 8).total_gib < 2.5


def test_candidates_mirror_the_strategy_presets() -> None:
    for name, strategy in auto_strategy.CANDIDATES.items():
        preset = yaml.safe_load((CONF / "strategy" / f"{name}.yaml").read_text())
        assert preset["zero_stage"] == strategy.zero_stage
        assert preset["offload_optimizer"] == strategy.offload_optimizer
        assert preset["offload_params"] == strategy.offload_params


@pytest.mark.parametrize(
    ("budget_gib", "chosen"),
    # Estimates for 8 ranks: ddp 21.2 GiB, zero1 9.1, zero2 7.1, zero3 5.1, zero3_offload 3.1.
    [(200.0, "ddp"), (20.0, "zero1"), (10.0, "zero2"), (7.0, "zero3"), (5.0, "zero3_offload")],
)
def test_auto_picks_the_fastest_strategy_that_fits(budget_gib: float, chosen: str) -> None:
    cfg = compose_config(["trainer.micro_batch_size=1", "data.max_length=2048"])
    cfg.model.gradient_checkpointing = True
    name, estimates = auto_strategy.choose(cfg, LLAMA_1B, Precision.bf16, 8, budget_gib)
    assert name == chosen
    assert estimates[name].total_gib <= auto_strategy.MARGIN * budget_gib


def test_auto_says_what_to_change_when_nothing_fits() -> None:
    cfg = compose_config(["trainer.micro_batch_size=64", "data.max_length=4096"])
    with pytest.raises(ConfigError, match=r"no strategy fits.*trainer\.micro_batch_size"):
        auto_strategy.choose(cfg, LLAMA_1B, Precision.bf16, 8, 80.0)


def test_plan_replaces_auto_with_the_choice_for_the_ranks(plan_llama: Path) -> None:
    overrides = ["strategy=auto", f"model.name_or_path={plan_llama}", "data=arithmetic"]
    gpus = Hardware(cuda_devices=8, bf16_supported=True, gpu_memory_gib=80.0)
    plan = make_plan(compose_config(overrides), overrides, hw=gpus)
    assert plan.cfg.strategy.name == "ddp"  # a 4M-parameter model fits anywhere
    assert "strategy=ddp" in plan.rank_overrides and "strategy=auto" not in plan.rank_overrides
    text = render(plan)
    assert "chosen by strategy=auto" in text and "activations" in text


def test_a_rank_never_runs_strategy_auto() -> None:
    with pytest.raises(ConfigError, match="strategy=auto is chosen by `bigscale train`"):
        validate(compose_config(["strategy=auto"]), 2, Hardware())


# -- parameter counts --------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_parameters_are_counted_as_the_model_has_them(tmp_path: Path, tied: bool) -> None:
    """A tied embedding is one tensor: SmolLM2-135M was planned as 162.8M for its 134.5M."""
    config = plan_llama_config(tie_word_embeddings=tied)
    config.save_pretrained(tmp_path)
    real = LlamaForCausalLM(config)
    assert model_shape(str(tmp_path), None, False).params == sum(
        p.numel() for p in real.parameters()
    )


@pytest.mark.parametrize(
    "finetune",
    [
        FinetuneConfig(method=FinetuneMethod.lora, r=8),
        FinetuneConfig(method=FinetuneMethod.lora, r=4, target_modules=["q_proj", "v_proj"]),
        FinetuneConfig(method=FinetuneMethod.lora, r=2, target_modules=["self_attn.o_proj"]),
        FinetuneConfig(
            method=FinetuneMethod.lora, r=4, target_modules=["down_proj"], modules_to_save=["norm"]
        ),
        FinetuneConfig(method=FinetuneMethod.lora, r=4, modules_to_save=["lm_head"]),
    ],
    ids=["all-linear", "q-v", "dotted", "saved-norms", "saved-head"],
)
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_lora_trainable_count_is_peft_s(
    tmp_path: Path, finetune: FinetuneConfig, tied: bool
) -> None:
    config = plan_llama_config(tie_word_embeddings=tied)
    config.save_pretrained(tmp_path)
    model = apply_lora(LlamaForCausalLM(config), finetune, seed=0, gradient_checkpointing=False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    shape = finetuned(model_shape(str(tmp_path), None, False), finetune)
    assert (shape.trainable, shape.params) == (trainable, total)
    full = estimate(shape, auto_strategy.CANDIDATES["zero1"], Precision.bf16, 1)
    assert full.trainable == trainable
    assert full.grads_gib == pytest.approx(trainable * 2 / 1024**3)  # grads for adapters only


def test_lora_plans_and_auto_price_only_the_adapters(plan_llama: Path) -> None:
    model = [f"model.name_or_path={plan_llama}", "data=arithmetic"]
    lora = ["finetune=lora", "finetune.r=2"]
    gpus = Hardware(cuda_devices=8, bf16_supported=True, gpu_memory_gib=80.0)
    plans = {
        name: make_plan(compose_config([*model, *extra]), [*model, *extra], hw=gpus)
        for name, extra in (("full", []), ("lora", lora))
    }
    mems = {name: memory_estimate(plan)[0] for name, plan in plans.items()}  # type: ignore[index]
    assert mems["lora"].trainable < mems["full"].trainable / 50
    assert mems["lora"].optimizer_gib < mems["full"].optimizer_gib / 50
    assert f"({mems['lora'].trainable:,} trainable)" in render(plans["lora"])
    shape = model_shape(str(plan_llama), None, False)
    cfg = plans["lora"].cfg
    _, auto = auto_strategy.choose(cfg, finetuned(shape, cfg.finetune), Precision.bf16, 8, 80.0)
    same = auto[cfg.strategy.name]  # the plan's own strategy, priced by strategy=auto
    assert same.total_gib == pytest.approx(mems["lora"].total_gib)


def test_plan_counts_the_async_checkpoint_snapshot_in_host_memory(plan_llama: Path) -> None:
    """The snapshot is what a rank saves: with ZeRO-2 over 8 bf16 ranks, the whole bf16 weights
    (rank 0 saves them) plus 1/8 of the fp32 master copy and Adam's two moments."""
    model = [f"model.name_or_path={plan_llama}", "model.create_if_missing=null"]
    gpus = Hardware(cuda_devices=8, bf16_supported=True, gpu_memory_gib=80.0)
    args = [*model, "data=arithmetic", "strategy=zero2"]
    plan = make_plan(compose_config(args), args, hw=gpus)
    params = memory_estimate(plan)[0].params  # type: ignore[index]
    gib = (params * 2 + params * 12 / 8) / 2**30
    assert f"checkpoint      asynchronous: {gib:.2f} GiB of host memory per rank" in render(plan)
    off = [*args, "checkpoint.async=false"]
    assert "checkpoint      synchronous" in render(make_plan(compose_config(off), off, hw=gpus))
