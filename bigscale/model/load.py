"""Load a pretrained causal LM (or, for a reward model, the same checkpoint with a one-score
sequence-classification head) and its tokenizer from a hub id or a local directory."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
)
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from bigscale.config.schema import ModelConfig, Precision
from bigscale.errors import ModelError
from bigscale.logging import get_logger
from bigscale.model.attention import attention_kernel
from bigscale.model.chunked_loss import install_chunked_loss
from bigscale.model.gguf import ensure_converted, model_dir
from bigscale.model.source import creates_model, unsafe_pickle_error
from bigscale.model.tiny import create_tiny_model

log = get_logger(__name__)

_DTYPES = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}
_PRECISION_DTYPES = {
    Precision.bf16: torch.bfloat16,
    Precision.fp16: torch.float16,
    Precision.fp32: torch.float32,
}


def ensure_model_files(cfg: ModelConfig) -> None:
    """Create the tiny model on first use when the preset asks for it and the path is
    bigscale's own (``creates_model``), or convert ``model.gguf_file`` once; idempotent, atomic,
    never over an existing folder."""
    if cfg.gguf_file is not None:
        ensure_converted(cfg)
    if creates_model(cfg):
        assert cfg.create_if_missing is not None
        create_tiny_model(Path(cfg.name_or_path).expanduser(), cfg.create_if_missing)


def load_dtype(cfg: ModelConfig, precision: Precision) -> torch.dtype:
    if cfg.dtype == "auto":
        return _PRECISION_DTYPES[precision]
    return _DTYPES[cfg.dtype.value]


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    source = cfg.tokenizer_name_or_path or model_dir(cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the tokenizer from {source!r}: {exc}") from None
    if tokenizer.pad_token is None:
        # Padding positions never carry loss (labels are -100 there) and are masked out of
        # attention, so reusing EOS is safe; say so, because it changes what `pad` decodes to.
        if cfg.pad_token is not None:
            tokenizer.add_special_tokens({"pad_token": cfg.pad_token})
        elif tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
            log.info("tokenizer has no pad token; using its EOS token %r", tokenizer.eos_token)
        else:
            raise ModelError(
                f"tokenizer {source!r} has neither a pad nor an EOS token; set model.pad_token"
            )
    return tokenizer


def load_model(
    cfg: ModelConfig,
    precision: Precision,
    tokenizer: PreTrainedTokenizerBase,
    reward: bool = False,
) -> PreTrainedModel:
    """Call inside ``engine.partitioned_model_init`` so ZeRO-3 builds the model partitioned.
    ``reward``: the classifier of ``reward_head_kwargs`` instead of the causal LM."""
    dtype = load_dtype(cfg, precision)
    kernel = attention_kernel(cfg.attn_implementation, dtype)
    log.info("attention: %s", kernel)
    auto = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
    extra = reward_head_kwargs(tokenizer) if reward else {}
    try:
        model = auto.from_pretrained(
            model_dir(cfg),
            revision=cfg.revision,
            dtype=dtype,
            attn_implementation=kernel,
            trust_remote_code=cfg.trust_remote_code,
            **extra,
        )
    except pickle.UnpicklingError as exc:
        # torch's weights-only unpickler refused it; its message suggests weights_only=False.
        raise unsafe_pickle_error(cfg.name_or_path, cfg.name_or_path, exc) from None
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load model.name_or_path={cfg.name_or_path!r}: {exc}") from None
    if reward:  # saved with each checkpoint's config: what the export is loaded as
        model.config.architectures = [type(model).__name__]
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        select_checkpointed_layers(model, cfg.checkpoint_every)
        model.config.use_cache = False
    if cfg.loss_chunk_tokens:
        install_chunked_loss(model, cfg.loss_chunk_tokens)
        log.info("loss: LM head and cross-entropy %d tokens at a time", cfg.loss_chunk_tokens)
    return model


def reward_head_kwargs(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """A reward model: the pretrained body with a new one-output ``score`` head. The model
    scores each row at its last token that is not the pad token, so the config must know the
    pad id (the tokenizer's, EOS when it has none); an export carries it in its config."""
    return {"num_labels": 1, "pad_token_id": int(tokenizer.pad_token_id)}


def is_classifier(model: torch.nn.Module) -> bool:
    """A sequence-classification model of transformers (a reward model's)."""
    return type(model).__name__ in set(MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.values())


def select_checkpointed_layers(model: PreTrainedModel, every: int) -> int:
    """Keep recomputation on every ``every``-th decoder layer only; returns how many keep it.

    transformers marks each checkpointable block (``GradientCheckpointingLayer``) with a
    ``gradient_checkpointing`` flag, so the others simply run normally and keep their
    activations."""
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise ModelError(
            f"model.checkpoint_every={every}: {type(model).__name__} has no checkpointable "
            "layers; set model.gradient_checkpointing=false"
        )
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i % every == 0
    return sum(1 for layer in layers if layer.gradient_checkpointing)
