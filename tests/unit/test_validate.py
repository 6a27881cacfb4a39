"""Cross-field checks fail before any model is loaded, naming the keys and the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bigscale.config.compose import compose_config
from bigscale.config.schema import Precision
from bigscale.config.validate import (
    Hardware,
    precision_warning,
    resolve_nproc,
    resolve_precision,
    validate,
)
from bigscale.errors import ConfigError

CPU = Hardware()
OLD_GPU = Hardware(cuda_devices=8, bf16_supported=False)
H100 = Hardware(cuda_devices=8, bf16_supported=True)


def check(overrides: list[str], world_size: int = 2, hw: Hardware = CPU) -> None:
    validate(compose_config(overrides), world_size, hw)


def test_default_job_is_valid_on_cpu() -> None:
    check([])


def test_impossible_batch_math_names_all_terms_and_a_fix() -> None:
    with pytest.raises(ConfigError) as err:
        check(["trainer.global_batch_size=256", "trainer.micro_batch_size=32"], world_size=2)
    msg = str(err.value)
    assert "global_batch_size=256" in msg and "32" in msg and "64" in msg
    assert "trainer.grad_accum=4" in msg


def test_consistent_global_batch_passes() -> None:
    check(["trainer.global_batch_size=256", "trainer.micro_batch_size=32", "trainer.grad_accum=4"])


@pytest.mark.parametrize("key", ["max_steps", "micro_batch_size", "grad_accum", "log_every"])
def test_non_positive_counts_rejected(key: str) -> None:
    with pytest.raises(ConfigError, match=f"trainer.{key}=0"):
        check([f"trainer.{key}=0"])


def test_param_offload_needs_stage_3() -> None:
    with pytest.raises(ConfigError, match="offload_params.*stage 3"):
        check(["strategy=zero2", "strategy.offload_params=true"])


def test_optimizer_offload_needs_zero() -> None:
    with pytest.raises(ConfigError, match="offload_optimizer"):
        check(["strategy=ddp", "strategy.offload_optimizer=true"])


def test_fp16_needs_a_gpu() -> None:
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        check(["trainer.precision=fp16"])
    check(["trainer.precision=fp16"], hw=OLD_GPU)


def test_bf16_needs_hardware_support() -> None:
    with pytest.raises(ConfigError, match="no bf16 support"):
        check(["trainer.precision=bf16"], hw=OLD_GPU)
    check(["trainer.precision=bf16"], hw=H100)
    check(["trainer.precision=bf16"], hw=CPU)  # DeepSpeed runs bf16 on CPU


def test_bf16_on_a_cpu_without_bf16_units_is_allowed_but_warned() -> None:
    warning = precision_warning(Precision.bf16, CPU)
    assert warning and "tens of times slower" in warning and "trainer.precision=auto" in warning
    assert precision_warning(Precision.bf16, Hardware(cpu_bf16_units=True)) is None
    assert precision_warning(Precision.bf16, H100) is None
    assert precision_warning(Precision.fp32, CPU) is None


def test_auto_precision_follows_hardware() -> None:
    assert resolve_precision(Precision.auto, CPU) == Precision.fp32
    assert resolve_precision(Precision.auto, H100) == Precision.bf16
    assert resolve_precision(Precision.auto, OLD_GPU) == Precision.fp32


def test_missing_local_model_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ConfigError, match="does not exist"):
        check(["model=gpt2", f"model.name_or_path={missing}", "data=arithmetic"])


def test_hub_id_is_not_checked_locally() -> None:
    check(["model=qwen2_5_0_5b", "data=arithmetic"])


def test_warmup_must_fit_in_training() -> None:
    with pytest.raises(ConfigError, match="warmup_steps"):
        check(["experiment=arithmetic", "trainer.max_steps=10", "optim.warmup_steps=10"])


def test_exact_match_needs_a_test_file() -> None:
    with pytest.raises(ConfigError, match="data.test_path"):
        check(["data.test_path=null", "eval.exact_match=true"])


def test_generation_budget_is_positive_or_sized_from_the_data() -> None:
    check(["eval.max_new_tokens=null"])
    check(["eval.max_new_tokens=1"])
    with pytest.raises(ConfigError, match=r"eval.max_new_tokens=0 must be at least 1, or null"):
        check(["eval.max_new_tokens=0"])


def test_nproc_auto_and_numbers() -> None:
    assert resolve_nproc("auto", CPU) == 2
    assert resolve_nproc("auto", H100) == 8
    assert resolve_nproc("3", CPU) == 3
    with pytest.raises(ConfigError, match="nproc_per_node"):
        resolve_nproc("two", CPU)


def test_user_deepspeed_json_may_not_set_derived_keys(tmp_path: Path) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 1024, "zero_optimization": {}}))
    with pytest.raises(ConfigError, match="train_batch_size -> trainer.micro_batch_size"):
        check([f"strategy.deepspeed_config={path}"])


def test_user_deepspeed_json_syntax_error_names_line(tmp_path: Path) -> None:
    path = tmp_path / "ds.json"
    path.write_text('{\n  "zero_optimization": {\n    "stage": 2,\n  }\n}\n')
    with pytest.raises(ConfigError, match=rf"{path}:4"):
        check([f"strategy.deepspeed_config={path}"])


FLOAT_KEYS = [
    "optim.lr",
    "optim.weight_decay",
    "optim.beta1",
    "optim.beta2",
    "optim.eps",
    "optim.min_lr_ratio",
    "optim.grad_clip",
    "trainer.loss_spike.factor",
    "trainer.epochs",
    "trainer.peak_tflops",
    "finetune.alpha",
    "finetune.dropout",
    "data.validation_fraction",
    "eval.early_stopping.min_delta",
    "dist.timeout_minutes",
    "checkpoint.every_minutes",
]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_non_finite_numbers_are_refused_with_the_allowed_range(key: str, value: str) -> None:
    """``nan`` slips past every ``x <= 0`` check; each float setting is refused by name."""
    with pytest.raises(ConfigError, match=rf"^{key}={value} is not a finite number; allowed: "):
        check([f"{key}={value}"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=0", "optim.lr=0 must be positive"),
        ("optim.weight_decay=-0.1", r"optim.weight_decay=-0.1 must be 0 \(off\) or positive"),
        ("optim.beta1=1.0", r"optim.beta1=1 must be in \[0, 1\)"),
        ("optim.beta2=-0.5", r"optim.beta2=-0.5 must be in \[0, 1\)"),
        ("optim.eps=0", "optim.eps=0 must be positive"),
        ("optim.min_lr_ratio=1.5", r"optim.min_lr_ratio=1.5 must be in \[0, 1\]"),
        ("optim.grad_clip=-1", "optim.grad_clip=-1 must be 0"),
    ],
)
def test_optimizer_settings_out_of_range(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check([override])
