"""Early stopping decisions, eval.* validation and the user metric function's contract."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from bigscale.config.compose import compose_config
from bigscale.config.schema import EarlyStoppingConfig, StopMode
from bigscale.config.validate import Hardware, validate
from bigscale.errors import ConfigError
from bigscale.train.early_stop import EarlyStopper
from bigscale.train.metric_fn import call_metric_fn, load_metric_fn


def run(stopper: EarlyStopper, values: list[float], key: str = "eval_loss") -> int | None:
    for i, v in enumerate(values, start=1):
        if stopper.update(10 * i, {key: v}):
            return stopper.stopped_at
    return None


def test_min_mode_counts_evaluations_without_improvement() -> None:
    s = EarlyStopper(EarlyStoppingConfig(metric="eval_loss", patience=2))
    assert run(s, [3.0, 2.0, 2.5, 1.9, 2.0, 1.95]) == 60
    assert s.best == 1.9 and "eval_loss" in s.reason and "patience 2" in s.reason


def test_min_delta_must_be_beaten_and_nan_never_improves() -> None:
    s = EarlyStopper(EarlyStoppingConfig(metric="eval_loss", patience=1, min_delta=0.1))
    assert run(s, [1.0, 0.95]) == 20
    s = EarlyStopper(EarlyStoppingConfig(metric="eval_loss", patience=1))
    assert run(s, [1.0, math.nan]) == 20


def test_auto_mode_maximizes_generation_metrics() -> None:
    s = EarlyStopper(EarlyStoppingConfig(metric="exact_match", patience=1))
    assert run(s, [0.1, 0.2, 0.3], key="exact_match") is None
    assert run(s, [0.3], key="exact_match") == 10
    s = EarlyStopper(EarlyStoppingConfig(metric="exact_match", mode=StopMode.min, patience=1))
    assert run(s, [0.1, 0.2], key="exact_match") == 20


def test_state_round_trips_and_another_metric_starts_afresh() -> None:
    s = EarlyStopper(EarlyStoppingConfig(metric="eval_loss", patience=1))
    run(s, [1.0, 2.0])
    again = EarlyStopper(EarlyStoppingConfig(metric="eval_loss", patience=1))
    again.load_state_dict(s.state_dict())
    assert again.stopped_at == 20 and again.update(30, {"eval_loss": 0.0})
    other = EarlyStopper(EarlyStoppingConfig(metric="eval_ppl", patience=1))
    other.load_state_dict(s.state_dict())
    assert other.stopped_at is None


def test_missing_metric_lists_what_the_evaluation_has() -> None:
    s = EarlyStopper(EarlyStoppingConfig(metric="bleu"))
    with pytest.raises(ConfigError, match=r"metric='bleu' is not among.*\['eval_loss', 'rouge'\]"):
        s.update(10, {"step": 10, "eval_loss": 1.0, "rouge": 0.2})


def check(overrides: list[str]) -> None:
    validate(compose_config(["experiment=arithmetic", *overrides]), 2, Hardware())


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["eval.early_stopping.metric=eval_loss", "trainer.eval_every=0"], "eval_every > 0"),
        (["eval.early_stopping.metric=exact_match"], "set eval.during_training=true"),
        (
            ["eval.early_stopping.metric=bleu", "eval.during_training=true"],
            "set eval.metric_fn=package.module:function",
        ),
        (["eval.early_stopping.metric=eval_loss", "eval.early_stopping.patience=0"], "patience"),
        (["eval.during_training=true", "data.test_path=null"], "set data.test_path"),
        (["eval.metric_fn=no_such_module_xyz:f"], "cannot import module 'no_such_module_xyz'"),
        (["eval.metric_fn=json:no_such_fn"], "module 'json' has no function 'no_such_fn'"),
        (["eval.metric_fn=json.dumps"], "must look like 'package.module:function'"),
    ],
)
def test_eval_settings_are_checked_before_training(overrides: list[str], fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        check(overrides)
    assert fragment in str(err.value)


def test_metric_fn_from_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "my_metrics_mod.py").write_text(
        "def overlap(preds, refs):\n    return sum(p == r for p, r in zip(preds, refs)) / 2\n"
        "def many(preds, refs):\n    return {'n': len(preds), 'eval_loss': 0.0}\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    fn = load_metric_fn("my_metrics_mod:overlap")
    assert call_metric_fn(fn, "m:overlap", ["a", "b"], ["a", "c"]) == {"overlap": 0.5}
    many = load_metric_fn("my_metrics_mod:many")
    with pytest.raises(ConfigError, match="returned the key 'eval_loss'"):
        call_metric_fn(many, "m:many", ["a"], ["a"])


@pytest.mark.parametrize(
    ("result", "fragment"),
    [("0.5", "returned str"), ({"x": "high"}, "values must be numbers"), ({}, "non-empty")],
)
def test_metric_fn_results_must_be_numbers(result: object, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        call_metric_fn(lambda p, r: result, "m:f", ["a"], ["a"])
