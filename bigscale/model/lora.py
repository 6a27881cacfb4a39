"""LoRA through peft: wrap the loaded model with adapters, and turn a checkpoint's trained tensors
back into peft's own files (or a merged model) for export.

The adapters are added after the base model is loaded (under ZeRO-3 the base is already
partitioned; the new, small LoRA tensors are partitioned by DeepSpeed when the engine is built,
broadcast from rank 0). Everything that names peft lives here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from bigscale.config.schema import ALL_LINEAR, FinetuneConfig
from bigscale.errors import ModelError
from bigscale.logging import get_logger

log = get_logger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# peft's name for the one adapter bigscale trains; it appears inside every LoRA tensor name.
ADAPTER_NAME = "default"
_LINEAR = (torch.nn.Linear, Conv1D)  # Conv1D: GPT-2's linear layers


def linear_layer_names(model: torch.nn.Module) -> list[str]:
    """Leaf names of the model's linear layers (``q_proj``, ``down_proj``, ...), each once, in
    model order, without the LM head: what ``all-linear`` targets."""
    head = _output_embeddings(model)
    names: dict[str, None] = {}
    for name, module in model.named_modules():
        if isinstance(module, _LINEAR) and module is not head:
            names[name.rsplit(".", 1)[-1]] = None
    return list(names)


def _output_embeddings(model: torch.nn.Module) -> torch.nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def _matches(module_name: str, target: str) -> bool:
    # peft's rule for a list of targets: the whole name, or its last dotted components.
    return module_name == target or module_name.endswith(f".{target}")


def resolve_targets(model: torch.nn.Module, cfg: FinetuneConfig) -> list[str]:
    """The leaf names that get adapters; a target or module to save that matches nothing raises
    ModelError naming the linear layers the model does have (a typo would otherwise train
    fewer layers than asked, or fail later inside peft)."""
    found = linear_layer_names(model)
    targets = found if cfg.target_modules == [ALL_LINEAR] else list(cfg.target_modules)
    names = [name for name, _ in model.named_modules()]
    for key, wanted in (("target_modules", targets), ("modules_to_save", cfg.modules_to_save)):
        missing = [t for t in wanted if not any(_matches(n, t) for n in names)]
        if missing:
            head = _output_embeddings(model)
            head_name = next((n for n, m in model.named_modules() if m is head), None)
            extra = f"; the LM head is {head_name.rsplit('.', 1)[-1]}" if head_name else ""
            raise ModelError(
                f"finetune.{key}: {', '.join(missing)} match no module of "
                f"{type(model).__name__}. Its linear layers are: {', '.join(found) or 'none'}"
                f"{extra}. Set finetune.target_modules to some of them, or [{ALL_LINEAR}]"
            )
    if not targets:
        raise ModelError(f"{type(model).__name__} has no linear layers for LoRA adapters")
    return targets


SCORE_HEAD = "score"
"""A reward model's new head: trained in full (peft's ``modules_to_save``), never adapted."""


def lora_config(model: torch.nn.Module, cfg: FinetuneConfig) -> LoraConfig:
    from bigscale.model.load import is_classifier

    targets, to_save = resolve_targets(model, cfg), list(cfg.modules_to_save)
    task = "CAUSAL_LM"
    if is_classifier(model):
        # The head starts random: an adapter on it would train a low-rank update of noise.
        task, targets = "SEQ_CLS", [t for t in targets if t != SCORE_HEAD]
        to_save = [*to_save, SCORE_HEAD] if SCORE_HEAD not in to_save else to_save
    return LoraConfig(
        task_type=task,
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        modules_to_save=to_save or None,
        bias="none",
        use_dora=cfg.use_dora,
        use_rslora=cfg.use_rslora,
    )


def _auto_class(config: LoraConfig) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if config.task_type == "SEQ_CLS":
        return AutoModelForSequenceClassification
    return AutoModelForCausalLM


def apply_lora(
    model: PreTrainedModel, cfg: FinetuneConfig, seed: int, gradient_checkpointing: bool
) -> PeftModel:
    """Freeze ``model`` and add LoRA adapters. The adapters' random initial values come from
    ``seed`` alone, so every rank (and every resume, before the checkpoint overwrites them)
    builds the same ones whatever the RNG went through before."""
    config = lora_config(model, cfg)
    if gradient_checkpointing:
        # The frozen embeddings' output does not require grad; with checkpointed layers the
        # adapters inside them would then get no gradient (reentrant checkpointing).
        model.enable_input_require_grads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            peft_model = get_peft_model(model, config)
        except ValueError as exc:  # e.g. a target of a layer type LoRA does not support
            raise ModelError(f"peft cannot add LoRA adapters as configured: {exc}") from None
    trainable = sum(int(getattr(p, "ds_numel", p.numel())) for p in trainable_params(peft_model))
    log.info(
        "LoRA r=%d alpha=%g on %s: %s trainable parameters",
        cfg.r,
        cfg.alpha,
        ", ".join(sorted(config.target_modules)),
        f"{trainable:,}",
    )
    return peft_model


def trainable_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def save_adapter_config(model: torch.nn.Module, directory: Path) -> None:
    """``adapter_config.json`` beside a checkpoint's Hugging Face files: it marks the checkpoint
    as LoRA and is what export writes next to the adapter weights."""
    if isinstance(model, PeftModel):
        model.peft_config[ADAPTER_NAME].save_pretrained(str(directory))


def is_lora_checkpoint(hf_dir: Path) -> bool:
    return (Path(hf_dir) / ADAPTER_CONFIG).is_file()


def adapter_state_dict(weights: dict[str, Any], hf_dir: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's trained tensors (names as in the training-time PeftModel) under the names
    peft saves and loads (``...q_proj.lora_A.weight``), computed by peft itself on a meta-device
    copy of the model, so no weight is read twice and none of the base is needed."""
    from peft import get_peft_model_state_dict
    from transformers import AutoConfig

    config = LoraConfig.from_pretrained(str(hf_dir))
    with torch.device("meta"):
        base = _auto_class(config).from_config(AutoConfig.from_pretrained(hf_dir))
        base.name_or_path = config.base_model_name_or_path  # or peft renames it, with a warning
        shell = get_peft_model(base, config)
    wanted = {name for name, p in shell.named_parameters() if p.requires_grad}
    missing = sorted(wanted - set(weights))
    if missing:
        raise FileNotFoundError(f"the checkpoint lacks trained LoRA tensors: {missing[:4]}")
    state = {name: weights[name].contiguous().float() for name in sorted(wanted)}
    return get_peft_model_state_dict(shell, state_dict=state, adapter_name=ADAPTER_NAME)


