"""Whether DeepSpeed's AutoTP training can shard a model, answered before any rank starts.

DeepSpeed decides inside the engine, on every rank, after the weights are loaded: a model whose
transformers class carries a tensor-parallel plan is sharded by that plan (refused when the plan
uses a style DeepSpeed does not know), any other by a heuristic over layer names, which refuses
some architectures outright (GPT-2 among them) and others whose layers it does not recognise.
Asking the same functions about the model built on the meta device (no weights, no memory)
gives DeepSpeed's own answer in the launcher, where the refusal is one line instead of an
assertion in every rank's traceback."""

from __future__ import annotations

from typing import Any

# Examples for the message only; DeepSpeed's functions make the decision.
WITH_PLAN = "llama, mistral, mixtral, qwen2, gemma2, phi, gpt_neox"
BY_HEURISTIC = "opt, bloom, falcon, gptj"
REFUSED = "gpt2, deberta, flaubert, fsmt, led, longformer, xlm, xlnet"


def autotp_refusal(config: Any, trust_remote_code: bool) -> str | None:
    """Why AutoTP cannot shard the causal LM of ``config``; None when it can, or when the model
    cannot be built without its weights (the rank then loads it and DeepSpeed decides)."""
    try:
        import torch
        from deepspeed.module_inject.auto_tp import AutoTP
        from deepspeed.module_inject.tp_plan_converter import TPPlanConverter
        from deepspeed.runtime.tensor_parallel.config import _get_hf_tp_plan
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception:  # an interface DeepSpeed moved, a class that needs real tensors to build
        return None
    plan = _get_hf_tp_plan(model)
    if plan:  # the engine's order: the model's own plan first, the heuristic only without one
        try:
            if TPPlanConverter.convert(plan) is not None:
                return None
        except ValueError as exc:
            return " ".join(str(exc).split())
    try:
        AutoTP.tp_parser(model)
    except AssertionError:
        return (
            f"{type(model).__name__} has no tensor-parallel plan and DeepSpeed's layer-name "
            "heuristic does not shard it"
        )
    return None


def refusal_message(key: str, name: str, config: Any, reason: str) -> str:
    model_type = getattr(config, "model_type", "?")
    return (
        f"{key} cannot shard {name} (model_type {model_type}): {reason}. DeepSpeed's AutoTP "
        f"training shards models whose transformers class carries a tensor-parallel plan (e.g. "
        f"{WITH_PLAN}) and some others by layer names (e.g. {BY_HEURISTIC}), and refuses "
        f"{REFUSED}; train this model with strategy.tensor_parallel_size=1 (ZeRO-3, "
        "strategy=zero3, shards the weights of any model)"
    )
