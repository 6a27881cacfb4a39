"""Cross-field checks that the schema's types cannot express.

They run in the launcher before any rank starts and again in each rank (which may have been
started by a user's own torchrun), always before a model is loaded. Each failure names the keys
involved and what to set instead."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from bigscale.config.parallel import check_layout
from bigscale.config.schema import ALL_LINEAR, FinetuneMethod, Precision, TrainConfig
from bigscale.dist.layout import data_parallel_size
from bigscale.errors import ConfigError

# Keys that bigscale derives from its own config; a user DeepSpeed JSON may not set them, or the
# batch sizes in the JSON and in the training loop would drift apart.
DERIVED_DEEPSPEED_KEYS = {
    "train_batch_size": "trainer.micro_batch_size x trainer.grad_accum x ranks",
    "train_micro_batch_size_per_gpu": "trainer.micro_batch_size",
    "gradient_accumulation_steps": "trainer.grad_accum",
    "gradient_clipping": "optim.grad_clip",
    "bf16": "trainer.precision",
    "fp16": "trainer.precision",
    "optimizer": "optim.*",
    "scheduler": "optim.schedule",
    "zero_optimization.stage": "strategy.zero_stage (or strategy=zero1|zero2|zero3)",
}


@dataclass(frozen=True)
class Hardware:
    cuda_devices: int = 0
    bf16_supported: bool = False
    gpu_memory_gib: float = 0.0
    """Memory of the smallest GPU (``strategy=auto`` sizes for it); 0 when unknown."""
    cpu_bf16_units: bool = False
    """The CPU multiplies bf16 matrices in hardware (AVX-512 or Arm BF16), as oneDNN reports it.
    Without them bf16 matmuls are emulated: a training step's forward and backward took 29x as
    long as in fp32 on an AVX2-only EPYC (bench/RESULTS.md, "bf16 on a CPU")."""

    @classmethod
    def detect(cls) -> Hardware:
        import torch

        if not torch.cuda.is_available():
            return cls(cpu_bf16_units=cpu_has_bf16_units())
        count = torch.cuda.device_count()
        memory = min(torch.cuda.get_device_properties(i).total_memory for i in range(count))
        return cls(count, torch.cuda.is_bf16_supported(), memory / 1024**3)


def cpu_has_bf16_units() -> bool:
    """oneDNN's own check (also what bench/cpu_bf16.py reports)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        return False


def precision_warning(precision: Precision, hw: Hardware) -> str | None:
    """bf16 on a CPU that emulates it runs, but so slowly that a run looks hung: say so."""
    if precision != Precision.bf16 or hw.cuda_devices or hw.cpu_bf16_units:
        return None
    return (
        "this CPU has no bf16 matrix units (AVX-512 or Arm BF16), so bf16 matmuls are emulated "
        "and a training step runs tens of times slower than in fp32; set trainer.precision=auto "
        "(fp32 on CPU)"
    )


def resolve_precision(requested: Precision, hw: Hardware) -> Precision:
    if requested != Precision.auto:
        return requested
    return Precision.bf16 if hw.cuda_devices and hw.bf16_supported else Precision.fp32


def resolve_nproc(value: str, hw: Hardware) -> int:
    if value == "auto":
        return hw.cuda_devices or 2
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(
            f"launcher.nproc_per_node={value!r} is not valid; use a positive number or 'auto'"
        )
    return int(value)


def validate(cfg: TrainConfig, world_size: int, hw: Hardware) -> None:
    """Raise ConfigError on the first impossible combination."""
    _check_finite(cfg)
    check_layout(cfg, world_size)
    _check_trainer(cfg, world_size)
    _check_strategy(cfg, hw)
    _check_optim(cfg)
    _check_data(cfg)
    _check_model(cfg)
    _check_assets(cfg)
    _check_finetune(cfg)
    _check_dist(cfg)
    _check_objective(cfg)
    _check_logger(cfg)


def _positive(**values: int) -> None:
    for key, value in values.items():
        if value < 1:
            raise ConfigError(f"{key.replace('__', '.')}={value} must be at least 1")