def write_adapter(tensors: dict[str, torch.Tensor], hf_dir: Path, out_dir: Path) -> None:
    """peft's layout: ``adapter_config.json`` + ``adapter_model.safetensors``, loadable with
    ``PeftModel.from_pretrained(base, out_dir)``."""
    from safetensors.torch import save_file

    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        Path(out_dir) / ADAPTER_WEIGHTS,
        metadata={"format": "pt"},
    )
    config = json.loads((Path(hf_dir) / ADAPTER_CONFIG).read_text())
    config["inference_mode"] = True
    (Path(out_dir) / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))


def merged_state_dict(adapter_dir: Path, tokenizer_size: int) -> dict[str, torch.Tensor]:
    """The base model named in the adapter's config, with the adapter merged into its weights
    (in fp32): the full weights of a plain Hugging Face model. Loads the base in memory."""
    config = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text())
    source = config.get("base_model_name_or_path")
    seq_cls = config.get("task_type") == "SEQ_CLS"
    # A reward model's head is in the adapter (modules_to_save); only its shape matters here.
    auto = _auto_class(LoraConfig(task_type="SEQ_CLS" if seq_cls else "CAUSAL_LM"))
    extra = {"num_labels": 1} if seq_cls else {}
    try:
        base = auto.from_pretrained(
            source, revision=config.get("revision"), dtype=torch.float32, **extra
        )
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"cannot load the LoRA base model {source!r}: {exc}") from None
    if tokenizer_size > base.get_input_embeddings().num_embeddings:
        # Training added tokens: their embedding rows were random and, unless trained in full
        # (modules_to_save), are in no checkpoint, so no merge could reproduce them.
        if not config.get("modules_to_save"):
            raise FileNotFoundError(
                f"the tokenizer has {tokenizer_size} tokens, the base model {source!r} fewer: "
                "the added tokens' embeddings were not trained or saved; export the adapter "
                "alone, or train with finetune.modules_to_save=[embed_tokens,lm_head]"
            )
        base.resize_token_embeddings(tokenizer_size)  # as load_model did before training
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    return merged.state_dict()
