"""The parallel layout's rules, checked once before any rank starts (and again by each rank,
which knows the model's heads for certain)."""

from __future__ import annotations

from typing import Any

from bigscale.config.schema import AttnImplementation, LauncherKind, TrainConfig
from bigscale.errors import ConfigError


def check_layout(cfg: TrainConfig, world_size: int) -> None:
    s = cfg.strategy
    sp, tp = s.sequence_parallel_size, s.tensor_parallel_size
    for key, value in (("sequence_parallel_size", sp), ("tensor_parallel_size", tp)):
        if value < 1:
            raise ConfigError(f"strategy.{key}={value} must be at least 1 (1: off)")
    if (sp > 1 or tp > 1) and cfg.data.streaming:
        raise ConfigError(
            "data.streaming=true shards the stream by global rank, and the ranks of one "
            "sequence- or tensor-parallel group must read the same batches; use "
            "data.streaming=false with strategy.sequence_parallel_size or tensor_parallel_size"
        )
    if (sp > 1 or tp > 1) and cfg.objective.name.value != "sft":
        raise ConfigError(
            f"objective={cfg.objective.name.value} with strategy.sequence_parallel_size={sp} / "
            f"tensor_parallel_size={tp}: preference objectives sum each completion's log-probs "
            "over the whole sequence, which the split layouts do not gather yet; set both sizes "
            "to 1"
        )
    if sp > 1 and tp > 1:
        raise ConfigError(
            f"strategy.sequence_parallel_size={sp} with strategy.tensor_parallel_size={tp}: "
            "bigscale does not combine the two yet (DeepSpeed builds their groups separately); "
            "set one of them to 1"
        )
    if world_size % (sp * tp):
        key, value = ("sequence_parallel_size", sp) if sp > 1 else ("tensor_parallel_size", tp)
        raise ConfigError(
            f"strategy.{key}={value} does not divide the {world_size} ranks; use a launcher."
            f"nproc_per_node (x nodes) that is a multiple of {value}, or a {key} dividing "
            f"{world_size}"
        )
    _check_groups_inside_nodes(cfg, world_size, sp * tp)
    if sp > 1:
        _check_sequence_parallel(cfg, sp)
    if tp > 1:
        _check_tensor_parallel(cfg, tp)


def _check_groups_inside_nodes(cfg: TrainConfig, world_size: int, replica: int) -> None:
    """Groups are consecutive ranks, so they stay inside a node only when the ranks per node are
    a multiple of the group: an all-to-all or a tensor all-reduce per layer across the network
    would run at its speed, not the node's."""
    lc = cfg.launcher
    key, nproc = "launcher.nproc_per_node", lc.nproc_per_node
    if lc.kind == LauncherKind.slurm and lc.gpus_per_node > 0:
        key, nproc = "launcher.gpus_per_node", str(lc.gpus_per_node)  # one rank per GPU
    if replica == 1 or not nproc.isdigit() or world_size <= int(nproc) or int(nproc) % replica == 0:
        return
    s = cfg.strategy
    raise ConfigError(
        f"{key}={nproc} ranks per node would split the groups of "
        f"strategy.sequence_parallel_size={s.sequence_parallel_size} x tensor_parallel_size="
        f"{s.tensor_parallel_size} ({replica} consecutive ranks) across nodes; use a "
        f"{key} that is a multiple of {replica}, so each group stays inside "
        "a node and only the data-parallel reduction crosses the network"
    )


def _check_sequence_parallel(cfg: TrainConfig, sp: int) -> None:
    s, d = cfg.strategy, cfg.data
    if s.zero_stage == 0:
        # DeepSpeed 0.19.8's stage-0 path asks the sequence-parallel state for a model-parallel
        # rank it does not have (AttributeError: DeepSpeed#7833).
        raise ConfigError(
            f"strategy.sequence_parallel_size={sp} needs ZeRO stage 1, 2 or 3: DeepSpeed's "
            "stage-0 optimizer crashes with Ulysses sequence parallelism (DeepSpeed issue "
            "7833); use strategy=zero1, zero2 or zero3"
        )
    if cfg.model.attn_implementation == AttnImplementation.eager:
        raise ConfigError(
            f"strategy.sequence_parallel_size={sp} cannot use model.attn_implementation=eager "
            "(Ulysses needs a kernel that masks from position ids, not a full 4-D mask); use "
            "model.attn_implementation=auto or sdpa"
        )
    if d.packing and d.max_length % sp:
        raise ConfigError(
            f"data.max_length={d.max_length} with data.packing=true is the length of every "
            f"row, which strategy.sequence_parallel_size={sp} splits into equal parts: use a "
            f"multiple of {sp}, e.g. data.max_length={d.max_length + sp - d.max_length % sp}"
        )
    if cfg.model.loss_chunk_tokens:
        raise ConfigError(
            f"model.loss_chunk_tokens={cfg.model.loss_chunk_tokens} with "
            f"strategy.sequence_parallel_size={sp}: each rank already computes the loss of "
            "its own part of the sequence; set model.loss_chunk_tokens=0"
        )
    check_heads(model_config(cfg), sp, cfg.model.name_or_path)


def _check_tensor_parallel(cfg: TrainConfig, tp: int) -> None:
    s = cfg.strategy
    if s.zero_stage == 3:
        raise ConfigError(
            f"strategy.tensor_parallel_size={tp} with ZeRO stage 3: DeepSpeed's AutoTP training "
            "shards the weights itself and supports ZeRO stages 0-2 only; use strategy=zero1 "
            "or zero2 (or ddp)"
        )
    config = model_config(cfg)
    if config is not None:
        key = f"strategy.tensor_parallel_size={tp}"
        from bigscale.dist.autotp_support import autotp_refusal, refusal_message

        reason = autotp_refusal(config, cfg.model.trust_remote_code)
        if reason:
            raise ConfigError(refusal_message(key, cfg.model.name_or_path, config, reason))
        check_heads(config, tp, cfg.model.name_or_path, "strategy.tensor_parallel_size")


def check_heads(
    config: Any, size: int, name: str, key: str = "strategy.sequence_parallel_size"
) -> None:
    """Ulysses gives each rank heads/N query heads, and N/KV or KV/N key-value heads (DeepSpeed
    replicates KV heads when there are fewer than ranks); AutoTP splits both evenly."""
    if config is None:
        return
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = int(text.num_attention_heads)
    kv = int(getattr(text, "num_key_value_heads", None) or heads)
    kv_ok = kv % size == 0 or (key.endswith("sequence_parallel_size") and size % kv == 0)
    if heads % size or not kv_ok:
        raise ConfigError(
            f"{key}={size} must divide the attention heads of {name} ({heads} query heads, "
            f"{kv} key-value heads); use a size dividing {heads}"
            + ("" if key.endswith("tensor_parallel_size") else f" and {kv} (or a multiple of it)")
        )


def model_config(cfg: TrainConfig) -> Any | None:
    """The model's config when it can be read without a download (a local directory or the
    hub cache); None otherwise: each rank checks again once the model is there."""
    from pathlib import Path

    path = Path(cfg.model.name_or_path)
    if not (path / "config.json").is_file():
        return None
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(
            str(path), trust_remote_code=cfg.model.trust_remote_code, local_files_only=True
        )
    except (OSError, ValueError):
        return None