def _check_trainer(cfg: TrainConfig, world_size: int) -> None:
    t = cfg.trainer
    _positive(
        trainer__max_steps=t.max_steps,
        trainer__micro_batch_size=t.micro_batch_size,
        trainer__grad_accum=t.grad_accum,
        trainer__log_every=t.log_every,
        trainer__max_bad_steps=t.max_bad_steps,
        trainer__loss_spike__window=t.loss_spike.window,
    )
    if t.loss_spike.factor <= 1.0:
        raise ConfigError(
            f"trainer.loss_spike.factor={t.loss_spike.factor} must be above 1 (a spike is a loss "
            "above factor x the running mean)"
        )
    if t.eval_every < 0:
        raise ConfigError(f"trainer.eval_every={t.eval_every} must be 0 (end only) or positive")
    dp = data_parallel_size(cfg.strategy, world_size)
    actual = t.global_batch(dp)
    if t.global_batch_size is not None and t.global_batch_size != actual:
        hint = ""
        per_rank = t.micro_batch_size * dp
        if t.global_batch_size % per_rank == 0:
            hint = f"; for that, set trainer.grad_accum={t.global_batch_size // per_rank}"
        raise ConfigError(
            f"impossible batch math: trainer.global_batch_size={t.global_batch_size} but "
            f"micro_batch_size {t.micro_batch_size} x grad_accum {t.grad_accum} x "
            f"{dp} data-parallel ranks = {actual}{hint}"
        )


def _check_strategy(cfg: TrainConfig, hw: Hardware) -> None:
    s = cfg.strategy
    if s.name == "auto":
        # `bigscale train` / `plan` replace it with a named strategy before any rank starts.
        raise ConfigError(
            "strategy=auto is chosen by `bigscale train` before the ranks start; under your own "
            "torchrun name one (run `bigscale plan strategy=auto` to see which fits)"
        )
    if s.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"strategy.zero_stage={s.zero_stage}; allowed values: 0, 1, 2, 3")
    if s.offload_params and s.zero_stage != 3:
        raise ConfigError(
            f"strategy.offload_params=true needs ZeRO stage 3 (strategy.zero_stage is "
            f"{s.zero_stage}); use strategy=zero3_offload"
        )
    if s.offload_optimizer and s.zero_stage == 0:
        raise ConfigError(
            "strategy.offload_optimizer=true needs ZeRO stage 1, 2 or 3 "
            "(strategy.zero_stage is 0); use strategy=zero2 strategy.offload_optimizer=true"
        )
    precision = cfg.trainer.precision
    if precision == Precision.fp16 and not hw.cuda_devices:
        raise ConfigError(
            "trainer.precision=fp16 needs a GPU; on CPU use trainer.precision=bf16 or fp32"
        )
    if precision == Precision.bf16 and hw.cuda_devices and not hw.bf16_supported:
        raise ConfigError(
            "trainer.precision=bf16 but this GPU has no bf16 support; use trainer.precision=fp16"
        )
    if s.deepspeed_config:
        _check_user_deepspeed_json(Path(s.deepspeed_config))


def _check_user_deepspeed_json(path: Path) -> None:
    if not path.is_file():
        raise ConfigError(f"strategy.deepspeed_config={path} does not exist")
    try:
        user = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path}:{exc.lineno}: invalid JSON in strategy.deepspeed_config ({exc.msg})"
        ) from None
    if not isinstance(user, dict):
        raise ConfigError(f"{path}: strategy.deepspeed_config must hold a JSON object")
    clashes = sorted(set(user) & set(DERIVED_DEEPSPEED_KEYS))
    zero = user.get("zero_optimization")
    if isinstance(zero, dict) and "stage" in zero:
        # The merge is deep: the JSON's stage would replace the generated one underneath the
        # plan, the memory estimate and the resume fingerprint, which all read strategy.*.
        clashes.append("zero_optimization.stage")
    if clashes:
        where = "; ".join(f"{k} -> {DERIVED_DEEPSPEED_KEYS[k]}" for k in clashes)
        raise ConfigError(
            f"{path} sets keys that bigscale derives from its config, so they could drift "
            f"apart; remove them and set the bigscale keys instead: {where}"
        )


