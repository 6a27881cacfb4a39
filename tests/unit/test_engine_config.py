"""The DeepSpeed config is derived from the bigscale config: one source of truth."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bigscale.config.compose import compose_config
from bigscale.config.schema import Precision
from bigscale.config.validate import Hardware, validate
from bigscale.dist.engine import build_ds_config, lr_lambda
from bigscale.errors import ConfigError


@pytest.mark.parametrize("strategy", ["ddp", "zero1", "zero2", "zero3", "zero3_offload"])
def test_batch_sizes_agree_with_trainer(strategy: str) -> None:
    cfg = compose_config(
        [f"strategy={strategy}", "trainer.micro_batch_size=3", "trainer.grad_accum=5"]
    )
    ds = build_ds_config(cfg, world_size=4, precision=Precision.fp32)
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 5
    assert ds["train_batch_size"] == 3 * 5 * 4
    assert ds["zero_optimization"]["stage"] == cfg.strategy.zero_stage
    assert ds["gradient_clipping"] == cfg.optim.grad_clip


def test_offload_sections() -> None:
    ds = build_ds_config(compose_config(["strategy=zero3_offload"]), 2, Precision.fp32)
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    ds2 = build_ds_config(compose_config(["strategy=zero2"]), 2, Precision.fp32)
    assert "offload_optimizer" not in ds2["zero_optimization"]


@pytest.mark.parametrize(
    ("precision", "bf16", "fp16"),
    [(Precision.bf16, True, False), (Precision.fp16, False, True), (Precision.fp32, False, False)],
)
def test_precision_flags(precision: Precision, bf16: bool, fp16: bool) -> None:
    ds = build_ds_config(compose_config([]), 2, precision)
    assert ds["bf16"]["enabled"] is bf16
    assert ds["fp16"]["enabled"] is fp16


def test_user_json_is_merged_deeply(tmp_path: Path) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"allgather_bucket_size": 12345}}))
    cfg = compose_config(["strategy=zero2", f"strategy.deepspeed_config={path}"])
    ds = build_ds_config(cfg, 2, Precision.fp32)
    assert ds["zero_optimization"]["allgather_bucket_size"] == 12345
    assert ds["zero_optimization"]["stage"] == 2  # the generated keys survive the merge


def test_schedules() -> None:
    base = ["trainer.max_steps=100", "optim.warmup_steps=10", "optim.min_lr_ratio=0.1"]
    cosine = lr_lambda(compose_config([*base, "optim.schedule=cosine"]).optim, 100)
    assert cosine(0) == pytest.approx(0.1)  # first warmup step
    assert cosine(9) == pytest.approx(1.0)
    assert cosine(10) == pytest.approx(1.0)
    assert cosine(55) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert cosine(100) == pytest.approx(0.1)
    linear = lr_lambda(compose_config([*base, "optim.schedule=linear"]).optim, 100)
    assert linear(55) == pytest.approx(0.1 + 0.9 * 0.5)
    assert linear(32.5) == pytest.approx(0.1 + 0.9 * 0.75)
    constant = lr_lambda(compose_config([*base, "optim.schedule=constant"]).optim, 100)
    assert constant(90) == pytest.approx(1.0)


def test_user_json_may_not_set_the_zero_stage(tmp_path: Path) -> None:
    """The merge is deep, so the JSON's stage would silently replace strategy.zero_stage, which
    the plan, the memory estimate and the resume fingerprint read."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "allgather_bucket_size": 9}}))
    cfg = compose_config(["strategy=zero2", f"strategy.deepspeed_config={path}"])
    with pytest.raises(ConfigError) as err:
        validate(cfg, 2, Hardware())
    assert str(path) in str(err.value)
    assert "zero_optimization.stage -> strategy.zero_stage" in str(err.value)
    path.write_text(json.dumps({"zero_optimization": {"allgather_bucket_size": 9}}))
    validate(cfg, 2, Hardware())  # every other zero_optimization knob stays the user's
    assert (
        build_ds_config(cfg, 2, Precision.fp32)["zero_optimization"]["allgather_bucket_size"] == 9
    )


def test_an_unbuilt_cpu_adam_is_noticed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The offload strategies log that DeepSpeed is compiling its CPU Adam (minutes), so a first
    run does not look hung; where torch keeps JIT-built ops decides."""
    from bigscale.dist.engine import _cpu_adam_is_built

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert not _cpu_adam_is_built()
    (tmp_path / "py311_cpu" / "cpu_adam").mkdir(parents=True)
    assert not _cpu_adam_is_built()  # a build that never finished
    (tmp_path / "py311_cpu" / "cpu_adam" / "cpu_adam.so").write_bytes(b"")
    assert _cpu_adam_is_built()
