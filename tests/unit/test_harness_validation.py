"""``eval.harness.*`` validation: early stopping on a harness score of a configured task is
accepted; ZeRO-3 (rank 0 holds a shard), a task that is not run, and no eval cadence are each
refused with the keys and the fix named."""

from __future__ import annotations

from pathlib import Path

import pytest

from bigscale.config.compose import compose_config
from bigscale.config.validate import Hardware, validate
from bigscale.errors import ConfigError


def check(tmp_path: Path, *overrides: str) -> None:
    base = ["experiment=arithmetic", "trainer.eval_every=2", "logger=disabled"]
    base += [f"eval.harness.include_path=[{tmp_path}]"]
    validate(compose_config([*base, *overrides]), 2, Hardware())


def test_early_stopping_on_a_harness_score_is_accepted(tmp_path: Path) -> None:
    check(
        tmp_path,
        "strategy=zero2",
        "eval.harness.tasks=[bs_mc]",
        "eval.early_stopping.metric=harness/bs_mc/acc",
    )


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        (
            ["strategy=zero3", "eval.harness.tasks=[bs_mc]"],
            ["eval.harness.tasks runs the tasks on rank 0 alone", "strategy=zero2"],
        ),
        (
            ["eval.harness.tasks=[bs_mc]", "eval.early_stopping.metric=harness/other/acc"],
            ["eval.early_stopping.metric=harness/other/acc", "eval.harness.tasks=['bs_mc']"],
        ),
        (
            ["eval.early_stopping.metric=harness/bs_mc/acc"],
            ["set eval.harness.tasks=[bs_mc]"],
        ),
        (
            ["eval.harness.tasks=[bs_mc]", "trainer.eval_every=0"],
            ["eval.harness.tasks needs trainer.eval_every > 0"],
        ),
    ],
    ids=["zero3", "task-not-run", "no-tasks", "no-cadence"],
)
def test_refused_with_the_fix(tmp_path: Path, overrides: list[str], fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        check(tmp_path, *overrides)
    for fragment in fragments:
        assert fragment in str(err.value), str(err.value)