def _check_finite(node: object, key: str = "") -> None:
    """Every number in the config is finite: ``nan`` and ``inf`` parse as floats and slip past
    range checks (``nan <= 0`` is false), then fail deep in torch."""
    if dataclasses.is_dataclass(node):
        for f in dataclasses.fields(node):
            _check_finite(getattr(node, f.name), f"{key}.{f.name}" if key else f.name)
    elif isinstance(node, list | tuple):
        for i, item in enumerate(node):
            _check_finite(item, f"{key}[{i}]")
    elif isinstance(node, float) and not math.isfinite(node):
        allowed = _FLOAT_RANGES.get(re.sub(r"\[\d+\]", "[]", key), "a finite number")
        raise ConfigError(f"{key}={node} is not a finite number; allowed: {allowed}")


# What each float setting may be, for the message when one is nan or inf.
_FLOAT_RANGES = {
    "optim.lr": "a positive number (typically 1e-5 to 1e-3)",
    "optim.weight_decay": "0 (off) or a positive number",
    "optim.beta1": "[0, 1)",
    "optim.beta2": "[0, 1)",
    "optim.eps": "a positive number (default 1e-8)",
    "optim.min_lr_ratio": "[0, 1]",
    "optim.grad_clip": "0 (off) or a positive number",
    "trainer.loss_spike.factor": "a number above 1",
    "trainer.epochs": "a positive number, or null",
    "trainer.peak_tflops": "a positive number, or null",
    "finetune.alpha": "a positive number",
    "finetune.dropout": "[0, 1)",
    "data.validation_fraction": "[0, 1)",
    "data.mixture[].weight": "a positive number",
    "model.create_if_missing.dropout": "[0, 1)",
    "eval.early_stopping.min_delta": "0 or a positive number",
    "dist.timeout_minutes": "a positive number of minutes",
    "checkpoint.every_minutes": "0 (off) or a positive number of minutes",
    "objective.beta": "a positive number (DPO typically 0.1)",
    "objective.label_smoothing": "[0, 0.5)",
    "objective.gamma": "0 or a positive number",
    "objective.lambda_": "0 or a positive number",
}


def _check_optim(cfg: TrainConfig) -> None:
    o = cfg.optim
    if o.lr <= 0:
        raise ConfigError(f"optim.lr={o.lr:g} must be positive (a typical value: 1e-5 to 1e-3)")
    if o.weight_decay < 0:
        raise ConfigError(f"optim.weight_decay={o.weight_decay:g} must be 0 (off) or positive")
    for name, beta in (("beta1", o.beta1), ("beta2", o.beta2)):
        if not 0.0 <= beta < 1.0:
            raise ConfigError(f"optim.{name}={beta:g} must be in [0, 1)")
    if o.eps <= 0:
        raise ConfigError(f"optim.eps={o.eps:g} must be positive (the default: 1e-8)")
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio={o.min_lr_ratio:g} must be in [0, 1]")
    if o.warmup_steps < 0:
        raise ConfigError(f"optim.warmup_steps={o.warmup_steps} must be 0 or positive")
    if not 0.0 <= o.warmup_ratio < 1.0:
        raise ConfigError(f"optim.warmup_ratio={o.warmup_ratio:g} must be in [0, 1)")
    if o.warmup_ratio > 0 and o.warmup_steps > 0:
        raise ConfigError(
            f"optim.warmup_steps={o.warmup_steps} and optim.warmup_ratio={o.warmup_ratio:g} are "
            "both set; give one (optim.warmup_ratio=0 to count steps, optim.warmup_steps=0 to "
            "use the fraction)"
        )
    # With trainer.epochs the steps come from the data: bigscale.config.derived checks them.
    if cfg.trainer.epochs is None and o.warmup_steps >= cfg.trainer.max_steps:
        raise ConfigError(
            f"optim.warmup_steps={o.warmup_steps} must be in [0, trainer.max_steps="
            f"{cfg.trainer.max_steps})"
        )
    if o.grad_clip < 0:
        raise ConfigError(f"optim.grad_clip={o.grad_clip:g} must be 0 (off) or positive")


def _check_data(cfg: TrainConfig) -> None:
    d = cfg.data
    if d.max_length < 2:
        raise ConfigError(f"data.max_length={d.max_length} must be at least 2")
    if not 0.0 <= d.validation_fraction < 1.0:
        raise ConfigError(f"data.validation_fraction={d.validation_fraction} must be in [0, 1)")
    if cfg.eval.exact_match and not d.test_path:
        raise ConfigError(
            "eval.exact_match=true needs data.test_path (a prompt/response file held out from "
            "training)"
        )
    if cfg.eval.max_new_tokens is not None and cfg.eval.max_new_tokens < 1:
        raise ConfigError(
            f"eval.max_new_tokens={cfg.eval.max_new_tokens} must be at least 1, or null to size "
            "it from data.test_path's longest answer"
        )
    # Light modules (no torch): an unknown template name or metric_fn fails in the launcher.
    from bigscale.data.chat import template_source
    from bigscale.train import early_stop

    template_source(d)
    early_stop.check(cfg)
    _check_scale(cfg)


