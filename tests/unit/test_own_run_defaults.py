"""A run that names its own model or data starts from the generic presets: none of the demo
experiment's model, data, tuning, test set or metric. Decided at composition (one function the
launcher, the plan and every rank share) and said in the plan."""

from __future__ import annotations

from pathlib import Path

import pytest

from bigscale.config.compose import compose_config, demo_left_out
from bigscale.config.validate import Hardware
from bigscale.errors import ConfigError
from bigscale.launch.plan import make_plan, render

DEMO = compose_config([])


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BIGSCALE_HOME", str(tmp_path / "home"))


@pytest.mark.parametrize(
    "own",
    [
        ["model.name_or_path=MY_ORG/MY_MODEL", "data.path=MY.jsonl", "data.text_field=text"],
        ["model=qwen2_5_0_5b", "data=chat_files", "data.path=chats.jsonl"],
        ["model=smollm2_135m_gguf", "data=text_files", "data.path=corpus.txt"],
    ],
)
def test_own_model_or_data_gets_generic_defaults(own: list[str]) -> None:
    cfg = compose_config(own)
    assert DEMO.experiment == "demo" and cfg.experiment != "demo"
    generic = compose_config(["experiment=none", *own])
    assert cfg == generic  # exactly the generic presets plus the user's overrides
    assert cfg.optim.lr != DEMO.optim.lr and cfg.optim.warmup_ratio == 0
    assert cfg.trainer.max_steps != DEMO.trainer.max_steps
    assert cfg.data.test_path is None and cfg.data.generate is None  # no demo test set/metric
    assert cfg.eval.sample_prompts == [] and cfg.eval.max_examples != DEMO.eval.max_examples


def test_tuning_the_demo_keeps_it_and_a_named_experiment_always_applies() -> None:
    assert demo_left_out(["data.max_length=64", "trainer.max_steps=5", "finetune=lora"]) is None
    assert compose_config(["data.max_length=64"]).experiment == "demo"
    kept = compose_config(["experiment=demo", "model=smollm2_135m"])
    assert kept.experiment == "demo" and kept.data.generate == "dates"
    assert kept.model.name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert demo_left_out(["trainer.max_steps=5", "+data.path=x"]) == "+data.path=x"


def test_an_own_run_missing_its_model_or_data_says_what_to_give() -> None:
    with pytest.raises(ConfigError) as err:
        compose_config(["data=chat_files", "data.path=chats.jsonl"])
    msg = str(err.value)
    assert msg.startswith("model.name_or_path not set: your run names its own model or data")
    assert "(data=chat_files)" in msg and "experiment=demo" in msg


def test_the_plan_says_the_demo_was_left_out(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "hello"}\n')
    own = ["model=tiny", f"data.path={corpus}", f"run_dir={tmp_path / 'run'}"]
    text = render(make_plan(compose_config(own), own, Hardware()), with_memory=False)
    line = next(x for x in text.splitlines() if x.startswith("experiment"))
    assert "none: your run (model=tiny)" in line and "experiment=demo to keep them" in line
    assert "lr 2e-05, cosine, warmup 0 of 100 steps" in text