def _check_scale(cfg: TrainConfig) -> None:
    """Streaming, mixtures and epochs: a stream has no length, so nothing may need one."""
    d, t = cfg.data, cfg.trainer
    if t.epochs is not None and t.epochs <= 0:
        raise ConfigError(f"trainer.epochs={t.epochs:g} must be positive (or null)")
    if d.streaming and t.epochs is not None:
        raise ConfigError(
            f"trainer.epochs={t.epochs:g} needs the dataset's length, which a stream "
            "(data.streaming=true) does not have; set trainer.max_steps=<optimizer steps> and "
            "trainer.epochs=null"
        )
    if d.streaming and t.num_workers:
        raise ConfigError(
            f"trainer.num_workers={t.num_workers}: data.streaming=true reads in the training "
            "process (its position is checkpointed); set trainer.num_workers=0"
        )
    _positive(data__stream_buffer=d.stream_buffer)
    if d.validation_examples < 0:
        raise ConfigError(f"data.validation_examples={d.validation_examples} must be >= 0")
    for i, source in enumerate(d.mixture):
        if not source.weight > 0:
            raise ConfigError(f"data.mixture[{i}].weight={source.weight:g} must be positive")


def _check_model(cfg: TrainConfig) -> None:
    m = cfg.model
    _positive(model__checkpoint_every=m.checkpoint_every)
    if m.loss_chunk_tokens < 0:
        raise ConfigError(
            f"model.loss_chunk_tokens={m.loss_chunk_tokens} must be 0 (off) or a token count"
        )
    # Light (no torch unless a directory holds only pickled weights): runs in the launcher.
    from bigscale.model.source import check_model_source

    check_model_source(m)


def _check_assets(cfg: TrainConfig) -> None:
    from bigscale.train.assets import check_generated_data

    check_generated_data(cfg.data)


def _check_finetune(cfg: TrainConfig) -> None:
    f = cfg.finetune
    if f.method != FinetuneMethod.lora:
        return
    _positive(finetune__r=f.r)
    if f.alpha <= 0:
        raise ConfigError(f"finetune.alpha={f.alpha:g} must be positive")
    if not 0.0 <= f.dropout < 1.0:
        raise ConfigError(f"finetune.dropout={f.dropout:g} must be in [0, 1)")
    if not f.target_modules:
        raise ConfigError(
            "finetune.target_modules is empty; name the layers that get adapters "
            "([q_proj,v_proj]) or use [all-linear]"
        )
    if ALL_LINEAR in f.target_modules and len(f.target_modules) > 1:
        raise ConfigError(
            f"finetune.target_modules={f.target_modules}: {ALL_LINEAR} already means every "
            "linear layer; give it alone or list the layers instead"
        )
    if cfg.model.loss_chunk_tokens and "lm_head" in [*f.target_modules, *f.modules_to_save]:
        raise ConfigError(
            "model.loss_chunk_tokens computes the loss from lm_head's own weight, so lm_head "
            "cannot carry an adapter or a trained copy: remove it from finetune.target_modules "
            "and finetune.modules_to_save, or set model.loss_chunk_tokens=0"
        )


def _check_dist(cfg: TrainConfig) -> None:
    minutes = cfg.dist.timeout_minutes
    if minutes <= 0:
        raise ConfigError(
            f"dist.timeout_minutes={minutes:g} must be positive: it is how long a collective "
            "waits for a dead or stuck rank before the job ends with an error"
        )


def _check_objective(cfg: TrainConfig) -> None:
    # Light module (no torch): the launcher runs it before any rank starts.
    from bigscale.data.preference import check_objective

    check_objective(cfg)


def _check_logger(cfg: TrainConfig) -> None:
    # Light module (mlflow itself is not imported): fails in the launcher, before any rank.
    from bigscale.metrics.mlflow_sink import check_installed

    check_installed(cfg.logger)
